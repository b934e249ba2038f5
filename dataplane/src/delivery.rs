//! Delivering a connection's incoming bytes to a handed-over read side (`Inbound`) on the
//! core's own thread: first what had already gone into the application's ring, then
//! straight from the segments as they arrive (the socket's direct receiver: no copy into
//! its receive buffer), and whatever those left from the socket's receive buffer. The
//! `Inbound` takes what it can; what it leaves stays in the socket, whose window closes
//! until it takes more.

use crate::pipe::{HandedInbound, PipeShared};
use smoltcp::socket::tcp::{self, DirectReceiver, State};
use smoltcp::time::{Duration, Instant};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use transport::pipe::Inbound;

/// The `Inbound`, shared by the delivery and the socket's direct receiver (both on the
/// core's thread: the lock is never contended, only `Send` needs it).
struct Target {
    inbound: Box<dyn Inbound>,
    ended: bool,
    /// Bytes the direct receiver gave it since the delivery last looked.
    arrived: usize,
}

/// The `Inbound`'s state, even after a panic in one of its calls (which stops the core
/// anyway: what is left is only read to end the stream).
fn lock(target: &Mutex<Target>) -> MutexGuard<'_, Target> {
    target.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Delivery {
    target: Arc<Mutex<Target>>,
    /// The socket's direct receiver is set.
    direct: bool,
    timeout: Duration,
    /// A chunk of `from_net`, partly delivered (chunk, offset).
    feeding: Option<(Vec<u8>, usize)>,
    /// Since when the peer has been silent while the `Inbound` waited for it.
    quiet_since: Option<Instant>,
}

impl Delivery {
    pub(crate) fn new(handed: HandedInbound) -> Self {
        Delivery {
            target: Arc::new(Mutex::new(Target { inbound: handed.inbound, ended: false, arrived: 0 })),
            direct: false,
            timeout: handed.timeout.into(),
            feeding: handed.unread,
            quiet_since: None,
        }
    }

    /// A receiver for the socket that hands in-order segments to the `Inbound` as they
    /// arrive, until the stream has ended for it.
    fn direct_receiver(&self) -> DirectReceiver {
        let target = self.target.clone();
        DirectReceiver::new(move |payload| {
            let mut target = lock(&target);
            if target.ended {
                return 0;
            }
            let taken = target.inbound.receive(payload);
            target.arrived += taken;
            taken
        })
    }

    /// Delivers up to `budget` bytes; returns whether any moved or the stream ended.
    pub(crate) fn deliver(
        &mut self,
        socket: &mut tcp::Socket,
        shared: &PipeShared,
        now: Instant,
        budget: usize,
    ) -> bool {
        if lock(&self.target).ended {
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
            let taken = lock(&self.target).inbound.receive(&chunk[*offset..]);
            *offset += taken;
            progress |= taken > 0;
            if *offset < chunk.len() {
                return progress;
            }
            if let Some((chunk, _)) = self.feeding.take() {
                shared.free.give(chunk);
            }
        }

        // Everything from before the hand-over is in: from now on segments may go straight
        // to the `Inbound` (the socket offers them only while its buffer is empty).
        if !self.direct {
            socket.set_direct_receiver(Some(self.direct_receiver()));
            self.direct = true;
        }
        let mut target = lock(&self.target);
        let mut arrived = std::mem::take(&mut target.arrived);
        while arrived < budget && socket.can_recv() {
            let inbound = &mut target.inbound;
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
            target.inbound.receive(&[]);
        }
        let holding = target.inbound.holding();
        drop(target);
        progress |= arrived > 0;

        // The end comes after everything before it was taken: an `Inbound` that holds
        // back (what TLS opened and the application has not taken yet) is polled on first.
        if !socket.can_recv() && !socket.may_recv() && socket.state() != State::Established && !holding {
            self.end(Ok(()));
            return true;
        }
        if arrived > 0 || holding {
            self.quiet_since = None;
        } else if now - *self.quiet_since.get_or_insert(now) > self.timeout {
            self.end(Err("peer silent for too long (read timed out)"));
            return true;
        }
        progress
    }

    /// Ends the stream for the `Inbound`, once.
    pub(crate) fn end(&mut self, how: Result<(), &str>) {
        let mut target = lock(&self.target);
        if !target.ended {
            target.ended = true;
            target.inbound.end(how);
        }
    }
}

impl Drop for Delivery {
    /// A connection dropped with its stream still open (the core stopped, or cut it).
    fn drop(&mut self) {
        self.end(Err("the connection was closed"));
    }
}
