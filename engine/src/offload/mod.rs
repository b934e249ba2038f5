//! Compression offloaded to a device: DPDK's compressdev (`compress_isal`, ISA-L's deflate
//! on the CPU; Intel QAT in hardware). A device takes a batch of pages at once and works on
//! several at a time, so a worker hands over the pages of its batch that need compressing
//! (after zero pages and XBZRLE), and writes each result into its frame as it comes back.
//!
//! Each compression worker owns one queue of the device ([`OffloadQueue`]); the device
//! ([`OffloadDevice`]) opens as many queues as a session has workers. A page the device
//! fails (a full queue, an operation's error, a device gone) is compressed on the worker's
//! CPU instead and counted: nothing is lost. The destination's decompression workers
//! inflate a batch's `deflate` pages on a device's queues the same way, where it has one.

#[cfg(feature = "dpdk")]
pub mod dpdk;

use std::fmt;

/// What became of one input (a page, or a block of pages) handed to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offloaded<'a> {
    /// The input's raw deflate form, within the room it was given.
    Packed(&'a [u8]),
    /// The input does not shrink into its room: its pages go raw.
    Raw,
    /// The device failed this input, for the reason given: the worker compresses it.
    Failed(&'a str),
}

/// One queue of a compression device, owned by one worker.
pub trait OffloadQueue: Send {
    /// Compresses each of `inputs` (a page, or several pages one after another, and the
    /// most bytes its compressed form may take) to raw deflate and hands each result to
    /// `done` with the input's index, in the order the device finishes them. Every input
    /// gets exactly one result.
    fn compress_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Offloaded<'_>));

    /// Inflates each of `inputs` (raw deflate, and the bytes it must inflate to) and hands
    /// each result to `done` with its index, in the order the device finishes them: what
    /// it made, or `None` where it failed (the worker then inflates it on its CPU).
    fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>));

    /// The most pages this device wants in one operation: each operation costs it a
    /// setup (ISA-L's software device: about as much as compressing a page), so a batch's
    /// pages go to it in blocks of this many.
    fn pages_per_operation(&self) -> usize {
        1
    }
}

/// A queue as the destination's decompression workers use it.
pub struct Inflater(pub Box<dyn OffloadQueue>);

impl migration::receiver::PageInflater for Inflater {
    fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>)) {
        self.0.inflate_pages(inputs, done);
    }
}

/// A compression device a session's workers share, a queue each.
pub trait OffloadDevice: Send + Sync + fmt::Debug {
    /// The device's name (as DPDK's EAL knows it: `compress_isal0`).
    fn name(&self) -> &str;

    /// Opens `count` queues, one per compression worker of a session; the device is the
    /// session's until they are dropped.
    fn open(&self, count: usize) -> Result<Vec<Box<dyn OffloadQueue>>, String>;
}
