//! Builds the bindings to the system DPDK: finds it with pkg-config (`libdpdk`, 22.11 or
//! newer), compiles the C shim over its static inline fast path with DPDK's own compiler
//! flags, and runs bindgen over the shim's header. Without DPDK the crate builds empty (cfg
//! `dpdk` unset), so the workspace builds everywhere; CI installs DPDK and tests it. With the
//! `required` feature (vmigrate's `dpdk` feature turns it on) a missing DPDK fails the build
//! with what to install.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const MINIMUM_VERSION: &str = "22.11";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dpdk)");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    // Probe first without telling cargo anything: the libraries are linked after the shim.
    if let Err(err) = pkg_config::Config::new().atleast_version(MINIMUM_VERSION).cargo_metadata(false).probe("libdpdk")
    {
        if env::var_os("CARGO_FEATURE_REQUIRED").is_some() {
            // Asked for by vmigrate's `dpdk` feature: an empty crate would only fail later,
            // with unresolved imports that do not say what is missing.
            panic!(
                "the dpdk feature needs DPDK {MINIMUM_VERSION} or newer, found by pkg-config as \
                 libdpdk: install libdpdk-dev, dpdk, clang, libclang-dev and pkg-config \
                 (Debian 12), or build without --features dpdk ({err})"
            );
        }
        println!(
            "cargo:warning=DPDK not found (pkg-config libdpdk >= {MINIMUM_VERSION}): dpdk-sys is built empty ({err})"
        );
        return;
    }
    let mut cflags = dpdk_cflags();
    // compressdev is experimental in 22.11: its declarations are refused without this.
    cflags.push("-DALLOW_EXPERIMENTAL_API".into());

    let mut shim = cc::Build::new();
    shim.file("shim/shim.c").include("shim").warnings(false);
    for flag in &cflags {
        shim.flag(flag);
    }
    shim.compile("vmigrate_dpdk_shim");
    // Now the DPDK libraries, after the shim that needs them.
    pkg_config::Config::new().atleast_version(MINIMUM_VERSION).probe("libdpdk").expect("libdpdk was found above");

    let bindings = bindgen::Builder::default()
        .header("shim/shim.h")
        .clang_args(&cflags)
        // What vmigrate uses (EAL, ports and queues, mbufs and mempools, errors, compression
        // devices) and what those pull in; not rte_flow, whose packed protocol headers
        // bindgen cannot express.
        .allowlist_function("vm_.*|rte_eal_.*|rte_eth_.*|rte_pktmbuf_.*|rte_mempool_.*|rte_lcore_.*|rte_socket_id")
        .allowlist_function(
            "rte_strerror|rte_version|rte_exit|rte_get_main_lcore|rte_thread_register|rte_thread_unregister",
        )
        // Compression devices and their operations.
        .allowlist_function("rte_compressdev_.*|rte_comp_.*")
        .allowlist_type("rte_comp_.*")
        .allowlist_var("vm_.*|RTE_ETH_.*|RTE_MAX_ETHPORTS|RTE_MAX_LCORE|RTE_ETHER_.*")
        .blocklist_function("rte_eth_.*flow.*|rte_eth_dev_priv_dump")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen over DPDK's headers");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    bindings.write_to_file(out.join("bindings.rs")).expect("write the bindings");
    println!("cargo:rustc-cfg=dpdk");
    // Seen by dependents' build scripts as DEP_DPDK_AVAILABLE.
    println!("cargo:available=1");
}

/// DPDK's compiler flags as pkg-config gives them (include paths, `-include rte_config.h`,
/// its baseline `-march`): the shim and bindgen must see the headers as DPDK was built.
fn dpdk_cflags() -> Vec<String> {
    let output = Command::new("pkg-config").args(["--cflags", "libdpdk"]).output().expect("run pkg-config");
    let text = String::from_utf8(output.stdout).expect("pkg-config prints text");
    let mut flags = Vec::new();
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-include" {
            if let Some(file) = words.next() {
                flags.push(format!("-include{file}"));
            }
        } else {
            flags.push(word.to_string());
        }
    }
    flags
}
