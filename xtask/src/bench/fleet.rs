//! Fleet budgets: the time until a whole fleet converged after one hot-add hit every node,
//! as a function of `--max-concurrent-restarts`.
//!
//! The measurement is the ignored test `bench_fleet_convergence` in `tests/tests/fleet.rs`:
//! 200 simulated nodes in-process (the agent's own Lease code, one kube client each) against
//! one fake API server, each restarting its "kubelet" (a fixed delay, then its Node shows the
//! new memory) inside a restart slot. It touches nothing on this machine. This suite runs it
//! with `cargo test`, reads its one `BENCH_FLEET_JSON` line and writes one row per budget;
//! the raw line is kept in `target/bench/fleet.json`.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::{Context, report::Section};
use crate::process;

const JSON_PREFIX: &str = "BENCH_FLEET_JSON ";

#[derive(Debug, Deserialize)]
struct Output {
    restart_ms: u64,
    rows: Vec<Row>,
}

#[derive(Debug, Deserialize)]
struct Row {
    budget: String,
    slots: u32,
    nodes: usize,
    max_concurrent: usize,
    converged_ms: u64,
    ideal_ms: u64,
    lease_writes: usize,
}

pub fn sections(ctx: &Context, out: &mut Vec<Section>) -> anyhow::Result<()> {
    let mut cmd = process::cargo();
    cmd.args([
        "test",
        "-p",
        "hotplug-tests",
        "--test",
        "fleet",
        "--",
        "--ignored",
        "--exact",
        "bench_fleet_convergence",
        "--nocapture",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    eprintln!("$ {}", process::display(&cmd));
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child
        .stdout
        .take()
        .context("cargo test's stdout not piped")?;
    let mut json = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's stdout")?;
        match line.find(JSON_PREFIX) {
            Some(at) => json = Some(line[at + JSON_PREFIX.len()..].to_owned()),
            None => eprintln!("{line}"),
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); its output is above",
            process::display(&cmd)
        );
    }
    let raw = json.with_context(|| format!("the test printed no {JSON_PREFIX}line"))?;
    let raw_path = ctx.out_dir.join("fleet.json");
    fs::write(&raw_path, format!("{raw}\n"))
        .with_context(|| format!("writing {}", raw_path.display()))?;
    let result: Output = serde_json::from_str(&raw)
        .with_context(|| format!("parsing the test's {JSON_PREFIX}line: {raw}"))?;
    let mut section = Section::new("fleet: one hot-add on every node, time until all converged");
    for r in &result.rows {
        section.value(
            format!("budget {} ({} of {} nodes)", r.budget, r.slots, r.nodes),
            format!(
                "{:.1} s (ideal {:.1} s), max {} at once, {} lease writes",
                r.converged_ms as f64 / 1000.0,
                r.ideal_ms as f64 / 1000.0,
                r.max_concurrent,
                r.lease_writes
            ),
            None,
        );
    }
    section.note(format!(
        "simulated: each restart takes {} ms; ideal = ceil(nodes / slots) x restart; one \
         in-process fake API (debug build) serves every node's Lease traffic",
        result.restart_ms
    ));
    out.push(section);
    Ok(())
}
