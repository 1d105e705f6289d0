//! The event sources: what the kernel tells us, as it happens.
//!
//! - [`uevent`]: the kernel's uevent netlink socket (udev crate's kernel monitor).
//! - [`ebpf`]: tracepoints and, where the kernel allows, fentry/kprobe hooks (aya).
//! - [`cpuhp`]: the CPU-hotplug state names the eBPF filter needs.
//! - [`coalesce`]: folds the kernel's per-zone and per-chunk repeats into one record.
//! - [`scan`]: full snapshots at start-up and after a detected loss, and their diff.
//!
//! Each source sends [`SourceMsg`]s into one channel; none of them may stop the agent.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::record::{Action, Kind, Source};

pub mod coalesce;
pub mod cpuhp;
pub mod ebpf;
pub mod scan;
pub mod uevent;

/// A change one source saw, before the capacity is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub source: Source,
    pub kind: Kind,
    pub action: Action,
    pub device: Option<String>,
    pub detail: Detail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    None,
    Uevent {
        seqnum: u64,
    },
    Probe {
        probe: &'static str,
        kernel_ns: u64,
        delivery_ns: u64,
        pid: u32,
        comm: String,
        cpu: u32,
        pages: Option<i64>,
        hits: u32,
    },
    Scan {
        reason: &'static str,
    },
}

/// Why events may have been lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The uevent socket overflowed (`ENOBUFS`): events are certainly gone.
    Enobufs,
    /// uevent sequence numbers skipped. uevents of devices in other network namespaces
    /// also leave gaps, so this only asks for a check.
    SeqnumGap { expected: u64, got: u64 },
    /// The eBPF ring buffer was full.
    RingbufDrops { dropped: u64 },
}

impl Loss {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Enobufs => "enobufs",
            Self::SeqnumGap { .. } => "seqnum_gap",
            Self::RingbufDrops { .. } => "ringbuf_drops",
        }
    }

    /// A certain loss is announced; a possible one only when the rescan finds something.
    pub fn is_certain(&self) -> bool {
        !matches!(self, Self::SeqnumGap { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceMsg {
    Change(Change),
    Loss { source: Source, loss: Loss },
}

/// Counters every source keeps: datagrams and ring-buffer records seen, ignored, malformed,
/// the socket's overflows and seqnum gaps; on `/metrics` (report/source_metrics.rs).
#[derive(Debug, Default)]
pub struct Counters {
    pub uevents: AtomicU64,
    pub uevents_ignored: AtomicU64,
    pub uevents_malformed: AtomicU64,
    pub uevent_overflows: AtomicU64,
    /// `SEQNUM` jumps: uevents this socket never saw (other network namespaces' devices
    /// leave such gaps too, so a gap is a reason to check, not a proven loss).
    pub uevent_seqnum_gaps: AtomicU64,
    pub probe_records: AtomicU64,
    pub probe_malformed: AtomicU64,
    pub ringbuf_drops: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The whole `source` chain of an error on one line, for records and warnings.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
