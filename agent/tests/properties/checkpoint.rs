//! The kubelet's CPU and memory manager checkpoints (`checkpoint::check`), written to a
//! kubelet root and checked against a machine.
use std::{collections::BTreeSet, fs};

use hotplug_agent::{
    capacity::{self, NumaNode, Snapshot},
    checkpoint::{self, CPU_MANAGER_STATE, MEMORY_MANAGER_STATE, Verdict},
    sources::error_chain,
};
use proptest::{collection::vec, prelude::*, sample::select};
use serde_json::json;

use crate::{check, ensure};

fn machine(online: &BTreeSet<u32>, nodes: &[(u32, u64)]) -> Snapshot {
    let ids = Vec::from_iter(online.iter().copied());
    Snapshot {
        memory_bytes: nodes.iter().map(|n| n.1).sum(),
        cpus_online: ids.len() as u32,
        cpus_online_list: capacity::format_cpu_list(&ids),
        cpus_possible: 0,
        memory_block_size: None,
        memory_blocks: Vec::new(),
        hugepages: Vec::new(),
        numa_nodes: nodes
            .iter()
            .map(|&(id, memory_bytes)| NumaNode {
                id,
                cpus: Vec::new(),
                memory_bytes,
            })
            .collect(),
    }
}

fn list(set: &BTreeSet<u32>) -> String {
    capacity::format_cpu_list(&Vec::from_iter(set.iter().copied()))
}

/// A static CPU manager checkpoint that splits `online` into the default set and pods'
/// exclusive sets, as the kubelet writes it; `extra`/`missing` CPUs make it stale.
#[derive(Clone, Debug)]
struct CpuModel {
    online: BTreeSet<u32>,
    /// For each online CPU (in order): 0 = default set, n = pod n.
    owner: Vec<u8>,
    extra: Option<u32>,
    missing: bool,
    /// v3 `podEntries` as well.
    pod_level: bool,
}

fn cpu_model() -> impl Strategy<Value = CpuModel> {
    vec(0u32..256, 1..40)
        .prop_flat_map(|ids| {
            let online = BTreeSet::from_iter(ids);
            let n = online.len();
            (
                Just(online),
                vec(0u8..4, n),
                proptest::option::of(256u32..300),
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_map(|(online, owner, extra, missing, pod_level)| CpuModel {
            online,
            owner,
            extra,
            missing,
            pod_level,
        })
}

impl CpuModel {
    /// The checkpoint, and whether the kubelet would start with it.
    fn checkpoint(&self) -> (serde_json::Value, bool) {
        let mut default = BTreeSet::new();
        let mut pods: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); 3];
        for (&cpu, &o) in self.online.iter().zip(&self.owner) {
            match o {
                0 => default.insert(cpu),
                n => pods[usize::from(n) - 1].insert(cpu),
            };
        }
        let mut stale = false;
        if let Some(extra) = self.extra {
            default.insert(extra);
            stale = true;
        }
        if let Some(&first) = default.iter().next().filter(|_| self.missing) {
            default.remove(&first);
            stale = true;
        }
        let assigned = pods.iter().any(|p| !p.is_empty());
        let ok = if default.is_empty() {
            !assigned
        } else {
            !stale
        };
        let mut entries = serde_json::Map::new();
        let mut pod_entries = serde_json::Map::new();
        for (i, set) in pods.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
            if self.pod_level && i == 2 {
                pod_entries.insert(format!("pod-{i}"), json!({ "cpuSet": list(set) }));
            } else {
                entries.insert(format!("pod-{i}"), json!({ "app": list(set) }));
            }
        }
        let cp = json!({
            "policyName": "static",
            "defaultCpuSet": list(&default),
            "entries": entries,
            "podEntries": pod_entries,
            "checksum": 1,
        });
        (cp, ok)
    }
}

#[test]
fn static_cpu_checkpoints_are_judged_as_the_kubelet_would() {
    check("checkpoint_cpu_model", 500, cpu_model(), |m| {
        let (cp, ok) = m.checkpoint();
        let root = crate::scratch();
        fs::write(root.path().join(CPU_MANAGER_STATE), cp.to_string()).expect("write");
        let verdicts = checkpoint::check(root.path(), &machine(&m.online, &[(0, 1 << 30)]))
            .map_err(|e| TestCaseError::fail(error_chain(&e)))?;
        ensure!(verdicts.len() == 1, "{verdicts:?}");
        ensure!(
            verdicts[0].is_safe() == ok,
            "{cp}: {verdicts:?}, want safe={ok}"
        );
        if let Verdict::Unsafe { pods, .. } = &verdicts[0] {
            let want: BTreeSet<String> = [cp["entries"].as_object(), cp["podEntries"].as_object()]
                .into_iter()
                .flatten()
                .flat_map(|m| m.keys().cloned())
                .collect();
            ensure!(
                pods.iter().cloned().collect::<BTreeSet<_>>() == want,
                "pods {pods:?}, want {want:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn static_memory_checkpoints_are_judged_as_the_kubelet_would() {
    let nodes = vec((0u32..4, 1u64..(1 << 40)), 1..4);
    check(
        "checkpoint_memory_model",
        500,
        (nodes, vec(any::<bool>(), 4), any::<bool>()),
        |(nodes, changed, pods)| {
            let mut nodes = nodes;
            nodes.sort_by_key(|n| n.0);
            nodes.dedup_by_key(|n| n.0);
            let mut state = serde_json::Map::new();
            let mut stale = false;
            for (i, &(id, bytes)) in nodes.iter().enumerate() {
                let total = if changed[i] { bytes + 4096 } else { bytes };
                stale |= changed[i];
                state.insert(id.to_string(), json!({
                "numberOfAssignments": 0,
                "memoryMap": { "memory": { "total": total, "systemReserved": 0, "allocatable": total,
                                            "reserved": 0, "free": total } },
                "cells": [id],
            }));
            }
            let entries = if pods {
                json!({ "pod-a": { "app": [] } })
            } else {
                json!({})
            };
            let cp = json!({ "policyName": "Static", "machineState": state, "entries": entries, "checksum": 1 });
            let root = crate::scratch();
            fs::write(root.path().join(MEMORY_MANAGER_STATE), cp.to_string()).expect("write");
            let verdicts = checkpoint::check(root.path(), &machine(&BTreeSet::from([0]), &nodes))
                .map_err(|e| TestCaseError::fail(error_chain(&e)))?;
            ensure!(
                verdicts.len() == 1 && verdicts[0].is_safe() != stale,
                "{cp}: {verdicts:?}"
            );
            Ok(())
        },
    );
}

/// A valid checkpoint with bytes changed, inserted or cut.
fn mutated_checkpoint() -> impl Strategy<Value = Vec<u8>> {
    let valid = cpu_model().prop_map(|m| m.checkpoint().0.to_string().into_bytes());
    super::mutated(valid, 5)
}

#[test]
fn any_checkpoint_is_judged_or_an_error_that_names_the_file() {
    let bytes = prop_oneof![
        mutated_checkpoint(),
        vec(any::<u8>(), 0..200),
        select(&[
            r#"{"policyName":"static","defaultCpuSet":"0-4294967295"}"#,
            r#"{"policyName":"static","defaultCpuSet":"3-1"}"#,
            r#"{"policyName":"static","entries":{"p":{"c":"x"}}}"#,
            r#"{"policyName":"Static","machineState":{"0":{"memoryMap":{"memory":{"total":-1}}}}}"#,
            r#"{"policyName":"Static","machineState":{"x":{}}}"#,
            r#"{"policyName":7}"#,
            "null",
            "[]",
        ][..])
        .prop_map(|s| s.as_bytes().to_vec()),
    ];
    check(
        "checkpoint_any",
        1500,
        (bytes, any::<bool>()),
        |(bytes, memory)| {
            let root = crate::scratch();
            let file = root.path().join(if memory {
                MEMORY_MANAGER_STATE
            } else {
                CPU_MANAGER_STATE
            });
            fs::write(&file, &bytes).expect("write");
            match checkpoint::check(
                root.path(),
                &machine(&BTreeSet::from([0, 1]), &[(0, 1 << 30)]),
            ) {
                Ok(verdicts) => ensure!(verdicts.len() == 1, "{verdicts:?}"),
                Err(e) => {
                    let text = error_chain(&e);
                    ensure!(
                        text.contains(&file.display().to_string()),
                        "{text:?} does not name {}",
                        file.display()
                    );
                }
            }
            Ok(())
        },
    );
}
