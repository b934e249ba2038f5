//! The DPDK backend: one RX/TX queue pair of a DPDK port as a `smoltcp::phy::Device`, with
//! burst receive and batched transmit. A received frame is handed to smoltcp straight from
//! its mbuf; a sent frame is built by smoltcp straight into a fresh mbuf: no copies beyond
//! smoltcp's socket buffers. Checksums are computed by smoltcp (no offload declared yet).

use dpdk::{Mbuf, Mempool, Port};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;

/// Packets asked of the queue per receive burst, and gathered per transmit burst.
const BURST: u16 = 32;

pub struct DpdkQueue {
    port: &'static Port<'static>,
    pool: &'static Mempool,
    queue: u16,
    received: VecDeque<Mbuf<'static>>,
    to_send: Vec<Mbuf<'static>>,
    mtu: usize,
    /// Frames smoltcp built that no mbuf could hold (the pool empty): dropped.
    no_mbuf: u64,
}

impl DpdkQueue {
    pub fn new(port: &'static Port<'static>, pool: &'static Mempool, queue: u16) -> DpdkQueue {
        DpdkQueue {
            port,
            pool,
            queue,
            received: VecDeque::with_capacity(usize::from(BURST)),
            to_send: Vec::with_capacity(usize::from(BURST)),
            mtu: usize::from(port.mtu()),
            no_mbuf: 0,
        }
    }

    fn flush(&mut self) {
        if !self.to_send.is_empty() {
            let batch = std::mem::replace(&mut self.to_send, Vec::with_capacity(usize::from(BURST)));
            self.port.transmit(self.queue, batch);
        }
    }
}

pub struct DpdkRx {
    mbuf: Mbuf<'static>,
}

pub struct DpdkTx<'a> {
    queue: &'a mut DpdkQueue,
}

impl phy::RxToken for DpdkRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.mbuf.data())
    }
}

impl phy::TxToken for DpdkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let queue = self.queue;
        let mut mbuf = match Mbuf::alloc(queue.pool) {
            Some(mbuf) => mbuf,
            None => {
                queue.no_mbuf += 1;
                return f(&mut vec![0; len]);
            }
        };
        let Some(data) = mbuf.append(len as u16) else {
            queue.no_mbuf += 1;
            return f(&mut vec![0; len]);
        };
        let result = f(data);
        queue.to_send.push(mbuf);
        if queue.to_send.len() >= usize::from(BURST) {
            queue.flush();
        }
        result
    }
}

impl Device for DpdkQueue {
    type RxToken<'a> = DpdkRx;
    type TxToken<'a> = DpdkTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(DpdkRx, DpdkTx<'_>)> {
        if self.received.is_empty() {
            self.port.receive(self.queue, &mut self.received, BURST);
        }
        match self.received.pop_front() {
            Some(mbuf) => Some((DpdkRx { mbuf }, DpdkTx { queue: self })),
            None => {
                // Input drained: send what this round of the stack queued, as one burst.
                self.flush();
                None
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<DpdkTx<'_>> {
        Some(DpdkTx { queue: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = Some(usize::from(BURST));
        caps
    }
}

impl Drop for DpdkQueue {
    fn drop(&mut self) {
        self.flush();
        if self.no_mbuf > 0 {
            eprintln!("vmigrate: dpdk queue {}: {} frames dropped for want of an mbuf", self.queue, self.no_mbuf);
        }
    }
}
