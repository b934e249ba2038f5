//! A client of vmigrate's control socket (docs/control.md): one command and its answer, or
//! a client in command mode that collects the events until the command ends.

use crate::process::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

/// Sends one command line on a fresh connection to `socket`: its answer.
pub fn command(socket: &Path, line: &str) -> serde_json::Value {
    let stream = UnixStream::connect(socket).expect("control socket");
    let mut writer = stream.try_clone().expect("clone");
    writeln!(writer, "{line}").expect("command");
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).expect("answer");
    json(&answer)
}

/// A client that enters command mode (`qmp_capabilities`) and then only listens: the
/// events it got, once the command has ended and closed the socket.
pub fn listen_for_events(socket: &Path) -> JoinHandle<Vec<serde_json::Value>> {
    let mut stream = UnixStream::connect(socket).expect("control socket");
    writeln!(stream, r#"{{"execute": "qmp_capabilities"}}"#).expect("qmp_capabilities");
    let mut lines = BufReader::new(stream).lines().map_while(Result::ok);
    assert_eq!(json(&lines.next().expect("an answer")), serde_json::json!({ "return": {} }));
    std::thread::spawn(move || lines.map(|line| json(&line)).collect())
}

/// Fails the test unless every event is stamped and the last says the migration completed.
pub fn assert_ends_completed(events: &[serde_json::Value]) {
    assert!(events.iter().all(|e| e["event"].is_string() && e["timestamp"]["seconds"].is_u64()), "{events:?}");
    let last = events.last().expect("no event");
    assert_eq!((&last["event"], &last["data"]["status"]), (&"MIGRATION".into(), &"completed".into()), "{events:?}");
}
