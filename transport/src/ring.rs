//! Bounded lock-free rings between pipeline stages (crossbeam's `ArrayQueue`), with
//! blocking push and pop for back-pressure: a full ring slows its producer, it never drops
//! an item or grows.
//!
//! Waiting spins briefly, then sleeps on a condition variable with a short timeout. The
//! machines we share are small (two cores run both ends of a demo), so a stage that waits
//! long must give its core away rather than burn it; the timeout also re-checks the
//! session's abort flag, so no wait outlives the session.

use crate::abort::{Aborted, SessionAbort};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::Backoff;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long a blocked stage sleeps before re-checking the ring and the abort flag.
const WAIT_SLICE: Duration = Duration::from_millis(1);

pub struct Ring<T> {
    queue: ArrayQueue<T>,
    lock: Mutex<()>,
    changed: Condvar,
    sleepers: AtomicUsize,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize) -> Self {
        Ring {
            queue: ArrayQueue::new(capacity.max(1)),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn wake(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    fn sleep(&self, ready: impl Fn() -> bool) {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        if !ready() {
            let _ = self.changed.wait_timeout(guard, WAIT_SLICE);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Pushes, waiting while the ring is full.
    pub fn push(&self, mut item: T, abort: &SessionAbort) -> Result<(), Aborted> {
        let backoff = Backoff::new();
        loop {
            match self.queue.push(item) {
                Ok(()) => {
                    self.wake();
                    return Ok(());
                }
                Err(back) => item = back,
            }
            if abort.is_raised() {
                return Err(Aborted);
            }
            if backoff.is_completed() {
                self.sleep(|| !self.queue.is_full());
            } else {
                backoff.snooze();
            }
        }
    }

    /// Pops, waiting while the ring is empty.
    pub fn pop(&self, abort: &SessionAbort) -> Result<T, Aborted> {
        let backoff = Backoff::new();
        loop {
            if let Some(item) = self.queue.pop() {
                self.wake();
                return Ok(item);
            }
            if abort.is_raised() {
                return Err(Aborted);
            }
            if backoff.is_completed() {
                self.sleep(|| !self.queue.is_empty());
            } else {
                backoff.snooze();
            }
        }
    }

    /// Pops, waiting up to `timeout` while the ring is empty: `Ok(None)` when it expired.
    pub fn pop_timeout(&self, abort: &SessionAbort, timeout: std::time::Duration) -> Result<Option<T>, Aborted> {
        let deadline = std::time::Instant::now() + timeout;
        let backoff = Backoff::new();
        loop {
            if let Some(item) = self.queue.pop() {
                self.wake();
                return Ok(Some(item));
            }
            if abort.is_raised() {
                return Err(Aborted);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            if backoff.is_completed() {
                self.sleep(|| !self.queue.is_empty());
            } else {
                backoff.snooze();
            }
        }
    }

    /// Whether a push would succeed now.
    pub fn is_full(&self) -> bool {
        self.queue.is_full()
    }

    /// Pushes without waiting; false (dropping `item`) when the ring is full.
    pub fn try_push(&self, item: T) -> bool {
        let pushed = self.queue.push(item).is_ok();
        if pushed {
            self.wake();
        }
        pushed
    }

    /// Pushes without waiting; gives `item` back when the ring is full.
    pub fn offer(&self, item: T) -> Result<(), T> {
        self.queue.push(item)?;
        self.wake();
        Ok(())
    }

    pub fn try_pop(&self) -> Option<T> {
        let item = self.queue.pop();
        if item.is_some() {
            self.wake();
        }
        item
    }
}

/// A free list of reusable buffers: `take` reuses one or makes a new one, `give` returns it
/// (dropping it when the list is full). Bounded by the rings that hold the buffers in use.
pub struct Pool<T> {
    free: ArrayQueue<T>,
}

impl<T> Pool<T> {
    pub fn new(capacity: usize) -> Self {
        Pool { free: ArrayQueue::new(capacity.max(1)) }
    }

    pub fn take(&self, make: impl FnOnce() -> T) -> T {
        self.free.pop().unwrap_or_else(make)
    }

    pub fn give(&self, item: T) {
        let _ = self.free.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn full_ring_blocks_producer_until_consumer_pops() {
        let ring = Arc::new(Ring::new(2));
        let abort = Arc::new(SessionAbort::new());
        let producer = {
            let (ring, abort) = (ring.clone(), abort.clone());
            std::thread::spawn(move || {
                for i in 0..1000u32 {
                    ring.push(i, &abort).unwrap();
                }
            })
        };
        let mut got = Vec::new();
        while got.len() < 1000 {
            assert!(ring.len() <= 2);
            got.push(ring.pop(&abort).unwrap());
        }
        producer.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn abort_wakes_a_blocked_pop() {
        let ring: Arc<Ring<u8>> = Arc::new(Ring::new(1));
        let abort = Arc::new(SessionAbort::new());
        let waiter = {
            let (ring, abort) = (ring.clone(), abort.clone());
            std::thread::spawn(move || ring.pop(&abort))
        };
        std::thread::sleep(Duration::from_millis(20));
        abort.raise("test");
        assert_eq!(waiter.join().unwrap(), Err(Aborted));
    }
}
