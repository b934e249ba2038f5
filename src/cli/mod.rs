//! Subcommands and their shared options.

mod allocator;
mod args;
mod bench;
mod commands;
mod compress;
mod config;
mod control;
mod cores;
mod cpu;
mod docs;
mod dpdk;
mod exit;
mod guest;
mod logging;
mod metrics;
mod qemu_migrate;
mod relay;
mod relay_control;
mod report;
mod stacks;
mod stream;
mod tls;

pub use allocator::tune as tune_allocator;
pub use args::Cli;
pub use commands::run;
pub use config::expand as expand_config;
pub use exit::classify as exit_status;
pub use logging::init as init_logging;
