//! Memory the kernel is taking away right now: what the machine is heading to while an
//! unplug is still under way.
//!
//! Offlining a memory block migrates every page in use out of it first, which takes from
//! milliseconds to minutes, and never ends while a page cannot move (no timeout since
//! Linux 5.7: mm/memory_hotplug.c `offline_pages` retries until it succeeds or a signal
//! comes). The `offline` uevent and the smaller MemTotal arrive only at the end. The
//! `offline_pages` kernel probe fires at the start, and sysfs shows the block as
//! `going-offline` meanwhile: that is the moment the agent can still make room, instead of
//! the OOM killer or a stalled eject deciding.
//!
//! Which blocks go:
//! - every block sysfs shows `going-offline`;
//! - when the kernel itself is offlining (a kernel worker, not a process writing `state`):
//!   an ACPI eject of a memory device offlines every block of that device before it removes
//!   any (drivers/acpi/scan.c `acpi_scan_try_to_offline`), so the device's other blocks
//!   still online go too. The device's blocks are its `physical_node*` links, found through
//!   the block's `firmware_node` (drivers/acpi/acpi_memhotplug.c binds each block). An
//!   administrator who offlines one block of a DIMM by hand offlines only that one.
//!
//! Without the probe (no kprobe/fentry on the kernel) the first sign is a block's `offline`
//! uevent, after that block is done: the agent then acts at the episode's end as before.
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::capacity::{BlockState, MEMORY_DIR, Snapshot};

/// The kernel started offlining memory (an `offline_pages` probe record): the controller
/// looks at once, not when the episode settles. `seq` counts the starts so far; `by_kernel`
/// is whether the latest was the kernel's own worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Started {
    pub seq: u64,
    pub by_kernel: bool,
}

/// Whether an event record is the kernel starting to offline memory.
pub fn started_by(record: &crate::record::EventRecord) -> Option<bool> {
    let probe = record.probe.as_deref()?;
    (record.source == crate::record::Source::Ebpf && probe.ends_with("/offline_pages"))
        .then(|| record.comm.as_deref().is_some_and(by_kernel))
}

/// The starts, as the controller receives them (episode.rs publishes them).
#[derive(Debug)]
pub struct Starts(pub(crate) tokio::sync::watch::Receiver<Started>);

impl Starts {
    /// The next start (several that came meanwhile are one: the controller reads sysfs
    /// then, which shows them all); `None` once the tracker is gone.
    pub async fn next(&mut self) -> Option<Started> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }
}

/// A memory block's device name in sysfs.
fn block_name(id: u32) -> String {
    format!("memory{id}")
}

/// What an offline already under way will leave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heading {
    /// The blocks that are going (sysfs names, sorted by id).
    pub blocks: Vec<String>,
    /// The machine's memory once they are gone: MemTotal now minus a block's size for each
    /// one that still counts in it.
    pub memory_bytes: u64,
}

impl Heading {
    /// `machine` as it will be: the blocks offline, their NUMA nodes and MemTotal smaller.
    pub fn apply(&self, machine: &Snapshot) -> Snapshot {
        let mut after = machine.clone();
        let block_size = machine.memory_block_size.unwrap_or(0);
        after.memory_bytes = self.memory_bytes;
        for block in after
            .memory_blocks
            .iter_mut()
            .filter(|b| self.blocks.contains(&block_name(b.id)))
        {
            block.state = BlockState::Offline;
            block.zone = None;
            if let Some(node) = after
                .numa_nodes
                .iter_mut()
                .find(|n| Some(n.id) == block.node)
            {
                node.memory_bytes = node.memory_bytes.saturating_sub(block_size);
            }
        }
        after
    }
}

/// Whether a probe record's task is the kernel's own worker (an ACPI eject, a driver such as
/// virtio-mem) rather than a process that wrote a block's `state`.
pub fn by_kernel(comm: &str) -> bool {
    comm.starts_with("kworker/")
}

/// The machine the offline under way is heading to, or `None` when no block is going
/// offline (any more) or block sizes are unknown.
pub fn heading(root: &Path, machine: &Snapshot, by_kernel: bool) -> Option<Heading> {
    let block_size = machine.memory_block_size?;
    let state = |id: u32| {
        machine
            .memory_blocks
            .iter()
            .find(|b| b.id == id)
            .map(|b| b.state)
    };
    let going: Vec<u32> = machine
        .memory_blocks
        .iter()
        .filter(|b| b.state == BlockState::GoingOffline)
        .map(|b| b.id)
        .collect();
    if going.is_empty() {
        return None;
    }
    let mut ids = going.clone();
    if by_kernel {
        for id in &going {
            ids.extend(
                device_blocks(root, *id)
                    .into_iter()
                    .filter(|b| state(*b) == Some(BlockState::Online)),
            );
        }
    }
    ids.sort_unstable();
    ids.dedup();
    // A going-offline block still counts in MemTotal (the kernel takes its pages off at the
    // end), as does an online one.
    let leaving = block_size.saturating_mul(ids.len() as u64);
    Some(Heading {
        blocks: ids.into_iter().map(block_name).collect(),
        memory_bytes: machine.memory_bytes.saturating_sub(leaving),
    })
}

/// The memory blocks of the firmware device block `id` belongs to (itself included); empty
/// when it has none (boot memory, virtio-mem) or sysfs cannot be read.
fn device_blocks(root: &Path, id: u32) -> Vec<u32> {
    let memory_dir = root.join(MEMORY_DIR);
    let Ok(device) = fs::canonicalize(memory_dir.join(block_name(id)).join("firmware_node")) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(&device) else {
        return Vec::new();
    };
    let memory_dir = fs::canonicalize(&memory_dir).unwrap_or(memory_dir);
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("physical_node"))
        .filter_map(|e| fs::canonicalize(e.path()).ok())
        .filter_map(|target: PathBuf| {
            if target.parent()? != memory_dir {
                return None;
            }
            target
                .file_name()?
                .to_str()?
                .strip_prefix("memory")?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::capacity::read_snapshot;

    const MIB: u64 = 1 << 20;

    /// A machine with boot blocks 0-3 and a DIMM (ACPI PNP0C80:00) of blocks 8-11, the
    /// DIMM's first block going offline.
    fn machine(dir: &Path, dimm_states: [&str; 4]) {
        let write = |p: &str, text: &str| {
            let p = dir.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        write("proc/meminfo", &format!("MemTotal: {} kB\n", 1024 * 1024));
        write("sys/devices/system/cpu/online", "0\n");
        write("sys/devices/system/memory/block_size_bytes", "8000000\n");
        let acpi = "sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:00/PNP0C80:00";
        fs::create_dir_all(dir.join(acpi)).unwrap();
        for id in 0..4 {
            write(
                &format!("sys/devices/system/memory/memory{id}/state"),
                "online\n",
            );
        }
        for (n, state) in dimm_states.iter().enumerate() {
            let id = 8 + n;
            write(
                &format!("sys/devices/system/memory/memory{id}/state"),
                &format!("{state}\n"),
            );
            // The kernel's links are relative, as here.
            symlink(
                format!("../../../{}", acpi.trim_start_matches("sys/devices/")),
                dir.join(format!(
                    "sys/devices/system/memory/memory{id}/firmware_node"
                )),
            )
            .unwrap();
            let link = if n == 0 {
                "physical_node".to_owned()
            } else {
                format!("physical_node{n}")
            };
            symlink(
                format!("../../../../system/memory/memory{id}"),
                dir.join(acpi).join(link),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_kernel_eject_takes_the_whole_device_a_hand_offline_one_block() {
        let dir = tempfile::tempdir().unwrap();
        machine(dir.path(), ["going-offline", "online", "online", "offline"]);
        let snap = read_snapshot(dir.path()).unwrap();

        let eject = heading(dir.path(), &snap, true).unwrap();
        // memory11 is offline already: it no longer counts in MemTotal.
        assert_eq!(eject.blocks, ["memory8", "memory9", "memory10"]);
        assert_eq!(eject.memory_bytes, 1024 * MIB - 3 * 128 * MIB);

        let by_hand = heading(dir.path(), &snap, false).unwrap();
        assert_eq!(by_hand.blocks, ["memory8"]);
        assert_eq!(by_hand.memory_bytes, 1024 * MIB - 128 * MIB);
    }

    #[test]
    fn nothing_going_offline_is_no_heading() {
        let dir = tempfile::tempdir().unwrap();
        machine(dir.path(), ["online", "online", "online", "online"]);
        let snap = read_snapshot(dir.path()).unwrap();
        assert_eq!(heading(dir.path(), &snap, true), None);
    }

    #[test]
    fn a_block_without_a_firmware_device_goes_alone() {
        let dir = tempfile::tempdir().unwrap();
        machine(dir.path(), ["online", "online", "online", "online"]);
        fs::write(
            dir.path().join("sys/devices/system/memory/memory2/state"),
            "going-offline\n",
        )
        .unwrap();
        let snap = read_snapshot(dir.path()).unwrap();
        let h = heading(dir.path(), &snap, true).unwrap();
        assert_eq!(h.blocks, ["memory2"]);
    }

    #[test]
    fn kernel_workers_are_the_kernel() {
        assert!(by_kernel("kworker/u4:2"));
        assert!(!by_kernel("bash"));
        assert!(!by_kernel("kworker"));
    }
}
