//! This host's QEMU as the end of a carried stream: the bytes the relay delivers into its
//! socket, read as they pass so that a channel QEMU closes early can be judged.
//!
//! QEMU 7.2's destination closes its multifd channels as soon as it has loaded the
//! migration, without draining them (`multifd_load_cleanup`). Its source can leave one
//! more packet after a channel's final SYNC: when the last batch of pages and the SYNC
//! request reach a sender thread that has not woken yet, it sends the pages with the SYNC
//! and then a header with no pages (fixed upstream in QEMU 9.0, "Separate SYNC request
//! with normal jobs"). The destination never reads that packet, and cannot finish loading
//! before it has read every page before the SYNC, so a close that leaves only such
//! packets behind loses nothing. Whether that is what was left is decided here, by
//! reading the undelivered bytes: no page among them, or the relay fails as before.

use crate::waits::{during, Wait};
use crate::RelayFailure;
use migration::qemu_stream::{Kind, StreamReader};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

/// The stream's bytes after QEMU closed its end.
#[derive(Debug, Clone, Copy, Default)]
struct Undelivered {
    bytes: u64,
    pages_before: u64,
}

pub(crate) struct QemuSink {
    local: UnixStream,
    stream: StreamReader,
    closed: Option<Undelivered>,
    /// Time spent in writes to QEMU (blocked while QEMU had not read what came before).
    pub writing: std::time::Duration,
}

/// An error on this host's QEMU socket, said the way an operator reads it.
pub(crate) fn qemu_failure(doing: &str, err: &io::Error) -> RelayFailure {
    if is_closed_by_qemu(err) {
        RelayFailure::Local(format!("QEMU closed its migration stream (it failed or refused the migration): {err}"))
    } else {
        RelayFailure::Local(format!("{doing} QEMU: {err}"))
    }
}

/// QEMU closed its end: a write fails with EPIPE, and a read with ECONNRESET when QEMU
/// left bytes unread.
pub(crate) fn is_closed_by_qemu(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

impl QemuSink {
    pub(crate) fn new(local: UnixStream) -> QemuSink {
        QemuSink { local, stream: StreamReader::default(), closed: None, writing: std::time::Duration::ZERO }
    }

    /// Writes `bytes` to QEMU; once QEMU has closed a multifd channel, reads them instead.
    pub(crate) fn deliver(&mut self, bytes: &[u8]) -> Result<(), RelayFailure> {
        if self.closed.is_none() {
            let started = std::time::Instant::now();
            let written = during(Wait::WritingQemu, || self.local.write_all(bytes));
            self.writing += started.elapsed();
            match written {
                Ok(()) => {
                    // Read only what may need judging: a main stream closed early fails
                    // whatever it held, so its bytes are not parsed twice over.
                    if matches!(self.stream.kind(), Kind::Unknown | Kind::Multifd) {
                        self.stream.feed(bytes, &mut |_| {});
                    }
                    return Ok(());
                }
                Err(err) if is_closed_by_qemu(&err) && self.stream.kind() == Kind::Multifd => {
                    // Some of `bytes` may have reached the socket: QEMU read none of them.
                    self.closed = Some(Undelivered { bytes: 0, pages_before: self.stream.pages_carried() });
                }
                Err(err) => return Err(qemu_failure("writing to", &err)),
            }
        }
        if let Some(undelivered) = self.closed.as_mut() {
            undelivered.bytes += bytes.len() as u64;
        }
        self.stream.feed(bytes, &mut |_| {});
        Ok(())
    }

    /// The stream ended whole (its digest checked out): tells QEMU so, and returns the
    /// bytes QEMU closed its end on (0 when it took them all), or an error when pages
    /// were among them.
    pub(crate) fn finish(self) -> Result<u64, RelayFailure> {
        let Some(undelivered) = self.closed else {
            // QEMU reads the end of its stream; the other direction stays open.
            let _ = self.local.shutdown(std::net::Shutdown::Write);
            return Ok(0);
        };
        let pages = self.stream.pages_carried() - undelivered.pages_before;
        if pages > 0 || self.stream.gave_up().is_some() {
            let what = match self.stream.gave_up() {
                Some(reason) => format!("bytes the relay could not read ({reason})"),
                None => format!("{pages} pages"),
            };
            return Err(RelayFailure::Local(format!(
                "QEMU closed a multifd channel with {what} in the {} bytes still to deliver",
                undelivered.bytes
            )));
        }
        log::info!(
            "QEMU closed a multifd channel once done with it; {} bytes without pages were left",
            undelivered.bytes
        );
        Ok(undelivered.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A multifd stream as QEMU 7.2 writes it: the init packet, then packets of `pages`
    /// pages each (a header with the offsets, then the pages).
    fn multifd(packets: &[u32]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut init = vec![0u8; 64];
        init[..4].copy_from_slice(&0x1122_3344u32.to_be_bytes());
        init[4..8].copy_from_slice(&1u32.to_be_bytes());
        bytes.extend(init);
        for &pages in packets {
            let mut header = vec![0u8; 320 + 8 * 128];
            header[..4].copy_from_slice(&0x1122_3344u32.to_be_bytes());
            header[4..8].copy_from_slice(&1u32.to_be_bytes());
            header[12..16].copy_from_slice(&128u32.to_be_bytes());
            header[16..20].copy_from_slice(&pages.to_be_bytes());
            header[64..70].copy_from_slice(b"pc.ram");
            bytes.extend(header);
            bytes.extend(std::iter::repeat_n(0xab, pages as usize * 4096));
        }
        bytes
    }

    /// Delivers `first` to a QEMU that reads it and closes, then `rest`.
    fn closed_after(first: &[u8], rest: &[u8]) -> Result<u64, RelayFailure> {
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut sink = QemuSink::new(ours);
        sink.deliver(first).unwrap();
        let mut taken = vec![0u8; first.len()];
        qemu.read_exact(&mut taken).unwrap();
        drop(qemu);
        for chunk in rest.chunks(4096) {
            sink.deliver(chunk)?;
        }
        sink.finish()
    }

    #[test]
    fn a_trailing_packet_without_pages_left_behind_is_no_loss() {
        let stream = multifd(&[3, 0]);
        let cut = stream.len() - (320 + 8 * 128);
        assert_eq!(closed_after(&stream[..cut], &stream[cut..]).unwrap(), (320 + 8 * 128) as u64);
    }

    #[test]
    fn pages_left_behind_fail_the_channel() {
        let stream = multifd(&[3, 2]);
        let cut = multifd(&[3]).len();
        let err = closed_after(&stream[..cut], &stream[cut..]).unwrap_err().to_string();
        assert!(err.contains("2 pages"), "{err}");
    }

    #[test]
    fn a_main_stream_closed_early_fails_as_before() {
        let mut main = b"QEVM\0\0\0\x03".to_vec();
        main.extend([0u8; 64]);
        let err = closed_after(&main[..8], &main[8..]).unwrap_err().to_string();
        assert!(err.contains("QEMU closed its migration stream"), "{err}");
    }

    #[test]
    fn a_stream_qemu_read_whole_ends_with_nothing_left() {
        let stream = multifd(&[1]);
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut sink = QemuSink::new(ours);
        sink.deliver(&stream).unwrap();
        assert_eq!(sink.finish().unwrap(), 0);
        let mut all = Vec::new();
        qemu.read_to_end(&mut all).unwrap();
        assert_eq!(all, stream);
    }
}
