//! The agent under measurement: `hotplug-agent watch --format json` as a child process whose
//! stdout a thread reads line by line, stamping each with the time it was read.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use super::machine::{self, Interrupt};

/// How long the agent may take to attach its probes and say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of the event log and when the bench read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub record: Value,
    /// CLOCK_MONOTONIC right after the reader thread got the line.
    pub read_ns: u64,
}

impl Line {
    pub fn mono_ns(&self) -> Option<u64> {
        self.record["mono_ns"].as_u64()
    }

    pub fn is(&self, source: &str, kind: &str) -> bool {
        self.record["source"] == source && self.record["kind"] == kind
    }
}

/// A running agent, killed (through its `Child`, so only the process we started) on drop.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<Result<Line, String>>,
    /// Every line read so far, in order; the first is the ready record.
    pub seen: Vec<Line>,
    pub stderr_path: PathBuf,
}

impl Agent {
    /// Starts `binary args...` with stderr going to `stderr_path`, and waits for its ready
    /// record.
    pub fn start(binary: &Path, args: &[&str], stderr_path: PathBuf) -> anyhow::Result<Self> {
        let stderr = fs::File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        eprintln!(
            "$ {} 2>{}",
            crate::process::display(&cmd),
            stderr_path.display()
        );
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("agent stdout not piped")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let read_ns = machine::monotonic_ns();
                let msg = match line {
                    Ok(line) => serde_json::from_str(&line)
                        .map(|record| Line { record, read_ns })
                        .map_err(|err| format!("the agent wrote a non-JSON line ({err}): {line}")),
                    Err(err) => Err(format!("reading the agent's stdout: {err}")),
                };
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            lines,
            seen: Vec::new(),
            stderr_path,
        };
        agent.wait_after(0, "the ready record", READY_TIMEOUT, |line| {
            line.record["kind"] == "agent" && line.record["action"] == "ready"
        })?;
        if agent.seen.len() != 1 {
            bail!(
                "the ready record was not the agent's first line:\n{}",
                agent.dump()
            );
        }
        Ok(agent)
    }

    pub fn ready(&self) -> &Value {
        &self.seen[0].record
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line from index `from` of [`Self::seen`] on that matches `pred`, reading
    /// more lines for up to `timeout`.
    pub fn wait_after(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Line) -> bool,
    ) -> anyhow::Result<Line> {
        if let Some(line) = self.seen.iter().skip(from).find(|line| pred(line)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            Interrupt::check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            // Woken at least every 100 ms so that Ctrl-C is noticed; the records themselves
            // wake it as they come.
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(Ok(line)) => {
                    self.seen.push(line);
                    let line = self.seen.last().expect("just pushed");
                    if pred(line) {
                        return Ok(line.clone());
                    }
                }
                Ok(Err(err)) => return Err(anyhow!(err)).context(self.dump()),
                Err(RecvTimeoutError::Timeout) if left.is_zero() => {
                    bail!(
                        "timed out after {timeout:?} waiting for {what}\n{}",
                        self.dump()
                    )
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = match self.child.try_wait() {
                        Ok(Some(status)) => status.to_string(),
                        _ => "not reaped yet".to_owned(),
                    };
                    bail!(
                        "the agent closed its stdout ({status}) while the bench waited for \
                         {what}\n{}",
                        self.dump()
                    )
                }
            }
        }
    }

    /// Reads whatever the agent writes until `until`, without waiting on anything else: the
    /// idle window. Returns how many lines came.
    pub fn drain_until(&mut self, until: Instant) -> anyhow::Result<usize> {
        let before = self.seen.len();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(self.seen.len() - before);
            }
            match self.lines.recv_timeout(left) {
                Ok(Ok(line)) => self.seen.push(line),
                Ok(Err(err)) => return Err(anyhow!(err)).context(self.dump()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the agent exited during the idle window\n{}", self.dump())
                }
            }
        }
    }

    /// The last records and the agent's stderr, for error messages.
    fn dump(&self) -> String {
        const LAST: usize = 20;
        let records: Vec<String> = self
            .seen
            .iter()
            .rev()
            .take(LAST)
            .rev()
            .map(|line| line.record.to_string())
            .collect();
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!(
            "last {} of {} records:\n{}\nagent stderr ({}):\n{}",
            records.len(),
            self.seen.len(),
            records.join("\n"),
            self.stderr_path.display(),
            stderr.trim_end()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGKILL: the eBPF links and the netlink socket are file descriptors, released with
        // the process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
