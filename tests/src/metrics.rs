//! Scraping a `--metrics` endpoint, and reading the page with a real Prometheus parser
//! (Debian's python3-prometheus-client, the parser of Prometheus's Python client).

use std::process::{Command, Stdio};

/// Debian's python, which has the client (a pyenv python in PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// Scrapes `http://ARGV[1]/metrics` (no proxy, whatever the environment says) and prints
/// every sample as `name{labels as sorted JSON}` to its value, as one JSON object.
const PARSER: &str = "import json, sys, urllib.request as r\n\
                      from prometheus_client.parser import text_string_to_metric_families as parse\n\
                      page = r.build_opener(r.ProxyHandler({})).open('http://' + sys.argv[1] + '/metrics', timeout=10)\n\
                      print(json.dumps({s.name + json.dumps(s.labels, sort_keys=True): s.value \
                      for f in parse(page.read().decode()) for s in f.samples}))";

/// Whether the parser is installed (`scripts/test` installs it as root).
pub fn parser_available() -> bool {
    Command::new(PYTHON).args(["-c", "import prometheus_client"]).output().is_ok_and(|out| out.status.success())
}

/// The endpoint's address (`ADDR:PORT`) from the announcement among `stderr`'s lines.
pub fn announced(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("vmigrate: metrics at http://")?;
        Some(rest.trim_end_matches("/metrics").to_string())
    })
}

/// Scrapes `address` and parses the page: every sample, keyed `name{labels}` with the
/// labels as sorted JSON (`vmigrate_x{}`, `vmigrate_y{"kind": "raw"}`). Panics if the
/// parser refuses the page.
pub fn scrape_parsed(address: &str) -> serde_json::Value {
    scrape_parsed_with(Command::new(PYTHON), address)
}

/// As `scrape_parsed`, from inside a network namespace: `python` is how to run Debian's
/// python there (`Namespaces::program(side, PYTHON, &[])`).
pub fn scrape_parsed_with(mut python: Command, address: &str) -> serde_json::Value {
    let out = python.args(["-c", PARSER, address]).stderr(Stdio::piped()).output().expect("python3");
    assert!(out.status.success(), "the parser refused the page: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}

/// The value of sample `key` (as `scrape_parsed` names them), 0 if absent.
pub fn sample(parsed: &serde_json::Value, key: &str) -> f64 {
    parsed[key].as_f64().unwrap_or(0.0)
}

/// The samples of metric `name`, whatever their labels.
pub fn samples<'a>(parsed: &'a serde_json::Value, name: &str) -> Vec<(&'a str, f64)> {
    let prefix = format!("{name}{{");
    parsed
        .as_object()
        .map(|all| {
            all.iter()
                .filter(|(key, _)| key.starts_with(&prefix))
                .map(|(key, value)| (key.as_str(), value.as_f64().unwrap_or(0.0)))
                .collect()
        })
        .unwrap_or_default()
}
