//! A corpus of source streams for the destination, replayed by the ordinary test suite:
//! one real stream recorded from a migration, and that stream truncated and damaged at
//! chosen places. Replaying feeds a stream to an in-process destination as if a source
//! sent it, and answers nothing back.

use engine::config::{DestinationConfig, SourceConfig};
use engine::destination::{receive, DestinationReport};
use engine::source::migrate;
use guests::guest::GuestRam;
use guests::synthetic::{SyntheticDestination, SyntheticGuest, WorkloadSpec};
use hugepages::HugePolicy;
use std::io::{self, Cursor, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::pipe::{Acceptor, Connection, Connector, TcpAcceptor, TcpConnector, Timeouts};

/// The guest the recorded stream carries.
pub const GUEST_BYTES: u64 = 4 << 20;

/// A connector that keeps a copy of everything the source writes on its connection.
struct Recording {
    inner: TcpConnector,
    copy: Arc<Mutex<Vec<u8>>>,
}

struct Tee {
    inner: Box<dyn Write + Send>,
    copy: Arc<Mutex<Vec<u8>>>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.copy.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Connector for Recording {
    fn connect(&self) -> io::Result<Connection> {
        let connection = self.inner.connect()?;
        // The tee sees every byte only if the stack is not handed the write side.
        let writer = Box::new(Tee { inner: connection.writer, copy: self.copy.clone() });
        Ok(Connection { writer, direct_send: None, ..connection })
    }
}

/// Migrates a small `seq` guest over one connection and returns what its source sent.
pub fn record_stream() -> Vec<u8> {
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts).expect("bind");
    let copy = Arc::new(Mutex::new(Vec::new()));
    let connector = Recording {
        inner: TcpConnector::new(acceptor.local_socket_addr().expect("address"), timeouts).expect("connector"),
        copy: copy.clone(),
    };
    let destination = std::thread::spawn(move || {
        let config = DestinationConfig { max_memory_bytes: GUEST_BYTES, ..Default::default() };
        let mut vm = SyntheticDestination::new(GUEST_BYTES, HugePolicy::Never);
        receive(&mut acceptor, &mut vm, &config).map(|_| ())
    });
    let ram = GuestRam::allocate(&GuestRam::pc_layout(GUEST_BYTES), HugePolicy::Never).expect("memory");
    let guest = SyntheticGuest::boot(Arc::new(ram), WorkloadSpec::Seq { pages_per_s: 2000 }, 3).expect("boot");
    std::thread::sleep(Duration::from_millis(50));
    let config = SourceConfig { codec: migration::codec::Codec::Lz4, ..SourceConfig::default() };
    migrate(&guest, &connector, &config, &mut |_| {}).expect("the recorded migration");
    destination.join().expect("destination thread").expect("the recorded migration's destination");
    let stream = copy.lock().unwrap_or_else(|p| p.into_inner()).clone();
    stream
}

/// The stream truncated and damaged at chosen places, each with a name for its file.
pub fn damaged(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
    let len = stream.len();
    let mut out = Vec::new();
    let places = [0, 1, 8, 15, 16, 17, 30, 40, 41, 64, 200, len / 5, len / 3, len / 2, 2 * len / 3, len - 30, len - 1];
    for &at in &places {
        if at < len {
            out.push((format!("truncated-at-{at}"), stream[..at].to_vec()));
            let mut flipped = stream.to_vec();
            flipped[at] ^= 0x40;
            out.push((format!("flipped-at-{at}"), flipped));
        }
    }
    // The first frame (the Hello, after the 16-byte preamble) claiming an enormous payload.
    let mut huge = stream.to_vec();
    huge[16 + 16..16 + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    out.push(("hello-length-4GiB".into(), huge));
    // A well-formed Hello whose regions add up past 2^64 bytes, wrapping to a size under
    // any limit (what the `handshake` fuzz target found).
    let hello_len = 24 + u32::from_le_bytes(stream[16 + 16..16 + 20].try_into().unwrap_or_default()) as usize;
    if let Ok(mut hello) = migration::handshake::Hello::decode(&stream[16 + 24..16 + hello_len]) {
        hello.region_bytes = vec![1 << 63, 1 << 63, 1 << 20];
        let payload = hello.encode();
        let mut wrapped = stream[..16].to_vec();
        wrapped.extend_from_slice(&migration::frame::encode_frame(migration::frame::FrameKind::Hello, 0, 0, &payload));
        wrapped.extend_from_slice(&stream[16 + hello_len..]);
        out.push(("hello-regions-wrap".into(), wrapped));
    }
    // The frame after the Hello sent twice: a repeated sequence number mid-stream. (A copy
    // after the stream's end would come after the destination had rightly completed.)
    let frame_len =
        |at: usize| 24 + u32::from_le_bytes(stream[at + 16..at + 20].try_into().unwrap_or_default()) as usize;
    let second = 16 + frame_len(16);
    let end = second + frame_len(second);
    let mut repeated = stream[..end].to_vec();
    repeated.extend_from_slice(&stream[second..end]);
    repeated.extend_from_slice(&stream[end..]);
    out.push(("frame-repeated".into(), repeated));
    out
}

/// An acceptor that hands out one connection whose reader is `stream` and whose writes go
/// nowhere; later accepts time out. With `hold_open`, the stream does not end after its
/// bytes for that long (a live source keeps its connection open until the destination
/// has answered; a dead one's ends at once).
struct Replay {
    stream: Option<Vec<u8>>,
    hold_open: Duration,
}

/// A reader that, its bytes read, waits `hold_open` before it reports the end.
struct HeldOpen {
    bytes: Cursor<Vec<u8>>,
    hold_open: Duration,
}

impl io::Read for HeldOpen {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.bytes.read(buf)?;
        if n == 0 && !buf.is_empty() {
            std::thread::sleep(std::mem::take(&mut self.hold_open));
        }
        Ok(n)
    }
}

impl Acceptor for Replay {
    fn accept(&mut self, timeout: Duration) -> io::Result<Connection> {
        match self.stream.take() {
            Some(stream) => Ok(Connection {
                reader: Box::new(HeldOpen { bytes: Cursor::new(stream), hold_open: self.hold_open }),
                writer: Box::new(io::sink()),
                closer: Box::new(|| {}),
                peer: "corpus".into(),
                probe: None,
                direct_send: None,
                direct_receive: None,
            }),
            None => {
                std::thread::sleep(timeout.min(Duration::from_millis(100)));
                Err(io::Error::new(io::ErrorKind::TimedOut, "no more connections"))
            }
        }
    }

    fn local_addr(&self) -> String {
        "corpus".into()
    }
}

/// Feeds `stream` to a fresh destination, its connection held open for `hold_open` after
/// its bytes; returns the destination's report, or its error, and whether a guest was
/// resumed.
pub fn replay(stream: &[u8], hold_open: Duration) -> (Result<DestinationReport, String>, bool) {
    let config = DestinationConfig {
        max_memory_bytes: GUEST_BYTES,
        accept_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let mut vm = SyntheticDestination::new(GUEST_BYTES, HugePolicy::Never);
    let mut acceptor = Replay { stream: Some(stream.to_vec()), hold_open };
    let report = receive(&mut acceptor, &mut vm, &config).map_err(|e| e.to_string());
    let resumed = vm.guest().is_some();
    (report, resumed)
}
