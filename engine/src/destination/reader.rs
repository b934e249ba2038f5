//! The connections' readers (frames checked by `migration::receiver`, pages to the decode
//! ring, round ends to the barrier, control to the session thread) and the decompression
//! workers that apply the pages.

use migration::frame::{FrameKind, MAX_PAYLOAD_BYTES};
use migration::handshake::decode_reason;
use migration::page_batch::MAX_BATCH_BYTES;
use migration::receiver::{ApplyWorker, BatchApplier, ConnectionInbound, Inbound};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use transport::framed::{read_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pin;

use super::session::Event;
use super::Shared;

fn frame_limit(kind: FrameKind) -> u32 {
    match kind {
        FrameKind::Pages => MAX_BATCH_BYTES as u32,
        FrameKind::DeviceState => MAX_PAYLOAD_BYTES,
        _ => CONTROL_FRAME_LIMIT_BYTES,
    }
}

pub(super) fn connection_reader(
    shared: &Shared,
    index: u16,
    mut reader: Box<dyn Read + Send>,
    events: mpsc::Sender<Event>,
) {
    let mut inbound = ConnectionInbound::new(index, 1);
    let fail = |reason: String| shared.abort.raise(format!("connection {index}: {reason}"));
    loop {
        let mut buffer = shared.buffers.take(|| Vec::with_capacity(MAX_BATCH_BYTES));
        let header = match read_frame(&mut *reader, &mut buffer, frame_limit) {
            Ok(header) => header,
            Err(ReadError::Closed)
                if shared.finished.load(Ordering::Acquire)
                    || (index != 0 && shared.complete_seen.load(Ordering::Acquire)) =>
            {
                return
            }
            Err(_) if shared.finished.load(Ordering::Acquire) || shared.abort.is_raised() => return,
            Err(err) => return fail(err.to_string()),
        };
        shared.received_bytes.fetch_add((migration::frame::HEADER_BYTES + buffer.len()) as u64, Ordering::Relaxed);
        let event = match inbound.on_frame(&header, &buffer) {
            Ok(event) => event,
            Err(err) => return fail(err.to_string()),
        };
        match event {
            Inbound::Pages => {
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                if shared.decode.push(Some((header.epoch, buffer)), &shared.abort).is_err() {
                    return;
                }
                continue;
            }
            Inbound::RoundEnd { epoch } => match shared.end_round() {
                Ok(true) => {
                    let _ = events.send(Event::RoundApplied(epoch));
                }
                Ok(false) => {}
                Err(_) => return,
            },
            Inbound::DeviceState => {
                *shared.device_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer.clone());
                let _ = events.send(Event::DeviceState);
            }
            Inbound::Complete { .. } => {
                shared.complete_seen.store(true, Ordering::Release);
                let _ = events.send(Event::Control(FrameKind::Complete, buffer.clone()));
            }
            Inbound::Commit => {
                let _ = events.send(Event::Control(FrameKind::Commit, buffer.clone()));
            }
            Inbound::VerifyDigest => {
                let _ = events.send(Event::Control(FrameKind::VerifyDigest, buffer.clone()));
            }
            Inbound::Abort => return fail(format!("the source aborted: {}", decode_reason(&buffer))),
        }
        shared.buffers.give(buffer);
    }
}

/// Pinned to `first_cpu + index` when pinning (`DestinationConfig::first_worker_cpu`).
pub(super) fn decompression_worker(shared: &Shared, index: usize, first_cpu: Option<usize>) {
    if let Some(first) = first_cpu {
        pin::pin_current(first + index);
    }
    let applier = BatchApplier { limits: shared.limits(), memory: &*shared.memory, epochs: &shared.epochs };
    let mut worker = ApplyWorker::new();
    while let Ok(Some((epoch, buffer))) = shared.decode.pop(&shared.abort) {
        if let Err(err) = applier.apply(&buffer, epoch, &mut worker) {
            shared.abort.raise(format!("round {epoch}: {err}"));
        }
        // Counted before the batch is reported applied, so the totals are complete when
        // the round barrier opens.
        shared.counters.lock().unwrap_or_else(|p| p.into_inner()).merge(&std::mem::take(&mut worker.counters));
        shared.buffers.give(buffer);
        shared.batch_applied();
    }
}
