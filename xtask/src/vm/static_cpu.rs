//! Scenario: a static CPU manager node takes a hot-added CPU into its shared pool with one
//! kubelet restart and no eviction (`--static-policy update-in-place`), all inside the
//! guest: the fake API server, the kubelet stand-in validating `cpu_manager_state` at each
//! start as the kubelet's static policy does (`--kubelet-root-dir`), and a pinned
//! "container": a process bound to CPU 1 (`taskset`) with its container cgroup's
//! `cpuset.cpus`, which must both be unchanged after the rewrite.
use std::time::Duration;

use anyhow::ensure;

use super::{
    Figures,
    incident::{DIR, NODE, restarts, standin_flags, start_cluster_with},
    session::{Session, WAIT, ensure_records},
};

const CHECKPOINT: &str = "/tmp/k/kubelet-root/cpu_manager_state";
const SCOPE: &str = "/tmp/k/cgroup/kubepods.slice/kubepods-podpod_p.slice/cri-containerd-p.scope";

fn flags() -> String {
    format!("{} --kubelet-root-dir {DIR}/kubelet-root", standin_flags())
}

pub fn static_cpu_hot_add(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    let sh = &mut s.vm.shell;
    sh.check(&format!("mkdir -p {DIR}/kubelet-root {SCOPE}"))?;
    // The kubelet's checkpoint on the one-CPU guest, as it writes it at first start.
    sh.check(&format!(
        r#"echo '{{"policyName":"static","defaultCpuSet":"0","checksum":0}}' >{CHECKPOINT}"#
    ))?;
    start_cluster_with(s, &flags())?;
    let refresh = format!("kubelet-standin restart {}", flags());
    s.start_agent(&format!(
        "run --format json --kubeconfig {DIR}/kubeconfig --node-name {NODE} \
         --refresh command --refresh-command '{refresh}' --settle-ms 300 \
         --verify-timeout 60s --refresh-timeout 60s --kubelet-root-dir {DIR}/kubelet-root \
         --cgroup-root {DIR}/cgroup --auto-online-cpus on --static-policy update-in-place"
    ))?;
    s.vm.records
        .wait_for(0, "the start-up reconcile", WAIT, |r| {
            r.v["kind"] == "reconcile" && r.v["episode"] == 0
        })?;

    // First CPU: the shared pool grows to 0-1.
    let first = s.plug_cpu()?;
    s.vm.records
        .wait_for(first.from, "first rewrite", WAIT, |r| {
            r.is("reset", "checkpoint_rewritten") && r.v["checkpoint"]["after"] == "0-1"
        })?;
    s.vm.records.wait_for(
        first.from,
        "verify converged",
        Duration::from_secs(90),
        |r| r.is("verify", "converged"),
    )?;

    // The kubelet admits a Guaranteed pod and gives it CPU 1 exclusively: it writes the
    // checkpoint, and the container runs bound to CPU 1.
    let sh = &mut s.vm.shell;
    sh.check(&format!(
        r#"echo '{{"policyName":"static","defaultCpuSet":"0","entries":{{"pod-p":{{"app":"1"}}}},"checksum":0}}' >{CHECKPOINT}"#
    ))?;
    sh.check(&format!("echo 1 >{SCOPE}/cpuset.cpus"))?;
    sh.check("taskset -c 1 sleep 100000 & echo $! >/tmp/pinned.pid")?;
    let affinity = |sh: &mut super::guest::Shell| {
        sh.check("grep Cpus_allowed_list /proc/$(cat /tmp/pinned.pid)/status")
            .map(|s| s.trim().to_owned())
    };
    let before = affinity(sh)?;
    ensure!(
        before.ends_with("\t1") || before.ends_with(" 1"),
        "pinned to CPU 1: {before}"
    );

    let second = s.plug_cpu()?;
    let rewritten =
        s.vm.records
            .wait_for(second.from, "second rewrite", WAIT, |r| {
                r.is("reset", "checkpoint_rewritten")
            })?;
    ensure!(
        rewritten.v["checkpoint"]["before"] == "0" && rewritten.v["checkpoint"]["after"] == "0,2",
        "CPU 2 joins the shared pool, CPU 1 stays with the pod: {}",
        rewritten.v
    );
    let converged = s.vm.records.wait_for(
        second.from,
        "verify converged",
        Duration::from_secs(90),
        |r| r.is("verify", "converged"),
    )?;
    let to_node = converged.at.saturating_duration_since(second.record.at) + second.latency;
    let recs =
        s.vm.records
            .settle(second.from, Duration::from_secs(2))
            .to_vec();
    ensure_records(
        recs.iter().any(|r| {
            r.is("reset", "cpusets_unchanged")
                && r.v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("1 container cgroups of 1 pinned pods"))
        }),
        "the pinned container's cpuset.cpus checked and unchanged",
        &recs,
    )?;
    ensure_records(
        !recs
            .iter()
            .any(|r| r.is("reset", "evicted") || r.is("refresh", "skipped")),
        "no eviction, no refusal",
        &recs,
    )?;
    let sh = &mut s.vm.shell;
    let after = affinity(sh)?;
    ensure!(
        after == before,
        "the pinned process's CPUs moved: {before} -> {after}"
    );
    let cpuset = sh.check(&format!("cat {SCOPE}/cpuset.cpus"))?;
    ensure!(
        cpuset.trim() == "1",
        "the container's cpuset.cpus changed: {cpuset}"
    );
    let accepted = sh.check(&format!(
        "grep -c 'accepted: policy static' {DIR}/kubelet.pid.log"
    ))?;
    let restarts = restarts(s)?;
    ensure!(
        restarts == 3,
        "start-up + one restart per hot-added CPU: {restarts} start-ups"
    );
    figures.push(format!(
        "static CPU manager: vCPU device_add -> checkpoint rewritten, stand-in restarted on it \
         ({} acceptances), Node advertising {} CPUs (verify record) {:.2} s; pinned CPU 1 untouched",
        accepted.trim(),
        second.base_cpus + 1,
        to_node.as_secs_f64()
    ));
    Ok(())
}
