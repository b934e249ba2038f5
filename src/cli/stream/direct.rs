//! A benchmark stream handed to its polling core, as the engine hands over its
//! connections: the core pulls the sender's bytes straight out of the application's block
//! and gives what arrives straight to a sink that copies it into the application's buffer
//! (the one copy a `read` makes), with no application thread and no ring in between.

use std::sync::mpsc;
use std::sync::Arc;
use transport::pipe::{Inbound, Next, Outbound};

/// The sender's side: `left` bytes of `block`, over and over, as a writer's loop would.
pub(super) struct Repeat {
    block: Arc<[u8]>,
    offset: usize,
    left: u64,
}

impl Repeat {
    pub(super) fn new(block: Arc<[u8]>, bytes: u64) -> Self {
        Repeat { block, offset: 0, left: bytes }
    }
}

impl Outbound for Repeat {
    fn next(&mut self) -> Next<'_> {
        if self.left == 0 {
            return Next::Done;
        }
        let end = self.block.len().min(self.offset.saturating_add(usize::try_from(self.left).unwrap_or(usize::MAX)));
        Next::Bytes(&self.block[self.offset..end])
    }

    fn advance(&mut self, n: usize) {
        self.left -= n as u64;
        self.offset += n;
        if self.offset == self.block.len() {
            self.offset = 0;
        }
    }

    // The sender learns of a lost connection when the receiver's count does not come.
    fn lost(&mut self, _why: &str) {}
}

/// The receiver's side: copies what arrives into a buffer of the application's, round
/// and round, and says on `done` when `expected` bytes came or the stream ended first.
pub(super) struct Sink {
    buffer: Vec<u8>,
    at: usize,
    expected: u64,
    received: u64,
    done: Option<mpsc::Sender<Result<u64, String>>>,
}

impl Sink {
    pub(super) fn new(buffer_bytes: usize, expected: u64, done: mpsc::Sender<Result<u64, String>>) -> Self {
        Sink { buffer: vec![0; buffer_bytes.max(1)], at: 0, expected, received: 0, done: Some(done) }
    }

    fn report(&mut self, result: Result<u64, String>) {
        if let Some(done) = self.done.take() {
            // The benchmark's thread waits on it; if it is gone there is no one to tell.
            let _ = done.send(result);
        }
    }
}

impl Inbound for Sink {
    fn receive(&mut self, bytes: &[u8]) -> usize {
        let mut taken = 0;
        while taken < bytes.len() {
            let n = (self.buffer.len() - self.at).min(bytes.len() - taken);
            self.buffer[self.at..self.at + n].copy_from_slice(&bytes[taken..taken + n]);
            self.at = (self.at + n) % self.buffer.len();
            taken += n;
        }
        self.received += taken as u64;
        if self.received >= self.expected {
            self.report(Ok(self.received));
        }
        taken
    }

    fn holding(&self) -> bool {
        false
    }

    fn end(&mut self, how: Result<(), &str>) {
        let received = self.received;
        self.report(match how {
            Ok(()) => Err(format!("stream ended after {received} bytes")),
            Err(why) => Err(format!("stream lost after {received} bytes: {why}")),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_offers_the_block_round_and_round_until_the_count() {
        let block: Arc<[u8]> = Arc::from(&[1u8, 2, 3][..]);
        let mut repeat = Repeat::new(block, 7);
        let mut got = Vec::new();
        while let Next::Bytes(bytes) = repeat.next() {
            let n = bytes.len().min(2);
            got.extend_from_slice(&bytes[..n]);
            repeat.advance(n);
        }
        assert_eq!(got, [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(repeat.next(), Next::Done);
    }

    #[test]
    fn sink_takes_everything_wraps_its_buffer_and_reports_once() {
        let (tx, rx) = mpsc::channel();
        let mut sink = Sink::new(4, 10, tx);
        assert_eq!(sink.receive(&[1, 2, 3, 4, 5, 6]), 6);
        assert_eq!(sink.buffer, [5, 6, 3, 4]);
        assert!(rx.try_recv().is_err());
        assert_eq!(sink.receive(&[7, 8, 9, 10]), 4);
        assert_eq!(rx.try_recv(), Ok(Ok(10)));
        sink.end(Ok(()));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_stream_that_ends_early_is_an_error() {
        let (tx, rx) = mpsc::channel();
        let mut sink = Sink::new(4, 10, tx);
        sink.receive(&[1, 2]);
        sink.end(Err("reset"));
        assert_eq!(rx.try_recv(), Ok(Err("stream lost after 2 bytes: reset".to_string())));
    }
}
