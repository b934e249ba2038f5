//! The record behind docs/RELIABILITY.md: tests that try a fault or a bad input append one
//! line per run (what was tried, and how it ended) to a file under
//! `VMIGRATE_RELIABILITY_DIR` when it is set; `scripts/reliability` runs those tests and
//! turns the lines into the table. The tests themselves assert that nothing was lost: a
//! line is written only once a run's checks have passed.

use std::io::Write;

/// How a run ended (each kind already checked by the test that records it).
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    /// The migration completed and its memory verified.
    Verified,
    /// It failed with one clear error; the source guest ran on and no destination guest
    /// started.
    FailedCleanly,
    /// The bad input was refused, with no guest started.
    Refused,
}

/// Appends a run of `case` (in `group`) that ended as `ending`.
pub fn record(group: &str, case: &str, ending: Ending) {
    let Some(dir) = std::env::var_os("VMIGRATE_RELIABILITY_DIR") else { return };
    let _ = std::fs::create_dir_all(&dir);
    let line = serde_json::json!({ "group": group, "case": case, "ending": format!("{ending:?}") });
    let file = std::path::Path::new(&dir).join(format!("{}.jsonl", std::process::id()));
    if let Ok(mut out) = std::fs::OpenOptions::new().create(true).append(true).open(file) {
        let _ = writeln!(out, "{line}");
    }
}
