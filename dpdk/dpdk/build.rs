//! The wrapper is compiled only where dpdk-sys found DPDK (it says so through its `links`
//! metadata, DEP_DPDK_AVAILABLE).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(dpdk)");
    if std::env::var("DEP_DPDK_AVAILABLE").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=dpdk");
    }
}
