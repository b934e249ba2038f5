//! The engine of vmigrate: it spawns and pins the workers, owns the bounded rings between
//! them, drives the `migration` state machines and moves frames between workers and byte
//! pipes. This is the API a Rust VMM embeds: hand [`source::migrate`] your memory regions,
//! dirty log and a pause/resume hook ([`vm::SourceVm`]), and [`destination::receive`] a
//! place to put memory and a way to resume ([`vm::DestinationVm`]).
//!
//! It knows nothing of NICs: connections are [`pipe::Connection`]s, byte pipes that the
//! kernel's TCP provides here and the userspace dataplane provides elsewhere.

pub mod abort;
pub mod adaptive;
pub mod cancel;
pub mod config;
pub mod destination;
mod framed;
pub mod guest;
pub mod pin;
pub mod pipe;
pub mod qemu;
pub mod rate;
pub mod ring;
pub mod source;
pub mod synthetic;
pub mod tls;
pub mod verify;
pub mod vm;

mod error;
pub use error::MigrationError;
