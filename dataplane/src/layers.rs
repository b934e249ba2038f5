//! Small layers around a NIC device, chosen on the command line: checksum handling and a
//! frame tracer (smoltcp's `Tracer`, printing each frame decoded, to stderr).

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, TracerPacket};
use smoltcp::time::Instant;

/// Which IPv4 and TCP checksums our stack computes and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumPolicy {
    /// Compute on transmit, verify on receive: for any link that can corrupt a frame.
    #[default]
    Full,
    /// Compute on transmit, trust what arrives: for a link that cannot corrupt (the
    /// in-process wire) or whose NIC has verified it. The migration stream's own CRC still
    /// covers every frame of pages.
    TrustReceive,
}

/// A device whose checksum capabilities follow a `ChecksumPolicy`.
pub struct Checksums<D> {
    inner: D,
    policy: ChecksumPolicy,
}

impl<D> Checksums<D> {
    pub fn new(inner: D, policy: ChecksumPolicy) -> Self {
        Checksums { inner, policy }
    }
}

impl<D: Device> Device for Checksums<D> {
    type RxToken<'a>
        = D::RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.inner.receive(timestamp)
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.inner.capabilities();
        if self.policy == ChecksumPolicy::TrustReceive {
            caps.checksum.ipv4 = only_transmit(caps.checksum.ipv4);
            caps.checksum.tcp = only_transmit(caps.checksum.tcp);
        }
        caps
    }
}

fn only_transmit(checksum: Checksum) -> Checksum {
    match checksum {
        Checksum::Both | Checksum::Tx => Checksum::Tx,
        Checksum::Rx | Checksum::None => Checksum::None,
    }
}

/// The `Tracer` writer: one line per frame, with its direction and decoded headers.
pub fn trace_frame(timestamp: Instant, packet: TracerPacket) {
    eprintln!("{timestamp} {packet}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusting_received_frames_keeps_transmit_checksums() {
        for (given, transmit) in [(Checksum::Both, true), (Checksum::Tx, true), (Checksum::Rx, false)] {
            let kept = only_transmit(given);
            assert!(!kept.rx(), "receive checks are dropped");
            assert_eq!(kept.tx(), transmit, "transmit checksums are kept as they were");
        }
    }
}
