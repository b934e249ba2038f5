//! Two network namespaces joined by a veth pair (`scripts/netns`), made for one test and
//! removed when it ends, pass or fail.

use std::process::Command;

const NETNS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns");

pub struct Namespaces {
    pub prefix: String,
    bin: String,
}

impl Namespaces {
    /// `scripts/netns up --prefix PREFIX EXTRA...`; commands run `bin` inside.
    pub fn up(prefix: &str, extra: &[&str], bin: &str) -> Namespaces {
        let status =
            Command::new(NETNS).args(["up", "--prefix", prefix]).args(extra).status().expect("run scripts/netns");
        assert!(status.success(), "scripts/netns up failed");
        Namespaces { prefix: prefix.to_string(), bin: bin.to_string() }
    }

    /// `bin ARGS` run inside the `side` namespace ("src", "dst" or "mid").
    pub fn command(&self, side: &str, args: &[&str]) -> Command {
        self.program(side, &self.bin, args)
    }

    /// Any `program ARGS` run inside the `side` namespace.
    pub fn program(&self, side: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(NETNS);
        command.args(["exec", side, "--prefix", &self.prefix, "--", program]).args(args);
        command
    }

    /// The veth end in the `side` namespace.
    pub fn veth(&self, side: &str) -> String {
        format!("{}-{}", self.prefix, if side == "src" { "vs" } else { "vd" })
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new(NETNS).args(["down", "--prefix", &self.prefix]).status();
    }
}
