//! Running it in production, as root on this machine: `/metrics` and `/readyz` follow real
//! hotplug, `hotplug-agent events` reads the live stream of a running agent, the log file
//! sink gets the same records, and bad configuration is rejected at start-up.
use std::{io::Read, process::Command, time::Duration};

use hotplug_tests::{
    Agent, CpuOffline, MachineLock, agent_bin, can_change_machine, free_port, http_get, is_event,
};

const WAIT: Duration = Duration::from_secs(10);

fn metric(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_stream_and_file_follow_real_hotplug() {
    if !can_change_machine("metrics_stream_and_file_follow_real_hotplug") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock").display().to_string();
    let log = dir.path().join("events.ndjson");
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut agent, _ready) = Agent::start(&[
        "run",
        "--refresh",
        "none",
        "--no-kubernetes",
        "--metrics-addr",
        &addr,
        "--stream-socket",
        &socket,
        "--log-file",
        log.to_str().unwrap(),
    ]);
    agent.wait_for("start-up reconcile", WAIT, |v| v["kind"] == "reconcile");
    let (status, body) = http_get(&addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (_, before) = http_get(&addr, "/metrics");
    let key = r#"hotplug_agent_events_total{source="uevent",kind="cpu",action="offline"}"#;
    assert_eq!(metric(&before, key), None, "no CPU went offline yet");
    assert!(
        metric(&before, "hotplug_agent_probes_attached").is_some_and(|n| n >= 2.0),
        "{before}"
    );

    // A client of the live stream, following.
    let mut follower = Command::new(agent_bin())
        .args([
            "events", "--follow", "--format", "json", "--socket", &socket,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let dev = format!("cpu{cpu}");
    let mut guard = CpuOffline::new(cpu);
    agent.wait_for("uevent offline", WAIT, |v| {
        is_event(v, "uevent", "cpu", "offline", Some(&dev))
    });
    let (_, after) = http_get(&addr, "/metrics");
    assert_eq!(metric(&after, key), Some(1.0), "{after}");
    let cpus_before = metric(
        &before,
        r#"hotplug_agent_machine_capacity{resource="cpu",unit="core"}"#,
    )
    .unwrap();
    assert_eq!(
        metric(
            &after,
            r#"hotplug_agent_machine_capacity{resource="cpu",unit="core"}"#
        ),
        Some(cpus_before - 1.0),
        "{after}"
    );
    assert!(
        metric(&after, "hotplug_agent_detection_latency_seconds_count").is_some_and(|n| n >= 1.0),
        "{after}"
    );
    guard.restore();
    agent.wait_for("episode", WAIT, |v| {
        v["kind"] == "episode" && v["episode"] == 1
    });
    agent.wait_for("its reconcile", WAIT, |v| {
        v["kind"] == "reconcile" && v["episode"] == 1
    });

    // The follower saw the same records the agent wrote to stdout, in the same order.
    let _ = Command::new("kill").arg(follower.id().to_string()).status();
    let mut streamed = String::new();
    follower
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut streamed)
        .unwrap();
    let _ = follower.wait();
    let streamed: Vec<serde_json::Value> = streamed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = streamed.first().expect("the follower got records");
    // The follower may be ahead of what this test has read of the agent's stdout.
    let last = streamed.last().expect("the follower got records").clone();
    agent.wait_for("the follower's last record on stdout", WAIT, |v| *v == last);
    let start = agent
        .seen
        .iter()
        .position(|v| v == first)
        .expect("the follower's first record is one the agent wrote");
    assert_eq!(
        &agent.seen[start..start + streamed.len()],
        streamed.as_slice()
    );
    assert!(
        streamed
            .iter()
            .any(|v| is_event(v, "uevent", "cpu", "offline", Some(&dev)))
    );

    // Without --follow: what the agent holds, then the end; --kind filters.
    let out = Command::new(agent_bin())
        .args([
            "events", "--format", "json", "--kind", "episode", "--socket", &socket,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        held.len() >= 2 && held.iter().all(|v| v["kind"] == "episode"),
        "{held:?}"
    );

    // The file sink has the records too.
    let file = std::fs::read_to_string(&log).unwrap();
    assert!(
        file.lines()
            .any(|l| l.contains("\"offline\"") && l.contains(&format!("\"{dev}\""))),
        "{file}"
    );
}

#[test]
fn events_without_an_agent_says_what_is_wrong() {
    let out = Command::new(agent_bin())
        .args(["events", "--socket", "/nonexistent/events.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is `hotplug-agent run` running"), "{err}");
}

#[test]
fn bad_configuration_is_rejected_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "settle_ms = 100\nrefrsh = \"none\"\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refrsh") && err.contains("did you mean \"refresh\""),
        "{err}"
    );
    std::fs::write(&file, "settle_ms = -4\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Named where the operator wrote it: the file and the key, not the flag.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(file.to_str().unwrap())
            && err.contains("key \"settle_ms\"")
            && err.contains("-4"),
        "{err}"
    );
    // Precedence, end to end: flag > environment > file.
    std::fs::write(&file, "settle_ms = 100\nrefresh = \"none\"\n").unwrap();
    let show = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["config", "--config", file.to_str().unwrap()])
            .args(extra);
        if let Some(v) = env {
            cmd.env("HOTPLUG_AGENT_SETTLE_MS", v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("settle_ms"))
            .unwrap()
            .to_string()
    };
    assert_eq!(show(&[], None), "settle_ms = \"100\"  # file");
    assert_eq!(
        show(&[], Some("200")),
        "settle_ms = \"200\"  # env HOTPLUG_AGENT_SETTLE_MS"
    );
    assert_eq!(
        show(&["--settle-ms", "300"], Some("200")),
        "settle_ms = \"300\"  # flag"
    );
}

/// Descriptors the process holds now.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time, clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Polls `cond` every 20 ms until it holds, up to `limit`.
fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets this test process hold a couple of thousand sockets (the agent it starts inherits
/// the limit, which its own connection limits must make irrelevant).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The agent without hotplug sources: enough for its listeners and outputs, needs no
/// machine changes.
const QUIET: &[&str] = &[
    "run",
    "--no-ebpf",
    "--no-uevent",
    "--no-kubernetes",
    "--refresh",
    "none",
];

#[test]
fn idle_connections_and_hung_up_followers_cost_the_agent_nothing() {
    raise_fd_limit(4096);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = QUIET.to_vec();
    args.extend(["--metrics-addr", &addr, "--stream-socket"]);
    args.push(socket.to_str().unwrap());
    let (agent, _ready) = Agent::start(&args);
    let pid = agent.pid();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (fd0, rss0) = (fds(pid), rss_kib(pid));

    // 1,000 connections to the metrics port that never send a byte.
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // The agent holds at most its limit of them (64), evicting the idlest for each newcomer
    // (at most 16 more on their way out), plus at most 64 more while it answers them 503
    // (each for at most a second), and refuses the rest.
    let bound = fd0 + 2 * 64 + 16 + 2;
    until("the agent took or refused every connection", WAIT, || {
        fds(pid) <= bound
    });
    let (fd1, rss1) = (fds(pid), rss_kib(pid));
    assert!(fd1 <= bound, "{fd0} -> {fd1} descriptors");
    // The header read timeout (10 s) lets the idle ones go, and the port answers again.
    until(
        "idle connections dropped by the header read timeout",
        Duration::from_secs(30),
        || fds(pid) <= fd0 + 1,
    );
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    drop(idle);

    // 1,000 followers whose filter matches nothing, each hanging up after its 200.
    let mut answered = 0;
    for _ in 0..20 {
        let mut round = Vec::new();
        for _ in 0..50 {
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.write_all(b"GET /events?follow=1&kind=nothing HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            round.push(s);
        }
        for s in &mut round {
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && &head[9..12] == b"200" {
                answered += 1;
            }
        }
        drop(round);
        until("hung-up followers let go", WAIT, || fds(pid) <= fd0 + 1);
    }
    let (fd2, rss2) = (fds(pid), rss_kib(pid));
    assert!(answered >= 900, "only {answered} followers were served");
    assert!(
        fd2 <= fd0 + 1,
        "{fd0} -> {fd2} descriptors after the followers left"
    );
    eprintln!(
        "AGENT_FOOTPRINT baseline fds={fd0} rss_kib={rss0}; with 1000 idle metrics connections fds={fd1} rss_kib={rss1}; after 1000 hung-up followers ({answered} served) fds={fd2} rss_kib={rss2}"
    );
    assert!(rss2 < rss0 + 16 * 1024, "RSS grew {rss0} -> {rss2} KiB");
}

#[test]
fn accept_failing_for_want_of_descriptors_backs_off_instead_of_spinning() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(agent_bin());
    // Room for the agent itself and a few connections, no more.
    let limit: u64 = 24;
    // SAFETY: setrlimit in the child between fork and exec; async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut args = QUIET.to_vec();
    args.extend(["--metrics-addr", &addr, "--stream-socket", "off"]);
    let (agent, _ready) = Agent::start_with(cmd, &args);
    let pid = agent.pid();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    // More connections than the agent has descriptors: accept fails with EMFILE while
    // the rest wait in the backlog.
    let held: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    until("the agent ran out of descriptors", WAIT, || {
        agent.stderr().contains("accept failed")
    });
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 30,
        "the agent used {spent}/200 ticks of CPU in 2 s with accept failing"
    );
    let err = agent.stderr();
    assert_eq!(err.matches("accept failed").count(), 1, "said once: {err}");
    // Descriptors come back: it accepts again, and says so.
    drop(held);
    until("/healthz answers again", Duration::from_secs(15), || {
        std::net::TcpStream::connect(&addr).is_ok() && http_get(&addr, "/healthz").0 == 200
    });
    until("it says it accepts again", WAIT, || {
        agent.stderr().contains("accepting connections again")
    });
    eprintln!("EMFILE_BACKOFF cpu_ticks_in_2s={spent}");
}

#[test]
fn the_stream_socket_path_is_checked_locked_and_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    let mut args = QUIET.to_vec();
    args.extend(["--metrics-addr", "off", "--stream-socket"]);
    let out = Command::new(agent_bin())
        .args(&args)
        .arg(&precious)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket (a regular file)"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let socket = dir.path().join("events.sock");
    args.push(socket.to_str().unwrap());
    let (first, _) = Agent::start(&args);
    let out = Command::new(agent_bin()).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another hotplug-agent (PID {},", first.pid())),
        "{err}"
    );
    // Stopped cleanly: the socket and its lock go with it.
    // SAFETY: signalling our own child by its PID.
    assert_eq!(unsafe { libc::kill(first.pid() as i32, libc::SIGTERM) }, 0);
    until("the socket is removed at exit", WAIT, || !socket.exists());
    until("the lock file is removed at exit", WAIT, || {
        !dir.path().join("events.sock.lock").exists()
    });
}

/// stdout into a pipe that nobody reads: detection, the stream and the metrics carry on;
/// what stdout could not take is counted, and said in a `loss` record once it moves again.
#[test]
fn a_stdout_nobody_reads_does_not_stop_the_agent() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !can_change_machine("a_stdout_nobody_reads_does_not_stop_the_agent") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    // A pipe of one page, so that a few records fill it.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own; F_SETPIPE_SZ on our own pipe.
    let (read_end, write_end) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        assert!(libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096) >= 4096);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let stderr = dir.path().join("stderr");
    let mut agent = Command::new(agent_bin())
        .args([
            "run",
            "--no-kubernetes",
            "--refresh",
            "none",
            "--output-queue",
            "16",
            "--metrics-addr",
            &addr,
            "--stream-socket",
            socket.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: our own child, by its PID.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _kill = Kill(agent.id());
    until("the stream socket", Duration::from_secs(30), || {
        socket.exists()
    });

    // A follower of the live stream.
    let mut follower = Command::new(agent_bin())
        .args(["events", "--follow", "--format", "json", "--socket"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, streamed) = std::sync::mpsc::channel::<serde_json::Value>();
    let out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    // Waits for a record matching `pred` at or after index `from`; returns its index.
    let wait = |seen: &mut Vec<serde_json::Value>,
                from: usize,
                what: &str,
                pred: &dyn Fn(&serde_json::Value) -> bool|
     -> usize {
        if let Some(i) = seen.iter().skip(from).position(pred) {
            return from + i;
        }
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = streamed.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no {what} on the stream; stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            });
            let hit = pred(&v);
            seen.push(v);
            if hit {
                return seen.len() - 1;
            }
        }
    };
    wait(&mut seen, 0, "ready record", &|v| v["action"] == "ready");

    // Hotplug while nobody reads stdout: every change still reaches the stream.
    let dev = format!("cpu{cpu}");
    const TOGGLES: usize = 20;
    let mut from = 0;
    for _ in 0..TOGGLES {
        let mut g = CpuOffline::new(cpu);
        from = wait(&mut seen, from, "cpu offline", &|v| {
            is_event(v, "uevent", "cpu", "offline", Some(&dev))
        }) + 1;
        g.restore();
        from = wait(&mut seen, from, "cpu online", &|v| {
            is_event(v, "uevent", "cpu", "online", Some(&dev))
        }) + 1;
    }
    let (_, metrics) = http_get(&addr, "/metrics");
    let lost = metric(
        &metrics,
        r#"hotplug_agent_output_lost_records_total{output="stdout"}"#,
    )
    .unwrap_or(0.0) as u64;
    assert!(lost > 0, "stdout never filled up:\n{metrics}");
    assert_eq!(http_get(&addr, "/healthz").0, 200);

    // Someone reads stdout again: what it held, then the loss record, which the stream
    // carries too.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::fs::File::from(read_end).read_to_string(&mut text);
        text
    });
    wait(&mut seen, 0, "the loss record", &|v| {
        v["action"] == "loss" && v["reason"] == "stdout_stalled"
    });
    let loss = seen
        .iter()
        .find(|v| v["reason"] == "stdout_stalled")
        .unwrap()
        .clone();
    // Stopping: the `stopped` record reaches stdout and the stream, then the agent exits.
    // SAFETY: our own child, by its PID.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    wait(&mut seen, 0, "the stopped record", &|v| {
        v["action"] == "stopped"
    });
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let stdout = reader.join().unwrap();
    let written: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written.last().unwrap()["action"], "stopped");
    assert!(written.iter().any(|v| v["reason"] == "stdout_stalled"));
    let _ = follower.wait();
    let total_lost: u64 = written
        .iter()
        .filter(|v| v["reason"] == "stdout_stalled")
        .map(|v| v["lost"].as_u64().unwrap())
        .sum();
    eprintln!(
        "STALLED_STDOUT toggles={TOGGLES} streamed={} stdout_written={} stdout_lost={total_lost} first_loss_record_lost={}",
        seen.len(),
        written.len(),
        loss["lost"]
    );
    // Nothing vanished unaccounted: what stdout wrote plus what it says it lost is what
    // the stream carried, and the loss record itself is never lost.
    assert!(total_lost >= lost, "{total_lost} < {lost}");
    assert_eq!(written.len() as u64 + total_lost, seen.len() as u64);
}
