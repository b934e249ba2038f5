//! The Debian package (`scripts/deb`): built from the binary under test, installed with
//! dpkg, `vmigrate demo` run from the installed path, the receivers' systemd units checked
//! by systemd itself, then removed. Needs root and dpkg (CI has both); says SKIPPED
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmigrate_tests::process::{is_root, run};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(300);
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Removes the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "vmigrate"]).output();
    }
}

fn has(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_debian_package_installs_and_its_binary_migrates() {
    if !is_root() || !has("dpkg-deb") || Path::new("/usr/bin/vmigrate").exists() && !installed_by_dpkg() {
        eprintln!("SKIPPED the_debian_package_installs_and_its_binary_migrates: needs root, dpkg, and no other /usr/bin/vmigrate");
        return;
    }
    let out = std::env::temp_dir().join(format!("vmigrate-deb-{}", std::process::id()));
    let built = run(Command::new(Path::new(ROOT).join("scripts/deb")).arg(BIN).arg(&out), DEADLINE);
    assert!(built.status.success(), "scripts/deb failed:\n{}", built.stderr);
    let deb = PathBuf::from(built.stdout.trim());
    let installed = run(Command::new("dpkg").arg("-i").arg(&deb), DEADLINE);
    let _guard = Installed;
    assert!(installed.status.success(), "dpkg -i failed:\n{}\n{}", installed.stdout, installed.stderr);
    let _ = std::fs::remove_dir_all(&out);

    // The installed binary migrates (the README's main job, on its embedded default).
    let demo = run(Command::new("/usr/bin/vmigrate").args(["demo", "--mem", "32MiB", "--verify"]), DEADLINE);
    assert!(demo.status.success(), "the installed vmigrate demo failed:\n{}", demo.stderr);
    for file in [
        "/usr/share/man/man1/vmigrate.1.gz",
        "/usr/share/man/man1/vmigrate-qemu-recv.1.gz",
        "/usr/share/bash-completion/completions/vmigrate",
        "/usr/share/doc/vmigrate/examples/qemu-recv.toml",
        "/usr/share/doc/vmigrate/exit-codes.md",
    ] {
        assert!(Path::new(file).exists(), "the package lacks {file}");
    }
    // The units as systemd reads them: an instance of each template, its user made by
    // the package.
    if has("systemd-analyze") {
        let dir = std::env::temp_dir().join(format!("vmigrate-units-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for unit in ["vmigrate-qemu-recv@", "vmigrate-recv@"] {
            let instance = dir.join(format!("{unit}check.service"));
            std::fs::copy(format!("/lib/systemd/system/{unit}.service"), &instance).expect("the unit is installed");
            let verified = run(Command::new("systemd-analyze").arg("verify").arg(&instance), DEADLINE);
            let complaints: Vec<&str> =
                verified.stderr.lines().filter(|line| line.contains(&format!("{unit}check.service"))).collect();
            assert!(verified.status.success() && complaints.is_empty(), "{unit}: {}", verified.stderr);
        }
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("SKIPPED checking the units: no systemd-analyze");
    }
}

fn installed_by_dpkg() -> bool {
    Command::new("dpkg").args(["-S", "/usr/bin/vmigrate"]).output().is_ok_and(|o| o.status.success())
}
