//! Finding, signalling and waiting for a stand-in instance by its pidfile, race-free:
//! the process is pinned with a pidfd before it is checked and signalled, so a recycled
//! PID is never hit, and its exit is awaited with poll(2) on that pidfd (no sleep loop;
//! it also works for a process that is not our child, or a zombie nobody reaps).

use std::{
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::{Duration, Instant},
};

/// The PID written in `pidfile`.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// pidfd_open(2).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(fd, sig, NULL info, 0 flags) on a descriptor we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            // Already gone: that is what we wanted.
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        },
    }
}

/// True once the process behind `fd` has exited (within `timeout`).
fn wait_exit(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `pid` runs `kubelet-standin ... --pidfile <pidfile>` (a zombie has an empty
/// command line and does not count).
fn is_instance(pid: i32, pidfile: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let standin = args.first().is_some_and(|argv0| {
        Path::new(std::ffi::OsStr::from_bytes(argv0))
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"kubelet-standin"))
    });
    let path = pidfile.as_os_str().as_bytes();
    let ours = args
        .windows(2)
        .any(|w| w[0] == b"--pidfile" && w[1] == path)
        || args
            .iter()
            .any(|a| a.strip_prefix(b"--pidfile=".as_slice()) == Some(path));
    standin && ours
}

/// The live stand-in that owns `pidfile`, pinned by a pidfd.
pub fn running_instance(pidfile: &Path) -> Option<(i32, OwnedFd)> {
    let pid = read_pid(pidfile)?;
    let fd = pidfd_open(pid).ok()?;
    // Checked after pinning: the PID cannot be recycled under us from here on.
    is_instance(pid, pidfile).then_some((pid, fd))
}

/// How an instance went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// None was running.
    NotRunning,
    /// Exited after SIGTERM.
    Terminated(i32),
    /// Needed SIGKILL after `timeout`.
    Killed(i32),
}

/// SIGTERM to the instance owning `pidfile`, then waits up to `timeout` for it to exit
/// (SIGKILL after that, as systemd's `TimeoutStopSec`).
pub fn stop_instance(pidfile: &Path, timeout: Duration) -> io::Result<Stopped> {
    let Some((pid, fd)) = running_instance(pidfile) else {
        return Ok(Stopped::NotRunning);
    };
    pidfd_signal(&fd, libc::SIGTERM)?;
    if wait_exit(&fd, timeout)? {
        return Ok(Stopped::Terminated(pid));
    }
    pidfd_signal(&fd, libc::SIGKILL)?;
    if wait_exit(&fd, Duration::from_secs(5))? {
        return Ok(Stopped::Killed(pid));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("kubelet-standin {pid} survived SIGKILL"),
    ))
}

/// Makes this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER).
/// A stand-in outlives the `restart` process that started it; without this it is
/// re-parented to PID 1, which in a container often reaps nothing, and every stopped
/// instance would stay a zombie. With it, [`reap_exited_standins`] can collect them.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer option; no pointers involved.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "warning: PR_SET_CHILD_SUBREAPER: {}",
            io::Error::last_os_error()
        );
    }
}

/// Reaps our children that are exited stand-ins (zombies named `kubelet-standin`),
/// each by its own PID, so no other child's exit status is taken.
pub fn reap_exited_standins() {
    let me = std::process::id().to_string();
    let Ok(dir) = fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if comm == "kubelet-standin" && state == Some("Z") && ppid == Some(me.as_str()) {
            let mut status = 0;
            // SAFETY: waitpid on one specific child PID, non-blocking.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}
