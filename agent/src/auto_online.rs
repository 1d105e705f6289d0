//! Auto-online: the opt-in policy that onlines memory blocks and CPUs that arrive with a
//! uevent `add`.
//!
//! Many kernels leave hot-added memory offline (`auto_online_blocks` is `offline`, or
//! `memhp_default_state=offline`) and distros ship udev rules to online it; hot-added CPUs
//! often arrive offline too. Where no such rule runs, `--auto-online-memory` and
//! `--auto-online-cpus` make the agent do it, with three promises:
//!
//! - Only an arrival is onlined: a uevent `add` from the kernel, seen while the agent ran.
//!   A block or CPU that is offline for any other reason (an administrator's
//!   `echo offline`, one already offline at start-up, one a rescan found) is left alone.
//! - Once per arrival: one write right after the `add` record, never retried; a failure is
//!   reported, not repeated. A later `offline` of the same device is the operator's call.
//! - Recorded: an `agent` record with action `auto_online`, the `device`, the `state`
//!   written and, when the write failed, the `error`. The kernel's own `online` uevent
//!   follows, so an episode that began with the `add` also sees the capacity arrive.
//!
//! The decision is pure ([`arrival`], [`decide`]); [`apply`] does the sysfs I/O.
//! drivers/base/memory.c (v6.1) `state_store`: `online`, `online_kernel`, `online_movable`;
//! drivers/base/core.c `online_store`: `1` onlines a CPU.
use crate::record::AgentAction;
use std::{
    io,
    path::{Path, PathBuf},
};

use tokio::sync::mpsc;

use crate::{
    capacity::Summary,
    record::{Action, AgentRecord, Kind, Record, Source},
    sources::Change,
};

/// `--auto-online-memory`: what to write to a new block's `state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryPolicy {
    /// Leave new blocks as the kernel made them.
    #[default]
    Off,
    /// `online`: the kernel picks the zone (ZONE_NORMAL unless configured otherwise).
    Online,
    /// `online_movable`: ZONE_MOVABLE, so the block can be hot-unplugged again (a DIMM
    /// onlined as plain `online` usually cannot).
    #[value(name = "online_movable")]
    OnlineMovable,
    /// `online_kernel`: ZONE_NORMAL, usable for kernel allocations, rarely removable.
    #[value(name = "online_kernel")]
    OnlineKernel,
}

impl MemoryPolicy {
    fn state(self) -> Option<&'static str> {
        match self {
            Self::Off => None,
            Self::Online => Some("online"),
            Self::OnlineMovable => Some("online_movable"),
            Self::OnlineKernel => Some("online_kernel"),
        }
    }
}

/// `--auto-online-cpus`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuPolicy {
    #[default]
    Off,
    On,
}

/// Both halves; the default (off, off) never touches the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub memory: MemoryPolicy,
    pub cpus: CpuPolicy,
}

impl Policy {
    pub fn is_off(self) -> bool {
        self.memory == MemoryPolicy::Off && self.cpus == CpuPolicy::Off
    }
}

/// A device that just arrived and that the policy wants online.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub kind: Kind,
    /// `memory40`, `cpu1`.
    pub device: String,
    /// The state to reach: `online`, `online_movable`, `online_kernel` (memory), `online` (CPU).
    pub state: &'static str,
}

impl Arrival {
    /// The sysfs file to write, under `root`.
    fn file(&self, root: &Path) -> std::path::PathBuf {
        match self.kind {
            Kind::Cpu => root
                .join("sys/devices/system/cpu")
                .join(&self.device)
                .join("online"),
            _ => root
                .join("sys/devices/system/memory")
                .join(&self.device)
                .join("state"),
        }
    }

    /// What the file takes: the state for a block, `1` for a CPU.
    fn value(&self) -> &'static str {
        match self.kind {
            Kind::Cpu => "1",
            _ => self.state,
        }
    }
}

/// Whether `change` is an arrival this policy onlines. Only a kernel uevent `add` is an
/// arrival; the device name comes from the kernel, and anything that could leave its
/// sysfs directory is refused.
pub fn arrival(policy: Policy, change: &Change) -> Option<Arrival> {
    if change.source != Source::Uevent || change.action != Action::Add {
        return None;
    }
    let device = change.device.as_deref()?;
    if device.is_empty() || device.contains('/') || device.starts_with('.') {
        return None;
    }
    let state = match change.kind {
        Kind::MemoryBlock => policy.memory.state()?,
        Kind::Cpu if policy.cpus == CpuPolicy::On => "online",
        _ => return None,
    };
    Some(Arrival {
        kind: change.kind,
        device: device.to_owned(),
        state,
    })
}

/// Whether to write, given what the device's file reads now: only an offline device is
/// onlined (one that a udev rule or the kernel already onlined is left as it is).
pub fn decide(arrival: &Arrival, current: &str) -> bool {
    match arrival.kind {
        Kind::Cpu => current.trim() == "0",
        _ => current.trim() == "offline",
    }
}

/// What [`apply`] did.
#[derive(Debug)]
pub struct Outcome {
    pub arrival: Arrival,
    /// `None` when the write worked.
    pub error: Option<String>,
}

impl Outcome {
    /// The `auto_online` record, with the capacity after the write.
    pub fn record(&self, capacity: Summary) -> AgentRecord {
        let mut rec = AgentRecord::new(AgentAction::AutoOnline, capacity);
        rec.device = Some(self.arrival.device.clone());
        rec.state = Some(self.arrival.state.to_owned());
        rec.error = self.error.clone();
        rec
    }
}

/// The agent's onlining, off the event pipeline: the pipeline queues each arrival and goes
/// on reading events; one worker thread writes them in the order they came. Writes are not
/// parallel on purpose: the kernel serialises onlining under its hotplug lock anyway, and
/// one writer keeps the order (and the log) readable. A 512-block DIMM is 512 writes that
/// take seconds on a slow VM; none of that time is spent inside the pipeline, so the
/// events of the blocks onlined meanwhile are recorded as they happen.
#[derive(Debug)]
pub struct Onliner {
    queue: std::sync::mpsc::Sender<Arrival>,
}

impl Onliner {
    /// Starts the worker. Each write that happened becomes an `auto_online` record on
    /// `out`, with the capacity right after it; the worker ends when `out` closes or the
    /// onliner is dropped.
    pub fn spawn(root: PathBuf, out: mpsc::Sender<Record>) -> io::Result<Self> {
        let (queue, arrivals) = std::sync::mpsc::channel::<Arrival>();
        std::thread::Builder::new()
            .name("auto-online".into())
            .spawn(move || {
                let mut last = Summary::default();
                for arrival in arrivals {
                    let Some(outcome) = apply(&root, arrival) else {
                        continue;
                    };
                    if let Ok(now) = crate::capacity::read_summary(&root) {
                        last = now;
                    }
                    let record = Record::Agent(Box::new(outcome.record(last)));
                    if out.blocking_send(record).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { queue })
    }

    /// Queues an arrival; never blocks.
    pub fn queue(&self, arrival: Arrival) {
        if let Err(e) = self.queue.send(arrival) {
            tracing::warn!(device = %e.0.device, "auto-online worker gone; not onlined");
        }
    }
}

/// Onlines `arrival` if it is still offline. `None`: nothing was written (already online,
/// or gone again). Blocking: onlining a CPU or a block takes a while on a slow VM.
pub fn apply(root: &Path, arrival: Arrival) -> Option<Outcome> {
    let file = arrival.file(root);
    let current = match std::fs::read_to_string(&file) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(file = %file.display(), error = %e, "auto-online: cannot read the state; skipped");
            return None;
        }
    };
    if !decide(&arrival, &current) {
        tracing::debug!(device = %arrival.device, state = current.trim(), "auto-online: not offline; left alone");
        return None;
    }
    let error = write(&file, arrival.value()).err().map(|e| {
        let error = format!("writing {:?} to {}: {e}", arrival.value(), file.display());
        tracing::warn!("auto-online: {error}");
        error
    });
    Some(Outcome { arrival, error })
}

/// One `write(2)` of the whole value, opened as `echo value > file` opens it; sysfs takes
/// a store in one call.
fn write(file: &Path, value: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Detail;

    fn change(source: Source, kind: Kind, action: Action, device: &str) -> Change {
        Change {
            source,
            kind,
            action,
            device: Some(device.into()),
            detail: Detail::None,
        }
    }

    const MOVABLE: Policy = Policy {
        memory: MemoryPolicy::OnlineMovable,
        cpus: CpuPolicy::On,
    };

    #[test]
    fn only_a_uevent_add_is_an_arrival() {
        let add = change(Source::Uevent, Kind::MemoryBlock, Action::Add, "memory40");
        assert_eq!(
            arrival(MOVABLE, &add),
            Some(Arrival {
                kind: Kind::MemoryBlock,
                device: "memory40".into(),
                state: "online_movable"
            })
        );
        // An operator's offline, a block found by a rescan, the kernel's own online: not ours.
        for (source, action) in [
            (Source::Uevent, Action::Offline),
            (Source::Uevent, Action::Online),
            (Source::Uevent, Action::Remove),
            (Source::Uevent, Action::Change),
            (Source::Scan, Action::Add),
            (Source::Scan, Action::Offline),
            (Source::Ebpf, Action::Add),
        ] {
            let c = change(source, Kind::MemoryBlock, action, "memory40");
            assert_eq!(arrival(MOVABLE, &c), None, "{source:?} {action:?}");
        }
        // MemTotal records from the probes name no device.
        let resize = Change {
            device: None,
            ..change(Source::Ebpf, Kind::Memory, Action::Resize, "")
        };
        assert_eq!(arrival(MOVABLE, &resize), None);
    }

    #[test]
    fn each_half_of_the_policy_is_separate_and_off_by_default() {
        let block = change(Source::Uevent, Kind::MemoryBlock, Action::Add, "memory7");
        let cpu = change(Source::Uevent, Kind::Cpu, Action::Add, "cpu1");
        assert!(Policy::default().is_off());
        assert_eq!(arrival(Policy::default(), &block), None);
        assert_eq!(arrival(Policy::default(), &cpu), None);
        let cpus_only = Policy {
            memory: MemoryPolicy::Off,
            cpus: CpuPolicy::On,
        };
        assert_eq!(arrival(cpus_only, &block), None);
        assert_eq!(arrival(cpus_only, &cpu).map(|a| a.state), Some("online"));
        for (memory, state) in [
            (MemoryPolicy::Online, "online"),
            (MemoryPolicy::OnlineMovable, "online_movable"),
            (MemoryPolicy::OnlineKernel, "online_kernel"),
        ] {
            let policy = Policy {
                memory,
                cpus: CpuPolicy::Off,
            };
            assert_eq!(arrival(policy, &block).map(|a| a.state), Some(state));
            assert_eq!(arrival(policy, &cpu), None);
        }
    }

    #[test]
    fn refuses_device_names_that_leave_sysfs() {
        for device in ["", "../memory1", "memory1/../../x", ".."] {
            let c = change(Source::Uevent, Kind::MemoryBlock, Action::Add, device);
            assert_eq!(arrival(MOVABLE, &c), None, "{device:?}");
        }
    }

    #[test]
    fn only_an_offline_device_is_written() {
        let block = arrival(
            MOVABLE,
            &change(Source::Uevent, Kind::MemoryBlock, Action::Add, "memory40"),
        )
        .unwrap();
        assert!(decide(&block, "offline\n"));
        assert!(!decide(&block, "online\n"));
        assert!(!decide(&block, "going-offline\n"));
        let cpu = arrival(
            MOVABLE,
            &change(Source::Uevent, Kind::Cpu, Action::Add, "cpu3"),
        )
        .unwrap();
        assert!(decide(&cpu, "0\n"));
        assert!(!decide(&cpu, "1\n"));
    }

    #[tokio::test]
    async fn applies_once_to_a_fixture_tree_and_records_it() {
        let root = tempfile::tempdir().unwrap();
        let block = root.path().join("sys/devices/system/memory/memory40");
        let cpu = root.path().join("sys/devices/system/cpu/cpu1");
        std::fs::create_dir_all(&block).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(block.join("state"), "offline\n").unwrap();
        std::fs::write(cpu.join("online"), "0\n").unwrap();

        let add = change(Source::Uevent, Kind::MemoryBlock, Action::Add, "memory40");
        let out = apply(root.path(), arrival(MOVABLE, &add).unwrap())
            .expect("an offline block is onlined");
        assert_eq!(out.error, None);
        assert_eq!(
            std::fs::read_to_string(block.join("state")).unwrap(),
            "online_movable"
        );
        let rec = out.record(Summary {
            memory_bytes: 1 << 30,
            cpus_online: 1,
        });
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            (&v["kind"], &v["action"], &v["device"], &v["state"]),
            (
                &"agent".into(),
                &"auto_online".into(),
                &"memory40".into(),
                &"online_movable".into()
            )
        );
        assert!(v.get("error").is_none(), "{v}");

        let cpu_add = change(Source::Uevent, Kind::Cpu, Action::Add, "cpu1");
        let out = apply(root.path(), arrival(MOVABLE, &cpu_add).unwrap()).unwrap();
        assert_eq!(out.error, None);
        assert_eq!(std::fs::read_to_string(cpu.join("online")).unwrap(), "1");

        // Already online (a fixture file holds what was written): nothing to do.
        std::fs::write(block.join("state"), "online\n").unwrap();
        assert!(apply(root.path(), arrival(MOVABLE, &add).unwrap()).is_none());
        // Gone before we got to it.
        let gone = change(Source::Uevent, Kind::MemoryBlock, Action::Add, "memory41");
        assert!(apply(root.path(), arrival(MOVABLE, &gone).unwrap()).is_none());
    }

    #[test]
    fn a_failed_write_is_in_the_record() {
        let arrival = Arrival {
            kind: Kind::Cpu,
            device: "cpu2".into(),
            state: "online",
        };
        let out = Outcome {
            arrival,
            error: Some("writing \"1\" to /sys/devices/system/cpu/cpu2/online: EBUSY".into()),
        };
        let v = serde_json::to_value(out.record(Summary::default())).unwrap();
        assert_eq!(
            (&v["device"], &v["state"]),
            (&"cpu2".into(), &"online".into())
        );
        assert!(v["error"].as_str().unwrap().contains("EBUSY"), "{v}");
    }
}
