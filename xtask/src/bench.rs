//! `cargo xtask bench`: how fast the agent sees real hotplug, and what it costs when idle.
//!
//! As root, with the lock the privileged tests share (so they never overlap), it builds the
//! agent (release) and runs the suites in [`SUITES`], each starting its own agent:
//!
//! - [`watch`]: toggles a CPU and a memory block under one `hotplug-agent watch` and measures
//!   write → record per source (`ebpf`, `uevent`), then eBPF kernel-to-user delivery;
//! - [`idle`]: a fresh agent left alone: RSS and context switches;
//! - [`refresh`]: hot-add to Node through `hotplug-agent run`, and a burst's restarts;
//! - [`fleet`]: 200 simulated nodes hit by one hot-add: fleet convergence time against the
//!   restart budget (no hotplug on this machine);
//! - [`seed_scale`]: the 64 GiB hot-add of `vm-test --scenario seed-scale` against a
//!   per-block udev rule and KEP-3953's 5-minute poll;
//! - [`storm`]: 5 minutes of hostile clients on the metrics port and the stream socket:
//!   RSS and descriptors before, during and after, and detection throughout.
//!
//! Each suite appends [`Section`]s (rows of p50/p99/max or single values, with targets);
//! they are printed as one table and written to `target/bench/results.json`. To add a suite,
//! write `fn(&Context, &mut Vec<Section>) -> anyhow::Result<()>` in `bench/<name>.rs` and
//! list it in [`SUITES`].
//!
//! Whatever goes wrong (error, panic, Ctrl-C), the guards in [`machine`] put every CPU and
//! memory block back online before the lock is released.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use clap::Args as ClapArgs;
use serde::Serialize;

use crate::{process, setup, workspace};

mod agent;
mod fleet;
mod idle;
mod machine;
mod measured;
mod refresh;
mod report;
mod seed_scale;
mod stats;
mod storm;
mod watch;

use machine::{Interrupt, MachineLock};
use report::Section;

/// Arguments of `cargo xtask bench [OPTIONS] [-- SUITE...]`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Sysfs writes per toggle series (CPU and memory block), alternating offline/online
    /// [default: 60, 10 with --quick].
    #[arg(long, value_name = "N")]
    pub toggles: Option<u32>,
    /// Length of the idle window, seconds [default: 60, 5 with --quick].
    #[arg(long, value_name = "SECONDS")]
    pub idle_secs: Option<u64>,
    /// A smoke run: 10 toggles and a 5 s idle window, unless given explicitly.
    #[arg(long)]
    pub quick: bool,
    /// Measure this `hotplug-agent` binary instead of building the workspace's (e.g. to
    /// compare two builds).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Run only these suites (`watch`, `idle`, `refresh`, `seed-scale`, `fleet`, `storm`); all
    /// by default.
    #[arg(last = true)]
    pub suites: Vec<String>,
}

/// What every suite gets.
pub struct Context {
    /// The release build of `hotplug-agent`.
    pub binary: PathBuf,
    /// `target/bench`: the JSON results and the agents' stderr.
    pub out_dir: PathBuf,
    pub toggles: u32,
    pub idle: Duration,
}

type Suite = fn(&Context, &mut Vec<Section>) -> anyhow::Result<()>;

/// The suites, in the order they run.
const SUITES: &[(&str, Suite)] = &[
    ("watch", watch::sections),
    ("idle", idle::section),
    ("refresh", refresh::sections),
    ("seed-scale", seed_scale::sections),
    ("fleet", fleet::sections),
    ("storm", storm::section),
];

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        process::is_root(),
        "cargo xtask bench takes CPUs and memory blocks offline and loads eBPF programs: \
         run it as root (e.g. `sudo -E cargo xtask bench`)"
    );
    for name in &args.suites {
        ensure!(
            SUITES.iter().any(|(suite, _)| suite == name),
            "unknown suite {name:?}; there are: {}",
            SUITES
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let toggles = args.toggles.unwrap_or(if args.quick { 10 } else { 60 });
    ensure!(
        toggles >= 2,
        "--toggles must be at least 2 (offline, online)"
    );
    let idle_secs = args.idle_secs.unwrap_or(if args.quick { 5 } else { 60 });

    let binary = match args.agent {
        Some(binary) => {
            ensure!(
                binary.is_file(),
                "--agent {}: no such file",
                binary.display()
            );
            binary
        }
        None => build_agent()?,
    };
    let out_dir = workspace::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ctx = Context {
        binary,
        out_dir,
        toggles,
        idle: Duration::from_secs(idle_secs),
    };

    Interrupt::install();
    let lock = MachineLock::take()?;
    let machine = Machine::read();
    eprintln!(
        "bench: {toggles} toggles per series, {idle_secs} s idle window; {}",
        machine.line()
    );
    let mut sections = Vec::new();
    let mut errors = Vec::new();
    for (name, suite) in SUITES {
        if !args.suites.is_empty() && !args.suites.iter().any(|s| s == name) {
            continue;
        }
        eprintln!("bench: {name}...");
        // A failed suite has already put the machine back (its guards dropped); the next
        // one still runs, and what the failed one measured is still reported.
        if let Err(err) = suite(&ctx, &mut sections) {
            eprintln!("bench: {name} failed: {err:#}");
            errors.push((*name, format!("{err:#}")));
        }
        if Interrupt::check().is_err() {
            break;
        }
    }
    drop(lock);

    println!("\nhotplug-agent bench: {}", machine.line());
    print!("{}", report::table(&sections));
    // Every section the selected suites measured (not only the watch suite's); a suite
    // with raw output of its own (fleet, storm) also keeps that beside it.
    let json_path = ctx.out_dir.join("results.json");
    write_json(&json_path, &ctx, &machine, &sections, &errors)?;
    println!("\nresults: {}", json_path.display());
    if !errors.is_empty() {
        // The whole error (records seen, the agent's stderr) went to stderr above.
        let first_lines: Vec<String> = errors
            .iter()
            .map(|(name, err)| format!("{name}: {}", err.lines().next().unwrap_or_default()))
            .collect();
        bail!(
            "{} suite(s) failed, the machine is back as it was:\n{}",
            errors.len(),
            first_lines.join("\n")
        );
    }
    Ok(())
}

/// Setup and a release build: the figures are for the optimised agent.
fn build_agent() -> anyhow::Result<PathBuf> {
    setup::run()?;
    process::run(process::cargo().args(["build", "--release", "-p", "hotplug-agent"]))?;
    let binary = workspace::agent_binary("release");
    ensure!(
        binary.is_file(),
        "{} not found after the build",
        binary.display()
    );
    Ok(binary)
}

/// The machine the figures come from: these hosts are shared and noisy, so every result says
/// where it was measured.
#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    kernel: String,
    cpu_model: String,
    /// `/proc/loadavg` when the bench started.
    loadavg: String,
}

impl Machine {
    fn read() -> Self {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    fn line(&self) -> String {
        format!(
            "nproc {}, kernel {}, {}, load {}",
            self.nproc, self.kernel, self.cpu_model, self.loadavg
        )
    }
}

fn write_json(
    path: &Path,
    ctx: &Context,
    machine: &Machine,
    sections: &[Section],
    errors: &[(&str, String)],
) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "machine": machine,
        "toggles": ctx.toggles,
        "idle_secs": ctx.idle.as_secs(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "sections": sections,
        "errors": errors
            .iter()
            .map(|(suite, error)| serde_json::json!({ "suite": suite, "error": error }))
            .collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&doc).context("serialising the results")?;
    fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
