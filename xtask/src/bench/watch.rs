//! Detection latency on real hotplug: one `hotplug-agent watch` while the bench toggles a CPU
//! and a memory block, then what its eBPF records say about kernel-to-user delivery.
//!
//! For each toggle, t0 is CLOCK_MONOTONIC just before the sysfs write; a record's latency is
//! its `mono_ns` (when the agent made it) minus t0, and the reader's is when the bench's
//! thread read the line minus t0. Both include the kernel's own hotplug work, which the
//! "sysfs write" row shows on its own.
use std::{collections::BTreeMap, io, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use super::{
    Context,
    agent::{Agent, Line},
    machine::{BlockGuard, CpuGuard, Interrupt, monotonic_ns},
    report::{LatencyTarget, Section},
};

/// How long one transition's records may take before the bench gives up (a memory block
/// offline migrates pages and can take a while on a busy machine).
const RECORD_TIMEOUT: Duration = Duration::from_secs(20);
/// The targets.
const CPU_RECORD_TARGET: LatencyTarget = LatencyTarget::p99_below_ms(10);
const DELIVERY_TARGET: LatencyTarget = LatencyTarget::p99_below_ms(1);

/// The CPU, memory and delivery sections, from one agent.
pub fn sections(ctx: &Context, out: &mut Vec<Section>) -> anyhow::Result<()> {
    let mut agent = Agent::start(
        &ctx.binary,
        &["watch", "--format", "json"],
        ctx.out_dir.join("watch-agent.stderr"),
    )?;
    let listening = Listening::of(agent.ready());
    let result = cpu_toggles(ctx, &mut agent, &listening, out)
        .and_then(|()| memory_toggles(ctx, &mut agent, &listening, out));
    // Whatever eBPF records came, even if a toggle failed half-way.
    out.push(delivery(&agent));
    result
}

/// Which sources the agent's ready record says listen, so that the bench waits only for
/// records that can come.
struct Listening {
    uevent: bool,
    ebpf_cpu: bool,
    ebpf_memory: bool,
    probes: Vec<String>,
}

impl Listening {
    fn of(ready: &Value) -> Self {
        let source = |name: &str| {
            ready["sources"].as_array().is_some_and(|sources| {
                sources
                    .iter()
                    .any(|s| s["name"] == name && s["listening"] == true)
            })
        };
        let probes: Vec<String> = ready["probes"]
            .as_array()
            .map(|probes| {
                probes
                    .iter()
                    .filter(|p| p["attached"] == true)
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let ebpf = source("ebpf");
        Self {
            uevent: source("uevent"),
            ebpf_cpu: ebpf && probes.iter().any(|p| p.contains("cpuhp")),
            ebpf_memory: ebpf && probes.iter().any(|p| !p.contains("cpuhp")),
            probes,
        }
    }
}

/// A record one toggle must produce.
struct Expect {
    source: &'static str,
    what: String,
    matches: Box<dyn Fn(&Line) -> bool>,
}

/// Per-source latencies of a series of toggles.
#[derive(Default)]
struct Samples {
    /// Per action (`offline`, `online`): the sysfs write itself, which is the kernel doing
    /// the hotplug.
    write_ns: BTreeMap<&'static str, Vec<i64>>,
    to_record: BTreeMap<&'static str, Vec<i64>>,
    to_reader: BTreeMap<&'static str, Vec<i64>>,
    /// The record's `mono_ns` minus when the write returned: the agent's share; negative
    /// when the record was made before the write returned.
    after_write: BTreeMap<&'static str, Vec<i64>>,
}

impl Samples {
    /// Makes the sysfs write and waits for every expected record. `Ok(Err(_))`: the kernel
    /// refused the write (EBUSY on a memory block), so there is nothing to wait for.
    fn toggle(
        &mut self,
        agent: &mut Agent,
        action: &'static str,
        write: impl FnOnce() -> io::Result<()>,
        expect: impl Fn(u64) -> Vec<Expect>,
    ) -> anyhow::Result<io::Result<()>> {
        Interrupt::check()?;
        let from = agent.seen.len();
        let t0 = monotonic_ns();
        if let Err(err) = write() {
            return Ok(Err(err));
        }
        let t1 = monotonic_ns();
        let since = |from: u64, to: u64| to as i64 - from as i64;
        self.write_ns.entry(action).or_default().push(since(t0, t1));
        for e in expect(t0) {
            let line = agent.wait_after(from, &e.what, RECORD_TIMEOUT, &e.matches)?;
            let made = line.mono_ns().context("record without mono_ns")?;
            self.to_record
                .entry(e.source)
                .or_default()
                .push(since(t0, made));
            self.to_reader
                .entry(e.source)
                .or_default()
                .push(since(t0, line.read_ns));
            self.after_write
                .entry(e.source)
                .or_default()
                .push(since(t1, made));
        }
        Ok(Ok(()))
    }

    /// How many sysfs writes succeeded.
    fn writes(&self) -> usize {
        self.write_ns.values().map(Vec::len).sum()
    }

    fn into_rows(mut self, section: &mut Section, target: Option<LatencyTarget>) {
        if self.writes() == 0 {
            return;
        }
        for (source, samples) in self.to_record {
            section.latency(format!("{source}: write → record"), samples, target);
            let reader = self.to_reader.remove(source).unwrap_or_default();
            section.latency(format!("{source}: write → bench reader"), reader, None);
            let after = self.after_write.remove(source).unwrap_or_default();
            section.latency(format!("{source}: write returned → record"), after, None);
        }
        for (action, samples) in self.write_ns {
            section.latency(format!("sysfs write itself, {action}"), samples, None);
        }
        section.note(
            "write → record runs from just before the sysfs write, so it includes the kernel's \
             own hotplug work (the \"sysfs write itself\" rows); \"write returned → record\" is \
             what comes after it, negative when the record was made before the write returned",
        );
    }
}

/// The two records a CPU transition makes: the cpuhp probe's and the kernel uevent's.
fn cpu_expect(
    on: &Listening,
    device: &str,
    action: &'static str,
) -> impl Fn(u64) -> Vec<Expect> + use<> {
    let sources: Vec<&'static str> = [("ebpf", on.ebpf_cpu), ("uevent", on.uevent)]
        .into_iter()
        .filter_map(|(source, listening)| listening.then_some(source))
        .collect();
    let device = device.to_owned();
    move |t0| {
        sources
            .iter()
            .map(|&source| {
                let device = device.clone();
                Expect {
                    source,
                    what: format!("the {source} record of {device} going {action}"),
                    matches: Box::new(move |line: &Line| {
                        line.is(source, "cpu")
                            && line.record["action"] == action
                            && line.record["device"] == device.as_str()
                            && line.mono_ns().is_some_and(|ns| ns >= t0)
                    }),
                }
            })
            .collect()
    }
}

/// The block's uevent, and the machine-wide eBPF memory record (device null): the first one
/// whose hook fired after t0 is this operation's, since the agent folds one operation's hits.
fn memory_expect(
    on: &Listening,
    device: &str,
    action: &'static str,
) -> impl Fn(u64) -> Vec<Expect> + use<> {
    let (uevent, ebpf) = (on.uevent, on.ebpf_memory);
    let device = device.to_owned();
    move |t0| {
        let mut expect = Vec::new();
        if uevent {
            let device = device.clone();
            expect.push(Expect {
                source: "uevent",
                what: format!("the uevent record of {device} going {action}"),
                matches: Box::new(move |line: &Line| {
                    line.is("uevent", "memory_block")
                        && line.record["action"] == action
                        && line.record["device"] == device.as_str()
                        && line.mono_ns().is_some_and(|ns| ns >= t0)
                }),
            });
        }
        if ebpf {
            expect.push(Expect {
                source: "ebpf",
                what: format!("an ebpf memory record after {device} went {action}"),
                matches: Box::new(move |line: &Line| {
                    line.is("ebpf", "memory")
                        && matches!(line.record["action"].as_str(), Some("resize" | "change"))
                        && line.record["kernel_ns"].as_u64().is_some_and(|ns| ns >= t0)
                }),
            });
        }
        expect
    }
}

/// `offline` for the first write of a series, then alternating.
fn action_of(i: u32) -> (bool, &'static str) {
    if i % 2 == 1 {
        (true, "online")
    } else {
        (false, "offline")
    }
}

/// Appends the CPU section, with what was measured even when a toggle fails half-way.
fn cpu_toggles(
    ctx: &Context,
    agent: &mut Agent,
    on: &Listening,
    out: &mut Vec<Section>,
) -> anyhow::Result<()> {
    let Some(cpu) = CpuGuard::pick() else {
        let mut section = Section::new("CPU toggles");
        section.note("skipped: no CPU other than cpu0 is online and can be taken offline");
        out.push(section);
        return Ok(());
    };
    let device = cpu.device();
    let mut samples = Samples::default();
    let result = (0..ctx.toggles).try_for_each(|i| {
        let (online, action) = action_of(i);
        samples
            .toggle(
                agent,
                action,
                || cpu.set(online),
                cpu_expect(on, &device, action),
            )?
            .with_context(|| format!("writing {} to {device}/online", u8::from(online)))
    });
    drop(cpu);

    let mut section = Section::new(format!(
        "CPU toggles ({device}, {} writes alternating offline/online)",
        ctx.toggles
    ));
    let done = samples.writes();
    samples.into_rows(&mut section, Some(CPU_RECORD_TARGET));
    if !on.ebpf_cpu {
        section.note("the agent's cpuhp probe is not attached: no ebpf rows");
    }
    if !on.uevent {
        section.note("the agent's uevent source is not listening: no uevent rows");
    }
    if result.is_err() {
        section.note(format!("stopped early, after {done} writes: see the error"));
    }
    out.push(section);
    result
}

/// Appends the memory block section; the block is the first the kernel lets go, highest id
/// first, and its offline is the first toggle.
fn memory_toggles(
    ctx: &Context,
    agent: &mut Agent,
    on: &Listening,
    out: &mut Vec<Section>,
) -> anyhow::Result<()> {
    let mut samples = Samples::default();
    let mut refused = Vec::new();
    let mut chosen = None;
    let result = memory_series(ctx, agent, on, &mut samples, &mut refused, &mut chosen);

    let mut section = match &chosen {
        Some(device) => Section::new(format!(
            "Memory block toggles ({device}, 128 MiB, {} writes alternating offline/online)",
            ctx.toggles
        )),
        None => Section::new("Memory block toggles"),
    };
    let done = samples.writes();
    samples.into_rows(&mut section, None);
    if !refused.is_empty() {
        let refused = describe_refused(&refused);
        section.note(match chosen {
            Some(_) => format!("tried higher blocks first: {refused}"),
            None => format!("skipped: no memory block could be taken offline: {refused}"),
        });
    }
    if on.ebpf_memory {
        section.note(
            "ebpf memory records are folded: the agent emits one after the probe has been \
             quiet for its fold window (200 µs by default); compare hook → record with \
             delivery_ns for that probe below",
        );
    } else {
        section.note("no eBPF memory probe attached: no ebpf rows");
    }
    if result.is_err() {
        section.note(format!("stopped early, after {done} writes: see the error"));
    }
    out.push(section);
    result
}

fn memory_series(
    ctx: &Context,
    agent: &mut Agent,
    on: &Listening,
    samples: &mut Samples,
    refused: &mut Vec<(u32, String)>,
    chosen: &mut Option<String>,
) -> anyhow::Result<()> {
    let mut block = None;
    for id in BlockGuard::candidates() {
        let guard = BlockGuard::new(id);
        let expect = memory_expect(on, &guard.device(), "offline");
        match samples.toggle(agent, "offline", || guard.set(false), expect)? {
            Ok(()) => {
                block = Some(guard);
                break;
            }
            Err(err) => refused.push((id, err.to_string())),
        }
    }
    let Some(block) = block else {
        return Ok(());
    };
    let device = block.device();
    *chosen = Some(device.clone());
    for i in 1..ctx.toggles {
        let (online, action) = action_of(i);
        samples
            .toggle(
                agent,
                action,
                || block.set(online),
                memory_expect(on, &device, action),
            )?
            .with_context(|| format!("writing {action} to {device}/state"))?;
    }
    Ok(())
}

/// `121 blocks refused (memory199..memory79: Device or resource busy (os error 16))`, one
/// group per distinct error, highest id first.
fn describe_refused(refused: &[(u32, String)]) -> String {
    let mut by_error: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, err) in refused {
        by_error.entry(err).or_default().push(*id);
    }
    let groups: Vec<String> = by_error
        .into_iter()
        .map(|(err, ids)| match (ids.first(), ids.last()) {
            (Some(first), Some(last)) if ids.len() > 1 => {
                format!("{} in memory{first}..memory{last}: {err}", ids.len())
            }
            _ => format!("memory{}: {err}", ids[0]),
        })
        .collect();
    format!("{} refused ({})", refused.len(), groups.join("; "))
}

/// `delivery_ns` (kernel hook to the agent reading the ring buffer) of every eBPF record the
/// agent wrote, overall and per probe and action (a CPU going offline keeps the other CPUs
/// busy, which shows in its records' delivery).
fn delivery(agent: &Agent) -> Section {
    let mut section = Section::new("eBPF delivery (kernel hook → agent reads the ring buffer)");
    let mut all = Vec::new();
    let mut per_probe: BTreeMap<(String, String), (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for line in agent
        .seen
        .iter()
        .filter(|line| line.record["source"] == "ebpf")
    {
        let Some(delivery) = line.record["delivery_ns"].as_i64() else {
            continue;
        };
        all.push(delivery);
        let text = |field: &str| line.record[field].as_str().unwrap_or("?").to_owned();
        let entry = per_probe
            .entry((text("probe"), text("action")))
            .or_default();
        entry.0.push(delivery);
        if let (Some(kernel), Some(made)) = (line.record["kernel_ns"].as_u64(), line.mono_ns()) {
            entry.1.push(made as i64 - kernel as i64);
        }
    }
    section.latency("delivery_ns, all eBPF records", all, Some(DELIVERY_TARGET));
    for ((probe, action), (delivery, to_record)) in per_probe {
        let probe = probe.rsplit('/').next().unwrap_or(&probe).to_owned();
        section.latency(format!("  delivery_ns, {probe} {action}"), delivery, None);
        section.latency(
            format!("  hook → record, {probe} {action}"),
            to_record,
            None,
        );
    }
    section.note(
        "hook → record = mono_ns - kernel_ns: delivery plus the agent's own work (folding, \
         reading capacity) before it writes the record",
    );
    let listening = Listening::of(agent.ready());
    section.note(format!("probes attached: {}", listening.probes.join(", ")));
    section
}
