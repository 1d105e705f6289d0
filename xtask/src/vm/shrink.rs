//! The shrink scenario: a DIMM is unplugged under pods that would not fit without it, and
//! the agent (`--shrink-policy evict`) evicts the lowest-priority one while the kernel is
//! still offlining the DIMM, not after.
//!
//! What makes the order causal rather than a race: the `hog` pod (tests/src/bin/
//! pod-standin.rs) keeps its pages in the DIMM referenced by pipes (vmsplice), so the
//! kernel cannot migrate them and `offline_pages()` keeps retrying (no timeout in 6.x)
//! until the process exits; ACPI's eject waits for it. The kernel's `offline` uevents of
//! the DIMM's blocks can therefore only come after the hog is gone, and the hog goes only
//! when its Pod is deleted (the fake API deletes an evicted pod at once). The agent's
//! eviction must precede the kernel's `offline` in the records, or the unplug never ends.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::{
    Figures,
    guest::Rec,
    incident::{DIR, NODE, restarts, start_cluster_with},
    session::{Dimm, MIB, Session, WAIT, ensure_records},
};

/// How long the control watches the unplug not finishing.
const STALL: Duration = Duration::from_secs(5);

/// The guest's cgroup v2 mount, where the pods' cgroups go.
const CGROUP: &str = "/sys/fs/cgroup";

/// The kubelet stand-in writes the pods' memory limit into the real cgroup.
fn standin_flags() -> String {
    format!(
        "--kubeconfig {DIR}/kubeconfig --node-name {NODE} --pidfile {DIR}/kubelet.pid \
         --restarts-log {DIR}/restarts.log --repost-ms 500 \
         --cgroup-file {CGROUP}/kubepods.slice/memory.max"
    )
}

/// One pod stand-in: its name, priority, memory request and what it holds.
struct PodSpec {
    name: &'static str,
    priority: i32,
    request: &'static str,
    request_bytes: u64,
    hold: &'static str,
    pin: bool,
}

const KEEPER: PodSpec = PodSpec {
    name: "keeper",
    priority: 1000,
    request: "200Mi",
    request_bytes: 200 * MIB,
    hold: "16Mi",
    pin: false,
};

const HOG: PodSpec = PodSpec {
    name: "hog",
    priority: 0,
    request: "300Mi",
    request_bytes: 300 * MIB,
    hold: "64Mi",
    pin: true,
};

/// The pods running on the plugged DIMM, the hog's pages pinned in it.
struct Staged {
    dimm: Dimm,
    /// The hog's pinned pages in the DIMM's blocks, and in all.
    in_dimm: u64,
    pinned: u64,
}

/// The control: with the hog alive and nobody evicting it (`--shrink-policy refuse`), the
/// DIMM's unplug does not finish; it does once the hog exits. This is what makes the order
/// asserted in [`shrink_evicts_while_the_kernel_offlines`] causal; should a kernel or QEMU
/// stop stalling on referenced pages, this fails and says so.
pub fn pins_stall_the_unplug(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    let Staged {
        dimm,
        in_dimm,
        pinned,
    } = stage(s, "refuse")?;
    let from = s.vm.records.mark();
    let t0 = Instant::now();
    s.qmp("device_del", json!({"id": dimm.id}))?;
    // The kernel starts offlining the first block (the agent's probe sees it) ...
    s.vm.records
        .wait_for(from, "the kernel starting to offline the DIMM", WAIT, |r| {
            r.source() == "ebpf"
                && r.v["probe"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/offline_pages"))
        })?;
    // ... and cannot finish while the hog holds its pages: no eject for this long, where an
    // unpinned 256 MiB DIMM goes in well under a second here.
    let deleted = s.vm.qmp.wait_event("DEVICE_DELETED", STALL, |e| {
        e["data"]["device"] == dimm.id.as_str()
    });
    ensure!(
        deleted.is_err(),
        "the DIMM was ejected while the hog still pinned {in_dimm} of its pages"
    );
    let mut states = Vec::new();
    for block in &dimm.blocks {
        states.push(format!("{block} {}", s.block_state(block)?));
    }
    ensure!(
        states.iter().any(|st| st.ends_with(" going-offline")),
        "a block of the DIMM should be `going-offline` after {STALL:?}: {states:?}"
    );
    let recs = s.vm.records.since(from).to_vec();
    ensure_records(
        !recs.iter().any(|r| {
            r.source() == "uevent"
                && r.is("memory_block", "offline")
                && dimm.blocks.iter().any(|b| b == r.device())
        }),
        "no block of the DIMM may go offline while the hog pins it",
        &recs,
    )?;
    s.vm.shell
        .check(&format!("kill -0 $(cat {DIR}/{}.pid)", HOG.name))
        .context("the hog should still run")?;

    // The hog exits (SIGTERM), its pipes close, the kernel finishes and ejects.
    let killed = Instant::now();
    s.vm.shell
        .check(&format!("kill $(cat {DIR}/{}.pid)", HOG.name))?;
    s.vm.qmp
        .wait_event("DEVICE_DELETED", WAIT, |e| {
            e["data"]["device"] == dimm.id.as_str()
        })
        .context("the DIMM should be ejected once the hog exited")?;
    let eject = killed.elapsed();
    s.wait_removed(from, &dimm)?;
    figures.push(format!(
        "shrink control: {in_dimm} of {pinned} pinned hog pages in the DIMM; no eject for \
         {:.1} s while the hog lived ({}), hog killed -> DEVICE_DELETED {} ms",
        (t0.elapsed() - eject).as_secs_f64(),
        states.join(", "),
        eject.as_millis()
    ));
    Ok(())
}

pub fn shrink_evicts_while_the_kernel_offlines(
    s: &mut Session,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let Staged {
        dimm,
        in_dimm,
        pinned,
    } = stage(s, "evict")?;
    let restarts_before = restarts(s)?;

    // Only the agent's eviction of the hog lets this finish (see the control above).
    let from = s.vm.records.mark();
    let unplug = match s.unplug_dimm(&dimm) {
        Ok(unplug) => unplug,
        Err(e) => {
            let recs = s.vm.records.since(from).to_vec();
            let acted = recs.iter().any(|r| shrink_started(r, &dimm.blocks));
            return ensure_records(
                false,
                &format!(
                    "the unplug did not finish ({e:#}): the kernel waits for the hog's pinned \
                     pages, which only the agent's eviction frees; a reset `started` (reason \
                     shrink) naming the DIMM's blocks {:?} in shrink.offlining: {}",
                    dimm.blocks,
                    if acted { "seen" } else { "none" }
                ),
                &recs,
            );
        }
    };
    let t0 = unplug.record.at - unplug.latency;
    let machine = s.memory()?;
    let converged = s.vm.records.wait_for(
        unplug.from,
        "verify converged after the unplug",
        WAIT * 3,
        |r| r.is("verify", "converged"),
    )?;
    s.vm.records.wait_for(
        unplug.from,
        "reset uncordoned after the unplug",
        WAIT,
        |r| r.is("reset", "uncordoned"),
    )?;
    // Nothing more should happen: one refresh, one restart.
    let recs: Vec<Rec> =
        s.vm.records
            .settle(unplug.from, Duration::from_secs(2))
            .to_vec();

    // The agent acted on the kernel's start: the shrink check names the blocks being
    // offlined, and the hog was evicted, both before the first of them went offline.
    let position = |pred: &dyn Fn(&Rec) -> bool| recs.iter().position(pred);
    let first_offline = position(&|r| {
        r.source() == "uevent"
            && r.is("memory_block", "offline")
            && dimm.blocks.iter().any(|b| b == r.device())
    });
    let first_offline = first_offline.context("no uevent `offline` of the DIMM's blocks")?;
    let started = position(&|r| shrink_started(r, &dimm.blocks));
    let Some(started) = started else {
        return ensure_records(
            false,
            &format!(
                "a reset `started` (reason shrink) whose shrink.offlining holds the DIMM's \
                 blocks {:?}",
                dimm.blocks
            ),
            &recs,
        );
    };
    let evicted = position(&|r| r.is("reset", "evicted") && r.v["message"] == "default/hog");
    let evicted = evicted.context("no reset `evicted` of default/hog")?;
    ensure_records(
        !recs
            .iter()
            .any(|r| r.is("reset", "evicted") && r.v["message"] == "default/keeper"),
        "the keeper (priority 1000) must not be evicted",
        &recs,
    )?;
    ensure_records(
        started < evicted && evicted < first_offline,
        &format!(
            "shrink started (#{started}) < hog evicted (#{evicted}) < the kernel's first \
             offline (#{first_offline}) in the record stream"
        ),
        &recs,
    )?;
    let (t_started, t_evicted, t_offline) = (
        time(&recs[started])?,
        time(&recs[evicted])?,
        time(&recs[first_offline])?,
    );
    ensure!(
        t_started <= t_evicted && t_evicted <= t_offline,
        "the records' times disagree with their order: started {t_started}, evicted \
         {t_evicted}, offline {t_offline}"
    );

    // The hog saw its Pod deleted and exited; the keeper still runs.
    wait_exit(s, HOG.name)?;
    let hog_log = s.vm.shell.check(&format!("cat {DIR}/{}.log", HOG.name))?;
    ensure!(
        hog_log.lines().any(|l| l == "deleted"),
        "the hog should have printed `deleted`:\n{hog_log}"
    );
    s.vm.shell
        .check(&format!("kill -0 $(cat {DIR}/{}.pid)", KEEPER.name))
        .context("the keeper should still run")?;

    // One restart for the shrink, and the Node converged to the machine as it is now.
    let refreshes: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.is("refresh", "succeeded"))
        .collect();
    ensure_records(
        refreshes.len() == 1,
        "exactly one refresh after the unplug",
        &recs,
    )?;
    // The evictions during the offline and the restart after it are one episode.
    ensure_records(
        recs[started].v["episode"] == refreshes[0].v["episode"],
        "the shrink's evictions and the restart in the same episode",
        &recs,
    )?;
    let restarts_after = restarts(s)?;
    ensure!(
        restarts_after == restarts_before + 1,
        "exactly one kubelet restart after the unplug: {restarts_before} -> {restarts_after} start-ups"
    );
    let advertised = converged.v["advertised_after"]["memory_bytes"].as_u64();
    ensure!(
        advertised == Some(machine),
        "the Node should advertise the guest's {machine} bytes now: {}",
        converged.v
    );
    let uncordoned = recs
        .iter()
        .rposition(|r| r.is("reset", "uncordoned"))
        .context("the uncordoned record")?;
    ensure_records(
        evicted < uncordoned && !recs[uncordoned..].iter().any(|r| r.is("reset", "cordoned")),
        "the agent's cordon should be lifted after the eviction, and not taken again",
        &recs,
    )?;
    let unschedulable = node(s)?["spec"]["unschedulable"] == true;
    ensure!(!unschedulable, "the Node should be schedulable at the end");

    let ms = |rec: &Rec| rec.at.saturating_duration_since(t0).as_millis();
    figures.push(format!(
        "shrink-unplug: {in_dimm} of {pinned} pinned hog pages in the DIMM; device_del -> shrink \
         started {} ms, -> hog evicted {} ms, -> kernel's first offline {} ms, -> converged {} ms",
        ms(&recs[started]),
        ms(&recs[evicted]),
        ms(&recs[first_offline]),
        ms(&converged)
    ));
    Ok(())
}

/// cgroups, the fake API and the kubelet stand-in, the agent with `--shrink-policy
/// POLICY`, a 256 MiB DIMM onlined movable and converged, then the two pods, the hog's
/// pages pinned in the DIMM.
fn stage(s: &mut Session, policy: &str) -> anyhow::Result<Staged> {
    prepare_cgroups(s)?;
    start_cluster_with(s, &standin_flags())?;
    let refresh = format!("kubelet-standin restart {}", standin_flags());
    let ready = s.start_agent(&format!(
        "run --format json --kubeconfig {DIR}/kubeconfig --node-name {NODE} \
         --refresh command --refresh-command '{refresh}' --settle-ms 300 \
         --verify-timeout 60s --refresh-timeout 60s --kubelet-root-dir {DIR}/kubelet-root \
         --cgroup-root {CGROUP} --auto-online-memory online_movable --shrink-policy {policy}"
    ))?;
    ensure!(ready["kind"] == "agent", "unexpected first record {ready}");

    let plug = s.plug_dimm(256 * MIB)?;
    s.vm.records.wait_for(
        plug.from,
        "verify converged after the plug",
        WAIT * 3,
        |r| r.is("verify", "converged"),
    )?;
    let dimm = s.dimms.pop().context("the plugged DIMM")?;

    // The requests fit the Node with the DIMM and not without it: the Node's allocatable
    // now, and minus the DIMM after (a restart keeps capacity - allocatable reserved).
    let node = node(s)?;
    let allocatable = quantity(&node["status"]["allocatable"]["memory"])?;
    let requests = KEEPER.request_bytes + HOG.request_bytes;
    let without = allocatable.saturating_sub(256 * MIB);
    ensure!(
        requests <= allocatable && requests > without,
        "the pods' requests ({} MiB) should fit the Node's allocatable with the DIMM ({} MiB) \
         and not without it ({} MiB)",
        requests / MIB,
        allocatable / MIB,
        without / MIB
    );

    start_pod(s, &KEEPER)?;
    let blocks = start_pod(s, &HOG)?;
    let in_dimm: u64 = blocks
        .iter()
        .filter(|(b, _)| dimm.blocks.contains(b))
        .map(|(_, n)| n)
        .sum();
    let pinned: u64 = blocks.iter().map(|(_, n)| n).sum();
    ensure!(
        in_dimm > 0,
        "none of the hog's pinned pages are in the DIMM's blocks {:?}: {blocks:?}",
        dimm.blocks
    );
    Ok(Staged {
        dimm,
        in_dimm,
        pinned,
    })
}

/// cgroup v2 at [`CGROUP`] with the memory controller handed down to `kubepods.slice`, as
/// a node running the kubelet with the systemd driver has it.
fn prepare_cgroups(s: &mut Session) -> anyhow::Result<()> {
    s.vm.shell.check(&format!(
        "grep -q ' {CGROUP} cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 {CGROUP}; \
         echo +memory >{CGROUP}/cgroup.subtree_control && mkdir -p {CGROUP}/kubepods.slice && \
         echo +memory >{CGROUP}/kubepods.slice/cgroup.subtree_control"
    ))?;
    Ok(())
}

/// Starts a pod stand-in and waits for it to hold its memory; the pages per memory block.
fn start_pod(s: &mut Session, pod: &PodSpec) -> anyhow::Result<Vec<(String, u64)>> {
    let PodSpec {
        name,
        priority,
        request,
        hold,
        pin,
        ..
    } = pod;
    let pin = if *pin { " --pin" } else { "" };
    s.vm.shell.check(&format!(
        "pod-standin --kubeconfig {DIR}/kubeconfig --node-name {NODE} --name {name} \
         --priority {priority} --memory-request {request} --hold-bytes {hold}{pin} \
         --cgroup-root {CGROUP} --ready-file {DIR}/{name}.ready \
         >{DIR}/{name}.log 2>&1 & echo $! >{DIR}/{name}.pid"
    ))?;
    // The ready file appears (atomically) once the memory is held; a stand-in that died
    // ends the wait with its log.
    let (rc, out) = s.vm.shell.run(
        &format!(
            "for i in $(seq 1200); do [ -f {DIR}/{name}.ready ] && exit 0; \
             kill -0 $(cat {DIR}/{name}.pid) || break; sleep 0.05; done; cat {DIR}/{name}.log; exit 1"
        ),
        Duration::from_secs(90),
    )?;
    ensure!(rc == 0, "pod stand-in {name} did not get ready:\n{out}");
    let log = s.vm.shell.check(&format!("cat {DIR}/{name}.log"))?;
    let line = log
        .lines()
        .find(|l| l.starts_with("pinned ") || l.starts_with("holding "))
        .with_context(|| format!("no page count in {name}'s log:\n{log}"))?;
    blocks(line).with_context(|| format!("{name}: {line:?}"))
}

/// `pinned 16384 pages: memory40 9000, memory41 7384` -> [(memory40, 9000), ...].
fn blocks(line: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let (_, list) = line.split_once(": ").context("no `: `")?;
    list.split(", ")
        .map(|entry| {
            let (block, n) = entry.split_once(' ').context("no count")?;
            Ok((block.to_owned(), n.parse().context("count")?))
        })
        .collect()
}

/// Waits for a pod stand-in to exit (it does once its Pod is deleted).
fn wait_exit(s: &mut Session, name: &str) -> anyhow::Result<()> {
    let (rc, out) = s.vm.shell.run(
        &format!(
            "for i in $(seq 600); do kill -0 $(cat {DIR}/{name}.pid) 2>/dev/null || exit 0; \
             sleep 0.05; done; cat {DIR}/{name}.log; exit 1"
        ),
        Duration::from_secs(60),
    )?;
    ensure!(rc == 0, "pod stand-in {name} did not exit:\n{out}");
    Ok(())
}

/// A `reset` `started` (reason `shrink`) whose `shrink.offlining` names every one of
/// `blocks`: the agent's check against the machine without the blocks being offlined.
fn shrink_started(r: &Rec, blocks: &[String]) -> bool {
    let Some(list) = r.v["shrink"]["offlining"].as_array() else {
        return false;
    };
    r.is("reset", "started")
        && r.v["reason"] == "shrink"
        && blocks.iter().all(|b| list.iter().any(|x| x == b.as_str()))
}

/// A record's `time`.
fn time(r: &Rec) -> anyhow::Result<Timestamp> {
    let t = r.v["time"].as_str().context("a record without `time`")?;
    t.parse()
        .map_err(|e| anyhow::anyhow!("record time {t:?}: {e}"))
}

/// The Node as the fake API in the guest has it.
fn node(s: &mut Session) -> anyhow::Result<Value> {
    let node = s.vm.shell.check(&format!(
        "wget -q -O - $(awk '/server:/ {{print $2}}' {DIR}/kubeconfig)/api/v1/nodes/{NODE}"
    ))?;
    serde_json::from_str(&node).with_context(|| format!("the Node from the API: {node}"))
}

/// A Kubernetes quantity in bytes.
fn quantity(v: &Value) -> anyhow::Result<u64> {
    let text = v.as_str().with_context(|| format!("not a quantity: {v}"))?;
    let parsed = kube_quantity::ParsedQuantity::try_from(text)
        .map_err(|e| anyhow::anyhow!("quantity {text:?}: {e}"))?;
    let bytes = parsed
        .to_bytes_f64()
        .with_context(|| format!("quantity {text:?} in bytes"))?;
    if !bytes.is_finite() || bytes < 0.0 {
        bail!("quantity {text:?} is not a byte count");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::blocks;

    #[test]
    fn reads_pinned_pages_per_block() {
        assert_eq!(
            blocks("pinned 16384 pages: memory40 9000, memory41 7384").unwrap(),
            [("memory40".to_owned(), 9000), ("memory41".to_owned(), 7384)]
        );
        assert!(blocks("pinned 0 pages").is_err());
    }
}
