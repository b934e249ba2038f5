//! Running `vmigrate` processes with a deadline: a test never hangs on a stuck process.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The process's exit status (docs/exit-codes.md), failing the test if a signal ended it.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("ended by a signal: {:?}\n{}", self.status, self.stderr))
    }

    /// As `assert_clean_failure`, and the exit status must be `code`.
    pub fn assert_failure_with(&self, code: i32) -> &str {
        let error = self.assert_clean_failure();
        assert_eq!(self.code(), code, "exit status for: {error}");
        error
    }

    /// Fails the test if the process printed a panic or more than one error line.
    pub fn assert_clean_failure(&self) -> &str {
        assert!(!self.status.success(), "expected failure, got success; stderr:\n{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "panic:\n{}", self.stderr);
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("vmigrate: error:")).collect();
        assert_eq!(errors.len(), 1, "expected one error line, stderr:\n{}", self.stderr);
        errors[0]
    }
}

/// Waits for `child` up to `timeout`, killing it if it overstays (then the test fails).
pub fn wait(mut child: Child, timeout: Duration, stderr_prefix: String) -> Finished {
    let stderr = child.stderr.take().expect("piped stderr");
    wait_with(child, stderr, timeout, stderr_prefix)
}

fn wait_with(
    mut child: Child,
    mut stderr: impl Read + Send + 'static,
    timeout: Duration,
    stderr_prefix: String,
) -> Finished {
    let deadline = Instant::now() + timeout;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = stderr_prefix;
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not finish within {timeout:?} (killed): {}", err.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() }
}

/// Runs a command to completion within `timeout`.
pub fn run(command: &mut Command, timeout: Duration) -> Finished {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start process");
    wait(child, timeout, String::new())
}

/// A `vmigrate recv` started on an ephemeral loopback port.
pub struct Receiver {
    child: Option<Child>,
    pub address: String,
    first_line: String,
    stderr: Option<BufReader<std::process::ChildStderr>>,
}

impl Receiver {
    /// Starts `bin recv --listen 127.0.0.1:0 ARGS` and reads the address it listens on.
    pub fn start(bin: &str, args: &[&str]) -> Receiver {
        let mut command = Command::new(bin);
        command.args(["recv", "--listen", "127.0.0.1:0"]).args(args);
        Receiver::spawn(command)
    }

    /// Starts a command that runs `vmigrate recv` (possibly through a wrapper such as
    /// `ip netns exec`) and reads the address it announces listening on.
    pub fn spawn(command: Command) -> Receiver {
        Receiver::spawn_announcing(command, "vmigrate: waiting for a migration on ")
    }

    /// As [`Receiver::spawn`], for a command that writes `announcement` followed by the
    /// address on a stderr line (after any lines of its libraries' own, such as DPDK's).
    pub fn spawn_announcing(mut command: Command, announcement: &str) -> Receiver {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start vmigrate recv");
        let mut reader = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut before = String::new();
        let mut first_line = String::new();
        while reader.read_line(&mut first_line).expect("read recv's stderr") > 0
            && !first_line.starts_with(announcement)
        {
            before.push_str(&std::mem::take(&mut first_line));
        }
        let address = first_line
            .trim()
            .strip_prefix(announcement)
            .and_then(|rest| rest.split(' ').next())
            // A metrics endpoint is announced as a URL: `http://ADDRESS/metrics`.
            .map(|a| a.trim_end_matches("/metrics"))
            .filter(|a| a.parse::<std::net::SocketAddr>().is_ok() || a.starts_with("unix:"))
            .map(str::to_string);
        let Some(address) = address else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("recv did not announce its address: {before}{first_line:?}");
        };
        // The lines before the announcement stay part of the receiver's stderr.
        Receiver { child: Some(child), address, first_line: before + &first_line, stderr: Some(reader) }
    }

    /// What it wrote on stderr up to and including its announcement.
    pub fn announced_so_far(&self) -> &str {
        &self.first_line
    }

    pub fn wait(mut self, timeout: Duration) -> Finished {
        let child = self.child.take().expect("receiver not yet waited for");
        let stderr = self.stderr.take().expect("stderr kept");
        wait_with(child, stderr, timeout, std::mem::take(&mut self.first_line))
    }
}

impl Receiver {
    /// Kills the receiver (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Receiver {
    /// A test that fails before waiting must not leave a recv process behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses a process's JSON output, failing the test with the text if it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// Checks a completed two-process migration (`send --verify --json`, `recv --json`): both
/// exited 0, both saw the memory verified, the resumed guest passed its check and kept
/// running, and both ends counted the same bytes. Returns the two JSON reports.
pub fn assert_migrated(sent: &Finished, received: &Finished) -> (serde_json::Value, serde_json::Value) {
    assert!(sent.status.success(), "send failed:\n{}\nrecv:\n{}", sent.stderr, received.stderr);
    assert!(received.status.success(), "recv failed:\n{}", received.stderr);
    let sent = json(&sent.stdout);
    let received = json(&received.stdout);
    assert_eq!(sent["verified"], true);
    assert_eq!(received["verified"], true);
    // "ok", or the KVM guest's own "ok N" (pages it checked).
    let check = received["destination-guest"]["check"].as_str().unwrap_or_default();
    assert!(check == "ok" || check.starts_with("ok "), "the destination guest's check: {check}");
    assert!(
        received["destination-guest"]["writes-after-resume"].as_u64().unwrap_or(0) > 0,
        "destination guest did not run"
    );
    assert_eq!(sent["ram"]["transferred"], received["received-bytes"], "both ends count the same bytes");
    (sent, received)
}

/// Whether this process runs as root (namespaces, TAP devices and DPDK's EAL need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The DPDK queues' counters at teardown (`dpdk_nic`): the sender's stack handed the queue
/// large segments that GSO cut into frames of the MTU, and the receiver's GRO merged
/// frames back into segments of several frames each.
pub fn assert_large_segments_both_ways(stderr: &str) {
    let (sent, cut) = segment_counts(stderr, "large segments sent, cut into");
    assert!(sent > 0 && cut > 2 * sent, "{sent} large segments sent, cut into {cut} frames:\n{stderr}");
    let (merged, frames) = segment_counts(stderr, "large segments received, merged from");
    assert!(merged > 0 && frames > 2 * merged, "{merged} large segments received, merged from {frames}:\n{stderr}");
}

/// The DPDK queues' and ports' counters at teardown with `--whole-segments`: the sender's
/// stack handed its queues large segments that went out uncut (none cut by GSO), and the
/// ports sent fewer packets (both ways, ACKs included) than one per 8 KiB of the `moved`
/// bytes, where frames of the MTU take one per 1.4 KiB.
pub fn assert_whole_segments(stderr: &str, moved: u64) {
    let whole: u64 = stderr
        .lines()
        .filter_map(|line| {
            line.split_once(" large segments sent whole")?.0.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum();
    assert!(whole > 0, "no large segments sent whole:\n{stderr}");
    let (cut, _) = segment_counts(stderr, "large segments sent, cut into");
    assert_eq!(cut, 0, "segments cut with --whole-segments:\n{stderr}");
    let packets: u64 = stderr
        .lines()
        .filter_map(|line| {
            let counts = line.split_once("packets received, ")?.1;
            counts.split_once(" sent;")?.0.trim().parse::<u64>().ok()
        })
        .sum();
    assert!(packets > 0 && packets * 8 * 1024 < moved, "{moved} bytes moved in {packets} packets:\n{stderr}");
}

/// The two numbers of the lines `dpdk: A <phrase> B frames ...`, summed over the queues.
fn segment_counts(stderr: &str, phrase: &str) -> (u64, u64) {
    let number = |text: &str| text.split_whitespace().last().and_then(|word| word.parse::<u64>().ok());
    stderr
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(phrase)?;
            Some((number(before)?, number(after.split(" frames").next()?)?))
        })
        .fold((0, 0), |(a, b), (segments, frames)| (a + segments, b + frames))
}
