//! Delivering a connection's incoming bytes to a handed-over read side (`Inbound`) on the
//! core's own thread: first what had already gone into the application's ring, then
//! straight from the socket's receive buffer. The `Inbound` takes what it can; what it
//! leaves stays in the socket, whose window closes until it takes more.

use crate::pipe::{HandedInbound, PipeShared};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};
use transport::pipe::Inbound;

pub(crate) struct Delivery {
    inbound: Box<dyn Inbound>,
    timeout: Duration,
    /// A chunk of `from_net`, partly delivered (chunk, offset).
    feeding: Option<(Vec<u8>, usize)>,
    /// Since when the peer has been silent while the `Inbound` waited for it.
    quiet_since: Option<Instant>,
    ended: bool,
}

impl Delivery {
    pub(crate) fn new(handed: HandedInbound) -> Self {
        Delivery {
            inbound: handed.inbound,
            timeout: handed.timeout.into(),
            feeding: handed.unread,
            quiet_since: None,
            ended: false,
        }
    }

    /// Delivers up to `budget` bytes; returns whether any moved or the stream ended.
    pub(crate) fn deliver(
        &mut self,
        socket: &mut tcp::Socket,
        shared: &PipeShared,
        now: Instant,
        budget: usize,
    ) -> bool {
        if self.ended {
            return false;
        }
        let mut progress = false;
        // What reached the application's ring before the hand-over comes first.
        loop {
            let (chunk, offset) = match self.feeding.as_mut() {
                Some(feeding) => feeding,
                None => match shared.from_net.try_pop() {
                    // The end of the stream, seen before the hand-over.
                    Some(chunk) if chunk.is_empty() => {
                        self.end(Ok(()));
                        return true;
                    }
                    Some(chunk) => self.feeding.insert((chunk, 0)),
                    None => break,
                },
            };
            let taken = self.inbound.receive(&chunk[*offset..]);
            *offset += taken;
            progress |= taken > 0;
            if *offset < chunk.len() {
                return progress;
            }
            if let Some((chunk, _)) = self.feeding.take() {
                shared.free.give(chunk);
            }
        }

        let mut arrived = 0;
        while arrived < budget && socket.can_recv() {
            let inbound = &mut self.inbound;
            let taken = socket
                .recv(|data| {
                    let n = inbound.receive(data);
                    (n, n)
                })
                .unwrap_or(0);
            if taken == 0 {
                break;
            }
            arrived += taken;
        }
        if !socket.can_recv() {
            // Nothing new: a poll, so that what the `Inbound` holds moves on.
            self.inbound.receive(&[]);
        }
        progress |= arrived > 0;

        if !socket.can_recv() && !socket.may_recv() && socket.state() != State::Established {
            self.end(Ok(()));
            return true;
        }
        if arrived > 0 || self.inbound.holding() {
            self.quiet_since = None;
        } else if now - *self.quiet_since.get_or_insert(now) > self.timeout {
            self.end(Err("peer silent for too long (read timed out)"));
            return true;
        }
        progress
    }

    /// Ends the stream for the `Inbound`, once.
    pub(crate) fn end(&mut self, how: Result<(), &str>) {
        if !self.ended {
            self.ended = true;
            self.inbound.end(how);
        }
    }
}

impl Drop for Delivery {
    /// A connection dropped with its stream still open (the core stopped, or cut it).
    fn drop(&mut self) {
        self.end(Err("the connection was closed"));
    }
}
