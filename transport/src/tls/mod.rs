//! Authenticated, encrypted connections: TLS 1.3 (rustls) over any byte pipe, so the kernel's
//! TCP and the dataplane's smoltcp connections are wrapped the same way. Guest memory is as
//! sensitive as data gets, so both ends prove who they are before a byte of it moves:
//!
//! * mutual certificates ([`TlsAuth::Certificates`]): each side presents its chain and
//!   checks the peer's against a CA it was given;
//! * a pre-shared key ([`TlsAuth::PreSharedKey`]) for simple setups: the same mutual TLS,
//!   with a certificate authority derived from the key (`psk.rs`), so only holders of the
//!   key can present a certificate the other side accepts.
//!
//! The handshake runs when a connection opens ([`TlsConnector`], [`TlsAcceptor`]), and the
//! source waits for the destination's go-ahead, so a source the destination refuses learns
//! it from `connect`, before the migration's own hello. The engine then sees an ordinary
//! [`Connection`] whose halves encrypt and decrypt (`stream.rs`).

mod credentials;
mod psk;
mod stream;

pub use credentials::{TlsAuth, TlsClient, TlsError, TlsSettings};
pub use psk::MIN_SECRET_BYTES;

use crate::pipe::{Acceptor, Connection, Connector};
use rustls::{ClientConnection, ServerConfig, ServerConnection};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens connections through an inner connector and secures each one.
pub struct TlsConnector {
    inner: Box<dyn Connector>,
    client: TlsClient,
}

impl TlsConnector {
    pub fn new(inner: Box<dyn Connector>, client: TlsClient) -> Self {
        TlsConnector { inner, client }
    }
}

impl Connector for TlsConnector {
    fn connect(&self) -> io::Result<Connection> {
        let connection = self.inner.connect()?;
        let session = ClientConnection::new(self.client.config.clone(), self.client.server_name.clone())
            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        stream::secure_client(connection, session)
    }
}

/// At most this many handshakes run at once on a listener; more connections are closed
/// unanswered, so strangers cannot pile up threads.
const MAX_PENDING_HANDSHAKES: usize = 16;
/// How often `accept` looks up from the listener to collect finished handshakes.
const ACCEPT_SLICE: Duration = Duration::from_millis(5);

type Handshaken = Result<Connection, String>;

/// Accepts connections from an inner acceptor and secures each one. Handshakes run on
/// threads of their own, so a silent or slow stranger holds up no one; a connection that
/// fails its handshake (no certificate, the wrong CA or key, not TLS at all) is refused
/// with a warning on stderr and the listener keeps waiting for the real source.
pub struct TlsAcceptor {
    inner: Box<dyn Acceptor>,
    config: Arc<ServerConfig>,
    pending: Arc<AtomicUsize>,
    done_tx: Sender<Handshaken>,
    done_rx: Receiver<Handshaken>,
}

impl TlsAcceptor {
    pub fn new(inner: Box<dyn Acceptor>, config: Arc<ServerConfig>) -> Self {
        let (done_tx, done_rx) = channel();
        TlsAcceptor { inner, config, pending: Arc::new(AtomicUsize::new(0)), done_tx, done_rx }
    }

    fn start_handshake(&self, connection: Connection) {
        if self.pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
            eprintln!("vmigrate: warning: refused a connection from {}: too many TLS handshakes at once", connection.peer);
            (connection.closer)();
            return;
        }
        let session = match ServerConnection::new(self.config.clone()) {
            Ok(session) => session,
            Err(e) => {
                let _ = self.done_tx.send(Err(format!("TLS: {e}")));
                return;
            }
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let pending = self.pending.clone();
        let done = self.done_tx.clone();
        let peer = connection.peer.clone();
        let spawned = std::thread::Builder::new().name("tls-handshake".into()).spawn(move || {
            let result = stream::secure_server(connection, session).map_err(|e| format!("{peer}: {e}"));
            pending.fetch_sub(1, Ordering::AcqRel);
            let _ = done.send(result);
        });
        if spawned.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Acceptor for TlsAcceptor {
    fn accept(&mut self, timeout: Duration) -> io::Result<Connection> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(result) = self.done_rx.try_recv() {
                match result {
                    Ok(connection) => return Ok(connection),
                    Err(reason) => eprintln!("vmigrate: warning: refused a TLS connection from {reason}"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection from the source in time"));
            }
            match self.inner.accept(left.min(ACCEPT_SLICE)) {
                Ok(connection) => self.start_handshake(connection),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn local_addr(&self) -> String {
        self.inner.local_addr()
    }
}
