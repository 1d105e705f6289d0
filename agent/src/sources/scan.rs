//! Snapshots as a source: what changed that the event stream did not say.
//!
//! The agent keeps [`Known`]: the machine as its records have described it (start-up
//! snapshot, then every change applied). A rescan (after a detected loss, or the slow
//! guard where the precise probes cannot attach) compares a fresh snapshot with it and
//! reports exactly the difference, as `scan` records.
use std::collections::{BTreeMap, BTreeSet};

use super::{Change, Detail};
use crate::{
    capacity::{BlockState, Snapshot},
    record::{Action, Kind, Source},
};

/// The machine as the event log has told it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    pub cpus: BTreeSet<u32>,
    pub blocks: BTreeMap<u32, BlockState>,
    pub memory_bytes: u64,
}

impl Known {
    pub fn from_snapshot(s: &Snapshot) -> Self {
        let cpus = crate::capacity::parse_cpu_list(&s.cpus_online_list)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let blocks = s.memory_blocks.iter().map(|b| (b.id, b.state)).collect();
        Self {
            cpus,
            blocks,
            memory_bytes: s.memory_bytes,
        }
    }

    /// Follows a change the log reported, so a later rescan does not report it again.
    pub fn apply(&mut self, change: &Change, memory_bytes: u64) {
        self.memory_bytes = memory_bytes;
        let Some(id) = change.device.as_deref().and_then(device_number) else {
            return;
        };
        match (change.kind, change.action) {
            (Kind::Cpu, Action::Online) => {
                self.cpus.insert(id);
            }
            (Kind::Cpu, Action::Offline | Action::Remove) => {
                self.cpus.remove(&id);
            }
            (Kind::MemoryBlock, Action::Online) => {
                self.blocks.insert(id, BlockState::Online);
            }
            (Kind::MemoryBlock, Action::Offline) => {
                self.blocks.insert(id, BlockState::Offline);
            }
            (Kind::MemoryBlock, Action::Add) => {
                // A new block arrives offline unless the kernel onlines it; its own
                // `online` uevent follows if so.
                self.blocks.entry(id).or_insert(BlockState::Offline);
            }
            (Kind::MemoryBlock, Action::Remove) => {
                self.blocks.remove(&id);
            }
            _ => {}
        }
    }

    /// What a fresh snapshot shows that the log has not said; `Known` becomes the snapshot.
    pub fn rescan(&mut self, fresh: &Snapshot, reason: &'static str) -> Vec<Change> {
        let new = Known::from_snapshot(fresh);
        let mut out = Vec::new();
        let mut push = |kind, action, device: Option<String>| {
            out.push(Change {
                source: Source::Scan,
                kind,
                action,
                device,
                detail: Detail::Scan { reason },
            });
        };
        for cpu in new.cpus.difference(&self.cpus) {
            push(Kind::Cpu, Action::Online, Some(format!("cpu{cpu}")));
        }
        for cpu in self.cpus.difference(&new.cpus) {
            push(Kind::Cpu, Action::Offline, Some(format!("cpu{cpu}")));
        }
        let mut block_changed = false;
        for (id, state) in &new.blocks {
            let device = Some(format!("memory{id}"));
            match self.blocks.get(id) {
                None => {
                    push(Kind::MemoryBlock, Action::Add, device.clone());
                    if *state == BlockState::Online {
                        push(Kind::MemoryBlock, Action::Online, device);
                    }
                    block_changed = true;
                }
                Some(old) if old != state => {
                    match state {
                        BlockState::Online => push(Kind::MemoryBlock, Action::Online, device),
                        BlockState::Offline => push(Kind::MemoryBlock, Action::Offline, device),
                        _ => push(Kind::MemoryBlock, Action::Change, device),
                    }
                    block_changed = true;
                }
                Some(_) => {}
            }
        }
        for id in self.blocks.keys().filter(|id| !new.blocks.contains_key(id)) {
            push(
                Kind::MemoryBlock,
                Action::Remove,
                Some(format!("memory{id}")),
            );
            block_changed = true;
        }
        // MemTotal moved with no block to explain it: virtio-mem inside a block, a balloon.
        if new.memory_bytes != self.memory_bytes && !block_changed {
            push(Kind::Memory, Action::Resize, None);
        }
        *self = new;
        out
    }
}

/// `cpu12` -> 12, `memory42` -> 42.
fn device_number(device: &str) -> Option<u32> {
    let digits = device.trim_start_matches(|c: char| !c.is_ascii_digit());
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::MemoryBlock;

    fn snapshot(cpus: &str, blocks: &[(u32, BlockState)], memory_bytes: u64) -> Snapshot {
        let list = crate::capacity::parse_cpu_list(cpus).unwrap();
        Snapshot {
            memory_bytes,
            cpus_online: list.len() as u32,
            cpus_online_list: cpus.into(),
            cpus_possible: 4,
            memory_block_size: Some(128 << 20),
            memory_blocks: blocks
                .iter()
                .map(|&(id, state)| MemoryBlock {
                    id,
                    state,
                    zone: None,
                    node: None,
                })
                .collect(),
            hugepages: Vec::new(),
            numa_nodes: Vec::new(),
        }
    }

    fn summary(changes: &[Change]) -> Vec<(Kind, Action, Option<String>)> {
        changes
            .iter()
            .map(|c| (c.kind, c.action, c.device.clone()))
            .collect()
    }

    #[test]
    fn reports_only_what_the_log_missed() {
        use BlockState::{Offline, Online};
        let start = snapshot("0-1", &[(0, Online), (1, Online), (2, Online)], 3 << 27);
        let mut known = Known::from_snapshot(&start);
        // The log saw block 1 go offline...
        let seen = Change {
            source: Source::Uevent,
            kind: Kind::MemoryBlock,
            action: Action::Offline,
            device: Some("memory1".into()),
            detail: Detail::None,
        };
        known.apply(&seen, 2 << 27);
        // ...but missed block 2 going offline, cpu1 going offline and a new block 3.
        let now = snapshot(
            "0",
            &[(0, Online), (1, Offline), (2, Offline), (3, Offline)],
            1 << 27,
        );
        let got = summary(&known.rescan(&now, "enobufs"));
        assert_eq!(
            got,
            vec![
                (Kind::Cpu, Action::Offline, Some("cpu1".into())),
                (Kind::MemoryBlock, Action::Offline, Some("memory2".into())),
                (Kind::MemoryBlock, Action::Add, Some("memory3".into())),
            ]
        );
        // Nothing new: nothing reported.
        assert!(known.rescan(&now, "interval").is_empty());
    }

    #[test]
    fn memtotal_moving_without_blocks_is_a_resize() {
        let s = snapshot("0-1", &[(0, BlockState::Online)], 1 << 30);
        let mut known = Known::from_snapshot(&s);
        let grown = snapshot("0-1", &[(0, BlockState::Online)], (1 << 30) + (32 << 20));
        let got = summary(&known.rescan(&grown, "interval"));
        assert_eq!(got, vec![(Kind::Memory, Action::Resize, None)]);
        assert_eq!(known.memory_bytes, (1 << 30) + (32 << 20));
    }

    #[test]
    fn device_numbers() {
        assert_eq!(device_number("cpu12"), Some(12));
        assert_eq!(device_number("memory042"), Some(42));
        assert_eq!(device_number("node"), None);
    }
}
