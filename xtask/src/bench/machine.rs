//! The machine the benchmarks change and measure: the shared lock, guards that put CPUs and
//! memory blocks back online, the clock the agent stamps its records with, and `/proc`.
//!
//! Everything that takes something offline holds a guard whose `Drop` puts it back, so an
//! error, a panic or Ctrl-C (see [`Interrupt`]) leaves the machine as it was.
use std::{
    fs, io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, bail};

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";
/// The privileged tests take the same lock (`tests/src/lib.rs`), so a bench and a test run
/// never change the machine at the same time.
const LOCK_PATH: &str = "/tmp/hotplug-agent-tests.lock";

/// CLOCK_MONOTONIC in nanoseconds: what the agent's `mono_ns` and `kernel_ns` (from
/// `bpf_ktime_get_ns`) are read from, so the figures subtract.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An exclusive `flock` on the lock the privileged tests share, held until dropped.
pub struct MachineLock {
    _file: fs::File,
}

impl MachineLock {
    pub fn take() -> anyhow::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor we own, for as long as `file` lives.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("bench: waiting for {LOCK_PATH} (privileged tests or another bench run)");
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(io::Error::last_os_error()).context(format!("flock {LOCK_PATH}"));
            }
        }
        Ok(Self { _file: file })
    }
}

/// Ctrl-C, SIGTERM and SIGHUP set a flag instead of ending the process at once, so the
/// guards' `Drop` still runs: the loops check [`Interrupt::check`] between steps.
pub struct Interrupt;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

impl Interrupt {
    pub fn install() {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
    }

    pub fn check() -> anyhow::Result<()> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted; putting the machine back");
        }
        Ok(())
    }
}

/// The numbers N of the entries `<dir>/<prefix>N`.
pub(super) fn numbered_entries(dir: &str, prefix: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix(prefix)?
                .parse()
                .ok()
        })
        .collect()
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// A CPU the bench toggles; put back online on drop, whatever state it was left in.
pub struct CpuGuard {
    pub id: u32,
    online: PathBuf,
}

impl CpuGuard {
    /// The highest-numbered online CPU other than cpu0 that has an `online` switch.
    pub fn pick() -> Option<Self> {
        let mut ids: Vec<u32> = numbered_entries(CPU_DIR, "cpu")
            .into_iter()
            .filter(|&id| id != 0)
            .filter(|id| {
                read_trimmed(&Path::new(CPU_DIR).join(format!("cpu{id}/online")))
                    .is_some_and(|s| s == "1")
            })
            .collect();
        ids.sort_unstable();
        let id = ids.pop()?;
        Some(Self {
            id,
            online: Path::new(CPU_DIR).join(format!("cpu{id}/online")),
        })
    }

    pub fn device(&self) -> String {
        format!("cpu{}", self.id)
    }

    pub fn set(&self, online: bool) -> io::Result<()> {
        fs::write(&self.online, if online { "1" } else { "0" })
    }
}

impl Drop for CpuGuard {
    fn drop(&mut self) {
        if read_trimmed(&self.online).is_some_and(|s| s == "1") {
            return;
        }
        if let Err(err) = self.set(true) {
            eprintln!(
                "bench: WARNING: could not put cpu{} back online: {err}; run `echo 1 > {}`",
                self.id,
                self.online.display()
            );
        }
    }
}

/// A memory block the bench toggles; put back online on drop.
pub struct BlockGuard {
    pub id: u32,
    state: PathBuf,
}

impl BlockGuard {
    /// Online blocks, highest id first: the high ones are the likeliest to hold no
    /// unmovable pages, so the kernel lets them go.
    pub fn candidates() -> Vec<u32> {
        let mut ids: Vec<u32> = numbered_entries(MEMORY_DIR, "memory")
            .into_iter()
            .filter(|id| {
                read_trimmed(&Path::new(MEMORY_DIR).join(format!("memory{id}/state")))
                    .is_some_and(|s| s == "online")
            })
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids
    }

    /// Guards block `id` (nothing is written yet).
    pub fn new(id: u32) -> Self {
        Self {
            id,
            state: Path::new(MEMORY_DIR).join(format!("memory{id}/state")),
        }
    }

    pub fn device(&self) -> String {
        format!("memory{}", self.id)
    }

    pub fn set(&self, online: bool) -> io::Result<()> {
        fs::write(&self.state, if online { "online" } else { "offline" })
    }
}

impl Drop for BlockGuard {
    fn drop(&mut self) {
        if read_trimmed(&self.state).is_some_and(|s| s == "online") {
            return;
        }
        if let Err(err) = self.set(true) {
            eprintln!(
                "bench: WARNING: could not put memory{} back online: {err}; run `echo online > {}`",
                self.id,
                self.state.display()
            );
        }
    }
}

/// What `/proc/PID/status` says about a process's memory and scheduling.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStatus {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Context switches summed over every thread: voluntary ones (the thread went to sleep,
    /// one per wake-up) and involuntary ones (preempted while running).
    pub voluntary: u64,
    pub involuntary: u64,
    pub threads: usize,
}

impl ProcStatus {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let status = fs::read_to_string(dir.join("status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let mut out = Self {
            rss_kib: field(&status, "VmRSS:").context("VmRSS missing")?,
            hwm_kib: field(&status, "VmHWM:").context("VmHWM missing")?,
            ..Self::default()
        };
        // The process's own counters cover only its main thread; each thread has its own.
        for tid in fs::read_dir(dir.join("task")).context("listing the agent's threads")? {
            let path = tid?.path().join("status");
            // A thread may end between the listing and the read.
            let Ok(status) = fs::read_to_string(&path) else {
                continue;
            };
            out.threads += 1;
            out.voluntary += field(&status, "voluntary_ctxt_switches:").unwrap_or(0);
            out.involuntary += field(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        }
        Ok(out)
    }

    pub fn ctxt_switches(&self) -> u64 {
        self.voluntary + self.involuntary
    }
}

/// The number after `name` on its line of a `/proc/*/status` file (`VmRSS:  5120 kB`).
fn field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields() {
        let status = "Name:\thotplug-agent\nVmHWM:\t    6144 kB\nVmRSS:\t    5120 kB\n\
                      voluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(field(status, "VmRSS:"), Some(5120));
        assert_eq!(field(status, "VmHWM:"), Some(6144));
        // `voluntary_` must not match the tail of `nonvoluntary_`.
        assert_eq!(field(status, "voluntary_ctxt_switches:"), Some(12));
        assert_eq!(field(status, "nonvoluntary_ctxt_switches:"), Some(3));
        assert_eq!(field(status, "VmSwap:"), None);
    }
}
