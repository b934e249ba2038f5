//! The migration layer of vmigrate: the wire protocol, page encodings and the pre-copy
//! logic, written as state machines and pure functions.
//!
//! This crate does no IO: it opens no sockets, spawns no threads and reads no clock. Time
//! comes in as an argument (`now`), bytes come in as slices, and decisions come out as
//! values, so that every piece can be tested on a virtual clock and driven by a kernel
//! socket, a smoltcp socket or a test harness alike (the shape of quinn-proto). The
//! `transport` crate drives it.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod codec;
pub mod control;
pub mod crc;
pub mod destination_session;
pub mod dirty;
pub mod frame;
pub mod handshake;
pub mod memory;
pub mod page_batch;
pub mod precopy;
pub mod qemu_stream;
pub mod receiver;
pub mod relay;
pub mod relay_cache;
pub mod relay_pages;
pub mod seen_pages;
pub mod shuffle;
pub mod source_session;
pub mod stats;
pub mod xbzrle;
pub mod xbzrle_cache;
pub mod zero;

/// Guest pages are 4 KiB, as x86 KVM guests dirty-log them.
pub const PAGE_SIZE_BYTES: usize = 4096;
