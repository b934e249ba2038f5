//! Assembles the KVM guest's program (asm/kvm_guest.S) with GNU binutils into a flat
//! binary that `kvm::layout` loads at 1 MiB. Without `as` and `ld` the crate still
//! builds: the image is empty and `--guest kvm` says what is missing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "asm/kvm_guest.S";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("kvm_guest.o");
    let image = out.join("kvm_guest.bin");
    let assembled = run(Command::new("as").args(["--64", "-o"]).arg(&object).arg(source)).and_then(|()| {
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "-Ttext=0x100000", "--oformat=binary", "-o"])
            .arg(&image)
            .arg(&object))
    });
    if let Err(why) = assembled {
        println!("cargo:warning=the KVM guest was not assembled ({why}); --guest kvm will refuse to run");
        std::fs::write(&image, []).expect("write an empty guest image");
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e} (install binutils)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{command:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}
