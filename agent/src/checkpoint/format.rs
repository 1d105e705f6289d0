//! The checkpoint files as the kubelet reads and writes them, and their checksums.
//!
//! pkg/kubelet/cm/cpumanager/state/checkpoint.go and memorymanager/state/checkpoint.go:
//! - CPU v1 (before 1.18): `entries` container ID -> CPU set; v2 (1.18-1.35): pod UID ->
//!   container -> CPU set; v3: `podEntries` added; v4 (1.36+): the state as a JSON string in
//!   `data` with its own `dataChecksum`, the v3 fields kept beside it with `checksum: 0` so
//!   that an older kubelet still reads the file. The v1-v3 checksum is the struct's hash
//!   ([`super::spew`]) with the checksum zeroed and the type named `CPUManagerCheckpoint`
//!   (newer kubelets also accept their own `CPUManagerCheckpointV3` name); v4's is the
//!   hash of the `data` string. A zero v1/v2 checksum is accepted ("compatibility with old
//!   file backend").
//! - Memory v1 (1.21-1.35): `machineState` (NUMA node -> tables) and `entries`; v2 adds
//!   `podEntries`; v3 (1.36+) is the `data` form again.
//!
//! Read as Go's encoding/json reads into these structs: keys match case-insensitively
//! (`defaultCPUSet` is `defaultCpuSet`), keys it does not know are ignored (listed here,
//! because a rewrite would lose them), a JSON `null` is a nil map or slice and prints
//! differently from an empty one, and a missing top-level map keeps the empty map the
//! kubelet's constructor made.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::spew::{Go, fnv32a, sprint};
use crate::capacity;

/// One of the kubelet's checkpoint layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    V1,
    V2,
    V3,
    /// `data` + `dataChecksum`.
    Data,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::V3 => "v3",
            Self::Data => "v4 (data)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not JSON as the kubelet writes it")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotObject,
    #[error("{field}: {source}")]
    Field {
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the `data` field does not hold the checkpoint's JSON")]
    Data(#[source] serde_json::Error),
    #[error("pod {pod} cpuSet {value:?} is not a CPU list")]
    PodCpuSet { pod: String, value: String },
}

/// How a file's checksum compares with the kubelet's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checksum {
    /// The value stored in the file (`dataChecksum` for the data layout).
    pub stored: u64,
    /// What the kubelet computes for this file's layout (the legacy type name).
    pub computed: u64,
    /// The kubelet accepts it: equal to `computed`, to an alternative the kubelet also
    /// accepts, or zero where the kubelet lets that pass.
    pub valid: bool,
}

// ---- CPU manager ----------------------------------------------------------------------

/// The CPU manager's state as the kubelet holds it after reading the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuState {
    pub policy_name: String,
    pub default_cpu_set: String,
    /// Pod UID -> container -> CPU set (v1: container ID -> CPU set, under pod "").
    /// `None`: a JSON `null`.
    pub entries: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pod UID -> the pod's CPU set (v3+). `None`: a JSON `null`.
    pub pod_entries: Option<BTreeMap<String, String>>,
}

/// A checkpoint file as read: its layout, the state the kubelet would hold, and how its
/// checksum compares.
#[derive(Debug, Clone)]
pub struct File<S> {
    pub layout: Layout,
    pub state: S,
    pub checksum: Checksum,
    /// Keys the kubelet ignores; a rewrite would drop them.
    pub unknown_fields: Vec<String>,
    /// The object as read, for a rewrite that keeps the layout.
    pub raw: Map<String, Value>,
}

pub type CpuFile = File<CpuState>;
pub type MemoryFile = File<MemoryState>;

const CPU_FIELDS: &[&str] = &[
    "policyName",
    "defaultCpuSet",
    "entries",
    "podEntries",
    "checksum",
    "data",
    "dataChecksum",
];
const CPU_DATA_FIELDS: &[&str] = &["policyName", "defaultCpuSet", "entries", "podEntries"];

pub fn parse_cpu(bytes: &[u8]) -> Result<CpuFile, FormatError> {
    let no_nested = |_: &mut Map<String, Value>, _: &str| Vec::new();
    parse(
        bytes,
        CPU_FIELDS,
        CPU_DATA_FIELDS,
        no_nested,
        cpu_state,
        |raw, state| {
            if v1_entries(raw) {
                Legacy::new(
                    Layout::V1,
                    cpu_checksum(state, Layout::V1, CPU_NAME),
                    vec![],
                )
            } else if raw.contains_key("podEntries") {
                let own = cpu_checksum(state, Layout::V3, "state.CPUManagerCheckpointV3");
                let v3 = cpu_checksum(state, Layout::V3, CPU_NAME);
                // The CPU manager's v3 has no "compatibility with old file backend".
                Legacy {
                    zero_ok: false,
                    ..Legacy::new(Layout::V3, v3, vec![own])
                }
            } else {
                // Without entries an old kubelet first reads the file as v1 and accepts its
                // checksum.
                let empty = state.entries.as_ref().is_none_or(BTreeMap::is_empty);
                let v1 = empty.then(|| cpu_checksum(state, Layout::V1, CPU_NAME));
                // A kubelet that knows v3 reads a v2 file as v3 (no pod entries) and accepts
                // the v3 checksum of it too, under either name; its own tests' v2 files carry
                // that one.
                let v3 = [CPU_NAME, "state.CPUManagerCheckpointV3"]
                    .map(|name| cpu_checksum(state, Layout::V3, name));
                let v2 = cpu_checksum(state, Layout::V2, CPU_NAME);
                Legacy::new(Layout::V2, v2, v1.into_iter().chain(v3).collect())
            }
        },
    )
}

const CPU_NAME: &str = "state.CPUManagerCheckpoint";

/// v1's `entries` map container IDs straight to CPU sets.
fn v1_entries(obj: &Map<String, Value>) -> bool {
    obj.get("entries")
        .and_then(Value::as_object)
        .is_some_and(|m| m.values().any(Value::is_string))
}

fn cpu_state(obj: &Map<String, Value>) -> Result<CpuState, FormatError> {
    let entries = if v1_entries(obj) {
        field::<Option<BTreeMap<String, String>>>(obj, "entries")?
            .unwrap_or(Some(BTreeMap::new()))
            .map(|m| BTreeMap::from([(String::new(), m)]))
    } else {
        field(obj, "entries")?.unwrap_or(Some(BTreeMap::new()))
    };
    let pod_entries =
        match field::<Option<BTreeMap<String, Option<Map<String, Value>>>>>(obj, "podEntries")? {
            None => Some(BTreeMap::new()),
            Some(None) => None,
            Some(Some(pods)) => Some(
                pods.into_iter()
                    .map(|(pod, entry)| {
                        let mut entry = entry.unwrap_or_default();
                        fold_keys(&mut entry, &["cpuSet"], "");
                        let set = field::<Option<String>>(&entry, "cpuSet")?
                            .flatten()
                            .unwrap_or_default();
                        Ok((pod, set))
                    })
                    .collect::<Result<_, FormatError>>()?,
            ),
        };
    Ok(CpuState {
        policy_name: field::<Option<String>>(obj, "policyName")?
            .flatten()
            .unwrap_or_default(),
        default_cpu_set: field::<Option<String>>(obj, "defaultCpuSet")?
            .flatten()
            .unwrap_or_default(),
        entries,
        pod_entries,
    })
}

/// The kubelet's checksum of `state` in `layout` (v1-v3) under the type name `name`.
pub fn cpu_checksum(state: &CpuState, layout: Layout, name: &str) -> u64 {
    let mut fields = vec![
        ("PolicyName", Go::string(&state.policy_name)),
        ("DefaultCPUSet", Go::string(&state.default_cpu_set)),
    ];
    let string_map = |m: &BTreeMap<String, String>| {
        Some(
            m.iter()
                .map(|(k, v)| (Go::string(k), Go::string(v)))
                .collect(),
        )
    };
    let entries = match layout {
        Layout::V1 => Go::Map(
            "map[string]string".into(),
            state.entries.as_ref().map(|m| {
                m.values()
                    .flatten()
                    .map(|(k, v)| (Go::string(k), Go::string(v)))
                    .collect()
            }),
        ),
        _ => Go::Map(
            "map[string]map[string]string".into(),
            state.entries.as_ref().map(|pods| {
                pods.iter()
                    .map(|(pod, containers)| {
                        let inner = Go::Map("map[string]string".into(), string_map(containers));
                        (Go::string(pod), inner)
                    })
                    .collect()
            }),
        ),
    };
    fields.push(("Entries", entries));
    if layout == Layout::V3 {
        let set = |set: &String| {
            let cpus = capacity::parse_cpu_list(set).unwrap_or_default();
            let elems = cpus
                .into_iter()
                .map(|c| {
                    let unit = Go::Struct("struct {}".into(), vec![]);
                    (Go::Int("int".into(), i64::from(c)), unit)
                })
                .collect();
            Go::Struct(
                "cpuset.CPUSet".into(),
                vec![("elems", Go::Map("map[int]struct {}".into(), Some(elems)))],
            )
        };
        let pods = pod_entries(&state.pod_entries, "CPUSet", set);
        fields.push((
            "PodEntries",
            Go::Map("state.PodCPUAssignments".into(), pods),
        ));
    }
    hash_checkpoint(name, fields)
}

/// Ready to be written in the layout of `file` with `state`: the kubelet's own field
/// order and checksum. The data layout keeps the v3 fields beside `data`, checksum 0, as
/// the kubelet writes them.
pub fn write_cpu(file: &CpuFile, state: &CpuState) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        policy_name: &'a str,
        default_cpu_set: &'a str,
        #[serde(skip_serializing_if = "empty")]
        entries: &'a Option<BTreeMap<String, BTreeMap<String, String>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pod_entries: Option<BTreeMap<&'a str, BTreeMap<&'static str, &'a str>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        checksum: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_checksum: Option<u64>,
    }
    fn empty<K, V>(m: &&Option<BTreeMap<K, V>>) -> bool {
        m.as_ref().is_none_or(BTreeMap::is_empty)
    }
    let pod_entries = |with: bool| {
        (with && state.pod_entries.as_ref().is_some_and(|p| !p.is_empty())).then(|| {
            (state.pod_entries.iter().flatten())
                .map(|(pod, set)| (pod.as_str(), BTreeMap::from([("cpuSet", set.as_str())])))
                .collect()
        })
    };
    let base = |checksum: Option<u64>, with_pods: bool| Out {
        policy_name: &state.policy_name,
        default_cpu_set: &state.default_cpu_set,
        entries: &state.entries,
        pod_entries: pod_entries(with_pods),
        checksum,
        data: None,
        data_checksum: None,
    };
    let out = match file.layout {
        Layout::V1 | Layout::V2 => base(Some(cpu_checksum(state, Layout::V2, CPU_NAME)), false),
        Layout::V3 => base(Some(cpu_checksum(state, Layout::V3, CPU_NAME)), true),
        Layout::Data => {
            let mut inner = base(None, true);
            inner.checksum = None;
            let data = serde_json::to_string(&inner).expect("plain strings and maps");
            let mut out = base(Some(0), true);
            out.data_checksum = Some(u64::from(data_checksum(&data)));
            out.data = Some(data);
            out
        }
    };
    serde_json::to_vec(&out).expect("plain strings and maps")
}

/// `checksum.New(cp.Data)`: the hash of a Go string.
pub fn data_checksum(data: &str) -> u32 {
    fnv32a(sprint(&Go::string(data)).as_bytes())
}

// ---- Memory manager -------------------------------------------------------------------

/// memorymanager/state/state.go `MemoryTable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryTable {
    #[serde(rename = "total", default)]
    pub total: u64,
    #[serde(default)]
    pub system_reserved: u64,
    #[serde(default)]
    pub allocatable: u64,
    #[serde(default)]
    pub reserved: u64,
    #[serde(default)]
    pub free: u64,
}

/// `NUMANodeState`. `None` fields are JSON `null` (nil).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaNodeState {
    #[serde(default)]
    pub number_of_assignments: i64,
    #[serde(default)]
    pub memory_map: Option<BTreeMap<String, Option<MemoryTable>>>,
    #[serde(default)]
    pub cells: Option<Vec<i64>>,
}

/// `Block`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    #[serde(rename = "numaAffinity", default)]
    pub numa_affinity: Option<Vec<i64>>,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
}

/// Pod UID -> container -> blocks.
pub type MemoryEntries = BTreeMap<String, Option<BTreeMap<String, Option<Vec<Block>>>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryState {
    pub policy_name: String,
    /// NUMA node -> its state (`None`: a `null` node). Outer `None`: `null`.
    pub machine_state: Option<BTreeMap<i64, Option<NumaNodeState>>>,
    pub entries: Option<MemoryEntries>,
    /// Pod UID -> the pod's blocks (v2+).
    pub pod_entries: Option<BTreeMap<String, Option<Vec<Block>>>>,
}

const MEMORY_FIELDS: &[&str] = &[
    "policyName",
    "machineState",
    "entries",
    "podEntries",
    "checksum",
    "data",
    "dataChecksum",
];
const MEMORY_DATA_FIELDS: &[&str] = &["policyName", "machineState", "entries", "podEntries"];
const NODE_FIELDS: &[&str] = &["numberOfAssignments", "memoryMap", "cells"];
const TABLE_FIELDS: &[&str] = &["total", "systemReserved", "allocatable", "reserved", "free"];
const BLOCK_FIELDS: &[&str] = &["numaAffinity", "type", "size"];
const MEMORY_NAME: &str = "state.MemoryManagerCheckpoint";

pub fn parse_memory(bytes: &[u8]) -> Result<MemoryFile, FormatError> {
    let fields = (MEMORY_FIELDS, MEMORY_DATA_FIELDS);
    parse(
        bytes,
        fields.0,
        fields.1,
        fold_memory,
        memory_state,
        |raw, state| {
            if raw.contains_key("podEntries") {
                let own = memory_checksum(state, Layout::V2, "state.MemoryManagerCheckpointV2");
                let v2 = memory_checksum(state, Layout::V2, MEMORY_NAME);
                Legacy::new(Layout::V2, v2, vec![own])
            } else {
                let v1 = memory_checksum(state, Layout::V1, MEMORY_NAME);
                Legacy::new(Layout::V1, v1, vec![])
            }
        },
    )
}

fn fold_memory(obj: &mut Map<String, Value>, prefix: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    if let Some(Value::Object(nodes)) = obj.get_mut("machineState") {
        for (id, node) in nodes.iter_mut() {
            let Value::Object(node) = node else { continue };
            let at = format!("{prefix}machineState.{id}.");
            unknown.extend(fold_keys(node, NODE_FIELDS, &at));
            if let Some(Value::Object(tables)) = node.get_mut("memoryMap") {
                for (kind, table) in tables.iter_mut() {
                    if let Value::Object(table) = table {
                        unknown.extend(fold_keys(table, TABLE_FIELDS, &format!("{at}{kind}.")));
                    }
                }
            }
        }
    }
    let mut blocks = |blocks: &mut Value, at: String| {
        if let Value::Array(blocks) = blocks {
            for block in blocks.iter_mut() {
                if let Value::Object(block) = block {
                    unknown.extend(fold_keys(block, BLOCK_FIELDS, &at));
                }
            }
        }
    };
    if let Some(Value::Object(pods)) = obj.get_mut("entries") {
        for (pod, containers) in pods.iter_mut() {
            if let Value::Object(containers) = containers {
                for (name, list) in containers.iter_mut() {
                    blocks(list, format!("{prefix}entries.{pod}.{name}."));
                }
            }
        }
    }
    if let Some(Value::Object(pods)) = obj.get_mut("podEntries") {
        for (pod, entry) in pods.iter_mut() {
            if let Value::Object(entry) = entry {
                let at = format!("{prefix}podEntries.{pod}.");
                let _ = fold_keys(entry, &["memoryBlocks"], &at);
                if let Some(list) = entry.get_mut("memoryBlocks") {
                    blocks(list, at);
                }
            }
        }
    }
    unknown
}

fn memory_state(obj: &Map<String, Value>) -> Result<MemoryState, FormatError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct PodEntry {
        #[serde(default)]
        memory_blocks: Option<Vec<Block>>,
    }
    let machine_state: Option<BTreeMap<String, Option<NumaNodeState>>> =
        field(obj, "machineState")?.unwrap_or(Some(BTreeMap::new()));
    let machine_state = match machine_state {
        None => None,
        Some(nodes) => Some(
            nodes
                .into_iter()
                .map(|(id, node)| {
                    let id = id.parse::<i64>().map_err(|_| FormatError::Field {
                        field: format!("machineState.{id}"),
                        source: serde::de::Error::custom("a NUMA node id is an integer"),
                    })?;
                    Ok((id, node))
                })
                .collect::<Result<_, FormatError>>()?,
        ),
    };
    let pod_entries = field::<Option<BTreeMap<String, Option<PodEntry>>>>(obj, "podEntries")?
        .unwrap_or(Some(BTreeMap::new()))
        .map(|pods| {
            pods.into_iter()
                .map(|(pod, e)| (pod, e.and_then(|e| e.memory_blocks)))
                .collect()
        });
    Ok(MemoryState {
        policy_name: field::<Option<String>>(obj, "policyName")?
            .flatten()
            .unwrap_or_default(),
        machine_state,
        entries: field(obj, "entries")?.unwrap_or(Some(BTreeMap::new())),
        pod_entries,
    })
}

fn ints(v: &Option<Vec<i64>>) -> Go {
    Go::Slice(
        "[]int".into(),
        v.as_ref()
            .map(|v| v.iter().map(|i| Go::Int("int".into(), *i)).collect()),
    )
}

fn blocks(v: &Option<Vec<Block>>) -> Go {
    Go::Slice(
        "[]state.Block".into(),
        v.as_ref().map(|blocks| {
            blocks
                .iter()
                .map(|b| {
                    Go::Struct(
                        "state.Block".into(),
                        vec![
                            ("NUMAAffinity", ints(&b.numa_affinity)),
                            ("Type", Go::Str("v1.ResourceName".into(), b.kind.clone())),
                            ("Size", Go::Uint("uint64".into(), b.size)),
                        ],
                    )
                })
                .collect()
        }),
    )
}

/// The kubelet's checksum of `state` in `layout` (v1 or v2) under the type name `name`.
pub fn memory_checksum(state: &MemoryState, layout: Layout, name: &str) -> u64 {
    let uint = |v: u64| Go::Uint("uint64".into(), v);
    let table = |t: &Option<MemoryTable>| {
        Go::Ptr(
            "*state.MemoryTable".into(),
            t.map(|t| {
                Box::new(Go::Struct(
                    "state.MemoryTable".into(),
                    vec![
                        ("TotalMemSize", uint(t.total)),
                        ("SystemReserved", uint(t.system_reserved)),
                        ("Allocatable", uint(t.allocatable)),
                        ("Reserved", uint(t.reserved)),
                        ("Free", uint(t.free)),
                    ],
                ))
            }),
        )
    };
    let node = |n: &Option<NumaNodeState>| {
        Go::Ptr(
            "*state.NUMANodeState".into(),
            n.as_ref().map(|n| {
                let map = n.memory_map.as_ref().map(|m| {
                    m.iter()
                        .map(|(k, t)| (Go::Str("v1.ResourceName".into(), k.clone()), table(t)))
                        .collect()
                });
                Box::new(Go::Struct(
                    "state.NUMANodeState".into(),
                    vec![
                        (
                            "NumberOfAssignments",
                            Go::Int("int".into(), n.number_of_assignments),
                        ),
                        (
                            "MemoryMap",
                            Go::Map("map[v1.ResourceName]*state.MemoryTable".into(), map),
                        ),
                        ("Cells", ints(&n.cells)),
                    ],
                ))
            }),
        )
    };
    let machine = state.machine_state.as_ref().map(|nodes| {
        nodes
            .iter()
            .map(|(id, n)| (Go::Int("int".into(), *id), node(n)))
            .collect()
    });
    let entries = state.entries.as_ref().map(|pods| {
        pods.iter()
            .map(|(pod, containers)| {
                let containers = containers.as_ref().map(|c| {
                    c.iter()
                        .map(|(name, list)| (Go::string(name), blocks(list)))
                        .collect()
                });
                (
                    Go::string(pod),
                    Go::Map("map[string][]state.Block".into(), containers),
                )
            })
            .collect()
    });
    let mut fields = vec![
        ("PolicyName", Go::string(&state.policy_name)),
        ("MachineState", Go::Map("state.NUMANodeMap".into(), machine)),
        (
            "Entries",
            Go::Map("state.ContainerMemoryAssignments".into(), entries),
        ),
    ];
    if layout == Layout::V2 {
        let pods = pod_entries(&state.pod_entries, "MemoryBlocks", blocks);
        fields.push((
            "PodEntries",
            Go::Map("state.PodMemoryAssignments".into(), pods),
        ));
    }
    hash_checkpoint(name, fields)
}

/// Ready to be written in the layout of `file` with `state`.
pub fn write_memory(file: &MemoryFile, state: &MemoryState) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct PodEntry<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        memory_blocks: &'a Option<Vec<Block>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        policy_name: &'a str,
        machine_state: &'a Option<BTreeMap<i64, Option<NumaNodeState>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        entries: Option<&'a MemoryEntries>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pod_entries: Option<BTreeMap<&'a str, PodEntry<'a>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        checksum: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_checksum: Option<u64>,
    }
    let entries = state.entries.as_ref().filter(|e| !e.is_empty());
    let pods = |with: bool| {
        (with && state.pod_entries.as_ref().is_some_and(|p| !p.is_empty())).then(|| {
            (state.pod_entries.iter().flatten())
                .map(|(pod, list)| {
                    (
                        pod.as_str(),
                        PodEntry {
                            memory_blocks: list,
                        },
                    )
                })
                .collect()
        })
    };
    let base = |checksum: Option<u64>, with_pods: bool| Out {
        policy_name: &state.policy_name,
        machine_state: &state.machine_state,
        entries,
        pod_entries: pods(with_pods),
        checksum,
        data: None,
        data_checksum: None,
    };
    let out = match file.layout {
        Layout::V1 | Layout::V3 => {
            base(Some(memory_checksum(state, Layout::V1, MEMORY_NAME)), false)
        }
        Layout::V2 => base(Some(memory_checksum(state, Layout::V2, MEMORY_NAME)), true),
        Layout::Data => {
            let data = serde_json::to_string(&base(None, true)).expect("plain numbers and maps");
            let mut out = base(Some(0), false);
            out.data_checksum = Some(u64::from(data_checksum(&data)));
            out.data = Some(data);
            out
        }
    };
    serde_json::to_vec(&out).expect("plain numbers and maps")
}

// ---- shared ---------------------------------------------------------------------------

/// A pre-data layout and the checksums the kubelet accepts for it.
struct Legacy {
    layout: Layout,
    /// What the kubelet computes under the legacy type name.
    computed: u64,
    /// Other values it also accepts (its own newer type name, an older layout's).
    also: Vec<u64>,
    /// A zero checksum passes ("compatibility with old file backend").
    zero_ok: bool,
}

impl Legacy {
    fn new(layout: Layout, computed: u64, also: Vec<u64>) -> Self {
        Self {
            layout,
            computed,
            also,
            zero_ok: true,
        }
    }
}

/// Reads either manager's file: keys folded as encoding/json matches them, then the
/// `data` layout (the state as a JSON string under its own checksum) or a legacy layout,
/// which `legacy` names with the checksum the kubelet computes for it and the other
/// values it also accepts. `nested` folds the keys below the top level.
fn parse<S>(
    bytes: &[u8],
    fields: &[&str],
    data_fields: &[&str],
    nested: impl Fn(&mut Map<String, Value>, &str) -> Vec<String>,
    state_of: impl Fn(&Map<String, Value>) -> Result<S, FormatError>,
    legacy: impl FnOnce(&Map<String, Value>, &S) -> Legacy,
) -> Result<File<S>, FormatError> {
    let mut raw = object(bytes)?;
    let mut unknown = fold_keys(&mut raw, fields, "");
    if let Some(Value::String(data)) = raw.get("data") {
        let mut inner = object(data.as_bytes()).map_err(|e| match e {
            FormatError::Json(e) => FormatError::Data(e),
            other => other,
        })?;
        unknown.extend(fold_keys(&mut inner, data_fields, "data."));
        unknown.extend(nested(&mut inner, "data."));
        let state = state_of(&inner)?;
        let stored = field::<u64>(&raw, "dataChecksum")?.unwrap_or(0);
        let computed = u64::from(data_checksum(data));
        return Ok(File {
            layout: Layout::Data,
            state,
            checksum: Checksum {
                stored,
                computed,
                valid: stored == computed,
            },
            unknown_fields: unknown,
            raw,
        });
    }
    unknown.extend(nested(&mut raw, ""));
    let state = state_of(&raw)?;
    let stored = field::<u64>(&raw, "checksum")?.unwrap_or(0);
    let Legacy {
        layout,
        computed,
        also,
        zero_ok,
    } = legacy(&raw, &state);
    let valid = stored == computed || also.contains(&stored) || (zero_ok && stored == 0);
    Ok(File {
        layout,
        state,
        checksum: Checksum {
            stored,
            computed,
            valid,
        },
        unknown_fields: unknown,
        raw,
    })
}

/// Pod UID -> `state.PodEntry{<field>: value}`, as both managers' v3/v2 hold them.
fn pod_entries<T>(
    pods: &Option<BTreeMap<String, T>>,
    field: &'static str,
    value: impl Fn(&T) -> Go,
) -> Option<Vec<(Go, Go)>> {
    pods.as_ref().map(|pods| {
        (pods.iter())
            .map(|(pod, v)| {
                let entry = Go::Struct("state.PodEntry".into(), vec![(field, value(v))]);
                (Go::string(pod), entry)
            })
            .collect()
    })
}

/// The checksum of a checkpoint struct: its fields with `Checksum` zeroed, as the kubelet
/// hashes it.
fn hash_checkpoint(name: &str, mut fields: Vec<(&'static str, Go)>) -> u64 {
    fields.push(("Checksum", Go::Uint("checksum.Checksum".into(), 0)));
    let value = Go::Ptr(
        format!("*{name}"),
        Some(Box::new(Go::Struct(name.into(), fields))),
    );
    u64::from(fnv32a(sprint(&value).as_bytes()))
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, FormatError> {
    match serde_json::from_slice(bytes).map_err(FormatError::Json)? {
        Value::Object(map) => Ok(map),
        _ => Err(FormatError::NotObject),
    }
}

/// encoding/json's key matching: an exact key wins, else a case-insensitive one. Renames
/// matched keys to the exact field name and returns the keys no field takes.
fn fold_keys(obj: &mut Map<String, Value>, fields: &[&str], at: &str) -> Vec<String> {
    let keys: Vec<String> = obj.keys().cloned().collect();
    let mut unknown = Vec::new();
    for key in keys {
        if fields.contains(&key.as_str()) {
            continue;
        }
        match fields.iter().find(|f| f.eq_ignore_ascii_case(&key)) {
            Some(f) if !obj.contains_key(*f) => {
                let value = obj.remove(&key).expect("listed");
                obj.insert((*f).to_owned(), value);
            }
            _ => unknown.push(format!("{at}{key}")),
        }
    }
    unknown
}

/// `None` when the key is missing.
fn field<T: serde::de::DeserializeOwned>(
    obj: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, FormatError> {
    obj.get(name)
        .map(|v| {
            T::deserialize(v).map_err(|source| FormatError::Field {
                field: name.to_owned(),
                source,
            })
        })
        .transpose()
}
