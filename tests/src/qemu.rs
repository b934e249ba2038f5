//! Real QEMU guests for the relay tests: the boot-sector sweeper (`tests/guests/sweeper.S`,
//! assembled here with GNU as), QEMU processes under TCG with a QMP socket and a serial log,
//! and the checks made on them: memory dumps compared byte for byte, the sweep's shape,
//! and serial markers.

use relay::qmp::Qmp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";
/// Guest RAM: the sweep covers 1 MiB to 101 MiB of it.
pub const GUEST_MIB: usize = 128;
const SWEEP_START: usize = 1 << 20;
const SWEEP_PAGES: usize = 25600;
const PAGE: usize = 4096;

/// Whether QEMU is installed (CI installs it; a developer run without it skips).
pub fn qemu_available() -> bool {
    Command::new(QEMU).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Assembles the sweeper into `dir` and returns the 512-byte disk image.
pub fn sweeper_image(dir: &Path) -> PathBuf {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/guests/sweeper.S");
    let object = dir.join("sweeper.o");
    let image = dir.join("sweeper.img");
    let run = |command: &mut Command| {
        let output = command.output().expect("run GNU binutils (as, ld)");
        assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run(Command::new("as").args(["--32", "-o"]).arg(&object).arg(source));
    run(Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext=0x7c00", "--oformat=binary", "-o"])
        .arg(&image)
        .arg(&object));
    let bytes = std::fs::read(&image).expect("read the image");
    assert_eq!(bytes.len(), 512, "a boot sector");
    assert_eq!(&bytes[510..], &[0x55, 0xaa], "boot signature");
    image
}

/// A QEMU process running the sweeper, in a directory of its own (disk image copy, QMP
/// socket, serial log). Killed when dropped.
pub struct Vm {
    child: Child,
    pub dir: PathBuf,
    pub name: String,
}

impl Vm {
    /// Starts QEMU on a copy of `image`. `incoming`: started with `-incoming defer -S`, to
    /// receive a migration and stay paused after it.
    pub fn start(parent: &Path, name: &str, image: &Path, incoming: bool) -> Vm {
        Vm::start_with_memory(parent, name, image, incoming, GUEST_MIB)
    }

    /// As `start`, with `mib` of guest RAM (a destination unlike its source refuses the
    /// migration).
    pub fn start_with_memory(parent: &Path, name: &str, image: &Path, incoming: bool, mib: usize) -> Vm {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).expect("vm dir");
        // Each QEMU its own copy: QEMU locks its images, and the guest never writes them.
        let disk = dir.join("disk.img");
        std::fs::copy(image, &disk).expect("copy image");
        let mut command = Command::new(QEMU);
        command
            // 8 KiB over the size asked: QEMU 7.2 under TCG loses dirty pages of a RAM block
            // whose length is a multiple of 256 KiB (its bitmap sync's fast path leaves TCG's
            // TLB dirty state set; fixed in QEMU 9.0). The memory compared is the first `mib`.
            .args(["-accel", "tcg", "-m", &format!("{}K", mib * 1024 + 8), "-nodefaults", "-display", "none"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()))
            // A second monitor for the program under test (a QMP socket serves one client).
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.join("control.sock").display()));
        if incoming {
            command.args(["-incoming", "defer", "-S"]);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start QEMU");
        Vm { child, dir, name: name.to_string() }
    }

    /// The monitor left for the program under test (`qemu-migrate`).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_secs(20))
            .unwrap_or_else(|err| panic!("{}: {err}", self.name))
    }

    /// Waits up to `timeout` for QEMU to exit by itself: its exit status and what it wrote
    /// on stderr; None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                return Some((status, stderr));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sweeps completed so far (one 'S' each on the serial port).
    pub fn markers(&self) -> usize {
        std::fs::read(self.dir.join("serial.log")).map(|log| log.iter().filter(|&&b| b == b'S').count()).unwrap_or(0)
    }

    /// Waits until the guest has printed more than `count` markers.
    pub fn wait_markers_above(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.markers() > count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The guest's whole RAM, dumped with `pmemsave`.
    pub fn memory(&self, qmp: &mut Qmp) -> Vec<u8> {
        let file = self.dir.join("memory.dump");
        let size = GUEST_MIB << 20;
        qmp.execute("pmemsave", serde_json::json!({ "val": 0, "size": size, "filename": file.display().to_string() }))
            .unwrap_or_else(|err| panic!("{}: {err}", self.name));
        let bytes = std::fs::read(&file).expect("read the dump");
        let _ = std::fs::remove_file(&file);
        assert_eq!(bytes.len(), size);
        bytes
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Checks the sweep's shape in a memory dump: every page's counter equals its neighbour's
/// except at the one point the sweep had reached, where the pages below it are one ahead.
/// Returns that point (a page index; 0 if the sweep had just wrapped).
pub fn sweep_point(memory: &[u8]) -> Result<usize, String> {
    let counter = |page: usize| memory[SWEEP_START + page * PAGE];
    let mut steps = Vec::new();
    for page in 1..SWEEP_PAGES {
        let (before, here) = (counter(page - 1), counter(page));
        if before != here {
            if before != here.wrapping_add(1) {
                return Err(format!("page {page} holds {here} after {before}: not one sweep apart"));
            }
            steps.push(page);
        }
    }
    // Every other byte of the range is untouched.
    for page in 0..SWEEP_PAGES {
        let start = SWEEP_START + page * PAGE;
        if memory[start + 1..start + PAGE].iter().any(|&b| b != 0) {
            return Err(format!("page {page} has bytes the guest never writes"));
        }
    }
    match steps.as_slice() {
        [] => Ok(0),
        [point] => Ok(*point),
        more => Err(format!("{} points where the sweep stands: {:?}", more.len(), &more[..more.len().min(8)])),
    }
}

/// Polls `query-migrate` on the source until the migration ends; returns the final answer.
pub fn wait_migration(qmp: &mut Qmp, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.execute("query-migrate", serde_json::json!({})).expect("query-migrate");
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return info;
        }
        assert!(Instant::now() < deadline, "migration still {status} after {timeout:?}: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets the same migration capabilities and parameters on both QEMUs: multifd with
/// `channels` (None: off), and QEMU's own bandwidth cap (bytes per second; 8 GB/s is none,
/// where QEMU's default would dominate a test; a slow migration leaves time to break it).
pub fn configure_migration_at(source: &mut Qmp, destination: &mut Qmp, channels: Option<u32>, bandwidth: u64) {
    configure_migration_with(source, destination, channels, bandwidth, false);
}

/// As `configure_migration_at`, with QEMU's return path (the destination answers on the
/// main channel, and the source keeps it open until the destination has loaded) or not.
pub fn configure_migration_with(
    source: &mut Qmp,
    destination: &mut Qmp,
    channels: Option<u32>,
    bandwidth: u64,
    return_path: bool,
) {
    for qmp in [source, destination] {
        let capabilities = serde_json::json!({ "capabilities": [
            { "capability": "multifd", "state": channels.is_some() },
            { "capability": "return-path", "state": return_path },
        ] });
        qmp.execute("migrate-set-capabilities", capabilities).expect("set capabilities");
        let mut parameters = serde_json::json!({ "max-bandwidth": bandwidth, "downtime-limit": 1000 });
        if let Some(channels) = channels {
            parameters["multifd-channels"] = channels.into();
        }
        qmp.execute("migrate-set-parameters", parameters).expect("set parameters");
    }
}

/// After a migration: the source (paused by it) and the destination (started with -S)
/// hold the same memory byte for byte, in the sweep's shape; then the destination, let
/// go, sweeps on. Returns where the sweep stood.
pub fn check_migrated(source: &Vm, destination: &Vm, source_qmp: &mut Qmp, destination_qmp: &mut Qmp) -> usize {
    let source_memory = source.memory(source_qmp);
    let destination_memory = destination.memory(destination_qmp);
    let differing = source_memory.chunks(PAGE).zip(destination_memory.chunks(PAGE)).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} pages differ between the source and the destination");
    let point = sweep_point(&destination_memory).unwrap_or_else(|err| panic!("destination memory: {err}"));
    let markers = destination.markers();
    destination_qmp.execute("cont", serde_json::json!({})).expect("cont");
    assert!(
        destination.wait_markers_above(markers, Duration::from_secs(60)),
        "the destination guest did not sweep after cont"
    );
    let status = destination_qmp.execute("query-status", serde_json::json!({})).expect("query-status");
    assert_eq!(status["status"], "running", "{status}");
    point
}

/// A fresh directory under the system's temp directory.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmigrate-qemu-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A source and a destination QEMU ready to migrate (the destination waiting on its
/// incoming socket), in a directory of their own.
pub struct Migration {
    pub dir: PathBuf,
    pub source: Vm,
    pub destination: Vm,
    pub source_qmp: Qmp,
    pub destination_qmp: Qmp,
    /// Where the destination QEMU listens (`qemu-recv --to`).
    pub incoming: PathBuf,
    /// Where the source relay is to listen (`qemu-send --listen`).
    pub relay: PathBuf,
}

impl Migration {
    /// Boots the sweeper on a source, waits for it to sweep, starts a destination (with
    /// `destination_mib` of RAM) waiting for a migration, both set up alike.
    pub fn prepare(name: &str, multifd: Option<u32>, bandwidth: u64, destination_mib: usize) -> Migration {
        let dir = tempdir(name);
        let image = sweeper_image(&dir);
        let source = Vm::start(&dir, "source", &image, false);
        let destination = Vm::start_with_memory(&dir, "destination", &image, true, destination_mib);
        let (mut source_qmp, mut destination_qmp) = (source.qmp(), destination.qmp());
        assert!(source.wait_markers_above(0, Duration::from_secs(30)), "the source guest never swept");
        configure_migration_at(&mut source_qmp, &mut destination_qmp, multifd, bandwidth);
        let incoming = destination.dir.join("incoming.sock");
        destination_qmp
            .execute("migrate-incoming", serde_json::json!({ "uri": format!("unix:{}", incoming.display()) }))
            .expect("migrate-incoming");
        let relay = dir.join("relay.sock");
        Migration { dir, source, destination, source_qmp, destination_qmp, incoming, relay }
    }

    /// Starts the migration on the source, to the source relay.
    pub fn start(&mut self) {
        let uri = format!("unix:{}", self.relay.display());
        self.source_qmp.execute("migrate", serde_json::json!({ "uri": uri })).expect("migrate");
    }

    /// After a failed migration: the source QEMU says so, its guest still runs and sweeps
    /// on, and the source relay's socket is gone. Returns QEMU's status.
    pub fn assert_source_survived(&mut self) -> String {
        let info = wait_migration(&mut self.source_qmp, Duration::from_secs(120));
        let status = info["status"].as_str().unwrap_or("").to_string();
        assert!(status == "failed" || status == "cancelled", "the migration {status}: {info}");
        let run = self.source_qmp.execute("query-status", serde_json::json!({})).expect("query-status");
        assert_eq!(run["status"], "running", "the source guest stopped: {run}");
        let markers = self.source.markers();
        assert!(self.source.wait_markers_above(markers, Duration::from_secs(60)), "the source guest stopped sweeping");
        assert!(!self.relay.exists(), "the source relay left its socket behind");
        status
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.source.kill();
        self.destination.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A source QEMU running the sweeper (and sweeping) and a destination QEMU waiting for it,
/// in a fresh directory named after `name`.
pub struct Sweepers {
    pub dir: std::path::PathBuf,
    pub source: Vm,
    pub destination: Vm,
    pub source_qmp: Qmp,
    pub destination_qmp: Qmp,
}

impl Sweepers {
    pub fn start(name: &str) -> Sweepers {
        let dir = tempdir(&format!("{}-{name}", std::process::id()));
        let image = sweeper_image(&dir);
        let source = Vm::start(&dir, "source", &image, false);
        let destination = Vm::start(&dir, "destination", &image, true);
        let (source_qmp, destination_qmp) = (source.qmp(), destination.qmp());
        assert!(source.wait_markers_above(0, Duration::from_secs(30)), "the source guest never swept");
        Sweepers { dir, source, destination, source_qmp, destination_qmp }
    }
}
