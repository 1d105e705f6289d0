//! The agent's footprint when nothing happens: a fresh `hotplug-agent watch` (default flags)
//! is left alone for the idle window, and its memory and context switches are read from
//! `/proc` once at the start and once at the end, so the bench adds no wake-ups of its own.
//!
//! A polling loop anywhere in the agent shows up as context switches. The one periodic
//! wake-up allowed is the slow re-read guard (`rescan_interval_s` in the ready record), on
//! when the precise memory probes cannot attach.
use std::time::Instant;

use super::{
    Context,
    agent::Agent,
    machine::ProcStatus,
    report::{Section, Target},
};

/// The target for the resident set of an idle agent.
const RSS_TARGET_KIB: u64 = 16 * 1024;
/// Context switches one run of the re-read guard may cost: measured here, 2 voluntary ones
/// (the runtime's one thread sleeps again after the timer fires and after the re-read), plus
/// one spare for an involuntary switch when a busy machine preempts it meanwhile.
const SWITCHES_PER_RESCAN: u64 = 3;

pub fn section(ctx: &Context, out: &mut Vec<Section>) -> anyhow::Result<()> {
    let mut agent = Agent::start(
        &ctx.binary,
        &["watch", "--format", "json"],
        ctx.out_dir.join("idle-agent.stderr"),
    )?;
    let rescan_s = agent.ready()["rescan_interval_s"].as_u64();
    let pid = agent.pid();

    let start = ProcStatus::read(pid)?;
    let began = Instant::now();
    let from = agent.seen.len();
    agent.drain_until(began + ctx.idle)?;
    let end = ProcStatus::read(pid)?;
    let window = began.elapsed();

    // Records in the window mean the machine changed (or the re-read guard found a change):
    // handling them costs wake-ups, so the window was not idle.
    let records: Vec<String> = agent.seen[from..]
        .iter()
        .map(|line| {
            let r = &line.record;
            let field = |name: &str| r[name].as_str().unwrap_or("-").to_owned();
            let mut text = format!(
                "{} {} {} {}",
                field("source"),
                field("kind"),
                field("action"),
                field("device")
            );
            if let Some(reason) = r["reason"].as_str() {
                text.push_str(&format!(" ({reason})"));
            }
            text
        })
        .collect();
    let switches = end.ctxt_switches().saturating_sub(start.ctxt_switches());
    let voluntary = end.voluntary.saturating_sub(start.voluntary);
    let involuntary = end.involuntary.saturating_sub(start.involuntary);
    // Re-reads that can fall inside the window, at most one per started interval.
    let rescans = rescan_s
        .filter(|&s| s > 0)
        .map_or(0, |s| window.as_secs().div_ceil(s));
    let explained = rescans * SWITCHES_PER_RESCAN;

    let mut section = Section::new(format!(
        "Idle footprint ({:.0} s window, fresh agent, default flags)",
        window.as_secs_f64()
    ));
    section.value(
        "RSS at end (VmRSS)",
        kib_mib(end.rss_kib),
        Some(Target::new("< 16 MiB", end.rss_kib < RSS_TARGET_KIB)),
    );
    section.value("RSS at start (VmRSS)", kib_mib(start.rss_kib), None);
    section.value("peak RSS (VmHWM)", kib_mib(end.hwm_kib), None);
    let target_text = format!("~0 (≤ {explained} by rescan)");
    section.value(
        "context switches in window, all threads",
        switches.to_string(),
        Some(if records.is_empty() {
            Target::new(target_text, switches <= explained)
        } else {
            Target {
                text: target_text,
                pass: None,
            }
        }),
    );
    section.value(
        "  voluntary / involuntary",
        format!("{voluntary} / {involuntary}"),
        None,
    );
    section.value(
        "context switches per minute",
        format!("{:.1}", switches as f64 * 60.0 / window.as_secs_f64()),
        None,
    );
    section.value("threads", end.threads.to_string(), None);
    section.value("records written in window", records.len().to_string(), None);
    section.note(match rescan_s {
        Some(s) => format!(
            "rescan_interval_s = {s} (re-read guard on: the precise memory probes did not \
             attach); up to {rescans} re-read(s) fall in the window, {explained} switches allowed"
        ),
        None => "rescan_interval_s = null (re-read guard off)".to_owned(),
    });
    section.note(if !records.is_empty() {
        format!(
            "not idle: the agent wrote {} record(s) in the window ({}), so its {switches} \
             context switches say nothing about polling; run again on a quiet machine",
            records.len(),
            records.join(", ")
        )
    } else if switches <= explained {
        format!("no periodic wake-ups: {switches} context switches in {window:.0?}")
    } else {
        format!(
            "the agent woke up more than its re-read guard explains: {switches} context \
             switches in {window:.0?} with no records (a polling loop?)"
        )
    });
    out.push(section);
    Ok(())
}

fn kib_mib(kib: u64) -> String {
    format!("{kib} KiB = {:.1} MiB", kib as f64 / 1024.0)
}
