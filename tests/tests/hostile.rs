//! Hostile input at the command line and in the files the agent is pointed at: each case
//! must end at once with a clear error that names the flag or file, never a panic, a hang
//! or a read that grows without bound. None of these needs root or changes the machine.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use hotplug_tests::agent_bin;

#[path = "support/tally.rs"]
mod tally;

/// One tally per command line (tally.rs), so the closing counts of issue #9 come from here.
fn tally_for(args: &[&str]) -> tally::Tally {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    args.hash(&mut h);
    tally::Tally::new(&format!("hostile-cli-{:016x}", h.finish()))
}

/// Runs the agent; its exit status and stderr. Killed (by its PID; the test fails) if it
/// does not end within `limit`.
fn run(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let tally = tally_for(args);
    tally.input();
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
            // A panic, or death by a signal (SIGSEGV, SIGABRT), is a crash.
            if err.contains("panicked") || out.status.code().is_none() {
                tally
                    .crashes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (out.status.code(), err)
        }
        Err(_) => {
            tally
                .hangs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// The same settings from a config file: named by the file and the key as written there
/// (as a value clap refuses is), not by a flag the operator never typed.
#[test]
fn durations_from_a_config_file_are_refused_by_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.toml");
    let f = file.to_str().expect("utf-8").to_owned();
    for (line, key, value) in [
        (
            "verify_timeout = \"400000000000y\"",
            "verify_timeout",
            "400000000000y",
        ),
        ("api-timeout = \"0s\"", "api-timeout", "0s"),
        (
            "rescan_interval = \"18446744073709551615\"",
            "rescan_interval",
            "18446744073709551615",
        ),
    ] {
        std::fs::write(&file, format!("{line}\n")).expect("writing the config");
        let mut args = STANDALONE.to_vec();
        args.extend([
            "--stream-socket",
            "off",
            "--metrics-addr",
            "off",
            "--config",
            &f,
        ]);
        let (code, err) = run(&args, Duration::from_secs(10));
        assert!(
            code.is_some_and(|c| c != 0),
            "{line}: exited {code:?}:\n{err}"
        );
        let want = format!("{f}: key {key:?}: invalid value {value:?}: ");
        assert!(err.contains(&want), "stderr lacks {want:?}:\n{err}");
        let flag = format!("--{}", key.replace('_', "-"));
        assert!(!err.contains(&flag), "named by a flag nobody typed:\n{err}");
    }
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

#[test]
fn an_api_server_no_retry_can_reach_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters:\n- name: k\n  cluster:\n    server: ftp://127.0.0.1/\n\
         contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n\
         users:\n- name: u\n  user:\n    token: t\n",
    )
    .expect("writing the kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("utf-8").to_owned();
    refused(
        &[
            "run",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            "n",
            "--refresh",
            "none",
            "--no-ebpf",
            "--no-uevent",
            "--stream-socket",
            "off",
            "--metrics-addr",
            "off",
        ],
        &["ftp://127.0.0.1/", "not an http:// or https:// URL"],
    );
}

#[test]
fn a_bad_value_in_the_config_file_is_named_by_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "settle_ms = \"soon\"\n").expect("writing the config");
    let file = file.to_str().expect("utf-8").to_owned();
    let mut args = STANDALONE.to_vec();
    args.extend(["--config", &file]);
    let (code, err) = run(&args, Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{file}: key \"settle_ms\": invalid value \"soon\""
        )),
        "{err}"
    );
    assert!(
        !err.contains("--settle-ms"),
        "named by a flag nobody wrote:\n{err}"
    );
}
