//! What each thread of a relay session is waiting on, and since when, so that a stalled
//! migration names its cause. A relay whose peer fell silent cannot see why; the silent one
//! can, if it says which of its own threads stopped and where (a write to its connection,
//! QEMU's socket, the compression pool). So each of a session's threads marks its waits,
//! a thread that stays in one past [`STALL_WARNING`] is named in a warning while it waits,
//! and when the session aborts every thread's place is logged beside the reason.
//!
//! A thread registers once ([`SessionWaits::register`]) and marks each wait with a guard
//! ([`waiting`]); a mark is two relaxed atomic stores, cheap beside the read or write it
//! surrounds, and a no-op on a thread that never registered (the tests' own threads).

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;

/// How long a thread may stay in one wait (or run without any) before a warning names it:
/// every stream sends at least a heartbeat a [`crate::channel::HEARTBEAT`], so nothing in
/// a healthy session waits anywhere near this long, and it is well inside the connections'
/// 30 s I/O timeout, so the warning comes before the failure.
pub const STALL_WARNING: Duration = Duration::from_secs(10);

/// Where a thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Wait {
    /// Between marked waits: reading the stream, encoding, decoding.
    Running = 0,
    ReadingQemu,
    WritingQemu,
    ReadingLink,
    WritingLink,
    /// Held back under the operator's bandwidth cap.
    Pacing,
    /// Waiting for another thread to finish its frame on the shared connection writer.
    Writer,
    /// Handing a chunk to the compression pool, whose queue is full or which holds all of
    /// the stream's credits: the workers or the stream's sender are behind.
    PoolCredit,
    /// The stream's sender, waiting for the next chunk or frame to write.
    NextChunk,
    /// The stream's reader at its end, waiting for the sender to write the rest.
    SenderDone,
    Ended,
}

const WAITS: [Wait; 11] = [
    Wait::Running,
    Wait::ReadingQemu,
    Wait::WritingQemu,
    Wait::ReadingLink,
    Wait::WritingLink,
    Wait::Pacing,
    Wait::Writer,
    Wait::PoolCredit,
    Wait::NextChunk,
    Wait::SenderDone,
    Wait::Ended,
];

impl Wait {
    fn describe(self) -> &'static str {
        match self {
            Wait::Running => "running (in no marked wait)",
            Wait::ReadingQemu => "reading QEMU's socket",
            Wait::WritingQemu => "writing to QEMU's socket (QEMU is not reading)",
            Wait::ReadingLink => "reading the relay connection (the peer sends nothing)",
            Wait::WritingLink => "writing to the relay connection (it takes nothing)",
            Wait::Pacing => "held back by the bandwidth cap",
            Wait::Writer => "waiting for the connection's writer (another thread holds it)",
            Wait::PoolCredit => {
                "waiting for the compression pool (its queue full, or every chunk of the stream in flight)"
            }
            Wait::NextChunk => "waiting for the next squeezed chunk",
            Wait::SenderDone => "waiting for the stream's sender to write the rest",
            Wait::Ended => "ended",
        }
    }
}

/// One registered thread's place.
struct Slot {
    name: String,
    what: AtomicU8,
    /// Microseconds from the session's start to when the thread got where it is.
    since_us: AtomicU64,
    /// The `since_us` of the wait last warned about (a wait is named once).
    warned_us: AtomicU64,
}

/// The places of a session's threads.
pub(crate) struct SessionWaits {
    started: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl Default for SessionWaits {
    /// Waits that no abort logs (a session's own come from [`SessionWaits::watching`]).
    fn default() -> Self {
        SessionWaits { started: Instant::now(), slots: Mutex::new(Vec::new()) }
    }
}

thread_local! {
    /// The slot this thread marks, and its session's start.
    static CURRENT: RefCell<Option<(Arc<Slot>, Instant)>> = const { RefCell::new(None) };
}

impl SessionWaits {
    /// The waits of `abort`'s session: when it aborts, every thread's place is logged.
    pub(crate) fn watching(abort: &Arc<SessionAbort>) -> Arc<SessionWaits> {
        let waits = Arc::new(SessionWaits::default());
        // Weak: the abort outlives nothing it holds (its closers also run at a clean end,
        // where there is nothing to tell).
        let (seen, session): (Weak<SessionWaits>, Weak<SessionAbort>) = (Arc::downgrade(&waits), Arc::downgrade(abort));
        abort.on_raise(Box::new(move || {
            if let (Some(waits), Some(session)) = (seen.upgrade(), session.upgrade()) {
                if session.is_raised() && !waits.is_empty() {
                    log::warn!("where the session's threads were when it failed: {}", waits.describe());
                }
            }
        }));
        waits
    }

    /// Marks the calling thread's waits as `name`'s until the returned guard drops.
    pub(crate) fn register(&self, name: String) -> Registered {
        let slot = Arc::new(Slot {
            name,
            what: AtomicU8::new(Wait::Running as u8),
            since_us: AtomicU64::new(self.now_us()),
            warned_us: AtomicU64::new(u64::MAX),
        });
        self.lock().push(slot.clone());
        CURRENT.with(|current| *current.borrow_mut() = Some((slot, self.started)));
        Registered(())
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every thread's place: `channel 0 sending: reading QEMU's socket for 0.0 s; ...`.
    pub(crate) fn describe(&self) -> String {
        let now = self.now_us();
        let mut text = String::new();
        for slot in self.lock().iter() {
            let (what, since) = slot.place();
            let separator = if text.is_empty() { "" } else { "; " };
            let _ = write!(text, "{separator}{}: {}", slot.name, what.describe());
            if what != Wait::Ended {
                let _ = write!(text, " for {:.1} s", now.saturating_sub(since) as f64 / 1e6);
            }
        }
        text
    }

    /// Warns, once per wait, of each thread that has stayed in one place for `after` or
    /// longer; returns how many it warned of.
    pub(crate) fn warn_of_stalls(&self, after: Duration) -> usize {
        let now = self.now_us();
        let mut warned = 0;
        for slot in self.lock().iter() {
            let (what, since) = slot.place();
            let waited = Duration::from_micros(now.saturating_sub(since));
            if what == Wait::Ended || waited < after || slot.warned_us.swap(since, Ordering::Relaxed) == since {
                continue;
            }
            log::warn!(
                "{} has been {} for {:.1} s: the session may be stalled",
                slot.name,
                what.describe(),
                waited.as_secs_f64()
            );
            warned += 1;
        }
        warned
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slot {
    /// Where the thread is, and since when (read without a lock: a thread that moves
    /// between the two loads is named at one place or the other, either true a moment ago).
    fn place(&self) -> (Wait, u64) {
        let what = self.what.load(Ordering::Relaxed);
        let since = self.since_us.load(Ordering::Relaxed);
        (WAITS.get(usize::from(what)).copied().unwrap_or(Wait::Running), since)
    }

    fn mark(&self, what: Wait, started: Instant) {
        self.what.store(what as u8, Ordering::Relaxed);
        self.since_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// A registered thread; it shows as ended once this drops.
#[must_use = "the thread's waits are marked only while this lives"]
pub(crate) struct Registered(());

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some((slot, started)) = CURRENT.with(|current| current.borrow_mut().take()) {
            slot.mark(Wait::Ended, started);
        }
    }
}

/// Marks the calling thread as in `what` until the guard drops (then running again).
pub(crate) fn waiting(what: Wait) -> Waiting {
    mark(what);
    Waiting(())
}

/// Runs `call` marked as `what`: one blocking call, the thread running again after it.
pub(crate) fn during<T>(what: Wait, call: impl FnOnce() -> T) -> T {
    let _waiting = waiting(what);
    call()
}

/// The calling thread's wait; it is back to running when this drops.
#[must_use = "the wait ends when this drops"]
pub(crate) struct Waiting(());

impl Drop for Waiting {
    fn drop(&mut self) {
        mark(Wait::Running);
    }
}

fn mark(what: Wait) {
    CURRENT.with(|current| {
        if let Some((slot, started)) = current.borrow().as_ref() {
            slot.mark(what, *started);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_is_named_where_it_waits() {
        let abort = Arc::new(SessionAbort::new());
        let waits = SessionWaits::watching(&abort);
        let (marked, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _registered = waits.register("channel 0 sending".into());
                let _writing = waiting(Wait::WritingLink);
                marked.wait();
                release.wait();
            });
            scope
                .spawn(|| {
                    let _registered = waits.register("channel 0 receiving".into());
                })
                .join()
                .unwrap();
            marked.wait();
            let described = waits.describe();
            assert!(described.contains("channel 0 sending: writing to the relay connection"), "{described}");
            assert!(described.contains("channel 0 receiving: ended"), "{described}");
            release.wait();
        });
        // Back to running once the guard dropped, then ended.
        assert!(waits.describe().contains("channel 0 sending: ended"), "{}", waits.describe());
    }

    #[test]
    fn a_long_wait_is_warned_of_once() {
        let abort = Arc::new(SessionAbort::new());
        let waits = SessionWaits::watching(&abort);
        let _registered = waits.register("channel 1 receiving".into());
        let _reading = waiting(Wait::ReadingLink);
        assert_eq!(waits.warn_of_stalls(Duration::from_secs(60)), 0, "not yet");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(waits.warn_of_stalls(Duration::from_millis(10)), 1);
        assert_eq!(waits.warn_of_stalls(Duration::from_millis(10)), 0, "the same wait again");
        drop(_reading);
        let _writing = waiting(Wait::WritingQemu);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(waits.warn_of_stalls(Duration::from_millis(10)), 1, "a new wait");
    }

    #[test]
    fn an_unregistered_thread_marks_nothing() {
        let abort = Arc::new(SessionAbort::new());
        let waits = SessionWaits::watching(&abort);
        let _writing = waiting(Wait::WritingLink);
        assert_eq!(waits.describe(), "");
        assert_eq!(waits.warn_of_stalls(Duration::ZERO), 0);
    }
}
