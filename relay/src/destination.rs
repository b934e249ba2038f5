//! The destination relay (`vmigrate qemu-recv`): accepts the source relay's connections and
//! opens, for each, a connection to the destination QEMU's `-incoming unix:PATH`, in the
//! order the source QEMU opened its streams (QEMU 7.2 takes the first connection as its
//! main channel).
//!
//! One session at a time: a connection that belongs to another session, or comes out of
//! order, is refused with a reason. The session ends when the main channel has ended both
//! ways and every other channel has too.

use crate::channel::{pump, SessionShared};
use crate::control::{RelayControls, Watched};
use crate::waits::SessionWaits;
use crate::{collect, RelayFailure, RelayReport};
use migration::frame::{FrameKind, SeqCounter};
use migration::handshake::HelloAck;
use migration::relay::MAX_CHANNELS;
use migration::relay::{accept_preamble, StreamHello, PREAMBLE_BYTES};
use migration::relay_cache::SharedPageCache;
use std::convert::Infallible;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;
use transport::framed::{read_frame, write_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::lobby::{Lobby, LobbyError, Refusal};
use transport::pipe::{Acceptor, Connection};

/// How long one accept waits before the loop looks at finished streams.
const POLL: Duration = Duration::from_millis(50);
/// How long a connection has to send its preamble and hello before it is taken for a
/// stranger and closed (a source relay sends both as soon as it has connected).
const GREETING_TIME: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DestinationRelayConfig {
    /// The destination QEMU's incoming unix socket.
    pub qemu: PathBuf,
    /// How long to wait for the source relay's first connection.
    pub first_connection_timeout: Duration,
    /// How long to keep trying QEMU's socket (it may still be starting).
    pub qemu_connect_timeout: Duration,
}

/// Carries one migration session from the source relay to the destination QEMU.
pub fn relay_destination(
    acceptor: &mut dyn Acceptor,
    config: &DestinationRelayConfig,
    controls: Arc<RelayControls>,
) -> Result<RelayReport, RelayFailure> {
    let started = Instant::now();
    let abort = Arc::new(SessionAbort::new());
    let waits = SessionWaits::watching(&abort);
    let _watched = Watched::start(&controls, &abort, waits.clone());
    let mut session: Option<u64> = None;
    // The session's XBZRLE cache, made with its first stream (every hello of a session
    // gives the same size).
    let mut caches = SessionShared { controls: controls.clone(), waits, ..Default::default() };
    let mut pumps: Vec<(u16, JoinHandle<Result<_, RelayFailure>>)> = Vec::new();
    // Each connection greets on a thread of its own: a stranger holds up no stream.
    let mut lobby = Lobby::new(GREETING_TIME, greet);
    loop {
        if pumps.first().is_some_and(|(_, pump)| pump.is_finished()) || abort.is_raised() {
            break;
        }
        let (mut net, hello) = match lobby.accept(acceptor, POLL) {
            Ok(greeted) => greeted,
            Err(LobbyError::TimedOut) => {
                if session.is_none() && started.elapsed() >= config.first_connection_timeout {
                    return Err(RelayFailure::Local(format!(
                        "no connection from the source relay within {:?}{}",
                        config.first_connection_timeout,
                        lobby.turned_away().summary()
                    )));
                }
                continue;
            }
            Err(LobbyError::Accept(err)) => {
                return Err(RelayFailure::Local(format!("accepting the source relay: {err}")))
            }
            Err(LobbyError::Fatal(never)) => match never {},
        };
        let expected = pumps.len() as u16;
        let belongs = match session {
            None => hello.channel == 0,
            Some(id) => id == hello.session_id && hello.channel == expected,
        };
        if !belongs {
            let reason = match session {
                Some(id) if id != hello.session_id => "another migration session is in progress".to_string(),
                _ => format!("stream {} out of order: expected stream {expected}", hello.channel),
            };
            refuse(&mut net, &reason);
            continue;
        }
        let local = match connect_qemu(&config.qemu, config.qemu_connect_timeout) {
            Ok(local) => local,
            Err(reason) => {
                refuse(&mut net, &reason);
                abort.raise(format!("channel {}: {reason}", hello.channel));
                break;
            }
        };
        let mut seq = SeqCounter::default();
        let accepted = HelloAck::Accepted { version: migration::relay::VERSION_MAX }.encode();
        if let Err(err) = write_frame(&mut *net.writer, FrameKind::HelloAck, 0, &mut seq, &accepted) {
            abort.raise(format!("channel {}: answering the source relay: {err}", hello.channel));
            break;
        }
        if session.is_none() && hello.encoding.xbzrle_cache_pages > 0 {
            let pages = hello.encoding.xbzrle_cache_pages as usize;
            caches.incoming = Some(Arc::new(SharedPageCache::new(pages, MAX_CHANNELS)));
        }
        session = Some(hello.session_id);
        controls.meter.stream_opened();
        let (channel, abort, caches) = (hello.channel, abort.clone(), caches.clone());
        let pump = std::thread::Builder::new()
            .name(format!("relay-{channel}"))
            .spawn(move || pump(channel, local, net, hello.encoding, None, caches, &abort))
            .map_err(RelayFailure::local)?;
        pumps.push((channel, pump));
    }
    let session_id = session.unwrap_or_default();
    let channels = collect(pumps, &abort)?;
    Ok(RelayReport { session_id, channels, seconds: started.elapsed().as_secs_f64() })
}

/// A connection's greeting: its `StreamHello`; one that is not ours to carry (a stranger,
/// or a vmigrate engine stream) is refused with the reason and turned away, and the relay
/// goes on waiting: a session in progress is not disturbed.
fn greet(net: &mut Connection) -> Result<StreamHello, Refusal<Infallible>> {
    read_hello(net).map_err(|reason| {
        refuse(net, &reason);
        Refusal::Stranger(reason)
    })
}

/// Reads a connection's relay preamble and `StreamHello`; the error is the reason to give.
fn read_hello(net: &mut Connection) -> Result<StreamHello, String> {
    let mut preamble = [0u8; PREAMBLE_BYTES];
    net.reader.read_exact(&mut preamble).map_err(|err| format!("no relay preamble: {err}"))?;
    if preamble[..8] == migration::handshake::MAGIC {
        return Err("this is a QEMU relay (vmigrate qemu-recv), not a vmigrate destination".into());
    }
    accept_preamble(&preamble).map_err(|err| err.to_string())?;
    let mut payload = Vec::new();
    let header =
        read_frame(&mut *net.reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES).map_err(|err| match err {
            ReadError::Closed => "closed before its hello".to_string(),
            other => other.to_string(),
        })?;
    if header.kind != FrameKind::StreamHello || header.seq != 0 {
        return Err(format!("expected a stream hello, got {:?} (seq {})", header.kind, header.seq));
    }
    StreamHello::decode(&payload).map_err(|err| err.to_string())
}

/// Tells the peer why its connection is refused, then closes it.
fn refuse(net: &mut Connection, reason: &str) {
    let mut seq = SeqCounter::default();
    let refused = HelloAck::Refused { reason: reason.to_string() }.encode();
    let _ = write_frame(&mut *net.writer, FrameKind::HelloAck, 0, &mut seq, &refused);
    (net.closer)();
}

/// Connects to QEMU's incoming socket, retrying while it is not there yet.
fn connect_qemu(path: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(err)
                if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(format!("the destination QEMU at unix:{}: {err}", path.display())),
        }
    }
}
