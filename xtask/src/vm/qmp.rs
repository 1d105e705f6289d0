//! A small QMP client: JSON lines over QEMU's unix socket.
//!
//! QEMU greets with `{"QMP": ...}`, accepts nothing but `qmp_capabilities` until it has
//! been sent, then answers each `{"execute": ...}` with one `{"return": ...}` or
//! `{"error": {"class", "desc"}}`. Asynchronous `{"event": ...}` lines may come before
//! any answer; they are kept, with the time they were read, for whoever wants them
//! (docs/interop/qmp-spec.rst, QEMU 7.2).
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read so far, oldest first.
    pub events: Vec<(Instant, Value)>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP closed the connection (QEMU exited?)");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    /// Runs one command; its `return` value, or its `error` as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending {command} to QMP"))?;
        loop {
            let reply = self.read()?;
            if reply.get("event").is_some() {
                self.events.push((Instant::now(), reply));
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                bail!(
                    "QMP {command} {}: {} ({})",
                    request.get("arguments").unwrap_or(&Value::Null),
                    err["desc"].as_str().unwrap_or("?"),
                    err["class"].as_str().unwrap_or("?")
                );
            }
            bail!("unexpected QMP reply to {command}: {reply}");
        }
    }

    /// Waits for an event named `name` matching `pred`, keeping the others; fails after `timeout`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let matches = |e: &Value| e["event"] == name && pred(e);
        if let Some(i) = self.events.iter().position(|(_, e)| matches(e)) {
            return Ok(self.events.remove(i).1);
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no QMP event {name} within {timeout:?}");
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let event = self.read();
            self.reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(60)))?;
            if event.is_err() && Instant::now() >= deadline {
                bail!("no QMP event {name} within {timeout:?}");
            }
            let event = event.with_context(|| format!("waiting for QMP event {name}"))?;
            if matches(&event) {
                return Ok(event);
            }
            self.events.push((Instant::now(), event));
        }
    }
}
