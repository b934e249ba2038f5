//! Adaptive compression: for each batch of pages, the codec among
//! [`Codec::ADAPTIVE_CHOICES`] (none, lz4, zstd:1) that moves guest memory fastest, given
//! what this migration measures as it runs: each codec's rate on one worker and its ratio
//! on these pages, the number of workers, and the link's rate.
//!
//! A codec `c` can move at most `workers x rate_c` guest bytes per second through the
//! cores and `link x ratio_c` through the link; the policy picks the codec whose smaller
//! bound is largest. Sending pages uncompressed costs no codec time, so it is bounded by
//! the link alone. The seed found compression made 10 Gbit/s migrations slower; here a
//! codec is only chosen while the cores can outrun the link with it.
//!
//! Estimates start from one batch of each codec and are refreshed by sending every 64th
//! batch with another codec than the best, so a change in the data or the link is seen.

use migration::codec::Codec;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One batch in this many tries another codec than the best one (at 1 in 16 the tries
/// cost the dirty guest 5% at 1 Gbit/s: a batch of incompressible pages sent with lz4).
const EXPLORE_EVERY: u64 = 64;
/// How long the link's rate is averaged over.
const LINK_WINDOW: Duration = Duration::from_millis(50);
/// Weight of a new measurement in the running averages.
const SMOOTHING: f64 = 0.2;

#[derive(Clone, Copy, Default)]
struct CodecEstimate {
    /// Guest bytes per second through one worker.
    rate: f64,
    /// Guest bytes per wire byte.
    ratio: f64,
    samples: u64,
}

struct State {
    estimates: [CodecEstimate; 3],
    batches: u64,
    /// The link's rate, in wire bytes per second, measured over windows in which it had
    /// frames waiting to go (so it, not the codecs, set the pace); unknown at first.
    link: Option<f64>,
    window_start: Instant,
    window_bytes: u64,
    /// Whether frames were waiting for the link during the current window.
    backlog_in_window: bool,
}

/// The shared policy: workers ask it for a codec per batch and report what the batch cost.
pub struct AdaptivePolicy {
    workers: usize,
    state: Mutex<State>,
}

impl AdaptivePolicy {
    pub fn new(workers: usize) -> Self {
        AdaptivePolicy {
            workers: workers.max(1),
            state: Mutex::new(State {
                estimates: [CodecEstimate::default(); 3],
                batches: 0,
                link: None,
                window_start: Instant::now(),
                window_bytes: 0,
                backlog_in_window: false,
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
        state.backlog_in_window |= backlog;
        let elapsed = state.window_start.elapsed();
        if elapsed >= LINK_WINDOW {
            if state.backlog_in_window {
                let rate = wire_bytes.saturating_sub(state.window_bytes) as f64 / elapsed.as_secs_f64();
                state.link = Some(match state.link {
                    Some(link) => link + SMOOTHING * (rate - link),
                    None => rate,
                });
            }
            state.window_start = Instant::now();
            state.window_bytes = wire_bytes;
            state.backlog_in_window = false;
        }
        // First, one measurement of each codec that compresses.
        for (i, estimate) in state.estimates.iter().enumerate().skip(1) {
            if estimate.samples == 0 {
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

    /// Guest bytes per second each choice could move; the index of the largest.
    fn best(&self, state: &State) -> usize {
        // Until the link has been seen full, sending uncompressed is the way to fill it.
        let link = state.link.unwrap_or(f64::INFINITY).max(1.0);
        let throughput = |i: usize| {
            if i == 0 {
                return link;
            }
            let e = state.estimates[i];
            (self.workers as f64 * e.rate).min(link * e.ratio.max(1.0))
        };
        (0..3).max_by(|a, b| throughput(*a).total_cmp(&throughput(*b))).unwrap_or(0)
    }

    /// What compressing a batch with `codec` cost: `input` guest bytes became `output`
    /// wire bytes in `spent` of one worker's time.
    pub fn record(&self, codec: Codec, input: u64, output: u64, spent: Duration) {
        let Some(i) = Codec::ADAPTIVE_CHOICES.iter().position(|c| *c == codec) else { return };
        if i == 0 || input == 0 {
            return;
        }
        let rate = input as f64 / spent.as_secs_f64().max(1e-9);
        let ratio = input as f64 / output.max(1) as f64;
        let mut state = self.lock();
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

    /// A policy that has measured lz4 at `lz4` bytes/s per worker with ratio 2, zstd at
    /// `zstd` with ratio 3, on a link seen at `link` bytes/s.
    fn policy(workers: usize, lz4: f64, zstd: f64, link: f64) -> AdaptivePolicy {
        let policy = AdaptivePolicy::new(workers);
        let second = Duration::from_secs(1);
        policy.record(Codec::Lz4, lz4 as u64, lz4 as u64 / 2, second);
        policy.record(Codec::Zstd { level: 1 }, zstd as u64, zstd as u64 / 3, second);
        policy.lock().link = Some(link);
        policy
    }

    fn steady_choice(policy: &AdaptivePolicy) -> Codec {
        // Skip the batches that explore.
        (0..EXPLORE_EVERY - 1).map(|_| policy.choose(0, true)).last().unwrap()
    }

    #[test]
    fn a_slow_link_gets_the_tightest_codec_the_cores_can_feed() {
        // 125 MB/s (1 Gbit/s): zstd's 2 x 400 MB/s outruns 125 x 3.
        assert_eq!(steady_choice(&policy(2, 1e9, 4e8, 1.25e8)), Codec::Zstd { level: 1 });
    }

    #[test]
    fn a_fast_link_gets_a_cheaper_codec_or_none() {
        // 1.25 GB/s (10 Gbit/s): zstd can move 0.8 GB/s, lz4 2 GB/s (min of 2 x 1, 1.25 x 2).
        assert_eq!(steady_choice(&policy(2, 1e9, 4e8, 1.25e9)), Codec::Lz4);
        // 5 GB/s (40 Gbit/s) with one worker: no codec keeps up with the link.
        assert_eq!(steady_choice(&policy(1, 1e9, 4e8, 5e9)), Codec::None);
    }

    #[test]
    fn every_codec_is_measured_first_and_others_are_tried_now_and_then() {
        let policy = AdaptivePolicy::new(2);
        assert_eq!(policy.choose(0, false), Codec::Lz4);
        policy.record(Codec::Lz4, 1 << 20, 1 << 19, Duration::from_millis(1));
        assert_eq!(policy.choose(0, false), Codec::Zstd { level: 1 });
        policy.record(Codec::Zstd { level: 1 }, 1 << 20, 1 << 18, Duration::from_millis(3));
        // The link not yet seen full: uncompressed, with the codecs tried now and then.
        let choices: Vec<Codec> = (0..4 * EXPLORE_EVERY).map(|_| policy.choose(0, false)).collect();
        let kinds = |c: Codec| choices.iter().filter(|x| **x == c).count();
        assert!(kinds(Codec::None) as u64 > 3 * EXPLORE_EVERY, "{choices:?}");
        assert!(kinds(Codec::Lz4) > 0 && kinds(Codec::Zstd { level: 1 }) > 0, "{choices:?}");
    }

    #[test]
    fn the_link_is_measured_only_while_frames_wait_for_it() {
        let policy = policy(2, 1e9, 4e8, 1.25e8);
        // A window in which the link idled (the codecs were the bottleneck) says nothing.
        policy.lock().window_start = Instant::now() - LINK_WINDOW;
        policy.choose(1_000, false);
        assert_eq!(policy.lock().link, Some(1.25e8));
        // A window with frames waiting measures it.
        policy.lock().window_start = Instant::now() - Duration::from_secs(1);
        policy.choose(1_000 + 1_000_000_000, true);
        let link = policy.lock().link.unwrap();
        assert!(link > 1.25e8, "{link}");
    }
}
