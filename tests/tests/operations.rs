//! Running it in production, as root on this machine: `/metrics` and `/readyz` follow real
//! hotplug, `hotplug-agent events` reads the live stream of a running agent, the log file
//! sink gets the same records, and bad configuration is rejected at start-up.
use std::{io::Read, net::TcpListener, process::Command, time::Duration};

use hotplug_tests::{Agent, CpuOffline, MachineLock, agent_bin, can_change_machine, is_event};

const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET on loopback; returns (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
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
    let (status, body) = get(&addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&addr, "/healthz").0, 200);
    let (_, before) = get(&addr, "/metrics");
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
    let (_, after) = get(&addr, "/metrics");
    assert_eq!(metric(&after, key), Some(1.0), "{after}");
    let cpus_before = metric(&before, r#"hotplug_agent_machine_capacity{resource="cpu"}"#).unwrap();
    assert_eq!(
        metric(&after, r#"hotplug_agent_machine_capacity{resource="cpu"}"#),
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
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--settle-ms"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
