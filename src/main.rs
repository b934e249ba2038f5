//! `vmigrate`: the command line. It picks the stack, builds the guest, pins nothing
//! itself (the engine does), and prints progress and statistics. No migration logic
//! lives here.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    cli::tune_allocator();
    // `recv --config FILE`: the file's settings go in ahead of the command line's.
    let args = match cli::expand_config(std::env::args_os().collect()) {
        Ok(args) => cli::Cli::parse_from(args),
        Err(err) => {
            eprintln!("vmigrate: error: {:#}", err);
            return cli::exit_status(&err).code();
        }
    };
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
