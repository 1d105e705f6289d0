//! The event log's records: one JSON object per line, schema version [`SCHEMA_VERSION`].
//!
//! Two shapes share the top-level fields `v`, `time`, `kind`, `action`, `capacity`:
//! - [`EventRecord`]: something changed on the machine (`kind` `cpu`, `memory_block`,
//!   `memory`), seen by one source (`ebpf`, `uevent`, `scan`).
//! - [`AgentRecord`]: the agent's own state (`kind` `agent`): `ready`, `loss`,
//!   `auto_online`, `stopped`.
//! - [`DecisionRecord`]: what `hotplug-agent run` decided (`kind` `episode`, `reconcile`,
//!   `refresh`, `verify`, `reset`).
//!
//! Kinds and actions are typed ([`words!`]): a new word is a new variant, so every reader
//! (metrics, text, the stream's filter) is checked by the compiler.
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::capacity::Summary;

pub const SCHEMA_VERSION: u32 = 1;

/// An enum whose variants are the event log's words: serialised as `$text`, printed the
/// same (padding honoured, for the text format's columns), never spelled twice.
macro_rules! words {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

words! {
    /// Which source saw an event.
    pub enum Source {
        Ebpf = "ebpf",
        Uevent = "uevent",
        Scan = "scan",
    }
}

words! {
    /// What changed, in an [`EventRecord`].
    pub enum Kind {
        Cpu = "cpu",
        MemoryBlock = "memory_block",
        Memory = "memory",
    }
}

words! {
    /// How it changed, in an [`EventRecord`].
    pub enum Action {
        Add = "add",
        Remove = "remove",
        Online = "online",
        Offline = "offline",
        Change = "change",
        Resize = "resize",
    }
}

words! {
    /// The `kind` of an [`AgentRecord`]: always `agent`.
    pub enum AgentKind {
        Agent = "agent",
    }
}

words! {
    /// What an [`AgentRecord`] says.
    pub enum AgentAction {
        /// Started: which sources listen and which probes attached.
        Ready = "ready",
        /// Records or events were lost: by which source or output, how many, why.
        Loss = "loss",
        /// The last record.
        Stopped = "stopped",
        /// The agent onlined a block or CPU that arrived (`--auto-online-*`).
        AutoOnline = "auto_online",
    }
}

words! {
    /// The stage of `hotplug-agent run` a [`DecisionRecord`] comes from.
    #[derive(Default)]
    pub enum DecisionKind {
        #[default]
        Episode = "episode",
        Reconcile = "reconcile",
        Refresh = "refresh",
        Verify = "verify",
        /// `--static-policy drain-and-reset` or `update-in-place`, step by step.
        Reset = "reset",
    }
}

words! {
    /// What a stage decided or did. Which actions each kind uses is listed at
    /// [`DecisionRecord::action`].
    #[derive(Default)]
    pub enum DecisionAction {
        #[default]
        Settled = "settled",
        InSync = "in_sync",
        Stale = "stale",
        ApiUnreachable = "api_unreachable",
        ApiReachable = "api_reachable",
        Started = "started",
        Succeeded = "succeeded",
        Failed = "failed",
        Skipped = "skipped",
        Deferred = "deferred",
        Converged = "converged",
        Timeout = "timeout",
        Cordoned = "cordoned",
        Evicted = "evicted",
        KubeletStopped = "kubelet_stopped",
        CheckpointMoved = "checkpoint_moved",
        /// `--static-policy update-in-place`: a checkpoint rewritten for the new machine.
        CheckpointRewritten = "checkpoint_rewritten",
        KubeletStarted = "kubelet_started",
        /// update-in-place: the pinned containers' `cpuset.cpus` as before the restart.
        CpusetsUnchanged = "cpusets_unchanged",
        CpusetsChanged = "cpusets_changed",
        NodeReady = "node_ready",
        Uncordoned = "uncordoned",
        /// The reset's end on a Node someone else had cordoned: it stays cordoned.
        LeftCordoned = "left_cordoned",
    }
}

/// A change on the machine, as one source saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub v: u32,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub source: Source,
    pub kind: Kind,
    pub action: Action,
    /// The sysfs name (`cpu1`, `memory42`), or null for machine-wide memory changes.
    pub device: Option<String>,
    /// The machine right after the event.
    pub capacity: Summary,
    /// CLOCK_MONOTONIC when the record was made, to line up with `kernel_ns`.
    pub mono_ns: u64,
    /// uevent: the kernel's sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqnum: Option<u64>,
    /// eBPF: the hook that fired (`tracepoint/cpuhp/cpuhp_exit`, `fentry/online_pages`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// eBPF: CLOCK_MONOTONIC at the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_ns: Option<u64>,
    /// eBPF: how long the record took from the hook to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_ns: Option<u64>,
    /// eBPF: the task that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// eBPF: the CPU the hook ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// eBPF memory probes: pages added (positive) or removed (negative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<i64>,
    /// eBPF: how many raw kernel hits this record folds (per-zone repeats, page chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<u32>,
    /// scan: why the scan ran (`startup`, `enobufs`, `seqnum_gap`, `ringbuf_drops`, `interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One probe the agent tried to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// `tracepoint/cpuhp/cpuhp_exit`, `fentry/online_pages`, `kprobe/online_pages`, ...
    pub name: String,
    pub attached: bool,
    pub error: Option<String>,
}

/// A source and whether it listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    pub listening: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The agent's own state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub v: u32,
    pub time: String,
    pub kind: AgentKind,
    pub action: AgentAction,
    pub capacity: Summary,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStatus>,
    /// ready: the slow re-read guard, in seconds, or null when it is off.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub rescan_interval_s: Option<Option<u64>>,
    /// loss: which source lost events and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// ready: the start-up snapshot, in brief.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineSummary>,
    /// auto_online: the block or CPU the agent onlined (`memory40`, `cpu1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// auto_online: the state written (`online`, `online_movable`, `online_kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// auto_online: why the write failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// ready (`run`): the kubelet's config file as read at start-up (upstream.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet_config: Option<KubeletConfigStatus>,
}

/// The kubelet's config file, as `run` read it at start-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeletConfigStatus {
    pub path: String,
    /// Whether there is such a file (none is normal: a kubelet configured by flags).
    pub found: bool,
    /// The file turns the kubelet's `InPlaceNodeResourceResize` gate on: the kubelet
    /// resizes the Node itself and the agent only reports (`refresh` `skipped`, reason
    /// `upstream_resize`).
    pub upstream_resize: bool,
    /// Why the file could not be read or parsed; it is ignored then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The start-up snapshot in one line's worth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSummary {
    pub cpus_online_list: String,
    pub cpus_possible: u32,
    pub memory_block_size: Option<u64>,
    pub memory_blocks_online: usize,
    pub memory_blocks_offline: usize,
    pub numa_nodes: usize,
    /// `hugepages-2048kB` -> total pages.
    pub hugepages: std::collections::BTreeMap<String, u64>,
}

impl MachineSummary {
    pub fn of(s: &crate::capacity::Snapshot) -> Self {
        Self {
            cpus_online_list: s.cpus_online_list.clone(),
            cpus_possible: s.cpus_possible,
            memory_block_size: s.memory_block_size,
            memory_blocks_online: s.online_blocks(),
            memory_blocks_offline: s.offline_blocks(),
            numa_nodes: s.numa_nodes.len(),
            hugepages: s
                .hugepages
                .iter()
                .map(|h| (format!("hugepages-{}kB", h.size_bytes / 1024), h.total))
                .collect(),
        }
    }
}

impl AgentRecord {
    pub fn new(action: AgentAction, capacity: Summary) -> Self {
        Self {
            v: SCHEMA_VERSION,
            time: now_rfc3339(),
            kind: AgentKind::Agent,
            action,
            capacity,
            probes: Vec::new(),
            sources: Vec::new(),
            rescan_interval_s: None,
            source: None,
            reason: None,
            lost: None,
            version: None,
            machine: None,
            device: None,
            state: None,
            error: None,
            kubelet_config: None,
        }
    }
}

/// What the node's capacity looks like from the API: `.status.capacity`, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    pub memory_bytes: Option<u64>,
    /// `cpu` in millicores (the kubelet advertises the count of online CPUs: 2 -> 2000).
    pub cpu_millis: Option<u64>,
    /// `hugepages-2Mi` -> bytes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hugepages: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable_memory_bytes: Option<u64>,
}

/// A decision of `hotplug-agent run`: `kind` `episode`, `reconcile`, `refresh` or `verify`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub v: u32,
    pub time: String,
    pub kind: DecisionKind,
    /// episode: `settled`; reconcile: `in_sync`, `stale`, `api_unreachable`, `api_reachable`,
    /// `skipped`, `failed`; refresh: `started`, `succeeded`, `failed`, `skipped`, `deferred`;
    /// verify: `converged`, `timeout`, `failed`; reset: `started`, `cordoned`, `evicted`,
    /// `kubelet_stopped`, `checkpoint_moved`, `kubelet_started`, `node_ready`,
    /// `uncordoned`, `failed`.
    pub action: DecisionAction,
    /// The machine when the decision was made.
    pub capacity: Summary,
    /// Episode number, counted from 1 (0: the start-up reconcile).
    pub episode: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// episode: how many event records it folded; `startup` or `events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// What the Node advertised before, and (verify) after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised: Option<Advertised>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_after: Option<Advertised>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why: a skipped refresh, a deferral, an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// refresh deferred: when it may run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// verify: the pods' cgroup memory limit, before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupCheck>,
    /// episode: time from its first event to settling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_ms: Option<u64>,
    /// episode: memory blocks that arrived (`add`) during it; present only where blocks
    /// were involved. It does not settle while such blocks are on their way online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_added: Option<u64>,
    /// episode: blocks still not online when it settled (`reason` says why:
    /// `in_flight_stalled`, left offline; `max_wait`, cut by the bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_pending: Option<u64>,
    /// reset `checkpoint_rewritten` (`--static-policy update-in-place`): the file, what
    /// changed in it and where the old one is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointChange>,
    /// refresh `deferred` (reason `fleet_budget`) and `started`: the cluster-wide budget
    /// (fleet.rs) waited for or taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetBudget>,
    /// refresh `skipped` (reason `shrink_unsafe`) and reset steps of `--shrink-policy
    /// evict` (reason `shrink`): the pods against the allocatable after a restart on the
    /// smaller machine (shrink.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shrink: Option<ShrinkCheck>,
    /// verify: pods that the restarted kubelet failed at admission (`OutOfcpu`,
    /// `OutOfmemory`, `UnexpectedAdmissionError`, ...), which were not failed before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_pods: Vec<RejectedPod>,
}

/// Will the pods fit after a restart on a smaller machine? Absent values could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShrinkCheck {
    /// The machine's memory minus what the Node reserves now (capacity - allocatable).
    pub memory_allocatable_after: Option<u64>,
    /// The pods' cgroup working set (usage minus inactive file pages).
    pub memory_in_use: Option<u64>,
    /// The sum of the memory requests of the node's pods that are not terminal.
    pub memory_requests: Option<u64>,
    pub cpu_allocatable_after_millis: Option<u64>,
    pub cpu_requests_millis: Option<u64>,
    /// How many pods were counted.
    pub pods: Option<u64>,
    /// Where `memory_in_use` was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub fits: bool,
    /// `--shrink-policy evict`: the pods to evict, in order (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evict: Vec<String>,
    /// Checked while the kernel was still offlining these memory blocks (offlining.rs),
    /// against the machine without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offlining: Vec<String>,
}

/// A pod the kubelet failed at admission after the agent restarted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedPod {
    pub namespace: String,
    pub name: String,
    /// `status.reason`: `OutOfcpu`, `OutOfmemory`, `UnexpectedAdmissionError`, ...
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One checkpoint rewrite: the CPU manager's `defaultCpuSet` or the memory manager's
/// per-NUMA-node memory totals, before and after.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointChange {
    /// `cpu` or `memory`.
    pub manager: String,
    pub path: String,
    pub before: String,
    pub after: String,
    pub backup: String,
}

/// A fleet budget as one decision saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetBudget {
    /// `restart` or `drain`.
    pub budget: String,
    /// How many nodes may hold it at once.
    pub slots: u32,
    /// The slot Lease taken (`started`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Who holds every slot (`deferred`): node names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
    /// `started`: how long this node waited for its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupCheck {
    pub path: String,
    pub before: Option<u64>,
    pub after: Option<u64>,
    /// How far it should have moved: the change of the Node's allocatable memory.
    pub expected_delta: Option<i64>,
    pub ok: bool,
}

impl DecisionRecord {
    pub fn new(
        kind: DecisionKind,
        action: DecisionAction,
        capacity: Summary,
        episode: u64,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            time: now_rfc3339(),
            kind,
            action,
            capacity,
            episode,
            ..Self::default()
        }
    }
}

/// Anything the event log carries; `kind` tells the shapes apart.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Record {
    Event(Box<EventRecord>),
    Agent(Box<AgentRecord>),
    Decision(Box<DecisionRecord>),
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| D::Error::missing_field("kind"))?;
        match kind {
            "cpu" | "memory_block" | "memory" => {
                serde_json::from_value(v).map(|e| Self::Event(Box::new(e)))
            }
            "agent" => serde_json::from_value(v).map(|a| Self::Agent(Box::new(a))),
            _ => serde_json::from_value(v).map(|d| Self::Decision(Box::new(d))),
        }
        .map_err(D::Error::custom)
    }
}

/// A field that is there, even as `null`, is `Some`: `"rescan_interval_s": null` (the guard
/// is off) must not read back as a record without the field.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// RFC 3339 for a moment `after` from now.
pub fn rfc3339_in(after: std::time::Duration) -> String {
    humantime::format_rfc3339_micros(SystemTime::now() + after).to_string()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_round_trip_with_the_documented_field_names() {
        let rec = EventRecord {
            v: SCHEMA_VERSION,
            time: now_rfc3339(),
            source: Source::Uevent,
            kind: Kind::MemoryBlock,
            action: Action::Offline,
            device: Some("memory42".into()),
            capacity: Summary {
                memory_bytes: 1 << 30,
                cpus_online: 2,
            },
            mono_ns: 5,
            seqnum: Some(7),
            probe: None,
            kernel_ns: None,
            delivery_ns: None,
            pid: None,
            comm: None,
            cpu: None,
            pages: None,
            hits: None,
            reason: None,
        };
        let line = serde_json::to_string(&rec).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], "memory_block");
        assert_eq!(v["action"], "offline");
        assert_eq!(v["source"], "uevent");
        assert_eq!(v["capacity"]["memory_bytes"], 1u64 << 30);
        assert!(
            v.get("kernel_ns").is_none(),
            "absent optional fields stay out: {line}"
        );
        // RFC 3339 UTC with microseconds: 2026-11-27T20:56:57.123456Z
        let t = v["time"].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 27, "{t}");
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, Record::Event(Box::new(rec)));
        let decision = DecisionRecord::new(
            DecisionKind::Refresh,
            DecisionAction::Failed,
            Summary::default(),
            3,
        );
        let line = serde_json::to_string(&Record::Decision(Box::new(decision.clone()))).unwrap();
        assert_eq!(
            serde_json::from_str::<Record>(&line).unwrap(),
            Record::Decision(Box::new(decision))
        );
        let agent = AgentRecord::new(AgentAction::Ready, Summary::default());
        let line = serde_json::to_string(&Record::Agent(Box::new(agent.clone()))).unwrap();
        assert_eq!(
            serde_json::from_str::<Record>(&line).unwrap(),
            Record::Agent(Box::new(agent))
        );
    }
}
