//! A listener's lobby: each accepted connection greets on a thread of its own, so that a
//! stranger (a port scanner's silent connection, random bytes, an HTTP request, a
//! truncated greeting) holds up no one. A connection gets a time limit to send a greeting
//! the caller's `greet` accepts; one that does not is closed with a warning naming its
//! peer, and the listener goes on waiting for the real peer, which is greeted at once
//! however many strangers came first.

use crate::pipe::{Acceptor, Connection};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one accept waits before the lobby looks for greeted connections.
const ACCEPT_SLICE: Duration = Duration::from_millis(50);
/// At most this many connections greet at once; more are closed as they come (a flood
/// must not take a thread each).
const MAX_GREETING: usize = 64;

/// Why `greet` did not admit a connection.
#[derive(Debug)]
pub enum Refusal<E> {
    /// Not a peer of ours, or one whose greeting broke off: closed with a warning, and the
    /// lobby goes on waiting.
    Stranger(String),
    /// A peer of ours whose greeting ends the wait (an incompatible version): handed to
    /// the caller.
    Fatal(E),
}

/// Why [`Lobby::accept`] returned without a connection.
#[derive(Debug)]
pub enum LobbyError<E> {
    /// No connection greeted within the wait.
    TimedOut,
    /// The listener failed.
    Accept(io::Error),
    /// A peer's greeting ended the wait ([`Refusal::Fatal`]).
    Fatal(E),
}

/// The connections turned away so far: how many, and the last one's peer and reason (an
/// operator whose source was turned away, e.g. for want of TLS, reads why here).
#[derive(Debug, Default, Clone)]
pub struct TurnedAway {
    pub count: u64,
    pub last: Option<String>,
}

impl TurnedAway {
    /// " (turned away N connections; the last: PEER: WHY)", or nothing if none was.
    pub fn summary(&self) -> String {
        match &self.last {
            Some(last) if self.count == 1 => format!(" (turned away 1 connection: {last})"),
            Some(last) => format!(" (turned away {} connections; the last: {last})", self.count),
            None => String::new(),
        }
    }
}

type Greet<T, E> = dyn Fn(&mut Connection) -> Result<T, Refusal<E>> + Send + Sync;
type Greeted<T, E> = Result<(Connection, T), E>;

/// Greets connections concurrently; see the module's documentation.
pub struct Lobby<T, E> {
    greet: Arc<Greet<T, E>>,
    limit: Duration,
    greeted_tx: Sender<Greeted<T, E>>,
    greeted_rx: Receiver<Greeted<T, E>>,
    greeting: Arc<AtomicUsize>,
    turned_away: Arc<Mutex<TurnedAway>>,
}

impl<T: Send + 'static, E: Send + 'static> Lobby<T, E> {
    /// A lobby whose connections each get `limit` to greet, as `greet` judges (it reads
    /// the greeting, and may answer a refusal on the connection before it is closed).
    pub fn new(
        limit: Duration,
        greet: impl Fn(&mut Connection) -> Result<T, Refusal<E>> + Send + Sync + 'static,
    ) -> Self {
        let (greeted_tx, greeted_rx) = mpsc::channel();
        Lobby {
            greet: Arc::new(greet),
            limit,
            greeted_tx,
            greeted_rx,
            greeting: Arc::new(AtomicUsize::new(0)),
            turned_away: Arc::default(),
        }
    }

    /// Waits up to `wait` for a connection that greets, accepting from `acceptor`
    /// meanwhile: the connection and what `greet` made of its greeting.
    pub fn accept(&mut self, acceptor: &mut dyn Acceptor, wait: Duration) -> Result<(Connection, T), LobbyError<E>> {
        let deadline = Instant::now() + wait;
        loop {
            match self.greeted_rx.try_recv() {
                Ok(Ok(greeted)) => return Ok(greeted),
                Ok(Err(fatal)) => return Err(LobbyError::Fatal(fatal)),
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LobbyError::TimedOut);
            }
            match acceptor.accept(left.min(ACCEPT_SLICE)) {
                Ok(connection) => self.admit(connection),
                Err(err) if matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {}
                Err(err) => return Err(LobbyError::Accept(err)),
            }
        }
    }

    /// The connections turned away so far.
    pub fn turned_away(&self) -> TurnedAway {
        lock(&self.turned_away).clone()
    }

    /// Starts `connection`'s greeting on a thread of its own, with a watchdog that closes
    /// it when its time is up.
    fn admit(&self, mut connection: Connection) {
        let peer = connection.peer.clone();
        if self.greeting.fetch_add(1, Ordering::AcqRel) >= MAX_GREETING {
            self.greeting.fetch_sub(1, Ordering::AcqRel);
            turn_away(&self.turned_away, &peer, &format!("{MAX_GREETING} connections were greeting already"));
            (connection.closer)();
            return;
        }
        // The watchdog closes the connection through its closer while the greeting thread
        // reads from it: both hold the closer.
        let closer: Arc<dyn Fn() + Send + Sync> = Arc::from(std::mem::replace(&mut connection.closer, Box::new(|| {})));
        connection.closer = Box::new({
            let closer = closer.clone();
            move || closer()
        });
        let expired = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let limit = self.limit;
        let watchdog = {
            let expired = expired.clone();
            move || {
                if done_rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                    expired.store(true, Ordering::Release);
                    closer();
                }
            }
        };
        let (greet, greeted, greeting, turned_away) =
            (self.greet.clone(), self.greeted_tx.clone(), self.greeting.clone(), self.turned_away.clone());
        let greeter_peer = peer.clone();
        let greeter = move || {
            let peer = greeter_peer;
            let result = greet(&mut connection);
            drop(done_tx);
            greeting.fetch_sub(1, Ordering::AcqRel);
            match result {
                // The watchdog may have closed it just as the greeting ended.
                Ok(_) | Err(Refusal::Stranger(_)) if expired.load(Ordering::Acquire) => {
                    turn_away(&turned_away, &peer, &format!("sent no greeting within {limit:?}"));
                }
                Ok(value) => {
                    // A lobby dropped meanwhile (its session began) closes it unanswered.
                    let _ = greeted.send(Ok((connection, value)));
                }
                Err(Refusal::Stranger(why)) => {
                    turn_away(&turned_away, &peer, &why);
                    (connection.closer)();
                }
                Err(Refusal::Fatal(err)) => {
                    let _ = greeted.send(Err(err));
                }
            }
        };
        let spawned = std::thread::Builder::new()
            .name("greeting".into())
            .spawn(greeter)
            .and_then(|_| std::thread::Builder::new().name("greeting-watch".into()).spawn(watchdog));
        if let Err(err) = spawned {
            log::warn!("could not greet the connection from {peer}: {err}");
        }
    }
}

fn turn_away(turned_away: &Mutex<TurnedAway>, peer: &str, why: &str) {
    log::warn!("turned away a connection from {peer}: {why}");
    let mut turned_away = lock(turned_away);
    turned_away.count += 1;
    turned_away.last = Some(format!("{peer}: {why}"));
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe::{TcpAcceptor, Timeouts};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A greeting: the four bytes "HELO"; anything else is a stranger's, and "BAD!" a
    /// peer of ours that must end the wait.
    fn greet(connection: &mut Connection) -> Result<u32, Refusal<String>> {
        let mut greeting = [0u8; 4];
        connection.reader.read_exact(&mut greeting).map_err(|err| Refusal::Stranger(format!("no greeting: {err}")))?;
        match &greeting {
            b"HELO" => Ok(7),
            b"BAD!" => Err(Refusal::Fatal("a peer of ours, refused".into())),
            other => Err(Refusal::Stranger(format!("not a greeting: {other:?}"))),
        }
    }

    fn listener() -> (TcpAcceptor, String) {
        let acceptor = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default()).unwrap();
        let address = acceptor.local_socket_addr().unwrap().to_string();
        (acceptor, address)
    }

    #[test]
    fn the_real_peer_is_greeted_at_once_behind_silent_and_noisy_strangers() {
        let (mut acceptor, address) = listener();
        let mut lobby = Lobby::new(Duration::from_secs(30), greet);
        // A silent connection, one that sends junk, one that sends half a greeting and
        // stays: none of them may hold up the peer that comes after them.
        let _silent = TcpStream::connect(&address).unwrap();
        TcpStream::connect(&address).unwrap().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut half = TcpStream::connect(&address).unwrap();
        half.write_all(b"HE").unwrap();
        let mut peer = TcpStream::connect(&address).unwrap();
        peer.write_all(b"HELO").unwrap();
        let started = Instant::now();
        let (_, value) = lobby.accept(&mut acceptor, Duration::from_secs(10)).map_err(|e| format!("{e:?}")).unwrap();
        assert_eq!(value, 7);
        assert!(started.elapsed() < Duration::from_secs(5), "the peer waited {:?}", started.elapsed());
    }

    #[test]
    fn a_silent_stranger_is_closed_when_its_time_is_up_and_counted() {
        let (mut acceptor, address) = listener();
        let mut lobby = Lobby::new(Duration::from_millis(200), greet);
        let mut silent = TcpStream::connect(&address).unwrap();
        assert!(matches!(lobby.accept(&mut acceptor, Duration::from_secs(1)), Err(LobbyError::TimedOut)));
        // The lobby closed it: the stranger reads the end of the stream.
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(silent.read(&mut [0u8; 1]).unwrap(), 0);
        let turned_away = lobby.turned_away();
        assert_eq!(turned_away.count, 1);
        assert!(turned_away.summary().contains("sent no greeting within 200ms"), "{}", turned_away.summary());
    }

    #[test]
    fn a_fatal_refusal_ends_the_wait() {
        let (mut acceptor, address) = listener();
        let mut lobby = Lobby::new(Duration::from_secs(5), greet);
        TcpStream::connect(&address).unwrap().write_all(b"junk").unwrap();
        let mut ours = TcpStream::connect(&address).unwrap();
        ours.write_all(b"BAD!").unwrap();
        match lobby.accept(&mut acceptor, Duration::from_secs(10)) {
            Err(LobbyError::Fatal(why)) => assert_eq!(why, "a peer of ours, refused"),
            other => panic!("{:?}", other.map(|(_, v)| v)),
        }
        // The junk's greeting thread may still be at it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lobby.turned_away().count == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(lobby.turned_away().summary().contains("not a greeting"), "{}", lobby.turned_away().summary());
    }
}
