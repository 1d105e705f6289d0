//! From a real hot-add to the Node showing it: `hotplug-agent run` against the fake API
//! server and the kubelet stand-in, split into detection, settle, reconcile, refresh and
//! verify; and a burst of memory blocks, whose kubelet restarts are set against what a
//! per-block udev rule would cause.
//!
//! The measurement is the ignored test `tests/tests/bench_refresh.rs`, which has the fake API
//! and the stand-in at hand (see its doc for what each phase runs from and to, and which
//! clock). This suite runs it with `cargo test` (a debug build of the test crate, which
//! `cargo xtask test` keeps built; the agent measured is the bench's release build, through
//! `HOTPLUG_AGENT_BIN`), reads the one `BENCH_REFRESH_JSON` line it prints and turns it into
//! sections. The raw line is kept in `target/bench/refresh.json`.
//!
//! The machine lock: `bench::run` takes `/tmp/hotplug-agent-tests.lock` before the first
//! suite and holds it until the last one ends, and the test takes the same flock
//! (`MachineLock::take`). A flock belongs to an open file description, and the test opens the
//! file anew, so it would wait for the bench, which waits for the test: a deadlock. Releasing
//! the lock around this suite would let a `cargo xtask test` elsewhere grab the machine in
//! between, so the lock is handed over instead: the bench's PID goes to the test in
//! `HOTPLUG_BENCH_LOCK_HOLDER`, and the test, after checking in `/proc/locks` that this PID
//! really holds the flock, runs without taking it. The machine stays locked throughout.
//!
//! The test restores the machine itself (guards that drop on panic); a test killed outright
//! (Ctrl-C reaches it too) runs no destructors, so [`Restore`] puts back online every CPU and
//! memory block that was online before the suite.
use std::{collections::BTreeMap, fs, path::Path};

use anyhow::Context as _;
use serde::Deserialize;

use super::{
    Context,
    machine::{BlockGuard, Interrupt, numbered_entries},
    measured,
    report::{LatencyTarget, Section, Target},
};
use crate::process;

const JSON_PREFIX: &str = "BENCH_REFRESH_JSON ";
/// Read by the test: the PID that holds the machine lock for it.
const LOCK_HOLDER_ENV: &str = "HOTPLUG_BENCH_LOCK_HOLDER";
/// The agent's share of detection (from the sysfs write returning to its first record):
/// the watch suite's 10 ms for a record after a CPU write. The write itself is the kernel's
/// work (a CPU offline takes ~30 ms here) and is shown on its own.
const DETECTION_TARGET: LatencyTarget = LatencyTarget::p99_below_ms(10);
/// `hotplug-agent run`'s default `--max-wait-ms`: an episode is cut there.
const MAX_WAIT_MS: f64 = 5000.0;

pub fn sections(ctx: &Context, out: &mut Vec<Section>) -> anyhow::Result<()> {
    // Each change costs the settle window, a restart and the 2 s minimum interval between
    // refreshes, about 3 s: a sixth of the toggles (10 by default, 4 with --quick; the test
    // rounds up to whole off/on cycles).
    let iterations = (ctx.toggles / 6).max(4);
    let raw = run_test(ctx, iterations)?;
    let raw_path = ctx.out_dir.join("refresh.json");
    fs::write(&raw_path, format!("{raw}\n"))
        .with_context(|| format!("writing {}", raw_path.display()))?;
    let result: Output = serde_json::from_str(&raw)
        .with_context(|| format!("parsing the test's {JSON_PREFIX}line: {raw}"))?;
    out.push(hot_add_section(&result));
    out.push(burst_section(&result));
    Ok(())
}

/// Runs the test and returns its JSON line; the machine is put back whatever happened.
fn run_test(ctx: &Context, iterations: u32) -> anyhow::Result<String> {
    let restore = Restore::snapshot();
    let mut cmd = measured::test_command(
        "bench_refresh",
        "bench_refresh",
        &["--ignored", "--test-threads=1"],
    );
    cmd.env("HOTPLUG_AGENT_BIN", &ctx.binary)
        .env("BENCH_ITERATIONS", iterations.to_string())
        .env(LOCK_HOLDER_ENV, std::process::id().to_string());
    eprintln!(
        "$ HOTPLUG_AGENT_BIN={} BENCH_ITERATIONS={iterations} {}",
        ctx.binary.display(),
        process::display(&cmd)
    );
    // The test's progress goes to stderr (inherited); its stdout is libtest's lines and ours.
    measured::json_line(cmd, JSON_PREFIX, || {
        drop(restore);
        Interrupt::check()
    })
}

/// CPUs and memory blocks online when the suite started; any of them offline when it is
/// dropped is put back online.
struct Restore {
    cpus: Vec<u32>,
    blocks: Vec<u32>,
}

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";

impl Restore {
    fn snapshot() -> Self {
        Self {
            cpus: online(CPU_DIR, "cpu", "online", "1"),
            blocks: online(MEMORY_DIR, "memory", "state", "online"),
        }
    }
}

/// The numbered entries `<dir>/<prefix>N` whose `file` reads `value`.
fn online(dir: &str, prefix: &str, file: &str, value: &str) -> Vec<u32> {
    numbered_entries(dir, prefix)
        .into_iter()
        .filter(|n| {
            fs::read_to_string(Path::new(dir).join(format!("{prefix}{n}/{file}")))
                .is_ok_and(|s| s.trim() == value)
        })
        .collect()
}

impl Drop for Restore {
    fn drop(&mut self) {
        let cpus_now = online(CPU_DIR, "cpu", "online", "1");
        for cpu in self.cpus.iter().filter(|c| !cpus_now.contains(c)) {
            let path = Path::new(CPU_DIR).join(format!("cpu{cpu}/online"));
            match fs::write(&path, "1") {
                Ok(()) => eprintln!("bench: refresh: put cpu{cpu} back online"),
                Err(err) => eprintln!(
                    "bench: WARNING: could not put cpu{cpu} back online: {err}; run `echo 1 > {}`",
                    path.display()
                ),
            }
        }
        let blocks_now = online(MEMORY_DIR, "memory", "state", "online");
        for &id in self.blocks.iter().filter(|b| !blocks_now.contains(b)) {
            eprintln!("bench: refresh: putting memory{id} back online");
            // Its drop writes `online` and warns if the kernel refuses.
            drop(BlockGuard::new(id));
        }
    }
}

/// The test's JSON line (durations in ms).
#[derive(Debug, Deserialize)]
struct Output {
    settle_ms: u64,
    min_refresh_interval_ms: u64,
    hot_add: HotAdd,
    burst: Option<Burst>,
}

/// Parallel arrays, one entry per capacity change.
#[derive(Debug, Deserialize)]
struct HotAdd {
    change: Vec<String>,
    first_source: Vec<String>,
    detection_ms: Vec<f64>,
    write_ms: Vec<f64>,
    write_returned_to_event_ms: Vec<f64>,
    settle_ms: Vec<f64>,
    reconcile_ms: Vec<f64>,
    refresh_ms: Vec<f64>,
    verify_ms: Vec<f64>,
    write_to_converged_ms: Vec<f64>,
    write_to_node_ms: Vec<f64>,
    restarts: Vec<u64>,
    extra_episodes: Vec<u64>,
    notes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Burst {
    blocks: u64,
    max_gap_ms: f64,
    refused_before: u64,
    refused_between: u64,
    hung: Vec<u32>,
    stopped: String,
    offline: Direction,
    online: Direction,
}

#[derive(Debug, Deserialize)]
struct Direction {
    writes_ms: f64,
    write_to_node_ms: f64,
    uevents: u64,
    episodes: u64,
    episode_events: Vec<u64>,
    episode_settle_ms: Vec<u64>,
    episode_reconciles: Vec<String>,
    bounded_by_max_wait: u64,
    refreshes_started: u64,
    refreshes_deferred: u64,
    kubelet_restarts: u64,
}

fn ns(ms: &[f64]) -> Vec<i64> {
    ms.iter().map(|ms| (ms * 1e6).round() as i64).collect()
}

/// `cpu1 offline` → `cpu offline`, `memory191 online` → `memory block online`.
fn transition(change: &str) -> String {
    let (device, action) = change.split_once(' ').unwrap_or((change, ""));
    let kind = if device.starts_with("cpu") {
        "cpu"
    } else {
        "memory block"
    };
    format!("{kind} {action}")
}

fn hot_add_section(r: &Output) -> Section {
    let h = &r.hot_add;
    let mut devices: Vec<&str> = h
        .change
        .iter()
        .filter_map(|c| c.split_whitespace().next())
        .collect();
    devices.sort_unstable();
    devices.dedup();
    let mut section = Section::new(format!(
        "Hot-add to Node ({} capacity changes, one at a time, {} offline/online; \
         --settle-ms {}, --refresh command restarting the kubelet stand-in)",
        h.change.len(),
        devices.join(", "),
        r.settle_ms
    ));
    // Rows per transition kind where they differ by nature (the kernel's work is in
    // detection and in the total).
    let by_transition = |values: &[f64]| {
        let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (change, v) in h.change.iter().zip(values) {
            groups.entry(transition(change)).or_default().push(*v);
        }
        groups
    };
    for (kind, samples) in by_transition(&h.write_ms) {
        section.latency(format!("sysfs write itself, {kind}"), ns(&samples), None);
    }
    for (kind, samples) in by_transition(&h.detection_ms) {
        section.latency(
            format!("detection: write → first event, {kind}"),
            ns(&samples),
            None,
        );
    }
    section.latency(
        "detection: write returned → first event, all",
        ns(&h.write_returned_to_event_ms),
        Some(DETECTION_TARGET),
    );
    section.latency(
        "settle: first event → episode settled",
        ns(&h.settle_ms),
        None,
    );
    section.latency(
        "reconcile: settled → refresh started",
        ns(&h.reconcile_ms),
        None,
    );
    section.latency(
        "refresh: started → succeeded (stand-in restart)",
        ns(&h.refresh_ms),
        None,
    );
    section.latency(
        "verify: refresh succeeded → converged",
        ns(&h.verify_ms),
        None,
    );
    section.latency(
        "total: write → verify converged",
        ns(&h.write_to_converged_ms),
        None,
    );
    section.latency(
        "total: write → Node shows it (fake API)",
        ns(&h.write_to_node_ms),
        None,
    );
    for (kind, samples) in by_transition(&h.write_to_node_ms) {
        section.latency(format!("  write → Node, {kind}"), ns(&samples), None);
    }
    let restarts: u64 = h.restarts.iter().sum();
    let all_one = !h.restarts.is_empty() && h.restarts.iter().all(|&n| n == 1);
    section.value(
        "kubelet restarts",
        format!("{restarts} for {} changes", h.change.len()),
        Some(Target::new("1 per change", all_one)),
    );
    let extra: u64 = h.extra_episodes.iter().sum();
    section.value(
        "straggler episodes (in sync, no restart)",
        extra.to_string(),
        None,
    );
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &h.first_source {
        *sources.entry(s.as_str()).or_default() += 1;
    }
    section.value(
        "first event's source",
        sources
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        None,
    );
    section.note(
        "detection runs from just before the sysfs write, so it includes the kernel's own \
         hotplug work (\"sysfs write itself\"); \"write returned → first event\" is the \
         agent's share, negative when the event came before the write returned; a memory \
         block goes offline through a shell the test can kill (the kernel may retry an \
         offline forever), so its write includes a pipe round trip",
    );
    section.note(
        "clocks: detection and \"write → Node\" are CLOCK_MONOTONIC (the bench's write, the \
         record's mono_ns, the fake API's Node update); settle, reconcile, refresh and verify \
         are differences of the records' `time` (the agent's CLOCK_REALTIME, µs); \"write → \
         verify converged\" is detection plus those four",
    );
    section.note(format!(
        "settle dominates by design: the agent waits for {} ms without events before it \
         reconciles; changes are spaced by the {} ms minimum interval between refreshes, so \
         none is deferred",
        r.settle_ms, r.min_refresh_interval_ms
    ));
    section.note(
        "refresh is the stand-in's restart (stop, start, re-read the machine, post the Node \
         status); a real kubelet takes seconds to restart, which would dominate instead",
    );
    for note in &h.notes {
        section.note(note.clone());
    }
    section
}

fn burst_section(r: &Output) -> Section {
    let Some(b) = &r.burst else {
        let mut section = Section::new("Burst of memory blocks");
        section.note("skipped: no memory block could be taken offline");
        return section;
    };
    let k = b.blocks;
    let mut section = Section::new(format!(
        "Burst: {k} memory blocks offline back to back, then back online (--settle-ms {})",
        r.settle_ms
    ));
    for (name, d) in [("offline", &b.offline), ("online", &b.online)] {
        section.value(
            format!("{name}: sysfs writes"),
            format!("{k} blocks in {:.0} ms", d.writes_ms),
            None,
        );
        section.value(
            format!("{name}: block uevents (per-block udev rule: 1 restart each)"),
            d.uevents.to_string(),
            None,
        );
        let episodes: Vec<String> = d
            .episode_events
            .iter()
            .zip(&d.episode_settle_ms)
            .zip(&d.episode_reconciles)
            .map(|((events, settle), reconcile)| {
                format!("{events} events, {settle} ms, {reconcile}")
            })
            .collect();
        section.value(
            format!("{name}: episodes (events, first event → settled, reconcile)"),
            format!("{}: {}", d.episodes, episodes.join("; ")),
            Some(Target::new("1", d.episodes == 1)),
        );
        section.value(
            format!("{name}: kubelet restarts"),
            d.kubelet_restarts.to_string(),
            Some(Target::new("1", d.kubelet_restarts == 1)),
        );
        section.value(
            format!("{name}: first write → Node shows it"),
            format!("{:.0} ms", d.write_to_node_ms),
            None,
        );
        if name == "offline" {
            section.value(
                "offline: EBUSY refusals skipped (before the first / in between)",
                format!("{} / {}", b.refused_before, b.refused_between),
                None,
            );
            section.value(
                "offline: longest gap between two blocks",
                format!("{:.0} ms", b.max_gap_ms),
                None,
            );
        }
        if d.bounded_by_max_wait > 0 || d.refreshes_deferred > 0 {
            section.note(format!(
                "{name}: {} episode(s) cut by --max-wait-ms, {} refresh(es) deferred, {} started",
                d.bounded_by_max_wait, d.refreshes_deferred, d.refreshes_started
            ));
        }
    }
    if !b.hung.is_empty() {
        let hung: Vec<String> = b.hung.iter().map(|id| format!("memory{id}")).collect();
        section.note(format!(
            "offline writes that hung in the kernel and were killed (the blocks stayed online): {}",
            hung.join(", ")
        ));
    }
    section.note(format!(
        "offline burst ended: {}; it ends at the latest where no further block goes offline within \
         250 ms of the previous one, so the agent (300 ms settle) sees one burst",
        b.stopped
    ));
    if b.offline.writes_ms > MAX_WAIT_MS / 2.0 {
        section.note(format!(
            "the offline burst spread over {:.1} s (page migration and EBUSY refusals); an \
             episode is cut at --max-wait-ms ({:.0} s by default), so a burst longer than that \
             makes two episodes and, after the 2 s minimum interval, a second restart",
            b.offline.writes_ms / 1000.0,
            MAX_WAIT_MS / 1000.0
        ));
    }
    let agent = b.offline.kubelet_restarts + b.online.kubelet_restarts;
    let rule = b.offline.uevents + b.online.uevents;
    section.value(
        "restarts both ways: agent vs per-block udev rule",
        format!("{agent} vs {rule} (2K = {})", 2 * k),
        Some(Target::new(
            "1 per burst",
            b.offline.kubelet_restarts == 1 && b.online.kubelet_restarts == 1,
        )),
    );
    section.note(
        "per-block rule: `SUBSYSTEM==\"memory\", ACTION==\"online|offline\", RUN+=\"/bin/systemctl \
         restart kubelet\"` runs once per block uevent: K offline + K online = 2K restarts (an \
         ACTION==\"online\" rule alone: K, on the way up). No udevd runs here: its count is the \
         block uevents the agent received",
    );
    section.note(
        "the blocks are the highest the kernel lets go (some answer EBUSY and are skipped); \
         restarts are counted from the stand-in's own log, after a quiet period long enough \
         for a second episode to settle and refresh",
    );
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_group_devices_by_kind() {
        assert_eq!(transition("cpu1 offline"), "cpu offline");
        assert_eq!(transition("memory191 online"), "memory block online");
    }

    #[test]
    fn the_tests_json_line_becomes_two_sections() {
        let raw = r#"{"agent":"/x","settle_ms":300,"min_refresh_interval_ms":2000,
            "iterations_asked":4,
            "hot_add":{"change":["cpu1 offline","cpu1 online"],"first_source":["ebpf","ebpf"],
              "episode_events":[2,2],"detection_ms":[30.5,8.7],
              "write_ms":[30.0,8.0],"write_returned_to_event_ms":[0.5,0.7],
              "settle_ms":[301.0,302.5],
              "reconcile_ms":[3.0,2.0],"refresh_ms":[120.0,130.0],"verify_ms":[2.0,3.0],
              "write_to_converged_ms":[430.0,440.0],"write_to_node_ms":[420.0,430.0],
              "agent_settle_ms":[1,2],"agent_refresh_duration_ms":[120,130],
              "agent_verify_duration_ms":[125,135],"restarts":[1,1],"extra_episodes":[0,0],
              "notes":[]},
            "burst":{"blocks":3,"block_ids":[1,2,3],"max_gap_ms":20.0,"refused_before":5,
              "refused_between":1,"refused_between_ms":2.0,"hung":[4],
              "stopped":"reached the 3-block limit",
              "offline":{"writes_ms":30.0,"write_to_node_ms":500.0,"uevents":3,"events":6,
                "episodes":1,"episode_events":[6],"episode_settle_ms":[30],
                "episode_reconciles":["stale"],"episode_at_ms":[330],"events_by_kind":{},
                "bounded_by_max_wait":0,"stale_reconciles":1,"refreshes_started":1,
                "refreshes_deferred":0,"verify_converged":1,"kubelet_restarts":1},
              "online":{"writes_ms":20.0,"write_to_node_ms":450.0,"uevents":3,"events":6,
                "episodes":1,"episode_events":[6],"episode_settle_ms":[20],
                "episode_reconciles":["stale"],"episode_at_ms":[320],"events_by_kind":{},
                "bounded_by_max_wait":0,"stale_reconciles":1,"refreshes_started":1,
                "refreshes_deferred":0,"verify_converged":1,"kubelet_restarts":2}}}"#;
        let r: Output = serde_json::from_str(raw).unwrap();
        let sections = [hot_add_section(&r), burst_section(&r)];
        let table = super::super::report::table(&sections);
        assert!(
            table.contains("detection: write → first event, cpu offline"),
            "{table}"
        );
        assert!(table.contains("2 for 2 changes"), "{table}");
        assert!(table.contains("3 vs 6 (2K = 6)"), "{table}");
        assert!(table.contains("1: 6 events, 30 ms, stale"), "{table}");
        assert!(table.contains("memory4"), "{table}");
        // Two restarts for the online burst: its row and the total fail.
        assert_eq!(table.matches("FAIL").count(), 2, "{table}");
    }
}
