//! Cancelling a migration from outside the engine: a signal handler, an operator's control
//! command, a VMM's own UI. The caller keeps a clone of the token and hands one to the
//! source in `SourceConfig::cancel`; `cancel` may be called from any thread at any time.
//!
//! The engine honours it in every phase up to the switchover: while connecting, in the
//! bulk and iterative rounds, and in stop-and-copy (the guest paused is resumed). Once the
//! destination has been told to commit, a cancel is too late and the migration completes:
//! cancelling then could leave the guest running on both sides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    requested: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks for the migration to stop; the first reason is kept.
    pub fn cancel(&self, reason: impl Into<String>) {
        let mut slot = self.inner.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| reason.into());
        self.inner.requested.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.inner.reason.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel").field("requested", &self.is_cancelled()).finish()
    }
}
