//! Settings of a migration, shared by the source and destination engines.

use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub codec: Codec,
    /// Pinned compression workers.
    pub compress_threads: usize,
    /// XBZRLE for re-sent pages, with a cache of this many bytes.
    pub xbzrle_cache_bytes: Option<u64>,
    /// A page whose contents equal a page's sent earlier in the round goes as a copy of it,
    /// found through an index of this many bytes (`migration::seen_pages`).
    pub copy_index_bytes: Option<u64>,
    pub connections: u16,
    pub precopy: PrecopyConfig,
    pub max_bandwidth_bytes_per_s: Option<u64>,
    /// Bulk stage: visit only pages written since boot, where the VM's dirty log covers
    /// that (`SourceVm::log_coverage`); otherwise every page goes.
    pub skip_unused: bool,
    /// Send zero pages as runs without payload.
    pub zero_detect: bool,
    /// Keep teardown out of the downtime window.
    pub deferred_cleanup: bool,
    /// Hash both sides' memory after completion.
    pub verify: bool,
    pub pin_workers: bool,
    /// Hand each connection's write side to its stack where the stack can pull (the
    /// dataplane's polling cores) instead of running a writer thread per connection. Off
    /// exists to measure what it saves.
    pub direct_send: bool,
    /// How long to wait for the destination's answers (Ready, Resumed).
    pub answer_timeout: Duration,
    /// A way to cancel the migration from outside (signals, a control command).
    pub cancel: Option<crate::cancel::Cancel>,
    /// A way to change the running migration from outside (a control command): its
    /// downtime limit, its bandwidth cap, a switchover now.
    pub tuning: Option<crate::tuning::Tuning>,
    /// The compression device that does `deflate`, a queue per worker; under `adaptive`,
    /// `deflate` joins the choices. Without one, `deflate` compresses on the CPU.
    pub offload: Option<std::sync::Arc<dyn crate::offload::OffloadDevice>>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            codec: Codec::None,
            compress_threads: 2,
            xbzrle_cache_bytes: None,
            copy_index_bytes: Some(migration::seen_pages::DEFAULT_INDEX_BYTES),
            connections: 1,
            precopy: PrecopyConfig::default(),
            max_bandwidth_bytes_per_s: None,
            skip_unused: true,
            zero_detect: true,
            deferred_cleanup: true,
            verify: false,
            pin_workers: true,
            direct_send: true,
            answer_timeout: Duration::from_secs(30),
            cancel: None,
            tuning: None,
            offload: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub decompress_threads: usize,
    /// The largest guest this destination accepts, in bytes.
    pub max_memory_bytes: u64,
    pub pin_workers: bool,
    /// The CPU the first decompression worker would be pinned to; the others follow it.
    /// Workers pin from the first CPU up and polling cores from the last down, each to a
    /// CPU no other vmigrate thread holds, so 0 unless a source's compression pool runs in
    /// the same process (the demo): then past it.
    pub first_worker_cpu: usize,
    /// How long to wait for the source's connections and for each frame.
    pub accept_timeout: Duration,
    pub deferred_cleanup: bool,
    /// Over a stack that can (our polling cores), hand each connection's read side to its
    /// core, which puts the frames together and queues the batches itself, instead of a
    /// reader thread per connection. Off exists to measure what it saves.
    pub direct_receive: bool,
    /// A caller watching the migration, and able to cancel or change it.
    pub controls: Option<crate::watch::DestinationControls>,
    /// A compression device that inflates `deflate` pages, a queue per decompression
    /// worker; without one they are inflated on the CPU.
    pub offload: Option<std::sync::Arc<dyn crate::offload::OffloadDevice>>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            decompress_threads: 2,
            max_memory_bytes: 64 << 30,
            pin_workers: true,
            first_worker_cpu: 0,
            accept_timeout: Duration::from_secs(30),
            deferred_cleanup: true,
            direct_receive: true,
            controls: None,
            offload: None,
        }
    }
}
