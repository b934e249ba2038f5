//! Byte pipes: the seam between the engine and whatever carries bytes. A migration runs
//! over N [`Connection`]s, each an ordered, reliable byte stream split into a read half
//! and a write half (so a connection's writer and its reader can be different threads)
//! and a way to shut it down from any thread. The kernel's TCP implements it here; the
//! userspace dataplane implements the same seam, so the engine never changes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Shuts both directions down; blocked reads and writes on either half return.
    pub closer: Box<dyn Fn() + Send + Sync>,
    /// The peer, for messages.
    pub peer: String,
    /// What the stack can say about the write half's progress; `None` where it cannot.
    pub probe: Option<Arc<dyn SendProbe>>,
    /// Where the stack can drain the write side itself (a polling core): hand it an
    /// [`Outbound`] and stop using `writer`. Bytes written before stay ahead of it. A
    /// wrapper that transforms what `writer` carries (TLS, a tee) must set this to `None`.
    pub direct_send: Option<AttachOutbound>,
    /// Where the stack can deliver what arrives itself (a polling core): hand it
    /// `reader` and an [`Inbound`]. What `reader` had received and not yet returned
    /// comes first. A wrapper of `reader` must set this to `None`, as for `direct_send`.
    pub direct_receive: Option<AttachInbound>,
}

/// Hands a connection's write side to its stack; see [`Connection::direct_send`].
pub type AttachOutbound = Box<dyn FnOnce(Box<dyn Outbound>) + Send>;

/// Hands a connection's read side to its stack, with the connection's own `reader`
/// (whatever it still holds goes to the `Inbound` first); see
/// [`Connection::direct_receive`].
pub type AttachInbound = Box<dyn FnOnce(Box<dyn Read + Send>, Box<dyn Inbound>) + Send>;

/// A sink for incoming bytes that a polling stack feeds on its own thread, straight from
/// its socket's receive buffer: no reader thread, no copy on the way. Calls come from one
/// thread, in a loop that must not block.
pub trait Inbound: Send {
    /// Offers the bytes that arrived and were not taken yet, in order (empty when nothing
    /// new did: a poll, so that what it holds can move on). Returns how many it took from
    /// the front; the rest is offered again, and the peer is held back meanwhile.
    fn receive(&mut self, bytes: &[u8]) -> usize;
    /// Whether it holds back for its own consumers (full queues, a barrier) rather than
    /// waiting for the peer: a peer quiet meanwhile has not timed out.
    fn holding(&self) -> bool;
    /// The stream ended after everything before it was taken: `Ok` when the peer finished
    /// sending, `Err` with why when it was lost or stayed silent past the read timeout.
    fn end(&mut self, how: Result<(), &str>);
}

/// A source of outgoing bytes that a polling stack drains on its own thread, straight
/// into its socket's send buffer: no writer thread, no copy on the way. Calls come from
/// one thread, in a loop that must not block.
pub trait Outbound: Send {
    /// What to send next. The same bytes are offered again until `advance` takes them.
    fn next(&mut self) -> Next<'_>;
    /// The stack took the first `n` bytes of what `next` offered.
    fn advance(&mut self, n: usize);
    /// The connection is lost: nothing more will be taken.
    fn lost(&mut self, why: &str);
    /// Writes what goes next straight into `room`, free space in the stack's send buffer,
    /// for an outbound that makes its bytes as it goes (TLS seals its records there rather
    /// than into a buffer of its own and then into the stack's): how many bytes it wrote,
    /// which count as taken (no `advance` follows); or `None`, and the stack asks `next`.
    fn write_into(&mut self, _room: &mut [u8]) -> Option<usize> {
        None
    }
}

/// What an [`Outbound`] has for its stack.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    Bytes(&'a [u8]),
    /// Nothing yet: ask again on a later poll.
    Idle,
    /// Everything was sent: the connection may be closed once the application says so.
    Done,
}

/// What a stack can say about a connection's send side, for measuring the link while a
/// migration runs (adaptive compression). Bytes written say little: a kernel socket's
/// buffer and the queues on the way take in megabytes at first; and frames queued in
/// this process may only wait for a writer thread that has no CPU.
pub trait SendProbe: Send + Sync {
    /// Bytes the peer has acknowledged so far.
    fn acknowledged(&self) -> u64;
    /// Whether the stack's send buffer is full, so that a write now would wait for the
    /// link or the peer.
    fn full(&self) -> bool;
    /// Whether, lately, the peer's receive window rather than the link held the sender
    /// back for most of the time it had data to send: the receiving application is the
    /// slower end (a destination QEMU loading on one thread, workers short of CPU).
    /// Packing pages tighter then only empties the link; it moves no more. False where the
    /// stack cannot tell.
    fn receiver_limited(&self) -> bool {
        false
    }
}

/// A kernel TCP socket's write half, counting what the socket accepted.
struct CountingWriter {
    stream: TcpStream,
    written: Arc<AtomicU64>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A kernel TCP socket's send side, seen through ioctl, poll and `TCP_INFO`.
struct TcpProbe {
    stream: TcpStream,
    /// Bytes the socket accepted (counted by [`CountingWriter`]).
    written: Arc<AtomicU64>,
    /// Judges the socket's send-time figures (`tcp_info`).
    limit: ReceiverLimit,
}

/// Whether a receiver lately held its sender back, judged from a stack's running totals
/// of send time (µs): the time it had data to send or in flight ("busy") and the part of
/// it the peer's receive window held it back (Linux's `tcpi_busy_time` and
/// `tcpi_rwnd_limited`; the dataplane's cores sum the same). Each judgement covers the
/// span since the last, at least [`CHRONO_SPAN`].
#[derive(Default)]
pub struct ReceiverLimit {
    chrono: Mutex<Chrono>,
}

/// The totals at the last look, and what they said.
#[derive(Default)]
struct Chrono {
    at: Option<Instant>,
    busy_us: u64,
    receiver_limited_us: u64,
    receiver_limited: bool,
}

/// How long a judgement spans: a worker asks for each batch, and the totals may cost a
/// system call.
pub const CHRONO_SPAN: Duration = Duration::from_millis(10);

impl ReceiverLimit {
    /// Whether, since the last judgement, the receiver held the sender back for at least
    /// half its busy time. `totals` gives (busy, receiver-limited) µs so far, or None where
    /// the stack cannot say; it is asked once a span.
    pub fn judge(&self, totals: impl FnOnce() -> Option<(u64, u64)>) -> bool {
        let mut chrono = self.chrono.lock().unwrap_or_else(|p| p.into_inner());
        if chrono.at.is_some_and(|at| at.elapsed() < CHRONO_SPAN) {
            return chrono.receiver_limited;
        }
        let Some((busy_us, receiver_limited_us)) = totals() else { return false };
        let busy = busy_us.saturating_sub(chrono.busy_us);
        let limited = receiver_limited_us.saturating_sub(chrono.receiver_limited_us);
        // The first look only takes the totals.
        let receiver_limited = chrono.at.is_some() && busy > 0 && 2 * limited >= busy;
        *chrono = Chrono { at: Some(Instant::now()), busy_us, receiver_limited_us, receiver_limited };
        receiver_limited
    }
}

impl TcpProbe {
    /// The socket's busy and receiver-limited send time so far (µs), or None where the
    /// kernel does not give them.
    fn send_times(&self) -> Option<(u64, u64)> {
        // Offsets in Linux's `struct tcp_info` (include/uapi/linux/tcp.h): after
        // `tcpi_delivery_rate` come `tcpi_busy_time`, `tcpi_rwnd_limited`, `tcpi_sndbuf_limited`.
        const BUSY_TIME: usize = 168;
        const RWND_LIMITED: usize = 176;
        let mut info = [0u8; 256];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: TCP_INFO writes at most `len` bytes into `info`, a live local buffer of
        // that size, and `len` through its pointer; the descriptor is open while `self` lives.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let field = |at: usize| info[at..at + 8].try_into().ok().map(u64::from_ne_bytes);
        if rc != 0 || (len as usize) < RWND_LIMITED + 8 {
            return None;
        }
        Some((field(BUSY_TIME)?, field(RWND_LIMITED)?))
    }
}

impl SendProbe for TcpProbe {
    fn acknowledged(&self) -> u64 {
        // What the socket accepted less what it holds unacknowledged (sent or not). Read
        // in this order, a byte written in between counts as held, never as acknowledged.
        let written = self.written.load(Ordering::Relaxed);
        let mut held: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) on a socket writes one int through the pointer,
        // which points at a live c_int; the descriptor stays open while `self` lives.
        let rc = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut held) };
        if rc != 0 {
            // The socket cannot say (closing): what it accepted, which never goes back.
            return written;
        }
        written.saturating_sub(u64::try_from(held).unwrap_or(0))
    }

    fn full(&self) -> bool {
        // The kernel reports a TCP socket writable while a third of its buffer is free.
        let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, a zero timeout: poll only reads and writes `fd`.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready == 0
    }

    fn receiver_limited(&self) -> bool {
        self.limit.judge(|| self.send_times())
    }
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

/// Caps the bytes written to `stream` and not yet sent by TCP (`TCP_NOTSENT_LOWAT`): a
/// write blocks while more wait in the socket, so the rest waits in the writer. The socket
/// then holds about what the link has in flight, not seconds of data behind it.
fn limit_unsent(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    set_int_option(stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes)
}

/// Sets an integer socket option of `fd`'s.
fn set_int_option(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    crate::sockopt::set_socket_option(fd.as_raw_fd(), level, name, &value)
}

fn tcp_connection(stream: TcpStream, timeouts: Timeouts, unsent_limit: Option<usize>) -> io::Result<Connection> {
    stream.set_nodelay(true)?;
    if let Some(bytes) = unsent_limit {
        limit_unsent(&stream, bytes)?;
    }
    stream.set_read_timeout(Some(timeouts.io))?;
    stream.set_write_timeout(Some(timeouts.io))?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let reader = stream.try_clone()?;
    let closer = stream.try_clone()?;
    let written = Arc::new(AtomicU64::new(0));
    let probe = TcpProbe { stream: stream.try_clone()?, written: written.clone(), limit: ReceiverLimit::default() };
    Ok(Connection {
        reader: Box::new(reader),
        writer: Box::new(CountingWriter { stream, written }),
        closer: Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        }),
        peer,
        probe: Some(Arc::new(probe)),
        direct_send: None,
        direct_receive: None,
    })
}

/// The kernel's TCP, the baseline every other stack is measured against.
pub struct TcpConnector {
    addrs: Vec<SocketAddr>,
    timeouts: Timeouts,
    unsent_limit: Option<usize>,
}

impl TcpConnector {
    pub fn new(to: impl ToSocketAddrs, timeouts: Timeouts) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = to.to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing"));
        }
        Ok(TcpConnector { addrs, timeouts, unsent_limit: None })
    }

    /// At most `bytes` written and not yet sent wait in each connection's socket (see
    /// `limit_unsent`); `None`: the kernel's default (no limit beyond the send buffer).
    pub fn with_unsent_limit(self, bytes: Option<usize>) -> Self {
        TcpConnector { unsent_limit: bytes, ..self }
    }
}

impl Connector for TcpConnector {
    fn connect(&self) -> io::Result<Connection> {
        let mut last = None;
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, self.timeouts.connect) {
                Ok(stream) => return tcp_connection(stream, self.timeouts, self.unsent_limit),
                Err(err) => last = Some(io::Error::new(err.kind(), format!("connect to {addr}: {err}"))),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    }
}

pub struct TcpAcceptor {
    listener: TcpListener,
    timeouts: Timeouts,
    unsent_limit: Option<usize>,
}

impl TcpAcceptor {
    pub fn bind(addr: impl ToSocketAddrs, timeouts: Timeouts) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(TcpAcceptor { listener, timeouts, unsent_limit: None })
    }

    /// As `TcpConnector::with_unsent_limit`, for the connections accepted.
    pub fn with_unsent_limit(self, bytes: Option<usize>) -> Self {
        TcpAcceptor { unsent_limit: bytes, ..self }
    }

    /// A receive buffer of `bytes` for the connections accepted (`SO_RCVBUF`, set on the
    /// listener so that the window scale offered in the handshake fits it), in place of
    /// the kernel's autotuning, which lets megabytes wait there while the application
    /// behind the socket is the slower end; `None` keeps the autotuning.
    pub fn with_receive_buffer(self, bytes: Option<usize>) -> io::Result<Self> {
        if let Some(bytes) = bytes {
            set_int_option(&self.listener, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
        }
        Ok(self)
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
                    return tcp_connection(stream, self.timeouts, self.unsent_limit);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An integer socket option of `fd`'s, as the kernel reports it.
    fn int_option(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a socket we own; `value` and `len` live across the call and `len` is
        // `value`'s size.
        let rc =
            unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    fn unsent_limit_of(stream: &TcpStream) -> libc::c_int {
        int_option(stream, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT)
    }

    #[test]
    fn the_unsent_limit_reaches_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let default = unsent_limit_of(&stream);
        limit_unsent(&stream, 256 << 10).expect("set the limit");
        assert_eq!(unsent_limit_of(&stream), 256 << 10);
        assert_ne!(default, 256 << 10, "the kernel's default is no limit");
        // Past what a c_int holds: the largest it does.
        limit_unsent(&stream, usize::MAX).expect("set the limit");
        assert_eq!(unsent_limit_of(&stream), libc::c_int::MAX);
    }

    #[test]
    fn a_receiver_limit_is_judged_over_the_span_since_the_last_look() {
        let limit = ReceiverLimit::default();
        assert!(!limit.judge(|| Some((5_000, 5_000))), "the first look only takes the totals");
        std::thread::sleep(CHRONO_SPAN + Duration::from_millis(1));
        assert!(limit.judge(|| Some((6_000, 5_600))), "held back 600 of 1,000 µs busy");
        assert!(limit.judge(|| unreachable!("asked within the span")), "the span's judgement holds");
        std::thread::sleep(CHRONO_SPAN + Duration::from_millis(1));
        assert!(!limit.judge(|| Some((8_000, 6_000))), "held back 400 of 2,000 µs");
        std::thread::sleep(CHRONO_SPAN + Duration::from_millis(1));
        assert!(!limit.judge(|| Some((8_000, 6_000))), "not busy at all");
        std::thread::sleep(CHRONO_SPAN + Duration::from_millis(1));
        assert!(!limit.judge(|| None), "the stack cannot say");
    }

    #[test]
    fn a_sender_whose_peer_does_not_read_is_receiver_limited() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (_unread, _) = listener.accept().expect("accept");
        let probe =
            TcpProbe { stream: stream.try_clone().unwrap(), written: Arc::default(), limit: ReceiverLimit::default() };
        assert!(!probe.receiver_limited(), "nothing sent yet (and the first look only takes the figures)");
        // The peer never reads: once its window is full, every moment with data to send is
        // one the receiver holds the sender back.
        stream.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut limited = false;
        while !limited && Instant::now() < deadline {
            while (&stream).write(&[7u8; 65536]).is_ok() {}
            std::thread::sleep(CHRONO_SPAN * 2);
            limited = probe.receiver_limited();
        }
        assert!(limited, "send times: {:?}", probe.send_times());
    }

    #[test]
    fn a_receive_buffer_is_set_on_the_listener_its_connections_inherit() {
        let acceptor = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default())
            .expect("bind")
            .with_receive_buffer(Some(1 << 20))
            .expect("set the buffer");
        // The kernel doubles what it is asked for (its bookkeeping), and reports that.
        assert_eq!(int_option(&acceptor.listener, libc::SOL_SOCKET, libc::SO_RCVBUF), 2 << 20);
        let stream = TcpStream::connect(acceptor.local_socket_addr().expect("address")).expect("connect");
        acceptor.listener.set_nonblocking(false).expect("blocking accept");
        let (accepted, _) = acceptor.listener.accept().expect("accept");
        assert_eq!(int_option(&accepted, libc::SOL_SOCKET, libc::SO_RCVBUF), 2 << 20);
        drop(stream);
    }
}
