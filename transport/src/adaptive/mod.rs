//! Adaptive compression: for each batch of pages, the codec among
//! [`Codec::ADAPTIVE_CHOICES`] (none, lz4, zstd:1) that moves guest memory fastest, given
//! what this migration measures as it runs:
//! - each choice's cost, in guest bytes per CPU-second of a worker (the whole batch:
//!   reading pages, the zero check, compressing, the checksum), and its ratio on these pages;
//! - the free cores: the CPU the workers use now plus the machine's idle CPUs (or, where
//!   workers share CPUs with our polling dataplane cores, which always look busy, at least
//!   the workers' fair share of the CPUs), at most one per worker;
//! - the link's rate, measured while frames wait for it.
//!
//! A choice `c` can move at most `free cores x rate_c` guest bytes per second through the
//! cores and `link x ratio_c` through the link; the policy picks the choice whose smaller
//! bound is largest. The seed found compression made 10 Gbit/s migrations slower; here a
//! codec is only chosen while the free cores can outrun the link with it. Pricing codecs by
//! CPU-seconds and counting only free cores matters when the link itself costs CPU (a
//! kernel TCP stack, or both ends on one host): compressing then takes cores the link needs.
//!
//! Estimates start from one batch of each choice and are refreshed by sending every 64th
//! batch with another choice than the best, so a change in the data or the link is seen.

pub mod cpu;

use migration::codec::Codec;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One batch in this many tries another codec than the best one (at 1 in 16 the tries
/// cost the dirty guest 5% at 1 Gbit/s: a batch of incompressible pages sent with lz4).
const EXPLORE_EVERY: u64 = 64;
/// How long the link's rate and the free cores are averaged over.
const WINDOW: Duration = Duration::from_millis(50);
/// Weight of a new measurement in the running averages.
const SMOOTHING: f64 = 0.2;
/// How much more a codec must promise than sending pages as they are: compressing also
/// costs the destination CPU, which this end does not see.
const CODEC_MARGIN: f64 = 1.05;

#[derive(Clone, Copy, Default)]
struct ChoiceEstimate {
    /// Guest bytes per CPU-second of one worker.
    rate: f64,
    /// Guest bytes per wire byte.
    ratio: f64,
    samples: u64,
}

/// What is measured over the current window.
struct Window {
    start: Instant,
    wire_bytes: u64,
    /// Whether frames were waiting for the link during the window.
    backlog: bool,
    /// CPU-seconds the workers spent on the batches recorded in the window.
    worker_cpu: f64,
    /// The machine's idle CPU-seconds at the window's start.
    idle_at_start: Option<f64>,
}

impl Window {
    /// A window from now; `idle_at_start` is the machine's idle CPU-seconds now.
    fn open(wire_bytes: u64, idle_at_start: Option<f64>) -> Self {
        Window { start: Instant::now(), wire_bytes, backlog: false, worker_cpu: 0.0, idle_at_start }
    }
}

struct State {
    estimates: [ChoiceEstimate; 3],
    batches: u64,
    /// The link's rate, in wire bytes per second, measured over windows in which it had
    /// frames waiting to go (so it, not the codecs, set the pace); unknown at first.
    link: Option<f64>,
    /// Cores the workers can have: what they use plus what sits idle; unknown at first
    /// (taken as one per worker).
    free_cores: Option<f64>,
    window: Window,
}

/// The shared policy: workers ask it for a codec per batch and report what the batch cost.
pub struct AdaptivePolicy {
    workers: usize,
    state: Mutex<State>,
}

fn smooth(average: &mut Option<f64>, sample: f64) {
    *average = Some(match *average {
        Some(value) => value + SMOOTHING * (sample - value),
        None => sample,
    });
}

impl AdaptivePolicy {
    pub fn new(workers: usize) -> Self {
        AdaptivePolicy {
            workers: workers.max(1),
            state: Mutex::new(State {
                estimates: [ChoiceEstimate::default(); 3],
                batches: 0,
                link: None,
                free_cores: None,
                window: Window::open(0, cpu::idle_seconds()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The codec for the next batch, given the bytes written to the link so far and
    /// whether frames are waiting for it now.
    pub fn choose(&self, wire_bytes: u64, backlog: bool) -> Codec {
        let mut state = self.lock();
        state.batches += 1;
        state.window.backlog |= backlog;
        if state.window.start.elapsed() >= WINDOW {
            self.close_window(&mut state, wire_bytes);
        }
        // First, one measurement of each choice; none last, which then goes on until the
        // link has been seen full.
        for i in [1, 2, 0] {
            if state.estimates[i].samples == 0 {
                return Codec::ADAPTIVE_CHOICES[i];
            }
        }
        let best = self.best(&state);
        if state.batches.is_multiple_of(EXPLORE_EVERY) {
            // The two others in turn.
            let others: Vec<usize> = (0..3).filter(|i| *i != best).collect();
            return Codec::ADAPTIVE_CHOICES[others[(state.batches / EXPLORE_EVERY) as usize % 2]];
        }
        Codec::ADAPTIVE_CHOICES[best]
    }

    /// Ends the window: the link's rate (if it had a backlog) and the free cores.
    fn close_window(&self, state: &mut State, wire_bytes: u64) {
        let window = &state.window;
        let seconds = window.start.elapsed().as_secs_f64();
        if window.backlog {
            smooth(&mut state.link, wire_bytes.saturating_sub(window.wire_bytes) as f64 / seconds);
        }
        let idle_now = cpu::idle_seconds();
        if let (Some(before), Some(now)) = (window.idle_at_start, idle_now) {
            let idle_cores = (now - before).max(0.0) / seconds;
            let cores = (window.worker_cpu / seconds + idle_cores).max(self.share_beside_pollers());
            smooth(&mut state.free_cores, cores.min(self.workers as f64));
        }
        state.window = Window::open(wire_bytes, idle_now);
    }

    /// Where the workers share CPUs with this process's polling dataplane cores (more
    /// pollers and workers than CPUs), the cores the workers can count on: their fair share
    /// of the CPUs. A poller keeps its CPU busy whether or not it has work, so the machine
    /// never looks idle, yet the scheduler gives a worker that wants CPU its turn. Pollers
    /// on CPUs of their own (a dedicated NIC core) leave nothing to share.
    fn share_beside_pollers(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pollers = cpu::pollers();
        if pollers == 0 || pollers + self.workers <= cpus {
            return 0.0;
        }
        (cpus * self.workers) as f64 / (self.workers + pollers) as f64
    }

    /// Guest bytes per second each choice could move; the index of the largest, with
    /// sending pages as they are kept unless a codec promises `CODEC_MARGIN` more.
    fn best(&self, state: &State) -> usize {
        // Until the link has been seen full, sending uncompressed is the way to fill it.
        let link = state.link.unwrap_or(f64::INFINITY).max(1.0);
        let cores = state.free_cores.unwrap_or(self.workers as f64);
        let throughput = |i: usize| {
            let e = state.estimates[i];
            let ratio = if i == 0 { 1.0 } else { e.ratio.max(1.0) };
            (cores * e.rate).min(link * ratio)
        };
        let best_codec = if throughput(2) > throughput(1) { 2 } else { 1 };
        if throughput(best_codec) > CODEC_MARGIN * throughput(0) {
            best_codec
        } else {
            0
        }
    }

    /// What a batch sent with `codec` cost: `input` guest bytes (pages not found zero or
    /// unchanged) became `output` wire bytes in `cpu` of one worker's CPU time.
    pub fn record(&self, codec: Codec, input: u64, output: u64, cpu: Duration) {
        let Some(i) = Codec::ADAPTIVE_CHOICES.iter().position(|c| *c == codec) else { return };
        let mut state = self.lock();
        state.window.worker_cpu += cpu.as_secs_f64();
        if input == 0 || cpu.is_zero() {
            return;
        }
        let rate = input as f64 / cpu.as_secs_f64();
        let ratio = input as f64 / output.max(1) as f64;
        let estimate = &mut state.estimates[i];
        if estimate.samples == 0 {
            (estimate.rate, estimate.ratio) = (rate, ratio);
        } else {
            estimate.rate += SMOOTHING * (rate - estimate.rate);
            estimate.ratio += SMOOTHING * (ratio - estimate.ratio);
        }
        estimate.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Codec = Codec::None;
    const ZSTD: Codec = Codec::Zstd { level: 1 };

    /// A policy that has measured, per worker CPU-second, raw sending at 10 GB/s, lz4 at
    /// `lz4` bytes/s with ratio 2 and zstd at `zstd` with ratio 3, with `cores` free cores
    /// and a link seen at `link` bytes/s.
    fn policy(cores: f64, lz4: f64, zstd: f64, link: f64) -> AdaptivePolicy {
        let policy = AdaptivePolicy::new(2);
        let second = Duration::from_secs(1);
        policy.record(NONE, 10_000_000_000, 10_000_000_000, second);
        policy.record(Codec::Lz4, lz4 as u64, lz4 as u64 / 2, second);
        policy.record(ZSTD, zstd as u64, zstd as u64 / 3, second);
        let mut state = policy.lock();
        state.link = Some(link);
        state.free_cores = Some(cores);
        // No window closes during the test (it would measure this machine).
        state.window.start = Instant::now() + Duration::from_secs(3600);
        drop(state);
        policy
    }

    fn steady_choice(policy: &AdaptivePolicy) -> Codec {
        // Skip the batches that explore.
        (0..EXPLORE_EVERY - 1).map(|_| policy.choose(0, true)).last().unwrap()
    }

    #[test]
    fn a_slow_link_gets_the_tightest_codec_the_cores_can_feed() {
        // 125 MB/s (1 Gbit/s): zstd's 2 x 400 MB/s outruns 125 x 3.
        assert_eq!(steady_choice(&policy(2.0, 1e9, 4e8, 1.25e8)), ZSTD);
    }

    #[test]
    fn a_fast_link_gets_a_cheaper_codec_or_none() {
        // 1.25 GB/s (10 Gbit/s): zstd can move 0.8 GB/s, lz4 2 GB/s (min of 2 x 1, 1.25 x 2).
        assert_eq!(steady_choice(&policy(2.0, 1e9, 4e8, 1.25e9)), Codec::Lz4);
        // 5 GB/s (40 Gbit/s) with one core: no codec keeps up with the link.
        assert_eq!(steady_choice(&policy(1.0, 1e9, 4e8, 5e9)), NONE);
    }

    #[test]
    fn without_free_cores_pages_go_as_they_are() {
        // The same 10 Gbit/s link, but the machine is busy: a fifth of a core to spare.
        assert_eq!(steady_choice(&policy(0.2, 1e9, 4e8, 1.25e9)), NONE);
    }

    #[test]
    fn a_codec_that_only_matches_sending_raw_is_not_chosen() {
        // lz4 on incompressible pages (ratio 1) moves what the link moves raw, for CPU.
        let policy = policy(2.0, 4e9, 1e8, 1.25e9);
        for _ in 0..50 {
            policy.record(Codec::Lz4, 1 << 20, 1 << 20, Duration::from_micros(250));
        }
        assert_eq!(steady_choice(&policy), NONE);
    }

    #[test]
    fn every_choice_is_measured_first_and_others_are_tried_now_and_then() {
        let policy = AdaptivePolicy::new(2);
        assert_eq!(policy.choose(0, false), Codec::Lz4);
        policy.record(Codec::Lz4, 1 << 20, 1 << 19, Duration::from_millis(1));
        assert_eq!(policy.choose(0, false), ZSTD);
        policy.record(ZSTD, 1 << 20, 1 << 18, Duration::from_millis(3));
        assert_eq!(policy.choose(0, false), NONE);
        policy.record(NONE, 1 << 20, 1 << 20, Duration::from_micros(100));
        // The link not yet seen full: uncompressed, with the codecs tried now and then.
        let choices: Vec<Codec> = (0..4 * EXPLORE_EVERY).map(|_| policy.choose(0, false)).collect();
        let kinds = |c: Codec| choices.iter().filter(|x| **x == c).count();
        assert!(kinds(NONE) as u64 > 3 * EXPLORE_EVERY, "{choices:?}");
        assert!(kinds(Codec::Lz4) > 0 && kinds(ZSTD) > 0, "{choices:?}");
    }

    #[test]
    fn the_link_is_measured_only_while_frames_wait_for_it() {
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        // A window in which the link idled (the codecs were the bottleneck) says nothing.
        policy.lock().window.start = Instant::now() - WINDOW;
        policy.choose(1_000, false);
        assert_eq!(policy.lock().link, Some(1.25e8));
        // A window with frames waiting measures it.
        policy.lock().window.start = Instant::now() - Duration::from_secs(1);
        policy.choose(1_000 + 1_000_000_000, true);
        let link = policy.lock().link.unwrap();
        assert!(link > 1.25e8, "{link}");
    }

    #[test]
    fn free_cores_are_what_the_workers_use_plus_idle_cpus_at_most_one_per_worker() {
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        {
            let mut state = policy.lock();
            state.free_cores = None;
            state.window.start = Instant::now() - Duration::from_secs(1);
            // Workers busy 0.5 CPU-seconds over the one-second window, no CPU idle.
            state.window.worker_cpu = 0.5;
            state.window.idle_at_start = cpu::idle_seconds().map(|s| s + 1e6);
        }
        policy.choose(0, false);
        assert_eq!(policy.lock().free_cores.map(|c| (c * 100.0).round() / 100.0), Some(0.5));
        {
            let mut state = policy.lock();
            state.free_cores = None;
            state.window.start = Instant::now() - Duration::from_secs(1);
            state.window.worker_cpu = 0.5;
            // 100 idle CPU-seconds in one second: capped at one core per worker.
            state.window.idle_at_start = cpu::idle_seconds().map(|s| s - 100.0);
        }
        policy.choose(0, false);
        assert_eq!(policy.lock().free_cores, Some(2.0));
    }
}
