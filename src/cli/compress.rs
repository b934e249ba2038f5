//! `--codec deflate` and `--compress-device NAME`: the source's compression device (DPDK's
//! compressdev), opened on the process's EAL. `deflate` without a device named uses
//! `compress_isal0` (ISA-L's deflate, in software: Debian's DPDK has it); `adaptive` uses
//! a device only where one is named, and then has `deflate` among its choices. `recv
//! --compress-device` inflates on one.

use super::exit::Failure;
use anyhow::Result;
use engine::offload::OffloadDevice;
use migration::codec::Codec;
use std::sync::Arc;

/// The device `deflate` uses when none is named.
pub const DEFAULT_DEVICE: &str = "compress_isal0";

/// The device the source's codec and `--compress-device` ask for, if any.
pub fn wanted(codec: Codec, device: Option<&str>) -> Result<Option<String>> {
    match (codec, device) {
        (Codec::Deflate, device) => Ok(Some(device.unwrap_or(DEFAULT_DEVICE).to_string())),
        (Codec::Adaptive, device) => Ok(device.map(str::to_string)),
        (codec, Some(_)) => Err(Failure::usage(format!(
            "--compress-device compresses with `deflate`, and --codec {codec} does not use it: give --codec \
             deflate, or adaptive (which then has deflate among its choices)"
        ))),
        (_, None) => Ok(None),
    }
}

/// The EAL arguments for a device: `args` with `--vdev NAME` added where NAME is one of
/// DPDK's software devices (`compress_isal0`, `compress_zlib0`) that `args` do not make;
/// a process that starts the EAL only for the device gets a small one of its own (no
/// hugepages, no PCI).
pub fn eal_args(args: &[String], device: &str) -> Vec<String> {
    let mut args = if args.is_empty() { super::dpdk::private_eal_args("compress", 256) } else { args.to_vec() };
    if device.starts_with("compress_") && !args.iter().any(|arg| arg.starts_with(device)) {
        args.extend(["--vdev".to_string(), device.to_string()]);
    }
    args
}

/// The device named, opened on the process's EAL (started with `eal_args` if it is not
/// yet).
#[cfg(feature = "dpdk")]
pub fn open(name: &str, eal_args: &[String]) -> Result<Arc<dyn OffloadDevice>> {
    use anyhow::Context;
    let eal = super::dpdk::eal(eal_args)?;
    let device = engine::offload::dpdk::DpdkDevice::new(eal, name)
        .with_context(|| format!("opening compression device {name}"))?;
    log::info!("compression device {name}: deflate on it, a queue pair per worker");
    Ok(Arc::new(device))
}

#[cfg(not(feature = "dpdk"))]
pub fn open(name: &str, _eal_args: &[String]) -> Result<Arc<dyn OffloadDevice>> {
    Err(Failure::usage(format!(
        "compression device {name} is DPDK's, and this vmigrate was built without DPDK: build it with \
         `--features dpdk` (needs libdpdk-dev), or compress on the CPU with --codec zlib (the same raw deflate)"
    )))
}

/// The source's device for `codec` and `--compress-device`, opened; `eal_args` are the
/// EAL arguments the command was given (after `--`).
pub fn source_device(codec: Codec, device: Option<&str>, given: &[String]) -> Result<Option<Arc<dyn OffloadDevice>>> {
    match wanted(codec, device)? {
        Some(name) => Ok(Some(open(&name, &eal_args(given, &name))?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_takes_isal_unless_told_and_other_codecs_refuse_a_device() {
        assert_eq!(wanted(Codec::Deflate, None).unwrap().as_deref(), Some("compress_isal0"));
        assert_eq!(wanted(Codec::Deflate, Some("compress_zlib0")).unwrap().as_deref(), Some("compress_zlib0"));
        assert_eq!(wanted(Codec::Adaptive, None).unwrap(), None);
        assert_eq!(wanted(Codec::Adaptive, Some("compress_isal0")).unwrap().as_deref(), Some("compress_isal0"));
        assert_eq!(wanted(Codec::Lz4, None).unwrap(), None);
        let refused = wanted(Codec::Lz4, Some("compress_isal0")).unwrap_err().to_string();
        assert!(refused.contains("--codec lz4 does not use it"), "{refused}");
    }

    #[test]
    fn the_eal_gets_the_software_device_it_lacks() {
        let own = eal_args(&[], "compress_isal0");
        assert!(own.contains(&"--no-huge".to_string()));
        assert_eq!(own[own.len() - 2..], ["--vdev", "compress_isal0"]);
        let given: Vec<String> = ["--vdev", "compress_isal0,socket_id=0"].iter().map(|a| a.to_string()).collect();
        assert_eq!(eal_args(&given, "compress_isal0"), given);
        let qat = eal_args(&given, "0000:3d:00.0_qat_comp");
        assert_eq!(qat, given, "a hardware device comes from the EAL's own arguments");
    }
}
