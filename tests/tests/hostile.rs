//! Hostile input at the command line and in the files the agent is pointed at: each case
//! must end at once with a clear error that names the flag or file, never a panic, a hang
//! or a read that grows without bound. None of these needs root or changes the machine.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use hotplug_tests::agent_bin;

/// Runs the agent; its exit status and stderr. Killed (by its PID; the test fails) if it
/// does not end within `limit`.
fn run(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let child = Command::new(agent_bin())
        .args(args)
        .env_remove("HOTPLUG_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.expect("waiting for the agent");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            (out.status.code(), err)
        }
        Err(_) => {
            // SAFETY: kill(2) of our own child, by its PID.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!(
                "`hotplug-agent {}` still running after {limit:?}",
                args.join(" ")
            );
        }
    }
}

fn refused(args: &[&str], wanted: &[&str]) {
    let (code, err) = run(args, Duration::from_secs(10));
    assert!(
        code.is_some_and(|c| c != 0),
        "`{}` exited {code:?}, want a failure; stderr:\n{err}",
        args.join(" ")
    );
    assert!(!err.contains("panicked"), "a panic, not an error:\n{err}");
    for w in wanted {
        assert!(err.contains(w), "stderr lacks {w:?}:\n{err}");
    }
}

const STANDALONE: [&str; 4] = ["run", "--no-kubernetes", "--refresh", "none"];

#[test]
fn durations_that_would_overflow_a_deadline_are_refused_by_name() {
    for (flag, value) in [
        ("--verify-timeout", "400000000000y"),
        ("--api-timeout", "0s"),
        ("--max-wait-ms", "18446744073709551615"),
        ("--rescan-interval", "18446744073709551615"),
    ] {
        let mut args = STANDALONE.to_vec();
        args.extend([
            flag,
            value,
            "--stream-socket",
            "off",
            "--metrics-addr",
            "off",
        ]);
        refused(&args, &[flag]);
    }
    // The refresh timeout matters (and is checked) where a backend uses it.
    refused(
        &[
            "run",
            "--no-kubernetes",
            "--refresh",
            "command",
            "--refresh-command",
            "/bin/true",
            "--refresh-timeout",
            "400000000000y",
            "--stream-socket",
            "off",
            "--metrics-addr",
            "off",
        ],
        &["--refresh-timeout", "longer than 7 days"],
    );
    refused(
        &["watch", "--rescan-interval", "18446744073709551615"],
        &["--rescan-interval", "longer than 7 days"],
    );
}

#[test]
fn a_receive_buffer_the_kernel_would_shrink_silently_is_refused() {
    for value in ["0", "18446744073709551615"] {
        refused(&["watch", "--uevent-rcvbuf", value], &["--uevent-rcvbuf"]);
    }
}

#[test]
fn a_config_file_that_is_a_device_or_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zero = dir.path().join("config.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let mut args = STANDALONE.to_vec();
    let zero = zero.to_str().expect("utf-8").to_owned();
    args.extend(["--config", &zero]);
    refused(&args, &["character device, not a regular file"]);

    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().expect("utf-8").to_owned();
    let mut args = STANDALONE.to_vec();
    args.extend(["--config", &fifo]);
    refused(&args, &["FIFO, not a regular file"]);
}
