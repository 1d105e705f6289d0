//! `--static-policy update-in-place`: the kubelet's static CPU or memory manager
//! checkpoint is rewritten for the new machine (checkpoint/rewrite.rs: new CPUs join the
//! shared pool, hot-added memory joins its NUMA node, no assignment moves), then the
//! kubelet restarted once. No pod is evicted. Every step is a `reset` record; the rewrite
//! is `checkpoint_rewritten` with the sets before and after and the backup's path.
//!
//! Where the backend can stop and start the kubelet (systemd, or the command backend with
//! both commands), the kubelet is stopped first and the files re-read, so that it cannot
//! write its old state over the new file; otherwise the file is written while it runs (the
//! write refuses a file that changed since it was read) and the restart follows.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;

use super::{Controller, Next};
use crate::{
    checkpoint::{
        rewrite::Refused,
        update::{self, Inspection, Machine, Update},
    },
    node::EventType,
    record::{CheckpointChange, DecisionAction, DecisionKind},
    refresh::{self, Backend},
    sources::error_chain,
};

/// The planned rewrites, one per checkpoint that blocks a plain restart.
pub struct Planned {
    pub rewrites: Vec<Inspection>,
}

/// Looks at every checkpoint with update-in-place in mind. `Ok`: a rewrite of each file
/// the kubelet would refuse; `Err`: why not (the configured fallback applies).
pub fn plan(kubelet_root: &std::path::Path, machine: &Machine) -> Result<Planned, Refused> {
    let mut rewrites = Vec::new();
    let mut refusals = Vec::new();
    for i in update::inspect(kubelet_root, machine) {
        match &i.update {
            Update::NotNeeded if i.kubelet_accepts.is_ok() => {}
            Update::Rewrite { .. } => rewrites.push(i),
            Update::NotNeeded => refusals.push(format!(
                "{}: nothing to rewrite but the kubelet would refuse it: {}",
                i.path.display(),
                i.kubelet_accepts
                    .as_ref()
                    .err()
                    .map_or("", |e| e.0.as_str())
            )),
            Update::Refused { reason } => refusals.push(format!("{}: {reason}", i.path.display())),
        }
    }
    if refusals.is_empty() {
        Ok(Planned { rewrites })
    } else {
        Err(Refused(refusals.join("; ")))
    }
}

/// The pods holding exclusive CPUs in the CPU manager checkpoints about to be rewritten.
fn pinned_pods(rewrites: &[Inspection]) -> Vec<String> {
    let mut pods = Vec::new();
    for i in rewrites.iter().filter(|i| i.manager == "cpu") {
        if let Ok(file) = crate::checkpoint::format::parse_cpu(&i.original) {
            pods.extend(file.state.entries.into_iter().flatten().map(|(pod, _)| pod));
            pods.extend(
                file.state
                    .pod_entries
                    .into_iter()
                    .flatten()
                    .map(|(pod, _)| pod),
            );
        }
    }
    pods.sort();
    pods.dedup();
    pods
}

/// `cpuset.cpus` of every container cgroup of these pods, by path: the systemd driver's
/// `kubepods*.slice/.../kubepods-*pod<uid with _>.slice/<container>.scope` and cgroupfs's
/// `kubepods/.../pod<uid>/<container>`. What a pinned container runs on, as the kernel has
/// it; a rewrite must leave every one as it was.
pub fn container_cpusets(cgroup_root: &Path, pods: &[String]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let marks: Vec<(String, String)> = pods
        .iter()
        .map(|uid| {
            (
                format!("pod{}.slice", uid.replace('-', "_")),
                format!("pod{uid}"),
            )
        })
        .collect();
    let mut stack: Vec<(PathBuf, usize)> = ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| (cgroup_root.join(d), 0))
        .collect();
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pod = marks
                .iter()
                .any(|(slice, plain)| name.ends_with(slice) || name == *plain);
            if pod {
                for container in std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let file = container.path().join("cpuset.cpus");
                    if let Ok(cpus) = std::fs::read_to_string(&file) {
                        out.insert(file, cpus.trim().to_owned());
                    }
                }
            } else if depth < 3 {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    out
}

fn stoppable(backend: &Backend) -> bool {
    match backend {
        Backend::Systemd(_) => true,
        Backend::Command(c) => c.stop.is_some() && c.start.is_some(),
        Backend::None => false,
    }
}

impl Controller {
    /// `Ok`: the kubelet runs on the rewritten checkpoints; go on to verify.
    pub(super) async fn update_in_place(
        &mut self,
        node: &Node,
        planned: Planned,
        machine: &Machine,
    ) -> Result<(), Next> {
        let backend = self.config.backend.name();
        let stop_first = stoppable(&self.config.backend);
        let mut rewrites = planned.rewrites;
        if stop_first {
            if let Err(e) = refresh::stop(&self.config.backend).await {
                let why = format!("stopping the kubelet failed: {}", error_chain(&e));
                return Err(self.update_failed(node, why).await);
            }
            self.step(DecisionAction::KubeletStopped, backend.into())
                .await;
            // Read again: the kubelet may have written its state while it stopped.
            rewrites = match plan(&self.config.kubelet_root, machine) {
                Ok(p) => p.rewrites,
                Err(why) => {
                    let _ = refresh::start(&self.config.backend).await;
                    let why = format!("after stopping the kubelet: {why}; started it unchanged");
                    return Err(self.update_failed(node, why).await);
                }
            };
        }
        let pods = pinned_pods(&rewrites);
        let cpusets_before = container_cpusets(&self.config.cgroup_root, &pods);
        let stamp = Timestamp::now().as_second().to_string();
        let mut summaries = Vec::new();
        for i in &rewrites {
            let Update::Rewrite {
                before,
                after,
                summary,
                ..
            } = &i.update
            else {
                continue;
            };
            match update::apply(i, &stamp) {
                Ok(backup) => {
                    let change = CheckpointChange {
                        manager: i.manager.into(),
                        path: i.path.display().to_string(),
                        before: before.clone(),
                        after: after.clone(),
                        backup: backup.map(|b| b.display().to_string()).unwrap_or_default(),
                    };
                    self.decide(
                        DecisionKind::Reset,
                        DecisionAction::CheckpointRewritten,
                        |d| {
                            d.message = Some(summary.clone());
                            d.checkpoint = Some(change);
                        },
                    )
                    .await;
                    summaries.push(format!("{}: {summary}", i.path.display()));
                }
                Err(e) => {
                    if stop_first {
                        let _ = refresh::start(&self.config.backend).await;
                    }
                    let why = format!("rewriting {}: {}", i.path.display(), error_chain(&e));
                    return Err(self.update_failed(node, why).await);
                }
            }
        }
        let restarted = if stop_first {
            refresh::start(&self.config.backend).await
        } else {
            refresh::refresh(&self.config.backend).await
        };
        if let Err(e) = restarted {
            let why = format!(
                "the kubelet did not come back on the rewritten checkpoint: {}",
                error_chain(&e)
            );
            return Err(self.update_failed(node, why).await);
        }
        self.step(DecisionAction::KubeletStarted, backend.into())
            .await;
        let cpusets_after = container_cpusets(&self.config.cgroup_root, &pods);
        let moved: Vec<String> = cpusets_before
            .iter()
            .filter(|(path, cpus)| cpusets_after.get(*path) != Some(*cpus))
            .map(|(path, cpus)| {
                let now = cpusets_after.get(path).map_or("(gone)", String::as_str);
                format!("{}: {cpus} -> {now}", path.display())
            })
            .collect();
        if moved.is_empty() {
            let message = format!(
                "{} container cgroups of {} pinned pods keep their cpuset.cpus",
                cpusets_before.len(),
                pods.len()
            );
            self.step(DecisionAction::CpusetsUnchanged, message).await;
        } else {
            let why = format!("pinned containers' cpusets changed: {}", moved.join("; "));
            self.step(DecisionAction::CpusetsChanged, why.clone()).await;
            self.event(EventType::Warning, "PinnedCpusetChanged", &why)
                .await;
        }
        self.event(
            EventType::Normal,
            "KubeletCheckpointUpdated",
            &format!(
                "static-policy checkpoint updated in place, no pod evicted: {}",
                summaries.join("; ")
            ),
        )
        .await;
        Ok(())
    }

    async fn update_failed(&mut self, node: &Node, why: String) -> Next {
        self.step(DecisionAction::Failed, why.clone()).await;
        let reason = "KubeletCheckpointUpdateFailed";
        self.warn(node, reason, reason, &why).await;
        Next::Done
    }
}
