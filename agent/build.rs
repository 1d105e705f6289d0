//! Builds the eBPF object (`agent-ebpf`) with aya-build and leaves it in `OUT_DIR`, where
//! `sources/ebpf.rs` embeds it.
//!
//! The recipe that builds on stable here (DESIGN.md): rust-src plus bpf-linker 0.10.2, and
//! `RUSTC_BOOTSTRAP=1` so that aya-build may pass `-Z build-std=core` to the stable compiler.
//! `AYA_BUILD_SKIP=1` switches the eBPF build off (for a quick `cargo check` or clippy on
//! a machine without bpf-linker): an empty object is written and the agent then reports at
//! load time that it was built without its probes.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "hotplug-probes";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join(OBJECT), []).context("writing the empty eBPF stub")?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    // SAFETY: the build script is single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable")).context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
