//! The QEMU relay commands' options: `qemu-send`, `qemu-recv`, `qemu-migrate`.

use super::{parse_bandwidth, parse_listen, parse_size, parse_tcp, StackOptions};
use clap::Args;
use migration::codec::Codec;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What both relay commands take.
#[derive(Args, Debug)]
pub struct RelayOptions {
    /// Seconds to wait for the first connection (QEMU's, or the source relay's).
    #[arg(long, default_value_t = 600.0)]
    pub wait: f64,
    /// Seconds a relay connection may stay silent (no data, no heartbeat) before the link
    /// is taken for dead and the migration fails.
    #[arg(long, default_value_t = 30.0)]
    pub io_timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub no_pin: bool,
}

#[derive(Args, Debug)]
pub struct QemuMigrateArgs {
    /// The source QEMU's QMP socket: `unix:PATH`.
    #[arg(long, value_parser = parse_unix)]
    pub src_qmp: PathBuf,
    /// The destination QEMU's QMP socket: `unix:PATH`. It must have been started with
    /// `-incoming defer`.
    #[arg(long, value_parser = parse_unix)]
    pub dst_qmp: PathBuf,
    /// A destination relay already running (`vmigrate qemu-recv`, e.g. on the destination
    /// host) to carry the migration to; it must have been started with `--to` the socket
    /// given here as --dst-incoming. Default: a destination relay in this process, over
    /// the kernel's TCP on 127.0.0.1.
    #[arg(long, requires = "dst_incoming", value_parser = parse_tcp)]
    pub to: Option<String>,
    /// With --to: the destination QEMU's incoming socket (`unix:PATH`), as the remote relay
    /// knows it.
    #[arg(long, value_parser = parse_unix)]
    pub dst_incoming: Option<PathBuf>,
    /// QEMU's multifd with this many channels (each carried on a relay connection).
    #[arg(long)]
    pub multifd: Option<u32>,
    #[command(flatten)]
    pub carry: CarryOptions,
    /// QEMU's own XBZRLE on both QEMUs.
    #[arg(long)]
    pub qemu_xbzrle: bool,
    /// QEMU's downtime limit, in milliseconds (as on `send`).
    #[arg(long, default_value_t = 300, alias = "downtime-limit-ms")]
    pub downtime_limit: u64,
    /// QEMU's bandwidth cap: bits (1gbit, 100mbit) or bytes (100MiB) per second, as on
    /// `send` (QEMU's own default is 128 MiB/s).
    #[arg(long, default_value = "100GiB", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Seconds after which an unfinished migration is cancelled.
    #[arg(long, default_value_t = 3600.0)]
    pub timeout: f64,
    /// A control socket (`unix:PATH`) taking QMP-style commands while the migration runs,
    /// as `send`'s (docs/control.md); they go to the source QEMU.
    #[arg(long, value_parser = parse_unix)]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: super::MetricsOptions,
    #[command(flatten)]
    pub relay: RelayOptions,
    /// The source relay's stack (with --to).
    #[command(flatten)]
    pub stack: StackOptions,
}

#[derive(Args, Debug)]
pub struct QemuSendArgs {
    /// The unix socket the source QEMU migrates to: `unix:PATH` (QEMU's `migrate unix:PATH`).
    #[arg(long, value_parser = parse_unix)]
    pub listen: PathBuf,
    /// The destination relay (`vmigrate qemu-recv --listen`): HOST:PORT or tcp:HOST:PORT.
    #[arg(long, value_parser = parse_tcp)]
    pub to: String,
    /// A QMP socket of the source QEMU's (`unix:PATH`; one of its own: a QMP socket serves
    /// one client), through which the control sockets' downtime limit and switchover reach
    /// QEMU, which alone applies them.
    #[arg(long, value_parser = parse_unix)]
    pub qmp: Option<PathBuf>,
    /// A control socket (`unix:PATH`), as `send --control`'s (docs/control.md): the
    /// relayed migration queried, cancelled, or changed (a bandwidth cap caps this relay's
    /// link; a downtime limit or a switchover goes to the source QEMU through --qmp).
    #[arg(long, value_parser = parse_unix)]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: super::MetricsOptions,
    #[command(flatten)]
    pub carry: CarryOptions,
    #[command(flatten)]
    pub relay: RelayOptions,
    #[command(flatten)]
    pub stack: StackOptions,
}

/// How the source relay encodes QEMU's streams.
#[derive(Args, Debug)]
pub struct CarryOptions {
    /// Compression of the carried pages: none, lz4, zlib[:LEVEL], zstd[:LEVEL], shuffle-lz4,
    /// shuffle-zstd[:LEVEL], bitshuffle-lz4, or adaptive (none, lz4, shuffle-lz4, zstd:1,
    /// shuffle-zstd:1 or bitshuffle-lz4 per chunk, from the link's and the cores' measured
    /// rates, as on `send`). Streams that
    /// are not QEMU's go in lz4 under adaptive.
    #[arg(long, default_value = "adaptive")]
    pub codec: Codec,
    /// XBZRLE: a page carried again goes as a delta against its copy carried last, when
    /// that is smaller, whichever of QEMU's streams carried it. Both relays keep one cache
    /// for all the streams. Turned on by --xbzrle (a 64 MiB cache, QEMU's default) or by
    /// --xbzrle-cache, as on `send`.
    #[arg(long)]
    pub xbzrle: bool,
    /// The XBZRLE cache on each relay (e.g. 256MiB); giving it turns XBZRLE on.
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_cache: Option<u64>,
    /// Compression workers, one pool shared by all of QEMU's streams (0: each stream's own
    /// thread compresses) [default: one per CPU this process may use, less its dataplane
    /// cores, at most 8]. Pages are decided in stream order on the stream's thread; the
    /// workers compress the chunks.
    #[arg(long)]
    pub compress_threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct QemuRecvArgs {
    /// Where the source relay connects: IP:PORT (or tcp:IP:PORT).
    #[arg(long, value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// A TOML file of settings, named as this command's long options (`listen = "..."`,
    /// `io-timeout = 30`); flags on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The destination QEMU's incoming socket: `unix:PATH`.
    #[arg(long, value_parser = parse_unix)]
    pub to: PathBuf,
    /// Seconds to keep trying the destination QEMU's socket (it may still be starting).
    #[arg(long, default_value_t = 10.0)]
    pub qemu_wait: f64,
    /// A control socket (`unix:PATH`), as `send --control`'s (docs/control.md): the
    /// relayed migration queried or cancelled here; changes go to the source relay, which
    /// applies them.
    #[arg(long, value_parser = parse_unix)]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: super::MetricsOptions,
    #[command(flatten)]
    pub relay: RelayOptions,
    #[command(flatten)]
    pub stack: StackOptions,
}

/// `unix:PATH`, as QEMU writes socket addresses.
pub fn parse_unix(text: &str) -> Result<PathBuf, String> {
    match text.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!("expected unix:PATH, got {text:?}")),
    }
}
