//! Pinning worker threads to cores. Compression and decompression workers are pinned so
//! that each keeps its caches and the scheduler does not stack two of them on one core
//! while another idles.

use std::sync::OnceLock;

fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: OnceLock<Vec<core_affinity::CoreId>> = OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Cores this process may run on.
pub fn core_count() -> usize {
    cores().len().max(1)
}

/// Pins the calling thread to core `index` modulo the available cores. Returns false when
/// pinning is not possible here (the worker then runs unpinned).
pub fn pin_current(index: usize) -> bool {
    match cores() {
        [] => false,
        cores => core_affinity::set_for_current(cores[index % cores.len()]),
    }
}
