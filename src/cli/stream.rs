//! Link benchmarks: one bulk TCP stream over a stack, with goodput and CPU time, so that our
//! userspace stack can be put beside the kernel's on the same link in one run.

use anyhow::{bail, Context, Result};
use dataplane::stack::{LoopbackStack, DEFAULT_SOCKET_BUFFER_BYTES};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use transport::pipe::{Acceptor, Connector, Timeouts};

const WRITE_BYTES: usize = 1 << 20;

/// CPU time this process has used (user + system), from /proc/self/stat, whose tick is
/// USER_HZ: 100 on every Linux architecture we run on.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
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

fn write_stream(connector: &dyn Connector, bytes: u64) -> Result<()> {
    let mut connection = connector.connect().context("connecting")?;
    let block: Vec<u8> = (0..WRITE_BYTES).map(|i| (i * 7) as u8).collect();
    connection.writer.write_all(&bytes.to_le_bytes())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(WRITE_BYTES as u64) as usize;
        connection.writer.write_all(&block[..n])?;
        left -= n as u64;
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

fn read_stream(acceptor: &mut dyn Acceptor) -> Result<(u64, Duration)> {
    let mut connection = acceptor.accept(Duration::from_secs(60)).context("waiting for the stream")?;
    let mut header = [0u8; 8];
    connection.reader.read_exact(&mut header)?;
    let start = Instant::now();
    let expected = u64::from_le_bytes(header);
    let mut buffer = vec![0u8; WRITE_BYTES];
    let mut received = 0u64;
    while received < expected {
        let n = connection.reader.read(&mut buffer)?;
        if n == 0 {
            bail!("stream ended after {received} of {expected} bytes");
        }
        received += n as u64;
    }
    let elapsed = start.elapsed();
    connection.writer.write_all(&received.to_le_bytes())?;
    // Let the acknowledgement leave before the connection goes.
    std::thread::sleep(Duration::from_millis(100));
    (connection.closer)();
    Ok((received, elapsed))
}

pub fn send(connector: &dyn Connector, bytes: u64) -> Result<ExitCode> {
    let (start, cpu) = (Instant::now(), cpu_time());
    write_stream(connector, bytes)?;
    println!("{}", report("send", bytes, start.elapsed(), cpu_time() - cpu));
    Ok(ExitCode::SUCCESS)
}

pub fn receive(acceptor: &mut dyn Acceptor) -> Result<ExitCode> {
    let cpu = cpu_time();
    let (bytes, elapsed) = read_stream(acceptor)?;
    println!("{}", report("recv", bytes, elapsed, cpu_time() - cpu));
    Ok(ExitCode::SUCCESS)
}

/// Both ends in this process, on two dataplane cores joined by the in-process wire.
pub fn loopback(bytes: u64, mtu: usize, pin: bool) -> Result<ExitCode> {
    let stack = LoopbackStack::start(mtu, DEFAULT_SOCKET_BUFFER_BYTES, pin)?;
    let timeouts = Timeouts::default();
    let mut acceptor = stack.acceptor(5001, timeouts)?;
    let connector = stack.connector(5001, timeouts);
    let cpu = cpu_time();
    let receiver = std::thread::spawn(move || read_stream(&mut acceptor));
    write_stream(&connector, bytes)?;
    let (received, elapsed) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    println!("{}", report("loopback", received, elapsed, cpu_time() - cpu));
    Ok(ExitCode::SUCCESS)
}
