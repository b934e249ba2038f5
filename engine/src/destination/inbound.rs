//! A connection's read side on a polling core (`Connection::direct_receive`): the core
//! feeds it bytes straight from its socket, and it puts frames together, checks them and
//! hands page batches to the decompression workers, with no reader thread in between.
//! Where a reader thread would wait (the decode ring full, the round barrier shut), it
//! holds: it takes no more bytes, and the socket's window closes on the source.

use migration::page_batch::MAX_BATCH_BYTES;
use migration::receiver::ConnectionInbound;
use std::sync::{mpsc, Arc};
use transport::framed::{FrameAssembler, ReadError};
use transport::pipe::Inbound;

use super::reader::{frame_limit, on_frame, stream_ended, Step};
use super::session::Event;
use super::Shared;

/// What a connection holds back until the session can take it.
enum Held {
    Nothing,
    /// A batch of round `epoch` waiting for room in the decode ring.
    Batch(u32, Vec<u8>),
    /// At the barrier of `generation`, after the round `epoch`.
    RoundEnd {
        epoch: u32,
        generation: u64,
    },
    /// The session stopped for this connection: what arrives is dropped.
    Stopped,
}

pub(super) struct FrameInbound {
    shared: Arc<Shared>,
    index: u16,
    /// Dropped when the connection stops, as a reader thread's is when it ends: the
    /// session sees the readers gone.
    events: Option<mpsc::Sender<Event>>,
    state: ConnectionInbound,
    assembler: FrameAssembler<fn(migration::frame::FrameKind) -> u32>,
    /// The payload of the frame under way.
    payload: Vec<u8>,
    held: Held,
}

impl FrameInbound {
    pub(super) fn new(shared: Arc<Shared>, index: u16, events: mpsc::Sender<Event>) -> Self {
        FrameInbound {
            shared,
            index,
            events: Some(events),
            state: ConnectionInbound::new(index, 1),
            assembler: FrameAssembler::new(frame_limit),
            payload: Vec::new(),
            held: Held::Nothing,
        }
    }

    /// Moves what it holds on if it can; whether it is free to take bytes.
    fn release(&mut self) -> bool {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => true,
            Held::Stopped => {
                self.held = Held::Stopped;
                false
            }
            // The session failed: the batch will never be applied.
            Held::Batch(..) if self.shared.abort.is_raised() => self.stop(),
            Held::Batch(epoch, batch) => match self.shared.decode.offer(Some((epoch, batch))) {
                Ok(()) => true,
                Err(back) => {
                    if let Some((epoch, batch)) = back {
                        self.held = Held::Batch(epoch, batch);
                    }
                    false
                }
            },
            Held::RoundEnd { epoch, generation } => match self.shared.pass_round_end(generation) {
                Ok(Some(opened)) => {
                    if opened {
                        if let Some(events) = &self.events {
                            let _ = events.send(Event::RoundApplied(epoch));
                        }
                    }
                    true
                }
                Ok(None) => {
                    self.held = Held::RoundEnd { epoch, generation };
                    false
                }
                Err(_) => self.stop(),
            },
        }
    }

    fn stop(&mut self) -> bool {
        self.held = Held::Stopped;
        self.events = None;
        false
    }

    /// Does what a complete frame asks.
    fn on_frame(&mut self, header: &migration::frame::FrameHeader) {
        let Some(events) = &self.events else { return };
        let mut buffer = self.shared.buffers.take(|| Vec::with_capacity(MAX_BATCH_BYTES));
        buffer.clear();
        std::mem::swap(&mut buffer, &mut self.payload);
        self.held = match on_frame(&self.shared, self.index, &mut self.state, events, header, buffer) {
            Step::Read => Held::Nothing,
            Step::Apply(epoch, batch) => Held::Batch(epoch, batch),
            Step::RoundEnd(epoch) => Held::RoundEnd { epoch, generation: self.shared.arrive_at_round_end() },
            Step::Stop => {
                self.stop();
                return;
            }
        };
    }
}

impl Inbound for FrameInbound {
    fn receive(&mut self, bytes: &[u8]) -> usize {
        if !self.release() {
            // Stopped: take everything, so the core never holds for us.
            return if matches!(self.held, Held::Stopped) { bytes.len() } else { 0 };
        }
        let mut taken = 0;
        while taken < bytes.len() {
            match self.assembler.push(&bytes[taken..], &mut self.payload) {
                Ok((n, None)) => taken += n,
                Ok((n, Some(header))) => {
                    taken += n;
                    self.on_frame(&header);
                    if !self.release() {
                        break;
                    }
                }
                Err(err) => {
                    stream_ended(&self.shared, self.index, &err);
                    self.stop();
                    return bytes.len();
                }
            }
        }
        taken
    }

    fn holding(&self) -> bool {
        matches!(self.held, Held::Batch(..) | Held::RoundEnd { .. })
    }

    fn end(&mut self, how: Result<(), &str>) {
        if matches!(self.held, Held::Stopped) {
            return;
        }
        let err = match how {
            Ok(()) if self.assembler.between_frames() => ReadError::Closed,
            Ok(()) => ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Err(why) => ReadError::Io(std::io::Error::other(why.to_string())),
        };
        stream_ended(&self.shared, self.index, &err);
        self.stop();
    }
}

impl Drop for FrameInbound {
    fn drop(&mut self) {
        if let Some(buffer) = match std::mem::replace(&mut self.held, Held::Stopped) {
            Held::Batch(_, batch) => Some(batch),
            _ => None,
        } {
            // Never applied: the round can no longer complete, but counts stay honest.
            self.shared.batch_applied();
            self.shared.buffers.give(buffer);
        }
    }
}
