//! Start-up with a kubeconfig that is not there yet, on a host without a CA bundle: the
//! agent keeps running report-only, says what is wrong once, and picks the kubeconfig up
//! when it appears, without a restart (issue #8: it used to exit at start-up, so systemd
//! restarted it in a loop).
//!
//! The real binary against the fake API server and the kubelet stand-in (tests/src). No
//! root needed: eBPF is off and nothing on the machine changes.
use std::{process::Command, time::Duration};

use hotplug_tests::{Agent, agent_bin, cluster::Cluster, free_port, http_get};

#[test]
fn a_missing_kubeconfig_runs_report_only_and_is_picked_up_when_it_appears() {
    let cluster = Cluster::start("node-kc");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(agent_bin());
    // No trust store at all: the fake API server is plain http://, which must not need one.
    cmd.env("SSL_CERT_FILE", "/nonexistent/hotplug-agent-test/ca.pem")
        .env("SSL_CERT_DIR", "/nonexistent/hotplug-agent-test/certs");
    let (mut agent, _ready) = Agent::start_with(
        cmd,
        &[
            "run",
            "--format",
            "json",
            "--no-ebpf",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            &cluster.node,
            "--refresh",
            "none",
            "--metrics-addr",
            &addr,
            "--stream-socket",
            "off",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let down = agent.wait_for("api_unreachable", Duration::from_secs(15), |v| {
        v["kind"] == "reconcile" && v["action"] == "api_unreachable"
    });
    let message = down["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "the kubeconfig {} cannot be read: No such file or directory",
            kubeconfig.display()
        )),
        "says exactly what is wrong: {down}"
    );
    // Running and ready: an unreachable API is a metric and a record, and a reason to be
    // unready only after five minutes (README, "/readyz"), so a short outage never marks
    // every agent of the fleet NotReady at once. /readyz still says what is wrong.
    let (status, body) = http_get(&addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("the Kubernetes API has been unreachable for")
            && body.contains("before 300 s"),
        "{body}"
    );
    let (_, metrics) = http_get(&addr, "/metrics");
    for (name, want) in [
        ("hotplug_agent_api_reachable", "0"),
        ("hotplug_agent_ready", "1"),
    ] {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        assert_eq!(
            line.and_then(|l| l.split_whitespace().nth(1)),
            Some(want),
            "{name} in\n{metrics}"
        );
    }

    // The kubeconfig appears (atomically, as a provisioning tool would write it).
    let tmp = dir.path().join("kubeconfig.tmp");
    std::fs::copy(cluster.path("kubeconfig"), &tmp).unwrap();
    std::fs::rename(&tmp, &kubeconfig).unwrap();
    // Picked up on the next retry (back-off 1 s, 2 s, 4 s ... while it was missing).
    agent.wait_for("api_reachable", Duration::from_secs(45), |v| {
        v["kind"] == "reconcile" && v["action"] == "api_reachable"
    });
    agent.wait_for("in_sync", Duration::from_secs(15), |v| {
        v["kind"] == "reconcile" && v["action"] == "in_sync"
    });
    let (status, body) = http_get(&addr, "/readyz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "the outage is over"
    );
    let unreachable = agent
        .seen
        .iter()
        .filter(|v| v["action"] == "api_unreachable")
        .count();
    assert_eq!(unreachable, 1, "said once: {:?}", agent.seen);
    assert!(
        !agent.seen.iter().any(|v| v["action"] == "stopped"),
        "the agent never stopped"
    );
    assert!(
        agent.stderr().contains("leaving report-only mode"),
        "{}",
        agent.stderr()
    );
}
