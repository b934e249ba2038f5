//! A small client of QEMU's machine protocol (QMP): one JSON object per line over a unix
//! socket, commands answered by `return` or `error`, asynchronous events in between.

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP {command}: {class}: {description}")]
    Command { command: String, class: String, description: String },
    #[error("QMP: {0}")]
    Protocol(String),
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for answers, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying for up to `timeout` while QEMU starts),
    /// reads its greeting and enters command mode. Every later read waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(err) => return Err(QmpError::Io(io::Error::new(err.kind(), format!("{}: {err}", path.display())))),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream, events: Vec::new() };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    description: text("desc"),
                });
            }
            if message.get("event").is_some() {
                self.events.push(message);
            }
        }
    }

    /// The events received so far, taken.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("QEMU closed its QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|err| QmpError::Protocol(format!("bad JSON {line:?}: {err}")))
    }
}
