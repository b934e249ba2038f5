//! The connections' threads: a writer per connection (frames in ring order, the abort
//! notice first on connection 0), and connection 0's reader of the destination's answers.

use migration::frame::{FrameKind, SeqCounter};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use transport::framed::{read_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};

use super::{Outgoing, Shared, WRITER_NOTICE_POLL};

pub(super) fn connection_writer(shared: &Shared<'_>, index: usize, mut writer: Box<dyn Write + Send>) {
    // The Hello was sequence 0.
    let mut seq = SeqCounter::default();
    seq.take();
    let mut pages_frames: u64 = 0;
    let mut send = |bytes: &[u8]| -> std::io::Result<()> {
        if let Some(limiter) = &shared.limiter {
            limiter.acquire(bytes.len());
        }
        // Counted before the write: the destination may answer a frame (VerifyResult to
        // VerifyDigest) before this thread runs again, and the totals read then must
        // include it. A failed write fails the session, so the count never lies.
        shared.wire_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        writer.write_all(bytes)
    };
    loop {
        if index == 0 {
            let notice = shared.notice.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(payload) = notice {
                let _ = send(&migration::frame::encode_frame(FrameKind::Abort, 0, seq.take(), &payload));
                shared.abort_sent.store(true, Ordering::Release);
                return;
            }
        }
        let item = match shared.outgoing[index].pop_timeout(&shared.abort, WRITER_NOTICE_POLL) {
            Ok(Some(item)) => item,
            Ok(None) => continue,
            Err(_) => return,
        };
        let result = match item {
            Outgoing::Pages { mut frame, epoch } => {
                frame.seal(FrameKind::Pages, epoch, seq.take());
                pages_frames += 1;
                let result = send(frame.as_bytes());
                shared.page_bytes_written.fetch_add(frame.as_bytes().len() as u64, Ordering::Relaxed);
                shared.frame_pool.give(frame);
                result
            }
            Outgoing::RoundEnd { epoch } => {
                let payload = pages_frames.to_le_bytes();
                pages_frames = 0;
                send(&migration::frame::encode_frame(FrameKind::RoundEnd, epoch, seq.take(), &payload))
            }
            Outgoing::Control { kind, epoch, payload } => {
                send(&migration::frame::encode_frame(kind, epoch, seq.take(), &payload))
            }
            Outgoing::Close => return,
        };
        if let Err(err) = result {
            shared.abort.raise(format!("connection {index}: write failed: {err}"));
            return;
        }
    }
}

/// Reads the destination's answers on connection 0 and feeds them to the session machine,
/// then wakes the scanner to do what it now asks.
pub(super) fn control_reader_loop(
    shared: &Shared<'_>,
    mut reader: Box<dyn std::io::Read + Send>,
    wake: mpsc::Sender<()>,
) {
    let mut payload = Vec::new();
    loop {
        let header = match read_frame(&mut *reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES) {
            Ok(header) => header,
            Err(err) => {
                // After a successful session the socket is shut under us: not an error.
                if !shared.finished.load(Ordering::Acquire) {
                    shared.abort.raise(match err {
                        ReadError::Closed => "the destination closed connection 0".to_string(),
                        err => format!("destination connection 0: {err}"),
                    });
                }
                return;
            }
        };
        let now = shared.clock.elapsed();
        let fed = shared.session.lock().unwrap_or_else(|p| p.into_inner()).handle_answer(&header, &payload, now);
        if let Err(failure) = fed {
            // The session machine has failed; the scanner finds the abort and ends.
            shared.abort.raise(failure.to_string());
            return;
        }
        if wake.send(()).is_err() {
            return;
        }
    }
}
