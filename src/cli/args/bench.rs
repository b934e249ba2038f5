//! `vmigrate bench`: the rows of its table and where it runs them.

use super::parse_size;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Every row `bench` knows, in the order of its table.
pub const BENCH_ROWS: &str =
    "plain,lz4,zlib,zstd,shuffle-lz4,shuffle-zstd,bitshuffle-lz4,adaptive,xbzrle,lz4+xbzrle,zlib+xbzrle,\
                              zstd+xbzrle,skip-unused-off,deferred-cleanup-off";
/// Rows `bench` knows beyond its default table: those on a DPDK compression device.
pub const DEVICE_ROWS: &str = "deflate,deflate-both,adaptive+deflate";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Guests to migrate: idle (a booted-OS image, no writes) and dirty (writing 5000
    /// random pages per second over --dirty-area).
    #[arg(long, value_delimiter = ',', default_value = "idle,dirty")]
    pub guests: Vec<String>,
    /// The idle guest's memory: this image of a real idle guest (`scripts/guest-image`)
    /// instead of the synthetic one.
    #[arg(long)]
    pub idle_image: Option<PathBuf>,
    /// Guest memory.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub mem: u64,
    /// The area the dirty guest writes to.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub dirty_area: u64,
    /// Rows of the table: plain, lz4, zlib, zstd, shuffle-lz4, shuffle-zstd, bitshuffle-lz4, adaptive,
    /// xbzrle, lz4+xbzrle, zlib+xbzrle, zstd+xbzrle, skip-unused-off,
    /// deferred-cleanup-off. Plain (no codec) keeps zero-page detection. Also, on DPDK's
    /// ISA-L compression device (a build with the dpdk feature, as root): deflate,
    /// deflate-both (the destination inflating on the device too) and adaptive+deflate
    /// (adaptive with deflate among its choices).
    #[arg(long, value_delimiter = ',', default_value = BENCH_ROWS)]
    pub rows: Vec<String>,
    /// Run the destination in namespace PREFIX-dst and the source in PREFIX-src, over the
    /// link `scripts/netns up --prefix PREFIX` made (the destination is 10.77.0.2); without
    /// it both run here over loopback.
    #[arg(long)]
    pub netns: Option<String>,
    /// The link's name in the report (e.g. 1gbit, 10gbit, unshaped).
    #[arg(long, default_value = "loopback")]
    pub link: String,
    /// The stack both ends migrate over: the kernel's TCP, or (with --netns) our smoltcp
    /// stack on the namespaces' veth ends, on packet sockets (af-packet) or on a DPDK port
    /// (dpdk: DPDK's net_af_packet driver on the veth end, no hugepages; needs a build with
    /// the dpdk feature).
    #[arg(long, value_enum, default_value = "kernel")]
    pub stack: BenchStack,
    /// Folder for bench.json, the table and the charts.
    #[arg(long, default_value = "bench-report")]
    pub report: PathBuf,
    /// Compression workers on each side.
    #[arg(long, default_value_t = 2)]
    pub compress_threads: usize,
    /// First TCP port used (one per run).
    #[arg(long, default_value_t = 4800)]
    pub port: u16,
    /// Seconds any one migration may take before the bench gives up on it.
    #[arg(long, default_value_t = 900.0)]
    pub timeout: f64,
    /// Hash all memory on both sides after each migration and compare (slower, and the
    /// hashing counts in the CPU columns).
    #[arg(long)]
    pub verify: bool,
    /// Runs per row; the table shows the run with the median total time (short runs on a
    /// shared machine vary by tens of percent).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub repeat: u32,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchStack {
    Kernel,
    AfPacket,
    Dpdk,
}
