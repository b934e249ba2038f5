//! Migration statistics under the names QEMU's `query-migrate` uses, so operators can put
//! our numbers beside QEMU's; our additions (per-round rows, codec counters, guest
//! backing, verification) sit beside them.

use serde::Serialize;

/// Counters of what the source's encoders did with pages, merged across workers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EncodeCounters {
    /// Zero pages sent as runs without payload (QEMU: `ram.duplicate`).
    pub zero_pages: u64,
    /// Pages sent uncompressed.
    pub raw_pages: u64,
    /// Pages sent compressed (QEMU: `compression.pages`).
    pub compressed_pages: u64,
    /// Bytes of compressed page data (QEMU: `compression.compressed-size`).
    pub compressed_bytes: u64,
    /// Pages offered to the codec (compressed or not): the denominator of the ratio.
    pub codec_input_pages: u64,
    /// Pages sent as XBZRLE deltas (QEMU: `xbzrle-cache.pages`).
    pub xbzrle_pages: u64,
    /// Bytes of XBZRLE deltas (QEMU: `xbzrle-cache.bytes`).
    pub xbzrle_bytes: u64,
    /// Re-sent pages not found in the cache (QEMU: `xbzrle-cache.cache-miss`).
    pub xbzrle_cache_miss: u64,
    /// Deltas that did not fit and went by another encoding (`xbzrle-cache.overflow`).
    pub xbzrle_overflow: u64,
    /// Pages that were unchanged since the cached copy.
    pub xbzrle_unchanged: u64,
    /// Pages sent as copies of a page with the same contents sent in the same round.
    pub copied_pages: u64,
    /// Bytes put on the wire, frame headers included.
    pub wire_bytes: u64,
    /// Pages a compression device compressed (or found not to shrink).
    pub device_pages: u64,
    /// Pages the compression device failed, compressed on the CPU instead.
    pub device_fallback_pages: u64,
}

impl EncodeCounters {
    pub fn merge(&mut self, other: &EncodeCounters) {
        self.zero_pages += other.zero_pages;
        self.raw_pages += other.raw_pages;
        self.compressed_pages += other.compressed_pages;
        self.compressed_bytes += other.compressed_bytes;
        self.codec_input_pages += other.codec_input_pages;
        self.xbzrle_pages += other.xbzrle_pages;
        self.xbzrle_bytes += other.xbzrle_bytes;
        self.xbzrle_cache_miss += other.xbzrle_cache_miss;
        self.xbzrle_overflow += other.xbzrle_overflow;
        self.xbzrle_unchanged += other.xbzrle_unchanged;
        self.copied_pages += other.copied_pages;
        self.wire_bytes += other.wire_bytes;
        self.device_pages += other.device_pages;
        self.device_fallback_pages += other.device_fallback_pages;
    }

    /// Pages covered by these counters.
    pub fn pages(&self) -> u64 {
        self.zero_pages
            + self.raw_pages
            + self.compressed_pages
            + self.xbzrle_pages
            + self.xbzrle_unchanged
            + self.copied_pages
    }
}

/// QEMU's `ram` section.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub total: u64,
    pub transferred: u64,
    pub remaining: u64,
    pub duplicate: u64,
    /// Pages sent as copies of another page of the same contents (not in QEMU).
    pub copied: u64,
    pub skipped: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_sync_count: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleStats {
    pub cache_size: u64,
    pub bytes: u64,
    pub pages: u64,
    pub cache_miss: u64,
    pub cache_miss_rate: f64,
    pub encoding_rate: f64,
    pub overflow: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompressionStats {
    pub pages: u64,
    pub compressed_size: u64,
    pub compression_rate: f64,
}

/// One pre-copy round, for the per-round table.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStats {
    pub round: u32,
    /// "bulk", "iterative" or "stop-and-copy".
    pub stage: &'static str,
    pub duration_ms: f64,
    pub pages: u64,
    pub transferred: u64,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    pub raw_pages: u64,
    pub dirty_pages_after: u64,
    pub mbps: f64,
    pub expected_downtime_ms: f64,
    pub throttle_pct: u8,
}

/// The whole report of one migration, as `--json` prints it.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    pub status: String,
    pub total_time: u64,
    pub setup_time: u64,
    pub downtime: u64,
    pub expected_downtime: u64,
    pub ram: RamStats,
    pub xbzrle_cache: XbzrleStats,
    pub compression: CompressionStats,
    // Our additions.
    pub codec: String,
    pub connections: u16,
    pub compress_threads: usize,
    /// The compression device that did `deflate` (DPDK's name for it), where one did.
    pub compress_device: Option<String>,
    /// What the encoders did with every page, all rounds together.
    pub encode: EncodeCounters,
    pub guest_backing: String,
    /// CPU seconds the migration used on this side (filled in by whoever can measure it:
    /// the CLI counts its process less the guest's vCPU thread).
    pub cpu_seconds: Option<f64>,
    pub rounds: Vec<RoundStats>,
    pub throttle_pct: u8,
    /// Time to stop the workers and free the XBZRLE cache, in microseconds.
    pub cleanup_time_us: u64,
    /// Whether that cleanup ran inside the downtime window (`--no-deferred-cleanup`).
    pub cleanup_in_downtime: bool,
    pub verify_time: Option<u64>,
    pub verified: Option<bool>,
    pub error: Option<String>,
}

/// QEMU's bandwidth unit: megabits per second.
pub fn mbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e6
    } else {
        0.0
    }
}
