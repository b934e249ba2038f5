//! `vmigrate`: the command line. It picks the stack, builds the guest, pins nothing
//! itself (the engine does), and prints progress and statistics. No migration logic
//! lives here.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    cli::tune_allocator();
    let args = cli::Cli::parse();
    cli::init_logging(&args.verbosity);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // One line, for operators and scripts alike; the status says what kind of
            // ending it was (docs/exit-codes.md).
            eprintln!("vmigrate: error: {:#}", err);
            cli::exit_status(&err).code()
        }
    }
}
