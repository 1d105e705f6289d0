//! Fleet budgets: the time until a whole fleet converged after one hot-add hit every node,
//! as a function of `--max-concurrent-restarts`.
//!
//! The measurement is the ignored test `bench_fleet_convergence` in `tests/tests/fleet.rs`:
//! 200 simulated nodes in-process (the agent's own Lease code, one kube client each) against
//! one fake API server, each restarting its "kubelet" (a fixed delay, then its Node shows the
//! new memory) inside a restart slot. It touches nothing on this machine. This suite runs it
//! with `cargo test`, reads its one `BENCH_FLEET_JSON` line and writes one row per budget;
//! the raw line is kept in `target/bench/fleet.json`.
use std::fs;

use anyhow::Context as _;
use serde::Deserialize;

use super::{Context, measured, report::Section};
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
    let cmd = measured::test_command("fleet", "bench_fleet_convergence", &["--ignored"]);
    eprintln!("$ {}", process::display(&cmd));
    let raw = measured::json_line(cmd, JSON_PREFIX, || Ok(()))?;
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
