//! `--config FILE` for the long-running receivers (`recv`, `qemu-recv`): a TOML file whose
//! keys are the command's own long options (`listen = "tcp:0.0.0.0:4444"`, `accept-timeout =
//! 600`, `tls-psk-file = "..."`), so that a service's settings read like its command line.
//! The file's settings go in ahead of the command line's, and a flag given on the command
//! line overrides the file's (clap takes an option's last value).

use super::args::Cli;
use super::exit::Failure;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::ffi::OsString;
use std::path::Path;

/// The commands that take `--config`.
const CONFIGURABLE: [&str; 2] = ["recv", "qemu-recv"];

/// The command line with the settings of its `--config FILE` (if any) put in ahead of its
/// own arguments.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(command) = args.get(1).and_then(|a| a.to_str()).filter(|c| CONFIGURABLE.contains(c)) else {
        return Ok(args);
    };
    let Some(path) = config_path(&args[2..]) else { return Ok(args) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config {}", path.display()))?;
    let settings = settings(command, &path, &text)?;
    let mut expanded = args[..2].to_vec();
    expanded.extend(settings);
    expanded.extend_from_slice(&args[2..]);
    Ok(expanded)
}

/// The path of `--config PATH` or `--config=PATH` among a command's arguments.
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().map(Into::into);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(path.into());
        }
    }
    None
}

/// The arguments a config file's settings stand for: `--KEY VALUE` for each (`--KEY` alone
/// for `KEY = true`), each KEY one of `command`'s long options.
fn settings(command: &str, path: &Path, text: &str) -> Result<Vec<OsString>> {
    let table: toml::Table =
        text.parse().map_err(|err| Failure::usage(format!("--config {}: not TOML: {err}", path.display())))?;
    let cli = Cli::command();
    let sub = cli.find_subcommand(command).expect("a configurable command exists");
    let known: Vec<&str> = sub.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config").collect();
    let mut args = Vec::new();
    for (key, value) in table {
        if !known.contains(&key.as_str()) {
            return Err(Failure::usage(format!(
                "--config {}: `{key}` is not a setting of `vmigrate {command}` (its settings are its long options: {})",
                path.display(),
                known.join(", ")
            )));
        }
        let value = match value {
            toml::Value::Boolean(true) => {
                args.push(format!("--{key}").into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            other => {
                return Err(Failure::usage(format!(
                    "--config {}: `{key}` must be a string, a number or true/false, not {}",
                    path.display(),
                    other.type_str()
                )))
            }
        };
        args.push(format!("--{key}").into());
        args.push(value.into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn expand_with(config: &str, args: &[&str]) -> Result<Vec<String>> {
        let dir = std::env::temp_dir().join(format!("vmigrate-config-{}-{}", std::process::id(), args.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("recv.toml");
        std::fs::write(&path, config).unwrap();
        let mut argv: Vec<OsString> = ["vmigrate", args[0], "--config"].map(OsString::from).to_vec();
        argv.push(path.clone().into());
        argv.extend(args[1..].iter().map(OsString::from));
        let expanded = expand(argv);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(expanded?.into_iter().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn the_files_settings_apply_and_flags_override_them() {
        let config = "listen = \"tcp:127.0.0.1:4444\"\naccept-timeout = 600\nmax-mem = \"1GiB\"\njson = true\n";
        let args = expand_with(config, &["recv", "--accept-timeout", "5"]).unwrap();
        let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let super::super::args::Command::Recv(recv) = cli.command else { panic!("not recv") };
        assert_eq!(recv.listen.to_string(), "127.0.0.1:4444");
        assert_eq!(recv.accept_timeout, 5.0, "the command line's flag wins");
        assert_eq!(recv.max_mem, 1 << 30);
        assert!(recv.common.json);
    }

    #[test]
    fn flags_that_count_still_count_when_options_override_themselves() {
        let cli = Cli::try_parse_from(["vmigrate", "-vv", "demo"]).unwrap();
        assert_eq!(cli.verbosity.log_level(), Some(log::Level::Trace));
        let cli = Cli::try_parse_from(["vmigrate", "-v", "-v", "demo"]).unwrap();
        assert_eq!(cli.verbosity.log_level(), Some(log::Level::Trace));
    }

    #[test]
    fn the_packaged_example_configs_are_settings_of_their_commands() {
        for command in CONFIGURABLE {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("packaging/examples/{command}.toml"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut args: Vec<OsString> = ["vmigrate", command].map(OsString::from).to_vec();
            args.extend(settings(command, &path, &text).unwrap_or_else(|e| panic!("{command}: {e:#}")));
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{command}: {args:?}: {e}"));
        }
    }

    #[test]
    fn a_key_that_is_no_option_of_the_command_is_refused_by_name() {
        let err = expand_with("listen = \"127.0.0.1:1\"\nlisten-port = 4\n", &["qemu-recv"]).unwrap_err();
        assert!(format!("{err}").contains("`listen-port` is not a setting of `vmigrate qemu-recv`"), "{err}");
        assert!(expand_with("listen = [1, 2]\n", &["recv"]).is_err());
        assert!(expand_with("listen = ", &["recv"]).unwrap_err().to_string().contains("not TOML"));
    }
}
