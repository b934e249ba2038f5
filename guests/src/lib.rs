//! The guests vmigrate migrates on its own: the synthetic guest ([`synthetic`]), a thread
//! that writes its memory in patterns the destination can check, on guest RAM mapped with
//! hugepages where they are reserved ([`guest`]); and a KVM micro-VM ([`kvm`]) that runs
//! the same workloads inside a real vCPU. Each implements the engine's
//! `SourceVm` / `DestinationVm` traits, exactly as a VMM that embeds the engine would.

pub mod guest;
mod idle_image;
pub mod kvm;
pub mod synthetic;
