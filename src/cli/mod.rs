//! Subcommands and their shared options.

mod args;
mod commands;
mod report;
mod stream;

pub use args::Cli;
pub use commands::run;
