//! The hotplug scenarios, each asserting on the guest agent's own records.
//!
//! They share one guest (`hotplug-agent watch` with auto-online on, a DIMM plugged before
//! it started) and run in this order; one that needs an earlier one's devices plugs them
//! itself when run alone. Latencies go into the figures.
use std::time::Duration;

use anyhow::{Context as _, ensure};

use super::{
    Figures,
    guest::Rec,
    session::{MIB, Session, WAIT, ensure_records},
};

/// How long to keep listening after the capacity settled, to catch what should not come.
const QUIET: Duration = Duration::from_millis(600);

/// The agent of the shared guest: auto-online on, DIMM memory as `online_movable` so that
/// it can be unplugged again (plain `online` memory cannot: VM-HOTPLUG.md trap 3).
pub const WATCH_ARGS: &str =
    "watch --format json --auto-online-memory online_movable --auto-online-cpus on";

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn auto_onlined<'a>(recs: &'a [Rec], device: &'a str) -> impl Iterator<Item = &'a Rec> + 'a {
    recs.iter()
        .filter(move |r| r.is("agent", "auto_online") && r.device() == device)
}

/// Waits for the kernel's `online` uevent of each device, then listens a little longer.
fn settled_arrivals(
    s: &mut Session,
    from: usize,
    devices: &[String],
    kind: &str,
) -> anyhow::Result<Vec<Rec>> {
    for device in devices {
        s.vm.records
            .wait_for(from, &format!("`online` of {device}"), WAIT, |r| {
                r.source() == "uevent" && r.is(kind, "online") && r.device() == device
            })?;
    }
    Ok(s.vm.records.settle(from, QUIET).to_vec())
}

/// Every new block (or CPU): its `add`, one `auto_online` after it, then the kernel's
/// `online` uevent.
fn check_arrivals(recs: &[Rec], devices: &[String], kind: &str, state: &str) -> anyhow::Result<()> {
    for device in devices {
        let pos = |pred: &dyn Fn(&Rec) -> bool| recs.iter().position(pred);
        let add = pos(&|r| r.source() == "uevent" && r.is(kind, "add") && r.device() == device);
        let auto: Vec<&Rec> = auto_onlined(recs, device).collect();
        let auto_at = pos(&|r| r.is("agent", "auto_online") && r.device() == device);
        let online =
            pos(&|r| r.source() == "uevent" && r.is(kind, "online") && r.device() == device);
        ensure_records(
            add.is_some(),
            &format!("no `add` record for {device}"),
            recs,
        )?;
        ensure_records(
            auto.len() == 1,
            &format!(
                "{device}: {} auto_online records, want exactly 1",
                auto.len()
            ),
            recs,
        )?;
        ensure_records(
            auto[0].v["state"] == state && auto[0].v.get("error").is_none(),
            &format!("{device}: auto_online should write {state} without error"),
            recs,
        )?;
        ensure_records(
            add < auto_at,
            &format!("{device}: auto_online before its add"),
            recs,
        )?;
        ensure_records(
            online.is_some(),
            &format!("no `online` uevent for {device}"),
            recs,
        )?;
    }
    Ok(())
}

/// 1. DIMM hot-add of 256 MiB: `add` for each new block, the agent onlines each once,
///    `online` follows, and the capacity grows by exactly 256 MiB.
pub fn dimm_hot_add(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    let size = 256 * MIB;
    let plug = s.plug_dimm(size)?;
    let recs = settled_arrivals(s, plug.from, &plug.devices, "memory_block")?;
    ensure_records(
        plug.devices.len() as u64 == size / s.block_size,
        &format!(
            "{} blocks arrived, want {}",
            plug.devices.len(),
            size / s.block_size
        ),
        &recs,
    )?;
    check_arrivals(&recs, &plug.devices, "memory_block", "online_movable")?;
    let last = recs.last().context("no records")?;
    ensure_records(
        last.memory() == plug.base_memory + size,
        &format!(
            "the capacity should end exactly 256 MiB up: {} -> {} bytes",
            plug.base_memory,
            last.memory()
        ),
        &recs,
    )?;
    let probe = recs
        .iter()
        .find(|r| {
            r.source() == "ebpf"
                && r.v["probe"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/online_pages"))
        })
        .map(|r| r.v["probe"].as_str().unwrap_or_default().to_owned());
    ensure_records(
        probe.is_some(),
        "no kernel probe record of online_pages",
        &recs,
    )?;
    figures.push(format!(
        "DIMM 256 MiB ({}): device_add -> record of the new capacity {} (auto-online included; `{}` saw it too)",
        plug.devices.join(", "),
        ms(plug.latency),
        probe.unwrap_or_default()
    ));
    Ok(())
}

/// 2. virtio-mem: growth across new blocks (uevents), then inside a block it already has
///    (no uevent at all): the kernel probe must report MemTotal moving.
pub fn virtio_mem_grow(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    if s.vmem_size != 0 {
        s.set_vmem(0)?;
    }
    // 192 MiB: one whole 128 MiB block and half of the next.
    let across = s.set_vmem(192 * MIB)?;
    let recs = settled_arrivals(s, across.from, &across.devices, "memory_block")?;
    ensure_records(
        across.devices.len() == 2,
        &format!(
            "virtio-mem 192 MiB should add 2 blocks, added {:?}",
            across.devices
        ),
        &recs,
    )?;
    check_arrivals(&recs, &across.devices, "memory_block", "online_movable")?;
    figures.push(format!(
        "virtio-mem 0 -> 192 MiB (new blocks {}): qom-set -> record of the new capacity {}",
        across.devices.join(", "),
        ms(across.latency)
    ));

    // 224 MiB: 32 MiB more inside the half-plugged block.
    let inside = s.set_vmem(224 * MIB)?;
    let recs = s.vm.records.settle(inside.from, QUIET).to_vec();
    ensure_records(
        recs.iter()
            .all(|r| r.source() != "uevent" && r.source() != "scan"),
        "growth inside a block should send no uevent (and need no rescan)",
        &recs,
    )?;
    let by = &inside.record;
    let probe = by.v["probe"].as_str().unwrap_or_default().to_owned();
    ensure_records(
        by.source() == "ebpf" && by.is("memory", "resize") && !probe.starts_with("tracepoint/"),
        "the new MemTotal should be reported by a memory function probe",
        &recs,
    )?;
    let mut probes: Vec<String> = recs
        .iter()
        .filter(|r| r.source() == "ebpf")
        .filter_map(|r| r.v["probe"].as_str().map(str::to_owned))
        .collect();
    probes.dedup();
    figures.push(format!(
        "virtio-mem 192 -> 224 MiB inside {} (no uevent): qom-set -> record of the new capacity {}, by `{probe}` (probes that fired: {})",
        across.devices.last().map_or("?", String::as_str),
        ms(inside.latency),
        probes.join(", ")
    ));
    Ok(())
}

/// 3. CPU hot-add in the lowest free slot: `add`, the agent onlines it, `online`,
///    `cpus_online` one up.
pub fn cpu_hot_add(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    let plug = s.plug_cpu()?;
    let recs = settled_arrivals(s, plug.from, &plug.devices, "cpu")?;
    check_arrivals(&recs, &plug.devices, "cpu", "online")?;
    let cpuhp = recs.iter().any(|r| {
        r.source() == "ebpf"
            && r.is("cpu", "online")
            && r.v["probe"] == "tracepoint/cpuhp/cpuhp_exit"
    });
    ensure_records(
        cpuhp,
        "no cpuhp tracepoint record of the CPU going online",
        &recs,
    )?;
    figures.push(format!(
        "CPU ({}): device_add -> record of cpus_online {} -> {}: {}",
        plug.devices.join(", "),
        plug.base_cpus,
        plug.base_cpus + 1,
        ms(plug.latency)
    ));
    Ok(())
}

/// Auto-online touches arrivals only: a block an operator offlined by hand, and a block
/// that was offline before the agent started, both stay offline across a new arrival.
pub fn manual_offline(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    if s.dimms.is_empty() {
        s.plug_dimm(256 * MIB)?;
    }
    let block = s
        .dimms
        .last()
        .and_then(|d| d.blocks.last())
        .cloned()
        .context("no hot-added block")?;
    ensure!(
        s.block_state(&block)? == "online",
        "{block} should have been auto-onlined"
    );
    let base = s.memory()?;
    let from = s.vm.records.mark();
    s.vm.shell.check(&format!(
        "echo offline > /sys/devices/system/memory/{block}/state"
    ))?;
    s.vm.records
        .wait_for(from, &format!("`offline` of {block}"), WAIT, |r| {
            r.source() == "uevent" && r.is("memory_block", "offline") && r.device() == block
        })?;
    let down = base - s.block_size;
    s.vm.records
        .wait_for(from, "the capacity one block down", WAIT, |r| {
            r.memory() == down
        })?;

    // A new arrival: the agent onlines that one, and nothing else.
    let plug = s.plug_dimm(s.block_size)?;
    settled_arrivals(s, plug.from, &plug.devices, "memory_block")?;
    let recs = s.vm.records.since(from).to_vec();
    let onlined: Vec<&str> = recs
        .iter()
        .filter(|r| r.is("agent", "auto_online"))
        .map(Rec::device)
        .collect();
    ensure_records(
        onlined == plug.devices.iter().map(String::as_str).collect::<Vec<_>>(),
        &format!(
            "only the new block {:?} should be auto-onlined, got {onlined:?}",
            plug.devices
        ),
        &recs,
    )?;
    ensure!(
        s.block_state(&block)? == "offline",
        "{block}, offlined by hand, should stay offline"
    );
    let mut untouched = vec![block.clone()];
    if let Some(pre) = s.preplugged.as_ref().map(|d| d.blocks.clone()) {
        let all = s.vm.records.since(0).to_vec();
        for b in &pre {
            ensure!(
                s.block_state(b)? == "offline",
                "{b} (offline before the agent started) should stay offline"
            );
            ensure_records(
                auto_onlined(&all, b).next().is_none(),
                &format!("{b} was offline before the agent started: no auto_online for it"),
                &all,
            )?;
        }
        untouched.extend(pre);
    }
    figures.push(format!(
        "auto-online left {} offline across a new arrival ({} onlined)",
        untouched.join(", "),
        plug.devices.join(", ")
    ));
    Ok(())
}

/// 4. Unplug in the safe order, virtio-mem, DIMM, CPU (CPU before DIMM crashes QEMU 7.2:
///    VM-HOTPLUG.md trap 2): `offline`/`remove` records, the capacity shrinking, and back
///    to what it was when the agent started.
pub fn unplug(s: &mut Session, figures: &mut Figures) -> anyhow::Result<()> {
    if s.vmem_size == 0 {
        s.set_vmem(192 * MIB)?;
    }
    if s.dimms.is_empty() {
        s.plug_dimm(256 * MIB)?;
    }
    if s.cpus.is_empty() {
        s.plug_cpu()?;
    }
    let ready = s.ready.clone().context("no agent ready record")?;
    let (start_memory, start_cpus) = (
        ready["capacity"]["memory_bytes"].as_u64().unwrap_or(0),
        ready["capacity"]["cpus_online"].as_u64().unwrap_or(0),
    );

    let vmem_blocks = s.vmem_blocks.clone();
    let size = s.vmem_size;
    let out = s.set_vmem(0)?;
    let recs = s.vm.records.settle(out.from, Duration::ZERO).to_vec();
    for b in &vmem_blocks {
        ensure_records(
            recs.iter().any(|r| {
                r.source() == "uevent" && r.is("memory_block", "remove") && r.device() == b
            }),
            &format!("no `remove` for virtio-mem block {b}"),
            &recs,
        )?;
    }
    let shrank_by = |r: &Rec| r.source() == "ebpf" && r.is("memory", "resize");
    ensure_records(
        recs.iter().any(shrank_by),
        "no kernel probe record of the shrink",
        &recs,
    )?;
    figures.push(format!(
        "virtio-mem {} MiB -> 0 ({} removed): qom-set -> record of the capacity {}",
        size / MIB,
        vmem_blocks.join(", "),
        ms(out.latency)
    ));

    let mut dimms = std::mem::take(&mut s.dimms);
    dimms.extend(s.preplugged.take());
    for dimm in &dimms {
        let out = s.unplug_dimm(dimm)?;
        let recs = s.vm.records.since(out.from).to_vec();
        for b in &dimm.blocks {
            ensure_records(
                recs.iter().any(|r| {
                    r.source() == "uevent" && r.is("memory_block", "remove") && r.device() == b
                }),
                &format!("no `remove` for {b} of {}", dimm.id),
                &recs,
            )?;
        }
        let offlined: Vec<&str> = recs
            .iter()
            .filter(|r| r.source() == "uevent" && r.is("memory_block", "offline"))
            .map(Rec::device)
            .collect();
        figures.push(format!(
            "DIMM {} ({}; offlined by the kernel: {}): device_del -> record of the capacity {}",
            dimm.id,
            dimm.blocks.join(", "),
            if offlined.is_empty() {
                "none, all were offline".to_owned()
            } else {
                offlined.join(", ")
            },
            ms(out.latency)
        ));
    }

    let cpus = std::mem::take(&mut s.cpus);
    for cpu in &cpus {
        let out = s.unplug_cpu(cpu)?;
        let recs = s.vm.records.since(out.from).to_vec();
        ensure_records(
            recs.iter()
                .any(|r| r.is("cpu", "offline") && r.device() == cpu.device),
            &format!("no `offline` record for {}", cpu.device),
            &recs,
        )?;
        figures.push(format!(
            "CPU {}: device_del -> record of cpus_online {} -> {}: {}",
            cpu.device,
            out.base_cpus,
            out.base_cpus - 1,
            ms(out.latency)
        ));
    }

    let (memory, cpus) = (s.memory()?, s.cpus_online()?);
    ensure!(
        (memory, cpus) == (start_memory, start_cpus),
        "after unplugging everything the guest should be back to {start_memory} bytes, {start_cpus} CPUs; it has {memory}, {cpus}"
    );
    Ok(())
}
