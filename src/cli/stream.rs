//! Link benchmarks: bulk TCP streams (one, or several in parallel) over a stack, with
//! goodput and CPU time, so that our userspace stack can be put beside the kernel's on the
//! same link in one run.

use super::args::TlsOptions;
use super::cpu::process_time as cpu_time;
use anyhow::{bail, Context, Result};
use dataplane::stack::{LoopbackOptions, LoopbackStack};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use transport::pipe::{Acceptor, Connector, Timeouts};

mod direct;

const WRITE_BYTES: usize = 1 << 20;

/// Who moves a stream's bytes between the application and the socket.
#[derive(Clone, Copy, Debug)]
pub enum Pump {
    /// The polling core, where the stack has one (as the engine does by default): it
    /// pulls from the application's block and hands what arrives to a sink.
    Core,
    /// The application's own threads, writing and reading the connection's pipe (the
    /// kernel's TCP always works this way).
    Threads,
}

fn report(role: &str, bytes: u64, elapsed: Duration, cpu: Duration) -> serde_json::Value {
    let seconds = elapsed.as_secs_f64();
    serde_json::json!({
        "role": role,
        "bytes": bytes,
        "seconds": seconds,
        "gbit-per-s": bytes as f64 * 8.0 / seconds / 1e9,
        "cpu-seconds": cpu.as_secs_f64(),
        "cpu-ns-per-byte": cpu.as_secs_f64() * 1e9 / bytes.max(1) as f64,
    })
}

fn write_stream(connector: &dyn Connector, bytes: u64, pump: Pump) -> Result<()> {
    let mut connection = connector.connect().context("connecting")?;
    let block: Arc<[u8]> = (0..WRITE_BYTES).map(|i| (i * 7) as u8).collect();
    connection.writer.write_all(&bytes.to_le_bytes())?;
    match (pump, connection.direct_send.take()) {
        (Pump::Core, Some(attach)) => attach(Box::new(direct::Repeat::new(block, bytes))),
        _ => {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(WRITE_BYTES as u64) as usize;
                connection.writer.write_all(&block[..n])?;
                left -= n as u64;
            }
        }
    }
    // Wait for the receiver's acknowledgement, so the time covers delivery.
    let mut ack = [0u8; 8];
    connection.reader.read_exact(&mut ack).context("waiting for the receiver's count")?;
    (connection.closer)();
    if u64::from_le_bytes(ack) != bytes {
        bail!("the receiver counted {} bytes, {bytes} were sent", u64::from_le_bytes(ack));
    }
    Ok(())
}

/// Takes `streams` connections and reads them in parallel: the bytes of all, and the
/// longest of their times.
fn read_streams(acceptor: &mut dyn Acceptor, streams: usize, pump: Pump) -> Result<(u64, Duration)> {
    let connections: Vec<_> = (0..streams.max(1))
        .map(|_| acceptor.accept(Duration::from_secs(60)).context("waiting for a stream"))
        .collect::<Result<_>>()?;
    let totals = std::thread::scope(|scope| {
        let readers: Vec<_> = connections.into_iter().map(|c| scope.spawn(move || read_connection(c, pump))).collect();
        readers
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("reader panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    Ok((totals.iter().map(|t| t.0).sum(), totals.iter().map(|t| t.1).max().unwrap_or_default()))
}

/// `streams` connections, each sending `bytes`, in parallel.
fn write_streams(connector: &dyn Connector, bytes: u64, streams: usize, pump: Pump) -> Result<()> {
    std::thread::scope(|scope| {
        let writers: Vec<_> =
            (0..streams.max(1)).map(|_| scope.spawn(|| write_stream(connector, bytes, pump))).collect();
        writers.into_iter().try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?)
    })
}

fn read_connection(mut connection: transport::pipe::Connection, pump: Pump) -> Result<(u64, Duration)> {
    let mut header = [0u8; 8];
    connection.reader.read_exact(&mut header)?;
    let start = Instant::now();
    let expected = u64::from_le_bytes(header);
    let received = match (pump, connection.direct_receive.take()) {
        (Pump::Core, Some(attach)) => {
            let (done, finished) = mpsc::channel();
            let reader = std::mem::replace(&mut connection.reader, Box::new(std::io::empty()));
            attach(reader, Box::new(direct::Sink::new(WRITE_BYTES, expected, done)));
            finished.recv().context("the core dropped the stream")?.map_err(anyhow::Error::msg)?
        }
        _ => read_all(&mut *connection.reader, expected)?,
    };
    let elapsed = start.elapsed();
    connection.writer.write_all(&received.to_le_bytes())?;
    // Let the acknowledgement leave before the connection goes.
    std::thread::sleep(Duration::from_millis(100));
    (connection.closer)();
    Ok((received, elapsed))
}

/// Reads `expected` bytes into a buffer, a megabyte at a time.
fn read_all(reader: &mut dyn Read, expected: u64) -> Result<u64> {
    let mut buffer = vec![0u8; WRITE_BYTES];
    let mut received = 0u64;
    while received < expected {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            bail!("stream ended after {received} of {expected} bytes");
        }
        received += n as u64;
    }
    Ok(received)
}

/// `streams` bulk streams of `bytes` each; the report counts them all.
pub fn send(connector: &dyn Connector, bytes: u64, streams: usize, pump: Pump) -> Result<ExitCode> {
    let (start, cpu) = (Instant::now(), cpu_time());
    write_streams(connector, bytes, streams, pump)?;
    let total = bytes * streams.max(1) as u64;
    println!("{}", report("send", total, start.elapsed(), cpu_time() - cpu));
    Ok(ExitCode::SUCCESS)
}

pub fn receive(acceptor: &mut dyn Acceptor, streams: usize, pump: Pump) -> Result<ExitCode> {
    let cpu = cpu_time();
    let (bytes, elapsed) = read_streams(acceptor, streams, pump)?;
    println!("{}", report("recv", bytes, elapsed, cpu_time() - cpu));
    Ok(ExitCode::SUCCESS)
}

/// Both ends in this process, on dataplane cores joined by in-process wires: `streams`
/// bulk streams of `bytes` each, in parallel (they spread over the cores).
pub fn loopback(
    bytes: u64,
    options: LoopbackOptions,
    streams: usize,
    tls: &TlsOptions,
    pump: Pump,
) -> Result<ExitCode> {
    let stack = LoopbackStack::start_with(options)?;
    let timeouts = Timeouts::default();
    let (connector, mut acceptor) = super::tls::secure_demo_link(
        tls,
        Box::new(stack.connector(5001, timeouts)),
        Box::new(stack.acceptor(5001, timeouts)?),
    )?;
    let streams = streams.max(1);
    let cpu = cpu_time();
    // The rate is the receivers' (header to last byte, the slowest stream), as
    // `stream-recv` reports it: not the connecting, nor the pause each receiver makes
    // for its count to leave.
    let (received, elapsed) = std::thread::scope(|scope| -> Result<(u64, Duration)> {
        let receiver = scope.spawn(|| read_streams(&mut *acceptor, streams, pump));
        write_streams(&*connector, bytes, streams, pump)?;
        receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?
    })?;
    let cpu = cpu_time() - cpu;
    // Read once the cores have stopped: a stopping core publishes its figures a last
    // time, so they cover the whole run. On a wire that loses nothing, every
    // retransmission is a timeout the stack should not have needed.
    let (sources, destinations) = stack.meters();
    drop((connector, acceptor, stack));
    let retransmissions: u64 =
        sources.snapshot().iter().chain(&destinations.snapshot()).map(|core| core.retransmissions).sum();
    let mut line = report("loopback", received, elapsed, cpu);
    line["retransmissions"] = retransmissions.into();
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
