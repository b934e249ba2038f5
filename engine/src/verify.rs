//! `--verify`: a digest of all guest memory, computed by several threads, so that both
//! ends can compare what the destination holds with what the source had at switchover.

use migration::memory::{pages_of, GuestMemory};
use migration::PAGE_SIZE_BYTES;
use std::sync::atomic::{AtomicUsize, Ordering};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// Pages hashed as one unit; the chunk digests are then hashed in order.
const CHUNK_PAGES: u64 = 256;

/// XXH3-128 over the chunk digests of every region, in order. Equal memory gives equal
/// digests whatever `threads` is.
pub fn memory_digest(memory: &dyn GuestMemory, threads: usize) -> u128 {
    let chunks: Vec<(usize, u64, u64)> = memory
        .region_bytes()
        .iter()
        .enumerate()
        .flat_map(|(region, &bytes)| {
            let pages = pages_of(bytes);
            (0..pages.div_ceil(CHUNK_PAGES))
                .map(move |c| (region, c * CHUNK_PAGES, (pages - c * CHUNK_PAGES).min(CHUNK_PAGES)))
        })
        .collect();
    let digests: Vec<std::sync::Mutex<u128>> = chunks.iter().map(|_| std::sync::Mutex::new(0)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut buffer = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE_BYTES];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(region, first, count)) = chunks.get(index) else {
                        break;
                    };
                    let bytes = &mut buffer[..count as usize * PAGE_SIZE_BYTES];
                    for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE_BYTES).enumerate() {
                        memory.read_page(region, first + i as u64, page);
                    }
                    *digests[index].lock().unwrap_or_else(|p| p.into_inner()) = xxh3_128(bytes);
                }
            });
        }
    });
    let mut total = Xxh3::new();
    for digest in digests {
        total.update(&digest.into_inner().unwrap_or_else(|p| p.into_inner()).to_le_bytes());
    }
    total.digest128()
}
