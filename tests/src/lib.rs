//! Helpers for the privileged integration tests: guards that put the machine back, and the
//! agent as a child process whose NDJSON records the tests read.
//!
//! Every test that changes CPU or memory state takes [`MachineLock`] first (an `flock`, so
//! tests in different processes cannot overlap either) and holds guards that restore the
//! state on drop, panics included.
use std::{
    fs,
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// True when the tests may change the machine; prints why not otherwise.
pub fn can_change_machine(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("\n*** SKIP {test}: needs root to change CPU/memory state and load eBPF ***\n");
        return false;
    }
    if let Err(why) = hotplug_answers() {
        eprintln!(
            "\n*** SKIP {test}: this machine's CPU/memory hotplug does not answer: {why} ***\n"
        );
        return false;
    }
    true
}

/// Serialises machine-changing tests across threads and processes.
pub struct MachineLock {
    _file: fs::File,
}

const LOCK_PATH: &str = "/tmp/hotplug-agent-tests.lock";
/// Set by `cargo xtask bench` to its PID: it holds [`LOCK_PATH`] for all its suites, and
/// the tests it runs (bench_refresh, storm) run as its grandchildren (through cargo).
/// Taking the flock again from there would wait for the bench, which waits for them:
/// instead the lock is handed over, after checking in /proc/locks that this PID really
/// holds it.
const LOCK_HOLDER_ENV: &str = "HOTPLUG_BENCH_LOCK_HOLDER";

impl MachineLock {
    /// The lock, or none when `cargo xtask bench` holds it for this test
    /// ([`LOCK_HOLDER_ENV`]).
    pub fn take_or_inherit(test: &str) -> Option<Self> {
        if let Ok(holder) = std::env::var(LOCK_HOLDER_ENV) {
            if lock_held_by(&holder) {
                eprintln!("{test}: {LOCK_PATH} is held by the bench (pid {holder}) for us");
                return None;
            }
            eprintln!(
                "{test}: {LOCK_HOLDER_ENV}={holder}, but that process holds no flock on \
                 {LOCK_PATH}: taking it"
            );
        }
        Some(Self::take())
    }

    pub fn take() -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .expect("opening the test lock file");
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock on the test lock failed");
        Self { _file: file }
    }
}

/// Whether `pid` holds an exclusive flock on [`LOCK_PATH`], per /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 864 fe:00:5693581 0 EOF`; waiters have `->` after the number).
fn lock_held_by(pid: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(ino) = fs::metadata(LOCK_PATH).map(|m| m.ino().to_string()) else {
        return false;
    };
    fs::read_to_string("/proc/locks").is_ok_and(|locks| {
        locks.lines().any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() >= 6
                && f[1] == "FLOCK"
                && f[3] == "WRITE"
                && f[4] == pid
                && f[5].rsplit(':').next() == Some(ino.as_str())
        })
    })
}

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEM_DIR: &str = "/sys/devices/system/memory";

/// How long one hotplug write may take before it is abandoned.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes a hotplug control file from a child process that is killed after
/// [`WRITE_TIMEOUT`]. Offlining memory can spin in the kernel for a long time (page
/// migration under memory pressure, seen here), holding the device hotplug lock; a write
/// from the test thread itself could then never be interrupted, and the whole suite would
/// hang instead of failing.
fn write_sysfs(path: &Path, value: &str) -> std::io::Result<()> {
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            &WRITE_TIMEOUT.as_secs().to_string(),
            "sh",
            "-c",
            "printf %s \"$1\" > \"$2\"",
            "sh",
            value,
        ])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(124) | Some(137) | None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "writing {value:?} to {} took over {WRITE_TIMEOUT:?}",
                path.display()
            ),
        )),
        Some(_) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let kind = if err.contains("busy") {
                std::io::ErrorKind::ResourceBusy
            } else {
                std::io::ErrorKind::Other
            };
            Err(std::io::Error::new(
                kind,
                format!("writing {value:?} to {}: {}", path.display(), err.trim()),
            ))
        }
    }
}

/// Whether CPU and memory hotplug answer at all: a no-op write to an online CPU takes the
/// kernel's device hotplug lock, and a block stuck `going-offline` means an offline is
/// still running. Either way the machine cannot take part in tests right now.
pub fn hotplug_answers() -> Result<(), String> {
    let stuck: Vec<String> = fs::read_dir(MEM_DIR)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let state = fs::read_to_string(e.path().join("state")).ok()?;
                (state.trim() == "going-offline")
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    if !stuck.is_empty() {
        return Err(format!(
            "memory blocks stuck going offline: {}",
            stuck.join(", ")
        ));
    }
    if let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) {
        write_sysfs(&PathBuf::from(format!("{CPU_DIR}/cpu{cpu}/online")), "1")
            .map_err(|e| format!("the kernel's hotplug lock is not free: {e}"))?;
    }
    Ok(())
}

/// Takes a CPU offline; puts it back online on drop.
pub struct CpuOffline {
    cpu: u32,
    restored: bool,
}

impl CpuOffline {
    /// The highest CPU that can be taken offline (cpu0 usually cannot).
    pub fn pick() -> Option<u32> {
        let mut cpus: Vec<u32> = fs::read_dir(CPU_DIR)
            .ok()?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("cpu")?
                    .parse()
                    .ok()
            })
            .filter(|n| Path::new(&format!("{CPU_DIR}/cpu{n}/online")).exists())
            .filter(|n| {
                fs::read_to_string(format!("{CPU_DIR}/cpu{n}/online"))
                    .is_ok_and(|s| s.trim() == "1")
            })
            .collect();
        cpus.sort_unstable();
        cpus.pop()
    }

    pub fn new(cpu: u32) -> Self {
        write_sysfs(&PathBuf::from(format!("{CPU_DIR}/cpu{cpu}/online")), "0")
            .expect("taking the CPU offline");
        Self {
            cpu,
            restored: false,
        }
    }

    /// Puts it back now (the records of that are part of most tests).
    pub fn restore(&mut self) {
        write_sysfs(
            &PathBuf::from(format!("{CPU_DIR}/cpu{}/online", self.cpu)),
            "1",
        )
        .expect("putting the CPU back online");
        self.restored = true;
    }
}

impl Drop for CpuOffline {
    fn drop(&mut self) {
        if !self.restored {
            let _ = write_sysfs(
                &PathBuf::from(format!("{CPU_DIR}/cpu{}/online", self.cpu)),
                "1",
            );
        }
    }
}

/// Memory blocks taken offline; every one is put back online on drop.
pub struct BlocksOffline {
    pub blocks: Vec<u32>,
}

pub fn block_size() -> u64 {
    let s = fs::read_to_string(format!("{MEM_DIR}/block_size_bytes")).expect("block_size_bytes");
    u64::from_str_radix(s.trim(), 16).expect("hex block size")
}

/// Online memory blocks, highest first: the likeliest to be free of unmovable pages.
pub fn online_blocks() -> Vec<u32> {
    let mut ids: Vec<u32> = fs::read_dir(MEM_DIR)
        .map(|d| {
            d.filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("memory")?
                    .parse()
                    .ok()
            })
            .filter(|n| {
                fs::read_to_string(format!("{MEM_DIR}/memory{n}/state"))
                    .is_ok_and(|s| s.trim() == "online")
            })
            .collect()
        })
        .unwrap_or_default();
    // High blocks are the likeliest to be free of unmovable pages.
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids
}

impl BlocksOffline {
    /// Offlines up to `n` blocks, trying others where the kernel answers EBUSY.
    pub fn take(n: usize) -> Self {
        let mut guard = Self { blocks: Vec::new() };
        // Bounded: a busy machine can make each refused block slow to refuse.
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in online_blocks() {
            if guard.blocks.len() == n || Instant::now() > deadline {
                break;
            }
            if write_sysfs(
                &PathBuf::from(format!("{MEM_DIR}/memory{id}/state")),
                "offline",
            )
            .is_ok()
            {
                guard.blocks.push(id);
            }
        }
        guard
    }

    /// Finds up to `n` blocks that can go offline and puts them back online at once: they
    /// come back empty, so [`BlocksOffline::take_these`] can offline them back to back.
    /// (Finding them is slow on a machine whose memory is in use: each refused block can
    /// take seconds to refuse, longer than an episode's settle window.)
    pub fn rehearse(n: usize) -> Vec<u32> {
        let mut probe = Self::take(n);
        let ids = probe.blocks.clone();
        probe.restore();
        ids
    }

    /// Offlines the blocks `ids`, in order, skipping any the kernel now refuses.
    pub fn take_these(ids: &[u32]) -> Self {
        let mut guard = Self { blocks: Vec::new() };
        for &id in ids {
            if write_sysfs(
                &PathBuf::from(format!("{MEM_DIR}/memory{id}/state")),
                "offline",
            )
            .is_ok()
            {
                guard.blocks.push(id);
            }
        }
        guard
    }

    /// Puts every block back online now.
    pub fn restore(&mut self) {
        for id in self.blocks.drain(..) {
            let path = PathBuf::from(format!("{MEM_DIR}/memory{id}/state"));
            if let Err(e) = write_sysfs(&path, "online") {
                eprintln!("warning: could not put memory{id} back online: {e}");
            }
        }
    }
}

impl Drop for BlocksOffline {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The agent binary: `HOTPLUG_AGENT_BIN` (set by `cargo xtask test`), else target/debug.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPLUG_AGENT_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/hotplug-agent");
    assert!(
        p.exists(),
        "{} not built: run `cargo xtask test` or `cargo build -p hotplug-agent`",
        p.display()
    );
    p
}

/// A running `hotplug-agent`, killed (by its own PID) on drop.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<Value>,
    /// Every record read so far, in order.
    pub seen: Vec<Value>,
    stderr_path: PathBuf,
}

impl Agent {
    /// Starts `hotplug-agent <args>` with JSON output and waits for its `ready` record.
    pub fn start(args: &[&str]) -> (Self, Value) {
        Self::start_with(Command::new(agent_bin()), args)
    }

    pub fn start_with(mut cmd: Command, args: &[&str]) -> (Self, Value) {
        let stderr_path = std::env::temp_dir().join(format!(
            "hotplug-agent-test-{}-{}.err",
            std::process::id(),
            rand_suffix()
        ));
        let stderr = fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning the agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("agent wrote a non-JSON line ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr_path,
        };
        let ready = agent.wait_for("the ready record", Duration::from_secs(30), |r| {
            r["kind"] == "agent" && r["action"] == "ready"
        });
        assert_eq!(
            agent.seen.len(),
            1,
            "the ready record must be the first line: {:?}",
            agent.seen
        );
        (agent, ready)
    }

    /// Waits for a record matching `pred`, up to `timeout`; panics with what was seen.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; records seen:\n{}\nstderr:\n{}",
                    self.seen
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the agent (SIGSTOP) so the kernel's queue to it fills up; thawed on drop.
    pub fn freeze(&self) -> Frozen {
        // SAFETY: signalling our own child by its PID.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP to the agent");
        Frozen {
            pid: self.child.id() as i32,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.stderr_path);
    }
}

/// A stopped agent; continued on drop.
pub struct Frozen {
    pid: i32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A record's `kind`/`action`/`device`/`source` in one predicate.
pub fn is_event(v: &Value, source: &str, kind: &str, action: &str, device: Option<&str>) -> bool {
    v["source"] == source
        && v["kind"] == kind
        && v["action"] == action
        && match device {
            Some(d) => v["device"] == d,
            None => true,
        }
}

/// MemTotal in bytes and the online CPU count, straight from the kernel.
pub fn machine() -> (u64, u64) {
    let s = hotplug_agent::capacity::read_summary(Path::new("/")).expect("reading the machine");
    (s.memory_bytes, u64::from(s.cpus_online))
}

pub mod cluster;
pub mod fake_api;
pub mod kubelet;
pub mod rbac;

/// A free TCP port on loopback (bound and released: good enough for a test's listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A plain HTTP GET on loopback; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
