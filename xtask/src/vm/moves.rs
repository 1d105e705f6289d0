//! The hotplug moves the scenarios are made of: plug and unplug over QMP, each waiting for
//! the agent's own records.
//!
//! A move waits for the `add` (or `remove`) uevents of what arrived (or left) and for the
//! first record whose capacity shows the new total. The host's clock is read just before
//! the QMP command and when that record arrives over virtio-serial: that difference is the
//! latency figure. (QEMU's own `MEMORY_DEVICE_SIZE_CHANGE` events are rate-limited and
//! arrive ~1 s late: useless for timing; VM-HOTPLUG.md trap 4.)
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    guest::Rec,
    session::{Cpu, Dimm, Move, Session, WAIT},
};

impl Session {
    /// Hot-adds a DIMM of `size` bytes (a fresh memory-backend-ram behind it).
    pub fn plug_dimm(&mut self, size: u64) -> anyhow::Result<Move> {
        let id = self.next("dimm");
        let (base_memory, base_cpus) = (self.memory()?, self.cpus_online()?);
        let from = self.vm.records.mark();
        self.qmp(
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": format!("mem-{id}"), "size": size}),
        )?;
        let t0 = Instant::now();
        self.qmp(
            "device_add",
            json!({"driver": "pc-dimm", "id": id, "memdev": format!("mem-{id}")}),
        )?;
        let n = (size / self.block_size) as usize;
        let adds = self.wait_n(from, "memory_block `add` uevents", n, |r| {
            r.source() == "uevent" && r.is("memory_block", "add")
        })?;
        let blocks: Vec<String> = adds.iter().map(|r| r.device().to_owned()).collect();
        self.dimms.push(Dimm {
            id,
            blocks: blocks.clone(),
        });
        let (record, latency) = self.wait_capacity(from, base_memory + size, base_cpus, t0)?;
        Ok(Move {
            from,
            devices: blocks,
            record,
            latency,
            base_memory,
            base_cpus,
        })
    }

    /// A DIMM plugged with nothing to online it yet: before the agent runs.
    pub fn preplug_offline_dimm(&mut self, size: u64) -> anyhow::Result<()> {
        let id = self.next("dimm");
        self.qmp(
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": format!("mem-{id}"), "size": size}),
        )?;
        let blocks_before = self.blocks()?;
        self.qmp(
            "device_add",
            json!({"driver": "pc-dimm", "id": id, "memdev": format!("mem-{id}")}),
        )?;
        let want = (size / self.block_size) as usize;
        let deadline = Instant::now() + WAIT;
        let blocks = loop {
            let new: Vec<String> = self
                .blocks()?
                .into_iter()
                .filter(|b| !blocks_before.contains(b))
                .collect();
            if new.len() >= want {
                break new;
            }
            if Instant::now() > deadline {
                bail!("the pre-plugged DIMM's blocks did not appear: {new:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.preplugged = Some(Dimm { id, blocks });
        Ok(())
    }

    fn blocks(&mut self) -> anyhow::Result<Vec<String>> {
        let out = self
            .vm
            .shell
            .check("ls /sys/devices/system/memory | grep '^memory'")?;
        Ok(out.split_whitespace().map(str::to_owned).collect())
    }

    /// Moves virtio-mem's requested size to `size`: new blocks when it grows past the
    /// blocks it has, sub-blocks inside one otherwise; blocks leave when it shrinks.
    pub fn set_vmem(&mut self, size: u64) -> anyhow::Result<Move> {
        let old = self.vmem_size;
        let (base_memory, base_cpus) = (self.memory()?, self.cpus_online()?);
        let from = self.vm.records.mark();
        let t0 = Instant::now();
        self.qmp(
            "qom-set",
            json!({"path": "vm0", "property": "requested-size", "value": size}),
        )?;
        let blocks = |bytes: u64| bytes.div_ceil(self.block_size) as usize;
        let (old_blocks, new_blocks) = (blocks(old), blocks(size));
        let mut devices = Vec::new();
        if new_blocks > old_blocks {
            let adds = self.wait_n(
                from,
                "memory_block `add` uevents",
                new_blocks - old_blocks,
                |r| r.source() == "uevent" && r.is("memory_block", "add"),
            )?;
            devices = adds.iter().map(|r| r.device().to_owned()).collect();
            self.vmem_blocks.extend(devices.iter().cloned());
        }
        let target = if size >= old {
            base_memory + (size - old)
        } else {
            base_memory.saturating_sub(old - size)
        };
        let (record, latency) = self.wait_capacity(from, target, base_cpus, t0)?;
        if new_blocks < old_blocks {
            let removes = self.wait_n(
                from,
                "memory_block `remove` uevents",
                old_blocks - new_blocks,
                |r| r.source() == "uevent" && r.is("memory_block", "remove"),
            )?;
            devices = removes.iter().map(|r| r.device().to_owned()).collect();
            self.vmem_blocks.retain(|b| !devices.contains(b));
        }
        self.vmem_size = size;
        Ok(Move {
            from,
            devices,
            record,
            latency,
            base_memory,
            base_cpus,
        })
    }

    /// Hot-adds a CPU in the lowest free slot: a slot that leaves a gap in the APIC IDs
    /// makes the TCG guest crawl (onlining takes 4-60 s; VM-HOTPLUG.md trap 1).
    pub fn plug_cpu(&mut self) -> anyhow::Result<Move> {
        let slots = self.qmp("query-hotpluggable-cpus", json!({}))?;
        let free = lowest_free_slot(&slots).context("no free CPU slot")?;
        let id = self.next("vcpu");
        let mut args = free["props"].clone();
        args["driver"] = free["type"].clone();
        args["id"] = json!(id);
        let (base_memory, base_cpus) = (self.memory()?, self.cpus_online()?);
        let from = self.vm.records.mark();
        let t0 = Instant::now();
        self.qmp("device_add", args)?;
        let add = self.wait_n(from, "cpu `add` uevent", 1, |r| {
            r.source() == "uevent" && r.is("cpu", "add")
        })?;
        let device = add[0].device().to_owned();
        self.cpus.push(Cpu {
            id,
            device: device.clone(),
        });
        let (record, latency) = self.wait_capacity(from, base_memory, base_cpus + 1, t0)?;
        Ok(Move {
            from,
            devices: vec![device],
            record,
            latency,
            base_memory,
            base_cpus,
        })
    }

    /// `device_del` of a DIMM: the guest offlines what is online, then removes every block.
    pub fn unplug_dimm(&mut self, dimm: &Dimm) -> anyhow::Result<Move> {
        let mut online = 0;
        for block in &dimm.blocks {
            if self.block_state(block)? == "online" {
                online += 1;
            }
        }
        let (base_memory, base_cpus) = (self.memory()?, self.cpus_online()?);
        let from = self.vm.records.mark();
        let t0 = Instant::now();
        self.qmp("device_del", json!({"id": dimm.id}))?;
        let removes = self.wait_removed(from, dimm)?;
        let target = base_memory - online * self.block_size;
        let (record, latency) = self.wait_capacity(from, target, base_cpus, t0)?;
        self.device_deleted(&dimm.id)?;
        Ok(Move {
            from,
            devices: removes.iter().map(|r| r.device().to_owned()).collect(),
            record,
            latency,
            base_memory,
            base_cpus,
        })
    }

    /// The `remove` uevents of every block of `dimm`, from record `from` on.
    pub fn wait_removed(&mut self, from: usize, dimm: &Dimm) -> anyhow::Result<Vec<Rec>> {
        self.wait_n(
            from,
            "memory_block `remove` uevents",
            dimm.blocks.len(),
            |r| {
                r.source() == "uevent"
                    && r.is("memory_block", "remove")
                    && dimm.blocks.iter().any(|b| b == r.device())
            },
        )
    }

    /// QEMU's side of an unplug is done (the guest ejected the device): only then the
    /// next one, as the unplug order matters to QEMU 7.2.
    fn device_deleted(&mut self, id: &str) -> anyhow::Result<()> {
        // QEMU 7.2 announces a vCPU's unplug only through its child, with no `device`:
        // `{"path": "/machine/peripheral/ID/lapic"}`.
        let path = format!("/machine/peripheral/{id}");
        let child = format!("{path}/");
        self.vm
            .qmp
            .wait_event("DEVICE_DELETED", WAIT, |e| {
                e["data"]["device"] == id
                    || e["data"]["path"]
                        .as_str()
                        .is_some_and(|p| p == path || p.starts_with(&child))
            })
            .map(|_| ())
    }

    /// `device_del` of a CPU: the guest takes it offline, then removes it.
    pub fn unplug_cpu(&mut self, cpu: &Cpu) -> anyhow::Result<Move> {
        let (base_memory, base_cpus) = (self.memory()?, self.cpus_online()?);
        let from = self.vm.records.mark();
        let t0 = Instant::now();
        self.qmp("device_del", json!({"id": cpu.id}))?;
        self.wait_n(from, "cpu `remove` uevent", 1, |r| {
            r.source() == "uevent" && r.is("cpu", "remove") && r.device() == cpu.device
        })?;
        let (record, latency) = self.wait_capacity(from, base_memory, base_cpus - 1, t0)?;
        self.device_deleted(&cpu.id)?;
        Ok(Move {
            from,
            devices: vec![cpu.device.clone()],
            record,
            latency,
            base_memory,
            base_cpus,
        })
    }
}

/// The free slot with the lowest socket, die, core and thread ids.
pub fn lowest_free_slot(slots: &Value) -> Option<Value> {
    let id = |s: &Value, k: &str| s["props"][k].as_u64().unwrap_or(0);
    slots
        .as_array()?
        .iter()
        .filter(|s| s.get("qom-path").is_none())
        .min_by_key(|s| {
            (
                id(s, "socket-id"),
                id(s, "die-id"),
                id(s, "core-id"),
                id(s, "thread-id"),
            )
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_lowest_free_cpu_slot() {
        let slots = json!([
            {"props": {"core-id": 3, "thread-id": 0, "node-id": 0, "socket-id": 0}, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 2, "thread-id": 0, "node-id": 0, "socket-id": 0}, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0}, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}, "qom-path": "/machine/unattached/device[0]", "type": "qemu64-x86_64-cpu"}
        ]);
        assert_eq!(lowest_free_slot(&slots).unwrap()["props"]["core-id"], 1);
        assert_eq!(lowest_free_slot(&json!([])), None);
    }
}
