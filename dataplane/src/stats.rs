//! What a polling core tells an operator about itself: how busy it is (the share of its
//! time spent in loop iterations that moved something, the rest being spins and naps with
//! nothing to do) and how its connections fare (smoothed RTT, retransmissions), as
//! `ss -ti` shows a kernel connection's.
//!
//! The core keeps the figures itself (`CoreMeter`, no atomics in its loop) and publishes
//! them into `CoreStats` every `PUBLISH_EVERY`, where a reader on any thread takes a
//! `CoreSnapshot`.

use smoltcp::socket::tcp;
use smoltcp::time::{Duration as StackDuration, Instant};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a core publishes its figures (a reader sees them this late at most).
const PUBLISH_EVERY: StackDuration = StackDuration::from_millis(100);

/// One connection of a core, as last published.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionStats {
    /// `ADDRESS:PORT` of each end.
    pub local: String,
    pub remote: String,
    /// The stack's smoothed RTT (whole milliseconds); None before the first sample.
    pub smoothed_rtt: Option<Duration>,
    pub retransmissions: u64,
    /// The TCP state (smoltcp's names: `ESTABLISHED`, `CLOSE-WAIT`...).
    pub state: String,
    /// Bytes in the send buffer (sent and unacknowledged, or not sent yet) and in the
    /// receive buffer (not yet taken by the application): `ss`'s Send-Q and Recv-Q, which
    /// say on which side a stalled stream waits.
    pub send_queue: usize,
    pub recv_queue: usize,
}

impl ConnectionStats {
    pub(crate) fn of(socket: &tcp::Socket) -> ConnectionStats {
        let endpoint = |e: Option<smoltcp::wire::IpEndpoint>| e.map(|e| e.to_string()).unwrap_or_default();
        ConnectionStats {
            local: endpoint(socket.local_endpoint()),
            remote: endpoint(socket.remote_endpoint()),
            smoothed_rtt: socket.smoothed_rtt().map(|rtt| Duration::from_micros(rtt.total_micros())),
            retransmissions: socket.retransmissions(),
            state: socket.state().to_string(),
            send_queue: socket.send_queue(),
            recv_queue: socket.recv_queue(),
        }
    }
}

/// A core's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CoreSnapshot {
    /// The core's thread name.
    pub name: String,
    /// Time spent in iterations that moved frames or bytes.
    pub busy: Duration,
    /// Time since the core started.
    pub running: Duration,
    /// Retransmissions on every connection the core has carried, closed ones included.
    pub retransmissions: u64,
    /// The connections open now.
    pub connections: Vec<ConnectionStats>,
}

/// Where a core publishes its figures; shared with its handle.
#[derive(Debug, Default)]
pub(crate) struct CoreStats {
    name: String,
    busy_us: AtomicU64,
    running_us: AtomicU64,
    connections: Mutex<(Vec<ConnectionStats>, u64)>,
}

impl CoreStats {
    pub(crate) fn named(name: &str) -> CoreStats {
        CoreStats { name: name.to_string(), ..CoreStats::default() }
    }

    pub(crate) fn snapshot(&self) -> CoreSnapshot {
        let (connections, retransmissions) = self.connections.lock().unwrap_or_else(|p| p.into_inner()).clone();
        CoreSnapshot {
            name: self.name.clone(),
            busy: Duration::from_micros(self.busy_us.load(Ordering::Relaxed)),
            running: Duration::from_micros(self.running_us.load(Ordering::Relaxed)),
            retransmissions,
            connections,
        }
    }
}

/// Every core of a stack, for a reader on another thread (a metrics endpoint) to look at
/// as often as it likes; it does not keep the cores running.
#[derive(Debug, Clone, Default)]
pub struct StackMeter(pub(crate) Vec<Arc<CoreStats>>);

impl StackMeter {
    /// Each core's figures as it last published them.
    pub fn snapshot(&self) -> Vec<CoreSnapshot> {
        self.0.iter().map(|core| core.snapshot()).collect()
    }
}

/// The core's own count, kept in its loop.
pub(crate) struct CoreMeter {
    started: Instant,
    /// When the last iteration began, and whether it moved anything.
    last: Option<(Instant, bool)>,
    busy: StackDuration,
    /// Retransmissions of the connections already closed.
    closed_retransmissions: u64,
    next_publish: Instant,
}

impl CoreMeter {
    pub(crate) fn new(now: Instant) -> CoreMeter {
        CoreMeter { started: now, last: None, busy: StackDuration::ZERO, closed_retransmissions: 0, next_publish: now }
    }

    /// An iteration begins at `now`: the one before it ran from its own beginning until
    /// now (no nap follows an iteration that moved something, so all of that was work).
    /// Returns whether it is time to publish.
    pub(crate) fn began(&mut self, now: Instant) -> bool {
        if let Some((at, true)) = self.last {
            self.busy += now - at;
        }
        self.last = Some((now, false));
        now >= self.next_publish
    }

    /// The iteration that began last moved something.
    pub(crate) fn moved(&mut self) {
        if let Some((_, moved)) = self.last.as_mut() {
            *moved = true;
        }
    }

    /// A connection closes: its retransmissions stay counted.
    pub(crate) fn closed(&mut self, socket: &tcp::Socket) {
        self.closed_retransmissions += socket.retransmissions();
    }

    /// Publishes the figures into `stats`, with `connections` the core's open ones.
    pub(crate) fn publish(&mut self, now: Instant, stats: &CoreStats, connections: Vec<ConnectionStats>) {
        self.next_publish = now + PUBLISH_EVERY;
        stats.busy_us.store(self.busy.total_micros(), Ordering::Relaxed);
        stats.running_us.store((now - self.started).total_micros(), Ordering::Relaxed);
        let retransmissions = self.closed_retransmissions + connections.iter().map(|c| c.retransmissions).sum::<u64>();
        *stats.connections.lock().unwrap_or_else(|p| p.into_inner()) = (connections, retransmissions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn only_iterations_that_moved_something_count_as_busy() {
        let mut meter = CoreMeter::new(at(0));
        assert!(meter.began(at(0)), "publishes at once");
        meter.moved();
        meter.began(at(3)); // 0..3 worked
        meter.began(at(10)); // 3..10 idle (spins, a nap)
        meter.moved();
        meter.began(at(12)); // 10..12 worked
        let stats = CoreStats::named("core-0");
        meter.publish(at(12), &stats, Vec::new());
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.busy, Duration::from_millis(5));
        assert_eq!(snapshot.running, Duration::from_millis(12));
        assert_eq!(snapshot.name, "core-0");
        assert!(!meter.began(at(50)), "not due again before PUBLISH_EVERY");
        assert!(meter.began(at(112)));
    }

    #[test]
    fn retransmissions_of_closed_connections_stay_counted() {
        let mut meter = CoreMeter::new(at(0));
        meter.closed_retransmissions = 3;
        let open = ConnectionStats {
            local: "10.0.0.1:49152".into(),
            remote: "10.0.0.2:4444".into(),
            smoothed_rtt: Some(Duration::from_millis(1)),
            retransmissions: 2,
            state: "ESTABLISHED".into(),
            send_queue: 0,
            recv_queue: 0,
        };
        let stats = CoreStats::named("core-0");
        meter.publish(at(1), &stats, vec![open.clone()]);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.retransmissions, 5);
        assert_eq!(snapshot.connections, vec![open]);
    }
}
