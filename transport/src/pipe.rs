//! Byte pipes: the seam between the engine and whatever carries bytes. A migration runs
//! over N [`Connection`]s, each an ordered, reliable byte stream split into a read half
//! and a write half (so a connection's writer and its reader can be different threads)
//! and a way to shut it down from any thread. The kernel's TCP implements it here; the
//! userspace dataplane implements the same seam, so the engine never changes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Shuts both directions down; blocked reads and writes on either half return.
    pub closer: Box<dyn Fn() + Send + Sync>,
    /// The peer, for messages.
    pub peer: String,
}

/// Opens connections to a destination (the source side).
pub trait Connector: Send + Sync {
    fn connect(&self) -> io::Result<Connection>;
}

/// Accepts connections from a source (the destination side).
pub trait Acceptor: Send {
    /// Waits up to `timeout` for the next connection.
    fn accept(&mut self, timeout: Duration) -> io::Result<Connection>;
    fn local_addr(&self) -> String;
}

/// How long a blocked read or write on a kernel socket may wait before the peer is taken
/// for dead. The engine also aborts sooner on any explicit error.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(10), io: Duration::from_secs(30) }
    }
}

fn tcp_connection(stream: TcpStream, timeouts: Timeouts) -> io::Result<Connection> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeouts.io))?;
    stream.set_write_timeout(Some(timeouts.io))?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let reader = stream.try_clone()?;
    let closer = stream.try_clone()?;
    Ok(Connection {
        reader: Box::new(reader),
        writer: Box::new(stream),
        closer: Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        }),
        peer,
    })
}

/// The kernel's TCP, the baseline every other stack is measured against.
pub struct TcpConnector {
    addrs: Vec<SocketAddr>,
    timeouts: Timeouts,
}

impl TcpConnector {
    pub fn new(to: impl ToSocketAddrs, timeouts: Timeouts) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = to.to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing"));
        }
        Ok(TcpConnector { addrs, timeouts })
    }
}

impl Connector for TcpConnector {
    fn connect(&self) -> io::Result<Connection> {
        let mut last = None;
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, self.timeouts.connect) {
                Ok(stream) => return tcp_connection(stream, self.timeouts),
                Err(err) => last = Some(io::Error::new(err.kind(), format!("connect to {addr}: {err}"))),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    }
}

pub struct TcpAcceptor {
    listener: TcpListener,
    timeouts: Timeouts,
}

impl TcpAcceptor {
    pub fn bind(addr: impl ToSocketAddrs, timeouts: Timeouts) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(TcpAcceptor { listener, timeouts })
    }

    pub fn local_socket_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Acceptor for TcpAcceptor {
    fn accept(&mut self, timeout: Duration) -> io::Result<Connection> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return tcp_connection(stream, self.timeouts);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection from the source in time"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn local_addr(&self) -> String {
        self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}
