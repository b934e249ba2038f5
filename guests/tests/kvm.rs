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

#[test]
#[ignore]
fn probe_rates() {
    for spec in
        [WorkloadSpec::Seq { pages_per_s: 0 }, WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 0, bits: 16 }]
    {
        let guest = KvmGuest::boot(64 << 20, spec, 2).unwrap();
        for _ in 0..5 {
            let before = guest.writes();
            std::thread::sleep(Duration::from_millis(500));
            eprintln!("{spec}: {} pages/s {:?}", (guest.writes() - before) * 2, guest.failure());
        }
    }
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
