//! `hotplug-agent status`: the capacity snapshot and which probes can attach here, with
//! the attach methods `run` would use (or, `--every-method`, every one of them).
use std::{io::Write, path::Path};

use serde::Serialize;

use crate::{
    capacity::{self, Snapshot},
    record::ProbeStatus,
    report::{Format, text::gib},
    sources::ebpf,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub capacity: Snapshot,
    pub probes: Vec<ProbeStatus>,
    /// Why the eBPF source cannot run here, if it cannot.
    pub ebpf_error: Option<String>,
    /// Whether MemTotal changes without uevents (virtio-mem, balloons) are seen directly.
    pub precise_memory_probes: bool,
}

/// `every_method`: try every attach method of every hook, not only until one attaches
/// (what `run` does), to see which methods this kernel and these capabilities allow.
pub fn collect(root: &Path, every_method: bool) -> Result<Status, capacity::CapacityError> {
    let capacity = capacity::read_snapshot(root)?;
    // Attaching and dropping again is the only honest answer to "can it attach".
    let loaded = if every_method {
        ebpf::load_every_method(root)
    } else {
        ebpf::load(root)
    };
    Ok(Status {
        capacity,
        probes: loaded.probes,
        ebpf_error: loaded.error,
        precise_memory_probes: loaded.precise,
    })
}

pub fn write(out: &mut impl Write, status: &Status, format: Format) -> std::io::Result<()> {
    if format == Format::Json {
        serde_json::to_writer_pretty(&mut *out, status).map_err(std::io::Error::other)?;
        return writeln!(out);
    }
    let c = &status.capacity;
    writeln!(
        out,
        "memory      {} ({} bytes, MemTotal)",
        gib(c.memory_bytes),
        c.memory_bytes
    )?;
    writeln!(
        out,
        "cpus        {} online ({}), {} possible",
        c.cpus_online, c.cpus_online_list, c.cpus_possible
    )?;
    match c.memory_block_size {
        Some(size) => writeln!(
            out,
            "blocks      {} online, {} offline, {} MiB each",
            c.online_blocks(),
            c.offline_blocks(),
            size >> 20
        )?,
        None => writeln!(out, "blocks      no memory hotplug in this kernel")?,
    }
    for n in &c.numa_nodes {
        writeln!(
            out,
            "node{:<7} {} cpus ({}), {}",
            n.id,
            n.cpus.len(),
            capacity::format_cpu_list(&n.cpus),
            gib(n.memory_bytes)
        )?;
    }
    for h in &c.hugepages {
        writeln!(
            out,
            "hugepages   {} kB: {} total, {} free",
            h.size_bytes / 1024,
            h.total,
            h.free
        )?;
    }
    writeln!(out)?;
    if let Some(e) = &status.ebpf_error {
        writeln!(out, "eBPF        off: {e}")?;
    }
    for p in &status.probes {
        let state = if p.attached {
            "can attach"
        } else {
            "cannot attach"
        };
        write!(out, "probe       {:<42} {state}", p.name)?;
        match &p.error {
            Some(e) => writeln!(out, ": {e}")?,
            None => writeln!(out)?,
        }
    }
    let guard = if status.precise_memory_probes {
        "MemTotal changes without uevents are seen by the memory probes"
    } else {
        "MemTotal changes without uevents (virtio-mem, balloons) rely on the slow re-read guard"
    };
    writeln!(out, "\n{guard}")
}
