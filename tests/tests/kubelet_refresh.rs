//! `hotplug-agent run` end to end, as root, with real hotplug on this machine.
//!
//! The doubles: an in-process fake API server (`hotplug_tests::fake_api`) and the kubelet
//! stand-in (`kubelet-standin`), which reads the machine's capacity once at start-up and
//! keeps re-posting it, as the real kubelet does; the agent's `command` refresh backend
//! restarts it, and only then does the Node show the new capacity.
use std::{path::Path, time::Duration};

use hotplug_tests::{
    Agent, BlocksOffline, CpuOffline, MachineLock, can_change_machine, cluster::Cluster,
};
use serde_json::Value;

const NODE: &str = "hotplug-e2e";
const WAIT: Duration = Duration::from_secs(30);

/// `hotplug-agent run` against `cluster`, with `extra` flag/value pairs replacing the
/// defaults here.
fn agent_args(cluster: &Cluster, extra: &[&str]) -> Vec<String> {
    let mut pairs = cluster.run_args();
    pairs.extend(["--settle-ms", "300", "--verify-timeout", "20s"].map(String::from));
    let kept = pairs
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0].as_str()))
        .flatten()
        .cloned();
    std::iter::once("run".to_string())
        .chain(kept)
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

fn start_agent(cluster: &Cluster, extra: &[&str]) -> Agent {
    let args = agent_args(cluster, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut agent, _ready) = Agent::start(&args);
    agent.wait_for("the start-up reconcile", WAIT, |v| {
        v["kind"] == "reconcile" && v["episode"] == 0
    });
    agent
}

fn start_cluster() -> Cluster {
    Cluster::start(NODE)
}

fn wait_node_matches_machine(cluster: &Cluster, what: &str) -> Value {
    let node = cluster.wait_node_matches_machine(WAIT);
    eprintln!("ok: {what}");
    node
}

fn condition(node: &Value) -> Option<Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "HotplugCapacityStale")
        .cloned()
}

fn converged(agent: &mut Agent, episode: u64) -> Value {
    agent.wait_for(
        &format!("verify converged for episode {episode}"),
        WAIT,
        |v| v["kind"] == "verify" && v["action"] == "converged" && v["episode"] == episode,
    )
}

fn count(agent: &Agent, kind: &str, action: &str) -> usize {
    agent
        .seen
        .iter()
        .filter(|v| v["kind"] == kind && v["action"] == action)
        .count()
}

#[test]
fn cpu_and_memory_hotplug_converge_with_one_restart_per_episode() {
    if !can_change_machine("cpu_and_memory_hotplug_converge_with_one_restart_per_episode") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        eprintln!("\n*** SKIP: no CPU other than cpu0 can go offline here ***\n");
        return;
    };
    let cluster = start_cluster();
    let mut agent = start_agent(&cluster, &[]);
    let startup = agent.wait_for("start-up reconcile", WAIT, |v| {
        v["kind"] == "reconcile" && v["episode"] == 0
    });
    assert_eq!(startup["action"], "in_sync", "{startup}");
    assert_eq!(
        cluster.kubelet.restarts(),
        1,
        "in sync at start-up: no restart"
    );

    let mut cpu_guard = CpuOffline::new(cpu);
    let v = converged(&mut agent, 1);
    assert_eq!(
        v["advertised"]["cpu_millis"].as_u64(),
        v["advertised_after"]["cpu_millis"]
            .as_u64()
            .map(|m| m + 1000),
        "{v}"
    );
    wait_node_matches_machine(&cluster, "cpu offline converged");
    assert_eq!(cluster.kubelet.restarts(), 2);

    cpu_guard.restore();
    converged(&mut agent, 2);
    wait_node_matches_machine(&cluster, "cpu online converged");
    assert_eq!(cluster.kubelet.restarts(), 3);

    let mut blocks = BlocksOffline::take(1);
    if blocks.blocks.is_empty() {
        eprintln!("\n*** SKIP (memory half): no memory block could go offline ***\n");
        return;
    }
    let v = converged(&mut agent, 3);
    let cgroup = &v["cgroup"];
    assert_eq!(
        cgroup["ok"], true,
        "the pods' cgroup limit moved with allocatable: {v}"
    );
    assert_eq!(
        cgroup["after"].as_u64().unwrap() + hotplug_tests::block_size(),
        cgroup["before"].as_u64().unwrap(),
        "{v}"
    );
    wait_node_matches_machine(&cluster, "block offline converged");
    assert_eq!(cluster.kubelet.restarts(), 4);
    blocks.restore();
    converged(&mut agent, 4);
    wait_node_matches_machine(&cluster, "block online converged");
    assert_eq!(
        cluster.kubelet.restarts(),
        5,
        "exactly one restart per episode"
    );
    assert_eq!(count(&agent, "refresh", "started"), 4);

    // On the Node: Events for each step, and the condition back to False. They are posted
    // right after the records, so wait for them rather than race them.
    let events = cluster.rt.block_on(cluster.api.wait_until(
        "four CapacityConverged events",
        WAIT,
        |api| {
            let events = api.events();
            (events
                .iter()
                .filter(|e| e["reason"] == "CapacityConverged")
                .count()
                >= 4)
                .then_some(events)
        },
    ));
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    for reason in ["CapacityChanged", "KubeletRefreshed", "CapacityConverged"] {
        assert_eq!(
            reasons.iter().filter(|r| **r == reason).count(),
            4,
            "{reason} once per episode: {reasons:?}"
        );
    }
    let changed = events
        .iter()
        .find(|e| e["reason"] == "CapacityChanged")
        .unwrap();
    assert_eq!(changed["involvedObject"]["kind"], "Node");
    assert!(
        changed["message"].as_str().unwrap().contains("cpu_millis"),
        "before/after in the message: {changed}"
    );
    let node = cluster.rt.block_on(cluster.api.wait_node(NODE, WAIT, |n| {
        condition(n).is_some_and(|c| c["status"] == "False")
    }));
    // The stand-in's own Ready condition survived our strategic merge patches.
    assert!(
        node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready"),
        "{node}"
    );
}

#[test]
fn a_burst_of_blocks_is_one_episode_and_one_restart() {
    if !can_change_machine("a_burst_of_blocks_is_one_episode_and_one_restart") {
        return;
    }
    let _lock = MachineLock::take();
    // Found before the agent starts: searching for offlinable blocks took a minute here
    // (each refusal is slow), which would make the burst several episodes.
    let ids = BlocksOffline::rehearse(16);
    let cluster = start_cluster();
    // A settle window that outlasts one block's offline even on a loaded machine (offlining
    // a block took up to ~1 s here while compilers ran), so the burst stays one episode.
    let mut agent = start_agent(&cluster, &["--settle-ms", "2000", "--max-wait-ms", "60000"]);
    let mut blocks = BlocksOffline::take_these(&ids);
    if blocks.blocks.len() < 4 {
        eprintln!(
            "\n*** SKIP: only {} blocks could go offline ***\n",
            blocks.blocks.len()
        );
        return;
    }
    let n = blocks.blocks.len() as u64;
    converged(&mut agent, 1);
    let episode = agent.wait_for("episode 1", WAIT, |v| {
        v["kind"] == "episode" && v["episode"] == 1
    });
    // Every block's uevent is in the episode, and at least one kernel-probe record: the
    // probe's records of blocks offlined back to back by one task fold into one (see
    // `sources::coalesce`), so the count lies between n + 1 and 2n.
    let seen: std::collections::BTreeSet<String> = agent
        .seen
        .iter()
        .filter(|v| {
            v["source"] == "uevent" && v["kind"] == "memory_block" && v["action"] == "offline"
        })
        .filter_map(|v| v["device"].as_str().map(str::to_owned))
        .collect();
    for b in &blocks.blocks {
        assert!(seen.contains(&format!("memory{b}")), "memory{b}: {seen:?}");
    }
    let events = episode["events"].as_u64().unwrap();
    assert!(
        (n + 1..=2 * n).contains(&events),
        "{n} blocks, each seen by uevent, and by eBPF at least once: {episode}"
    );
    assert!(
        agent
            .seen
            .iter()
            .any(|v| v["source"] == "ebpf" && v["kind"] == "memory"),
        "the kernel probe saw the burst"
    );
    assert_eq!(cluster.kubelet.restarts(), 2, "one restart for {n} blocks");
    blocks.restore();
    converged(&mut agent, 2);
    assert_eq!(
        cluster.kubelet.restarts(),
        3,
        "one restart for putting {n} blocks back"
    );
    assert_eq!(
        count(&agent, "episode", "settled"),
        3,
        "start-up + two bursts"
    );
}

#[test]
fn an_api_outage_during_an_episode_converges_when_it_returns() {
    if !can_change_machine("an_api_outage_during_an_episode_converges_when_it_returns") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let cluster = start_cluster();
    let mut agent = start_agent(&cluster, &[]);
    cluster.rt.block_on(cluster.api.stop());
    let _cpu = CpuOffline::new(cpu);
    agent.wait_for("api_unreachable", WAIT, |v| {
        v["kind"] == "reconcile" && v["action"] == "api_unreachable"
    });
    cluster.rt.block_on(cluster.api.restart());
    agent.wait_for("api_reachable", WAIT, |v| {
        v["kind"] == "reconcile" && v["action"] == "api_reachable"
    });
    converged(&mut agent, 1);
    wait_node_matches_machine(&cluster, "converged after the outage");
    assert_eq!(
        count(&agent, "reconcile", "api_unreachable"),
        1,
        "said once, not once per retry"
    );
    assert_eq!(cluster.kubelet.restarts(), 2);
}

#[test]
fn a_failing_refresh_backs_off_and_warns_without_a_storm() {
    if !can_change_machine("a_failing_refresh_backs_off_and_warns_without_a_storm") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    // Found before the agent starts, so that taking it offline later is quick: the search
    // can take longer than the 10 s back-off on a busy machine, and the agent would then
    // rightly retry the first episode before the second arrives.
    let ids = BlocksOffline::rehearse(1);
    let cluster = start_cluster();
    let mut agent = start_agent(
        &cluster,
        &[
            "--refresh-command",
            "sh -c 'echo kubelet unit is masked >&2; exit 3'",
        ],
    );
    let _cpu = CpuOffline::new(cpu);
    let failed = agent.wait_for("refresh failed", WAIT, |v| {
        v["kind"] == "refresh" && v["action"] == "failed"
    });
    assert!(
        failed["message"].as_str().unwrap().contains("masked"),
        "stderr of the command is reported: {failed}"
    );
    cluster.rt.block_on(cluster.api.wait_node(NODE, WAIT, |n| {
        condition(n).is_some_and(|c| c["status"] == "True" && c["reason"] == "RefreshFailed")
    }));
    assert!(
        cluster
            .api
            .events()
            .iter()
            .any(|e| e["reason"] == "KubeletRefreshFailed" && e["type"] == "Warning")
    );
    // A new, still stale episode right away is held back by the back-off instead of
    // restarting again.
    let blocks = BlocksOffline::take_these(&ids);
    if !blocks.blocks.is_empty() {
        let deferred = agent.wait_for("refresh deferred", WAIT, |v| {
            v["kind"] == "refresh" && v["action"] == "deferred"
        });
        assert_eq!(deferred["reason"], "backoff", "{deferred}");
    }
    assert_eq!(count(&agent, "refresh", "started"), 1, "no storm");
    assert_eq!(cluster.kubelet.restarts(), 1);
}

#[test]
fn a_change_while_the_agent_was_down_is_fixed_at_start_up() {
    if !can_change_machine("a_change_while_the_agent_was_down_is_fixed_at_start_up") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let cluster = start_cluster();
    let agent = start_agent(&cluster, &[]);
    drop(agent); // killed (SIGKILL) by its guard
    let _cpu = CpuOffline::new(cpu);
    let args = agent_args(&cluster, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut agent, _) = Agent::start(&args);
    let stale = agent.wait_for("start-up reconcile", WAIT, |v| {
        v["kind"] == "reconcile" && v["episode"] == 0
    });
    assert_eq!(stale["action"], "stale", "{stale}");
    converged(&mut agent, 0);
    wait_node_matches_machine(&cluster, "start-up reconcile fixed it");
    assert_eq!(cluster.kubelet.restarts(), 2);
}

#[test]
fn a_static_cpu_manager_checkpoint_blocks_the_restart_and_says_why() {
    if !can_change_machine("a_static_cpu_manager_checkpoint_blocks_the_restart_and_says_why") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let cluster = start_cluster();
    // The kubelet's static CPU manager checkpoint, written for the machine as it is now.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let state = format!(
        r#"{{"policyName":"static","defaultCpuSet":"{}","entries":{{}},"checksum":1}}"#,
        online.trim()
    );
    std::fs::write(
        Path::new(&cluster.path("kubelet-root")).join("cpu_manager_state"),
        state,
    )
    .unwrap();
    let mut agent = start_agent(&cluster, &[]);
    let _cpu = CpuOffline::new(cpu);
    let skipped = agent.wait_for("refresh skipped", WAIT, |v| {
        v["kind"] == "refresh" && v["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "static_policy", "{skipped}");
    assert!(
        skipped["message"]
            .as_str()
            .unwrap()
            .contains("cpu_manager_state"),
        "{skipped}"
    );
    cluster.rt.block_on(cluster.api.wait_node(NODE, WAIT, |n| {
        condition(n)
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "StaticPolicyCheckpoint")
    }));
    assert!(
        cluster
            .api
            .events()
            .iter()
            .any(|e| e["reason"] == "StaticPolicyBlocksRefresh" && e["type"] == "Warning")
    );
    assert_eq!(
        cluster.kubelet.restarts(),
        1,
        "the kubelet was not restarted"
    );
    assert_eq!(count(&agent, "refresh", "started"), 0);
}

#[test]
fn drain_and_reset_moves_the_stale_checkpoint_aside_and_converges() {
    if !can_change_machine("drain_and_reset_moves_the_stale_checkpoint_aside_and_converges") {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        return;
    };
    let cluster = start_cluster();
    cluster.api.add_pod(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pinned", "namespace": "default", "uid": "uid-pinned"},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
    }));
    cluster.api.add_pod(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bystander", "namespace": "default", "uid": "uid-other"},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
    }));
    // A static CPU manager checkpoint in which that pod holds `cpu` exclusively (the API
    // server assigns pod UIDs, as the real one does).
    let uid = cluster.api.pod("default", "pinned").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let online = hotplug_agent::capacity::parse_cpu_list(
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap()
            .trim(),
    )
    .unwrap();
    let shared: Vec<u32> = online.iter().copied().filter(|&c| c != cpu).collect();
    let state = format!(
        r#"{{"policyName":"static","defaultCpuSet":"{}","entries":{{"{uid}":{{"app":"{cpu}"}}}},"checksum":1}}"#,
        hotplug_agent::capacity::format_cpu_list(&shared)
    );
    let checkpoint = Path::new(&cluster.path("kubelet-root")).join("cpu_manager_state");
    std::fs::write(&checkpoint, state).unwrap();
    let pidfile = cluster.kubelet.pidfile().display().to_string();
    let stop = format!("sh -c 'kill $(cat {pidfile})'");
    let mut args = agent_args(&cluster, &[]);
    args.extend(
        [
            "--static-policy",
            "drain-and-reset",
            "--kubelet-stop-command",
            &stop,
            "--kubelet-start-command",
            &cluster.kubelet.restart_command(),
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut agent, _) = Agent::start(&args);

    let _cpu = CpuOffline::new(cpu);
    converged(&mut agent, 1);
    let steps: Vec<String> = agent
        .seen
        .iter()
        .filter(|v| v["kind"] == "reset")
        .map(|v| v["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        steps,
        [
            "started",
            "cordoned",
            "evicted",
            "kubelet_stopped",
            "checkpoint_moved",
            "kubelet_started",
            "node_ready",
            "uncordoned"
        ],
        "{:?}",
        agent.seen
    );
    assert!(!checkpoint.exists(), "the stale checkpoint was moved aside");
    let backups: Vec<_> = std::fs::read_dir(checkpoint.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("cpu_manager_state.hotplug-agent-") && n.ends_with(".bak"))
        .collect();
    assert_eq!(
        backups.len(),
        1,
        "kept as a backup, never deleted: {backups:?}"
    );
    assert!(
        cluster.api.pod("default", "pinned").is_none(),
        "the pinned pod was evicted"
    );
    assert!(
        cluster.api.pod("default", "bystander").is_some(),
        "other pods stay"
    );
    let node = wait_node_matches_machine(&cluster, "converged after the reset");
    assert_ne!(node["spec"]["unschedulable"], true, "uncordoned: {node}");
    assert_eq!(cluster.kubelet.restarts(), 2, "stopped and started once");
    assert_eq!(
        count(&agent, "refresh", "started"),
        0,
        "no plain restart on a stale checkpoint"
    );
}
