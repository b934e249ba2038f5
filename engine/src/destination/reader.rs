//! The connections' readers (frames checked by `migration::receiver`, pages to the decode
//! ring, round ends to the barrier, control to the session thread) and the decompression
//! workers that apply the pages.

use crate::offload::Inflater;
use migration::frame::{FrameHeader, FrameKind, MAX_PAYLOAD_BYTES};
use migration::handshake::decode_reason;
use migration::page_batch::MAX_BATCH_BYTES;
use migration::receiver::{ApplyWorker, BatchApplier, ConnectionInbound, Inbound};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use transport::abort::AbortKind;
use transport::framed::{read_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pin;

use super::session::Event;
use super::Shared;

pub(super) fn frame_limit(kind: FrameKind) -> u32 {
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
    loop {
        let mut buffer = shared.buffers.take(|| Vec::with_capacity(MAX_BATCH_BYTES));
        let header = match read_frame(&mut *reader, &mut buffer, frame_limit) {
            Ok(header) => header,
            Err(err) => return stream_ended(shared, index, &err),
        };
        match on_frame(shared, index, &mut inbound, &events, &header, buffer) {
            Step::Read => {}
            Step::Apply(epoch, batch) => {
                if shared.decode.push(Some((epoch, batch)), &shared.abort).is_err() {
                    return;
                }
            }
            Step::RoundEnd(epoch) => match shared.end_round() {
                Ok(true) => {
                    let _ = events.send(Event::RoundApplied(epoch));
                }
                Ok(false) => {}
                Err(_) => return,
            },
            Step::Stop => return,
        }
    }
}

/// What a connection does after a frame.
pub(super) enum Step {
    /// Read the next frame.
    Read,
    /// Queue this batch of the round `epoch` for the decompression workers.
    Apply(u32, Vec<u8>),
    /// Hold at the round barrier; whoever opens it reports the round applied.
    RoundEnd(u32),
    /// Stop: the session failed (the abort is raised), or the source aborted.
    Stop,
}

/// Checks a frame with the connection's state machine and does what needs no wait:
/// control frames and the device state go to the session thread. Page batches and round
/// ends are the caller's: a reader thread waits for room and at the barrier, a polling
/// core's `Inbound` must not.
pub(super) fn on_frame(
    shared: &Shared,
    index: u16,
    inbound: &mut ConnectionInbound,
    events: &mpsc::Sender<Event>,
    header: &FrameHeader,
    buffer: Vec<u8>,
) -> Step {
    let fail = |kind: AbortKind, reason: String| {
        shared.abort.raise_as(kind, format!("connection {index}: {reason}"));
        Step::Stop
    };
    shared.received_bytes.fetch_add((migration::frame::HEADER_BYTES + buffer.len()) as u64, Ordering::Relaxed);
    let event = match inbound.on_frame(header, &buffer) {
        Ok(event) => event,
        Err(err) => return fail(AbortKind::Damaged, err.to_string()),
    };
    let step = match event {
        Inbound::Pages => {
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            return Step::Apply(header.epoch, buffer);
        }
        Inbound::RoundEnd { epoch } => Step::RoundEnd(epoch),
        Inbound::DeviceState => {
            *shared.device_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer.clone());
            let _ = events.send(Event::DeviceState);
            Step::Read
        }
        Inbound::Complete { .. } => {
            shared.complete_seen.store(true, Ordering::Release);
            let _ = events.send(Event::Control(FrameKind::Complete, buffer.clone()));
            Step::Read
        }
        Inbound::Commit => {
            let _ = events.send(Event::Control(FrameKind::Commit, buffer.clone()));
            Step::Read
        }
        Inbound::VerifyDigest => {
            let _ = events.send(Event::Control(FrameKind::VerifyDigest, buffer.clone()));
            Step::Read
        }
        Inbound::Abort => fail(AbortKind::Peer, format!("the source aborted: {}", decode_reason(&buffer))),
    };
    shared.buffers.give(buffer);
    step
}

/// A connection's stream ended (or failed): the end of the session when it was due, else
/// the session's failure.
pub(super) fn stream_ended(shared: &Shared, index: u16, err: &ReadError) {
    let due = shared.finished.load(Ordering::Acquire) || (index != 0 && shared.complete_seen.load(Ordering::Acquire));
    if (matches!(err, ReadError::Closed) && due) || shared.finished.load(Ordering::Acquire) || shared.abort.is_raised()
    {
        return;
    }
    shared.abort.raise_as(err.abort_kind(), format!("connection {index}: {err}"));
}

/// Pinned to the first free CPU from `first_cpu + index` up when pinning
/// (`DestinationConfig::first_worker_cpu`, `transport::pin::claim_worker_cpu`).
/// `inflater`: this worker's queue of the compression device, for `deflate` pages.
pub(super) fn decompression_worker(
    shared: &Shared,
    index: usize,
    first_cpu: Option<usize>,
    inflater: Option<Inflater>,
) {
    let _cpu = first_cpu.map(|first| pin::claim_worker_cpu(first + index));
    let applier = BatchApplier {
        limits: shared.limits(),
        memory: &*shared.memory,
        epochs: &shared.epochs,
        copies: &shared.copies,
    };
    let mut worker = match inflater {
        Some(inflater) => ApplyWorker::with_inflater(Box::new(inflater)),
        None => ApplyWorker::new(),
    };
    while let Ok(Some((epoch, buffer))) = shared.decode.pop(&shared.abort) {
        if let Err(err) = applier.apply(&buffer, epoch, &mut worker) {
            shared.abort.raise_as(AbortKind::Damaged, format!("round {epoch}: {err}"));
        }
        // Counted before the batch is reported applied, so the totals are complete when
        // the round barrier opens.
        shared.counters.lock().unwrap_or_else(|p| p.into_inner()).merge(&std::mem::take(&mut worker.counters));
        shared.buffers.give(buffer);
        shared.batch_applied();
    }
}
