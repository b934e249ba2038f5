//! A connection owned by a core: moving its bytes between its socket and the application,
//! through the pipe's rings or straight to what the application handed over (an
//! `Outbound` to send from, an `Inbound` to deliver to).

use crate::delivery::Delivery;
use crate::pipe::{PipeShared, CHUNK_BYTES};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use transport::pipe::{Next, Outbound};

/// Bytes moved per connection and direction in one loop iteration, so one busy connection
/// cannot starve the others or the stack's own timers.
pub(crate) const PUMP_BUDGET_BYTES: usize = 512 * 1024;

pub(crate) struct Pipe {
    pub handle: SocketHandle,
    pub shared: Arc<PipeShared>,
    /// A chunk taken from the application, partly written into the socket.
    pending: Option<(Vec<u8>, usize)>,
    /// The write side the application handed over: pulled straight into the socket once
    /// the chunks written before it are sent.
    pub outbound: Option<Box<dyn Outbound>>,
    /// The read side the application handed over: fed here instead of `from_net`.
    pub delivery: Option<Delivery>,
    /// Bytes written into the socket so far.
    sent: u64,
    /// The send side's time, summed for `SendProbe::receiver_limited`.
    send_times: SendTimes,
    pub eof_sent: bool,
    pub closing: bool,
    /// The stack is stopping: the application's hold on the connection no longer counts.
    pub released: bool,
}

impl Pipe {
    pub(crate) fn new(handle: SocketHandle, shared: Arc<PipeShared>) -> Self {
        Pipe {
            handle,
            shared,
            pending: None,
            outbound: None,
            delivery: None,
            sent: 0,
            send_times: SendTimes::default(),
            eof_sent: false,
            closing: false,
            released: false,
        }
    }

    /// Whether the application has closed the connection, or dropped both its halves
    /// (then only this core holds the shared state), or the stack is stopping: a close.
    pub(crate) fn application_gone(&self) -> bool {
        self.released || self.shared.closed.is_raised() || Arc::strong_count(&self.shared) == 1
    }

    /// Whether nothing the application gave is left to put into the socket.
    pub(crate) fn drained(&mut self) -> bool {
        self.pending.is_none()
            && self.shared.to_net.is_empty()
            && !self.outbound.as_mut().is_some_and(|outbound| matches!(outbound.next(), Next::Bytes(_)))
    }

    /// Application to network: the chunks written, then the handed-over write side.
    /// Returns whether any byte went into the socket.
    pub(crate) fn send(&mut self, socket: &mut tcp::Socket, now: Instant) -> bool {
        let mut progress = false;
        let mut budget = PUMP_BUDGET_BYTES;
        while budget > 0 && socket.can_send() {
            if self.pending.is_none() {
                match self.shared.to_net.try_pop() {
                    Some(chunk) => self.pending = Some((chunk, 0)),
                    None => break,
                }
            }
            let Some((chunk, offset)) = self.pending.as_mut() else { break };
            let sent = socket.send_slice(&chunk[*offset..]).unwrap_or(0);
            if sent == 0 {
                break;
            }
            *offset += sent;
            self.sent += sent as u64;
            budget = budget.saturating_sub(sent);
            progress = true;
            if *offset == chunk.len() {
                if let Some((chunk, _)) = self.pending.take() {
                    self.shared.free.give(chunk);
                }
            }
        }
        // Then the handed-over write side, once every chunk written before it is in.
        if self.outbound.is_none() && self.pending.is_none() && self.shared.to_net.is_empty() {
            self.outbound = self.shared.take_outbound();
        }
        if let (Some(outbound), None) = (self.outbound.as_mut(), self.pending.as_ref()) {
            while budget > 0 && socket.can_send() {
                // Straight into the socket's buffer where the outbound writes there itself.
                let written = socket
                    .send(|room| match outbound.write_into(room) {
                        Some(n) => (n, Some(n)),
                        None => (0, None),
                    })
                    .ok()
                    .flatten();
                let sent = match written {
                    Some(n) => n,
                    None => match outbound.next() {
                        Next::Bytes(bytes) => {
                            let sent = socket.send_slice(bytes).unwrap_or(0);
                            if sent > 0 {
                                outbound.advance(sent);
                            }
                            sent
                        }
                        Next::Idle | Next::Done => break,
                    },
                };
                if sent == 0 {
                    break;
                }
                self.sent += sent as u64;
                budget = budget.saturating_sub(sent);
                progress = true;
            }
        }

        // What left the send buffer was acknowledged. A buffer over half full of bytes not
        // yet acknowledged waits for the link (or the peer): when the link keeps up, only
        // the bytes on their way are there, and the writer's bursts never fill it.
        let queued = socket.send_queue();
        self.shared.acknowledged.store(self.sent - queued as u64, Ordering::Relaxed);
        self.shared.send_full.store(2 * queued >= socket.send_capacity(), Ordering::Relaxed);
        self.send_times.sample(now, queued > 0, socket.window_limited(), &self.shared);
        progress
    }

    /// Network to application: to the read side it handed over, or into `from_net`, then
    /// the end of the stream. Returns whether anything moved.
    pub(crate) fn receive(&mut self, socket: &mut tcp::Socket, now: Instant) -> bool {
        if self.delivery.is_none() {
            self.delivery = self.shared.take_inbound().map(Delivery::new);
        }
        if let Some(delivery) = self.delivery.as_mut() {
            return delivery.deliver(socket, &self.shared, now, PUMP_BUDGET_BYTES);
        }
        let mut progress = false;
        let mut budget = PUMP_BUDGET_BYTES;
        while budget > 0 && socket.can_recv() && !self.shared.from_net.is_full() {
            let mut chunk = self.shared.free.take(|| Vec::with_capacity(CHUNK_BYTES));
            chunk.clear();
            let received = socket
                .recv(|data| {
                    let n = data.len().min(CHUNK_BYTES);
                    chunk.extend_from_slice(&data[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if received == 0 {
                self.shared.free.give(chunk);
                break;
            }
            // Only this core pushes, and it checked for room.
            let _ = self.shared.from_net.try_push(chunk);
            budget = budget.saturating_sub(received);
            progress = true;
        }

        // The peer finished sending: tell the application once everything before it is
        // delivered.
        if !self.eof_sent
            && !socket.may_recv()
            && !socket.can_recv()
            && socket.state() != State::Established
            && self.shared.from_net.try_push(Vec::new())
        {
            self.eof_sent = true;
            progress = true;
        }
        progress
    }
}

/// A connection's send time as its core sees it at each look: the time since the last look
/// counts as the state seen then (as Linux's chronograph switches state on events).
#[derive(Default)]
struct SendTimes {
    /// The last look: when, whether data was queued (to send or in flight), and whether
    /// the peer's window held it back.
    last: Option<(Instant, bool, bool)>,
    busy_us: u64,
    window_limited_us: u64,
}

impl SendTimes {
    fn sample(&mut self, now: Instant, busy: bool, window_limited: bool, shared: &PipeShared) {
        if let Some((at, was_busy, was_limited)) = self.last {
            let span = (now - at).total_micros();
            if was_busy {
                self.busy_us += span;
                shared.busy_us.store(self.busy_us, Ordering::Relaxed);
            }
            if was_limited {
                self.window_limited_us += span;
                shared.window_limited_us.store(self.window_limited_us, Ordering::Relaxed);
            }
        }
        self.last = Some((now, busy, busy && window_limited));
    }
}
