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
mod direct;
mod psk;
mod record;
mod session;
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
        let (config, secrets) = record::keyed(&self.client.config);
        let session = ClientConnection::new(config, self.client.server_name.clone())
            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        stream::secure_client(connection, session, &secrets)
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
    on_refusal: Box<dyn Fn(&str) + Send>,
}

impl TlsAcceptor {
    pub fn new(inner: Box<dyn Acceptor>, config: Arc<ServerConfig>) -> Self {
        let (done_tx, done_rx) = channel();
        TlsAcceptor {
            inner,
            config,
            pending: Arc::new(AtomicUsize::new(0)),
            done_tx,
            done_rx,
            on_refusal: Box::new(|reason| log::warn!("refused a TLS connection from {reason}")),
        }
    }

    /// Where refusals are reported (by default a warning through the log facade).
    pub fn on_refusal(mut self, report: impl Fn(&str) + Send + 'static) -> Self {
        self.on_refusal = Box::new(report);
        self
    }

    fn start_handshake(&self, connection: Connection) {
        if self.pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
            (self.on_refusal)(&format!("{}: too many TLS handshakes at once", connection.peer));
            (connection.closer)();
            return;
        }
        let (config, secrets) = record::keyed(&self.config);
        let session = match ServerConnection::new(config) {
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
            let result = stream::secure_server(connection, session, &secrets).map_err(|e| format!("{peer}: {e}"));
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
                    Err(reason) => (self.on_refusal)(&reason),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe::{TcpAcceptor, TcpConnector, Timeouts};
    use std::io::{Read, Write};
    use std::sync::Mutex;

    fn psk(secret: &str) -> TlsSettings {
        TlsSettings { auth: TlsAuth::PreSharedKey { secret: secret.as_bytes().to_vec() }, server_name: None }
    }

    const KEY_A: &str = "0123456789abcdef0123456789abcdef";
    const KEY_B: &str = "0123456789abcdef0123456789abcdeX";

    /// A TLS listener on loopback kernel TCP whose refusals are collected.
    fn listener(settings: &TlsSettings) -> (TlsAcceptor, String, Arc<Mutex<Vec<String>>>) {
        let tcp = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default()).unwrap();
        let address = tcp.local_socket_addr().unwrap().to_string();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let seen = refusals.clone();
        let acceptor = TlsAcceptor::new(Box::new(tcp), settings.server().unwrap())
            .on_refusal(move |reason| seen.lock().unwrap().push(reason.to_string()));
        (acceptor, address, refusals)
    }

    fn connector(settings: &TlsSettings, address: &str) -> TlsConnector {
        let tcp = TcpConnector::new(address, Timeouts::default()).unwrap();
        TlsConnector::new(Box::new(tcp), settings.client("127.0.0.1").unwrap())
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Both ends write 32 MiB while reading the other's 32 MiB: the two halves of one
    /// session never wait on each other, and every byte arrives in order.
    #[test]
    fn both_directions_at_once_arrive_whole() {
        const BYTES: usize = 32 << 20;
        let settings = psk(KEY_A);
        let (mut acceptor, address, _) = listener(&settings);
        let client = std::thread::spawn(move || connector(&psk(KEY_A), &address).connect().unwrap());
        let server = acceptor.accept(Duration::from_secs(10)).unwrap();
        let client = client.join().unwrap();
        let exchange = |connection: Connection, mine: u8, theirs: u8| {
            let Connection { mut reader, mut writer, .. } = connection;
            let sender = std::thread::spawn(move || {
                for block in pattern(mine, BYTES).chunks(100_000) {
                    writer.write_all(block).unwrap();
                }
                writer
            });
            let mut received = vec![0u8; BYTES];
            reader.read_exact(&mut received).unwrap();
            assert!(received == pattern(theirs, BYTES), "bytes differ");
            drop(sender.join().unwrap());
            // The peer's writer said goodbye with close_notify: a clean end of stream.
            let mut rest = [0u8; 1];
            assert_eq!(reader.read(&mut rest).unwrap(), 0);
        };
        std::thread::scope(|scope| {
            scope.spawn(|| exchange(server, 1, 2));
            exchange(client, 2, 1);
        });
    }

    #[test]
    fn a_different_key_is_refused_at_both_ends_and_the_listener_waits_on() {
        let (mut acceptor, address, refusals) = listener(&psk(KEY_A));
        let stranger = connector(&psk(KEY_B), &address);
        let refused = std::thread::spawn(move || stranger.connect().err().expect("refused"));
        assert!(acceptor.accept(Duration::from_millis(1500)).is_err(), "the stranger was accepted");
        let error = refused.join().unwrap().to_string();
        assert!(error.contains("not signed by our CA"), "{error}");
        let reasons = refusals.lock().unwrap().clone();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("refused our certificate"), "{reasons:?}");
        // The right key still gets in.
        let friend = std::thread::spawn(move || connector(&psk(KEY_A), &address).connect().map(|_| ()));
        assert!(acceptor.accept(Duration::from_secs(5)).is_ok());
        friend.join().unwrap().unwrap();
    }
}
