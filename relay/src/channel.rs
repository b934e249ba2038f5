//! One carried stream: a QEMU socket on this host at one end, a relay connection at the
//! other, bytes pumped both ways. QEMU's precopy channels run one way, but the return path
//! and postcopy talk back, so both directions are carried, each a stream of its own.
//!
//! The two relays run the same pump; only who opened the connections differs. Towards the
//! network ("up"): read what QEMU wrote, compress it a chunk at a time, frame it; a
//! heartbeat goes out whenever QEMU has been quiet for `HEARTBEAT`, so the peer can tell a
//! quiet stream from a dead link. From the network ("down"): check each frame's CRC and
//! sequence, decompress, write to QEMU. The last chunk is held back until the next one, a
//! heartbeat or the stream's end arrives; once a main stream's RAM has ended, QEMU's
//! end-of-file marker, on which the destination QEMU finishes loading and starts the guest,
//! and whatever follows it wait for the stream's digest, whatever arrives meanwhile: they
//! reach QEMU only once the digest of everything so far has checked out, so a destination
//! QEMU never completes an incoming migration from a stream that did not arrive whole and
//! intact. The digest comes with the stream's end, or earlier in a checkpoint: where a
//! completing main stream's bytes end as QEMU's stream ends (the marker, and the machine's
//! description whole), the source relay sends the digest so far at once, since with the
//! return path QEMU keeps its socket open until the destination has loaded.
//!
//! Any failure raises the session's abort: every channel's sockets are shut, both QEMUs see
//! their migration streams end early, and the peer relay is told why (an `Abort` frame).

use crate::compression::SessionCompression;
use crate::control::RelayControls;
use crate::holdback::{completing, HoldBack};
use crate::net_writer::{lock, NetWriter};
use crate::outlet::{Outlet, PageChunks};
use crate::qemu_sink::{is_closed_by_qemu, qemu_failure};
use crate::squeeze::Squeezers;
pub use crate::stats::DirectionStats;
use crate::waits::{self, SessionWaits, Wait};
use crate::{LinkFailure, RelayFailure};
use migration::codec::Codec;
use migration::control::Tune;
use migration::frame::FrameKind;
use migration::handshake::{decode_reason, encode_reason};
use migration::qemu_stream::{end_marker_candidate, ends_at_end_marker, starts_a_qemu_stream, Kind, StreamReader};
use migration::relay::Encoding;
use migration::relay::{max_data_payload_bytes, ChunkDecoder, ChunkEncoder, StreamDigest, StreamEnd, MAX_CHUNK_BYTES};
use migration::relay_cache::SharedPageCache;
use migration::relay_pages::{PageCounts, RecordDecoder, RECORDS};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;
use transport::framed::{read_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pipe::{Connection, SendProbe};

/// How long QEMU may stay quiet before a heartbeat tells the peer the link is alive. It
/// also bounds how long a held-back chunk waits in a quiet stream.
pub const HEARTBEAT: Duration = Duration::from_millis(100);

/// One carried stream, at its end.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChannelReport {
    pub channel: u16,
    /// What QEMU sent on it: "main", "multifd", or "other" (this host's QEMU sent nothing
    /// a migration stream starts with: a destination's return path, say).
    pub stream: &'static str,
    /// Guest pages found in what this host's QEMU sent.
    pub pages: u64,
    /// How those pages went on the wire.
    pub encodings: PageCounts,
    /// From this host's QEMU to the peer.
    pub sent: DirectionStats,
    /// From the peer to this host's QEMU.
    pub received: DirectionStats,
    /// Where the relay stopped understanding what this host's QEMU sent before the
    /// migration's last, opaque part (another QEMU version's sections, say): from there on
    /// the stream went byte for byte, as it was, without page-aware compression.
    pub not_understood: Option<&'static str>,
    /// Page-aware chunks this host sent, by the codec the pool squeezed them with (empty
    /// where the stream's own thread compressed).
    pub codecs: BTreeMap<String, u64>,
    pub seconds: f64,
}

/// How often, at most, a receiving side tells the sender how many page-aware chunks it has
/// decoded (and on every heartbeat): deltas across streams wait for it, but only pages
/// carried again, a round later, need it.
const DECODED_EVERY: Duration = Duration::from_millis(2);

/// What a session's streams share: its XBZRLE caches (`migration::relay_cache`), one for
/// all its streams, the one this relay's encoders share (the source relay's) and the one
/// its decoders share (the destination relay's), None where XBZRLE is off or in the
/// direction that has no pages; the operator's controls (`control.rs`); and where each of
/// the session's threads waits (`waits.rs`).
#[derive(Clone, Default)]
pub(crate) struct SessionShared {
    pub outgoing: Option<Arc<SharedPageCache>>,
    pub incoming: Option<Arc<SharedPageCache>>,
    pub controls: Arc<RelayControls>,
    pub waits: Arc<SessionWaits>,
}

/// Pumps `local` (a QEMU socket) and `net` (the relay connection, past its handshake) both
/// ways until both directions have ended, or the session aborts. `encoding` (agreed in the
/// stream's hello) serves both directions; the session's `compression` pool squeezes what
/// goes out (None: the sending thread compresses it itself).
pub(crate) fn pump(
    channel: u16,
    local: UnixStream,
    net: Connection,
    encoding: Encoding,
    compression: Option<Arc<SessionCompression>>,
    caches: SessionShared,
    abort: &Arc<SessionAbort>,
) -> Result<ChannelReport, RelayFailure> {
    let started = Instant::now();
    let Connection { reader, writer, closer, peer, probe, .. } = net;
    let closer: Arc<dyn Fn() + Send + Sync> = Arc::from(closer);
    let writer = Arc::new(Mutex::new(NetWriter::new(writer, caches.controls.clone())));
    {
        // When the session aborts, every channel tells the peer why (if its writer comes
        // free soon: one blocked in a write is not waited for), then shuts its sockets.
        let (closer, local) = (closer.clone(), local.try_clone().map_err(RelayFailure::local)?);
        let (writer, session) = (writer.clone(), Arc::downgrade(abort));
        abort.on_raise(Box::new(move || {
            if let (Some(mut writer), Some(session)) = (lock_soon(&writer), session.upgrade()) {
                let reason = session.reason().unwrap_or_default();
                let _ = writer.send(FrameKind::Abort, &encode_reason(&reason));
            }
            closer();
            let _ = local.shutdown(Shutdown::Both);
        }));
    }
    let up = {
        let local = local.try_clone().map_err(RelayFailure::local)?;
        let (writer, abort, cache) = (writer.clone(), abort.clone(), caches.outgoing.clone());
        let (controls, waits) = (caches.controls.clone(), caches.waits.clone());
        std::thread::Builder::new()
            .name(format!("relay-up-{channel}"))
            .spawn(move || {
                let _registered = waits.register(format!("channel {channel}'s sending thread"));
                let ways = Outgoing { encoding, compression, probe, cache, controls, waits };
                let result = pump_up(local, &writer, ways, &abort, channel);
                // A connection that failed under a write is dead: its reader ends at once, and
                // reports better (the peer's own reason, when it sent one first).
                if !matches!(result, Err(RelayFailure::Link(_))) {
                    fail_session(&result, &abort, channel);
                }
                result
            })
            .map_err(RelayFailure::local)?
    };
    let net = Incoming { reader, peer: &peer, writer: &writer, caches: &caches, channel };
    let registered = caches.waits.register(format!("channel {channel}'s receiving thread"));
    let down = pump_down(local, net, abort);
    drop(registered);
    fail_session(&down, abort, channel);
    let up = up.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay's sending thread panicked".into())));
    fail_session(&up, abort, channel);
    if abort.is_raised() {
        return Err(RelayFailure::aborted(abort));
    }
    let (sent, stream, encodings, codecs) = up?;
    let not_understood = not_understood(&stream);
    Ok(ChannelReport {
        channel,
        stream: match stream.kind() {
            Kind::Main => "main",
            Kind::Multifd => "multifd",
            Kind::Unknown | Kind::Foreign => "other",
        },
        pages: stream.pages(),
        encodings,
        sent,
        received: down?,
        not_understood,
        codecs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How long an abort waits for a channel's writer to tell the peer why: a frame paced
/// under a bandwidth cap takes that long at most; a write blocked on a full link is let be.
const ABORT_NOTICE_PATIENCE: Duration = Duration::from_millis(200);

/// The writer, if it comes free within [`ABORT_NOTICE_PATIENCE`].
fn lock_soon(writer: &Mutex<NetWriter>) -> Option<std::sync::MutexGuard<'_, NetWriter>> {
    let deadline = Instant::now() + ABORT_NOTICE_PATIENCE;
    loop {
        match writer.try_lock() {
            Ok(writer) => return Some(writer),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Why the reader gave up on a QEMU stream before its last part, where it expects to (the
/// device state after RAM's end has no framing it can follow); None where it did not.
fn not_understood(stream: &StreamReader) -> Option<&'static str> {
    stream.gave_up().filter(|_| matches!(stream.kind(), Kind::Main | Kind::Multifd) && !completing(stream))
}

/// On the first failure, abort the whole session (every channel then tells the peer why).
fn fail_session<T>(result: &Result<T, RelayFailure>, abort: &SessionAbort, channel: u16) {
    let Err(failure) = result else { return };
    if !abort.is_raised() {
        abort.raise(format!("channel {channel}: {failure}"));
    }
}

/// QEMU to the network: chunks, heartbeats while QEMU is quiet, and the stream's end.
/// The stream is read as it passes (`StreamReader`). Once it shows itself a QEMU
/// migration stream, chunks are page-aware (`PageChunks`); anything else goes in chunks
/// compressed whole. A main stream that ends before its migration reached completion (QEMU
/// cancelled it, or failed) is aborted rather than ended, so that the destination relay
/// fails too and its QEMU never sees a clean end.
fn pump_up(
    mut local: UnixStream,
    writer: &Arc<Mutex<NetWriter>>,
    ways: Outgoing,
    abort: &Arc<SessionAbort>,
    channel: u16,
) -> Result<UpReport, RelayFailure> {
    let Outgoing { encoding, compression, probe, cache, controls, waits } = ways;
    local.set_read_timeout(Some(HEARTBEAT)).map_err(RelayFailure::local)?;
    // What this thread compresses itself: streams that are not QEMU's, and everything
    // without a pool. The adaptive policy needs the pool's measurements: lz4 here.
    let own_codec = match encoding.codec {
        Codec::Adaptive => Codec::Lz4,
        codec => codec,
    };
    let chunks = ChunkEncoder::new(own_codec);
    let cache = cache.filter(|_| encoding.xbzrle_cache_pages > 0);
    let pages = PageChunks::new(own_codec, cache, channel, compression.is_some());
    let out = match compression {
        Some(compression) => {
            Outlet::Pool(Squeezers::start(compression, probe, writer.clone(), abort.clone(), channel, waits)?)
        }
        None => Outlet::Direct(writer),
    };
    let mut up = Up {
        out,
        pages,
        chunks,
        digest: StreamDigest::default(),
        stats: DirectionStats::default(),
        stream: StreamReader::default(),
        ending: Vec::new(),
        page_aware: None,
        channel,
        controls,
    };
    let mut buffer = vec![0u8; MAX_CHUNK_BYTES];
    loop {
        if abort.is_raised() {
            return Err(RelayFailure::aborted(abort));
        }
        let read = waits::during(Wait::ReadingQemu, || local.read(&mut buffer));
        let read = match read {
            // A QEMU that never wrote here (a destination's multifd channel) and closed
            // with bytes unread: this direction's stream ended empty; the other direction
            // (`QemuSink`) judges what QEMU left unread.
            Err(err) if is_closed_by_qemu(&err) && up.stats.bytes == 0 => Ok(0),
            read => read,
        };
        match read {
            Ok(0) => return up.end(writer, abort),
            Ok(n) => up.carry(&buffer[..n], abort)?,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                up.out.control(FrameKind::Heartbeat, &[], abort)?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(qemu_failure("reading from", &err)),
        }
        // The operator's changes for the peer relay go on channel 0, between chunks.
        if let Some(tune) = (channel == 0).then(|| up.controls.take_outgoing()).flatten() {
            up.out.control(FrameKind::Tune, &tune.payload(), abort)?;
        }
    }
}

/// The sending side of a carried stream, between reads of QEMU's socket.
struct Up<'a> {
    out: Outlet<'a>,
    pages: PageChunks,
    /// Chunks of a stream that is not QEMU's, compressed whole.
    chunks: ChunkEncoder,
    digest: StreamDigest,
    stats: DirectionStats,
    stream: StreamReader,
    /// A completing main stream's bytes so far, to see where it may have ended.
    ending: Vec<u8>,
    /// Decided by the stream's first bytes: QEMU's (page-aware chunks) or anything else.
    page_aware: Option<bool>,
    channel: u16,
    controls: Arc<RelayControls>,
}

impl Up<'_> {
    /// Carries what QEMU wrote.
    fn carry(&mut self, data: &[u8], abort: &SessionAbort) -> Result<(), RelayFailure> {
        self.controls.meter.qemu_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.digest.update(data);
        if !*self.page_aware.get_or_insert_with(|| starts_a_qemu_stream(data)) {
            self.stream.feed(data, &mut |_| {});
            return self.out.data(self.chunks.encode(data), data.len(), &mut self.stats, abort);
        }
        let understood = not_understood(&self.stream).is_none();
        let pages = &mut self.pages;
        self.stream.feed(data, &mut |piece| pages.piece(piece));
        if let Some(why) = not_understood(&self.stream).filter(|_| understood) {
            log::warn!(
                "channel {}: QEMU's stream holds {why}, which this relay does not understand: \
                 carrying the rest byte for byte, as it is (no page-aware compression)",
                self.channel
            );
        }
        // Stamped before the chunk that holds the RAM's end goes: the destination relay
        // stamps its arrival, which must not come first.
        self.stats.note_ram_end(completing(&self.stream));
        self.out.pages(&mut self.pages, false, &mut self.stats, abort)?;
        if completing(&self.stream) && self.pages.page.is_empty() {
            // QEMU's stream may end here, and with the return path QEMU keeps its socket
            // open until the destination has loaded: the digest so far lets the
            // destination relay pass the end-of-file marker on.
            self.ending.extend_from_slice(data);
            // A byte that cannot start the marker now never will (more bytes only rule
            // candidates out): keep from the first that still can, so that the downtime's
            // device state is not searched again at every read.
            match end_marker_candidate(&self.ending) {
                Some(at) => drop(self.ending.drain(..at)),
                None => self.ending.clear(),
            }
            if ends_at_end_marker(&self.ending) {
                self.stats.end_marker_at_us.get_or_insert_with(crate::stats::wall_clock_us);
                self.controls.meter.main_ended.store(true, Ordering::Release);
                self.out.control(FrameKind::StreamCheckpoint, &self.digest.end().encode(), abort)?;
            }
        }
        Ok(())
    }

    /// QEMU closed its side: the stream's end, once all before it is out.
    fn end(mut self, writer: &Mutex<NetWriter>, abort: &SessionAbort) -> Result<UpReport, RelayFailure> {
        // Where the reader gave up early it cannot tell a completed migration from a
        // cancelled one: the stream ends as it is, and the destination QEMU judges it (the
        // digest still proves it arrived whole).
        let judged = not_understood(&self.stream).is_none();
        if judged && self.stream.kind() == Kind::Main && !completing(&self.stream) {
            return Err(RelayFailure::Local(
                "QEMU's migration stream ended before the migration completed (cancelled or failed there)".into(),
            ));
        }
        if self.stream.kind() == Kind::Main {
            self.controls.meter.main_ended.store(true, Ordering::Release);
        }
        // A page cut short by the end of the stream goes as the bytes it is.
        self.out.pages(&mut self.pages, true, &mut self.stats, abort)?;
        self.out.control(FrameKind::StreamEnd, &self.digest.end().encode(), abort)?;
        let mut counts = self.pages.encoder.counts;
        let mut codecs = BTreeMap::new();
        let mut stats = self.stats;
        if let Outlet::Pool(squeezers) = self.out {
            let sent = squeezers.finish()?;
            stats.wire_bytes = sent.wire_bytes;
            stats.chunks = sent.chunks;
            counts.raw -= sent.packed_pages;
            counts.packed += sent.packed_pages;
            codecs = sent.codecs;
        }
        // The connection's writer saw the checkpoint go, whichever thread wrote it.
        stats.end_marker_sent_at_us = lock(writer).checkpoint_sent_at_us;
        Ok((stats, self.stream, counts, codecs))
    }
}

/// How the sending side encodes: as the hello said, on the session's pool and its cache.
struct Outgoing {
    encoding: Encoding,
    compression: Option<Arc<SessionCompression>>,
    /// What the connection's stack says of its send side.
    probe: Option<Arc<dyn SendProbe>>,
    cache: Option<Arc<SharedPageCache>>,
    controls: Arc<RelayControls>,
    waits: Arc<SessionWaits>,
}

/// The receiving side's connection: its read half, the peer's name for messages, the
/// writer it tells the peer what it decoded through, and the session's caches.
struct Incoming<'a> {
    reader: Box<dyn Read + Send>,
    peer: &'a str,
    writer: &'a Mutex<NetWriter>,
    caches: &'a SessionShared,
    channel: u16,
}

/// What the sending side reports at its end: its bytes, the stream as read, how its pages
/// went, and its chunks by codec.
type UpReport = (DirectionStats, StreamReader, PageCounts, BTreeMap<String, u64>);

/// The network to QEMU: checked, decompressed chunks, the last one held back until the
/// next frame proves more is coming (or the stream's digest checks out), and QEMU's
/// end-of-file marker held back until the digest checks out whatever comes after it.
fn pump_down(local: UnixStream, net: Incoming<'_>, abort: &SessionAbort) -> Result<DirectionStats, RelayFailure> {
    let Incoming { mut reader, peer, writer, caches, channel } = net;
    let mut decoder = ChunkDecoder::default();
    let mut records = RecordDecoder::new(caches.incoming.clone(), channel);
    // Only a decoder with a cache has anything to tell: deltas across streams need it.
    let mut told = caches.incoming.as_ref().map(|_| (0u64, Instant::now()));
    let mut payload = Vec::with_capacity(MAX_CHUNK_BYTES + 64);
    let mut expected_seq = 0u64;
    let data_limit = max_data_payload_bytes() as u32;
    let limit = |kind: FrameKind| if kind == FrameKind::StreamData { data_limit } else { CONTROL_FRAME_LIMIT_BYTES };
    let mut qemu = HoldBack::new(local);
    loop {
        let read = waits::during(Wait::ReadingLink, || read_frame(&mut *reader, &mut payload, limit));
        let header = match read {
            Ok(header) => header,
            Err(_) if abort.is_raised() => return Err(RelayFailure::aborted(abort)),
            Err(ReadError::Closed) => {
                let lost = format!("{peer} closed the relay connection mid-stream");
                return Err(RelayFailure::Link(LinkFailure::Lost(lost)));
            }
            Err(err) => return Err(RelayFailure::read(&format!("from {peer}"), &err)),
        };
        if header.seq != expected_seq {
            return Err(RelayFailure::damaged(format!(
                "frame out of sequence: expected {expected_seq}, got {}",
                header.seq
            )));
        }
        expected_seq += 1;
        match header.kind {
            FrameKind::StreamData => {
                let before = qemu.stats.bytes;
                if payload.first() == Some(&RECORDS) {
                    let decode = |into: &mut Vec<u8>| records.decode(&payload, into).map_err(RelayFailure::damaged);
                    qemu.chunk_with(payload.len(), decode)?;
                    if told.is_some_and(|(_, at)| at.elapsed() >= DECODED_EVERY) {
                        tell_decoded(writer, &records, &mut told);
                    }
                } else {
                    qemu.chunk(decoder.decode(&payload).map_err(RelayFailure::damaged)?, payload.len())?;
                }
                let delivered = qemu.stats.bytes - before;
                caches.controls.meter.delivered_bytes.fetch_add(delivered, Ordering::Relaxed);
            }
            FrameKind::Heartbeat => {
                tell_decoded(writer, &records, &mut told);
                qemu.vouched()?;
            }
            FrameKind::StreamDecoded => {
                let chunks: [u8; 8] = payload[..]
                    .try_into()
                    .map_err(|_| RelayFailure::damaged(format!("a StreamDecoded frame of {} bytes", payload.len())))?;
                if let Some(cache) = &caches.outgoing {
                    cache.peer_decoded(channel, u64::from_le_bytes(chunks));
                }
            }
            // Everything so far checks out: the end-of-file marker may go on.
            FrameKind::StreamCheckpoint => {
                qemu.stats.end_marker_arrived_at_us.get_or_insert_with(crate::stats::wall_clock_us);
                if channel == 0 {
                    caches.controls.meter.main_ended.store(true, Ordering::Release);
                }
                qemu.checked(&StreamEnd::decode(&payload).map_err(RelayFailure::damaged)?)?
            }
            FrameKind::Tune => match Tune::parse(&payload) {
                Some(tune) => caches.controls.peer_asked(&tune),
                None => return Err(RelayFailure::damaged(format!("a Tune frame of {} bytes", payload.len()))),
            },
            FrameKind::StreamEnd => {
                if channel == 0 {
                    caches.controls.meter.main_ended.store(true, Ordering::Release);
                }
                tell_decoded(writer, &records, &mut told);
                qemu.checked(&StreamEnd::decode(&payload).map_err(RelayFailure::damaged)?)?;
                return qemu.finish();
            }
            FrameKind::Abort => return Err(RelayFailure::Peer(decode_reason(&payload))),
            other => return Err(RelayFailure::unexpected(format!("unexpected {other:?} frame in a carried stream"))),
        }
    }
}

/// Tells the peer how many page-aware chunks of its stream have been decoded, if that
/// grew since it was last told (`told`: the count and when; None: there is no cache, and
/// nothing to tell), unless the writer is busy (the next chunk or heartbeat tells it) or
/// this direction has ended.
fn tell_decoded(writer: &Mutex<NetWriter>, records: &RecordDecoder, told: &mut Option<(u64, Instant)>) {
    let Some(told) = told else { return };
    let chunks = records.decoded_chunks();
    if chunks == told.0 {
        return;
    }
    if let Ok(mut writer) = writer.try_lock() {
        // A failed write fails the sending side, which reports it.
        if !writer.ended() && writer.send(FrameKind::StreamDecoded, &chunks.to_le_bytes()).is_ok() {
            *told = (chunks, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::frame::{FrameBuf, SeqCounter};
    use migration::qemu_stream::PAGE_BYTES;
    use migration::relay_pages::RecordEncoder;
    use std::io::Write;
    use transport::pipe::{Acceptor, Connector, TcpAcceptor, TcpConnector, Timeouts};

    const RAW: Encoding = Encoding { codec: Codec::None, xbzrle_cache_pages: 0 };
    const LZ4: Encoding = Encoding { codec: Codec::Lz4, xbzrle_cache_pages: 0 };
    const NONE: Option<Arc<SessionCompression>> = None;

    /// A pool of two workers for `codec`, as a source relay's session starts it.
    fn two(codec: Codec, abort: &Arc<SessionAbort>) -> Option<Arc<SessionCompression>> {
        let config = crate::compression::CompressionConfig { codec, workers: 2, first_cpu: None };
        SessionCompression::start(config, abort.clone()).unwrap()
    }
    use migration::relay::{ChunkEncoder, StreamDigest};

    /// A relay connection pair over loopback TCP.
    fn net_pair() -> (Connection, Connection) {
        let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default()).unwrap();
        let connector = TcpConnector::new(acceptor.local_socket_addr().unwrap(), Timeouts::default()).unwrap();
        let client = std::thread::spawn(move || connector.connect().unwrap());
        let server = acceptor.accept(Duration::from_secs(5)).unwrap();
        (client.join().unwrap(), server)
    }

    /// Pumps a stream from a fake source QEMU through two relays to a fake destination
    /// QEMU; returns what the destination read and both channel reports.
    fn carry(data: Vec<u8>, codec: Codec) -> (Vec<u8>, ChannelReport, ChannelReport) {
        let codec = Encoding { codec, xbzrle_cache_pages: 0 };
        let (source_net, destination_net) = net_pair();
        let (mut source_qemu, source_local) = UnixStream::pair().unwrap();
        let (mut destination_qemu, destination_local) = UnixStream::pair().unwrap();
        let (source_abort, destination_abort) = (Arc::new(SessionAbort::new()), Arc::new(SessionAbort::new()));
        let pool = two(codec.codec, &source_abort);
        let caches = SessionShared::default();
        let source = std::thread::spawn(move || pump(0, source_local, source_net, codec, pool, caches, &source_abort));
        let destination = std::thread::spawn(move || {
            pump(0, destination_local, destination_net, codec, NONE, SessionShared::default(), &destination_abort)
        });
        let writer = std::thread::spawn(move || {
            for piece in data.chunks(10_000) {
                source_qemu.write_all(piece).unwrap();
            }
            source_qemu.shutdown(Shutdown::Write).unwrap();
            // The source QEMU reads until the relay ends its return stream.
            let mut back = Vec::new();
            source_qemu.read_to_end(&mut back).unwrap();
            back
        });
        let mut received = Vec::new();
        destination_qemu.read_to_end(&mut received).unwrap();
        destination_qemu.shutdown(Shutdown::Write).unwrap();
        assert!(writer.join().unwrap().is_empty(), "nothing came back");
        let source = source.join().unwrap().expect("source relay");
        let destination = destination.join().unwrap().expect("destination relay");
        (received, source, destination)
    }

    /// What both relays count of a direction (the times and waits are each relay's own).
    fn counted(stats: &DirectionStats) -> [u64; 5] {
        [stats.bytes, stats.wire_bytes, stats.chunks, stats.undelivered, stats.held_for_digest]
    }

    #[test]
    fn a_stream_arrives_exactly_as_written_with_every_codec() {
        let data: Vec<u8> = (0..1_000_000u32).flat_map(|i| (i / 7).to_le_bytes()).collect();
        for codec in [Codec::None, Codec::Lz4, Codec::Zlib { level: 1 }, Codec::Zstd { level: 1 }, Codec::Adaptive] {
            let (received, source, destination) = carry(data.clone(), codec);
            assert!(received == data, "{codec}: the stream changed on the way");
            assert_eq!(source.sent.bytes, data.len() as u64);
            assert_eq!(counted(&destination.received), counted(&source.sent), "both relays count the same");
            if codec != Codec::None {
                assert!(source.sent.wire_bytes < source.sent.bytes / 2, "{codec}: {:?}", source.sent);
            }
        }
    }

    /// The start of a main stream as QEMU 7.2 writes it: the magic, the configuration, and
    /// RAM's start section (one block of 1 MiB, the end of its data, the footer).
    fn ram_set_up() -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.push(0x07);
        s.extend(13u32.to_be_bytes());
        s.extend(b"pc-i440fx-7.2");
        s.extend([0x01, 0, 0, 0, 2, 3]);
        s.extend(b"ram");
        s.extend([0, 0, 0, 0, 0, 0, 0, 4]);
        s.extend(((1u64 << 20) | 0x04).to_be_bytes());
        s.push(6);
        s.extend(b"pc.ram");
        s.extend((1u64 << 20).to_be_bytes());
        s.extend(0x10u64.to_be_bytes());
        s.extend([0x7e, 0, 0, 0, 2]);
        s
    }

    /// A main stream from a QEMU other than the one the reader knows: a page, then a
    /// section type 7.2 does not have, then more bytes that look like RAM records.
    #[test]
    fn a_stream_the_relay_does_not_understand_is_carried_byte_for_byte() {
        let mut stream = ram_set_up();
        stream.extend([0x02, 0, 0, 0, 2]);
        stream.extend((0x1000u64 | 0x08).to_be_bytes());
        stream.push(6);
        stream.extend(b"pc.ram");
        stream.extend(std::iter::repeat_n(0x5a, PAGE_BYTES));
        stream.extend(0x10u64.to_be_bytes());
        stream.extend([0x7e, 0, 0, 0, 2]);
        // A section type of a later QEMU, and data the reader cannot frame.
        stream.push(0x0b);
        for i in 0..50_000u32 {
            stream.extend(((0x2000u64 * u64::from(i)) | 0x08 | 0x20).to_be_bytes());
        }
        for codec in [Codec::None, Codec::Lz4] {
            let (received, source, destination) = carry(stream.clone(), codec);
            assert!(received == stream, "{codec}: the stream changed on the way");
            assert_eq!(source.stream, "main");
            assert_eq!(source.not_understood, Some("a section type this reader does not know"), "{source:?}");
            assert_eq!(counted(&destination.received), counted(&source.sent), "both relays count the same");
        }
    }

    #[test]
    fn an_empty_stream_ends_cleanly() {
        let (received, source, _) = carry(Vec::new(), Codec::Lz4);
        assert!(received.is_empty());
        assert_eq!(source.sent.chunks, 0);
    }

    #[test]
    fn a_cut_link_fails_both_relays_and_ends_both_qemu_streams() {
        let (source_net, destination_net) = net_pair();
        let cut = {
            let closer: Arc<dyn Fn() + Send + Sync> = Arc::from(source_net.closer);
            let inner = closer.clone();
            (Connection { closer: Box::new(move || inner()), ..source_net }, closer)
        };
        let (source_net, cutter) = cut;
        let (mut source_qemu, source_local) = UnixStream::pair().unwrap();
        let (mut destination_qemu, destination_local) = UnixStream::pair().unwrap();
        let source_abort = Arc::new(SessionAbort::new());
        let destination_abort = Arc::new(SessionAbort::new());
        let pool = two(Codec::Lz4, &source_abort);
        let source = std::thread::spawn(move || {
            pump(0, source_local, source_net, LZ4, pool, SessionShared::default(), &source_abort)
        });
        let destination = std::thread::spawn(move || {
            pump(0, destination_local, destination_net, LZ4, NONE, SessionShared::default(), &destination_abort)
        });
        source_qemu.write_all(&[1u8; 100_000]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        cutter();
        let source = source.join().unwrap();
        let destination = destination.join().unwrap();
        assert!(source.is_err() && destination.is_err(), "{source:?} {destination:?}");
        // Both QEMUs see their streams end (rather than wait forever).
        let mut rest = Vec::new();
        let _ = destination_qemu.read_to_end(&mut rest);
        let mut back = Vec::new();
        let _ = source_qemu.read_to_end(&mut back);
    }

    #[test]
    fn a_peer_that_ended_its_direction_and_then_left_fails_the_sending_side() {
        // The peer ends the stream towards this QEMU at once (as a destination QEMU that
        // refused the migration does), then its relay goes away while QEMU still sends:
        // the reader is done, so only the workers' sender sees the connection die.
        let (source_net, mut peer) = net_pair();
        let (mut source_qemu, source_local) = UnixStream::pair().unwrap();
        let abort = Arc::new(SessionAbort::new());
        let (finished_tx, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = two(Codec::Lz4, &abort);
            let _ = finished_tx.send(pump(0, source_local, source_net, LZ4, pool, SessionShared::default(), &abort));
        });
        let mut frame = FrameBuf::with_capacity(MAX_CHUNK_BYTES);
        frame.begin().extend_from_slice(&StreamDigest::default().end().encode());
        frame.seal(FrameKind::StreamEnd, 0, SeqCounter::default().take());
        peer.writer.write_all(frame.as_bytes()).unwrap();
        let mut back = Vec::new();
        source_qemu.try_clone().unwrap().read_to_end(&mut back).unwrap();
        assert!(back.is_empty(), "the peer's direction ended empty");
        drop(peer);
        // QEMU keeps sending (pages of numbers, so the workers have work) until the relay
        // gives up on its stream.
        std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..1_000_000u32).flat_map(|i| (i / 7).to_le_bytes()).collect();
            while source_qemu.write_all(&chunk).is_ok() {}
        });
        let result =
            finished.recv_timeout(Duration::from_secs(30)).expect("the source relay hung on a dead connection");
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn a_stalled_link_is_named_where_the_sending_thread_waits() {
        // The peer relay never reads: the source relay's sending thread (codec none, no
        // pool: it writes itself) blocks in its write once the sockets' buffers are full,
        // and the session's waits say so, as a stall warning or an abort would.
        let (source_net, peer) = net_pair();
        let (mut source_qemu, source_local) = UnixStream::pair().unwrap();
        let abort = Arc::new(SessionAbort::new());
        let caches = SessionShared::default();
        let waits = caches.waits.clone();
        let session = abort.clone();
        let pump = std::thread::spawn(move || pump(0, source_local, source_net, RAW, NONE, caches, &session));
        std::thread::spawn(move || while source_qemu.write_all(&[7u8; 65536]).is_ok() {});
        let deadline = Instant::now() + Duration::from_secs(20);
        let stalled = "channel 0's sending thread: writing to the relay connection (it takes nothing)";
        while !waits.describe().contains(stalled) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let described = waits.describe();
        assert!(described.contains(stalled), "{described}");
        assert!(described.contains("channel 0's receiving thread: reading the relay connection"), "{described}");
        abort.raise("test over");
        assert!(pump.join().unwrap().is_err());
        assert!(waits.describe().contains("channel 0's receiving thread: ended"), "{}", waits.describe());
        drop(peer);
    }

    /// A forged peer relay: `frames` sends what it likes (kind, payload) to a destination
    /// pump; returns the pump's result and what reached its QEMU.
    fn forge(frames: impl FnOnce(&mut dyn FnMut(FrameKind, &[u8]))) -> (Result<ChannelReport, RelayFailure>, Vec<u8>) {
        let (mut forger, destination_net) = net_pair();
        let (mut destination_qemu, destination_local) = UnixStream::pair().unwrap();
        let abort = Arc::new(SessionAbort::new());
        let destination = std::thread::spawn(move || {
            pump(0, destination_local, destination_net, RAW, NONE, SessionShared::default(), &abort)
        });
        let mut seq = SeqCounter::default();
        let mut frame = FrameBuf::with_capacity(MAX_CHUNK_BYTES);
        frames(&mut |kind: FrameKind, payload: &[u8]| {
            frame.begin().extend_from_slice(payload);
            frame.seal(kind, 0, seq.take());
            forger.writer.write_all(frame.as_bytes()).unwrap();
        });
        // The relay ends QEMU's incoming stream (whole, or cut by the failure); QEMU then
        // ends its own direction, as a destination QEMU does, and the pump returns.
        let mut received = Vec::new();
        let _ = destination_qemu.read_to_end(&mut received);
        let _ = destination_qemu.shutdown(std::net::Shutdown::Write);
        (destination.join().unwrap(), received)
    }

    #[test]
    fn the_last_chunk_of_a_stream_whose_digest_fails_never_reaches_qemu() {
        let (result, received) = forge(|send| {
            let mut encoder = ChunkEncoder::new(Codec::None);
            send(FrameKind::StreamData, encoder.encode(b"first chunk;"));
            send(FrameKind::StreamData, encoder.encode(b"the end of the stream"));
            let mut digest = StreamDigest::default();
            digest.update(b"first chunk;the end of the streaM");
            send(FrameKind::StreamEnd, &digest.end().encode());
        });
        assert!(result.as_ref().is_err_and(|err| err.to_string().contains("digest mismatch")), "{result:?}");
        assert_eq!(received, b"first chunk;", "only what the next frame vouched for reached QEMU");
    }

    #[test]
    fn a_page_aware_chunk_that_does_not_decode_lets_nothing_held_through() {
        let (result, received) = forge(|send| {
            let mut encoder = RecordEncoder::new(Codec::None, None, 0);
            encoder.other(b"first chunk;");
            send(FrameKind::StreamData, encoder.finish());
            encoder.other(b"second chunk");
            let mut damaged = encoder.finish().to_vec();
            damaged.truncate(damaged.len() - 3);
            send(FrameKind::StreamData, &damaged);
        });
        assert!(result.is_err(), "{result:?}");
        assert_eq!(received, b"", "a chunk is vouched for only by a frame that decodes");
    }

    /// A main stream as QEMU 7.2 ends one: RAM's setup and end sections, a device's state,
    /// the end-of-file marker and the machine's description. Returns it and where the
    /// marker is.
    fn ending_main_stream() -> (Vec<u8>, usize) {
        let mut s = ram_set_up();
        // RAM's end section, with the guest stopped: from here on the migration completes.
        s.extend([0x03, 0, 0, 0, 2]);
        s.extend(0x10u64.to_be_bytes());
        s.extend([0x7e, 0, 0, 0, 2]);
        // A device's state (with zeros in it, and a 0x00 0x06), the marker, the description.
        s.extend([0x04, 0, 0, 0, 3, 5]);
        s.extend(b"timer");
        s.extend([0, 0, 0, 0, 0, 0, 0, 2, 0x00, 0x06, 0xbe, 0xef, 0x00, 0x7e, 0, 0, 0, 3]);
        let marker = s.len();
        s.push(0x00);
        let json = br#"{"page_size": 4096, "devices": []}"#;
        s.push(0x06);
        s.extend((json.len() as u32).to_be_bytes());
        s.extend(json);
        (s, marker)
    }

    /// Sends `stream` to a destination pump in `cuts` (a heartbeat after each), then a
    /// StreamEnd whose digest is right or not; returns the pump's result and what reached
    /// QEMU.
    fn deliver_in_pieces(
        stream: &[u8],
        cuts: &[usize],
        digest_right: bool,
    ) -> (Result<ChannelReport, RelayFailure>, Vec<u8>) {
        forge(|send| {
            let mut encoder = ChunkEncoder::new(Codec::None);
            let mut start = 0;
            for &cut in cuts.iter().chain([&stream.len()]) {
                send(FrameKind::StreamData, encoder.encode(&stream[start..cut]));
                send(FrameKind::Heartbeat, &[]);
                start = cut;
            }
            let mut digest = StreamDigest::default();
            digest.update(stream);
            if !digest_right {
                digest.update(b"!");
            }
            send(FrameKind::StreamEnd, &digest.end().encode());
        })
    }

    #[test]
    fn qemus_end_of_file_marker_waits_for_the_digest_whatever_arrives_after_it() {
        let (stream, marker) = ending_main_stream();
        // The marker in a chunk of its own, in the middle of one, and with the description
        // arriving later in pieces: heartbeats and later chunks release everything before
        // it, nothing from it on, until the stream's end checks out.
        for cuts in [vec![marker, marker + 1, marker + 4], vec![marker - 3, marker + 2], vec![marker + 1]] {
            let (result, received) = deliver_in_pieces(&stream, &cuts, false);
            assert!(result.as_ref().is_err_and(|e| e.to_string().contains("digest mismatch")), "{result:?}");
            assert_eq!(received, &stream[..marker], "cuts {cuts:?}: QEMU got nothing from its end marker on");
            let (result, received) = deliver_in_pieces(&stream, &cuts, true);
            let held = result.as_ref().map(|report| report.received.held_for_digest);
            assert_eq!(held.ok(), Some((stream.len() - marker) as u64), "{result:?}");
            assert_eq!(received, stream, "cuts {cuts:?}: a stream that checks out arrives whole");
        }
    }

    /// A whole main stream (set-up, one iteration of `pages` in block pc.ram, and the
    /// ending of `ending_main_stream`), as QEMU 7.2 writes one.
    fn main_stream_with_pages(pages: &[Vec<u8>]) -> Vec<u8> {
        let (ending, _) = ending_main_stream();
        let set_up = ram_set_up();
        let mut s = set_up.clone();
        s.extend([0x02, 0, 0, 0, 2]);
        for (i, page) in pages.iter().enumerate() {
            let first = i == 0;
            s.extend(((i as u64 * 0x1000) | 0x08 | if first { 0 } else { 0x20 }).to_be_bytes());
            if first {
                s.push(6);
                s.extend(b"pc.ram");
            }
            s.extend(page);
        }
        s.extend(0x10u64.to_be_bytes());
        s.extend([0x7e, 0, 0, 0, 2]);
        s.extend(&ending[set_up.len()..]);
        s
    }

    /// `count` pages of 16-bit numbers in 32-bit words (zstd or a shuffle halves them, lz4
    /// barely), each `version` in its word 1.
    fn numeric_pages(count: usize, version: u32) -> Vec<Vec<u8>> {
        let mut seed = 7u64;
        (0..count)
            .map(|_| {
                let mut page: Vec<u8> = (0..PAGE_BYTES / 4)
                    .flat_map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 48) as u32).to_le_bytes()
                    })
                    .collect();
                page[4..8].copy_from_slice(&version.to_le_bytes());
                page
            })
            .collect()
    }

    /// A source relay's session: its pool and cache, and the destination relay's cache.
    struct Session {
        pool: Option<Arc<SessionCompression>>,
        caches: (SessionShared, SessionShared),
        encoding: Encoding,
        abort: Arc<SessionAbort>,
    }

    impl Session {
        fn new(codec: Codec, xbzrle_cache_pages: u32) -> Session {
            let abort = Arc::new(SessionAbort::new());
            let cache =
                || (xbzrle_cache_pages > 0).then(|| Arc::new(SharedPageCache::new(xbzrle_cache_pages as usize, 4)));
            let caches = (
                SessionShared { outgoing: cache(), ..Default::default() },
                SessionShared { incoming: cache(), ..Default::default() },
            );
            Session { pool: two(codec, &abort), caches, encoding: Encoding { codec, xbzrle_cache_pages }, abort }
        }

        /// Carries `stream` on `channel` of the session, from a fake source QEMU to a fake
        /// destination QEMU; the thread returns what arrived and both channel reports.
        fn carry(
            &self,
            channel: u16,
            stream: Vec<u8>,
        ) -> std::thread::JoinHandle<(Vec<u8>, ChannelReport, ChannelReport)> {
            let (source_net, destination_net) = net_pair();
            let (mut source_qemu, source_local) = UnixStream::pair().unwrap();
            let (mut destination_qemu, destination_local) = UnixStream::pair().unwrap();
            let (pool, abort, encoding) = (self.pool.clone(), self.abort.clone(), self.encoding);
            let (source_caches, destination_caches) = self.caches.clone();
            let source = std::thread::spawn(move || {
                pump(channel, source_local, source_net, encoding, pool, source_caches, &abort)
            });
            let destination = std::thread::spawn(move || {
                let abort = Arc::new(SessionAbort::new());
                pump(channel, destination_local, destination_net, encoding, NONE, destination_caches, &abort)
            });
            std::thread::spawn(move || {
                let writer = std::thread::spawn(move || {
                    source_qemu.write_all(&stream).unwrap();
                    source_qemu.shutdown(Shutdown::Write).unwrap();
                    let mut back = Vec::new();
                    source_qemu.read_to_end(&mut back).unwrap();
                });
                let mut received = Vec::new();
                destination_qemu.read_to_end(&mut received).unwrap();
                destination_qemu.shutdown(Shutdown::Write).unwrap();
                writer.join().unwrap();
                (received, source.join().unwrap().unwrap(), destination.join().unwrap().unwrap())
            })
        }
    }

    #[test]
    fn streams_share_one_adaptive_pool_and_arrive_exactly() {
        let pages = numeric_pages(600, 0);
        let session = Session::new(Codec::Adaptive, 0);
        let streams: Vec<Vec<u8>> = [&pages[..300], &pages[300..]].iter().map(|p| main_stream_with_pages(p)).collect();
        let carried: Vec<_> = streams.iter().enumerate().map(|(i, s)| session.carry(i as u16, s.clone())).collect();
        for (stream, carried) in streams.iter().zip(carried) {
            let (received, source, destination) = carried.join().unwrap();
            assert!(received == *stream, "channel {}: the stream changed on the way", source.channel);
            assert_eq!(source.pages, 300);
            let (sent, received) = (source.sent, destination.received);
            assert_eq!(
                (received.bytes, received.wire_bytes, received.chunks),
                (sent.bytes, sent.wire_bytes, sent.chunks)
            );
            // Every page-aware chunk went through the pool, each with the codec chosen for it.
            assert_eq!(source.codecs.values().sum::<u64>(), source.sent.chunks, "{:?}", source.codecs);
        }
    }

    /// A completed main stream leaves each relay's stamps of its switchover, in order: the
    /// source read the RAM's end, then the marker, then sent the digest after it; the
    /// destination received the RAM's end, then the digest, then handed the marker on.
    #[test]
    fn a_completing_main_stream_is_stamped_at_each_step_of_its_switchover() {
        // Through the session's pool (adaptive), and written by the stream's reader itself.
        for pooled in [true, false] {
            let mut session = Session::new(Codec::Adaptive, 0);
            if !pooled {
                session.pool = NONE;
            }
            stamped_in_order(&session);
        }
    }

    fn stamped_in_order(session: &Session) {
        let stream = main_stream_with_pages(&numeric_pages(40, 0));
        let (received, source, destination) = session.carry(0, stream.clone()).join().unwrap();
        assert!(received == stream, "the stream changed on the way");
        let (sent, got) = (source.sent, destination.received);
        let stamps = [
            sent.ram_ended_at_us,
            sent.end_marker_at_us,
            sent.end_marker_sent_at_us,
            got.end_marker_arrived_at_us,
            got.end_marker_at_us,
        ];
        let stamps: Vec<u64> = stamps.iter().map(|stamp| stamp.expect("every step stamped")).collect();
        assert!(stamps.windows(2).all(|pair| pair[0] <= pair[1]), "out of order: {stamps:?}");
        let got_ram = got.ram_ended_at_us.expect("the destination saw the RAM's end");
        assert!(sent.ram_ended_at_us.unwrap() <= got_ram && got_ram <= got.end_marker_at_us.unwrap());
    }

    #[test]
    fn a_page_carried_again_on_another_stream_goes_as_a_delta() {
        // Stream 0 carries the pages, then stream 1 their next versions (as QEMU's multifd
        // does, on whichever channel is free): one cache for both, so they go as deltas.
        let session = Session::new(Codec::Lz4, 1024);
        let first = main_stream_with_pages(&numeric_pages(200, 1));
        let again = main_stream_with_pages(&numeric_pages(200, 2));
        let (received, source, _) = session.carry(0, first.clone()).join().unwrap();
        assert!(received == first);
        assert_eq!(source.encodings.xbzrle, 0);
        let (received, source, _) = session.carry(1, again.clone()).join().unwrap();
        assert!(received == again, "the deltas rebuilt the next versions");
        assert_eq!((source.encodings.xbzrle, source.encodings.uncached), (200, 0), "{:?}", source.encodings);
        assert!(source.sent.wire_bytes < 200 * 64, "{:?}", source.sent);
    }

    #[test]
    fn a_checkpoint_lets_the_end_marker_through_before_the_stream_ends() {
        let (stream, marker) = ending_main_stream();
        let digest_of = |bytes: &[u8]| {
            let mut digest = StreamDigest::default();
            digest.update(bytes);
            digest.end().encode()
        };
        for checkpoint_right in [true, false] {
            let (result, received) = forge(|send| {
                let mut encoder = ChunkEncoder::new(Codec::None);
                send(FrameKind::StreamData, encoder.encode(&stream));
                let mut point = digest_of(&stream);
                point[8] ^= u8::from(!checkpoint_right);
                send(FrameKind::StreamCheckpoint, &point);
                // A stream end that does not check out: what the checkpoint let through
                // stays delivered, and the relay fails.
                send(FrameKind::StreamEnd, &digest_of(b"something else"));
            });
            assert!(result.as_ref().is_err_and(|e| e.to_string().contains("digest mismatch")), "{result:?}");
            if checkpoint_right {
                assert_eq!(received, stream, "the checkpoint released the marker and the description");
            } else {
                // The failed checkpoint ends the stream there: QEMU got at most what came
                // before the marker.
                assert!(received.len() <= marker && stream.starts_with(&received), "{} bytes", received.len());
            }
        }
    }
}
