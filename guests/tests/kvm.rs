//! The KVM guest on this machine's /dev/kvm: it boots, runs its workloads and checks
//! itself; pause and resume hold it still. Skipped (and says so) without /dev/kvm.

use engine::vm::SourceVm;
use std::time::{Duration, Instant};
use vmigrate_guests::kvm::{self, KvmGuest};
use vmigrate_guests::synthetic::WorkloadSpec;

fn kvm_or_skip(test: &str) -> bool {
    match kvm::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: no usable KVM ({why})");
            false
        }
    }
}

/// Waits until the guest has written `pages` more pages, or fails the test.
fn wait_for_writes(guest: &KvmGuest, pages: u64) {
    let target = guest.writes() + pages;
    let deadline = Instant::now() + Duration::from_secs(30);
    while guest.writes() < target {
        assert!(guest.failure().is_none(), "guest failed: {:?}", guest.failure());
        assert!(Instant::now() < deadline, "the guest wrote {} pages in 30 s", guest.writes());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn each_workload_runs_and_checks_itself() {
    if !kvm_or_skip("each_workload_runs_and_checks_itself") {
        return;
    }
    let sweep = KvmGuest::boot(64 << 20, WorkloadSpec::Seq { pages_per_s: 0 }, 1).unwrap();
    wait_for_writes(&sweep, 50_000);
    assert_eq!(sweep.check().unwrap(), (64 << 20) / 4096 - 1024, "every page of the area");

    let dirty =
        KvmGuest::boot(64 << 20, WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 0, bits: 16 }, 2).unwrap();
    wait_for_writes(&dirty, 10_000);
    assert_eq!(dirty.check().unwrap(), 4096);

    let idle = KvmGuest::boot(8 << 20, WorkloadSpec::Idle, 3).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while idle.ticks() < 20 {
        assert!(Instant::now() < deadline, "the idle guest's timer ticked {} times in 10 s", idle.ticks());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(idle.check().unwrap(), 0);
}

#[test]
fn a_paused_guest_writes_nothing_and_resumes() {
    if !kvm_or_skip("a_paused_guest_writes_nothing_and_resumes") {
        return;
    }
    let guest = KvmGuest::boot(32 << 20, WorkloadSpec::Seq { pages_per_s: 0 }, 1).unwrap();
    wait_for_writes(&guest, 1000);
    guest.pause();
    let paused_at = guest.writes();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.writes(), paused_at, "no writes while paused");
    assert!(!guest.device_state().is_empty(), "the vCPU state saves while paused");
    guest.resume();
    wait_for_writes(&guest, 1000);
    assert!(guest.check().is_ok());
}

/// Overwrites page `page` of the area (flat page 1024 + page) with `edit` applied.
fn edit_area_page(guest: &KvmGuest, page: u64, edit: impl FnOnce(&mut [u8])) {
    let mut bytes = vec![0u8; 4096];
    guest.memory().read_page(0, 1024 + page, &mut bytes);
    edit(&mut bytes);
    guest.memory().write_page(0, 1024 + page, &bytes);
}

#[test]
fn the_guests_own_checks_catch_torn_and_stale_pages() {
    if !kvm_or_skip("the_guests_own_checks_catch_torn_and_stale_pages") {
        return;
    }
    let sweep = KvmGuest::boot(16 << 20, WorkloadSpec::Seq { pages_per_s: 0 }, 1).unwrap();
    wait_for_writes(&sweep, 20_000);
    sweep.pause();
    edit_area_page(&sweep, 7, |bytes| bytes[0] = bytes[0].wrapping_add(5));
    sweep.resume();
    let verdict = sweep.check().unwrap_err();
    assert!(verdict.contains("check BAD page 7"), "{verdict}");

    let dirty =
        KvmGuest::boot(16 << 20, WorkloadSpec::Dirty { area_bytes: 1 << 20, pages_per_s: 0, bits: 16 }, 2).unwrap();
    // A torn page: one word changed without its page's sum.
    dirty.pause();
    edit_area_page(&dirty, 3, |bytes| bytes[100] ^= 1);
    dirty.resume();
    let verdict = dirty.check().unwrap_err();
    assert!(verdict.contains("check BAD page 3"), "{verdict}");
    dirty.pause();
    edit_area_page(&dirty, 3, |bytes| bytes[100] ^= 1);
    dirty.resume();
    // At once: a request right after an answer is answered too.
    assert_eq!(dirty.check().unwrap(), 256, "whole again");

    // A stale page: a whole older version of itself, as a lost dirty bit would leave it.
    let mut old = vec![0u8; 4096];
    dirty.memory().read_page(0, 1024 + 5, &mut old);
    let mut now = old.clone();
    while now == old {
        wait_for_writes(&dirty, 1000);
        dirty.memory().read_page(0, 1024 + 5, &mut now);
    }
    dirty.pause();
    edit_area_page(&dirty, 5, |bytes| bytes.copy_from_slice(&old));
    dirty.resume();
    let verdict = dirty.check().unwrap_err();
    assert!(verdict.contains("check BAD sum"), "{verdict}");
}

/// Every dirty page KVM reported, as flat page numbers (region 0 only: small guests).
fn take_all_dirty(guest: &KvmGuest) -> Vec<u64> {
    let pages = guest.memory().region_bytes()[0] / 4096;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    guest.dirty_log().take_dirty(0, &mut bits);
    let mut dirty = Vec::new();
    migration::dirty::for_each_set_bit(&bits, |page| dirty.push(page));
    dirty
}

#[test]
fn the_dirty_log_and_the_ring_report_what_the_guest_wrote() {
    if !kvm_or_skip("the_dirty_log_and_the_ring_report_what_the_guest_wrote") {
        return;
    }
    for tracking in [kvm::DirtyTracking::Log, kvm::DirtyTracking::Ring] {
        let area = 64u64;
        let spec = WorkloadSpec::Dirty { area_bytes: area * 4096, pages_per_s: 0, bits: 16 };
        let guest = KvmGuest::boot_with(16 << 20, spec, 3, tracking).unwrap();
        if tracking == kvm::DirtyTracking::Log {
            // This kernel offers manual protection: the log is fetched, then cleared.
            eprintln!("{}", guest.dirty_tracking());
        }
        wait_for_writes(&guest, 5000);
        let first = take_all_dirty(&guest);
        // The first take holds the VMM's boot writes: page tables, program, area.
        assert!(first.contains(&0x200) && first.contains(&0x100), "{tracking:?}: boot pages in {first:?}");
        assert!((1024..1024 + area).all(|p| first.contains(&p)), "{tracking:?}: the whole area");
        wait_for_writes(&guest, 5000);
        guest.pause();
        let second = take_all_dirty(&guest);
        let area_pages: Vec<u64> = second.iter().copied().filter(|&p| p >= 1024).collect();
        // 5000 random writes over 64 pages touch all of them; nothing past the area.
        assert_eq!(area_pages, (1024..1024 + area).collect::<Vec<_>>(), "{tracking:?}");
        assert!(second.contains(&0), "{tracking:?}: the counters' page");
        assert!(!second.contains(&0x100), "{tracking:?}: the program was not written again");
        assert!(take_all_dirty(&guest).is_empty(), "{tracking:?}: a paused guest dirties nothing");
    }
}

/// More pages dirtied between two takes than the ring holds: the reaper keeps the ring
/// from overflowing (KVM here does not stop the vCPU at the ring's soft limit), and every
/// page is reported.
#[test]
fn a_guest_dirtying_more_pages_than_the_ring_holds_loses_none() {
    if !kvm_or_skip("a_guest_dirtying_more_pages_than_the_ring_holds_loses_none") {
        return;
    }
    // The sweeper touches 130 000 pages a sweep, twice the ring's 64 Ki entries.
    let mem = 512 << 20;
    let guest = KvmGuest::boot_with(mem, WorkloadSpec::Seq { pages_per_s: 0 }, 1, kvm::DirtyTracking::Ring).unwrap();
    let area = mem / 4096 - 1024;
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.writes() < area + 1000 {
        assert!(guest.failure().is_none(), "the guest stopped: {:?}", guest.failure());
        assert!(Instant::now() < deadline, "{} writes in 60 s", guest.writes());
        std::thread::sleep(Duration::from_millis(20));
    }
    guest.pause();
    let dirty = take_all_dirty(&guest);
    assert!((1024..1024 + area).all(|p| dirty.binary_search(&p).is_ok()), "every page of the sweep, once harvested");
}
