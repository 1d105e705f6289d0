//! A booted guest with the agent in it: the devices plugged so far, the agent's start,
//! reads of the guest's state, and what to print when a scenario fails. The moves
//! themselves (plug, unplug) are in [`super::moves`].
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{guest::Rec, qemu::Vm};

pub const MIB: u64 = 1 << 20;
/// Longest wait for one record; a plug takes well under a second here.
pub const WAIT: Duration = Duration::from_secs(30);
/// The guest agent's records port (a link /init makes).
pub const RECORDS_PORT: &str = "/dev/virtio-ports/org.hotplug.records";

pub struct Dimm {
    pub id: String,
    pub blocks: Vec<String>,
}

pub struct Cpu {
    pub id: String,
    /// `cpu1`.
    pub device: String,
}

/// What one plug or unplug did.
pub struct Move {
    /// Index of the first record after the QMP command.
    pub from: usize,
    /// The devices that arrived or left (`memory40`, `cpu1`), from their uevents.
    pub devices: Vec<String>,
    /// The first record that showed the new capacity.
    pub record: Rec,
    /// From the QMP command to that record, on the host's clock.
    pub latency: Duration,
    pub base_memory: u64,
    pub base_cpus: u64,
}

pub struct Session {
    pub vm: Vm,
    /// The guest agent's `ready` record.
    pub ready: Option<Value>,
    pub block_size: u64,
    /// Plugged before the agent started: its blocks are offline and did not arrive under
    /// the agent's eyes, so auto-online must leave them alone.
    pub preplugged: Option<Dimm>,
    pub dimms: Vec<Dimm>,
    pub vmem_size: u64,
    pub vmem_blocks: Vec<String>,
    pub cpus: Vec<Cpu>,
    next_id: u32,
}

impl Session {
    pub fn new(vm: Vm) -> anyhow::Result<Self> {
        let mut s = Self {
            vm,
            ready: None,
            block_size: 0,
            preplugged: None,
            dimms: Vec::new(),
            vmem_size: 0,
            vmem_blocks: Vec::new(),
            cpus: Vec::new(),
            next_id: 0,
        };
        let hex =
            s.vm.shell
                .check("cat /sys/devices/system/memory/block_size_bytes")?;
        s.block_size = u64::from_str_radix(hex.trim(), 16)
            .with_context(|| format!("block_size_bytes {hex:?}"))?;
        Ok(s)
    }

    pub(super) fn next(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    /// Starts `hotplug-agent ARGS` in the background, its records on the records port, and
    /// waits for its `ready` record.
    pub fn start_agent(&mut self, args: &str) -> anyhow::Result<Value> {
        let from = self.vm.records.mark();
        self.vm.shell.check(&format!(
            "hotplug-agent {args} >{RECORDS_PORT} 2>/tmp/agent.err & echo $! >/tmp/agent.pid"
        ))?;
        let ready = self
            .vm
            .records
            .wait_for(from, "`ready`", Duration::from_secs(60), |r| {
                r.is("agent", "ready")
            })?;
        self.ready = Some(ready.v.clone());
        Ok(ready.v)
    }

    /// MemTotal in bytes, read in the guest.
    pub fn memory(&mut self) -> anyhow::Result<u64> {
        let out = self.vm.shell.check("head -n 1 /proc/meminfo")?;
        let kb: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("MemTotal from {out:?}"))?;
        Ok(kb * 1024)
    }

    pub fn cpus_online(&mut self) -> anyhow::Result<u64> {
        let list = self.vm.shell.check("cat /sys/devices/system/cpu/online")?;
        Ok(cpu_list_len(list.trim()))
    }

    /// `online` or `offline`.
    pub fn block_state(&mut self, block: &str) -> anyhow::Result<String> {
        let out = self
            .vm
            .shell
            .check(&format!("cat /sys/devices/system/memory/{block}/state"))?;
        Ok(out.trim().to_owned())
    }

    pub(super) fn qmp(&mut self, command: &str, args: Value) -> anyhow::Result<Value> {
        self.vm.qmp.execute(command, args)
    }

    /// Waits for `n` records from `from` on matching `pred` (uevents of one action).
    pub(super) fn wait_n(
        &mut self,
        from: usize,
        what: &str,
        n: usize,
        pred: impl Fn(&Rec) -> bool,
    ) -> anyhow::Result<Vec<Rec>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.vm.records.since(from);
            // Wait for what comes after exactly what was looked at.
            let next = from + seen.len();
            let found: Vec<Rec> = seen.iter().filter(|r| pred(r)).cloned().collect();
            if found.len() >= n {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.vm
                .records
                .wait_for(next, what, left, |_| true)
                .with_context(|| format!("{} of {n} {what} seen", found.len()))?;
        }
    }

    /// Waits for the first record from `from` on that shows `memory` bytes and `cpus`.
    pub(super) fn wait_capacity(
        &mut self,
        from: usize,
        memory: u64,
        cpus: u64,
        t0: Instant,
    ) -> anyhow::Result<(Rec, Duration)> {
        let what = format!("with capacity {} MiB, {cpus} CPUs", memory / MIB);
        let rec = self.vm.records.wait_for(from, &what, WAIT, |r| {
            r.memory() == memory && r.cpus() == cpus
        })?;
        let latency = rec.at.saturating_duration_since(t0);
        Ok((rec, latency))
    }

    /// What helps to understand a failure: the agent's stderr, its last records, the
    /// kernel console.
    pub fn diagnostics(&mut self) -> String {
        let agent_err = self
            .vm
            .shell
            .run("tail -n 20 /tmp/agent.err", Duration::from_secs(5))
            .map(|(_, out)| out)
            .unwrap_or_else(|e| format!("(cannot read: {e:#})"));
        let records: Vec<String> = {
            let seen = self.vm.records.since(0);
            seen[seen.len().saturating_sub(15)..]
                .iter()
                .map(|r| r.v.to_string())
                .collect()
        };
        let events: Vec<String> = self.vm.qmp.events[self.vm.qmp.events.len().saturating_sub(8)..]
            .iter()
            .map(|(_, e)| e.to_string())
            .collect();
        format!(
            "--- agent stderr (tail) ---\n{agent_err}\n--- last agent records ---\n{}\n--- last QMP events ---\n{}\n--- guest console (tail) ---\n{}\n--- logs in {} ---",
            records.join("\n"),
            events.join("\n"),
            self.vm.console_tail(20),
            self.vm.log_dir.display()
        )
    }
}

/// `0-1,3` -> 3.
pub fn cpu_list_len(list: &str) -> u64 {
    list.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0));
                b.saturating_sub(a) + 1
            }
            None => 1,
        })
        .sum()
}

/// Fails with the records that were seen, for the message.
pub fn ensure_records(ok: bool, what: &str, recs: &[Rec]) -> anyhow::Result<()> {
    ensure!(
        ok,
        "{what}; records:\n{}",
        recs.iter()
            .map(|r| r.v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(cpu_list_len("0"), 1);
        assert_eq!(cpu_list_len("0-1"), 2);
        assert_eq!(cpu_list_len("0-1,3"), 3);
        assert_eq!(cpu_list_len(""), 0);
    }
}
