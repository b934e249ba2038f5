//! One flag per migration session that every thread checks: the first error sets it,
//! records why, and shuts the session's connections down so that threads blocked in a
//! read or write wake up. Nothing in a session waits without also watching this flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

type Closer = Box<dyn Fn() + Send + Sync>;

/// What kind of failure raised a session's abort, for a caller that acts on it (an exit
/// status, a retry): the reason says what happened, the kind which way to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AbortKind {
    /// This host's own failure, or one nobody classified (a panic).
    #[default]
    Local,
    /// A connection was lost: closed, reset, its peer gone.
    Link,
    /// Nothing came within a connection's time.
    TimedOut,
    /// What arrived was damaged or broke the protocol.
    Damaged,
    /// The peer aborted the session and said why.
    Peer,
    /// The operator cancelled the session.
    Cancelled,
}

#[derive(Default)]
pub struct SessionAbort {
    raised: AtomicBool,
    reason: Mutex<Option<(String, AbortKind)>>,
    closers: Mutex<Vec<Closer>>,
}

impl SessionAbort {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Raises the flag. The first reason wins: later ones are consequences of it.
    pub fn raise(&self, reason: impl Into<String>) {
        self.raise_as(AbortKind::Local, reason);
    }

    /// Raises the flag, saying what kind of failure it was. The first reason wins.
    pub fn raise_as(&self, kind: AbortKind, reason: impl Into<String>) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some((reason.into(), kind));
            }
        }
        self.raised.store(true, Ordering::Release);
        self.close_all();
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(reason, _)| reason.clone())
    }

    /// The kind of the first failure (`Local` while none was raised).
    pub fn kind(&self) -> AbortKind {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(AbortKind::Local, |(_, kind)| *kind)
    }

    /// Runs a session thread's `body`; if it panics (a bug, here or in a codec library),
    /// the session is aborted with the panic's message instead of waiting on the dead
    /// thread until a timeout, and the guest is handled as on any failure.
    pub fn guard(&self, thread: &str, body: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            self.raise(format!("internal error: the {thread} thread panicked: {message}"));
        }
    }

    /// Spawns a thread of the session in `scope`, named `name`, its body guarded as
    /// [`guard`](Self::guard) does under `role`: a panic aborts the session with its message.
    pub fn spawn_guarded<'scope, 'env>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        name: String,
        role: &'static str,
        body: impl FnOnce() + Send + 'scope,
    ) -> std::thread::ScopedJoinHandle<'scope, ()> {
        std::thread::Builder::new()
            .name(name)
            .spawn_scoped(scope, move || self.guard(role, body))
            .unwrap_or_else(|err| panic!("spawning the {role} thread: {err}"))
    }

    /// Registers a way to unblock a thread (normally: shut a socket down).
    pub fn on_raise(&self, closer: Closer) {
        self.closers.lock().unwrap_or_else(|p| p.into_inner()).push(closer);
    }

    /// Runs every registered closer (also used at the end of a successful session).
    pub fn close_all(&self) {
        for close in self.closers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            close();
        }
    }
}

/// Returned by blocking operations that gave up because the session was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_aborts_the_session_with_its_message() {
        let abort = SessionAbort::new();
        let closed = std::sync::Arc::new(AtomicBool::new(false));
        let seen = closed.clone();
        abort.on_raise(Box::new(move || seen.store(true, Ordering::Release)));
        abort.guard("compression", || {});
        assert!(!abort.is_raised());
        abort.guard("compression", || panic!("page 7 broke the codec"));
        assert!(abort.is_raised());
        assert!(closed.load(Ordering::Acquire), "the connections were not shut");
        let reason = abort.reason().unwrap();
        assert!(reason.contains("compression thread panicked: page 7 broke the codec"), "{reason}");
    }
}
