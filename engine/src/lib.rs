//! The engine of vmigrate: it spawns and pins the worker pools, owns the bounded rings
//! between them, drives the `migration` state machines and moves frames between workers
//! and connections. This is the API a Rust VMM embeds: hand [`source::migrate`] your memory
//! regions, dirty log and a pause/resume hook ([`vm::SourceVm`]), and
//! [`destination::receive`] a place to put memory and a way to resume
//! ([`vm::DestinationVm`]).
//!
//! It knows nothing of NICs: connections are `transport::pipe::Connection`s, byte pipes
//! that the kernel's TCP provides in `transport` and the userspace dataplane provides in
//! `vmigrate-dataplane`. The guests it migrates live in `vmigrate-guests`.

pub mod adaptive;
pub mod cancel;
pub mod config;
pub mod destination;
pub mod pool;
pub mod rate;
pub mod source;
pub mod tuning;
pub mod verify;
pub mod vm;
pub mod watch;

pub mod error;
pub mod offload;
pub use error::{MigrationError, VmError};
