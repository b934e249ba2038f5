//! The scanner, on the caller's thread: drives the session machine
//! (`migration::source_session`), syncs the dirty log, hands the rounds' pages to the
//! workers and records what each round did.

use crate::error::LimitExceeded;
use crate::verify::memory_digest;
use crate::vm::{LogCoverage, SourceVm};
use crate::MigrationError;
use migration::dirty::{bitmap_words, for_each_set_bit};
use migration::frame::{FrameKind, MAX_PAYLOAD_BYTES};
use migration::handshake::Hello;
use migration::memory::pages_of;
use migration::page_batch::MAX_ENTRIES_PER_BATCH;
use migration::precopy::{Precopy, RoundReport};
use migration::source_session::{SourceAction, SourceOutcome, SourceSession, Stage};
use migration::stats::{mbps, EncodeCounters, MigrationStats, RoundStats};
use migration::PAGE_SIZE_BYTES;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use transport::pin;

use super::{stop_workers, Progress, PROGRESS_INTERVAL};
use super::{Job, Outgoing, Shared};

/// The name the final round is recorded and reported under.
const STOP_AND_COPY: &str = "stop-and-copy";

/// Moments of the switchover, for the statistics.
#[derive(Default)]
struct Switchover {
    /// Bytes written before the guest stopped.
    precopy_bytes: u64,
    downtime_start: Option<Instant>,
    /// When the destination's `Resumed` had come (the scanner's first action after it).
    resumed_at: Option<Instant>,
    /// Bytes written from the guest's stop until then.
    downtime_bytes: u64,
}

impl Switchover {
    fn resumed(&mut self, wire_bytes: u64) {
        if self.resumed_at.is_none() {
            self.resumed_at = Some(Instant::now());
            self.downtime_bytes = wire_bytes.saturating_sub(self.precopy_bytes);
        }
    }
}

/// The scanner: runs the rounds on the calling thread.
pub(super) struct Scanner<'s, 'a> {
    shared: &'s Shared<'a>,
    vm: &'s dyn SourceVm,
    hello: &'s Hello,
    started: Instant,
    setup_time: Duration,
    progress: &'s mut dyn FnMut(&Progress),
    bitmaps: Vec<Vec<u64>>,
    scratch: Vec<Vec<u64>>,
    next_connection: usize,
    /// The round being sent (or last sent): control frames carry it.
    epoch: u32,
    stats: MigrationStats,
    totals: EncodeCounters,
    last_progress: Instant,
    /// The stage of the last report: a new pre-copy stage is reported when it begins.
    last_reported_stage: &'static str,
    cleaned_up: bool,
    /// The round under way stopped handing out pages early (a switchover asked for): the
    /// pages it left are still set in the bitmaps.
    round_cut: bool,
}

impl<'s, 'a> Scanner<'s, 'a> {
    pub(super) fn new(
        shared: &'s Shared<'a>,
        vm: &'s dyn SourceVm,
        hello: &'s Hello,
        started: Instant,
        setup_time: Duration,
        progress: &'s mut dyn FnMut(&Progress),
    ) -> Self {
        let bitmaps: Vec<Vec<u64>> =
            hello.region_bytes.iter().map(|&b| vec![0u64; bitmap_words(pages_of(b))]).collect();
        let scratch = bitmaps.clone();
        Scanner {
            shared,
            vm,
            hello,
            started,
            setup_time,
            progress,
            bitmaps,
            scratch,
            next_connection: 0,
            epoch: 0,
            stats: MigrationStats::default(),
            totals: EncodeCounters::default(),
            last_progress: Instant::now(),
            last_reported_stage: "",
            cleaned_up: false,
            round_cut: false,
        }
    }

    fn check_abort(&self) -> Result<(), MigrationError> {
        if self.shared.abort.is_raised() {
            return Err(self.aborted());
        }
        Ok(())
    }

    /// Takes the dirty log into the bitmaps: replacing them, or adding to them.
    fn sync(&mut self, merge: bool) -> u64 {
        self.stats.ram.dirty_sync_count += 1;
        let log = self.vm.dirty_log();
        let mut dirty = 0;
        for (region, (bitmap, scratch)) in self.bitmaps.iter_mut().zip(&mut self.scratch).enumerate() {
            if merge {
                log.take_dirty(region, scratch);
                for (word, extra) in bitmap.iter_mut().zip(scratch.iter()) {
                    *word |= extra;
                }
            } else {
                log.take_dirty(region, bitmap);
            }
            dirty += bitmap.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        dirty
    }

    /// Hands out the pages set in the bitmaps as jobs of `epoch`, then waits until every job
    /// is encoded and queued, and closes the round on every connection.
    fn send_round(&mut self, epoch: u32, stage: &'static str, pages: u64) -> Result<(), MigrationError> {
        let shared = self.shared;
        let mut remaining = pages;
        // A switchover asked for cuts a pre-copy round short (never the stop-and-copy's).
        let tuning = shared.config.tuning.clone().filter(|_| stage != STOP_AND_COPY);
        self.round_cut = false;
        for region in 0..self.bitmaps.len() {
            let mut batch = shared.job_pool.take(|| Vec::with_capacity(MAX_ENTRIES_PER_BATCH));
            let mut failed = Ok(());
            // The first page the round did not hand out, when it was cut there.
            let mut cut_at = None;
            let mut bitmap = std::mem::take(&mut self.bitmaps[region]);
            for_each_set_bit(&bitmap, |page| {
                if failed.is_err() || cut_at.is_some() {
                    return;
                }
                batch.push(page as u32);
                if batch.len() == MAX_ENTRIES_PER_BATCH {
                    remaining -= batch.len() as u64;
                    let full = std::mem::replace(
                        &mut batch,
                        shared.job_pool.take(|| Vec::with_capacity(MAX_ENTRIES_PER_BATCH)),
                    );
                    failed = self.dispatch(epoch, region as u16, full);
                    self.maybe_report(epoch, stage, remaining);
                    if tuning.as_ref().is_some_and(|t| t.switchover_asked()) {
                        cut_at = Some(page + 1);
                    }
                }
            });
            if let Some(at) = cut_at {
                // What was handed out is sent; what was not stays dirty for the switchover.
                clear_below(&mut bitmap, at);
                self.bitmaps[..region].iter_mut().for_each(|sent| sent.fill(0));
                self.round_cut = true;
            }
            self.bitmaps[region] = bitmap;
            failed?;
            if batch.is_empty() {
                shared.job_pool.give(batch);
            } else {
                remaining -= batch.len() as u64;
                self.dispatch(epoch, region as u16, batch)?;
            }
            if self.round_cut {
                break;
            }
        }
        // Round barrier, source side: all of this round's batches are queued before any
        // connection gets its RoundEnd.
        while shared.jobs_in_flight.load(Ordering::Acquire) > 0 {
            self.check_abort()?;
            std::thread::sleep(Duration::from_micros(100));
        }
        self.check_abort()
    }

    /// Puts `RoundEnd` on every connection (the session machine already counts the round
    /// as closed, so its `RoundApplied` is never early).
    fn close_round(&self, epoch: u32) -> Result<(), MigrationError> {
        for ring in &self.shared.links.outgoing {
            ring.push(Outgoing::RoundEnd { epoch }, &self.shared.abort).map_err(|_| self.aborted())?;
        }
        Ok(())
    }

    fn aborted(&self) -> MigrationError {
        let abort = &self.shared.abort;
        MigrationError::Aborted { reason: abort.reason().unwrap_or_else(|| "aborted".into()), kind: abort.kind() }
    }

    fn dispatch(&mut self, epoch: u32, region: u16, pages: Vec<u32>) -> Result<(), MigrationError> {
        let connection = self.next_connection;
        self.next_connection = (self.next_connection + 1) % self.shared.links.outgoing.len();
        self.shared.jobs_in_flight.fetch_add(1, Ordering::AcqRel);
        if self.shared.jobs.push(Some(Job { epoch, region, pages, connection }), &self.shared.abort).is_err() {
            self.shared.jobs_in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(self.aborted());
        }
        Ok(())
    }

    fn maybe_report(&mut self, round: u32, stage: &'static str, remaining_pages: u64) {
        // An operator's new bandwidth cap takes effect at once.
        let tuning = self.shared.config.tuning.as_ref();
        if let (Some(rate), Some(limiter)) = (tuning.and_then(|t| t.take_max_bandwidth()), &self.shared.links.limiter) {
            limiter.set_rate(rate);
        }
        // A stage is reported as it begins, not up to an interval later: an operator (or a
        // cancel tied to a stage) sees a short bulk stage too. Stop-and-copy is left to the
        // interval, keeping the callback out of the downtime.
        let new_stage = stage != self.last_reported_stage && stage != STOP_AND_COPY;
        if !new_stage && self.last_progress.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last_progress = Instant::now();
        self.last_reported_stage = stage;
        let elapsed = self.started.elapsed();
        let transferred_bytes = self.shared.links.wire_bytes.load(Ordering::Relaxed);
        let mut encoded = self.totals;
        encoded.merge(&self.shared.round_counters.lock().unwrap_or_else(|p| p.into_inner()));
        let (expected_downtime, downtime_limit) = {
            let session = self.session();
            (session.precopy().expected_downtime(), session.precopy().downtime_limit())
        };
        (self.progress)(&Progress {
            round,
            stage,
            remaining_pages,
            transferred_bytes,
            mbps: mbps(transferred_bytes, elapsed.as_secs_f64()),
            elapsed,
            encoded,
            expected_downtime,
            downtime_limit,
            dirty_pages_rate: self.stats.ram.dirty_pages_rate,
        });
    }

    fn take_round_counters(&mut self) -> EncodeCounters {
        let counters = std::mem::take(&mut *self.shared.round_counters.lock().unwrap_or_else(|p| p.into_inner()));
        self.totals.merge(&counters);
        counters
    }

    fn record_round(
        &mut self,
        round: u32,
        stage: &'static str,
        duration: Duration,
        counters: &EncodeCounters,
        dirty_after: u64,
        precopy: Option<&Precopy>,
    ) {
        self.stats.rounds.push(RoundStats {
            round,
            stage,
            duration_ms: duration.as_secs_f64() * 1e3,
            pages: counters.pages(),
            transferred: counters.wire_bytes,
            zero_pages: counters.zero_pages,
            xbzrle_pages: counters.xbzrle_pages,
            compressed_pages: counters.compressed_pages,
            raw_pages: counters.raw_pages,
            dirty_pages_after: dirty_after,
            mbps: mbps(counters.wire_bytes, duration.as_secs_f64()),
            expected_downtime_ms: precopy.map_or(0.0, |p| p.expected_downtime().as_secs_f64() * 1e3),
            throttle_pct: precopy.map_or(0, |p| p.throttle_pct()),
        });
    }

    fn now(&self) -> Duration {
        self.shared.clock.elapsed()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, SourceSession> {
        self.shared.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the session machine may have something to do: an answer came, or it is
    /// time to check its deadline.
    fn wait_for_session(&self, wake: &mpsc::Receiver<()>) -> Result<(), MigrationError> {
        // The channel before the abort flag: the destination closes its end right after its
        // last answer, and the reader may report that closing before we have acted on it.
        match wake.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.check_abort()?;
                Ok(self.session().handle_timeout(self.now())?)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The reader has raised the abort with its reason (or is about to).
                std::thread::sleep(Duration::from_millis(5));
                self.check_abort()?;
                Err(MigrationError::Io {
                    connection: 0,
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the destination's answers stopped"),
                })
            }
        }
    }

    fn control(&self, kind: FrameKind, epoch: u32, payload: Vec<u8>) -> Result<(), MigrationError> {
        self.shared.links.outgoing[0]
            .push(Outgoing::Control { kind, epoch, payload }, &self.shared.abort)
            .map_err(|_| self.aborted())
    }

    /// Drives the session machine (`migration::source_session`) to its end: does each
    /// thing it asks, and feeds it what came of it.
    pub(super) fn run(
        &mut self,
        paused: &mut bool,
        wake: &mpsc::Receiver<()>,
        workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>,
    ) -> Result<MigrationStats, MigrationError> {
        let mut pages = self.bulk_pages();
        let mut switchover = Switchover::default();
        loop {
            let action = self.session().poll_action();
            let Some(action) = action else {
                self.wait_for_session(wake)?;
                continue;
            };
            match action {
                SourceAction::SendRound { epoch, stage } => pages = self.precopy_round(epoch, stage, pages)?,
                SourceAction::SetThrottle { pct } => self.vm.set_throttle(pct),
                SourceAction::StopAndCopy { epoch } => {
                    switchover.precopy_bytes = self.shared.links.wire_bytes.load(Ordering::Relaxed);
                    // The downtime window starts here.
                    switchover.downtime_start = Some(Instant::now());
                    *paused = true;
                    self.stop_and_copy(epoch, workers)?;
                }
                SourceAction::Send(message) => self.control(message.kind(), self.epoch, message.payload())?,
                SourceAction::HashMemory => {
                    switchover.resumed(self.shared.links.wire_bytes.load(Ordering::Relaxed));
                    // The source's paused memory is hashed only now: hashing it while the
                    // destination hashes its own would compete for the same cores and
                    // lengthen the downtime.
                    let digest = memory_digest(self.shared.memory, pin::core_count());
                    let now = self.now();
                    self.session().handle_digest(digest, now);
                }
                SourceAction::Finish(outcome) => {
                    switchover.resumed(self.shared.links.wire_bytes.load(Ordering::Relaxed));
                    // Teardown, after the switchover.
                    self.cleanup(workers, false);
                    return Ok(self.final_stats(outcome, &switchover));
                }
            }
        }
    }

    /// The bulk stage's pages: those written since boot where the VMM's log covers the
    /// guest's whole life, or every page.
    fn bulk_pages(&mut self) -> u64 {
        let config = self.shared.config;
        let total_pages: u64 = self.hello.region_bytes.iter().map(|&b| pages_of(b)).sum();
        let used = self.sync(false);
        let since_boot = self.vm.log_coverage() == LogCoverage::SinceBoot;
        if config.skip_unused && !since_boot {
            log::info!("the VMM's dirty log does not cover the guest since boot: every page goes in the bulk stage");
        }
        let bulk_pages = if config.skip_unused && since_boot {
            used
        } else {
            for bitmap in &mut self.bitmaps {
                bitmap.fill(u64::MAX);
            }
            for (bitmap, &bytes) in self.bitmaps.iter_mut().zip(&self.hello.region_bytes) {
                let pages = pages_of(bytes);
                if !pages.is_multiple_of(64) {
                    if let Some(last) = bitmap.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
            }
            total_pages
        };
        self.stats.ram.skipped = total_pages - bulk_pages;
        // QEMU keeps the bulk stage out of the XBZRLE cache, so a cache smaller than the
        // guest is not flushed by pages that may never change again. When the cache holds
        // every bulk page there is nothing to flush: cache them, and the first re-sent
        // pages already go as deltas.
        if let Some(cache) = &self.shared.cache {
            let fits = cache.size_bytes() >= bulk_pages * PAGE_SIZE_BYTES as u64;
            self.shared.cache_bulk.store(fits, Ordering::Relaxed);
        }
        bulk_pages
    }

    /// Sends `pages` (set in the bitmaps) as round `epoch`, closes it, syncs the dirty log
    /// and tells the session machine what the round measured. Returns the next round's
    /// pages.
    fn precopy_round(&mut self, epoch: u32, stage: Stage, pages: u64) -> Result<u64, MigrationError> {
        self.epoch = epoch;
        let stage = stage.name();
        let round_start = Instant::now();
        let written_before = self.shared.links.wire_bytes.load(Ordering::Relaxed);
        self.send_round(epoch, stage, pages)?;
        self.close_round(epoch)?;
        let counters = self.take_round_counters();
        // A round cut short left pages to send: the new dirty pages join them.
        let dirty = self.sync(self.round_cut);
        let duration = round_start.elapsed();
        self.stats.ram.dirty_pages_rate = (dirty as f64 / duration.as_secs_f64().max(1e-6)) as u64;
        let backlog_bytes =
            self.totals.wire_bytes.saturating_sub(self.shared.links.page_bytes_written.load(Ordering::Relaxed));
        let report = RoundReport {
            duration,
            bytes_sent: self.shared.links.wire_bytes.load(Ordering::Relaxed) - written_before,
            pages_sent: counters.pages(),
            bytes_encoded: counters.wire_bytes,
            dirty_pages: dirty,
            backlog_bytes,
        };
        let now = self.now();
        let precopy = {
            let mut session = self.session();
            if let Some(tuning) = &self.shared.config.tuning {
                if let Some(limit) = tuning.take_downtime_limit() {
                    session.precopy_mut().set_downtime_limit(limit);
                }
                if tuning.switchover_asked() {
                    session.precopy_mut().request_switchover();
                }
            }
            session.handle_round_sent(report, now)?;
            session.precopy().clone()
        };
        log::debug!(
            round = epoch, stage, pages_sent = report.pages_sent, dirty_pages = dirty,
            ms = duration.as_millis() as u64; "round finished, expected downtime {:?}", precopy.expected_downtime()
        );
        self.record_round(epoch, stage, duration, &counters, dirty, Some(&precopy));
        self.maybe_report(epoch, stage, dirty);
        Ok(dirty)
    }

    /// Stop-and-copy, inside the downtime window: the guest stops, the last dirty pages and
    /// the device state go out as round `epoch`, and the round is closed.
    fn stop_and_copy(
        &mut self,
        epoch: u32,
        workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>,
    ) -> Result<(), MigrationError> {
        self.epoch = epoch;
        log::debug!(round = epoch; "stop-and-copy: pausing the guest");
        self.vm.pause();
        let final_pages = self.sync(true);
        let round_start = Instant::now();
        self.send_round(epoch, STOP_AND_COPY, final_pages)?;
        let device_state = self.vm.device_state();
        if device_state.len() > MAX_PAYLOAD_BYTES as usize {
            return Err(LimitExceeded::DeviceStateTooLarge {
                bytes: device_state.len(),
                limit: MAX_PAYLOAD_BYTES as usize,
            }
            .into());
        }
        if !self.shared.config.deferred_cleanup {
            self.cleanup(workers, true);
        }
        self.control(FrameKind::DeviceState, epoch, device_state)?;
        self.close_round(epoch)?;
        let now = self.now();
        self.session().handle_final_round_sent(now);
        let counters = self.take_round_counters();
        self.record_round(epoch, STOP_AND_COPY, round_start.elapsed(), &counters, 0, None);
        Ok(())
    }

    /// The statistics of a completed migration, under QEMU's names.
    fn final_stats(&mut self, outcome: SourceOutcome, switchover: &Switchover) -> MigrationStats {
        let config = self.shared.config;
        let verify_time = Duration::from_millis(outcome.destination_verify_ms);
        let resumed_at = switchover.resumed_at.unwrap_or_else(Instant::now);
        let downtime = switchover
            .downtime_start
            .map_or(Duration::ZERO, |start| resumed_at.duration_since(start))
            .saturating_sub(verify_time);
        let total_time = resumed_at.duration_since(self.started).saturating_sub(verify_time);
        let precopy = self.session().precopy().clone();
        if config.verify {
            self.stats.verified = outcome.verified;
            self.stats.verify_time = Some(outcome.destination_verify_ms);
        }

        let stats = &mut self.stats;
        let t = &self.totals;
        stats.status = "completed".into();
        stats.total_time = total_time.as_millis() as u64;
        stats.setup_time = self.setup_time.as_millis() as u64;
        stats.downtime = downtime.as_millis() as u64;
        stats.expected_downtime = precopy.expected_downtime().as_millis().min(u128::from(u64::MAX)) as u64;
        stats.throttle_pct = precopy.throttle_pct();
        let transferred = self.shared.links.wire_bytes.load(Ordering::Relaxed);
        stats.ram.total = self.hello.total_bytes();
        stats.ram.transferred = transferred;
        stats.ram.remaining = 0;
        stats.ram.duplicate = t.zero_pages;
        stats.ram.copied = t.copied_pages;
        stats.ram.normal = t.raw_pages + t.compressed_pages;
        stats.ram.normal_bytes = stats.ram.normal * PAGE_SIZE_BYTES as u64;
        stats.ram.mbps = mbps(transferred, total_time.as_secs_f64());
        stats.ram.pages_per_second = (t.pages() as f64 / total_time.as_secs_f64().max(1e-6)) as u64;
        stats.ram.precopy_bytes = switchover.precopy_bytes;
        stats.ram.downtime_bytes = switchover.downtime_bytes;
        if let Some(cache) = &self.shared.cache {
            let x = &mut stats.xbzrle_cache;
            x.cache_size = cache.size_bytes();
            x.bytes = t.xbzrle_bytes;
            x.pages = t.xbzrle_pages;
            x.cache_miss = t.xbzrle_cache_miss;
            let lookups = t.xbzrle_pages + t.xbzrle_cache_miss + t.xbzrle_overflow + t.xbzrle_unchanged;
            x.cache_miss_rate = if lookups > 0 { t.xbzrle_cache_miss as f64 / lookups as f64 } else { 0.0 };
            x.encoding_rate = if t.xbzrle_bytes > 0 {
                (t.xbzrle_pages * PAGE_SIZE_BYTES as u64) as f64 / t.xbzrle_bytes as f64
            } else {
                0.0
            };
            x.overflow = t.xbzrle_overflow;
        }
        stats.compression.pages = t.compressed_pages;
        stats.compression.compressed_size = t.compressed_bytes;
        stats.compression.compression_rate = if t.compressed_bytes > 0 {
            (t.compressed_pages * PAGE_SIZE_BYTES as u64) as f64 / t.compressed_bytes as f64
        } else {
            0.0
        };
        stats.codec = config.codec.to_string();
        stats.compress_device = config.offload.as_ref().map(|device| device.name().to_string());
        stats.connections = self.hello.connection_count;
        stats.compress_threads = config.compress_threads;
        stats.encode = *t;
        std::mem::take(stats)
    }

    /// Stops the compression workers and frees the XBZRLE cache; records how long that
    /// took and whether it ran inside the downtime window. Runs once.
    fn cleanup(&mut self, workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>, in_downtime: bool) {
        if self.cleaned_up {
            return;
        }
        let start = Instant::now();
        stop_workers(self.shared, workers);
        if let Some(cache) = &self.shared.cache {
            cache.release();
        }
        self.cleaned_up = true;
        self.stats.cleanup_time_us = start.elapsed().as_micros() as u64;
        self.stats.cleanup_in_downtime = in_downtime;
    }
}

/// Clears the bits of pages below `page` in `bitmap`.
fn clear_below(bitmap: &mut [u64], page: u64) {
    let (words, bits) = ((page / 64) as usize, page % 64);
    let words = words.min(bitmap.len());
    bitmap[..words].fill(0);
    if let Some(word) = bitmap.get_mut(words) {
        *word &= !((1u64 << bits) - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::clear_below;

    #[test]
    fn a_cut_round_keeps_the_pages_it_did_not_hand_out() {
        let mut bitmap = vec![u64::MAX; 3];
        clear_below(&mut bitmap, 70);
        assert_eq!(bitmap, [0, !((1u64 << 6) - 1), u64::MAX]);
        let mut bitmap = vec![u64::MAX; 2];
        clear_below(&mut bitmap, 128);
        assert_eq!(bitmap, [0, 0], "past the end: all handed out");
        clear_below(&mut bitmap, 0);
        let mut full = vec![u64::MAX; 1];
        clear_below(&mut full, 0);
        assert_eq!(full, [u64::MAX], "nothing handed out");
    }
}
