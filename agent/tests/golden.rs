//! The event log is a public interface (schema `v: 1`): every record kind, serialised, must
//! stay byte for byte what `golden/records.ndjson` holds. A change that alters a line here
//! breaks every consumer that parses the log; additions are new optional fields that these
//! records leave out. `UPDATE_GOLDEN=1 cargo test -p hotplug-agent --test golden` rewrites
//! the file (for a deliberate, reviewed addition only).
use std::collections::BTreeMap;

use hotplug_agent::{
    capacity::Summary,
    record::{
        Action, Advertised, AgentRecord, CgroupCheck, CheckpointChange, DecisionRecord,
        EventRecord, FleetBudget, Kind, KubeletConfigStatus, MachineSummary, ProbeStatus, Record,
        RejectedPod, SCHEMA_VERSION, ShrinkCheck, Source, SourceStatus,
    },
};

const TIME: &str = "2026-11-30T12:00:00.123456Z";
const CAPACITY: Summary = Summary {
    memory_bytes: 4_294_967_296,
    cpus_online: 2,
};

fn event(source: Source, kind: Kind, action: Action, device: Option<&str>) -> EventRecord {
    EventRecord {
        v: SCHEMA_VERSION,
        time: TIME.into(),
        source,
        kind,
        action,
        device: device.map(Into::into),
        capacity: CAPACITY,
        mono_ns: 123_456_789,
        seqnum: None,
        probe: None,
        kernel_ns: None,
        delivery_ns: None,
        pid: None,
        comm: None,
        cpu: None,
        pages: None,
        hits: None,
        reason: None,
    }
}

/// A typed kind or action from its word in the log: the golden file spells it.
fn word<T: serde::de::DeserializeOwned>(w: &str) -> T {
    serde_json::from_value(serde_json::Value::String(w.into())).expect(w)
}

fn agent(action: &str) -> AgentRecord {
    let mut a = AgentRecord::new(word(action), CAPACITY);
    a.time = TIME.into();
    a
}

fn decision(kind: &str, action: &str, episode: u64) -> DecisionRecord {
    let mut d = DecisionRecord::new(word(kind), word(action), CAPACITY, episode);
    d.time = TIME.into();
    d.node = Some("node-a".into());
    d
}

fn advertised() -> Advertised {
    Advertised {
        memory_bytes: Some(4_294_967_296),
        cpu_millis: Some(2000),
        hugepages: BTreeMap::from([("hugepages-2Mi".into(), 0)]),
        allocatable_memory_bytes: Some(3_221_225_472),
    }
}

/// One of every shape the agent writes, filled as the agent fills it.
fn records() -> Vec<Record> {
    let mut out = Vec::new();
    let mut uevent = event(
        Source::Uevent,
        Kind::MemoryBlock,
        Action::Add,
        Some("memory40"),
    );
    uevent.seqnum = Some(4242);
    out.push(Record::Event(Box::new(uevent)));
    let mut probe = event(Source::Ebpf, Kind::Cpu, Action::Offline, Some("cpu1"));
    probe.probe = Some("tracepoint/cpuhp/cpuhp_exit".into());
    probe.kernel_ns = Some(1_000);
    probe.delivery_ns = Some(92_000);
    probe.pid = Some(17);
    probe.comm = Some("cpuhp/1".into());
    probe.cpu = Some(0);
    out.push(Record::Event(Box::new(probe)));
    let mut resize = event(Source::Ebpf, Kind::Memory, Action::Resize, None);
    resize.probe = Some("fentry/online_pages".into());
    resize.kernel_ns = Some(2_000);
    resize.delivery_ns = Some(4_000);
    resize.pid = Some(1);
    resize.comm = Some("kworker/u4:1".into());
    resize.cpu = Some(1);
    resize.pages = Some(32_768);
    resize.hits = Some(3);
    out.push(Record::Event(Box::new(resize)));
    let mut scan = event(
        Source::Scan,
        Kind::MemoryBlock,
        Action::Online,
        Some("memory7"),
    );
    scan.reason = Some("enobufs".into());
    out.push(Record::Event(Box::new(scan)));

    let mut ready = agent("ready");
    ready.probes = vec![
        ProbeStatus {
            name: "tracepoint/cpuhp/cpuhp_exit".into(),
            attached: true,
            error: None,
        },
        ProbeStatus {
            name: "fentry/online_pages".into(),
            attached: false,
            error: Some("load: Operation not permitted (os error 1)".into()),
        },
    ];
    ready.sources = vec![
        SourceStatus {
            name: "uevent".into(),
            listening: true,
            detail: Some("kernel netlink, receive buffer 268435456 bytes".into()),
            error: None,
        },
        SourceStatus {
            name: "ebpf".into(),
            listening: false,
            detail: None,
            error: Some("no probe could attach".into()),
        },
    ];
    ready.rescan_interval_s = Some(Some(60));
    ready.version = Some("0.1.0".into());
    ready.machine = Some(MachineSummary {
        cpus_online_list: "0-1".into(),
        cpus_possible: 4,
        memory_block_size: Some(134_217_728),
        memory_blocks_online: 32,
        memory_blocks_offline: 0,
        numa_nodes: 1,
        hugepages: BTreeMap::from([("hugepages-2048kB".into(), 0)]),
    });
    out.push(Record::Agent(Box::new(ready)));
    let mut no_rescan = agent("ready");
    no_rescan.rescan_interval_s = Some(None);
    out.push(Record::Agent(Box::new(no_rescan)));
    let mut loss = agent("loss");
    loss.source = Some(Source::Ebpf);
    loss.reason = Some("ringbuf_drops".into());
    loss.lost = Some(12);
    out.push(Record::Agent(Box::new(loss)));
    let mut online = agent("auto_online");
    online.device = Some("memory40".into());
    online.state = Some("online_movable".into());
    out.push(Record::Agent(Box::new(online)));
    let mut failed = agent("auto_online");
    failed.device = Some("memory41".into());
    failed.state = Some("online_movable".into());
    failed.error = Some("writing \"online_movable\" to /sys/devices/system/memory/memory41/state: Device or resource busy (os error 16)".into());
    out.push(Record::Agent(Box::new(failed)));
    out.push(Record::Agent(Box::new(agent("stopped"))));

    let mut startup = decision("episode", "settled", 0);
    startup.trigger = Some("startup".into());
    startup.events = Some(0);
    out.push(Record::Decision(Box::new(startup)));
    let mut settled = decision("episode", "settled", 1);
    settled.trigger = Some("events".into());
    settled.events = Some(1024);
    settled.settle_ms = Some(302);
    out.push(Record::Decision(Box::new(settled)));
    let mut bounded = decision("episode", "settled", 2);
    bounded.trigger = Some("events".into());
    bounded.events = Some(80);
    bounded.settle_ms = Some(5000);
    bounded.reason = Some("max_wait".into());
    out.push(Record::Decision(Box::new(bounded)));
    let mut in_sync = decision("reconcile", "in_sync", 1);
    in_sync.advertised = Some(advertised());
    out.push(Record::Decision(Box::new(in_sync)));
    let mut stale = decision("reconcile", "stale", 1);
    stale.advertised = Some(advertised());
    stale.differences = vec!["memory: node 4294967296 != machine 8589934592".into()];
    out.push(Record::Decision(Box::new(stale)));
    let mut down = decision("reconcile", "api_unreachable", 1);
    down.message =
        Some("connection refused; keeping the episode and retrying until the API answers".into());
    out.push(Record::Decision(Box::new(down)));
    let mut started = decision("refresh", "started", 1);
    started.backend = Some("systemd".into());
    out.push(Record::Decision(Box::new(started)));
    let mut deferred = decision("refresh", "deferred", 1);
    deferred.backend = Some("systemd".into());
    deferred.reason = Some("min_interval".into());
    deferred.until = Some("2026-11-30T12:00:02.123456Z".into());
    out.push(Record::Decision(Box::new(deferred)));
    let mut succeeded = decision("refresh", "succeeded", 1);
    succeeded.backend = Some("systemd".into());
    succeeded.duration_ms = Some(47);
    succeeded.message = Some("RestartUnit kubelet.service: done".into());
    out.push(Record::Decision(Box::new(succeeded)));
    let mut skipped = decision("refresh", "skipped", 1);
    skipped.backend = Some("none".into());
    skipped.reason = Some("report_only".into());
    out.push(Record::Decision(Box::new(skipped)));
    let mut converged = decision("verify", "converged", 1);
    converged.advertised = Some(advertised());
    converged.advertised_after = Some(Advertised {
        memory_bytes: Some(8_589_934_592),
        ..advertised()
    });
    converged.duration_ms = Some(412);
    converged.cgroup = Some(CgroupCheck {
        path: "/sys/fs/cgroup/kubepods.slice/memory.max".into(),
        before: Some(3_221_225_472),
        after: Some(7_516_192_768),
        expected_delta: Some(4_294_967_296),
        ok: true,
    });
    out.push(Record::Decision(Box::new(converged)));
    let mut timeout = decision("verify", "timeout", 1);
    timeout.advertised = Some(advertised());
    timeout.duration_ms = Some(120_000);
    timeout.message = Some("the Node did not converge within 120s".into());
    out.push(Record::Decision(Box::new(timeout)));
    let mut rewritten = decision("reset", "checkpoint_rewritten", 1);
    rewritten.message = Some(
        "CPUs 2 join the shared pool; defaultCpuSet 0,3 -> 0,2-3; exclusive assignments unchanged"
            .into(),
    );
    rewritten.checkpoint = Some(CheckpointChange {
        manager: "cpu".into(),
        path: "/var/lib/kubelet/cpu_manager_state".into(),
        before: "0,3".into(),
        after: "0,2-3".into(),
        backup: "/var/lib/kubelet/cpu_manager_state.bak.1796040000".into(),
    });
    out.push(Record::Decision(Box::new(rewritten)));
    // Fleet budgets (fleet.rs): waiting for a restart slot, then the restart with its slot.
    let mut fleet_wait = decision("refresh", "deferred", 1);
    fleet_wait.backend = Some("systemd".into());
    fleet_wait.reason = Some("fleet_budget".into());
    fleet_wait.message =
        Some("all 2 restart slots of the fleet are held (node-b, node-c); waiting for one".into());
    fleet_wait.fleet = Some(FleetBudget {
        budget: "restart".into(),
        slots: 2,
        holders: vec!["node-b".into(), "node-c".into()],
        ..FleetBudget::default()
    });
    out.push(Record::Decision(Box::new(fleet_wait)));
    let mut fleet_started = decision("refresh", "started", 1);
    fleet_started.backend = Some("systemd".into());
    fleet_started.fleet = Some(FleetBudget {
        budget: "restart".into(),
        slots: 2,
        lease: Some("hotplug-agent-restart-1".into()),
        waited_ms: Some(41_250),
        ..FleetBudget::default()
    });
    out.push(Record::Decision(Box::new(fleet_started)));
    // An operator's pause, and a reset that leaves an operator's cordon in place.
    let mut paused = decision("refresh", "skipped", 1);
    paused.backend = Some("systemd".into());
    paused.reason = Some("paused".into());
    paused.message =
        Some("the Node carries hotplug-agent.io/paused: report only until it is removed".into());
    out.push(Record::Decision(Box::new(paused)));
    let mut left = decision("reset", "left_cordoned", 1);
    left.message =
        Some("someone else had cordoned the Node before the reset: left cordoned".into());
    out.push(Record::Decision(Box::new(left)));
    // Standing down where the kubelet resizes the Node itself (upstream.rs): the ready
    // record of `run` says so, and each refresh is skipped with the reason.
    let mut standing_down = agent("ready");
    standing_down.rescan_interval_s = Some(Some(60));
    standing_down.version = Some("0.1.0".into());
    standing_down.kubelet_config = Some(KubeletConfigStatus {
        path: "/var/lib/kubelet/config.yaml".into(),
        found: true,
        upstream_resize: true,
        error: None,
    });
    out.push(Record::Agent(Box::new(standing_down)));
    let mut garbled = agent("ready");
    garbled.rescan_interval_s = Some(Some(60));
    garbled.kubelet_config = Some(KubeletConfigStatus {
        path: "/var/lib/kubelet/config.yaml".into(),
        found: true,
        upstream_resize: false,
        error: Some("parsing /var/lib/kubelet/config.yaml as the kubelet's YAML configuration: invalid type".into()),
    });
    out.push(Record::Agent(Box::new(garbled)));
    let mut upstream = decision("refresh", "skipped", 1);
    upstream.backend = Some("systemd".into());
    upstream.reason = Some("upstream_resize".into());
    upstream.message = Some(
        "/var/lib/kubelet/config.yaml turns on the kubelet's InPlaceNodeResourceResize feature \
         gate: the kubelet resizes the Node itself, so the agent reports and does not restart it"
            .into(),
    );
    out.push(Record::Decision(Box::new(upstream)));
    let mut annotation = decision("refresh", "deferred", 1);
    annotation.backend = Some("systemd".into());
    annotation.reason = Some("initial_capacity".into());
    annotation.message = Some(
        "writing hotplug-agent.io/initial-capacity before the first change: the API server did not answer PATCH node within 20s"
            .into(),
    );
    annotation.until = Some("2026-11-30T12:00:01.123456Z".into());
    out.push(Record::Decision(Box::new(annotation)));
    // Safe shrink (shrink.rs): a restart on a smaller machine the pods would not fit is
    // refused, or (`--shrink-policy evict`) preceded by evictions; after a restart, pods
    // failed at admission are named in verify.
    let check = ShrinkCheck {
        memory_allocatable_after: Some(3_116_367_872),
        memory_in_use: Some(3_758_096_384),
        memory_requests: Some(1_610_612_736),
        cpu_allocatable_after_millis: Some(1000),
        cpu_requests_millis: Some(500),
        pods: Some(3),
        cgroup: Some("/sys/fs/cgroup/kubepods.slice/memory.current".into()),
        fits: false,
        evict: Vec::new(),
        offlining: Vec::new(),
    };
    let mut refused = decision("refresh", "skipped", 1);
    refused.backend = Some("systemd".into());
    refused.reason = Some("shrink_unsafe".into());
    refused.message = Some(
        "not restarting the kubelet on the smaller machine: memory in use 3758096384 bytes, \
         requested 1610612736 bytes, allocatable after the restart 3116367872 bytes; cpu \
         requested 500m, allocatable after 1000m"
            .into(),
    );
    refused.shrink = Some(check.clone());
    out.push(Record::Decision(Box::new(refused)));
    let mut evicting = decision("reset", "started", 1);
    evicting.reason = Some("shrink".into());
    evicting.message = Some("evicting work/low, work/mid".into());
    evicting.shrink = Some(ShrinkCheck {
        evict: vec!["work/low".into(), "work/mid".into()],
        ..check.clone()
    });
    out.push(Record::Decision(Box::new(evicting)));
    let mut evicted = decision("reset", "evicted", 1);
    evicted.reason = Some("shrink".into());
    evicted.message = Some("work/low".into());
    out.push(Record::Decision(Box::new(evicted)));
    let mut rejected = decision("verify", "converged", 1);
    rejected.advertised = Some(advertised());
    rejected.duration_ms = Some(412);
    rejected.rejected_pods = vec![RejectedPod {
        namespace: "work".into(),
        name: "victim".into(),
        reason: "OutOfcpu".into(),
        message: Some("Pod was rejected: Node didn't have enough resource: cpu".into()),
    }];
    out.push(Record::Decision(Box::new(rejected)));
    // The same check while the kernel is still offlining (offlining.rs): evictions at once,
    // or with the default policy the refusal then.
    let offlining = ShrinkCheck {
        evict: vec!["work/low".into()],
        offlining: vec!["memory32".into(), "memory33".into()],
        ..check.clone()
    };
    let mut early = decision("reset", "started", 1);
    early.reason = Some("shrink".into());
    early.message = Some(
        "the kernel is offlining memory32, memory33: the pods would not fit the machine \
         without them (...); evicting work/low now, before it is done"
            .into(),
    );
    early.shrink = Some(offlining.clone());
    out.push(Record::Decision(Box::new(early)));
    let mut early_refused = decision("reset", "skipped", 1);
    early_refused.reason = Some("shrink_unsafe".into());
    early_refused.message =
        Some("the kernel is offlining memory32, memory33; on the machine without them: ...".into());
    early_refused.shrink = Some(ShrinkCheck {
        evict: Vec::new(),
        ..offlining
    });
    out.push(Record::Decision(Box::new(early_refused)));
    out
}

#[test]
fn every_record_kind_serialises_exactly_as_the_golden_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/records.ndjson");
    let mut lines = String::new();
    for r in records() {
        lines.push_str(&serde_json::to_string(&r).expect("serialising a record"));
        lines.push('\n');
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &lines).expect("writing the golden file");
        eprintln!("rewrote {}", path.display());
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for (n, (got, want)) in lines.lines().zip(golden.lines()).enumerate() {
        assert_eq!(got, want, "line {} of {} differs", n + 1, path.display());
    }
    assert_eq!(
        lines.lines().count(),
        golden.lines().count(),
        "record count differs from {}",
        path.display()
    );
    // And every golden line reads back as the record it came from.
    for (line, rec) in golden.lines().zip(records()) {
        let back: Record = serde_json::from_str(line).expect("parsing a golden line");
        assert_eq!(back, rec);
    }
}
