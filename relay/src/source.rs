//! The source relay (`vmigrate qemu-send`): a unix socket the source QEMU migrates to
//! (`migrate unix:PATH`), and one relay connection per stream QEMU opens on it.
//!
//! QEMU opens its main channel first and then, with the multifd capability, one connection
//! per multifd channel. Streams are numbered in the order they are accepted, and each is
//! announced to the destination relay (and accepted by it, which means the destination
//! QEMU took the matching connection) before the next is accepted: so the destination
//! opens its connections in the same order. The session ends when the main channel has
//! ended both ways and every other channel has too.

use crate::channel::{pump, SessionShared};
use crate::compression::{CompressionConfig, SessionCompression};
use crate::control::{RelayControls, Watched};
use crate::{collect, LinkFailure, RelayFailure, RelayReport};
use migration::frame::{FrameKind, SeqCounter};
use migration::handshake::{decode_reason, HelloAck};
use migration::relay::{encode_preamble, Encoding, StreamHello, MAX_CHANNELS};
use migration::relay_cache::SharedPageCache;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// How long to wait for the source QEMU's first connection.
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
        let _watched = Watched::start(&controls, &abort);
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
        };
        let mut pumps = Vec::new();
        let deadline = started + self.config.first_connection_timeout;
        loop {
            let main_done =
                pumps.first().is_some_and(|(_, pump): &(u16, std::thread::JoinHandle<_>)| pump.is_finished());
            if main_done || abort.is_raised() {
                break;
            }
            match self.listener.accept() {
                Ok((local, _)) => {
                    let channel = pumps.len() as u16;
                    if channel >= MAX_CHANNELS {
                        abort.raise(format!("QEMU opened more than {MAX_CHANNELS} streams"));
                        break;
                    }
                    match open_stream(connector, session_id, channel, self.config.encoding) {
                        Ok(net) => {
                            controls.meter.stream_opened();
                            let (abort, compression, caches) = (abort.clone(), compression.clone(), caches.clone());
                            let encoding = self.config.encoding;
                            let pump = std::thread::Builder::new()
                                .name(format!("relay-{channel}"))
                                .spawn(move || pump(channel, local, net, encoding, compression, caches, &abort))
                                .map_err(RelayFailure::local)?;
                            pumps.push((channel, pump));
                        }
                        Err(err) => {
                            // QEMU's stream closes unanswered: its migration fails.
                            drop(local);
                            abort.raise(format!("channel {channel}: {err}"));
                            break;
                        }
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if pumps.is_empty() && Instant::now() >= deadline {
                        return Err(RelayFailure::Local(format!(
                            "no connection from QEMU on {} within {:?}",
                            self.path.display(),
                            self.config.first_connection_timeout
                        )));
                    }
                    std::thread::sleep(POLL);
                }
                Err(err) => return Err(RelayFailure::Local(format!("accepting QEMU's connection: {err}"))),
            }
        }
        let channels = collect(pumps, &abort)?;
        Ok(RelayReport { session_id, channels, seconds: started.elapsed().as_secs_f64() })
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
