//! The connection seam of vmigrate: what every stack implements and what the engine and
//! the relay see of a connection. [`pipe::Connection`] is a byte pipe with an optional send
//! probe; [`pipe::Connector`] and [`pipe::Acceptor`] open them (the kernel's TCP here, the
//! userspace dataplane in `vmigrate-dataplane`); [`tls`] wraps any of them in TLS 1.3;
//! [`framed`] reads and writes the protocol's frames over one; [`lobby`] greets a
//! listener's connections each on a thread of its own, so that strangers hold up no one.
//!
//! Beside the seam, the pieces that every threaded layer above it shares: bounded rings
//! that never drop ([`ring`]), a session-wide abort that wakes whoever waits
//! ([`abort`]), and core pinning with per-CPU claims across processes ([`pin`]).
//!
//! It knows nothing of pages, sessions or NICs.

pub mod abort;
pub mod framed;
pub mod lobby;
pub mod pin;
pub mod pipe;
pub mod ring;
pub mod sockopt;
pub mod tls;
