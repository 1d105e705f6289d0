//! Scenario 5, the incident end to end, all inside the guest: the fake API server
//! (`fake-apiserver`, tests/src/bin), the kubelet stand-in that caches capacity at
//! start-up as the real kubelet does, and `hotplug-agent run` restarting it through the
//! `command` backend. A DIMM is hot-added; the Node must converge to the new capacity with
//! exactly one restart. Everything talks over the guest's loopback; the guest has no NIC.
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use super::{
    Figures,
    session::{MIB, Session, WAIT, ensure_records},
};

pub(super) const NODE: &str = "vm-node";
pub(super) const DIR: &str = "/tmp/k";

/// The stand-in's flags; `kubelet-standin restart` takes the same ones.
pub(super) fn standin_flags() -> String {
    format!(
        "--kubeconfig {DIR}/kubeconfig --node-name {NODE} --pidfile {DIR}/kubelet.pid \
         --restarts-log {DIR}/restarts.log --repost-ms 500 \
         --cgroup-file {DIR}/cgroup/kubepods.slice/memory.max"
    )
}

pub fn incident(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    let standin_start = start_cluster(s)?;
    let refresh = format!("kubelet-standin restart {}", standin_flags());
    let ready = s.start_agent(&format!(
        "run --format json --kubeconfig {DIR}/kubeconfig --node-name {NODE} \
         --refresh command --refresh-command '{refresh}' --settle-ms 300 \
         --verify-timeout 60s --refresh-timeout 60s --kubelet-root-dir {DIR}/kubelet-root \
         --cgroup-root {DIR}/cgroup --auto-online-memory online_movable"
    ))?;
    ensure!(ready["kind"] == "agent", "unexpected first record {ready}");
    let startup =
        s.vm.records
            .wait_for(0, "the start-up reconcile", WAIT, |r| {
                r.v["kind"] == "reconcile" && r.v["episode"] == 0
            })?;
    ensure!(
        startup.v["action"] == "in_sync",
        "the stand-in just read the machine: the start-up reconcile should be in sync: {}",
        startup.v
    );
    ensure!(restarts(s)? == 1, "one start-up so far");

    let size = 256 * MIB;
    let plug = s.plug_dimm(size)?;
    let target = plug.base_memory + size;
    let verify_timeout = Duration::from_secs(90);
    let converged =
        s.vm.records
            .wait_for(plug.from, "verify converged", verify_timeout, |r| {
                r.v["kind"] == "verify" && r.v["action"] == "converged"
            })?;
    let t_converged = converged.at.saturating_duration_since(plug.record.at) + plug.latency;
    let after = converged.v["advertised_after"]["memory_bytes"].as_u64();
    ensure!(
        after == Some(target),
        "the Node should advertise {target} bytes after the refresh: {}",
        converged.v
    );

    // Nothing more should happen: one episode's worth of refresh, one restart.
    let recs =
        s.vm.records
            .settle(plug.from, Duration::from_secs(2))
            .to_vec();
    let count = |kind: &str, action: &str| recs.iter().filter(|r| r.is(kind, action)).count();
    ensure_records(
        count("refresh", "succeeded") == 1 && count("refresh", "started") <= 1,
        "exactly one refresh",
        &recs,
    )?;
    let restarts = restarts(s)?;
    ensure!(
        restarts == 2,
        "exactly one restart after the hot-add: {restarts} start-ups"
    );
    let episodes = count("episode", "settled");

    let memory = node_memory(s)?;
    ensure!(
        memory == Some(target),
        "the Node's capacity.memory should be {target} bytes, not {memory:?}"
    );
    figures.push(format!(
        "incident: stand-in up in {:.1} s; DIMM 256 MiB device_add -> Node converged (verify record) {:.2} s, {episodes} episode(s), 1 restart",
        standin_start.as_secs_f64(),
        t_converged.as_secs_f64()
    ));
    Ok(())
}

/// The fake API server, then the kubelet stand-in, which registers the Node with the
/// capacity it reads once; returns how long the stand-in took to start.
pub(super) fn start_cluster(s: &mut Session) -> anyhow::Result<Duration> {
    start_cluster_with(s, &standin_flags())
}

/// The same, with these stand-in flags.
pub(super) fn start_cluster_with(s: &mut Session, flags: &str) -> anyhow::Result<Duration> {
    let sh = &mut s.vm.shell;
    sh.check(&format!(
        "mkdir -p {DIR}/kubelet-root {DIR}/cgroup/kubepods.slice"
    ))?;
    sh.check(&format!(
        "fake-apiserver --kubeconfig {DIR}/kubeconfig >{DIR}/api.log 2>&1 &"
    ))?;
    // The kubeconfig appears (atomically) once the server listens.
    sh.check(&format!(
        "for i in $(seq 400); do [ -f {DIR}/kubeconfig ] && exit 0; sleep 0.05; done; cat {DIR}/api.log; exit 1"
    ))?;
    let started = Instant::now();
    let (rc, out) = sh.run(
        &format!("kubelet-standin restart {flags}"),
        Duration::from_secs(90),
    )?;
    ensure!(rc == 0, "the kubelet stand-in did not start ({rc}):\n{out}");
    Ok(started.elapsed())
}

/// The Node's `.status.capacity.memory` in bytes, read from the fake API in the guest.
pub(super) fn node_memory(s: &mut Session) -> anyhow::Result<Option<u64>> {
    let node = s.vm.shell.check(&format!(
        "wget -q -O - $(awk '/server:/ {{print $2}}' {DIR}/kubeconfig)/api/v1/nodes/{NODE}"
    ))?;
    let node: serde_json::Value =
        serde_json::from_str(&node).with_context(|| format!("the Node from the API: {node}"))?;
    Ok(node["status"]["capacity"]["memory"]
        .as_str()
        .and_then(quantity_bytes))
}

/// Start-ups of the stand-in: one line each in its restarts log.
pub(super) fn restarts(s: &mut Session) -> anyhow::Result<usize> {
    let log = s.vm.shell.check(&format!("cat {DIR}/restarts.log"))?;
    Ok(log.lines().filter(|l| !l.trim().is_empty()).count())
}

/// `663476Ki`, `1Gi`, `1048576` -> bytes (the stand-in writes binary suffixes only).
fn quantity_bytes(q: &str) -> Option<u64> {
    let (digits, shift) = match q {
        q if q.ends_with("Ki") => (&q[..q.len() - 2], 10),
        q if q.ends_with("Mi") => (&q[..q.len() - 2], 20),
        q if q.ends_with("Gi") => (&q[..q.len() - 2], 30),
        q if q.ends_with("Ti") => (&q[..q.len() - 2], 40),
        q => (q, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

#[cfg(test)]
mod tests {
    use super::quantity_bytes;

    #[test]
    fn reads_binary_quantities() {
        assert_eq!(quantity_bytes("663476Ki"), Some(663476 * 1024));
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("1048576"), Some(1 << 20));
        assert_eq!(quantity_bytes("1G"), None);
    }
}
