//! Subcommands and their shared options.

mod args;
mod bench;
mod charts;
mod commands;
mod control;
mod cpu;
mod dpdk;
mod model;
mod qemu_migrate;
mod relay;
mod report;
mod stream;
mod tls;

pub use args::Cli;
pub use commands::run;
