//! `cargo xtask bench`: not written yet.
//!
//! TODO: measure detection latency and burst handling (see DESIGN.md, "Proven facts").
//! Give [`Args`] its options and replace the body of [`run`]; `main.rs` needs no change.
use clap::Args as ClapArgs;

/// Arguments of `cargo xtask bench [-- ARGS...]`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Passed through to the benchmarks.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let _ = args;
    eprintln!("bench: not implemented yet");
    std::process::exit(1)
}
