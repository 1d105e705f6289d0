//! Developer tasks for the hotplug-agent workspace, run as `cargo xtask <task>` (the alias
//! lives in `.cargo/config.toml`).
//!
//! - [`setup`]: installs what a fresh Debian 12 machine lacks (rust-src, bpf-linker,
//!   libudev-dev, pkg-config) and mounts tracefs; idempotent and fast when nothing is missing.
//! - [`run`]: setup, release build, then `hotplug-agent watch` (or the given arguments).
//! - [`test`]: setup, one workspace build, the unprivileged tests in parallel, then the
//!   privileged integration tests (`hotplug-tests`) one at a time; prints a summary line.
//! - [`bench`]: latency from a real sysfs write to the record, eBPF delivery, idle footprint (as root).
//! - [`vm`]: real DIMM, virtio-mem and CPU hot-add/unplug in a QEMU guest with the agent inside.
//!
//! [`process`] and [`workspace`] hold what the tasks share: running commands, root and sudo,
//! and where the workspace and its target directory are.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod process;
mod run;
mod setup;
mod tally;
mod test;
mod vm;
mod workspace;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for hotplug-agent"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing (rust-src, bpf-linker 0.10.2, libudev-dev, pkg-config) and
    /// mount tracefs; says what it did for each item.
    Setup,
    /// Setup, build the agent (release) and run it: `hotplug-agent watch` by default.
    Run(run::Args),
    /// Setup, then the whole test suite; privileged tests run one at a time.
    Test(test::Args),
    /// Measure: hotplug-to-record latency per source, eBPF delivery, idle RSS and wake-ups (root).
    Bench(bench::Args),
    /// Real DIMM, virtio-mem and CPU hotplug in a QEMU guest (TCG) with the agent inside,
    /// driven over QMP; asserts on the agent's records and prints latencies.
    VmTest(vm::Args),
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().task {
        Task::Setup => setup::run()?,
        Task::Run(args) => run::run(args)?,
        Task::Test(args) => return test::run(args),
        Task::Bench(args) => bench::run(args)?,
        Task::VmTest(args) => return vm::run(args),
    }
    Ok(ExitCode::SUCCESS)
}
