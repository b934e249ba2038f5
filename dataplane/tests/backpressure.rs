//! A slow application on the receiving side must slow the sender down, never lose data:
//! every ring between the application and the wire is bounded and waits when full, and the
//! core reads a socket only when the application's ring has room, so TCP's window closes.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use transport::pipe::{Acceptor, Connector, Timeouts};
use vmigrate_dataplane::pipe::{CHUNK_BYTES, PIPE_RING_CHUNKS};
use vmigrate_dataplane::stack::{LoopbackStack, DEFAULT_SOCKET_BUFFER_BYTES};

const STREAM_BYTES: u64 = 48 << 20;
const WRITE_BYTES: usize = 256 << 10;

fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

#[test]
fn a_slow_reader_makes_the_writer_wait_and_loses_nothing() {
    let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).expect("start the loopback wire");
    let timeouts = Timeouts { connect: Duration::from_secs(10), io: Duration::from_secs(30) };
    let mut acceptor = stack.acceptor(4700, timeouts).expect("listen");
    let connector = stack.connector(4700, timeouts);

    let written = Arc::new(AtomicU64::new(0));
    let writer_count = written.clone();
    let writer = std::thread::spawn(move || {
        let mut connection = connector.connect().expect("connect");
        let mut offset = 0u64;
        let mut block = vec![0u8; WRITE_BYTES];
        while offset < STREAM_BYTES {
            for (i, byte) in block.iter_mut().enumerate() {
                *byte = pattern(offset + i as u64);
            }
            connection.writer.write_all(&block).expect("write");
            offset += WRITE_BYTES as u64;
            writer_count.store(offset, Ordering::SeqCst);
        }
        connection
    });

    let mut connection = acceptor.accept(Duration::from_secs(10)).expect("accept");
    // Everything that may sit between the two applications: the writer's ring, both socket
    // buffers, the reader's ring, a chunk in hand on each side, and one write in progress.
    let in_flight_bound =
        (2 * PIPE_RING_CHUNKS * CHUNK_BYTES + 2 * DEFAULT_SOCKET_BUFFER_BYTES + 2 * CHUNK_BYTES + WRITE_BYTES) as u64;
    let mut read = 0u64;
    let mut buffer = vec![0u8; 64 << 10];
    let mut most_ahead = 0u64;
    while read < STREAM_BYTES {
        let n = connection.reader.read(&mut buffer).unwrap_or_else(|e| {
            // Where the stream waits: each core's connections (state, send and receive
            // queues) and whether the cores still run (their published running time).
            let (source, destination) = stack.meters();
            panic!(
                "read after {read} of {STREAM_BYTES} bytes: {e}; cores: {:#?}",
                [source.snapshot(), destination.snapshot()]
            )
        });
        assert!(n > 0, "the stream ended after {read} of {STREAM_BYTES} bytes");
        for (i, byte) in buffer[..n].iter().enumerate() {
            assert_eq!(*byte, pattern(read + i as u64), "byte {} differs", read + i as u64);
        }
        read += n as u64;
        // The slow consumer: a pause per read for the first half of the stream.
        if read < STREAM_BYTES / 2 {
            std::thread::sleep(Duration::from_micros(500));
        }
        let ahead = written.load(Ordering::SeqCst).saturating_sub(read);
        most_ahead = most_ahead.max(ahead);
        assert!(ahead <= in_flight_bound, "the writer ran {ahead} bytes ahead of the reader: nothing held it back");
    }
    writer.join().expect("writer");
    assert_eq!(read, STREAM_BYTES);
    // The writer did get ahead (the rings and windows filled) before it was made to wait.
    assert!(most_ahead > (PIPE_RING_CHUNKS * CHUNK_BYTES) as u64, "the rings never filled: {most_ahead} bytes ahead");
    eprintln!("the writer was at most {most_ahead} bytes ahead (bound {in_flight_bound})");
}
