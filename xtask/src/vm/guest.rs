//! The two virtio-serial ports between the host and the guest.
//!
//! - [`Shell`] (`org.hotplug.control`): the guest's `/init` reads one command line at a
//!   time, runs it with `sh -c`, and answers with its output and a last line `@@rc N`.
//! - [`Records`] (`org.hotplug.records`): the guest agent's stdout, its NDJSON event log,
//!   kept apart from the kernel's console output. A thread reads it as it comes and
//!   stamps each line with the host's clock on arrival, which is what the latency
//!   figures are measured with.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The command channel to the guest's `/init`.
pub struct Shell {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// What `/init` prints on the control port once it reads commands.
pub const READY_LINE: &str = "@@ready";
const RC_PREFIX: &str = "@@rc ";

impl Shell {
    pub fn new(stream: UnixStream) -> anyhow::Result<Self> {
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn read_line(&mut self, deadline: Instant, what: &str) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for {what}");
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("the guest closed the control port while {what}"),
            Ok(_) => Ok(line.trim_end_matches('\n').to_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("timed out waiting for {what}")
            }
            Err(e) => Err(e).with_context(|| format!("reading the control port ({what})")),
        }
    }

    /// Waits for `/init` to announce itself (the guest has booted).
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.read_line(deadline, "the guest to boot")? == READY_LINE {
                return Ok(());
            }
        }
    }

    /// Runs `command` (one line, `sh -c` in the guest); its exit code and output.
    pub fn run(&mut self, command: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        if command.contains('\n') {
            bail!("guest commands are one line: {command:?}");
        }
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .context("writing to the control port")?;
        let deadline = Instant::now() + timeout;
        let what = format!("`{command}` in the guest");
        let mut output = String::new();
        loop {
            let line = self.read_line(deadline, &what)?;
            if let Some(rc) = line.strip_prefix(RC_PREFIX) {
                let rc = rc.trim().parse().unwrap_or(-1);
                return Ok((rc, output));
            }
            output.push_str(&line);
            output.push('\n');
        }
    }

    /// Runs `command`, failing unless it exits 0; its output.
    pub fn check(&mut self, command: &str) -> anyhow::Result<String> {
        let (rc, output) = self.run(command, Duration::from_secs(60))?;
        if rc != 0 {
            bail!("`{command}` exited {rc} in the guest:\n{output}");
        }
        Ok(output)
    }
}

/// One NDJSON record of the guest agent, with the host time it arrived.
#[derive(Clone, Debug)]
pub struct Rec {
    pub at: Instant,
    pub v: Value,
}

impl Rec {
    pub fn is(&self, kind: &str, action: &str) -> bool {
        self.v["kind"] == kind && self.v["action"] == action
    }

    pub fn device(&self) -> &str {
        self.v["device"].as_str().unwrap_or("")
    }

    pub fn memory(&self) -> u64 {
        self.v["capacity"]["memory_bytes"].as_u64().unwrap_or(0)
    }

    pub fn cpus(&self) -> u64 {
        self.v["capacity"]["cpus_online"].as_u64().unwrap_or(0)
    }

    pub fn source(&self) -> &str {
        self.v["source"].as_str().unwrap_or("")
    }
}

/// The guest agent's records, as they arrive.
pub struct Records {
    rx: mpsc::Receiver<Rec>,
    pub seen: Vec<Rec>,
}

impl Records {
    /// Reads `stream` on a thread; every line is also appended to `log`.
    pub fn spawn(stream: UnixStream, log: &Path) -> anyhow::Result<Self> {
        let mut log = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("guest-records".into())
            .spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    let _ = writeln!(log, "{line}");
                    let v = serde_json::from_str(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "unparsed": line }));
                    if tx.send(Rec { at, v }).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            rx,
            seen: Vec::new(),
        })
    }

    /// Where the next record will be: waits from here on see only what comes after.
    pub fn mark(&mut self) -> usize {
        self.drain();
        self.seen.len()
    }

    fn drain(&mut self) {
        while let Ok(rec) = self.rx.try_recv() {
            self.seen.push(rec);
        }
    }

    /// Records from `from` on, received so far.
    pub fn since(&mut self, from: usize) -> &[Rec] {
        self.drain();
        &self.seen[from.min(self.seen.len())..]
    }

    /// The first record from index `from` on that matches; waits up to `timeout`.
    pub fn wait_for(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Rec) -> bool,
    ) -> anyhow::Result<Rec> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        loop {
            self.drain();
            if let Some(rec) = self.seen.iter().skip(next).find(|r| pred(r)) {
                return Ok(rec.clone());
            }
            next = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(rec) => self.seen.push(rec),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no agent record {what} within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the records port closed while waiting for {what}")
                }
            }
        }
    }

    /// Waits `quiet` and returns everything that arrived from `from` on.
    pub fn settle(&mut self, from: usize, quiet: Duration) -> &[Rec] {
        std::thread::sleep(quiet);
        self.since(from)
    }
}
