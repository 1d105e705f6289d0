//! The kubelet's CPU and memory manager checkpoints: would a restart crash-loop?
//!
//! With the `static` CPU manager or the `Static` memory manager, the kubelet checks its
//! checkpoint against the machine when it starts and refuses to start when they differ
//! (kubernetes/kubernetes#124066, #109996). After a hot-add that is exactly the case, so a
//! plain restart turns a stale node into a crash-looping one. This module repeats the
//! kubelet's start-up checks on the checkpoint files, read-only:
//! - pkg/kubelet/cm/cpumanager/policy_static.go `validateState`: an empty default set with
//!   assignments is refused; an assignment overlapping the default set is refused; the union
//!   of the default set and every assigned set must equal the online CPUs ("current set of
//!   available CPUs %q doesn't match with CPUs in state %q").
//! - pkg/kubelet/cm/memorymanager/policy_static.go `validateState`: an empty machine state
//!   is recomputed (unless assignments exist); otherwise the checkpoint's per-NUMA-node state
//!   must equal one computed from the machine ("[memorymanager] the expected machine state
//!   is different from the real one"). Of that state, hotplug changes the set of nodes and
//!   each node's `memory` total (cadvisor's per-node MemTotal): those are compared.
//!   Reserved and allocatable amounts depend on the kubelet's flags, which we cannot see.
//!
//! Formats: pkg/kubelet/cm/{cpumanager,memorymanager}/state/checkpoint.go. Newer kubelets
//! add `podEntries` and a `data` copy but keep the top-level fields, which are read here.
//! A checkpoint that cannot be read or parsed is an error, never a guess. So is a policy
//! we do not know: it is reported as unsafe.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Display,
    path::{Path, PathBuf},
};

use serde::{
    Deserialize, Serialize,
    de::{DeserializeOwned, IgnoredAny},
};

use crate::capacity::{self, CpuListError, Snapshot};

pub mod format;
#[cfg(test)]
mod published;
pub mod rewrite;
pub mod spew;
pub mod update;
pub mod view;
pub mod write;

pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";
pub const CPU_MANAGER_STATE: &str = "cpu_manager_state";
pub const MEMORY_MANAGER_STATE: &str = "memory_manager_state";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// No checkpoint, or a policy whose restart is safe ("none"/"None"), or a static
    /// checkpoint that still matches the machine.
    Safe { notes: Vec<String> },
    /// A restart would make the kubelet refuse to start (crash-loop).
    Unsafe {
        /// `"cpu"` or `"memory"`.
        manager: &'static str,
        policy: String,
        path: PathBuf,
        reason: String,
        /// Pod UIDs holding exclusive CPUs or pinned memory: the pods to evict before the
        /// checkpoint can be reset.
        pods: Vec<String>,
    },
}

impl Verdict {
    pub fn is_safe(&self) -> bool {
        matches!(self, Self::Safe { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Read(#[from] crate::files::FileError),
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("parsing {what} {value:?} in {}", path.display())]
    CpuSet {
        path: PathBuf,
        what: String,
        value: String,
        #[source]
        source: CpuListError,
    },
}

/// One verdict per checkpoint file present under `kubelet_root` (CPU, then memory), or a
/// single [`Verdict::Safe`] when there is none.
pub fn check(kubelet_root: &Path, machine: &Snapshot) -> Result<Vec<Verdict>, CheckpointError> {
    let mut verdicts = Vec::new();
    let cpu = kubelet_root.join(CPU_MANAGER_STATE);
    if let Some(bytes) = read(&cpu)? {
        verdicts.push(check_cpu(&cpu, &bytes, machine)?);
    }
    let memory = kubelet_root.join(MEMORY_MANAGER_STATE);
    if let Some(bytes) = read(&memory)? {
        verdicts.push(check_memory(&memory, &bytes, machine)?);
    }
    if verdicts.is_empty() {
        let root = kubelet_root.display();
        let notes = vec![format!("no CPU or memory manager checkpoint in {root}")];
        verdicts.push(Verdict::Safe { notes });
    }
    Ok(verdicts)
}

/// A checkpoint is a few KiB even on a machine with hundreds of CPUs and pods.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 20;

/// The checkpoint's bytes, `None` when there is none. Read without trusting the path: a
/// FIFO or a device there is refused at once (files.rs), never waited on or read forever.
fn read(path: &Path) -> Result<Option<Vec<u8>>, CheckpointError> {
    match crate::files::read_regular(path, MAX_CHECKPOINT_BYTES) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.is_missing() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn parse<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|source| CheckpointError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// What every verdict on one file repeats.
struct File<'a> {
    manager: &'static str,
    policy: &'a str,
    path: &'a Path,
    /// Sorted, without duplicates.
    pods: Vec<String>,
}

impl File<'_> {
    fn safe(&self, note: impl Display) -> Verdict {
        Verdict::Safe {
            notes: vec![format!("{}: {note}", self.path.display())],
        }
    }

    fn refused(&self, reason: impl Display, kubelet_says: &str) -> Verdict {
        self.unsafe_because(format!("{reason} (kubelet: \"{kubelet_says}\")"))
    }

    fn unknown_policy(&self) -> Verdict {
        let (manager, policy) = (self.manager, self.policy);
        self.unsafe_because(format!(
            "unknown {manager} manager policy {policy:?}: cannot tell whether the kubelet \
             would accept this checkpoint"
        ))
    }

    fn unsafe_because(&self, reason: String) -> Verdict {
        let (manager, policy, path) = (self.manager, self.policy.to_owned(), self.path.to_owned());
        Verdict::Unsafe {
            manager,
            policy,
            path,
            reason,
            pods: self.pods.clone(),
        }
    }
}

/// cpumanager/state/checkpoint.go `CPUManagerCheckpoint` (v2, kubelet >= 1.18; v3 adds
/// `podEntries`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CpuCheckpoint {
    policy_name: String,
    #[serde(default)]
    default_cpu_set: String,
    /// Pod UID -> container name -> CPU set.
    #[serde(default)]
    entries: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pod UID -> the pod's CPU set (pod-level resource managers).
    #[serde(default)]
    pod_entries: Option<BTreeMap<String, PodCpuEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodCpuEntry {
    #[serde(default)]
    cpu_set: String,
}

fn check_cpu(path: &Path, bytes: &[u8], machine: &Snapshot) -> Result<Verdict, CheckpointError> {
    let cp: CpuCheckpoint = parse(path, bytes)?;
    let cpus = |path: &Path, what: String, value: &str| {
        capacity::parse_cpu_list(value)
            .map(BTreeSet::from_iter)
            .map_err(|source| CheckpointError::CpuSet {
                path: path.to_owned(),
                what,
                value: value.to_owned(),
                source,
            })
    };
    let mut assigned = Vec::new();
    for (pod, containers) in cp.entries.iter().flatten() {
        for (container, set) in containers {
            let what = format!("the CPU set of pod {pod} container {container}");
            assigned.push((pod, container.as_str(), cpus(path, what, set)?));
        }
    }
    for (pod, entry) in cp.pod_entries.iter().flatten() {
        let set = cpus(path, format!("the CPU set of pod {pod}"), &entry.cpu_set)?;
        assigned.push((pod, "(pod)", set));
    }
    let pods = assigned
        .iter()
        .map(|(pod, ..)| (*pod).clone())
        .collect::<BTreeSet<_>>();
    let file = File {
        manager: "cpu",
        policy: &cp.policy_name,
        path,
        pods: Vec::from_iter(pods),
    };

    match cp.policy_name.as_str() {
        "none" => return Ok(file.safe("CPU manager policy none, a restart is safe")),
        "static" => {}
        _ => return Ok(file.unknown_policy()),
    }
    let default = cpus(path, "defaultCpuSet".to_owned(), &cp.default_cpu_set)?;
    if default.is_empty() {
        return Ok(if assigned.is_empty() {
            file.safe("static CPU manager with an empty state, which the kubelet initialises")
        } else {
            let reason = "empty default CPU set while pods hold CPUs";
            file.refused(reason, "default cpuset cannot be empty")
        });
    }
    if let Some((pod, container, set)) = assigned.iter().find(|(.., s)| !s.is_disjoint(&default)) {
        let (set, default) = (list(set), list(&default));
        let reason =
            format!("pod {pod} container {container} CPUs {set} overlap the default {default}");
        return Ok(file.refused(reason, "overlaps with default cpuset"));
    }
    let known = assigned.iter().fold(default, |mut known, (.., set)| {
        known.extend(set);
        known
    });
    let online = cpus(
        Path::new("/sys/devices/system/cpu/online"),
        "the online CPUs".to_owned(),
        &machine.cpus_online_list,
    )?;
    let (known, online) = (list(&known), list(&online));
    if known == online {
        return Ok(file.safe(format!(
            "static CPU manager, checkpoint CPUs {known} match the online CPUs"
        )));
    }
    // With the strict-cpu-reservation option the kubelet leaves the reserved CPUs out of
    // the state, which we cannot tell apart from a changed machine: reported as unsafe,
    // the side that never crash-loops a kubelet.
    let reason = format!("checkpoint CPUs {known} != online CPUs {online}");
    Ok(file.refused(
        reason,
        "current set of available CPUs doesn't match with CPUs in state",
    ))
}

/// memorymanager/state/checkpoint.go `MemoryManagerCheckpoint`, state.go `NUMANodeMap`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemoryCheckpoint {
    policy_name: String,
    /// NUMA node id -> its state.
    #[serde(default)]
    machine_state: Option<BTreeMap<u32, NumaNodeState>>,
    /// Pod UID -> container name -> memory blocks.
    #[serde(default)]
    entries: Option<BTreeMap<String, BTreeMap<String, IgnoredAny>>>,
    #[serde(default)]
    pod_entries: Option<BTreeMap<String, IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NumaNodeState {
    /// Resource name (`memory`, `hugepages-2Mi`, ...) -> its table.
    #[serde(default)]
    memory_map: Option<BTreeMap<String, MemoryTable>>,
}

#[derive(Deserialize)]
struct MemoryTable {
    total: u64,
}

fn check_memory(path: &Path, bytes: &[u8], machine: &Snapshot) -> Result<Verdict, CheckpointError> {
    let cp: MemoryCheckpoint = parse(path, bytes)?;
    let pods = (cp.entries.iter().flat_map(BTreeMap::keys))
        .chain(cp.pod_entries.iter().flat_map(BTreeMap::keys))
        .cloned()
        .collect::<BTreeSet<_>>();
    let file = File {
        manager: "memory",
        policy: &cp.policy_name,
        path,
        pods: Vec::from_iter(pods),
    };

    match cp.policy_name.as_str() {
        "None" => return Ok(file.safe("memory manager policy None, a restart is safe")),
        "Static" => {}
        _ => return Ok(file.unknown_policy()),
    }
    let state = cp.machine_state.unwrap_or_default();
    if state.is_empty() {
        return Ok(if file.pods.is_empty() {
            file.safe(
                "Static memory manager with an empty machine state, which the kubelet computes",
            )
        } else {
            let reason = "empty machine state while pods hold pinned memory";
            file.refused(
                reason,
                "machine state can not be empty when it has memory assignments",
            )
        });
    }
    // cadvisor reports a machine without NUMA information as one node 0 holding everything.
    let real: BTreeMap<u32, u64> = if machine.numa_nodes.is_empty() {
        BTreeMap::from([(0, machine.memory_bytes)])
    } else {
        machine
            .numa_nodes
            .iter()
            .map(|n| (n.id, n.memory_bytes))
            .collect()
    };
    let mut differences = Vec::new();
    if !state.keys().eq(real.keys()) {
        let ids = |ids: Vec<u32>| capacity::format_cpu_list(&ids);
        let (old, new) = (
            ids(state.keys().copied().collect()),
            ids(real.keys().copied().collect()),
        );
        differences.push(format!(
            "checkpoint NUMA nodes {old} != machine NUMA nodes {new}"
        ));
    }
    for (id, node) in &state {
        let Some(real) = real.get(id) else { continue };
        match node.memory_map.as_ref().and_then(|m| m.get("memory")) {
            Some(table) if table.total == *real => {}
            Some(MemoryTable { total }) => differences.push(format!(
                "NUMA node {id} memory {total} bytes in the checkpoint != {real} bytes on the machine"
            )),
            None => differences.push(format!("NUMA node {id} has no memory table in the checkpoint")),
        }
    }
    if differences.is_empty() {
        return Ok(
            file.safe("Static memory manager, NUMA nodes and their memory match the machine")
        );
    }
    let kubelet_says = "[memorymanager] the expected machine state is different from the real one";
    Ok(file.refused(differences.join("; "), kubelet_says))
}

fn list(cpus: &BTreeSet<u32>) -> String {
    capacity::format_cpu_list(&Vec::from_iter(cpus.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::NumaNode;

    const GIB: u64 = 1 << 30;

    fn machine(online: &str, nodes: &[(u32, u64)]) -> Snapshot {
        let cpus = capacity::parse_cpu_list(online)
            .expect("fixture CPU list")
            .len() as u32;
        let numa_nodes = nodes.iter().map(|&(id, memory_bytes)| NumaNode {
            id,
            cpus: vec![],
            memory_bytes,
        });
        Snapshot {
            memory_bytes: nodes.iter().map(|(_, m)| m).sum(),
            cpus_online: cpus,
            cpus_online_list: online.to_owned(),
            cpus_possible: cpus,
            memory_block_size: None,
            memory_blocks: Vec::new(),
            hugepages: Vec::new(),
            numa_nodes: numa_nodes.collect(),
        }
    }

    fn kubelet_root(cpu: Option<&str>, memory: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [(CPU_MANAGER_STATE, cpu), (MEMORY_MANAGER_STATE, memory)] {
            if let Some(text) = text {
                std::fs::write(dir.path().join(name), text).expect("writing the fixture");
            }
        }
        dir
    }

    fn one(root: &tempfile::TempDir, machine: &Snapshot) -> Verdict {
        let mut verdicts = check(root.path(), machine).expect("readable checkpoints");
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        verdicts.remove(0)
    }

    fn unsafe_reason(verdict: Verdict) -> String {
        match verdict {
            Verdict::Unsafe { reason, .. } => reason,
            safe => panic!("expected unsafe, got {safe:?}"),
        }
    }

    /// As the kubelet writes them (`json.Marshal`: one line, checksum last).
    const CPU_NONE: &str = r#"{"policyName":"none","defaultCpuSet":"","checksum":3242152201}"#;
    const CPU_STATIC: &str = r#"{"policyName":"static","defaultCpuSet":"0,3","entries":{"6b3c1e0e-4a0c-4d7e-9d2a-1f1f1f1f1f1f":{"app":"1-2"}},"checksum":1552716370}"#;
    const MEMORY_NONE: &str = r#"{"policyName":"None","machineState":{},"checksum":4236770233}"#;

    /// A Static checkpoint with one pod holding 1 GiB on node 0, 512 MiB reserved per node.
    fn memory_static(node_totals: &[(u32, u64)]) -> String {
        let node = |(id, total): &(u32, u64)| {
            let (r, a) = (GIB / 2, total - GIB / 2);
            let hugepages = r#""hugepages-2Mi":{"total":0,"systemReserved":0,"allocatable":0,"reserved":0,"free":0}"#;
            let memory = format!(
                r#""memory":{{"total":{total},"systemReserved":{r},"allocatable":{a},"reserved":{GIB},"free":{f}}}"#,
                f = a - GIB
            );
            format!(
                r#""{id}":{{"numberOfAssignments":2,"memoryMap":{{{hugepages},{memory}}},"cells":[{id}]}}"#
            )
        };
        let nodes: Vec<String> = node_totals.iter().map(node).collect();
        let entries = format!(
            r#"{{"pod-b":{{"db":[{{"numaAffinity":[0],"type":"memory","size":{GIB}}}]}}}}"#
        );
        format!(
            r#"{{"policyName":"Static","machineState":{{{}}},"entries":{entries},"checksum":1}}"#,
            nodes.join(",")
        )
    }

    #[test]
    fn no_kubelet_dir_is_safe() {
        let root = tempfile::tempdir().expect("tempdir");
        let missing = root.path().join("var/lib/kubelet");
        let verdicts = check(&missing, &machine("0-1", &[(0, 4 * GIB)])).expect("no files");
        assert!(
            matches!(verdicts.as_slice(), [Verdict::Safe { .. }]),
            "{verdicts:?}"
        );
    }

    #[test]
    fn none_policies_are_safe() {
        let root = kubelet_root(Some(CPU_NONE), Some(MEMORY_NONE));
        let verdicts = check(root.path(), &machine("0-1", &[(0, 4 * GIB)])).expect("parses");
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts.iter().all(Verdict::is_safe), "{verdicts:?}");
    }

    #[test]
    fn static_cpu_matching_the_machine_is_safe_with_a_note() {
        let root = kubelet_root(Some(CPU_STATIC), None);
        let verdict = one(&root, &machine("0-3", &[(0, 4 * GIB)]));
        let Verdict::Safe { notes } = verdict else {
            panic!("0,3 + 1-2 is 0-3: {verdict:?}")
        };
        assert!(
            notes[0].contains("checkpoint CPUs 0-3 match the online CPUs"),
            "{notes:?}"
        );
    }

    #[test]
    fn static_cpu_with_a_changed_cpu_set_is_unsafe() {
        let root = kubelet_root(Some(CPU_STATIC), None);
        let verdict = one(&root, &machine("0-1", &[(0, 4 * GIB)]));
        let Verdict::Unsafe {
            manager,
            policy,
            path,
            reason,
            pods,
        } = verdict
        else {
            panic!("two CPUs went offline: {verdict:?}")
        };
        assert_eq!((manager, policy.as_str()), ("cpu", "static"));
        assert_eq!(path, root.path().join(CPU_MANAGER_STATE));
        assert!(
            reason.starts_with("checkpoint CPUs 0-3 != online CPUs 0-1 (kubelet: "),
            "{reason}"
        );
        assert_eq!(pods, ["6b3c1e0e-4a0c-4d7e-9d2a-1f1f1f1f1f1f"]);
    }

    #[test]
    fn static_cpu_checks_follow_the_kubelets_order() {
        let m = machine("0-3", &[(0, 4 * GIB)]);
        let empty = r#"{"policyName":"static","defaultCpuSet":"","checksum":0}"#;
        assert!(
            one(&kubelet_root(Some(empty), None), &m).is_safe(),
            "the kubelet initialises it"
        );
        let overlap = r#"{"policyName":"static","defaultCpuSet":"0-3","entries":{"p":{"c":"3"}}}"#;
        let reason = unsafe_reason(one(&kubelet_root(Some(overlap), None), &m));
        assert!(
            reason.contains("CPUs 3 overlap the default 0-3"),
            "{reason}"
        );
        let unknown = r#"{"policyName":"fancy","defaultCpuSet":"0-3"}"#;
        assert!(
            !one(&kubelet_root(Some(unknown), None), &m).is_safe(),
            "never guessed safe"
        );
    }

    #[test]
    fn static_memory_matching_is_safe_and_a_changed_node_is_unsafe() {
        let root = kubelet_root(None, Some(&memory_static(&[(0, 8 * GIB), (1, 8 * GIB)])));
        assert!(one(&root, &machine("0-3", &[(0, 8 * GIB), (1, 8 * GIB)])).is_safe());

        let verdict = one(&root, &machine("0-3", &[(0, 8 * GIB), (1, 16 * GIB)]));
        let Verdict::Unsafe {
            manager,
            policy,
            reason,
            pods,
            ..
        } = verdict
        else {
            panic!("node 1 grew: {verdict:?}")
        };
        assert_eq!(
            (manager, policy.as_str(), pods.as_slice()),
            ("memory", "Static", &["pod-b".to_owned()][..])
        );
        let expected = format!(
            "NUMA node 1 memory {} bytes in the checkpoint != {} bytes on the machine",
            8 * GIB,
            16 * GIB
        );
        assert!(reason.starts_with(&expected), "{reason}");

        let reason = unsafe_reason(one(&root, &machine("0-3", &[(0, 8 * GIB)])));
        assert!(
            reason.starts_with("checkpoint NUMA nodes 0-1 != machine NUMA nodes 0"),
            "{reason}"
        );
    }

    #[test]
    fn corrupt_or_unreadable_checkpoints_are_errors() {
        let m = machine("0-3", &[]);
        let truncated = kubelet_root(
            Some(r#"{"policyName":"static","defaultCpuSet":"0-3""#),
            None,
        );
        let err = check(truncated.path(), &m).expect_err("truncated JSON");
        assert!(matches!(err, CheckpointError::Parse { .. }), "{err:?}");

        let bad_set = kubelet_root(
            Some(r#"{"policyName":"static","defaultCpuSet":"0-x"}"#),
            None,
        );
        let err = check(bad_set.path(), &m).expect_err("bad CPU set");
        assert!(matches!(err, CheckpointError::CpuSet { .. }), "{err:?}");

        let root = kubelet_root(None, None);
        std::fs::create_dir(root.path().join(MEMORY_MANAGER_STATE)).expect("mkdir");
        let err = check(root.path(), &m).expect_err("a directory");
        assert!(matches!(err, CheckpointError::Read(_)), "{err:?}");

        // A FIFO would block open(2) and the controller with it; /dev/zero would be read
        // until memory runs out. Both are refused at once.
        let root = kubelet_root(None, None);
        let fifo = root.path().join(CPU_MANAGER_STATE);
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = check(root.path(), &m).expect_err("a FIFO");
        assert!(err.to_string().contains("FIFO"), "{err}");
        let root = kubelet_root(None, None);
        std::os::unix::fs::symlink("/dev/zero", root.path().join(MEMORY_MANAGER_STATE))
            .expect("symlink");
        let err = check(root.path(), &m).expect_err("/dev/zero");
        assert!(err.to_string().contains("character device"), "{err}");
    }
}
