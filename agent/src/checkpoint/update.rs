//! Each checkpoint under the kubelet's root, against this machine now: is its checksum the
//! kubelet's, would the kubelet start on it, and what `update-in-place` would write.
//! [`inspect`] writes nothing (`hotplug-agent checkpoint`); [`apply`] writes one planned
//! rewrite (the controller, with the kubelet stopped).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    CPU_MANAGER_STATE, MAX_CHECKPOINT_BYTES, MEMORY_MANAGER_STATE,
    format::{self, Checksum, Layout},
    rewrite::{self, CpuSet, list},
    write::{self, WriteError},
};
use crate::{capacity::Snapshot, files};

/// What one file is and what would become of it.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// `cpu` or `memory`.
    pub manager: &'static str,
    pub path: PathBuf,
    /// `None` when the file could not be parsed.
    pub policy: Option<String>,
    pub layout: Option<Layout>,
    pub checksum: Option<Checksum>,
    /// Whether the kubelet would start on this file on this machine now; if not, why, in
    /// the kubelet's words where it has them.
    pub kubelet_accepts: Result<(), rewrite::KubeletRefuses>,
    pub update: Update,
    #[serde(skip)]
    pub original: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Update {
    /// The kubelet accepts it as it is (or does not check it).
    NotNeeded,
    Rewrite {
        /// The sets or totals that change, before and after.
        before: String,
        after: String,
        /// One sentence: what changes and why.
        summary: String,
        #[serde(skip)]
        contents: Vec<u8>,
    },
    /// Not rewritten: fall back to the configured policy.
    Refused { reason: String },
}

/// The machine as the kubelet sees it at start-up.
pub struct Machine {
    pub online: CpuSet,
    /// NUMA node -> memory bytes (cadvisor: one node 0 without NUMA information).
    pub nodes: BTreeMap<i64, u64>,
    /// The kubelet's reserved CPUs, where known (`reservedSystemCPUs`).
    pub reserved: CpuSet,
}

impl Machine {
    pub fn new(snapshot: &Snapshot, reserved: CpuSet) -> Self {
        let online = crate::capacity::parse_cpu_list(&snapshot.cpus_online_list)
            .map(CpuSet::from_iter)
            .unwrap_or_default();
        let nodes = if snapshot.numa_nodes.is_empty() {
            BTreeMap::from([(0, snapshot.memory_bytes)])
        } else {
            (snapshot.numa_nodes.iter())
                .map(|n| (i64::from(n.id), n.memory_bytes))
                .collect()
        };
        Self {
            online,
            nodes,
            reserved,
        }
    }
}

/// Every checkpoint present, CPU first. A file that cannot be read at all is reported
/// with the reason, never skipped.
pub fn inspect(kubelet_root: &Path, machine: &Machine) -> Vec<Inspection> {
    let mut out = Vec::new();
    for (manager, name) in [("cpu", CPU_MANAGER_STATE), ("memory", MEMORY_MANAGER_STATE)] {
        let path = kubelet_root.join(name);
        let symlink = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        let bytes = match files::read_regular(&path, MAX_CHECKPOINT_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if e.is_missing() => continue,
            Err(e) => {
                out.push(unreadable(manager, path, crate::sources::error_chain(&e)));
                continue;
            }
        };
        let mut inspection = match manager {
            "cpu" => inspect_cpu(path, bytes, machine),
            _ => inspect_memory(path, bytes, machine),
        };
        if symlink && matches!(inspection.update, Update::Rewrite { .. }) {
            inspection.update = Update::Refused {
                reason: format!("{} is a symlink", inspection.path.display()),
            };
        }
        out.push(inspection);
    }
    out
}

fn unreadable(manager: &'static str, path: PathBuf, why: String) -> Inspection {
    Inspection {
        manager,
        path,
        policy: None,
        layout: None,
        checksum: None,
        kubelet_accepts: Err(why.clone().into()),
        update: Update::Refused { reason: why },
        original: Vec::new(),
    }
}

const CORRUPT: &str = "checkpoint is corrupted";

fn inspect_cpu(path: PathBuf, bytes: Vec<u8>, machine: &Machine) -> Inspection {
    let file = match format::parse_cpu(&bytes) {
        Ok(file) => file,
        Err(e) => return unreadable("cpu", path, format!("{e}")),
    };
    let update = match rewrite::plan_cpu(&file, &machine.online, &machine.reserved) {
        Ok(None) => Update::NotNeeded,
        Ok(Some(plan)) => Update::Rewrite {
            before: plan.before.default_cpu_set.clone(),
            after: plan.after.default_cpu_set.clone(),
            summary: cpu_summary(&plan),
            contents: format::write_cpu(&file, &plan.after),
        },
        Err(refused) => Update::Refused { reason: refused.0 },
    };
    let policy = &file.state.policy_name;
    let validate = || rewrite::validate_cpu(&file.state, &machine.online, &machine.reserved);
    let accepts = kubelet_accepts(&file, policy == "static", validate);
    inspection("cpu", path, bytes, &file, policy, accepts, update)
}

/// What the kubelet says of the file as it is: a wrong checksum first, then the static
/// policy's own start-up checks.
fn kubelet_accepts<S>(
    file: &format::File<S>,
    is_static: bool,
    validate: impl FnOnce() -> Result<(), rewrite::KubeletRefuses>,
) -> Result<(), rewrite::KubeletRefuses> {
    if !file.checksum.valid {
        Err(CORRUPT.into())
    } else if is_static {
        validate()
    } else {
        Ok(())
    }
}

fn inspection<S>(
    manager: &'static str,
    path: PathBuf,
    original: Vec<u8>,
    file: &format::File<S>,
    policy: &str,
    kubelet_accepts: Result<(), rewrite::KubeletRefuses>,
    update: Update,
) -> Inspection {
    Inspection {
        manager,
        path,
        policy: Some(policy.to_owned()),
        layout: Some(file.layout),
        checksum: Some(file.checksum.clone()),
        kubelet_accepts,
        update,
        original,
    }
}

fn cpu_summary(plan: &rewrite::CpuPlan) -> String {
    let mut parts = Vec::new();
    if !plan.added.is_empty() {
        parts.push(format!("CPUs {} join the shared pool", list(&plan.added)));
    }
    if !plan.removed.is_empty() {
        parts.push(format!(
            "CPUs {} leave the shared pool",
            list(&plan.removed)
        ));
    }
    format!(
        "{}; defaultCpuSet {} -> {}; exclusive assignments unchanged",
        parts.join(", "),
        plan.before.default_cpu_set,
        plan.after.default_cpu_set
    )
}

fn inspect_memory(path: PathBuf, bytes: Vec<u8>, machine: &Machine) -> Inspection {
    let file = match format::parse_memory(&bytes) {
        Ok(file) => file,
        Err(e) => return unreadable("memory", path, format!("{e}")),
    };
    let update = match rewrite::plan_memory(&file, &machine.nodes) {
        Ok(None) => Update::NotNeeded,
        Ok(Some(plan)) => {
            let show = |f: fn(&rewrite::NodeChange) -> u64| {
                (plan.changes.iter())
                    .map(|c| format!("node{}={}", c.node, f(c)))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let (before, after) = (show(|c| c.before.total), show(|c| c.after.total));
            Update::Rewrite {
                summary: format!(
                    "NUMA memory totals {before} -> {after} bytes (free grows or shrinks by \
                     the same amount); reservations and assignments unchanged"
                ),
                before,
                after,
                contents: format::write_memory(&file, &plan.after),
            }
        }
        Err(refused) => Update::Refused { reason: refused.0 },
    };
    let policy = &file.state.policy_name;
    let validate = || rewrite::validate_memory(&file.state, &machine.nodes);
    let accepts = kubelet_accepts(&file, policy == "Static", validate);
    inspection("memory", path, bytes, &file, policy, accepts, update)
}

/// Writes a planned rewrite. The file must still be what was inspected.
pub fn apply(inspection: &Inspection, stamp: &str) -> Result<Option<PathBuf>, WriteError> {
    match &inspection.update {
        Update::Rewrite { contents, .. } => {
            write::replace(&inspection.path, &inspection.original, contents, stamp).map(Some)
        }
        _ => Ok(None),
    }
}

/// `reservedSystemCPUs` of the kubelet's config file (`<root>/config.yaml`, a top-level
/// scalar), the CPUs the static policy keeps in the shared pool and never hands out.
/// Empty when absent: then no CPU counts as reserved.
pub fn reserved_cpus(kubelet_root: &Path) -> CpuSet {
    let Ok(text) = files::read_regular_text(&kubelet_root.join("config.yaml"), 1 << 20) else {
        return CpuSet::new();
    };
    text.lines()
        .find_map(|l| l.strip_prefix("reservedSystemCPUs:"))
        .map(|v| v.trim().trim_matches(['"', '\'']))
        .and_then(|v| crate::capacity::parse_cpu_list(v).ok())
        .map(CpuSet::from_iter)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(online: &str) -> Machine {
        Machine {
            online: crate::capacity::parse_cpu_list(online)
                .expect("list")
                .into_iter()
                .collect(),
            nodes: BTreeMap::from([(0, 8 << 30)]),
            reserved: CpuSet::new(),
        }
    }

    const STATIC: &str = r#"{"policyName":"static","defaultCpuSet":"0,3","entries":{"pod-a":{"app":"1-2"}},"checksum":0}"#;

    #[test]
    fn a_dry_run_says_what_it_would_write_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CPU_MANAGER_STATE);
        std::fs::write(&path, STATIC).expect("fixture");
        let [one] = inspect(dir.path(), &machine("0-4"))
            .try_into()
            .expect("one file");
        let accepts = one.kubelet_accepts.clone().expect_err("4 is new");
        assert!(
            accepts.0.contains(
                "current set of available CPUs \"0-4\" doesn't match with CPUs in state \"0-3\""
            ),
            "{accepts}"
        );
        let Update::Rewrite { before, after, .. } = &one.update else {
            panic!("{:?}", one.update)
        };
        assert_eq!((before.as_str(), after.as_str()), ("0,3", "0,3-4"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), STATIC);

        let backup = apply(&one, "42").expect("written").expect("a backup");
        assert_eq!(std::fs::read_to_string(&backup).expect("backup"), STATIC);
        let [again] = inspect(dir.path(), &machine("0-4"))
            .try_into()
            .expect("one");
        assert_eq!(again.kubelet_accepts, Ok(()));
        assert!(
            matches!(again.update, Update::NotNeeded),
            "{:?}",
            again.update
        );
    }

    #[test]
    fn a_symlinked_or_garbled_checkpoint_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("real"), STATIC).expect("fixture");
        std::os::unix::fs::symlink("real", dir.path().join(CPU_MANAGER_STATE)).expect("ln");
        std::fs::write(dir.path().join(MEMORY_MANAGER_STATE), "{\"policyName\":").expect("w");
        let found = inspect(dir.path(), &machine("0-4"));
        assert_eq!(found.len(), 2);
        assert!(
            matches!(&found[0].update, Update::Refused { reason } if reason.contains("symlink")),
            "{:?}",
            found[0].update
        );
        assert!(matches!(&found[1].update, Update::Refused { .. }));
        assert!(found[1].kubelet_accepts.is_err());
    }

    #[test]
    fn reserved_cpus_come_from_the_kubelet_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(reserved_cpus(dir.path()).is_empty());
        std::fs::write(
            dir.path().join("config.yaml"),
            "kind: KubeletConfiguration\nreservedSystemCPUs: \"0,2\"\n",
        )
        .expect("fixture");
        assert_eq!(reserved_cpus(dir.path()), CpuSet::from([0, 2]));
    }
}
