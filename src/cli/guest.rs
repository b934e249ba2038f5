//! The guest a command migrates, `--guest synthetic` or `--guest kvm`: booted on the
//! source, built on the destination, and run and checked after the migration.

use super::args::{CommonOptions, GuestArgs, GuestKind};
use super::exit::Failure;
use anyhow::{Context, Result};
use engine::vm::{DestinationVm, SourceVm};
use guests::guest::{parse_huge_policy, GuestRam};
use guests::kvm::{KvmDestination, KvmGuest};
use guests::synthetic::{SyntheticDestination, SyntheticGuest, WorkloadSpec};
use std::sync::Arc;
use std::time::Duration;

/// The running guest on the source.
pub enum SourceGuest {
    Synthetic(SyntheticGuest),
    Kvm(Box<KvmGuest>),
}

impl SourceGuest {
    /// Boots the guest `guest` asks for and lets it warm up.
    pub fn boot(guest: &GuestArgs, common: &CommonOptions) -> Result<Self> {
        let booted = match guest.guest {
            GuestKind::Synthetic => SourceGuest::Synthetic(boot_synthetic(guest, common)?),
            GuestKind::Kvm => {
                if guest.image.is_some() {
                    return Err(Failure::usage(
                        "--image loads a memory image into the synthetic guest; the KVM guest runs its own program",
                    ));
                }
                let booted = KvmGuest::boot_with(guest.mem, guest.workload, guest.seed, guest.kvm_dirty)
                    .map_err(anyhow::Error::msg)
                    .context("booting the KVM guest")?;
                SourceGuest::Kvm(Box::new(booted))
            }
        };
        std::thread::sleep(Duration::from_secs_f64(guest.warmup));
        Ok(booted)
    }

    pub fn vm(&self) -> &dyn SourceVm {
        match self {
            SourceGuest::Synthetic(guest) => guest,
            SourceGuest::Kvm(guest) => &**guest,
        }
    }

    /// Guest stores so far (pages or words, as the workload counts them).
    pub fn writes(&self) -> u64 {
        match self {
            SourceGuest::Synthetic(guest) => guest.writes(),
            SourceGuest::Kvm(guest) => guest.writes(),
        }
    }

    /// Whether the guest shows it runs: it stores, or (idle) its timer ticks.
    pub fn progress(&self) -> u64 {
        match self {
            SourceGuest::Kvm(guest) if guest.spec() == WorkloadSpec::Idle => guest.ticks(),
            _ => self.writes(),
        }
    }

    /// The idle synthetic guest makes no stores at all: nothing shows it runs.
    pub fn silent(&self) -> bool {
        matches!(self, SourceGuest::Synthetic(guest) if guest.spec() == WorkloadSpec::Idle)
    }

    /// The KVM guest's side of the switchover: its pause and state save.
    pub fn switchover_times(&self) -> Option<guests::kvm::SwitchoverTimes> {
        match self {
            SourceGuest::Kvm(guest) => Some(guest.switchover_times()),
            SourceGuest::Synthetic(_) => None,
        }
    }

    /// How the guest's memory is backed, for the report.
    pub fn backing(&self) -> String {
        match self {
            SourceGuest::Synthetic(guest) => guest.ram().backing().to_string(),
            SourceGuest::Kvm(guest) => format!("KVM memory slots (anonymous mmap), {}", guest.dirty_tracking()),
        }
    }
}

fn boot_synthetic(guest: &GuestArgs, common: &CommonOptions) -> Result<SyntheticGuest> {
    let policy = parse_huge_policy(&common.hugepages).map_err(anyhow::Error::msg)?;
    let layout = GuestRam::pc_layout(guest.mem);
    let ram = Arc::new(GuestRam::allocate(&layout, policy).context("allocating guest memory")?);
    match &guest.image {
        Some(path) => {
            if guest.workload != WorkloadSpec::Idle {
                return Err(Failure::usage(format!(
                    "--image runs the idle workload: --workload {} cannot run on it",
                    guest.workload
                )));
            }
            let mut image = std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(path).with_context(|| format!("opening the memory image {}", path.display()))?,
            );
            SyntheticGuest::boot_image(ram, &mut image, guest.seed).map_err(anyhow::Error::msg)
        }
        None => SyntheticGuest::boot(ram, guest.workload, guest.seed).map_err(anyhow::Error::msg),
    }
}

/// The guest being built on the destination.
pub enum DestinationGuest {
    Synthetic(SyntheticDestination),
    Kvm(Box<KvmDestination>),
}

impl DestinationGuest {
    /// A destination for a guest of `kind`; a KVM one checks /dev/kvm before listening.
    pub fn new(kind: GuestKind, max_memory_bytes: u64, common: &CommonOptions) -> Result<Self> {
        Ok(match kind {
            GuestKind::Synthetic => {
                let policy = parse_huge_policy(&common.hugepages).map_err(anyhow::Error::msg)?;
                DestinationGuest::Synthetic(SyntheticDestination::new(max_memory_bytes, policy))
            }
            GuestKind::Kvm => DestinationGuest::Kvm(Box::new(
                KvmDestination::new(max_memory_bytes).map_err(anyhow::Error::msg).context("a KVM destination")?,
            )),
        })
    }

    pub fn vm(&mut self) -> &mut dyn DestinationVm {
        match self {
            DestinationGuest::Synthetic(vm) => vm,
            DestinationGuest::Kvm(vm) => &mut **vm,
        }
    }

    /// Lets the resumed guest run for `seconds`, then has its memory checked (the
    /// synthetic guest paused, by us; the KVM guest running, by itself). Returns the stores
    /// it made after resuming and the verdict; fails if the check did.
    pub fn run_and_check(&mut self, seconds: f64) -> Result<serde_json::Value> {
        let mut switchover = serde_json::Value::Null;
        let (workload, writes_after_resume, check) = match self {
            DestinationGuest::Synthetic(vm) => {
                let guest = vm.guest().context("no guest was resumed")?;
                let before = guest.writes();
                std::thread::sleep(Duration::from_secs_f64(seconds));
                guest.pause();
                let writes = guest.writes() - before;
                let check = guest.check();
                guest.shutdown();
                (guest.spec(), writes, check.map(|()| "ok".to_string()))
            }
            DestinationGuest::Kvm(vm) => {
                let guest = vm.guest().context("no guest was resumed")?;
                let before = guest.writes();
                std::thread::sleep(Duration::from_secs_f64(seconds));
                let writes = guest.writes() - before;
                let check = guest.check().map(|pages| format!("ok {pages}"));
                switchover = serde_json::json!({ "vm-build-us": guest.switchover_times().vm_build_us });
                (guest.spec(), writes, check)
            }
        };
        let mut value = serde_json::json!({
            "workload": workload.to_string(),
            "ran-seconds": seconds,
            "writes-after-resume": writes_after_resume,
            "check": match &check { Ok(verdict) => verdict.clone(), Err(e) => e.clone() },
        });
        if !switchover.is_null() {
            value["switchover"] = switchover;
        }
        check.map_err(anyhow::Error::msg)?;
        Ok(value)
    }
}
