//! An operator's hold on a relay session (`qemu-send --control`, `qemu-recv --control`):
//! its progress, a cancel, and changes to the running migration.
//!
//! The relays carry QEMU's migration; they do not run it. So a change goes where it can
//! take effect: a bandwidth cap caps what the source relay puts on its link (QEMU sees the
//! slower stream and adapts, as it does to a slower network); a downtime limit or a
//! switchover only QEMU can apply, through its QMP socket where the source relay was given
//! one (`qemu-send --qmp`). The destination relay applies nothing itself: it hands every
//! change to the source relay on channel 0 (a `Tune` frame), which applies it as if its
//! own control socket had been used.

use crate::waits::{SessionWaits, STALL_WARNING};
use engine::cancel::Cancel;
use engine::rate::RateLimiter;
use engine::tuning::Tuning;
use migration::control::Tune;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::abort::{AbortKind, SessionAbort};

/// How often a session looks at its operator's requests.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Hands QEMU the changes only it can apply (a downtime limit, a switchover); the error
/// says why it could not.
pub type QemuTuner = Box<dyn FnMut(&Tune) -> Result<(), String> + Send>;

/// A relay session's controls, shared by the caller (its control socket) and the session.
pub struct RelayControls {
    /// Cancels the session until QEMU's main stream has ended.
    pub cancel: Cancel,
    /// What the operator asked to change, taken by the session.
    pub tuning: Tuning,
    pub meter: RelayMeter,
    /// The destination relay: changes go to the source relay.
    forwards: bool,
    qemu: Mutex<Option<QemuTuner>>,
    /// The cap on what this relay sends (its data frames).
    limiter: RateLimiter,
    /// Changes waiting for channel 0 to carry them to the peer.
    outbox: Mutex<Option<Tune>>,
}

/// How the session stands, counted as it goes.
#[derive(Default)]
pub struct RelayMeter {
    /// Bytes of QEMU's streams read from this host's QEMU.
    pub qemu_bytes: AtomicU64,
    /// Bytes of the peer's streams delivered to this host's QEMU.
    pub delivered_bytes: AtomicU64,
    /// Frame bytes this relay put on its connections.
    pub wire_bytes: AtomicU64,
    /// Streams opened.
    pub streams: AtomicU32,
    /// QEMU's main stream has ended on this relay (a cancel would change nothing).
    pub main_ended: AtomicBool,
    started: Mutex<Option<Instant>>,
}

impl RelayMeter {
    /// Since the session's first stream.
    pub fn elapsed(&self) -> Duration {
        lock(&self.started).map(|at| at.elapsed()).unwrap_or_default()
    }

    pub(crate) fn stream_opened(&self) {
        lock(&self.started).get_or_insert_with(Instant::now);
        self.streams.fetch_add(1, Ordering::AcqRel);
    }
}

impl Default for RelayControls {
    fn default() -> Self {
        RelayControls::source(None)
    }
}

impl RelayControls {
    /// A source relay's, with `qemu` to hand QEMU what only it applies (None: such
    /// changes are refused with a warning).
    pub fn source(qemu: Option<QemuTuner>) -> RelayControls {
        RelayControls {
            cancel: Cancel::new(),
            tuning: Tuning::new(),
            meter: RelayMeter::default(),
            forwards: false,
            qemu: Mutex::new(qemu),
            limiter: RateLimiter::with_rate(None),
            outbox: Mutex::new(None),
        }
    }

    /// A destination relay's: every change goes to the source relay.
    pub fn destination() -> RelayControls {
        RelayControls { forwards: true, ..RelayControls::source(None) }
    }

    /// Waits until `bytes` of data may go out under the cap.
    pub(crate) fn pace(&self, bytes: usize) {
        self.limiter.acquire(bytes);
    }

    /// Changes for the peer relay, if any (channel 0 sends them).
    pub(crate) fn take_outgoing(&self) -> Option<Tune> {
        lock(&self.outbox).take()
    }

    /// The peer relay's operator changed the migration: applied here as if asked here.
    pub(crate) fn peer_asked(&self, tune: &Tune) {
        if self.forwards {
            log::warn!("the source relay sent changes ({tune:?}); only a source relay applies them");
            return;
        }
        log::info!("the destination relay's operator asked for {tune:?}");
        if let Some(ms) = tune.downtime_limit_ms {
            self.tuning.set_downtime_limit(Duration::from_millis(ms));
        }
        if let Some(rate) = tune.max_bandwidth {
            self.tuning.set_max_bandwidth((rate > 0).then_some(rate));
        }
        if tune.switchover {
            self.tuning.switch_over_now();
        }
    }

    /// Does what the operator asked since the last look: a cancel, changes.
    fn look(&self, abort: &SessionAbort) {
        if self.cancel.is_cancelled() && !abort.is_raised() {
            if self.meter.main_ended.load(Ordering::Acquire) {
                log::warn!("too late to cancel: QEMU's migration stream has ended");
            } else {
                abort.raise_as(AbortKind::Cancelled, format!("migration cancelled: {}", self.cancel.reason()));
            }
        }
        let tune = Tune {
            downtime_limit_ms: self.tuning.take_downtime_limit().map(|limit| limit.as_millis() as u64),
            max_bandwidth: self.tuning.take_max_bandwidth().map(|cap| cap.unwrap_or(0)),
            switchover: self.tuning.take_switchover(),
        };
        if tune.is_empty() {
            return;
        }
        if self.forwards {
            let mut outbox = lock(&self.outbox);
            let waiting = outbox.get_or_insert_with(Tune::default);
            waiting.downtime_limit_ms = tune.downtime_limit_ms.or(waiting.downtime_limit_ms);
            waiting.max_bandwidth = tune.max_bandwidth.or(waiting.max_bandwidth);
            waiting.switchover |= tune.switchover;
            return;
        }
        if let Some(rate) = tune.max_bandwidth {
            log::info!("the relay's link capped at {rate} bytes/s (0: no cap)");
            self.limiter.set_rate((rate > 0).then_some(rate));
        }
        let for_qemu = Tune { max_bandwidth: None, ..tune };
        if !for_qemu.is_empty() {
            match lock(&self.qemu).as_mut() {
                Some(qemu) => {
                    if let Err(err) = qemu(&for_qemu) {
                        log::warn!("could not hand QEMU {for_qemu:?}: {err}");
                    }
                }
                None => log::warn!(
                    "only QEMU applies {for_qemu:?}, and this relay was given no QMP socket of QEMU's (qemu-send --qmp)"
                ),
            }
        }
    }
}

/// The session's operator watched, and its threads' waits (a stall is warned of), on a
/// thread of its own until dropped (the session's end) or the session aborts.
pub(crate) struct Watched {
    ended: Arc<AtomicBool>,
}

impl Watched {
    pub(crate) fn start(controls: &Arc<RelayControls>, abort: &Arc<SessionAbort>, waits: Arc<SessionWaits>) -> Watched {
        let ended = Arc::new(AtomicBool::new(false));
        let (controls, abort, done) = (controls.clone(), abort.clone(), ended.clone());
        let spawned = std::thread::Builder::new().name("relay-watch".into()).spawn(move || {
            while !done.load(Ordering::Acquire) && !abort.is_raised() {
                controls.look(&abort);
                waits.warn_of_stalls(STALL_WARNING);
                std::thread::sleep(WATCH_EVERY);
            }
        });
        if let Err(err) = spawned {
            log::warn!("no operator controls for this session: {err}");
        }
        Watched { ended }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_forwards_what_a_source_applies() {
        let abort = SessionAbort::new();
        let destination = RelayControls::destination();
        destination.tuning.set_max_bandwidth(Some(1000));
        destination.tuning.switch_over_now();
        destination.look(&abort);
        let tune = destination.take_outgoing().expect("forwarded");
        assert_eq!(tune, Tune { downtime_limit_ms: None, max_bandwidth: Some(1000), switchover: true });
        assert_eq!(destination.take_outgoing(), None);

        let handed = Arc::new(Mutex::new(Vec::new()));
        let qemu: QemuTuner = Box::new({
            let handed = handed.clone();
            move |tune| {
                handed.lock().unwrap().push(*tune);
                Ok(())
            }
        });
        let source = RelayControls::source(Some(qemu));
        source.peer_asked(&tune);
        source.look(&abort);
        // The cap is the relay's own; only the switchover goes to QEMU.
        assert_eq!(*handed.lock().unwrap(), [Tune { switchover: true, ..Tune::default() }]);
        assert_eq!(source.take_outgoing(), None);
    }

    #[test]
    fn a_cancel_aborts_the_session_until_the_main_stream_has_ended() {
        let controls = RelayControls::default();
        controls.meter.main_ended.store(true, Ordering::Release);
        controls.cancel.cancel("asked");
        let abort = SessionAbort::new();
        controls.look(&abort);
        assert!(!abort.is_raised(), "QEMU's stream had ended: nothing to cancel");
        controls.meter.main_ended.store(false, Ordering::Release);
        controls.look(&abort);
        assert_eq!(abort.kind(), AbortKind::Cancelled);
        assert_eq!(abort.reason().as_deref(), Some("migration cancelled: asked"));
    }
}
