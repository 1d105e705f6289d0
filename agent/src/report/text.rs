//! The human view: one aligned line per record.
//!
//! ```text
//! 21:04:05.123456  uevent  memory_block  offline  memory47   mem 23.41 GiB  cpus 2  seq 4242
//! 21:04:05.123460  ebpf    cpu           online   cpu1       mem 23.54 GiB  cpus 2  cpuhp/1[20] 12µs
//! ```
use crate::record::{AgentRecord, DecisionRecord, EventRecord, Record};

pub fn line(record: &Record) -> String {
    match record {
        Record::Event(e) => event(e),
        Record::Agent(a) => agent(a),
        Record::Decision(d) => decision(d),
    }
}

/// `2026-11-27T21:04:05.123456Z` -> `21:04:05.123456`.
fn clock(time: &str) -> &str {
    time.split_once('T')
        .map_or(time, |(_, t)| t.trim_end_matches('Z'))
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn event(e: &EventRecord) -> String {
    let mut s = format!(
        "{:<15}  {:<6}  {:<12}  {:<7}  {:<9}  mem {:>10}  cpus {:<3}",
        clock(&e.time),
        e.source.as_str(),
        e.kind.as_str(),
        e.action.as_str(),
        e.device.as_deref().unwrap_or("-"),
        gib(e.capacity.memory_bytes),
        e.capacity.cpus_online,
    );
    if let Some(seq) = e.seqnum {
        s.push_str(&format!("  seq {seq}"));
    }
    if let (Some(comm), Some(pid)) = (&e.comm, e.pid) {
        s.push_str(&format!("  {comm}[{pid}]"));
    }
    if let Some(pages) = e.pages {
        s.push_str(&format!("  {pages:+} pages"));
    }
    if let Some(d) = e.delivery_ns {
        s.push_str(&format!("  {}µs", d / 1000));
    }
    if let Some(r) = &e.reason {
        s.push_str(&format!("  ({r})"));
    }
    s
}

fn decision(d: &DecisionRecord) -> String {
    let mut s = format!(
        "{:<15}  {:<6}  {:<12}  {:<7}  {:<9}  mem {:>10}  cpus {:<3}",
        clock(&d.time),
        "run",
        d.kind,
        d.action,
        format!("#{}", d.episode),
        gib(d.capacity.memory_bytes),
        d.capacity.cpus_online
    );
    for diff in &d.differences {
        s.push_str(&format!("  {diff}"));
    }
    for (label, v) in [
        ("backend", &d.backend),
        ("reason", &d.reason),
        ("message", &d.message),
    ] {
        if let Some(v) = v {
            s.push_str(&format!("  {label} {v}"));
        }
    }
    if let Some(ms) = d.duration_ms {
        s.push_str(&format!("  {ms} ms"));
    }
    s
}

fn agent(a: &AgentRecord) -> String {
    let mut s = format!(
        "{:<15}  {:<6}  {:<12}  {:<7}  {:<9}  mem {:>10}  cpus {:<3}",
        clock(&a.time),
        "agent",
        "agent",
        a.action,
        a.device.as_deref().unwrap_or("-"),
        gib(a.capacity.memory_bytes),
        a.capacity.cpus_online
    );
    for src in &a.sources {
        let state = if src.listening { "listening" } else { "off" };
        s.push_str(&format!("\n    source {:<8} {state}", src.name));
        if let Some(d) = &src.detail {
            s.push_str(&format!(": {d}"));
        }
        if let Some(e) = &src.error {
            s.push_str(&format!(" ({e})"));
        }
    }
    for p in &a.probes {
        let state = if p.attached {
            "attached"
        } else {
            "not attached"
        };
        s.push_str(&format!("\n    probe  {:<42} {state}", p.name));
        if let Some(e) = &p.error {
            s.push_str(&format!(": {e}"));
        }
    }
    if let Some(interval) = a.rescan_interval_s {
        match interval {
            Some(secs) => s.push_str(&format!(
                "\n    re-read guard every {secs} s (precise memory probes not attached)"
            )),
            None => s.push_str("\n    re-read guard off"),
        }
    }
    if let Some(r) = &a.reason {
        s.push_str(&format!("  reason {r}"));
    }
    if let Some(l) = a.lost {
        s.push_str(&format!("  lost {l}"));
    }
    if let Some(state) = &a.state {
        s.push_str(&format!("  state {state}"));
    }
    if let Some(e) = &a.error {
        s.push_str(&format!("  error {e}"));
    }
    s
}
