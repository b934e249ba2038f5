//! The source relay (`vmigrate qemu-send`): a unix socket the source QEMU migrates to
//! (`migrate unix:PATH`), and one relay connection per stream QEMU opens on it.
//!
//! QEMU opens its main channel first and then, with the multifd capability, one connection
//! per multifd channel. Each connection is told apart by its first bytes (`doorway.rs`):
//! the main stream is channel 0, the multifd streams follow in the order they spoke, and
//! anything else on the socket is turned away with a warning, holding up nothing. Each
//! stream is announced to the destination relay (and accepted by it, which means the
//! destination QEMU took the matching connection) before the next: so the destination
//! opens its connections in the same order. The session ends when the main channel has
//! ended both ways and every other channel has too.

use crate::channel::{pump, SessionShared};
use crate::compression::{CompressionConfig, SessionCompression};
use crate::control::{RelayControls, Watched};
use crate::doorway::{look_at, peer_of, Arrival};
use crate::waits::SessionWaits;
use crate::{collect, ChannelReport, LinkFailure, RelayFailure, RelayReport};
use migration::frame::{FrameKind, SeqCounter};
use migration::handshake::{decode_reason, HelloAck};
use migration::relay::{encode_preamble, Encoding, StreamHello, MAX_CHANNELS};
use migration::relay_cache::SharedPageCache;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;
use transport::framed::{read_frame, write_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pipe::{Connection, Connector};

/// How often the accept loop looks for new streams and finished ones.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct SourceRelayConfig {
    /// How the carried streams are encoded (codec, XBZRLE cache).
    pub encoding: Encoding,
    /// Compression workers, one pool for all the session's streams (0: each stream's
    /// sending thread compresses).
    pub compress_threads: usize,
    /// Pin the workers to cores, from core 0 up.
    pub pin_workers: bool,
    /// How long to wait for the source QEMU's main stream (strangers on the socket do not
    /// count).
    pub first_connection_timeout: Duration,
}

/// A bound source relay, waiting for QEMU. The socket file is removed when it is dropped.
pub struct SourceRelay {
    listener: UnixListener,
    path: PathBuf,
    config: SourceRelayConfig,
}

impl SourceRelay {
    /// Listens on the unix socket `path`. A stale socket file (nobody listening) is
    /// replaced; a live one is an error.
    pub fn bind(path: &Path, config: SourceRelayConfig) -> Result<SourceRelay, RelayFailure> {
        let listener = bind_unix(path)?;
        listener.set_nonblocking(true).map_err(RelayFailure::local)?;
        Ok(SourceRelay { listener, path: path.to_path_buf(), config })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Carries one migration session: every stream the source QEMU opens, over
    /// connections from `connector`, until all have ended; `controls` are the operator's.
    pub fn run(self, connector: &dyn Connector, controls: Arc<RelayControls>) -> Result<RelayReport, RelayFailure> {
        let started = Instant::now();
        let session_id: u64 = rand::random();
        let abort = Arc::new(SessionAbort::new());
        let waits = SessionWaits::watching(&abort);
        let _watched = Watched::start(&controls, &abort, waits.clone());
        let compression = CompressionConfig {
            codec: self.config.encoding.codec,
            workers: self.config.compress_threads,
            first_cpu: self.config.pin_workers.then_some(0),
        };
        let compression = SessionCompression::start(compression, abort.clone()).map_err(RelayFailure::local)?;
        // One XBZRLE cache for all the streams: QEMU's multifd puts a page's next version
        // on whichever channel is free.
        let pages = self.config.encoding.xbzrle_cache_pages as usize;
        let caches = SessionShared {
            outgoing: (pages > 0).then(|| Arc::new(SharedPageCache::new(pages, MAX_CHANNELS))),
            incoming: None,
            controls: controls.clone(),
            waits,
        };
        let mut streams = Streams {
            connector,
            session_id,
            encoding: self.config.encoding,
            compression,
            caches,
            abort: abort.clone(),
            pumps: Vec::new(),
            multifd_waiting: Vec::new(),
        };
        // Every connection is looked at on a thread of its own (`doorway`), which this
        // flag lets go when the session ends, however it ends.
        let over = OverOnDrop(Arc::new(AtomicBool::new(false)));
        let (arrived, arrivals) = mpsc::channel();
        let deadline = started + self.config.first_connection_timeout;
        loop {
            if streams.main_done() || abort.is_raised() {
                break;
            }
            self.accept_waiting(&arrived, &over.0)?;
            match arrivals.recv_timeout(POLL) {
                Ok(Arrival::Main(local)) if streams.pumps.is_empty() => streams.start(local)?,
                Ok(Arrival::Main(local)) => self.turn_away(&peer_of(&local), "a second main stream in one session"),
                Ok(Arrival::Multifd(local)) => streams.multifd_waiting.push(local),
                Ok(Arrival::Stranger { peer, why }) => self.turn_away(&peer, &why),
                Err(_) if streams.pumps.is_empty() && Instant::now() >= deadline => {
                    return Err(RelayFailure::Local(format!(
                        "no migration stream from QEMU on {} within {:?}",
                        self.path.display(),
                        self.config.first_connection_timeout
                    )));
                }
                Err(_) => {}
            }
            // The destination QEMU takes its first connection as the main stream: the
            // multifd streams follow it, in the order they spoke, until one fails.
            if !streams.pumps.is_empty() {
                for local in std::mem::take(&mut streams.multifd_waiting) {
                    if abort.is_raised() {
                        break;
                    }
                    streams.start(local)?;
                }
            }
        }
        let channels = collect(streams.pumps, &abort)?;
        Ok(RelayReport { session_id, channels, seconds: started.elapsed().as_secs_f64() })
    }
}

impl SourceRelay {
    /// Hands every connection waiting on the socket to the doorway.
    fn accept_waiting(&self, arrived: &mpsc::Sender<Arrival>, over: &Arc<AtomicBool>) -> Result<(), RelayFailure> {
        loop {
            match self.listener.accept() {
                Ok((local, _)) => look_at(local, arrived.clone(), over.clone()),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(RelayFailure::Local(format!("accepting QEMU's connection: {err}"))),
            }
        }
    }

    /// A connection that is not one of QEMU's streams, closed (by the caller dropping it).
    fn turn_away(&self, peer: &str, why: &str) {
        log::warn!("turned away a connection on unix:{} from {peer}: {why}", self.path.display());
    }
}

/// Sets the flag when dropped.
struct OverOnDrop(Arc<AtomicBool>);

impl Drop for OverOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The session's streams: the pumps carrying those started, in channel order, and the
/// multifd streams that came before the main one.
struct Streams<'a> {
    connector: &'a dyn Connector,
    session_id: u64,
    encoding: Encoding,
    compression: Option<Arc<SessionCompression>>,
    caches: SessionShared,
    abort: Arc<SessionAbort>,
    pumps: Vec<(u16, JoinHandle<Result<ChannelReport, RelayFailure>>)>,
    multifd_waiting: Vec<UnixStream>,
}

impl Streams<'_> {
    fn main_done(&self) -> bool {
        self.pumps.first().is_some_and(|(_, pump)| pump.is_finished())
    }

    /// Carries `local` as the next channel: announced to the destination relay (which
    /// answers once its QEMU took the matching connection), then pumped on a thread.
    fn start(&mut self, local: UnixStream) -> Result<(), RelayFailure> {
        let channel = self.pumps.len() as u16;
        if channel >= MAX_CHANNELS {
            self.abort.raise(format!("QEMU opened more than {MAX_CHANNELS} streams"));
            return Ok(());
        }
        let net = match open_stream(self.connector, self.session_id, channel, self.encoding) {
            Ok(net) => net,
            Err(err) => {
                // QEMU's stream closes unanswered: its migration fails.
                self.abort.raise(format!("channel {channel}: {err}"));
                return Ok(());
            }
        };
        self.caches.controls.meter.stream_opened();
        let (abort, compression, caches) = (self.abort.clone(), self.compression.clone(), self.caches.clone());
        let encoding = self.encoding;
        let pump = std::thread::Builder::new()
            .name(format!("relay-{channel}"))
            .spawn(move || pump(channel, local, net, encoding, compression, caches, &abort))
            .map_err(RelayFailure::local)?;
        self.pumps.push((channel, pump));
        Ok(())
    }
}

impl Drop for SourceRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path`, replacing a socket file nobody listens on any more.
pub(super) fn bind_unix(path: &Path) -> Result<UnixListener, RelayFailure> {
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(RelayFailure::Local(format!("{} is in use by another listener", path.display())));
            }
            std::fs::remove_file(path).map_err(RelayFailure::local)?;
            UnixListener::bind(path)
                .map_err(|err| RelayFailure::Local(format!("listening on {}: {err}", path.display())))
        }
        Err(err) => Err(RelayFailure::Local(format!("listening on {}: {err}", path.display()))),
    }
}

/// Opens the relay connection for stream `channel` and has the destination relay accept
/// it (which it does once its QEMU has taken the matching connection).
fn open_stream(
    connector: &dyn Connector,
    session_id: u64,
    channel: u16,
    encoding: Encoding,
) -> Result<Connection, RelayFailure> {
    let mut net = connector.connect().map_err(|err| {
        RelayFailure::link(io::Error::new(err.kind(), format!("connecting to the destination relay: {err}")))
    })?;
    net.writer.write_all(&encode_preamble()).map_err(RelayFailure::link)?;
    let hello = StreamHello { session_id, channel, encoding };
    let mut seq = SeqCounter::default();
    write_frame(&mut *net.writer, FrameKind::StreamHello, 0, &mut seq, &hello.encode()).map_err(RelayFailure::link)?;
    let mut payload = Vec::new();
    let header = match read_frame(&mut *net.reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES) {
        Ok(header) => header,
        Err(ReadError::Closed) => {
            let lost = "the destination relay closed the connection".to_string();
            return Err(RelayFailure::Link(LinkFailure::Lost(lost)));
        }
        Err(err) => return Err(RelayFailure::read("waiting for the destination relay", &err)),
    };
    match header.kind {
        FrameKind::HelloAck => match HelloAck::decode(&payload) {
            Ok(HelloAck::Accepted { .. }) => {}
            Ok(HelloAck::Refused { reason }) => return Err(RelayFailure::Refused(reason)),
            Err(err) => return Err(RelayFailure::damaged(err)),
        },
        FrameKind::Abort => return Err(RelayFailure::Refused(decode_reason(&payload))),
        other => return Err(RelayFailure::unexpected(format!("the destination relay answered with {other:?}"))),
    }
    // The stream's own frames count from 0 again: the handshake was one frame each way.
    Ok(net)
}
