//! Adaptive compression: for each batch of pages, the codec among
//! [`Codec::ADAPTIVE_CHOICES`] (none, lz4, zstd:1, each of the two after a byte shuffle
//! and lz4 after a bit shuffle, for numeric content; and `deflate` where a compression
//! device does it) that
//! moves guest memory fastest, given
//! what this migration measures as it runs:
//! - each choice's cost, in guest bytes per CPU-second of a worker (reading the pages and
//!   compressing them), and its ratio, all measured on the same batches of pages;
//! - the free cores: the CPU the workers use now plus the machine's idle CPUs (or, where
//!   workers share CPUs with our polling dataplane cores, which always look busy, what the
//!   workers got of a CPU while they had work), at most one per worker;
//! - the link's rate: the bytes the destination acknowledged per second while the link
//!   held writes back (bytes written would count the megabytes a socket buffer and the
//!   queues on the way take in at first);
//! - what each choice was seen to move, over windows sent with it while the scanner kept
//!   ahead of the workers;
//! - the receiver's rate, in guest bytes per second, over windows in which the peer's
//!   receive window, not the link, held the sender back (the destination's application is
//!   the slower end: a destination QEMU loading the relay's stream on one thread). Those
//!   windows do not measure the link: what the destination takes in wire bytes then falls
//!   as the ratio rises, and would make any codec look as if it moved more.
//!
//! A choice `c` can move at most `free cores x rate_c` guest bytes per second through the
//! cores, `link x ratio_c` through the link and the receiver's rate through the receiver,
//! and no more than it was seen to move. Pages sent raw are priced at the link's rate as
//! measured while they were sent raw: where the codecs take CPU the stack needs, the link
//! moves less while they run. The policy picks the choice whose bound is largest (so where
//! the receiver binds every choice alike, pages go as they are: a codec would spend both
//! ends' CPU for nothing). The 2015 KVM live-migration talk found compression made 10
//! Gbit/s migrations slower; here a codec is only chosen while the free cores can outrun
//! the link with it. Pricing codecs by
//! CPU-seconds and counting only free cores matters when the link itself costs CPU (a
//! kernel TCP stack, or both ends on one host): compressing then takes cores the link needs.
//!
//! Until every choice has been measured, pages go raw; so they do until the link has been
//! seen full, which is first measured over the first few milliseconds it holds writes
//! back (every page sent raw meanwhile is one a codec might have shrunk). Then one batch
//! in 64 (while that takes at most 3% of the workers' CPU) is also compressed with every
//! choice, the one it is sent with included, so that the estimates follow the data from
//! region to region without sending a batch with a worse codec.

pub mod cpu;

use migration::codec::Codec;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one batch in this many is also compressed with every choice, to measure them
/// all on the same pages...
const MEASURE_EVERY: u64 = 64;
/// ...and only while measuring has taken at most this share of the workers' CPU time. A
/// batch sent raw costs little, so measuring lz4 and zstd on one batch in 64 of them
/// would add some 40% to the workers' work on a fast link.
const MEASURE_BUDGET: f64 = 0.03;
/// How long the link's rate and the free cores are averaged over.
const WINDOW: Duration = Duration::from_millis(50);
/// The spans the link's rate is first taken over, each one in which it held writes back
/// at every batch: at 1 Gbit/s, some 600 KB acknowledged...
const FIRST_LINK_SPAN: Duration = Duration::from_millis(5);
/// ...the rate taken once a span's is at most this much above the span's before.
const SETTLED: f64 = 1.2;
/// Weight of a new measurement in the running averages (and what the codecs' running
/// sums forget per batch).
const SMOOTHING: f64 = 0.2;
/// How fast an observation of a choice not in use fades toward the model, per window.
const FADE: f64 = 0.02;
/// How much more a codec must promise than sending pages as they are: compressing also
/// costs the destination CPU, which this end does not see.
const CODEC_MARGIN: f64 = 1.05;

#[derive(Clone, Copy, Default)]
struct ChoiceEstimate {
    /// Guest bytes in, wire bytes out and worker CPU-seconds of the recent batches, each a
    /// running sum that forgets old batches geometrically. Rates and ratios are taken from
    /// the sums, so a batch weighs by its bytes: one page of a batch that packs 80x moves
    /// the ratio as one page, not as a batch.
    input: f64,
    output: f64,
    cpu: f64,
    samples: u64,
}

impl ChoiceEstimate {
    /// Guest bytes per CPU-second of one worker.
    fn rate(&self) -> f64 {
        self.input / self.cpu.max(1e-12)
    }

    /// Guest bytes per wire byte.
    fn ratio(&self) -> f64 {
        self.input / self.output.max(1.0)
    }
}

/// What is measured over the current window.
struct Window {
    start: Instant,
    delivered_bytes: u64,
    /// Batches for which the link held writes back.
    full: u32,
    /// Batches for which the peer's receive window had held the sender back lately.
    receiver_bound: u32,
    /// Batches chosen for during the window.
    batches: u32,
    /// Batches for which the scanner had jobs queued for the workers (it was not what
    /// held the migration back).
    scanner_ahead: u32,
    /// Batches sent with each choice.
    chosen: Vec<u32>,
    /// Guest bytes (pages not found zero or unchanged) the workers handled.
    guest_bytes: f64,
    /// CPU-seconds the workers spent on the batches recorded in the window.
    worker_cpu: f64,
    /// Wall-clock seconds those batches took (more than their CPU time where the workers
    /// waited for a CPU).
    worker_wall: f64,
    /// The machine's idle CPU-seconds at the window's start.
    idle_at_start: Option<f64>,
}

impl Window {
    /// Whether (nearly) every batch of the window was sent with choice `i`.
    fn mostly(&self, i: usize) -> bool {
        self.chosen[i] * 10 >= self.batches * 9
    }

    /// A window from now; `idle_at_start` is the machine's idle CPU-seconds now.
    fn open(choices: usize, delivered_bytes: u64, idle_at_start: Option<f64>) -> Self {
        Window {
            start: Instant::now(),
            delivered_bytes,
            full: 0,
            receiver_bound: 0,
            batches: 0,
            scanner_ahead: 0,
            chosen: vec![0; choices],
            guest_bytes: 0.0,
            worker_cpu: 0.0,
            worker_wall: 0.0,
            idle_at_start,
        }
    }
}

struct State {
    estimates: Vec<ChoiceEstimate>,
    batches: u64,
    /// The batch that was last measured on.
    measured_at: u64,
    /// Worker CPU-seconds spent on all batches, and on measuring.
    worker_cpu: f64,
    measure_cpu: f64,
    /// The link's rate, in wire bytes per second, measured over windows in which it held
    /// writes back (so it, not the codecs, set the pace); unknown at first.
    link: Option<f64>,
    /// The link's rate over such windows sent (nearly) all raw, which fades toward `link`
    /// while pages are compressed. Where the workers share CPUs with the stack (our polling
    /// cores, or the kernel's TCP), the link moves less while codecs run: they take the CPU
    /// the stack needs. Pages sent raw are priced at the link they leave (over our stack on
    /// two CPUs, unshaped: 1.26 GB/s raw, measured down to 0.59 as codecs ran, which kept
    /// pages compressed that moved faster raw).
    link_raw: Option<f64>,
    /// The receiver's rate, in guest bytes per second, over windows in which its receive
    /// window held the sender back; None while the last full window was the link's.
    receiver: Option<f64>,
    /// The span of the link's first measurement under way: every batch in it found the
    /// link holding writes back.
    first_span: Option<Span>,
    /// Cores the workers can have: what they use plus what sits idle; unknown at first
    /// (taken as one per worker).
    free_cores: Option<f64>,
    /// Guest bytes per second each choice was seen to move, over windows sent with it in
    /// which the scanner kept ahead: what the model's bounds miss (the destination's CPU
    /// where the ends share a host, caches, the stack) shows here.
    observed: Vec<Option<f64>>,
    window: Window,
}

/// The state of the pipeline when a worker asks for a codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pipeline {
    /// Whether the link holds writes back: the stack's send buffers are full (or, where
    /// the stack cannot tell, frames wait for the connection's writer).
    pub link_full: bool,
    /// Whether the scanner has more jobs queued for the workers.
    pub scanner_ahead: bool,
    /// Whether the peer's receive window, not the link, has held the sender back lately
    /// (`SendProbe::receiver_limited`; false where the stack cannot tell).
    pub receiver_bound: bool,
}

/// The policy's answer for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The codec to send the batch with.
    pub codec: Codec,
    /// Whether to measure every choice on this batch's pages too ([`AdaptivePolicy::measure`]).
    pub measure: bool,
}

/// The shared policy: workers ask it for a codec per batch, report each batch's CPU and
/// wall time, and now and then measure every choice on one batch's pages.
pub struct AdaptivePolicy {
    workers: usize,
    /// What the policy chooses among, cheapest first; choice 0 sends pages as they are.
    choices: Vec<Codec>,
    state: Mutex<State>,
}

/// The link's first measurement: over spans of `FIRST_LINK_SPAN` in which it held writes
/// back at every batch, what the destination acknowledged, once a span's rate is no more
/// than `SETTLED` times the one before. While TCP opens its window, the link looks slower
/// than it is; in the first span after an idle spell, faster (a shaper's or a switch's
/// burst allowance). Waiting for a window to close would send its 50 ms raw.
fn first_link(state: &mut State, link_full: bool, delivered_bytes: u64) {
    if !link_full {
        state.first_span = None;
        return;
    }
    let span = state.first_span.get_or_insert(Span::open(delivered_bytes, None));
    let elapsed = span.start.elapsed();
    let acknowledged = delivered_bytes.saturating_sub(span.delivered_bytes);
    if elapsed < FIRST_LINK_SPAN || acknowledged == 0 {
        return;
    }
    let rate = acknowledged as f64 / elapsed.as_secs_f64();
    match span.previous_rate {
        // Pages go raw until the link is known: this is also its rate for them.
        Some(previous) if rate <= SETTLED * previous => (state.link, state.link_raw) = (Some(rate), Some(rate)),
        _ => *span = Span::open(delivered_bytes, Some(rate)),
    }
}

/// A span of the link's first measurement.
struct Span {
    start: Instant,
    delivered_bytes: u64,
    /// The rate over the span before, if this one follows it.
    previous_rate: Option<f64>,
}

impl Span {
    fn open(delivered_bytes: u64, previous_rate: Option<f64>) -> Self {
        Span { start: Instant::now(), delivered_bytes, previous_rate }
    }
}

fn smooth(average: &mut Option<f64>, sample: f64) {
    *average = Some(match *average {
        Some(value) => value + SMOOTHING * (sample - value),
        None => sample,
    });
}

impl AdaptivePolicy {
    /// A policy for `workers` workers choosing among [`Codec::ADAPTIVE_CHOICES`].
    pub fn new(workers: usize) -> Self {
        Self::with_choices(workers, Codec::ADAPTIVE_CHOICES.to_vec())
    }

    /// A policy choosing among `choices`, the first of which must be `none` (sending pages
    /// as they are): the default choices and `deflate` where a compression device does it.
    pub fn with_choices(workers: usize, choices: Vec<Codec>) -> Self {
        assert_eq!(choices.first(), Some(&Codec::None), "choice 0 sends pages as they are");
        let count = choices.len();
        AdaptivePolicy {
            workers: workers.max(1),
            choices,
            state: Mutex::new(State {
                estimates: vec![ChoiceEstimate::default(); count],
                batches: 0,
                measured_at: 0,
                worker_cpu: 0.0,
                measure_cpu: 0.0,
                link: None,
                link_raw: None,
                receiver: None,
                first_span: None,
                free_cores: None,
                observed: vec![None; count],
                window: Window::open(count, 0, cpu::idle_seconds()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The codec for the next batch. `delivered_bytes` says how many bytes the destination
    /// has acknowledged so far (where the stack cannot tell, the bytes written); it is
    /// asked only when the link is measured, as asking may cost a system call per
    /// connection.
    pub fn choose(&self, pipeline: Pipeline, delivered_bytes: &dyn Fn() -> u64) -> Choice {
        let mut acknowledged = None;
        let mut delivered = || *acknowledged.get_or_insert_with(delivered_bytes);
        let mut state = self.lock();
        state.batches += 1;
        state.window.batches += 1;
        state.window.full += u32::from(pipeline.link_full);
        state.window.receiver_bound += u32::from(pipeline.receiver_bound);
        state.window.scanner_ahead += u32::from(pipeline.scanner_ahead);
        if state.window.start.elapsed() >= WINDOW {
            self.close_window(&mut state, delivered());
        }
        if state.link.is_none() {
            // A receiver that holds the sender back is not the link.
            let link_full = pipeline.link_full && !pipeline.receiver_bound;
            first_link(&mut state, link_full, if link_full { delivered() } else { 0 });
        }
        // Every choice is measured on the same pages: on the first batches until each has
        // a measurement (meanwhile pages go raw), then on one batch in `MEASURE_EVERY`
        // within `MEASURE_BUDGET`. Measuring them on different batches compared them on
        // different data: an idle guest's regions pack from 1x to 80x.
        let unmeasured = state.estimates.iter().any(|e| e.samples == 0);
        let due = state.batches - state.measured_at >= MEASURE_EVERY
            && state.measure_cpu <= MEASURE_BUDGET * state.worker_cpu;
        let measure = unmeasured || due;
        if measure {
            state.measured_at = state.batches;
        }
        let best = if unmeasured { 0 } else { self.best(&state) };
        state.window.chosen[best] += 1;
        Choice { codec: self.choices[best], measure }
    }

    /// Ends the window: the link's rate (if it was full throughout) and the free cores.
    fn close_window(&self, state: &mut State, delivered_bytes: u64) {
        let window = &state.window;
        let seconds = window.start.elapsed().as_secs_f64();
        // Only a window in which nearly every batch found the link holding writes back
        // measures it: the link then set the pace. A momentary queue in a window that the
        // scanner or the workers paced (sparse pages, a slow codec) would make a slow link.
        // A window the receiver held back measures the receiver instead, in guest bytes:
        // every choice moves at most that much through it.
        let full = window.batches >= 4 && window.full * 4 >= window.batches * 3;
        if window.batches >= 4 && window.receiver_bound * 4 >= window.batches * 3 {
            smooth(&mut state.receiver, window.guest_bytes / seconds);
        } else if full {
            let rate = delivered_bytes.saturating_sub(window.delivered_bytes) as f64 / seconds;
            smooth(&mut state.link, rate);
            if window.mostly(0) {
                smooth(&mut state.link_raw, rate);
            }
            state.receiver = None;
        }
        // A window sent (nearly) all with one choice, with the scanner ahead throughout,
        // shows what that choice moves: the workers or the link set the pace.
        if let Some(i) = self.sent_with(window) {
            smooth(&mut state.observed[i], window.guest_bytes / seconds);
        }
        // What a choice was seen to do fades toward what the model says while it is not
        // used (by half in about 35 windows): the data and the link change. So does the
        // link's rate for raw pages toward the link's.
        if state.window.chosen[0] == 0 {
            if let (Some(raw), Some(link)) = (&mut state.link_raw, state.link) {
                *raw += FADE * (link - *raw);
            }
        }
        for i in 0..self.choices.len() {
            if state.window.chosen[i] == 0 {
                let model = self.model(state, i);
                if let Some(seen) = &mut state.observed[i] {
                    *seen += FADE * (model - *seen);
                }
            }
        }
        let idle_now = cpu::idle_seconds();
        if let (Some(before), Some(now)) = (window.idle_at_start, idle_now) {
            let idle_cores = (now - before).max(0.0) / seconds;
            let mut cores = window.worker_cpu / seconds + idle_cores;
            if self.beside_pollers() && window.worker_wall > 0.0 {
                // Our polling cores keep their CPUs busy whether or not they have work, so
                // the machine never looks idle beside them; what the workers got of a CPU
                // while they had work says what they can have.
                cores = cores.max(self.workers as f64 * window.worker_cpu / window.worker_wall);
            }
            smooth(&mut state.free_cores, cores.min(self.workers as f64));
        }
        self.log_window(state, seconds);
        state.window = Window::open(self.choices.len(), delivered_bytes, idle_now);
    }

    /// What the window saw and what the policy makes of it now, for whoever tunes a link
    /// (`-vv`; twenty lines a second, so not at `-v`): a codec chosen where sending pages
    /// raw would move more shows here first.
    fn log_window(&self, state: &State, seconds: f64) {
        if !log::log_enabled!(log::Level::Trace) {
            return;
        }
        let window = &state.window;
        let mb = |rate: Option<f64>| rate.map_or("-".to_string(), |r| format!("{:.0}", r / 1e6));
        let chosen: Vec<String> = (0..self.choices.len())
            .filter(|&i| window.chosen[i] > 0)
            .map(|i| format!("{}x{}", self.choices[i], window.chosen[i]))
            .collect();
        let bounds: Vec<String> = (0..self.choices.len())
            .map(|i| format!("{} {}/{}", self.choices[i], mb(Some(self.model(state, i))), mb(state.observed[i])))
            .collect();
        log::trace!(
            "adaptive: {:.0} ms, {} batches ({} link full, {} receiver-bound, {} scanner ahead), chose {}; \
             link {} MB/s, receiver {} MB/s, free cores {}; model/seen MB/s: {}",
            seconds * 1e3,
            window.batches,
            window.full,
            window.receiver_bound,
            window.scanner_ahead,
            chosen.join(" "),
            mb(state.link),
            mb(state.receiver),
            state.free_cores.map_or("-".to_string(), |c| format!("{c:.2}")),
            bounds.join(", ")
        );
    }

    /// The choice `window` was sent with, if (nearly) all of it was, the scanner ahead: the
    /// workers or the link set the pace.
    fn sent_with(&self, window: &Window) -> Option<usize> {
        if window.batches < 8 || window.scanner_ahead * 4 < window.batches * 3 {
            return None;
        }
        (0..self.choices.len()).find(|&i| window.mostly(i))
    }

    /// Whether the workers share CPUs with this process's polling dataplane cores (more
    /// pollers and workers than CPUs). Pollers on CPUs of their own (a dedicated NIC core)
    /// leave the workers the machine's idle CPUs to count.
    fn beside_pollers(&self) -> bool {
        let pollers = transport::pin::pollers();
        // The process's cores, not this (pinned) worker's one.
        pollers > 0 && pollers + self.workers > transport::pin::core_count()
    }

    /// Guest bytes per second each choice could move; the index of the largest, with
    /// sending pages as they are kept unless a codec promises `CODEC_MARGIN` more.
    fn best(&self, state: &State) -> usize {
        let throughput = |i: usize| {
            let model = self.model(state, i);
            state.observed[i].map_or(model, |seen| model.min(seen))
        };
        let best_codec =
            (2..self.choices.len()).fold(1, |best, i| if throughput(i) > throughput(best) { i } else { best });
        if throughput(best_codec) > CODEC_MARGIN * throughput(0) {
            best_codec
        } else {
            0
        }
    }

    /// What choice `i` could move, by the model: the smallest of what the free cores can
    /// process with it, what the link can carry at its ratio, and what the receiver takes.
    fn model(&self, state: &State, i: usize) -> f64 {
        // Until the link has been seen full, sending uncompressed is the way to fill it.
        let link = if i == 0 { state.link_raw.or(state.link) } else { state.link };
        let link = link.unwrap_or(f64::INFINITY).max(1.0);
        let cores = state.free_cores.unwrap_or(self.workers as f64);
        let e = state.estimates[i];
        let ratio = if i == 0 { 1.0 } else { e.ratio().max(1.0) };
        (cores * e.rate()).min(link * ratio).min(state.receiver.unwrap_or(f64::INFINITY))
    }

    /// A batch's cost to its worker, whatever it was sent with: `input` guest bytes (pages
    /// not found zero or unchanged) in `cpu` of the worker's CPU time and `wall` of
    /// wall-clock time.
    pub fn account(&self, input: u64, cpu: Duration, wall: Duration) {
        let mut state = self.lock();
        state.window.guest_bytes += input as f64;
        state.worker_cpu += cpu.as_secs_f64();
        state.window.worker_cpu += cpu.as_secs_f64();
        state.window.worker_wall += wall.max(cpu).as_secs_f64();
    }

    /// What the policy chooses among.
    pub fn choices(&self) -> &[Codec] {
        &self.choices
    }

    /// A measurement: `codec` made `output` wire bytes of a batch's `input` guest bytes
    /// (its pages not found zero or unchanged) in `cpu` of a worker's CPU time.
    pub fn measure(&self, codec: Codec, input: u64, output: u64, cpu: Duration) {
        let Some(i) = self.choices.iter().position(|c| *c == codec) else { return };
        let mut state = self.lock();
        state.measure_cpu += cpu.as_secs_f64();
        if input == 0 || cpu.is_zero() {
            return;
        }
        let estimate = &mut state.estimates[i];
        let keep = 1.0 - SMOOTHING;
        estimate.input = keep * estimate.input + input as f64;
        estimate.output = keep * estimate.output + output as f64;
        estimate.cpu = keep * estimate.cpu + cpu.as_secs_f64();
        estimate.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Codec = Codec::None;
    const ZSTD: Codec = Codec::Zstd { level: 1 };
    const SHUFFLE_ZSTD: Codec = Codec::ShuffleZstd { level: 1 };

    /// A pipeline whose link holds writes back.
    const FULL_LINK: Pipeline = Pipeline { link_full: true, scanner_ahead: true, receiver_bound: false };

    /// `policy`'s choice for `pipeline`, `delivered_bytes` acknowledged so far.
    fn choose(policy: &AdaptivePolicy, pipeline: Pipeline, delivered_bytes: u64) -> Choice {
        policy.choose(pipeline, &|| delivered_bytes)
    }

    /// The index of `codec` among the choices.
    fn index(codec: Codec) -> usize {
        Codec::ADAPTIVE_CHOICES.iter().position(|c| *c == codec).unwrap()
    }

    /// A policy that has measured, per worker CPU-second, raw sending at 10 GB/s, lz4 at
    /// `lz4` bytes/s with ratio 2 and zstd at `zstd` with ratio 3 (each after a shuffle at
    /// nine tenths of the rate and of the ratio, lz4 after a bit shuffle at eight tenths:
    /// the data is not numeric), with `cores` free cores and a link seen at `link` bytes/s.
    fn policy(cores: f64, lz4: f64, zstd: f64, link: f64) -> AdaptivePolicy {
        let policy = AdaptivePolicy::new(2);
        let second = Duration::from_secs(1);
        policy.measure(NONE, 10_000_000_000, 10_000_000_000, second);
        policy.measure(Codec::Lz4, lz4 as u64, lz4 as u64 / 2, second);
        policy.measure(ZSTD, zstd as u64, zstd as u64 / 3, second);
        let (lz4, zstd) = (0.9 * lz4, 0.9 * zstd);
        policy.measure(Codec::ShuffleLz4, lz4 as u64, (lz4 / 1.8) as u64, second);
        policy.measure(SHUFFLE_ZSTD, zstd as u64, (zstd / 2.7) as u64, second);
        let bit_lz4 = 0.8 * lz4 / 0.9;
        policy.measure(Codec::BitShuffleLz4, bit_lz4 as u64, (bit_lz4 / 1.6) as u64, second);
        let mut state = policy.lock();
        state.link = Some(link);
        state.free_cores = Some(cores);
        // No window closes during the test (it would measure this machine).
        state.window.start = Instant::now() + Duration::from_secs(3600);
        drop(state);
        policy
    }

    /// Each of `measurements` (codec, guest bytes in, wire bytes out, per CPU-second) 50
    /// times: enough to outweigh what `policy` measured before.
    fn measure_often(policy: &AdaptivePolicy, measurements: &[(Codec, u64, u64)]) {
        for _ in 0..50 {
            for &(codec, input, output) in measurements {
                policy.measure(codec, input, output, Duration::from_secs(1));
            }
        }
    }

    fn steady_choice(policy: &AdaptivePolicy) -> Codec {
        choose(policy, FULL_LINK, 0).codec
    }

    #[test]
    fn a_slow_link_gets_the_tightest_codec_the_cores_can_feed() {
        // 125 MB/s (1 Gbit/s): zstd's 2 x 400 MB/s outruns 125 x 3.
        assert_eq!(steady_choice(&policy(2.0, 1e9, 4e8, 1.25e8)), ZSTD);
    }

    /// Closes a 50 ms window of 8 batches, all finding the link full, `receiver_bound` of
    /// them held back by the receiver, in which the workers handled `guest_bytes` and the
    /// destination acknowledged `acknowledged` wire bytes.
    fn close_full_window(policy: &AdaptivePolicy, receiver_bound: u32, guest_bytes: f64, acknowledged: u64) {
        let mut state = policy.lock();
        let window = &mut state.window;
        (window.batches, window.full, window.receiver_bound) = (8, 8, receiver_bound);
        window.guest_bytes = guest_bytes;
        window.start = Instant::now() - Duration::from_millis(50);
        let delivered = window.delivered_bytes + acknowledged;
        policy.close_window(&mut state, delivered);
        state.window.start = Instant::now() + Duration::from_secs(3600);
    }

    #[test]
    fn a_receiver_slower_than_the_link_gets_pages_as_they_are() {
        // The link alone would get zstd (as above). But the destination takes 5 MB of
        // guest bytes per 50 ms (100 MB/s) whatever they are packed as, and acknowledged
        // half as many wire bytes: a link measured from them would look half as fast.
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        close_full_window(&policy, 8, 5e6, 2_500_000);
        assert_eq!(policy.lock().link, Some(1.25e8), "a receiver's window does not measure the link");
        assert_eq!(steady_choice(&policy), NONE, "every choice moves what the receiver takes");
        // Once the link, not the receiver, holds the sender back, the link decides again.
        close_full_window(&policy, 0, 5e6, 6_250_000);
        assert_eq!(policy.lock().receiver, None);
        assert_eq!(steady_choice(&policy), ZSTD);
    }

    #[test]
    fn a_receiver_faster_than_what_the_link_carries_leaves_the_codec_to_the_link() {
        // The receiver takes 1 GB/s of guest bytes: zstd's 125 MB/s x 3 stays under it.
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        close_full_window(&policy, 8, 5e7, 6_250_000);
        assert_eq!(steady_choice(&policy), ZSTD);
    }

    #[test]
    fn a_compression_device_is_one_more_choice_measured_like_the_others() {
        // What a device's deflate costs the worker is what it was measured to cost: a
        // device that packs tighter than zstd at zstd's CPU price wins a slow link...
        let with_device = |rate: f64, ratio: f64| {
            let policy = AdaptivePolicy::with_choices(2, [&Codec::ADAPTIVE_CHOICES[..], &[Codec::Deflate]].concat());
            let second = Duration::from_secs(1);
            policy.measure(NONE, 10_000_000_000, 10_000_000_000, second);
            policy.measure(Codec::Lz4, 1_000_000_000, 500_000_000, second);
            policy.measure(ZSTD, 400_000_000, 133_000_000, second);
            policy.measure(Codec::ShuffleLz4, 900_000_000, 500_000_000, second);
            policy.measure(SHUFFLE_ZSTD, 360_000_000, 133_000_000, second);
            policy.measure(Codec::BitShuffleLz4, 700_000_000, 440_000_000, second);
            policy.measure(Codec::Deflate, rate as u64, (rate / ratio) as u64, second);
            let mut state = policy.lock();
            (state.link, state.free_cores) = (Some(1.25e8), Some(2.0));
            state.window.start = Instant::now() + Duration::from_secs(3600);
            drop(state);
            steady_choice(&policy)
        };
        assert_eq!(with_device(4e8, 3.5), Codec::Deflate);
        // ...and one slower than the link needs, or looser, does not.
        assert_eq!(with_device(5e7, 3.5), ZSTD);
        assert_eq!(with_device(4e8, 2.5), ZSTD);
        // The default policy never offers it.
        assert!(!AdaptivePolicy::new(2).choices().contains(&Codec::Deflate));
    }

    /// 16 random bits in 32-bit words, as each choice measured them (guest bytes in and
    /// wire bytes out per worker CPU-second): lz4 finds nothing (1.0x), zstd a little
    /// (1.4x), after the shuffle both come near the bound (lz4 1.9x at its speed, zstd
    /// 1.95x); the bit shuffle finds the same two zero bytes as the byte shuffle, slower.
    const NUMERIC: &[(Codec, u64, u64)] = &[
        (Codec::Lz4, 1_000_000_000, 1_000_000_000),
        (ZSTD, 400_000_000, 285_000_000),
        (Codec::ShuffleLz4, 900_000_000, 473_000_000),
        (SHUFFLE_ZSTD, 300_000_000, 154_000_000),
        (Codec::BitShuffleLz4, 600_000_000, 320_000_000),
    ];

    #[test]
    fn numeric_pages_get_the_shuffle() {
        let numeric = |link: f64| {
            let policy = policy(2.0, 1e9, 4e8, link);
            measure_often(&policy, NUMERIC);
            steady_choice(&policy)
        };
        // 1 Gbit/s: the tighter shuffle (244 MB/s of guest memory against 237 and zstd's 175).
        assert_eq!(numeric(1.25e8), SHUFFLE_ZSTD);
        // 4 Gbit/s: two cores of zstd move 600 MB/s, of the shuffle and lz4 950.
        assert_eq!(numeric(5e8), Codec::ShuffleLz4);
    }

    #[test]
    fn numbers_of_few_bits_get_the_bit_shuffle() {
        // 12 random bits in 32-bit words (bound 2.67x): the byte shuffle leaves half of the
        // second byte plane random (lz4 1.5x), the bit shuffle 20 zero bit planes (2.5x).
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        measure_often(
            &policy,
            &[
                (Codec::Lz4, 1_000_000_000, 1_000_000_000),
                (ZSTD, 400_000_000, 250_000_000),
                (Codec::ShuffleLz4, 900_000_000, 600_000_000),
                (SHUFFLE_ZSTD, 300_000_000, 140_000_000),
                (Codec::BitShuffleLz4, 600_000_000, 240_000_000),
            ],
        );
        assert_eq!(steady_choice(&policy), Codec::BitShuffleLz4);
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
            policy.measure(Codec::Lz4, 1 << 20, 1 << 20, Duration::from_micros(250));
            policy.measure(Codec::ShuffleLz4, 1 << 20, 1 << 20, Duration::from_micros(280));
            policy.measure(Codec::BitShuffleLz4, 1 << 20, 1 << 20, Duration::from_micros(400));
        }
        assert_eq!(steady_choice(&policy), NONE);
    }

    #[test]
    fn batches_weigh_by_their_bytes() {
        let policy = AdaptivePolicy::new(2);
        let batch = 64 << 12;
        for _ in 0..10 {
            policy.measure(Codec::Lz4, batch, batch, Duration::from_micros(200));
        }
        // One page that packs 80x, alone in its batch.
        policy.measure(Codec::Lz4, 4096, 51, Duration::from_micros(4));
        let ratio = policy.lock().estimates[index(Codec::Lz4)].ratio();
        assert!(ratio < 1.02, "{ratio}");
    }

    #[test]
    fn pages_go_raw_until_every_choice_is_measured_then_all_are_measured_now_and_then() {
        let policy = AdaptivePolicy::new(2);
        let raw_and_measured = Choice { codec: NONE, measure: true };
        assert_eq!(choose(&policy, Pipeline::default(), 0), raw_and_measured);
        policy.measure(NONE, 1 << 20, 1 << 20, Duration::from_micros(100));
        policy.measure(Codec::Lz4, 1 << 20, 1 << 19, Duration::from_millis(1));
        assert_eq!(choose(&policy, Pipeline::default(), 0), raw_and_measured, "zstd not measured yet");
        policy.measure(ZSTD, 1 << 20, 1 << 18, Duration::from_millis(3));
        policy.measure(Codec::ShuffleLz4, 1 << 20, 1 << 19, Duration::from_millis(1));
        assert_eq!(choose(&policy, Pipeline::default(), 0), raw_and_measured, "shuffle-zstd not measured yet");
        policy.measure(SHUFFLE_ZSTD, 1 << 20, 1 << 18, Duration::from_millis(3));
        assert_eq!(choose(&policy, Pipeline::default(), 0), raw_and_measured, "bitshuffle-lz4 not measured yet");
        policy.measure(Codec::BitShuffleLz4, 1 << 20, 1 << 19, Duration::from_millis(2));
        // The link not yet seen full: raw, every choice measured on one batch in 64 while
        // measuring stays within its share of the workers' CPU.
        policy.account(0, Duration::from_secs(1), Duration::from_secs(1));
        let choices: Vec<Choice> = (0..4 * MEASURE_EVERY).map(|_| choose(&policy, Pipeline::default(), 0)).collect();
        assert!(choices.iter().all(|c| c.codec == NONE), "{choices:?}");
        assert_eq!(choices.iter().filter(|c| c.measure).count(), 4, "{choices:?}");
        // Measuring took more than its share: it waits until the work catches up.
        policy.measure(ZSTD, 1 << 20, 1 << 18, Duration::from_millis(100));
        assert!((0..4 * MEASURE_EVERY).all(|_| !choose(&policy, Pipeline::default(), 0).measure));
        policy.account(0, Duration::from_secs(5), Duration::from_secs(5));
        assert!((0..MEASURE_EVERY).any(|_| choose(&policy, Pipeline::default(), 0).measure));
    }

    #[test]
    fn the_link_is_measured_only_while_it_holds_writes_back() {
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        // A window of batches `waiting` of which found the link full, `bytes` acknowledged.
        let window = |batches: u32, waiting: u32, bytes: u64| {
            let start = Instant::now() - Duration::from_secs(1);
            let mut state = policy.lock();
            state.window =
                Window { start, batches, full: waiting, ..Window::open(Codec::ADAPTIVE_CHOICES.len(), 0, None) };
            drop(state);
            choose(&policy, FULL_LINK, bytes);
            policy.lock().link.unwrap()
        };
        // The link idled through most of the window (the scanner or the codecs set the
        // pace): says nothing, however few bytes went.
        assert_eq!(window(20, 10, 1_000), 1.25e8);
        // The link was full throughout: its rate.
        assert!(window(20, 19, 1_000_000_000) > 1.25e8);
    }

    #[test]
    fn the_link_is_first_measured_by_what_was_acknowledged_once_the_rate_settles() {
        // Every choice measured (lz4 packs 2x at 1 GB/s a core), the link not yet seen.
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        policy.lock().link = None;
        let idle_link = Pipeline { link_full: false, scanner_ahead: true, receiver_bound: false };
        assert_eq!(choose(&policy, FULL_LINK, 0).codec, NONE, "until the link is seen full, pages go raw");
        // A batch that found the link keeping up ends the span.
        choose(&policy, idle_link, 0);
        assert!(policy.lock().first_span.is_none());
        choose(&policy, FULL_LINK, 1_000_000);
        assert!(policy.lock().first_span.is_some());
        // A span of 10 ms full, in which 0.5 MB were acknowledged (however many the
        // socket took in); then TCP's window opens and 1.25 MB go in the next 10 ms; then
        // 1.3 MB: the rate has settled at some 130 MB/s.
        let mut acknowledged = 1_000_000;
        for (bytes, settled) in [(500_000, false), (1_250_000, false), (1_300_000, true)] {
            policy.lock().first_span.as_mut().unwrap().start = Instant::now() - Duration::from_millis(10);
            acknowledged += bytes;
            let choice = choose(&policy, FULL_LINK, acknowledged);
            let link = policy.lock().link;
            assert_eq!(link.is_some(), settled, "after {bytes} bytes: {link:?}");
            if let Some(link) = link {
                assert!((1.2e8..1.31e8).contains(&link), "{link}");
                assert_eq!(choice.codec, ZSTD, "the link is the limit: the tightest codec the cores can feed");
            }
        }
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
        choose(&policy, Pipeline::default(), 0);
        assert_eq!(policy.lock().free_cores.map(|c| (c * 100.0).round() / 100.0), Some(0.5));
        {
            let mut state = policy.lock();
            state.free_cores = None;
            state.window.start = Instant::now() - Duration::from_secs(1);
            state.window.worker_cpu = 0.5;
            // 100 idle CPU-seconds in one second: capped at one core per worker.
            state.window.idle_at_start = cpu::idle_seconds().map(|s| s - 100.0);
        }
        choose(&policy, Pipeline::default(), 0);
        assert_eq!(policy.lock().free_cores, Some(2.0));
    }

    #[test]
    fn beside_polling_cores_free_cores_are_the_share_the_workers_got() {
        // As many polling cores as CPUs: the workers share with them whatever the machine.
        let _pollers: Vec<_> =
            (0..transport::pin::core_count()).map(|_| transport::pin::PollingCore::register()).collect();
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        {
            let mut state = policy.lock();
            state.free_cores = None;
            state.window.start = Instant::now() - Duration::from_secs(1);
            // Busy 0.3 CPU-seconds in batches that took 0.9 s: a third of a CPU each.
            state.window.worker_cpu = 0.3;
            state.window.worker_wall = 0.9;
            state.window.idle_at_start = cpu::idle_seconds().map(|s| s + 1e6);
        }
        choose(&policy, Pipeline::default(), 0);
        let free = policy.lock().free_cores.unwrap();
        assert!((free - 2.0 / 3.0).abs() < 0.01, "{free}");
    }

    #[test]
    fn a_codec_seen_moving_less_than_promised_gives_way() {
        // At 1 Gbit/s the model puts zstd (0.375 GB/s) ahead of lz4 (0.25 GB/s)...
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        assert_eq!(steady_choice(&policy), ZSTD);
        // ...but a window sent with zstd, the scanner ahead throughout, moved 0.2 GB/s. The
        // next best by the model (here zstd after a shuffle, at 2.7x) takes over.
        assert_eq!(window_sent_with(&policy, ZSTD, None, 2e8), SHUFFLE_ZSTD);
        assert!(policy.lock().observed[index(ZSTD)].is_some_and(|seen| (seen - 2e8).abs() < 1e6));
    }

    /// Closes a one-second window of 20 batches, the scanner ahead throughout, all sent
    /// with `codec`, in which the workers handled `guest_bytes`; where `acknowledged` is
    /// given, the link was full throughout and the destination acknowledged that much.
    /// Returns the next choice.
    fn window_sent_with(policy: &AdaptivePolicy, codec: Codec, acknowledged: Option<u64>, guest_bytes: f64) -> Codec {
        {
            let mut state = policy.lock();
            let start = Instant::now() - Duration::from_secs(1);
            let full = if acknowledged.is_some() { 20 } else { 0 };
            state.window = Window {
                start,
                batches: 20,
                full,
                scanner_ahead: 20,
                guest_bytes,
                ..Window::open(Codec::ADAPTIVE_CHOICES.len(), 0, None)
            };
            state.window.chosen[index(codec)] = 20;
        }
        let choice = choose(policy, FULL_LINK, acknowledged.unwrap_or(0)).codec;
        policy.lock().window.start = Instant::now() + Duration::from_secs(3600);
        choice
    }

    #[test]
    fn raw_pages_are_priced_at_the_link_they_leave_by() {
        // Numeric pages over our stack on two CPUs: the link moved 1.26 GB/s of raw pages,
        // then, while the codecs took its CPU, 0.6 GB/s. By the link measured then, the
        // shuffle (1.9x at 0.9 GB/s a core, 1.3 cores: 1.14 GB/s) beats raw...
        let policy = policy(1.3, 1e9, 4e8, 1.26e9);
        measure_often(&policy, NUMERIC);
        {
            let mut state = policy.lock();
            (state.link_raw, state.link) = (Some(1.26e9), Some(6e8));
        }
        // ...but raw pages leave by the link they were seen at: raw it is.
        assert_eq!(steady_choice(&policy), NONE);
        // Without that measure, the link's one decides.
        policy.lock().link_raw = None;
        assert_eq!(steady_choice(&policy), Codec::ShuffleLz4);
    }

    #[test]
    fn the_link_for_raw_pages_is_measured_in_windows_sent_raw_and_fades_in_others() {
        let policy = policy(2.0, 1e9, 4e8, 1.25e8);
        let link = |policy: &AdaptivePolicy| {
            let state = policy.lock();
            (state.link.unwrap(), state.link_raw.unwrap_or(0.0))
        };
        // The first measurement is taken raw: both.
        policy.lock().link_raw = Some(1.25e8);
        // A window sent raw: both move toward what it moved (smoothed; the window took a
        // little over its second).
        let near = |value: f64, expected: f64| (value - expected).abs() < 0.01 * expected;
        window_sent_with(&policy, NONE, Some(2_250_000_000), 2.25e9);
        let (all, raw) = link(&policy);
        assert!(near(all, 5.5e8) && near(raw, 5.5e8), "{all} {raw}");
        // A window compressed: the link only; the raw link fades toward it.
        window_sent_with(&policy, ZSTD, Some(125_000_000), 3.75e8);
        let (all, raw) = link(&policy);
        assert!(near(all, 4.65e8), "{all}");
        assert!(near(raw, 5.5e8 + FADE * (4.65e8 - 5.5e8)) && raw > 5.4e8, "{raw}");
    }
}
