//! Seeded, deterministic network faults on what a NIC device receives, for tests and for
//! trying a link's worst on purpose: loss, corruption, duplication and reordering at any
//! rate (fractions of a percent too, which smoltcp's `FaultInjector` cannot express), and a
//! blackout, the link down for a while. Wrapping both ends faults both directions.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;
use std::collections::VecDeque;
use std::time::Duration;

/// What goes wrong, as chances per frame (0.0 to 1.0) and a blackout.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub drop: f64,
    pub corrupt: f64,
    pub duplicate: f64,
    /// A frame held back and delivered after the next one.
    pub reorder: f64,
    /// The link goes down `after` the first frame, for `length`: nothing arrives.
    pub blackout: Option<Blackout>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackout {
    pub after: Duration,
    pub length: Duration,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.drop > 0.0 || self.corrupt > 0.0 || self.duplicate > 0.0 || self.reorder > 0.0 || self.blackout.is_some()
    }
}

/// How long a frame held back for reordering waits for a next one before it goes anyway.
const HOLD_AT_MOST: Duration = Duration::from_millis(2);
/// Frames taken from the inner device per call.
const BURST: usize = 64;

pub struct FaultyDevice<D> {
    inner: D,
    faults: Faults,
    rng: SmallRng,
    first_frame: Option<std::time::Instant>,
    /// Frames through the faults, waiting for the stack.
    ready: VecDeque<Vec<u8>>,
    held: Option<(Vec<u8>, std::time::Instant)>,
}

impl<D: Device> FaultyDevice<D> {
    /// `inner` with `faults`, drawn from `seed` (the same seed, the same faults).
    pub fn new(inner: D, faults: Faults, seed: u64) -> Self {
        FaultyDevice {
            inner,
            faults,
            rng: SmallRng::seed_from_u64(seed),
            first_frame: None,
            ready: VecDeque::new(),
            held: None,
        }
    }

    fn in_blackout(&mut self) -> bool {
        let first = *self.first_frame.get_or_insert_with(std::time::Instant::now);
        self.faults.blackout.is_some_and(|b| {
            let since = first.elapsed();
            since >= b.after && since < b.after + b.length
        })
    }

    /// Takes what the inner device received and puts it through the faults.
    fn fill(&mut self, timestamp: Instant) {
        for _ in 0..BURST {
            let Some((rx, _)) = self.inner.receive(timestamp) else { break };
            let frame = phy::RxToken::consume(rx, |bytes| bytes.to_vec());
            self.arrive(frame);
        }
        if self.held.as_ref().is_some_and(|(_, since)| since.elapsed() >= HOLD_AT_MOST) {
            if let Some((frame, _)) = self.held.take() {
                self.ready.push_back(frame);
            }
        }
    }

    fn arrive(&mut self, mut frame: Vec<u8>) {
        if self.in_blackout() || self.rng.gen_bool(self.faults.drop) {
            return;
        }
        if !frame.is_empty() && self.rng.gen_bool(self.faults.corrupt) {
            let at = self.rng.gen_range(0..frame.len());
            frame[at] ^= 1 << self.rng.gen_range(0..8);
        }
        if self.held.is_none() && self.rng.gen_bool(self.faults.reorder) {
            self.held = Some((frame, std::time::Instant::now()));
            return;
        }
        if self.rng.gen_bool(self.faults.duplicate) {
            self.ready.push_back(frame.clone());
        }
        self.ready.push_back(frame);
        // The frame held back arrives after this one: out of order.
        if let Some((held, _)) = self.held.take() {
            self.ready.push_back(held);
        }
    }
}

/// A received frame, owned (it has been through the faults).
pub struct OwnedRx(Vec<u8>);

impl phy::RxToken for OwnedRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl<D: Device> Device for FaultyDevice<D> {
    type RxToken<'a>
        = OwnedRx
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.ready.is_empty() {
            self.fill(timestamp);
        }
        if self.ready.is_empty() {
            return None;
        }
        let tx = self.inner.transmit(timestamp)?;
        let frame = self.ready.pop_front()?;
        Some((OwnedRx(frame), tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

#[cfg(test)]
mod tests;
