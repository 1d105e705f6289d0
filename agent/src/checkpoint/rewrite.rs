//! `--static-policy update-in-place`: what the checkpoint must say after a hotplug for the
//! kubelet to start on it, with no assignment moved (KEP-3953's draft rule: new CPUs join
//! the shared pool; exclusive and reserved CPUs are never touched).
//!
//! Pure functions of a parsed file and the machine. Each plan is checked with
//! [`validate_cpu`] / [`validate_memory`] — the kubelet's start-up `validateState` — before
//! it is offered; a state those would refuse is never written. Anything this cannot do
//! safely is a [`Refused`] with the reason, and the controller falls back to the configured
//! policy.
use std::collections::{BTreeMap, BTreeSet};

use super::format::{
    CpuFile, CpuState, Layout, MemoryFile, MemoryState, MemoryTable, NumaNodeState,
};
use crate::capacity;

/// Why a checkpoint is not rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Why the kubelet would refuse a checkpoint at start-up, in its own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{0}")]
#[serde(transparent)]
pub struct KubeletRefuses(pub String);

impl From<Refused> for KubeletRefuses {
    fn from(r: Refused) -> Self {
        Self(r.0)
    }
}

impl From<String> for KubeletRefuses {
    fn from(why: String) -> Self {
        Self(why)
    }
}

impl From<&str> for KubeletRefuses {
    fn from(why: &str) -> Self {
        Self(why.to_owned())
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(why.into()))
}

pub type CpuSet = BTreeSet<u32>;

fn cpus(what: &str, list: &str) -> Result<CpuSet, Refused> {
    capacity::parse_cpu_list(list)
        .map(CpuSet::from_iter)
        .map_err(|e| Refused(format!("{what} {list:?} is not a CPU list: {e}")))
}

pub fn list(set: &CpuSet) -> String {
    capacity::format_cpu_list(&Vec::from_iter(set.iter().copied()))
}

/// What a rewrite changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuPlan {
    pub before: CpuState,
    pub after: CpuState,
    pub added: CpuSet,
    pub removed: CpuSet,
}

/// Every exclusive assignment: (pod, container or `(pod)`, its CPUs).
fn assignments(state: &CpuState) -> Result<Vec<(String, String, CpuSet)>, Refused> {
    let mut out = Vec::new();
    for (pod, containers) in state.entries.iter().flatten() {
        for (container, set) in containers {
            let what = format!("pod {pod} container {container} CPU set");
            out.push((pod.clone(), container.clone(), cpus(&what, set)?));
        }
    }
    for (pod, set) in state.pod_entries.iter().flatten() {
        let what = format!("pod {pod} CPU set");
        out.push((pod.clone(), "(pod)".into(), cpus(&what, set)?));
    }
    Ok(out)
}

/// pkg/kubelet/cm/cpumanager/policy_static.go `validateState`, in its order and wording,
/// for a kubelet whose `--reserved-cpus` are `reserved` (without strict-cpu-reservation).
pub fn validate_cpu(
    state: &CpuState,
    online: &CpuSet,
    reserved: &CpuSet,
) -> Result<(), KubeletRefuses> {
    let assigned = assignments(state)?;
    let default = cpus("defaultCpuSet", &state.default_cpu_set)?;
    if default.is_empty() {
        if !assigned.is_empty() {
            return Err(KubeletRefuses::from("default cpuset cannot be empty"));
        }
        return Ok(());
    }
    if !reserved.is_subset(&default) {
        return Err(KubeletRefuses::from(format!(
            "not all reserved cpus: \"{}\" are present in defaultCpuSet: \"{}\"",
            list(reserved),
            list(&default)
        )));
    }
    for (pod, container, set) in &assigned {
        if !set.is_disjoint(&default) {
            return Err(KubeletRefuses::from(format!(
                "pod: {pod}, container: {container} cpuset: \"{}\" overlaps with default cpuset \"{}\"",
                list(set),
                list(&default)
            )));
        }
    }
    let known = assigned
        .iter()
        .fold(default, |known, (.., set)| &known | set);
    if &known != online {
        return Err(KubeletRefuses::from(format!(
            "current set of available CPUs \"{}\" doesn't match with CPUs in state \"{}\"",
            list(online),
            list(&known)
        )));
    }
    Ok(())
}

/// Faults that rule out any rewrite, whichever manager.
fn check_file(checksum: &super::format::Checksum, unknown: &[String]) -> Result<(), Refused> {
    if !checksum.valid {
        return refuse(format!(
            "checksum {} is not the {} the kubelet computes: the kubelet would call it corrupt",
            checksum.stored, checksum.computed
        ));
    }
    if !unknown.is_empty() {
        return refuse(format!(
            "fields this agent does not know ({}): a rewrite would lose them",
            unknown.join(", ")
        ));
    }
    Ok(())
}

/// `Ok(None)`: nothing to change (the kubelet accepts the file as it is, or does not check
/// it). `Ok(Some)`: the rewrite, already validated against `online`.
pub fn plan_cpu(
    file: &CpuFile,
    online: &CpuSet,
    reserved: &CpuSet,
) -> Result<Option<CpuPlan>, Refused> {
    let state = &file.state;
    match state.policy_name.as_str() {
        "none" => return Ok(None),
        "static" => {}
        other => return refuse(format!("unknown CPU manager policy {other:?}")),
    }
    check_file(&file.checksum, &file.unknown_fields)?;
    if file.layout == Layout::V1 {
        return refuse("a v1 CPU manager checkpoint (kubelet before 1.18) is not rewritten");
    }
    let assigned = assignments(state)?;
    let default = cpus("defaultCpuSet", &state.default_cpu_set)?;
    if default.is_empty() && assigned.is_empty() {
        return Ok(None);
    }
    if let Err(why) = validate_cpu(state, &known_cpus(&default, &assigned), reserved) {
        return refuse(format!("the checkpoint is inconsistent already: {why}"));
    }
    let known = known_cpus(&default, &assigned);
    let added: CpuSet = online - &known;
    let removed: CpuSet = &known - online;
    if added.is_empty() && removed.is_empty() {
        return Ok(None);
    }
    for (pod, container, set) in &assigned {
        let gone: CpuSet = set & &removed;
        if !gone.is_empty() {
            return refuse(format!(
                "CPUs {} went away but are exclusively assigned to pod {pod} container {container}",
                list(&gone)
            ));
        }
    }
    let gone: CpuSet = reserved & &removed;
    if !gone.is_empty() {
        return refuse(format!("CPUs {} went away but are reserved", list(&gone)));
    }
    let new_default: CpuSet = &(&default | &added) - &removed;
    let after = CpuState {
        default_cpu_set: list(&new_default),
        ..state.clone()
    };
    if let Err(why) = validate_cpu(&after, online, reserved) {
        return refuse(format!("the rewrite would not validate: {why}"));
    }
    Ok(Some(CpuPlan {
        before: state.clone(),
        after,
        added,
        removed,
    }))
}

fn known_cpus(default: &CpuSet, assigned: &[(String, String, CpuSet)]) -> CpuSet {
    assigned
        .iter()
        .fold(default.clone(), |known, (.., set)| &known | set)
}

// ---- Memory manager -------------------------------------------------------------------

/// A node's `memory` table before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeChange {
    pub node: i64,
    pub before: MemoryTable,
    pub after: MemoryTable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    pub before: MemoryState,
    pub after: MemoryState,
    pub changes: Vec<NodeChange>,
}

/// `machine`: NUMA node -> its memory in bytes, as cadvisor reports it (node meminfo).
pub fn plan_memory(
    file: &MemoryFile,
    machine: &BTreeMap<i64, u64>,
) -> Result<Option<MemoryPlan>, Refused> {
    let state = &file.state;
    match state.policy_name.as_str() {
        "None" => return Ok(None),
        "Static" => {}
        other => return refuse(format!("unknown memory manager policy {other:?}")),
    }
    check_file(&file.checksum, &file.unknown_fields)?;
    let nodes = state.machine_state.clone().unwrap_or_default();
    let has_assignments = state.entries.as_ref().is_some_and(|e| !e.is_empty());
    if nodes.is_empty() {
        return if has_assignments {
            refuse("machine state can not be empty when it has memory assignments")
        } else {
            Ok(None)
        };
    }
    if state.pod_entries.as_ref().is_some_and(|p| !p.is_empty()) {
        return refuse("pod-level memory assignments are not rewritten");
    }
    if !nodes.keys().eq(machine.keys()) {
        let ids = |ids: Vec<i64>| {
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        return refuse(format!(
            "NUMA nodes {} in the checkpoint, {} on the machine: a node appeared or went away",
            ids(nodes.keys().copied().collect()),
            ids(machine.keys().copied().collect())
        ));
    }
    let mut after_nodes = nodes.clone();
    let mut changes = Vec::new();
    for (id, node) in after_nodes.iter_mut() {
        let Some(table) = node
            .as_mut()
            .and_then(|n| n.memory_map.as_mut())
            .and_then(|m| m.get_mut("memory"))
            .and_then(Option::as_mut)
        else {
            return refuse(format!("NUMA node {id} has no memory table"));
        };
        let total = machine[id];
        if table.total == total {
            continue;
        }
        let before = *table;
        let Some(allocatable) = total.checked_sub(table.system_reserved) else {
            return refuse(format!(
                "NUMA node {id}: {total} bytes is less than its system-reserved {}",
                table.system_reserved
            ));
        };
        let Some(free) = allocatable.checked_sub(table.reserved) else {
            return refuse(format!(
                "NUMA node {id}: {total} bytes no longer covers the {} bytes pinned there",
                table.reserved
            ));
        };
        *table = MemoryTable {
            total,
            allocatable,
            free,
            ..before
        };
        changes.push(NodeChange {
            node: *id,
            before,
            after: *table,
        });
    }
    if changes.is_empty() {
        return Ok(None);
    }
    let after = MemoryState {
        machine_state: Some(after_nodes),
        ..state.clone()
    };
    if let Err(why) = validate_memory(&after, machine) {
        return refuse(format!(
            "the kubelet would compute a different state from the rewrite ({why}): \
             assignments that span NUMA nodes are not moved"
        ));
    }
    Ok(Some(MemoryPlan {
        before: state.clone(),
        after,
        changes,
    }))
}

/// pkg/kubelet/cm/memorymanager/policy_static.go `validateState`: the machine state the
/// kubelet computes must equal the checkpoint's ("areMachineStatesEqual").
pub fn validate_memory(
    state: &MemoryState,
    machine: &BTreeMap<i64, u64>,
) -> Result<(), KubeletRefuses> {
    const DIFFERENT: &str =
        "[memorymanager] the expected machine state is different from the real one";
    let Some(nodes) = state.machine_state.as_ref().filter(|n| !n.is_empty()) else {
        if state.entries.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err(KubeletRefuses::from(
                "[memorymanager] machine state can not be empty when it has memory assignments",
            ));
        }
        return Ok(());
    };
    let expected = kubelet_machine_state(nodes, machine, state)?;
    if nodes.len() != expected.len() {
        return Err(KubeletRefuses::from(DIFFERENT));
    }
    for (id, want) in &expected {
        let Some(Some(node)) = nodes.get(id) else {
            return Err(KubeletRefuses::from(DIFFERENT));
        };
        let cells = |n: &NumaNodeState| BTreeSet::from_iter(n.cells.iter().flatten().copied());
        let tables = |n: &NumaNodeState| -> BTreeMap<String, Option<MemoryTable>> {
            n.memory_map.clone().unwrap_or_default()
        };
        if node.number_of_assignments != want.number_of_assignments
            || cells(node) != cells(want)
            || tables(node) != tables(want)
        {
            return Err(KubeletRefuses::from(DIFFERENT));
        }
    }
    Ok(())
}

/// What the kubelet computes at start-up: its `getDefaultMachineState` (the memory totals
/// from `machine`; system-reserved amounts and hugepage totals, which come from its flags
/// and hugetlbfs, as the checkpoint `template` has them), then every assignment replayed
/// the way `validateState` does.
pub(crate) fn kubelet_machine_state(
    template: &BTreeMap<i64, Option<NumaNodeState>>,
    machine: &BTreeMap<i64, u64>,
    state: &MemoryState,
) -> Result<BTreeMap<i64, NumaNodeState>, String> {
    const DIFFERENT: &str =
        "[memorymanager] the expected machine state is different from the real one";
    let mut expected = BTreeMap::new();
    for (id, total) in machine {
        let Some(Some(node)) = template.get(id) else {
            return Err(DIFFERENT.into());
        };
        let mut tables = BTreeMap::new();
        for (kind, table) in node.memory_map.iter().flatten() {
            let Some(table) = table else {
                return Err(DIFFERENT.into());
            };
            let total = if kind == "memory" {
                *total
            } else {
                table.total
            };
            let allocatable = total.saturating_sub(table.system_reserved);
            let table = MemoryTable {
                total,
                system_reserved: table.system_reserved,
                allocatable,
                reserved: 0,
                free: allocatable,
            };
            tables.insert(kind.clone(), Some(table));
        }
        let node = NumaNodeState {
            number_of_assignments: 0,
            memory_map: Some(tables),
            cells: Some(vec![*id]),
        };
        expected.insert(*id, node);
    }
    for (pod, containers) in state.entries.iter().flatten() {
        for (container, blocks) in containers.iter().flatten() {
            for block in blocks.iter().flatten() {
                let mut requested = block.size;
                let affinity = block.numa_affinity.clone().unwrap_or_default();
                for id in &affinity {
                    let Some(node) = expected.get_mut(id) else {
                        return Err(format!(
                            "[memorymanager] (pod: {pod}, container: {container}) the memory assignment uses the NUMA that does not exist"
                        ));
                    };
                    node.number_of_assignments += 1;
                    node.cells = Some(affinity.clone());
                    let Some(Some(table)) = node
                        .memory_map
                        .as_mut()
                        .and_then(|m| m.get_mut(&block.kind))
                    else {
                        return Err(format!(
                            "[memorymanager] (pod: {pod}, container: {container}) the memory assignment uses memory resource that does not exist"
                        ));
                    };
                    if requested == 0 {
                        break;
                    }
                    if table.free == 0 {
                        continue;
                    }
                    if table.free >= requested {
                        table.reserved += requested;
                        table.free -= requested;
                        requested = 0;
                        continue;
                    }
                    requested -= table.free;
                    table.reserved += table.free;
                    table.free = 0;
                }
            }
        }
    }
    Ok(expected)
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
