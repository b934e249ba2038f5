use clap::{Args, Parser, Subcommand, ValueEnum};
use guests::synthetic::WorkloadSpec;
use migration::codec::Codec;
use std::net::SocketAddr;
use std::path::PathBuf;

mod bench;
mod relay;
mod values;
pub use bench::*;
pub use relay::*;
pub use values::*;

/// The exit statuses (docs/exit-codes.md, src/cli/exit.rs), for `--help` and the man page.
const EXIT_STATUSES: &str = "Exit status: 0 done; 1 a failure on this host; 2 usage; 3 refused by the peer; \
4 timed out; 5 integrity (verification failed, a damaged stream); 6 cancelled; 7 the link or the peer failed.";

#[derive(Parser, Debug)]
#[command(
    name = "vmigrate",
    version,
    about = "Live migration of guest memory: iterative pre-copy with compression, XBZRLE and zero-page elision",
    // A flag given twice takes its last value: a --config file's settings go in first.
    args_override_self = true,
    after_long_help = EXIT_STATUSES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// -v: debug lines too, -vv: trace; -q: warnings and errors only, -qq: errors only.
    /// RUST_LOG refines it per crate (RUST_LOG=vmigrate_engine=debug).
    #[command(flatten)]
    pub verbosity: clap_verbosity_flag::Verbosity<clap_verbosity_flag::InfoLevel>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Migrate a synthetic guest between a source and a destination in this process.
    Demo(DemoArgs),
    /// Migrate a synthetic guest to a destination started with `vmigrate recv`.
    Send(SendArgs),
    /// Receive one migration, run the resumed guest for --run-after seconds, and exit.
    Recv(RecvArgs),
    /// Link benchmark: send one bulk TCP stream of --bytes (no migration).
    StreamSend(StreamSendArgs),
    /// Link benchmark: receive one bulk TCP stream and report goodput and CPU time.
    StreamRecv(StreamRecvArgs),
    /// Link benchmark: one bulk stream between two dataplane cores on the in-process wire.
    StreamLoopback(StreamLoopbackArgs),
    /// Carry a source QEMU's migration (`migrate unix:PATH`) to a `vmigrate qemu-recv`.
    QemuSend(QemuSendArgs),
    /// Carry a migration from `vmigrate qemu-send` to a destination QEMU started with
    /// `-incoming unix:PATH` (or `-incoming defer` and `migrate-incoming`).
    QemuRecv(QemuRecvArgs),
    /// Migrate a QEMU guest through vmigrate, like `virsh migrate`: set both QEMUs up over
    /// QMP, run the relays, start the migration, show progress, report QEMU's and the
    /// relays' figures.
    QemuMigrate(QemuMigrateArgs),
    /// The tables of Intel's 2015 KVM live-migration talk: migrate an idle and a dirtying guest with each optimisation on
    /// and off (as `send`/`recv` process pairs, in network namespaces with --netns), and
    /// write a table, JSON and charts to --report.
    Bench(BenchArgs),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell), made
    /// from this command line's own definitions.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (vmigrate.1, vmigrate-send.1, ...) into a directory, made from this
    /// command line's own definitions.
    Man {
        /// The directory to write them into (created if missing).
        dir: std::path::PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct StreamSendArgs {
    #[arg(long, value_parser = parse_tcp)]
    pub to: String,
    /// Bytes per stream.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub bytes: u64,
    /// Parallel streams (the receiver must be given as many).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    #[command(flatten)]
    pub stack: StackOptions,
    /// Have the application's threads write and read each stream through the connection's
    /// pipe, even where our stack's polling core could move the bytes between the socket
    /// and the application's buffers itself, as the engine has it do (to measure what that
    /// saves). The kernel's TCP always works through threads.
    #[arg(long)]
    pub connection_threads: bool,
    #[arg(long)]
    pub no_pin: bool,
}

#[derive(Args, Debug)]
pub struct StreamRecvArgs {
    #[arg(long, value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Parallel streams to take (as the sender's --streams).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    #[command(flatten)]
    pub stack: StackOptions,
    /// Have the application's threads write and read each stream through the connection's
    /// pipe, even where our stack's polling core could move the bytes between the socket
    /// and the application's buffers itself, as the engine has it do (to measure what that
    /// saves). The kernel's TCP always works through threads.
    #[arg(long)]
    pub connection_threads: bool,
    #[arg(long)]
    pub no_pin: bool,
}

#[derive(Args, Debug)]
pub struct StreamLoopbackArgs {
    /// Bytes per stream.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub bytes: u64,
    /// Parallel streams (default: one per dataplane core).
    #[arg(long)]
    pub streams: Option<usize>,
    #[command(flatten)]
    pub dataplane: DataplaneOptions,
    #[arg(long, default_value_t = 1500)]
    pub mtu: usize,
    /// Have the application's threads write and read each stream through the connection's
    /// pipe, even where our stack's polling core could move the bytes between the socket
    /// and the application's buffers itself, as the engine has it do (to measure what that
    /// saves). The kernel's TCP always works through threads.
    #[arg(long)]
    pub connection_threads: bool,
    #[arg(long)]
    pub no_pin: bool,
    #[command(flatten)]
    pub tls: TlsOptions,
}

#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest kind: the synthetic guest (a thread writing memory), or a KVM micro-VM (one
    /// vCPU in /dev/kvm running the workload in long mode, checking its own memory).
    #[arg(long, value_enum, default_value = "synthetic")]
    pub guest: GuestKind,
    /// The KVM guest's record of its writes: `log` (KVM_GET_DIRTY_LOG, cleared with
    /// KVM_CLEAR_DIRTY_LOG where the kernel offers manual protection) or `ring` (the
    /// per-vCPU dirty ring).
    #[arg(long, default_value = "log")]
    pub kvm_dirty: guests::kvm::DirtyTracking,
    /// Guest RAM size (e.g. 256MiB, 4GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub mem: u64,
    /// idle | seq[:PAGES_PER_S] | dirty:AREA:PAGES_PER_S:BITS (idle with --image)
    #[arg(long, default_value = "seq", default_value_if("image", clap::builder::ArgPredicate::IsPresent, "idle"))]
    pub workload: WorkloadSpec,
    /// Seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// Seed of the guest's random content (reproducible images).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start from this memory image, a raw dump of a real guest's RAM
    /// (`scripts/guest-image` makes one of an idle Linux guest), with the idle workload.
    #[arg(long)]
    pub image: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Synthetic,
    Kvm,
}

/// How our userspace stack runs (not the kernel's).
#[derive(Args, Debug, Clone)]
pub struct DataplaneOptions {
    /// Dataplane cores per side: wire pairs on the in-process wire; queues of the TAP
    /// device or packet sockets in a fanout group on a real interface.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub dataplane_cores: u16,
    /// Send and receive buffer of each TCP socket (window scaling follows).
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub socket_buffer: u64,
    /// TCP congestion control of our sockets [default: cubic on a real link (tap); none on
    /// the in-process wire, which has no other traffic to be fair to].
    #[arg(long, value_enum)]
    pub congestion: Option<CongestionArg>,
    /// What a dataplane core does when it finds no work: spin (a dedicated CPU), or yield
    /// the CPU to any thread waiting for it, then nap (a shared machine).
    #[arg(long, value_enum, default_value = "nap")]
    pub idle: IdleArg,
    /// Floor of the TCP retransmission timeout of our sockets, in milliseconds (RFC 6298
    /// asks 1000 for the Internet; a migration link's round trip is far shorter).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub min_rto_ms: u64,
    /// Cut TCP segments to the MTU in our stack, with a checksum each, even where the
    /// device takes large segments and checksums (the in-process wire; TAP, through
    /// virtio-net headers). Offload is the default there, and off anyway while faults are
    /// injected.
    #[arg(long)]
    pub no_offload: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleArg {
    Spin,
    Nap,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CongestionArg {
    Cubic,
    Reno,
    None,
}

/// Debug layers around our stack's NIC backend (not the kernel stack).
#[derive(Args, Debug, Clone)]
pub struct WrapperOptions {
    /// Drop this percent of the frames each end receives (seeded, deterministic; 0.1 is
    /// one in a thousand).
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub fault_drop: f64,
    /// Flip one bit in this percent of the frames each end receives.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub fault_corrupt: f64,
    /// Deliver this percent of the frames twice.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub fault_duplicate: f64,
    /// Hold back this percent of the frames and deliver them after the next one.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub fault_reorder: f64,
    /// Take the link down AFTER_MS after the first frame, for LENGTH_MS (`AFTER_MS:LENGTH_MS`).
    #[arg(long, value_parser = parse_blackout)]
    pub fault_blackout: Option<dataplane::faults::Blackout>,
    /// Seed of the fault injector.
    #[arg(long, default_value_t = 1)]
    pub fault_seed: u32,
    /// Capture every frame our stack sends and receives to this pcap file.
    #[arg(long)]
    pub pcap: Option<std::path::PathBuf>,
    /// Print every frame our stack sends and receives, decoded, to stderr.
    #[arg(long)]
    pub trace: bool,
    /// IPv4 and TCP checksums: full (compute and verify), or trust-receive (compute on
    /// transmit only: for the in-process wire, or a NIC that verified them; the migration
    /// stream's CRC still covers every frame of pages).
    #[arg(long, value_enum, default_value = "full")]
    pub checksum: ChecksumArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumArg {
    Full,
    TrustReceive,
}

/// The network stack `send` and `recv` run on.
#[derive(Args, Debug, Clone)]
pub struct StackOptions {
    /// kernel: the kernel's TCP sockets; tap: our smoltcp stack on a polling core driving
    /// the TAP device --iface; af-packet: our stack on a packet socket with mapped rings on
    /// the interface --iface; dpdk: our stack on the DPDK port --iface (a name the EAL
    /// knows, e.g. net_af_packet0), with EAL arguments after `--`. Our stack owns the
    /// address --ip.
    #[arg(long, value_enum, default_value = "kernel")]
    pub stack: NetStack,
    /// kernel: at most this many bytes written and not yet sent wait in each connection's
    /// socket (TCP_NOTSENT_LOWAT); the rest waits in the sender. Without it the kernel lets
    /// megabytes queue there, which the link drains only after the switchover's last bytes
    /// were written (0: the kernel's default).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub unsent_limit: u64,
    /// kernel, on the listening side: each connection's receive buffer (SO_RCVBUF), in
    /// place of the kernel's autotuning, which lets megabytes wait in the socket when the
    /// application behind it is slower than the link (0: autotuning).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub receive_buffer: u64,
    /// af-packet: send frames straight to the driver, bypassing the qdisc layer. Turns
    /// offload off on that socket (as --no-offload): large segments sent this way stall.
    #[arg(long)]
    pub qdisc_bypass: bool,
    /// Interface our stack drives (--stack tap).
    #[arg(long)]
    pub iface: Option<String>,
    /// Our stack's own address and prefix, e.g. 10.77.0.11/24 (an address the kernel does
    /// not have on that link).
    #[arg(long)]
    pub ip: Option<String>,
    /// Our stack's MAC address (default: 02:00 followed by the --ip address).
    #[arg(long)]
    pub mac: Option<String>,
    /// Next hop for destinations outside --ip's prefix.
    #[arg(long)]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    pub wrappers: WrapperOptions,
    #[command(flatten)]
    pub dataplane: DataplaneOptions,
    #[command(flatten)]
    pub tls: TlsOptions,
    /// --stack dpdk: the port's MTU (default: the device's, usually 1500; an AF_PACKET vdev
    /// needs `framesz=` in its devargs for more).
    #[arg(long)]
    pub port_mtu: Option<u16>,
    /// --stack dpdk: print the port's extended statistics (the driver's `xstats`, those
    /// not zero) when the run ends.
    #[arg(long)]
    pub nic_xstats: bool,
    /// --stack dpdk on a memif whose other end is another vmigrate on this host: send TCP
    /// segments of up to 64 KiB whole through the shared memory rather than cut to the
    /// MTU, as the kernel's loopback does. Both ends' --vdev need `bsize=65535` (buffers
    /// that hold a segment; `rsize=8` keeps the shared memory at 32 MiB). Not for a memif
    /// that reaches a switch or a NIC, which would drop frames larger than its MTU.
    #[arg(long, conflicts_with = "no_offload")]
    pub whole_segments: bool,
    /// --stack dpdk: arguments for DPDK's EAL, after `--` (e.g. `-- --no-huge -m 512
    /// --vdev net_af_packet0,iface=eth1`).
    #[arg(last = true)]
    pub eal: Vec<String>,
}

/// Encryption and mutual authentication of every connection (TLS 1.3, rustls).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsOptions {
    /// Encrypt and authenticate every connection with TLS 1.3, both ends proving who they
    /// are: with --tls-cert, --tls-key and --tls-ca, or with --tls-psk. (`demo --tls` alone
    /// uses a fresh random key.) Both ends must agree.
    #[arg(long)]
    pub tls: bool,
    /// This side's certificate chain (PEM).
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "tls_psk")]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM, readable by its owner only).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) the peer's chain must lead to (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// A file holding a secret both ends share (at least 32 bytes, readable by its owner
    /// only; `openssl rand -hex 32 > FILE` makes one).
    #[arg(long)]
    pub tls_psk: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of --to).
    #[arg(long)]
    pub tls_server_name: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetStack {
    Kernel,
    Tap,
    AfPacket,
    Dpdk,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoStack {
    Loopback,
    Kernel,
    Dpdk,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Switchover,
    Cancel,
}

/// How the source migrates: codec, connections, convergence, optimisations.
#[derive(Args, Debug, Clone)]
pub struct SourceOptions {
    /// Page codec: none, lz4, zlib[:LEVEL] (1..=9), zstd[:LEVEL] (1..=19), shuffle-lz4,
    /// shuffle-zstd[:LEVEL] (a byte shuffle first, for numeric pages), bitshuffle-lz4 (a bit
    /// shuffle first, for numbers of few bits), deflate (raw deflate on a DPDK compression
    /// device, --compress-device), or adaptive (none, lz4, shuffle-lz4, zstd:1,
    /// shuffle-zstd:1 or bitshuffle-lz4 per batch, from the link's and the cores' measured
    /// rates; and deflate, where --compress-device names a device).
    #[arg(long, default_value = "adaptive")]
    pub codec: Codec,
    /// The DPDK compression device (compressdev) that does `deflate`, as the EAL names it:
    /// compress_isal0 (ISA-L, in software), compress_zlib0, or a QAT device given to the
    /// EAL after `--` [default with --codec deflate: compress_isal0]. Needs DPDK (and root).
    #[arg(long, value_name = "NAME")]
    pub compress_device: Option<String>,
    /// Pinned compression workers on the source [default: one per CPU this process may use,
    /// less its dataplane cores, at most 8 (QEMU's default)].
    #[arg(long)]
    pub compress_threads: Option<usize>,
    /// XBZRLE: a page sent again goes as a delta against its copy sent last, when that is
    /// smaller. Turned on by --xbzrle (a 64 MiB cache, QEMU's default) or by --xbzrle-cache,
    /// as on the relays.
    #[arg(long)]
    pub xbzrle: bool,
    /// The XBZRLE cache (e.g. 256MiB); giving it turns XBZRLE on.
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_cache: Option<u64>,
    /// A page whose contents equal a page's sent earlier in the same round goes as a copy
    /// of it (19 bytes). The index of the round's pages by contents takes at most this
    /// much memory, 36 bytes a page [default: 36MiB, a 4 GiB guest's pages]; 0 turns
    /// copies off.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub copy_index: Option<u64>,
    /// TCP connections carrying the migration.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Largest acceptable downtime, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Cap on the migration's bandwidth: bits (1gbit, 100mbit) or bytes (100MiB) per second.
    #[arg(long, value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest when it dirties memory faster than it can be sent.
    #[arg(long)]
    pub auto_converge: bool,
    /// Iterative rounds before --on-limit applies.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Seconds of pre-copy before --on-limit applies.
    #[arg(long)]
    pub precopy_timeout: Option<f64>,
    /// What to do when rounds or time run out: force the switchover or cancel.
    #[arg(long, value_enum, default_value = "switchover")]
    pub on_limit: OnLimit,
    /// Send every page in the bulk stage, not only the pages the guest used.
    #[arg(long)]
    pub no_skip_unused: bool,
    /// Do not detect zero pages (send them like any page).
    #[arg(long)]
    pub no_zero_detect: bool,
    /// Hash all guest memory on both sides after completion and compare.
    #[arg(long)]
    pub verify: bool,
}

/// How the destination receives.
#[derive(Args, Debug, Clone)]
pub struct DestinationOptions {
    /// Pinned decompression workers on the destination [default: one per CPU this process
    /// may use, at most 8, less its dataplane cores only where they spin (`--idle spin`):
    /// cores that nap give their CPU to the workers when idle].
    #[arg(long)]
    pub decompress_threads: Option<usize>,
}

/// Options of every side.
#[derive(Args, Debug, Clone)]
pub struct CommonOptions {
    /// Do teardown inside the downtime window (to measure what deferring it saves).
    #[arg(long)]
    pub no_deferred_cleanup: bool,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Run a thread per connection (a writer on the source, a reader on the destination)
    /// even where the dataplane's polling cores could move the frames between the
    /// sockets and the workers themselves (to measure what that saves).
    #[arg(long)]
    pub connection_threads: bool,
    /// Guest memory on hugepages: auto (when reserved), on (required) or off.
    #[arg(long, default_value = "auto")]
    pub hugepages: String,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Seconds a connection may stay silent, or refuse our writes, before the peer is taken
    /// for dead and the migration fails (the source guest runs on).
    #[arg(long, default_value_t = 30.0)]
    pub io_timeout: f64,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Network stack between the two ends: smoltcp on the in-process wire (no root, no
    /// NIC), the kernel's TCP over 127.0.0.1, or smoltcp on two DPDK ports (by default a
    /// memif pair joined inside the process; other ports with EAL arguments after `--`).
    #[arg(long, value_enum, default_value = "loopback")]
    pub stack: DemoStack,
    /// --stack dpdk: the source's and the destination's ports, as the EAL names them.
    #[arg(long, default_value = "net_memif1,net_memif0")]
    pub dpdk_ports: String,
    /// --stack dpdk: arguments for DPDK's EAL, after `--` (default: no hugepages, no PCI,
    /// and the memif pair `net_memif0` (server) and `net_memif1` (client)).
    #[arg(last = true)]
    pub eal: Vec<String>,
    /// IP MTU of the userspace stack's link.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(576..=9000))]
    pub mtu: u16,
    #[command(flatten)]
    pub wrappers: WrapperOptions,
    #[command(flatten)]
    pub dataplane: DataplaneOptions,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub source: SourceOptions,
    #[command(flatten)]
    pub destination: DestinationOptions,
    #[command(flatten)]
    pub common: CommonOptions,
    #[command(flatten)]
    pub tls: TlsOptions,
    /// Seconds the resumed guest runs on the destination before the demo ends.
    #[arg(long, default_value_t = 1.0)]
    pub run_after: f64,
}

/// `--metrics`, on every long-running command.
#[derive(Args, Debug, Clone, Copy)]
pub struct MetricsOptions {
    /// Serve the running migration's figures in Prometheus's text format at
    /// http://ADDR:PORT/metrics (port 0: one the system picks, printed on stderr); on our
    /// own stack also each dataplane core's busy time and each connection's RTT and
    /// retransmissions (docs/metrics.md).
    #[arg(long, value_parser = parse_listen)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Destination address (where `vmigrate recv --listen` runs): HOST:PORT (or
    /// tcp:HOST:PORT, as QEMU writes it).
    #[arg(long, value_parser = parse_tcp)]
    pub to: String,
    /// A control socket (`unix:PATH`) taking QMP-style commands, one JSON object per line
    /// (docs/control.md): query-migrate, migrate_cancel, migrate-set-parameters,
    /// migrate-switchover; events for a client that sent qmp_capabilities.
    #[arg(long, value_parser = parse_unix)]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: MetricsOptions,
    #[command(flatten)]
    pub stack: StackOptions,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub source: SourceOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Args, Debug)]
pub struct RecvArgs {
    /// Address to listen on: IP:PORT (or tcp:IP:PORT, as QEMU writes it).
    #[arg(long, value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// The guest to build: as the source's `--guest`.
    #[arg(long, value_enum, default_value = "synthetic")]
    pub guest: GuestKind,
    /// Seconds the resumed guest runs before recv exits.
    #[arg(long, default_value_t = 1.0)]
    pub run_after: f64,
    /// Largest guest accepted.
    #[arg(long, default_value = "64GiB", value_parser = parse_size)]
    pub max_mem: u64,
    /// Seconds to wait for the source to connect.
    #[arg(long, default_value_t = 60.0)]
    pub accept_timeout: f64,
    /// A TOML file of settings, named as this command's long options (`listen = "..."`,
    /// `accept-timeout = 600`); flags on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A control socket (`unix:PATH`), as `send --control`'s (docs/control.md): the
    /// migration arriving here queried, cancelled (until the destination is ready), or
    /// changed: the changes go to the source, which applies them.
    #[arg(long, value_parser = parse_unix)]
    pub control: Option<PathBuf>,
    /// A DPDK compression device (compressdev) that inflates the source's `deflate` pages,
    /// as the EAL names it: compress_isal0, compress_zlib0, or a QAT device given to the
    /// EAL after `--`. Without it (or where it cannot be opened) they are inflated on the
    /// CPU. Needs DPDK (and root).
    #[arg(long, value_name = "NAME")]
    pub compress_device: Option<String>,
    #[command(flatten)]
    pub metrics: MetricsOptions,
    #[command(flatten)]
    pub stack: StackOptions,
    #[command(flatten)]
    pub destination: DestinationOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}
