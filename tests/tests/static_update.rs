//! `--static-policy update-in-place` end to end, as root, with a real CPU going offline
//! and online on this machine. The kubelet stand-in validates the static CPU manager
//! checkpoint at each start as the kubelet does (`--kubelet-root-dir`), so a rewrite the
//! kubelet would refuse makes the restart fail here as it would crash-loop a kubelet.
use std::{
    fs,
    time::{Duration, Instant},
};

use hotplug_agent::checkpoint::format::parse_cpu;
use hotplug_tests::{CpuOffline, MachineLock, can_change_machine, cluster::Cluster};

const NODE: &str = "static-update-e2e";
const WAIT: Duration = Duration::from_secs(30);

fn online_cpus() -> String {
    fs::read_to_string("/sys/devices/system/cpu/online")
        .expect("reading the online CPUs")
        .trim()
        .to_owned()
}

#[test]
fn a_cpu_coming_online_joins_the_static_shared_pool_with_one_restart() {
    if !can_change_machine("a_cpu_coming_online_joins_the_static_shared_pool_with_one_restart") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        eprintln!("\n*** SKIP: no CPU other than cpu0 can go offline here ***\n");
        return;
    };
    let mut offline = CpuOffline::new(cpu);
    let before = online_cpus();
    let cluster = Cluster::start_with(NODE, &["--kubelet-root-dir", "@KUBELET_ROOT@"]);
    // The static CPU manager's checkpoint for the machine without `cpu`, as the kubelet
    // wrote it (a zero v2 checksum is one the kubelet accepts).
    let path = cluster.path("kubelet-root/cpu_manager_state");
    let state = format!(r#"{{"policyName":"static","defaultCpuSet":"{before}","checksum":0}}"#);
    fs::write(&path, &state).expect("writing the checkpoint");

    let (mut agent, startup) = cluster.start_run(&[
        "--settle-ms",
        "300",
        "--verify-timeout",
        "20s",
        "--static-policy",
        "update-in-place",
    ]);
    assert_eq!(startup["action"], "in_sync", "{startup}");

    let t0 = Instant::now();
    offline.restore();
    let rewritten = agent.wait_for("checkpoint rewritten", WAIT, |v| {
        v["kind"] == "reset" && v["action"] == "checkpoint_rewritten"
    });
    agent.wait_for("kubelet started", WAIT, |v| {
        v["kind"] == "reset" && v["action"] == "kubelet_started"
    });
    let restarted = t0.elapsed();
    let after = online_cpus();
    assert_eq!(
        rewritten["checkpoint"]["before"],
        before.as_str(),
        "{rewritten}"
    );
    assert_eq!(
        rewritten["checkpoint"]["after"],
        after.as_str(),
        "{rewritten}"
    );
    cluster.wait_node_matches_machine(WAIT);
    let converged = t0.elapsed();
    assert_eq!(
        cluster.kubelet.restarts(),
        2,
        "exactly one restart; log:\n{}",
        cluster.kubelet.log()
    );
    let log = cluster.kubelet.log();
    assert!(
        log.contains(&format!(
            "accepted: policy static defaultCpuSet \"{after}\""
        )),
        "the restarted stand-in validated the rewritten checkpoint:\n{log}"
    );
    let file = parse_cpu(&fs::read(&path).expect("reading the checkpoint")).expect("parses");
    assert_eq!(file.state.default_cpu_set, after);
    assert!(file.checksum.valid && file.checksum.stored == file.checksum.computed);
    let backup = rewritten["checkpoint"]["backup"].as_str().expect("backup");
    assert_eq!(
        fs::read_to_string(backup).expect("the old file is kept"),
        state
    );
    eprintln!(
        "figures: cpu{cpu} online -> stand-in restarted on the rewritten checkpoint in {restarted:?}; \
         Node advertising {after} after {converged:?}"
    );

    // And back: the CPU leaves the shared pool the same way.
    let t0 = Instant::now();
    let _offline = CpuOffline::new(cpu);
    let rewritten = agent.wait_for("second rewrite", WAIT, |v| {
        v["kind"] == "reset" && v["action"] == "checkpoint_rewritten" && v["episode"] == 2
    });
    assert_eq!(
        rewritten["checkpoint"]["after"],
        before.as_str(),
        "{rewritten}"
    );
    cluster.wait_node_matches_machine(WAIT);
    assert_eq!(
        cluster.kubelet.restarts(),
        3,
        "log:\n{}",
        cluster.kubelet.log()
    );
    eprintln!(
        "figures: cpu{cpu} offline -> Node advertising {before} after {:?}",
        t0.elapsed()
    );
}
