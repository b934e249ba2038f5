//! Guest memory on hugepages, end to end. A test binary of its own: cargo runs test
//! binaries one after another, so no other test's guest takes the hugepages this one
//! reserved (guests on `--hugepages auto` use them when free).

use std::process::Command;
use std::time::Duration;
use vmigrate_tests::process::{json, run};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(120);

/// Hugepages this test needs: a 64 MiB guest on each side of the demo.
const HUGEPAGES_NEEDED: u64 = 2 * 32;

#[test]
fn demo_on_hugepages() {
    let status = hugepages::hugepage_status().expect("read /proc/meminfo");
    let mut restore = None;
    if status.free < HUGEPAGES_NEEDED {
        match hugepages::reserve_hugepages(status.total + HUGEPAGES_NEEDED - status.free) {
            Ok(now) if now.free >= HUGEPAGES_NEEDED => restore = Some(status.total),
            Ok(_) | Err(_) => {
                // CI runs as root and reserves them; a developer run may not be able to.
                eprintln!("SKIPPED demo_on_hugepages: {HUGEPAGES_NEEDED} free 2 MiB hugepages needed (run as root, or reserve them)");
                return;
            }
        }
    }
    let finished = run(
        Command::new(BIN).args([
            "demo",
            "--mem",
            "64MiB",
            "--hugepages",
            "on",
            "--verify",
            "--json",
            "--run-after",
            "0.2",
        ]),
        DEADLINE,
    );
    if let Some(total) = restore {
        let _ = hugepages::reserve_hugepages(total);
    }
    assert!(finished.status.success(), "demo failed:\n{}", finished.stderr);
    let value = json(&finished.stdout);
    assert_eq!(value["guest-backing"], "hugetlb-2M");
    assert_eq!(value["verified"], true);
}
