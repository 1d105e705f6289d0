//! Benchmark of `hotplug-agent run`, end to end with real hotplug (ignored by `cargo test`;
//! `cargo xtask bench -- refresh` runs it and turns its result into table rows).
//!
//! The setup is the e2e tests' (`kubelet_refresh.rs`): the in-process fake API server, the
//! kubelet stand-in that caches capacity at start-up, and the agent with `--refresh command`
//! restarting the stand-in. Two measurements:
//!
//! 1. **Hot-add to Node**: capacity changes one at a time (cpuN offline, online, a memory
//!    block offline, online, repeated), each split into phases:
//!    - detection: CLOCK_MONOTONIC just before the sysfs write → the first event record's
//!      `mono_ns` (same clock; includes the kernel's own hotplug work);
//!    - settle: that event → the `episode` `settled` record;
//!    - reconcile: settled → `refresh` `started` (GET the Node, compare, Event, condition);
//!    - refresh: `refresh` `started` → `succeeded` (the stand-in's restart, which re-reads the
//!      machine and posts its status);
//!    - verify: `refresh` `succeeded` → `verify` `converged`.
//!
//!    Settle, reconcile, refresh and verify are differences of the records' `time` fields: the
//!    agent's CLOCK_REALTIME at the moment it made each record (µs), one clock for all of them.
//!    Event records carry `time` and `mono_ns` read at the same moment, which joins the two
//!    clocks: "write → converged" is detection plus the four phases. "write → Node shows it"
//!    is measured by this process on CLOCK_MONOTONIC: the sysfs write → the fake API's Node
//!    matching the machine (`FakeApi::wait_node` wakes on every write, no polling).
//! 2. **Burst**: up to 32 memory blocks offline back to back (the kernel refuses some with
//!    EBUSY and others are tried; see [`take_burst`]), then all back online: episodes,
//!    refreshes and kubelet restarts caused, against the uevents a per-block udev rule would
//!    act on.
//!
//! Memory blocks go offline through a child shell that can be killed (see [`Offliner`]): a
//! block's offline can block in the kernel indefinitely.
//!
//! The result is one line on stdout: `BENCH_REFRESH_JSON {...}` (durations in ms).
//!
//! Guard rails: the agent's default minimum interval between refreshes (2 s) is kept and the
//! changes are spaced by it, so each one measures the unthrottled path; the hourly cap (12 by
//! default) is raised, since a run makes more refreshes than that.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hotplug_agent::record::monotonic_ns;
use hotplug_tests::{
    Agent, BlocksOffline, CpuOffline, MachineLock, can_change_machine, cluster::Cluster, machine,
    online_blocks,
};
use serde_json::{Value, json};

const NODE: &str = "hotplug-bench";
const WAIT: Duration = Duration::from_secs(60);
/// The agent's default, passed explicitly: settle dominates the total by design.
const SETTLE_MS: u64 = 300;
/// The agent's default `--min-refresh-interval`; changes are spaced by it (plus a margin).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(2);
const SPACING_MARGIN: Duration = Duration::from_millis(200);
/// After a burst converged: long enough for a second episode to settle and for its refresh
/// (deferred by the minimum interval) to happen, so that it is counted.
const QUIET: Duration = Duration::from_millis(4000);
const BURST_MAX_BLOCKS: usize = 32;
/// The longest a burst waits for its next block: under the settle window, so the agent sees
/// one burst (see [`take_burst`]).
const BURST_GAP: Duration = Duration::from_millis(250);
/// The longest one block may take to go offline outside a burst (see [`Offliner`]).
const BLOCK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_ITERATIONS: usize = 10;

const MEM_DIR: &str = "/sys/devices/system/memory";

#[test]
#[ignore = "benchmark: run by cargo xtask bench"]
fn bench_refresh() {
    if !can_change_machine("bench_refresh") {
        return;
    }
    let _lock = MachineLock::take_or_inherit("bench_refresh");
    let iterations = std::env::var("BENCH_ITERATIONS")
        .ok()
        .map(|s| s.parse::<usize>().expect("BENCH_ITERATIONS: a number"))
        .unwrap_or(DEFAULT_ITERATIONS)
        .max(1);

    let cluster = Cluster::start(NODE);
    let mut bench = Bench {
        agent: cluster.start_agent(),
        cluster: &cluster,
        offliner: Offliner::start(),
        last_refresh: None,
        last_episode: 0,
    };
    let hot_add = bench.hot_add(iterations);
    let burst = bench.burst();
    let stopped = bench.stop_agent();
    let burst = burst.map(|b| b.count(&bench.agent.seen, stopped));

    let result = json!({
        "agent": hotplug_tests::agent_bin().display().to_string(),
        "settle_ms": SETTLE_MS,
        "min_refresh_interval_ms": MIN_REFRESH_INTERVAL.as_millis() as u64,
        "iterations_asked": iterations,
        "hot_add": hot_add,
        "burst": burst,
    });
    // On a line of its own: libtest has written `test bench_refresh ... ` without a newline.
    println!("\nBENCH_REFRESH_JSON {result}");
    let (mem, cpus) = machine();
    eprintln!("bench_refresh: done; machine back at {cpus} CPUs, MemTotal {mem} bytes");
}

/// The machine lock: taken here, or handed over by the bench that started this test.
/// The e2e tests' cluster, with the agent flags this benchmark wants.
trait BenchCluster {
    fn start_agent(&self) -> Agent;
    fn wait_node_matches_machine_ns(&self) -> u64;
}

impl BenchCluster for Cluster {
    fn start_agent(&self) -> Agent {
        let min_interval = format!("{}ms", MIN_REFRESH_INTERVAL.as_millis());
        let settle = SETTLE_MS.to_string();
        let mut args: Vec<String> = std::iter::once("run".to_string())
            .chain(self.run_args())
            .collect();
        args.extend(
            [
                "--settle-ms",
                &settle,
                "--min-refresh-interval",
                &min_interval,
                "--max-refreshes-per-hour",
                "1000",
                "--verify-timeout",
                "30s",
                // Nothing the measurement needs, and nothing that could clash with another agent.
                "--metrics-addr",
                "off",
                "--stream-socket",
                "off",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut agent, _ready) = Agent::start(&args);
        let startup = agent.wait_for("the start-up reconcile", WAIT, |v| {
            v["kind"] == "reconcile" && v["episode"] == 0
        });
        assert_eq!(startup["action"], "in_sync", "{startup}");
        agent
    }

    /// Waits for the Node on the fake API to advertise the machine's capacity; returns
    /// CLOCK_MONOTONIC when it did.
    fn wait_node_matches_machine_ns(&self) -> u64 {
        self.wait_node_matches_machine(WAIT);
        monotonic_ns()
    }
}

struct Bench<'a> {
    cluster: &'a Cluster,
    agent: Agent,
    offliner: Offliner,
    /// When the last refresh was seen done: the next change waits for the minimum interval.
    last_refresh: Option<Instant>,
    /// The highest episode number handled so far.
    last_episode: u64,
}

/// One capacity change, as the agent handled it.
struct Change {
    name: String,
    first_source: String,
    episode_events: u64,
    /// ms, see the module doc.
    detection: f64,
    /// The sysfs write itself (the kernel's hotplug work), and from its return to the first
    /// event (negative when the event came first).
    write: f64,
    after_write: f64,
    settle: f64,
    reconcile: f64,
    refresh: f64,
    verify: f64,
    to_converged: f64,
    to_node: f64,
    /// The agent's own figures: the episode's `settle_ms`, the refresh's and verify's
    /// `duration_ms` (verify's counts from the refresh's start).
    agent_settle_ms: u64,
    agent_refresh_ms: u64,
    agent_verify_ms: u64,
    restarts: usize,
    /// Episodes before this change's own that found the Node in sync (stragglers).
    extra_episodes: u64,
}

#[derive(Clone, Copy)]
enum Transition {
    CpuOffline,
    CpuOnline,
    BlockOffline,
    BlockOnline,
}

impl Bench<'_> {
    /// Waits until a refresh now would not be deferred by the minimum interval.
    fn space_out(&self) {
        if let Some(last) = self.last_refresh {
            let at = last + MIN_REFRESH_INTERVAL + SPACING_MARGIN;
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
    }

    /// `iterations` changes (rounded up to whole off/on cycles of the devices that can go
    /// offline, so everything ends online and each transition gets as many samples).
    fn hot_add(&mut self, iterations: usize) -> Value {
        let cpu = CpuOffline::pick().filter(|&c| c != 0);
        let mut cycle = Vec::new();
        if cpu.is_some() {
            cycle.extend([Transition::CpuOffline, Transition::CpuOnline]);
        }
        cycle.extend([Transition::BlockOffline, Transition::BlockOnline]);
        let mut notes = Vec::new();
        if cpu.is_none() {
            notes.push("no CPU other than cpu0 can go offline: memory blocks only".to_owned());
        }
        let n = iterations.div_ceil(cycle.len()) * cycle.len();
        if n != iterations {
            notes.push(format!(
                "{iterations} iterations asked, {n} made: whole off/on cycles"
            ));
        }

        let mut cpu_guard: Option<CpuOffline> = None;
        let mut block_guard: Option<BlocksOffline> = None;
        let mut block_id: Option<u32> = None;
        let mut changes: Vec<Change> = Vec::new();
        for transition in cycle.iter().cycle().take(n) {
            self.space_out();
            let (name, t0, t1) = match transition {
                Transition::CpuOffline => {
                    let cpu = cpu.expect("in the cycle only with a CPU");
                    let t0 = monotonic_ns();
                    cpu_guard = Some(CpuOffline::new(cpu));
                    (format!("cpu{cpu} offline"), t0, monotonic_ns())
                }
                Transition::CpuOnline => {
                    let mut guard = cpu_guard.take().expect("offline first");
                    let t0 = monotonic_ns();
                    guard.restore();
                    (format!("cpu{} online", cpu.unwrap()), t0, monotonic_ns())
                }
                Transition::BlockOffline => {
                    let Some((id, (t0, t1), guard)) =
                        offline_one_block(&mut self.offliner, block_id)
                    else {
                        notes.push("no memory block could go offline: memory skipped".into());
                        break;
                    };
                    if block_id.is_some_and(|b| b != id) {
                        notes.push(format!(
                            "memory{} refused to go offline again; memory{id} instead",
                            block_id.unwrap()
                        ));
                    }
                    block_id = Some(id);
                    block_guard = Some(guard);
                    (format!("memory{id} offline"), t0, t1)
                }
                Transition::BlockOnline => {
                    let mut guard = block_guard.take().expect("offline first");
                    let id = guard.blocks[0];
                    let t0 = monotonic_ns();
                    guard.restore();
                    let t1 = monotonic_ns();
                    let state = fs::read_to_string(format!("{MEM_DIR}/memory{id}/state"))
                        .unwrap_or_default();
                    assert_eq!(state.trim(), "online", "memory{id} did not go back online");
                    (format!("memory{id} online"), t0, t1)
                }
            };
            let change = self.measure(name, t0, t1);
            eprintln!(
                "bench_refresh: {}: detection {:.2} ms (write {:.2}), settle {:.1}, reconcile \
                 {:.1}, refresh {:.1}, verify {:.1}; write → Node {:.1} ms; {} restart(s)",
                change.name,
                change.detection,
                change.write,
                change.settle,
                change.reconcile,
                change.refresh,
                change.verify,
                change.to_node,
                change.restarts
            );
            changes.push(change);
        }
        drop(cpu_guard);
        drop(block_guard);

        let col = |f: &dyn Fn(&Change) -> Value| changes.iter().map(f).collect::<Vec<Value>>();
        json!({
            "change": col(&|c| json!(c.name)),
            "first_source": col(&|c| json!(c.first_source)),
            "episode_events": col(&|c| json!(c.episode_events)),
            "detection_ms": col(&|c| json!(c.detection)),
            "write_ms": col(&|c| json!(c.write)),
            "write_returned_to_event_ms": col(&|c| json!(c.after_write)),
            "settle_ms": col(&|c| json!(c.settle)),
            "reconcile_ms": col(&|c| json!(c.reconcile)),
            "refresh_ms": col(&|c| json!(c.refresh)),
            "verify_ms": col(&|c| json!(c.verify)),
            "write_to_converged_ms": col(&|c| json!(c.to_converged)),
            "write_to_node_ms": col(&|c| json!(c.to_node)),
            "agent_settle_ms": col(&|c| json!(c.agent_settle_ms)),
            "agent_refresh_duration_ms": col(&|c| json!(c.agent_refresh_ms)),
            "agent_verify_duration_ms": col(&|c| json!(c.agent_verify_ms)),
            "restarts": col(&|c| json!(c.restarts)),
            "extra_episodes": col(&|c| json!(c.extra_episodes)),
            "notes": notes,
        })
    }

    /// The sysfs write began at `t0` and returned at `t1`: waits for the Node, then reads
    /// what the agent did.
    fn measure(&mut self, name: String, t0: u64, t1: u64) -> Change {
        let restarts_before = self.cluster.kubelet.restarts();
        let node_ns = self.cluster.wait_node_matches_machine_ns();
        let first = self.agent.wait_for("the change's first event", WAIT, |v| {
            is_event(v) && v["mono_ns"].as_u64().is_some_and(|ns| ns >= t0)
        });
        let (episode, extra_episodes) = self.next_stale_episode();
        let e = episode["episode"].as_u64().unwrap();
        let started = self
            .agent
            .wait_for(&format!("refresh started, episode {e}"), WAIT, |v| {
                v["kind"] == "refresh" && v["episode"] == e && v["action"] == "started"
            });
        let done = self
            .agent
            .wait_for(&format!("the refresh's outcome, episode {e}"), WAIT, |v| {
                v["kind"] == "refresh" && v["episode"] == e && v["action"] != "started"
            });
        assert_eq!(done["action"], "succeeded", "{done}");
        let verified =
            self.agent
                .wait_for(&format!("the verify outcome, episode {e}"), WAIT, |v| {
                    v["kind"] == "verify" && v["episode"] == e
                });
        assert_eq!(verified["action"], "converged", "{verified}");
        self.last_refresh = Some(Instant::now());
        let restarts = self.cluster.kubelet.restarts() - restarts_before;

        let ms = |from: &Value, to: &Value| (time_us(to) - time_us(from)) as f64 / 1000.0;
        let detection = (first["mono_ns"].as_u64().unwrap() as i64 - t0 as i64) as f64 / 1e6;
        let to_converged = detection + ms(&first, &verified);
        Change {
            name,
            first_source: first["source"].as_str().unwrap_or("?").to_owned(),
            episode_events: episode["events"].as_u64().unwrap_or(0),
            detection,
            write: (t1 - t0) as f64 / 1e6,
            after_write: (first["mono_ns"].as_u64().unwrap() as i64 - t1 as i64) as f64 / 1e6,
            settle: ms(&first, &episode),
            reconcile: ms(&episode, &started),
            refresh: ms(&started, &done),
            verify: ms(&done, &verified),
            to_converged,
            to_node: (node_ns as i64 - t0 as i64) as f64 / 1e6,
            agent_settle_ms: episode["settle_ms"].as_u64().unwrap_or(0),
            agent_refresh_ms: done["duration_ms"].as_u64().unwrap_or(0),
            agent_verify_ms: verified["duration_ms"].as_u64().unwrap_or(0),
            restarts,
            extra_episodes,
        }
    }

    /// The next episode whose reconcile found the Node stale, and how many in-sync ones came
    /// before it (events that trailed the previous episode).
    fn next_stale_episode(&mut self) -> (Value, u64) {
        let mut extra = 0;
        loop {
            let after = self.last_episode;
            let episode = self.agent.wait_for("the next episode", WAIT, |v| {
                v["kind"] == "episode"
                    && v["action"] == "settled"
                    && v["episode"].as_u64().is_some_and(|e| e > after)
            });
            let e = episode["episode"].as_u64().unwrap();
            self.last_episode = e;
            let reconcile =
                self.agent
                    .wait_for(&format!("the reconcile of episode {e}"), WAIT, |v| {
                        v["kind"] == "reconcile"
                            && v["episode"] == e
                            && matches!(v["action"].as_str(), Some("in_sync" | "stale" | "failed"))
                    });
            match reconcile["action"].as_str() {
                Some("stale") => return (episode, extra),
                Some("in_sync") => extra += 1,
                _ => panic!("reconcile failed: {reconcile}"),
            }
        }
    }

    /// Up to [`BURST_MAX_BLOCKS`] blocks offline back to back, then back online; what it
    /// caused is counted at the end, from the whole log.
    fn burst(&mut self) -> Option<Burst> {
        self.space_out();
        let before = self.cluster.kubelet.restarts();
        let wall0 = wall_us();
        let writes = take_burst(&mut self.offliner);
        // From the first block that went: the refusals before it changed nothing.
        let (t0, t1) = (writes.first_t0, writes.last_done);
        let mut blocks = writes.blocks;
        if blocks.blocks.is_empty() {
            eprintln!("bench_refresh: burst skipped: no memory block could go offline");
            return None;
        }
        let k = blocks.blocks.len();
        eprintln!(
            "bench_refresh: burst: {k} blocks offline in {:.1} ms ({} refused in between, {} \
             before; {} killed after hanging; stopped: {})",
            (t1 - t0) as f64 / 1e6,
            writes.refused,
            writes.refused_before,
            writes.hung.len(),
            writes.stopped
        );
        let node0 = self.cluster.wait_node_matches_machine_ns();
        std::thread::sleep(QUIET);
        let mid = self.cluster.kubelet.restarts();

        let wall2 = wall_us();
        let t2 = monotonic_ns();
        let ids = blocks.blocks.clone();
        blocks.restore();
        let t3 = monotonic_ns();
        for id in &ids {
            let state =
                fs::read_to_string(format!("{MEM_DIR}/memory{id}/state")).unwrap_or_default();
            assert_eq!(state.trim(), "online", "memory{id} did not go back online");
        }
        let node2 = self.cluster.wait_node_matches_machine_ns();
        std::thread::sleep(QUIET);
        let end = self.cluster.kubelet.restarts();
        self.last_refresh = Some(Instant::now());
        eprintln!(
            "bench_refresh: burst: kubelet restarts {} (offline), {} (online)",
            mid - before,
            end - mid
        );
        Some(Burst {
            blocks: ids,
            gaps_ms: writes.gaps_ms,
            refused: writes.refused,
            refused_before: writes.refused_before,
            refused_ms: writes.refused_ms,
            hung: writes.hung,
            stopped: writes.stopped,
            offline: Window {
                wall_from: wall0,
                wall_to: wall2,
                writes_ms: (t1 - t0) as f64 / 1e6,
                to_node_ms: (node0 - t0) as f64 / 1e6,
                restarts: mid - before,
            },
            online: Window {
                wall_from: wall2,
                wall_to: i64::MAX,
                writes_ms: (t3 - t2) as f64 / 1e6,
                to_node_ms: (node2 - t2) as f64 / 1e6,
                restarts: end - mid,
            },
        })
    }

    /// SIGTERM to the agent (our child, by its PID) and its `stopped` record, so that every
    /// record it wrote is in `seen`. Returns that record's `time`.
    fn stop_agent(&mut self) -> i64 {
        // SAFETY: signalling our own child by its PID.
        let rc = unsafe { libc::kill(self.agent.pid() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to the agent");
        let stopped = self.agent.wait_for("the stopped record", WAIT, |v| {
            v["kind"] == "agent" && v["action"] == "stopped"
        });
        time_us(&stopped)
    }
}

struct Burst {
    blocks: Vec<u32>,
    gaps_ms: Vec<f64>,
    refused: usize,
    refused_before: usize,
    refused_ms: f64,
    hung: Vec<u32>,
    stopped: String,
    offline: Window,
    online: Window,
}

/// One direction of the burst: from its first write to the next direction's.
struct Window {
    wall_from: i64,
    wall_to: i64,
    writes_ms: f64,
    to_node_ms: f64,
    restarts: usize,
}

impl Burst {
    fn count(&self, seen: &[Value], stopped: i64) -> Value {
        json!({
            "blocks": self.blocks.len(),
            "block_ids": self.blocks,
            "max_gap_ms": self.gaps_ms.iter().copied().fold(0.0, f64::max),
            "refused_between": self.refused,
            "refused_between_ms": self.refused_ms,
            "refused_before": self.refused_before,
            "hung": self.hung,
            "stopped": self.stopped,
            "offline": self.offline.count(seen, stopped, "offline"),
            "online": self.online.count(seen, stopped, "online"),
        })
    }
}

impl Window {
    fn count(&self, seen: &[Value], stopped: i64, action: &str) -> Value {
        let inside: Vec<&Value> = seen
            .iter()
            .filter(|v| {
                let t = time_us(v);
                t >= self.wall_from && t < self.wall_to.min(stopped)
            })
            .collect();
        let count = |kind: &str, act: &str| {
            inside
                .iter()
                .filter(|v| v["kind"] == kind && v["action"] == act)
                .count()
        };
        let episodes: Vec<&&Value> = inside
            .iter()
            .filter(|v| v["kind"] == "episode" && v["action"] == "settled")
            .collect();
        let of_episodes =
            |f: &dyn Fn(&Value) -> Value| episodes.iter().map(|v| f(v)).collect::<Vec<Value>>();
        let uevents = inside
            .iter()
            .filter(|v| {
                v["source"] == "uevent" && v["kind"] == "memory_block" && v["action"] == action
            })
            .count();
        json!({
            "writes_ms": self.writes_ms,
            "write_to_node_ms": self.to_node_ms,
            // What a per-block udev rule would act on: one kernel uevent per block.
            "uevents": uevents,
            "events": inside.iter().filter(|v| is_event(v)).count(),
            "episodes": episodes.len(),
            // 0 where a record lacks the field (an episode that joined pending work).
            "episode_events": of_episodes(&|v| json!(v["events"].as_u64().unwrap_or(0))),
            "episode_settle_ms": of_episodes(&|v| json!(v["settle_ms"].as_u64().unwrap_or(0))),
            "episode_at_ms": of_episodes(&|v| json!((time_us(v) - self.wall_from) / 1000)),
            "episode_reconciles": of_episodes(&|ep| {
                inside
                    .iter()
                    .find(|v| v["kind"] == "reconcile" && v["episode"] == ep["episode"])
                    .map_or(json!("?"), |v| v["action"].clone())
            }),
            "events_by_kind": events_by_kind(&inside),
            "bounded_by_max_wait": episodes.iter().filter(|v| v["reason"] == "max_wait").count(),
            "stale_reconciles": count("reconcile", "stale"),
            "refreshes_started": count("refresh", "started"),
            "refreshes_deferred": count("refresh", "deferred"),
            "verify_converged": count("verify", "converged"),
            "kubelet_restarts": self.restarts,
        })
    }
}

/// Event records counted by `source kind action`, each with the ms of the first and last
/// (CLOCK_MONOTONIC, relative to the first event of all).
fn events_by_kind(records: &[&Value]) -> Value {
    let events: Vec<&&Value> = records.iter().filter(|v| is_event(v)).collect();
    let Some(origin) = events.iter().filter_map(|v| v["mono_ns"].as_u64()).min() else {
        return json!({});
    };
    let mut kinds: std::collections::BTreeMap<String, (usize, f64, f64)> = Default::default();
    for v in events {
        let key = ["source", "kind", "action"]
            .map(|f| v[f].as_str().unwrap_or("-").to_owned())
            .join(" ");
        let at = (v["mono_ns"].as_u64().unwrap_or(origin) - origin) as f64 / 1e6;
        let entry = kinds.entry(key).or_insert((0, at, at));
        entry.0 += 1;
        entry.1 = entry.1.min(at);
        entry.2 = entry.2.max(at);
    }
    kinds
        .into_iter()
        .map(|(k, (n, first, last))| (k, json!({ "n": n, "first_ms": first, "last_ms": last })))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn block_state(id: u32) -> String {
    fs::read_to_string(format!("{MEM_DIR}/memory{id}/state"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Takes memory blocks offline through a shell that it hands one sysfs path per line, so
/// that a write which never returns can be ended.
///
/// The kernel's `offline_pages` retries migrating movable-but-busy pages with no timeout,
/// and only a fatal signal stops it: here a burst's write sat in it for 8 minutes while the
/// machine was busy compiling. `BlocksOffline::take` writes from the test process itself, so
/// the bench would hang with it. Killing the shell (SIGKILL to our child, by its PID)
/// aborts the write and the kernel leaves the block online.
///
/// The cost: a block's t0 is taken just before the path goes down the pipe, so memory
/// detection includes waking the shell (microseconds on an idle machine).
struct Offliner {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
}

enum Offline {
    /// CLOCK_MONOTONIC before the path was sent, and when the shell's answer came (or it
    /// was killed).
    Done {
        t0: u64,
        t1: u64,
    },
    Refused,
    /// Killed after the timeout; the block is online.
    Hung,
}

impl Offliner {
    fn start() -> Self {
        let mut child = Command::new("/bin/sh")
            .args([
                "-c",
                r#"while read -r p; do echo offline 2>/dev/null >"$p"; echo "$?"; done"#,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting /bin/sh to write to sysfs");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            answers,
        }
    }

    fn offline(&mut self, id: u32, timeout: Duration) -> Offline {
        let t0 = monotonic_ns();
        let sent =
            writeln!(self.stdin, "{MEM_DIR}/memory{id}/state").and_then(|()| self.stdin.flush());
        let answered = sent.is_ok() && self.answers.recv_timeout(timeout).is_ok();
        if !answered {
            self.restart();
            // Killed before the kernel finished: the block is back online, or it made it.
            return if block_state(id) == "offline" {
                Offline::Done {
                    t0,
                    t1: monotonic_ns(),
                }
            } else {
                Offline::Hung
            };
        }
        let t1 = monotonic_ns();
        if block_state(id) == "offline" {
            Offline::Done { t0, t1 }
        } else {
            Offline::Refused
        }
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start();
    }
}

impl Drop for Offliner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Takes one memory block offline: `preferred` (the block of the previous cycles) first,
/// else the highest the kernel lets go within [`BLOCK_WRITE_TIMEOUT`]. Returns the block,
/// CLOCK_MONOTONIC just before its write and when it returned, and the guard that puts it
/// back.
fn offline_one_block(
    offliner: &mut Offliner,
    preferred: Option<u32>,
) -> Option<(u32, (u64, u64), BlocksOffline)> {
    let mut candidates = online_blocks();
    if let Some(p) = preferred.filter(|p| candidates.contains(p)) {
        candidates.retain(|&c| c != p);
        candidates.insert(0, p);
    }
    candidates
        .into_iter()
        .find_map(|id| match offliner.offline(id, BLOCK_WRITE_TIMEOUT) {
            Offline::Done { t0, t1 } => Some((id, (t0, t1), BlocksOffline { blocks: vec![id] })),
            Offline::Hung => {
                eprintln!(
                    "bench_refresh: memory{id} did not go offline within \
                     {BLOCK_WRITE_TIMEOUT:?}; trying others"
                );
                None
            }
            Offline::Refused => None,
        })
}

/// What the burst's writes did.
struct BurstWrites {
    blocks: BlocksOffline,
    /// CLOCK_MONOTONIC before the first block that went offline, and after the last.
    first_t0: u64,
    last_done: u64,
    /// Between one block's write returning and the next's, ms.
    gaps_ms: Vec<f64>,
    /// Attempts the kernel refused (EBUSY) after the first block went, the ms they took,
    /// and those before it.
    refused: usize,
    refused_ms: f64,
    refused_before: usize,
    /// Blocks whose write was killed after hanging (they stayed online).
    hung: Vec<u32>,
    stopped: String,
}

/// Up to [`BURST_MAX_BLOCKS`] blocks offline back to back, highest first, skipping those the
/// kernel refuses; it ends where no further block went offline within [`BURST_GAP`] of the
/// previous one, so the blocks stay one burst to an agent that settles after
/// [`SETTLE_MS`] of quiet (a real hot-add onlines its blocks back to back).
fn take_burst(offliner: &mut Offliner) -> BurstWrites {
    let mut out = BurstWrites {
        blocks: BlocksOffline { blocks: Vec::new() },
        first_t0: 0,
        last_done: 0,
        refused_before: 0,
        refused_ms: 0.0,
        gaps_ms: Vec::new(),
        refused: 0,
        hung: Vec::new(),
        stopped: "no more online blocks".to_owned(),
    };
    let mut last: Option<Instant> = None;
    for id in online_blocks() {
        if out.blocks.blocks.len() == BURST_MAX_BLOCKS {
            out.stopped = format!("reached the {BURST_MAX_BLOCKS}-block limit");
            break;
        }
        let timeout = match last {
            None => BLOCK_WRITE_TIMEOUT,
            Some(last) => (last + BURST_GAP).saturating_duration_since(Instant::now()),
        };
        if timeout.is_zero() {
            out.stopped = format!("no further block went offline within {BURST_GAP:?}");
            break;
        }
        let began = monotonic_ns();
        match offliner.offline(id, timeout) {
            Offline::Done { t0, .. } => {
                if out.blocks.blocks.is_empty() {
                    out.first_t0 = t0;
                }
                out.blocks.blocks.push(id);
                out.last_done = monotonic_ns();
                let now = Instant::now();
                if let Some(last) = last {
                    out.gaps_ms.push((now - last).as_secs_f64() * 1000.0);
                }
                last = Some(now);
            }
            Offline::Refused if last.is_none() => out.refused_before += 1,
            Offline::Refused => {
                out.refused += 1;
                out.refused_ms += (monotonic_ns() - began) as f64 / 1e6;
            }
            Offline::Hung => out.hung.push(id),
        }
    }
    out
}

fn is_event(v: &Value) -> bool {
    matches!(v["kind"].as_str(), Some("cpu" | "memory_block" | "memory")) && v["mono_ns"].is_u64()
}

/// CLOCK_REALTIME in µs since the epoch: what the records' `time` says.
fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A record's `time` (RFC 3339, UTC, as the agent writes it) in µs since the epoch.
fn time_us(v: &Value) -> i64 {
    let s = v["time"].as_str().unwrap_or_default();
    rfc3339_us(s).unwrap_or_else(|| panic!("record without a parsable time: {v}"))
}

/// `2026-01-05T22:08:15.123456Z` → µs since the epoch. The agent writes UTC with `T` and
/// `Z`; anything else is not one of its times.
fn rfc3339_us(s: &str) -> Option<i64> {
    if !s.contains('T') || !s.ends_with('Z') {
        return None;
    }
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_microsecond())
}

#[test]
fn rfc3339_times_parse_to_epoch_microseconds() {
    assert_eq!(rfc3339_us("1970-01-01T00:00:01.5Z"), Some(1_500_000));
    assert_eq!(
        rfc3339_us("2000-03-01T00:00:00Z"),
        Some(951_868_800_000_000)
    );
    assert_eq!(
        rfc3339_us("2024-02-29T23:59:59.000001Z"),
        Some(1_709_251_199_000_001)
    );
    assert_eq!(rfc3339_us("2024-02-29 23:59:59Z"), None);
    assert_eq!(rfc3339_us("2024-02-29T23:59:59+01:00"), None);
}
