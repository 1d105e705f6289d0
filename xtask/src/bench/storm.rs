//! A 5-minute client storm against `hotplug-agent run` (issue #9): hundreds of idle and
//! slowloris connections to the metrics port and the stream socket, and `follow=1`
//! clients that hang up, while synthetic uevents keep coming. RSS and open descriptors
//! before, at the peak and after; whether every uevent still reached a stream client.
//!
//! The measurement is the test `tests/tests/storm.rs` (which `cargo xtask test` runs for
//! 20 s), run here for [`STORM_SECS`] against the bench's release build; it writes its
//! figures to `target/tmp/storm.json`, read here into a section. The machine lock is
//! handed to it as to bench_refresh (`HOTPLUG_BENCH_LOCK_HOLDER`, see refresh.rs).
use std::{fs, process::Stdio};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    Context,
    machine::Interrupt,
    measured,
    report::{Section, Target},
};
use crate::{process, workspace};

/// How long the storm lasts; `HOTPLUG_STORM_SECS` overrides it.
const STORM_SECS: u64 = 300;

pub fn section(ctx: &Context, out: &mut Vec<Section>) -> anyhow::Result<()> {
    let secs = std::env::var("HOTPLUG_STORM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STORM_SECS);
    let json_path = workspace::target_dir().join("tmp/storm.json");
    let _ = fs::remove_file(&json_path);
    let mut cmd = measured::test_command(
        "storm",
        "a_client_storm_leaks_nothing_and_detection_goes_on",
        &[],
    );
    // Its figures go to a file: the test's stdout stays on the terminal.
    cmd.env("HOTPLUG_AGENT_BIN", &ctx.binary)
        .env("HOTPLUG_STORM_SECS", secs.to_string())
        .env("HOTPLUG_BENCH_LOCK_HOLDER", std::process::id().to_string())
        .stdout(Stdio::inherit());
    eprintln!(
        "$ HOTPLUG_AGENT_BIN={} HOTPLUG_STORM_SECS={secs} {}",
        ctx.binary.display(),
        process::display(&cmd)
    );
    // The test asserts; its figures are written before it does, so a failed storm is
    // still reported.
    let status = cmd.status().context("starting cargo test")?;
    Interrupt::check()?;
    let text = fs::read_to_string(&json_path)
        .with_context(|| format!("reading {} (the test wrote none)", json_path.display()))?;
    fs::copy(&json_path, ctx.out_dir.join("storm.json"))
        .with_context(|| format!("copying {}", json_path.display()))?;
    let f: Value = serde_json::from_str(&text).context("parsing storm.json")?;
    out.push(storm_section(&f));
    if !status.success() {
        bail!("the storm test failed ({status}); its output is above");
    }
    Ok(())
}

fn storm_section(f: &Value) -> Section {
    let n = |path: &[&str]| {
        path.iter()
            .fold(f, |v, k| &v[*k])
            .as_u64()
            .unwrap_or_default()
    };
    let mib = |kib: u64| format!("{kib} KiB = {:.1} MiB", kib as f64 / 1024.0);
    let mut s = Section::new(format!(
        "Client storm ({} s, release agent): metrics port and stream socket",
        n(&["secs"])
    ));
    let (rss0, rss_peak, rss1) = (
        n(&["rss_kib", "before"]),
        n(&["rss_kib", "peak"]),
        n(&["rss_kib", "after"]),
    );
    s.value("RSS before (VmRSS)", mib(rss0), None);
    s.value("RSS peak during", mib(rss_peak), None);
    s.value(
        "RSS after",
        mib(rss1),
        Some(Target::new("≤ before + 16 MiB", rss1 <= rss0 + 16 * 1024)),
    );
    let (fd0, fd_peak, fd1) = (
        n(&["fds", "before"]),
        n(&["fds", "peak"]),
        n(&["fds", "after"]),
    );
    s.value("open descriptors before", fd0.to_string(), None);
    s.value(
        "open descriptors peak during",
        fd_peak.to_string(),
        Some(Target::new("≤ before + 272", fd_peak <= fd0 + 272)),
    );
    s.value(
        "open descriptors after",
        fd1.to_string(),
        Some(Target::new("= before", fd1 <= fd0)),
    );
    let (sent, got) = (n(&["uevents"]), n(&["delivered_to_stream"]));
    s.value(
        "synthetic uevents delivered to a stream client",
        format!("{got} of {sent}"),
        Some(Target::new("all", got == sent)),
    );
    s.value(
        "max uevent → stream client",
        format!("{} ms", n(&["delivery_max_ms"])),
        None,
    );
    s.value(
        "records with a wrong capacity",
        n(&["wrong_capacity"]).to_string(),
        Some(Target::new("0", n(&["wrong_capacity"]) == 0)),
    );
    s.value(
        "connections made (idle + slowloris)",
        n(&["connections"]).to_string(),
        None,
    );
    s.value(
        "  answered 503 (over the limit)",
        n(&["answered_503"]).to_string(),
        None,
    );
    s.value(
        "follow=1 clients that hung up",
        n(&["followers_hung_up"]).to_string(),
        None,
    );
    s.value(
        "/healthz polls: 200 / 503 / unanswered",
        format!(
            "{} / {} / {}",
            n(&["healthz_ok"]),
            n(&["healthz_503"]),
            n(&["healthz_unanswered"])
        ),
        Some(Target::new("0 unanswered", n(&["healthz_unanswered"]) == 0)),
    );
    s.value(
        "/healthz slowest answer",
        format!("{} ms", n(&["healthz_max_ms"])),
        None,
    );
    s.value(
        "agent CPU during the storm",
        format!("{:.1} s", n(&["agent_cpu_ticks_during"]) as f64 / 100.0),
        None,
    );
    s.note(
        "the connection limit is per listener (64); at the limit the idlest connection is \
         closed to make room, so a probe that sends its request at once is answered",
    );
    s
}
