//! Strangers at a listener: the connections a port scanner, a curious browser or a
//! misdirected client open before the real source does. Each is held open until dropped,
//! so that a listener that waited on one of them would still be waiting.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The strangers, connected in this order: random bytes, an HTTP request, the first half
/// of a vmigrate preamble, and a connection that says nothing.
pub struct Strangers {
    pub sockets: Vec<(&'static str, TcpStream)>,
}

impl Strangers {
    /// Connects every kind of stranger to `address` (a listener on loopback or in a test's
    /// own namespace) and leaves them open; the truncated preamble is the first half of
    /// `magic` (the listener's own protocol's).
    pub fn connect(address: &str, magic: &[u8; 8]) -> Strangers {
        Strangers { sockets: greet(magic, || TcpStream::connect(address)) }
    }

    /// The same strangers at the unix socket `path` (a relay's socket for QEMU); the
    /// listener names them all by this process.
    pub fn connect_unix(path: &Path, magic: &[u8; 8]) -> Vec<(&'static str, UnixStream)> {
        greet(magic, || UnixStream::connect(path))
    }

    /// The peers the listener names in its warnings, one per stranger.
    pub fn peers(&self) -> Vec<String> {
        self.sockets.iter().map(|(_, s)| s.local_addr().expect("local address").to_string()).collect()
    }
}

/// Opens one connection per kind of stranger with `connect` and has each say its piece.
fn greet<S: Write>(magic: &[u8; 8], connect: impl Fn() -> std::io::Result<S>) -> Vec<(&'static str, S)> {
    let random: Vec<u8> = (0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let greetings: [(&'static str, &[u8]); 4] = [
        ("random bytes", &random),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: migration\r\n\r\n"),
        ("truncated preamble", &magic[..4]),
        ("silent", b""),
    ];
    greetings
        .into_iter()
        .map(|(kind, bytes)| {
            let mut socket = connect().unwrap_or_else(|e| panic!("{kind}: connect: {e}"));
            // A listener that closed on the stranger may reset it: what was sent is what
            // matters.
            let _ = socket.write_all(bytes);
            (kind, socket)
        })
        .collect()
}
