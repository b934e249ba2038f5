//! A TCP proxy on loopback that forwards a migration's connections and injects one
//! fault into the source-to-destination direction: a flipped byte or a cut.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    None,
    /// XOR one byte at `offset` of the `connection`-th connection's source-to-destination
    /// stream.
    FlipByte {
        connection: usize,
        offset: u64,
    },
    /// Close the `connection`-th connection (both ways) after `bytes` from the source.
    CutAfter {
        connection: usize,
        bytes: u64,
    },
    /// On the `connection`-th relay connection (`migration::relay`), change the digests
    /// its `StreamCheckpoint`s and `StreamEnd` carry, and seal each frame again so that its
    /// own checksum holds: what a stream damaged past every frame check (a bug, memory
    /// going bad) looks like.
    ForgeRelayDigest {
        connection: usize,
    },
}

pub struct FaultProxy {
    pub address: SocketAddr,
    forwarded: Arc<AtomicU64>,
    _acceptor: JoinHandle<()>,
}

impl FaultProxy {
    pub fn start(target: SocketAddr, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let counter = forwarded.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let index = accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target) else {
                    return;
                };
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let fault = fault;
                let counter = counter.clone();
                std::thread::spawn(move || match fault {
                    Fault::ForgeRelayDigest { connection } if connection == index => forge_digest(client, server),
                    fault => forward(client, server, index, fault, Some(counter)),
                });
                std::thread::spawn(move || forward(server2, client2, usize::MAX, Fault::None, None));
            }
        });
        FaultProxy { address, forwarded, _acceptor: acceptor }
    }

    /// Waits until `bytes` have gone from the source to the destination (over all
    /// connections); false if that did not happen within `timeout`.
    pub fn wait_forwarded(&self, bytes: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.forwarded.load(Ordering::Relaxed) < bytes {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, index: usize, fault: Fault, counter: Option<Arc<AtomicU64>>) {
    let mut offset = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buffer[..n];
        match fault {
            Fault::FlipByte { connection, offset: at }
                if connection == index && (offset..offset + n as u64).contains(&at) =>
            {
                chunk[(at - offset) as usize] ^= 0x40;
            }
            Fault::CutAfter { connection, bytes } if connection == index && offset + n as u64 >= bytes => {
                let keep = (bytes - offset) as usize;
                let _ = to.write_all(&chunk[..keep]);
                break;
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        offset += n as u64;
        if let Some(counter) = &counter {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Forwards a relay connection frame by frame, with its digests changed.
fn forge_digest(mut from: TcpStream, mut to: TcpStream) {
    use migration::frame::{FrameBuf, FrameHeader, FrameKind, HEADER_BYTES};
    let mut preamble = [0u8; migration::relay::PREAMBLE_BYTES];
    if from.read_exact(&mut preamble).is_err() || to.write_all(&preamble).is_err() {
        return;
    }
    let mut header = [0u8; HEADER_BYTES];
    let mut frame = FrameBuf::default();
    while from.read_exact(&mut header).is_ok() {
        let Ok(parsed) = FrameHeader::parse(&header) else { break };
        let mut payload = vec![0u8; parsed.length as usize];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        if matches!(parsed.kind, FrameKind::StreamEnd | FrameKind::StreamCheckpoint) && payload.len() >= 12 {
            payload[8] ^= 0x01;
        }
        frame.begin().extend_from_slice(&payload);
        frame.seal(parsed.kind, parsed.epoch, parsed.seq);
        if to.write_all(frame.as_bytes()).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
