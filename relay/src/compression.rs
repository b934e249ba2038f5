//! A relay session's compression: the engine's pool ([`engine::pool`]), one for all the
//! session's carried streams, and what its adaptive policy needs to know of the links.
//!
//! Each stream's reader decides its pages in stream order (zero, unchanged, delta) and
//! hands whole page-aware chunks to the pool; a worker squeezes a chunk with the codec the
//! policy chooses for it (or the one configured), and the stream's sender puts the chunks
//! back in order (`squeeze.rs`). Under `adaptive` the policy prices each codec on the
//! chunks' own pages, as the engine's source does on its batches.

use engine::adaptive::{cpu, Choice, Pipeline};
use engine::pool::{CompressionPool, PoolConfig, PoolWorker};
use migration::codec::Codec;
use migration::frame::{FrameBuf, HEADER_BYTES};
use migration::relay::{max_data_payload_bytes, MAX_CHUNK_BYTES};
use migration::relay_pages::{raw_pages, squeeze, squeeze_keeps, squeezed_len};
use migration::PAGE_SIZE_BYTES;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use transport::abort::SessionAbort;
use transport::pipe::SendProbe;
use transport::ring::Pool;

/// How a source relay compresses.
#[derive(Debug, Clone, Copy)]
pub struct CompressionConfig {
    /// The page codec; `Adaptive` chooses per chunk.
    pub codec: Codec,
    /// Workers of the session's pool (0: each stream's own thread compresses, with lz4
    /// under `adaptive`).
    pub workers: usize,
    /// Pin worker i to the first free CPU from `first_cpu + i` up
    /// (`transport::pin::claim_worker_cpu`).
    pub first_cpu: Option<usize>,
}

/// Buffers kept for reuse (chunks the readers build, frames the workers fill): enough for
/// everything in flight (the pool's queue, its workers, the streams' senders).
const SPARE_BUFFERS: usize = 64;

/// The pool and the links it feeds.
pub(crate) struct SessionCompression {
    pool: CompressionPool,
    links: Links,
    /// Chunk buffers the workers are done with, for the readers' next chunks.
    chunks: Pool<Vec<u8>>,
    /// Frames the senders have written, for the workers' next chunks.
    frames: Pool<FrameBuf>,
}

/// The session's relay connections, as the adaptive policy sees them.
#[derive(Default)]
struct Links {
    /// What each stream's stack says of its send side (`None` where it cannot say).
    probes: Mutex<Vec<Option<Arc<dyn SendProbe>>>>,
    /// Frame payload bytes the streams' senders have written.
    written: AtomicU64,
}

/// What a squeezed chunk became.
pub(crate) struct Squeezed {
    /// A `StreamData` frame, its payload checksummed, waiting for its sequence number.
    pub frame: FrameBuf,
    /// Pages compressed (the reader counted them raw).
    pub packed: usize,
    pub codec: Codec,
}

impl SessionCompression {
    /// A pool for `config`, or none where the streams' own threads compress.
    pub fn start(config: CompressionConfig, abort: Arc<SessionAbort>) -> std::io::Result<Option<Arc<Self>>> {
        if config.workers == 0 || config.codec == Codec::None {
            return Ok(None);
        }
        let pool_config = PoolConfig {
            workers: config.workers,
            first_cpu: config.first_cpu,
            codec: config.codec,
            name: "relay-zip".into(),
        };
        let pool = CompressionPool::start(&pool_config, abort)?;
        Ok(Some(Arc::new(SessionCompression {
            pool,
            links: Links::default(),
            chunks: Pool::new(SPARE_BUFFERS),
            frames: Pool::new(SPARE_BUFFERS),
        })))
    }

    pub fn pool(&self) -> &CompressionPool {
        &self.pool
    }

    /// Registers a stream's connection; returns its number for [`Self::squeeze`].
    pub fn add_link(&self, probe: Option<Arc<dyn SendProbe>>) -> usize {
        let mut probes = self.links.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.push(probe);
        probes.len() - 1
    }

    /// Counts payload bytes a stream's sender wrote.
    pub fn wrote(&self, bytes: usize) {
        self.links.written.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A buffer for a reader's next chunk: one a worker squeezed, or a frame a sender
    /// wrote (chunks that went out as their own frames come back as frames).
    pub fn spare_chunk(&self) -> Vec<u8> {
        self.chunks.take(|| self.frames.take(|| FrameBuf::with_capacity(2 * MAX_CHUNK_BYTES)).into_bytes())
    }

    /// A frame a sender has written, for reuse.
    pub fn give_frame(&self, frame: FrameBuf) {
        self.frames.give(frame);
    }

    /// The codec for a stream's next chunk: the configured one, or the policy's choice.
    /// `sender_behind` says whether the stream's sender has chunks waiting, for a stack
    /// that cannot say whether its link is full.
    pub fn choose(&self, link: usize, sender_behind: bool) -> Choice {
        match self.pool.policy() {
            Some(policy) => policy.choose(self.pipeline(link, sender_behind), &|| self.delivered_bytes()),
            None => Choice { codec: self.pool.codec(), measure: false },
        }
    }

    /// `buffer` (a deferring encoder's: room for a frame's header, then the chunk) as its
    /// own frame, checksummed on the calling thread (the stream's reader), where `choice`
    /// leaves the chunk as it is (pages raw: the policy's choice where the link or the
    /// receiver is faster than the codecs) and measures nothing on it: a worker would only
    /// checksum it, and handing it over costs two thread wake-ups. Otherwise the buffer
    /// comes back, for a worker to squeeze.
    pub fn as_it_is(&self, buffer: Vec<u8>, choice: Choice) -> Result<Squeezed, Vec<u8>> {
        let chunk = chunk_in(&buffer);
        if choice.measure || !squeeze_keeps(chunk, choice.codec) {
            return Err(buffer);
        }
        let started = (cpu::thread_time(), Instant::now());
        let input = raw_page_bytes(chunk);
        let mut frame = FrameBuf::wrap(buffer);
        frame.checksum_payload();
        if let Some(policy) = self.pool.policy() {
            policy.account(input, cpu::thread_time() - started.0, started.1.elapsed());
        }
        Ok(Squeezed { frame, packed: 0, codec: Codec::None })
    }

    /// Squeezes one chunk on `worker` into a frame with `choice`'s codec (checksummed here,
    /// on the worker, so that the sender only seals it); the policy, if any, learns what it
    /// cost (and, where `choice` says so, what every choice would have made of the chunk's
    /// pages). `buffer` is as for [`Self::as_it_is`]; a chunk that squeezing would leave as
    /// it is becomes its own frame, uncopied.
    pub fn squeeze(&self, worker: &mut PoolWorker, buffer: Vec<u8>, choice: Choice) -> Squeezed {
        let started = worker.policy().is_some().then(|| (cpu::thread_time(), Instant::now()));
        let chunk = chunk_in(&buffer);
        let squeezed_into = (!squeeze_keeps(chunk, choice.codec)).then(|| {
            let mut frame = self.frames.take(|| FrameBuf::with_capacity(max_data_payload_bytes()));
            let (packed, codec) = match squeeze(chunk, worker.compressor(choice.codec), &mut frame) {
                Ok(packed) => (packed, choice.codec),
                // Not expected (the reader built the chunk): it goes as it was built.
                Err(_) => {
                    frame.begin().extend_from_slice(chunk);
                    (0, Codec::None)
                }
            };
            Squeezed { frame, packed, codec }
        });
        if let Some((cpu_start, wall_start)) = started {
            let input = raw_page_bytes(chunk);
            let spent = cpu::thread_time() - cpu_start;
            if choice.measure {
                measure_choices(worker, chunk);
            }
            if let Some(policy) = worker.policy() {
                policy.account(input, spent, wall_start.elapsed());
            }
        }
        let mut squeezed = match squeezed_into {
            Some(squeezed) => {
                self.chunks.give(buffer);
                squeezed
            }
            None => Squeezed { frame: FrameBuf::wrap(buffer), packed: 0, codec: Codec::None },
        };
        squeezed.frame.checksum_payload();
        squeezed
    }

    /// What the policy sees of `link` now: whether its stack holds writes back (its send
    /// buffer full; where it cannot say, whether the stream's sender is behind), and
    /// whether its receiver (the destination relay, behind it the destination QEMU) rather
    /// than the link has held the sender back lately (false where the stack cannot say).
    fn pipeline(&self, link: usize, sender_behind: bool) -> Pipeline {
        let probes = self.links.probes.lock().unwrap_or_else(|p| p.into_inner());
        let probe = probes.get(link).and_then(Option::as_ref);
        Pipeline {
            link_full: probe.map_or(sender_behind, |probe| probe.full()),
            scanner_ahead: self.pool.backlog(),
            receiver_bound: probe.is_some_and(|probe| probe.receiver_limited()),
        }
    }

    /// Bytes the destination relay acknowledged over every stream; where a stack cannot
    /// say, what the senders wrote.
    fn delivered_bytes(&self) -> u64 {
        let probes = self.links.probes.lock().unwrap_or_else(|p| p.into_inner());
        if probes.iter().all(Option::is_some) {
            probes.iter().flatten().map(|p| p.acknowledged()).sum()
        } else {
            self.links.written.load(Ordering::Relaxed)
        }
    }
}

/// The chunk in a deferring encoder's buffer: after the room for a frame's header.
fn chunk_in(buffer: &[u8]) -> &[u8] {
    &buffer[HEADER_BYTES.min(buffer.len())..]
}

/// The guest bytes of `chunk`'s raw pages: what the policy counts a chunk's work by.
fn raw_page_bytes(chunk: &[u8]) -> u64 {
    raw_pages(chunk).map_or(0, |pages| pages.len() * PAGE_SIZE_BYTES) as u64
}

/// Compresses `chunk`'s raw pages with every choice the worker has, as `squeeze` would
/// (zstd's as one block), and tells the policy what each made of them, at what CPU cost:
/// all measured on the same pages.
fn measure_choices(worker: &mut PoolWorker, chunk: &[u8]) {
    let Ok(pages) = raw_pages(chunk) else { return };
    if pages.is_empty() {
        return;
    }
    let input = (pages.len() * PAGE_SIZE_BYTES) as u64;
    let mut results = Vec::new();
    for compressor in worker.compressors() {
        let start = cpu::thread_time();
        let output = squeezed_len(&pages, compressor);
        results.push((compressor.codec(), output as u64, cpu::thread_time() - start));
    }
    if let Some(policy) = worker.policy() {
        for (codec, output, spent) in results {
            policy.measure(codec, input, output, spent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::qemu_stream::PageKey;
    use migration::relay_pages::RecordEncoder;
    use std::sync::mpsc;

    /// A deferring encoder's buffer: a chunk of `pages` distinct pages, and `other` bytes
    /// of the stream between them.
    fn chunk_buffer(pages: u64, other: usize) -> (Vec<u8>, Vec<u8>) {
        let mut encoder = RecordEncoder::deferring_compression(None, 0);
        encoder.other(&vec![7; other]);
        for i in 0..pages {
            encoder.page(PageKey { block: 0, offset: i << 12 }, &[i as u8 + 1; PAGE_SIZE_BYTES]);
        }
        let buffer = encoder.finish_into(Vec::new());
        let chunk = buffer[HEADER_BYTES..].to_vec();
        (buffer, chunk)
    }

    /// What one of `compression`'s workers makes of `buffer`.
    fn squeezed(compression: &Arc<SessionCompression>, buffer: Vec<u8>) -> Squeezed {
        let (done, result) = mpsc::channel();
        let session = compression.clone();
        let link = compression.add_link(None);
        let choice = compression.choose(link, false);
        compression
            .pool()
            .submit(Box::new(move |worker| {
                let _ = done.send(session.squeeze(worker, buffer, choice));
            }))
            .unwrap();
        result.recv_timeout(std::time::Duration::from_secs(10)).expect("squeezed")
    }

    #[test]
    fn a_chunk_sent_raw_goes_out_as_its_own_frame_uncopied() {
        // Adaptive sends pages raw until it has measured every choice.
        let abort = Arc::new(SessionAbort::new());
        let config = CompressionConfig { codec: Codec::Adaptive, workers: 1, first_cpu: None };
        let compression = SessionCompression::start(config, abort).unwrap().unwrap();
        let (buffer, chunk) = chunk_buffer(8, 100);
        let at = buffer.as_ptr();
        let raw = squeezed(&compression, buffer);
        assert_eq!(raw.codec, Codec::None);
        assert!(raw.frame.payload() == chunk, "the chunk is the frame's payload");
        assert_eq!(raw.frame.as_bytes().as_ptr(), at, "in the buffer the reader built it in");
        // The frame comes back as the next chunk's buffer.
        compression.give_frame(raw.frame);
        let spare = compression.spare_chunk();
        assert_eq!(spare.as_ptr(), at);

        // A long run of other bytes is still squeezed (lz4), into a frame of the pool's.
        let (buffer, chunk) = chunk_buffer(8, 4096);
        let at = buffer.as_ptr();
        let squeezed = squeezed(&compression, buffer);
        assert_ne!(squeezed.frame.as_bytes().as_ptr(), at);
        assert!(squeezed.frame.payload_len() < chunk.len());
    }

    #[test]
    fn a_chunk_the_policy_sends_raw_goes_from_the_reader_without_a_worker() {
        let abort = Arc::new(SessionAbort::new());
        let config = CompressionConfig { codec: Codec::Adaptive, workers: 1, first_cpu: None };
        let compression = SessionCompression::start(config, abort).unwrap().unwrap();
        let raw = Choice { codec: Codec::None, measure: false };
        let (buffer, chunk) = chunk_buffer(8, 100);
        let at = buffer.as_ptr();
        let Ok(sent) = compression.as_it_is(buffer, raw) else { panic!("raw, nothing to measure: no worker") };
        assert!(sent.frame.payload() == chunk);
        assert_eq!(sent.frame.as_bytes().as_ptr(), at);
        let mut sealed = sent.frame;
        sealed.seal(migration::frame::FrameKind::StreamData, 0, 0);
        let header: &[u8; HEADER_BYTES] = sealed.as_bytes()[..HEADER_BYTES].try_into().unwrap();
        let parsed = migration::frame::FrameHeader::parse(header).unwrap();
        parsed.check(header, sealed.payload()).expect("checksummed on the reader");
        // A codec to apply, choices to measure, or a long run of other bytes: a worker's.
        let (buffer, _) = chunk_buffer(8, 100);
        let buffer = compression.as_it_is(buffer, Choice { codec: Codec::Lz4, measure: false }).err().unwrap();
        let buffer = compression.as_it_is(buffer, Choice { codec: Codec::None, measure: true }).err().unwrap();
        assert!(compression.as_it_is(buffer, raw).is_ok());
        let (long_other, _) = chunk_buffer(8, 4096);
        assert!(compression.as_it_is(long_other, raw).is_err());
    }
}
