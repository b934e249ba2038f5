//! Man pages and shell completions, made from the command line's own definitions (clap's),
//! so that they never disagree with `--help`.

use super::args::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::path::Path;
use std::process::ExitCode;

/// Prints `shell`'s completion script for `vmigrate` on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "vmigrate", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Writes vmigrate.1 and a page per command (vmigrate-send.1, ...) into `dir`.
pub fn man_pages(dir: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = Cli::command().name("vmigrate");
    clap_mangen::generate_to(command, dir).with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}
