//! Builds the eBPF object (`agent-ebpf`) with aya-build and leaves it in `OUT_DIR`, where
//! `sources/ebpf.rs` embeds it.
//!
//! The recipe that builds on stable here (DESIGN.md): rust-src plus bpf-linker 0.10.2, and
//! `RUSTC_BOOTSTRAP=1` so that aya-build may pass `-Z build-std=core` to the stable compiler.
//! `AYA_BUILD_SKIP=1` switches the eBPF build off (for a quick `cargo check` or clippy on
//! a machine without bpf-linker): an empty object is written and the agent then reports at
//! load time that it was built without its probes.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::Context as _;

const OBJECT: &str = "hotplug-probes";

fn main() -> anyhow::Result<()> {
    revision();
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

/// `HOTPLUG_AGENT_REVISION` for `hotplug_agent_build_info{revision}`: the variable of the
/// same name if set (the Dockerfile's build argument: its build context has no .git), else
/// `git rev-parse HEAD`, else `unknown`. Rerun when HEAD or the branch it names moves.
fn revision() {
    println!("cargo:rerun-if-env-changed=HOTPLUG_AGENT_REVISION");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let revision = env::var("HOTPLUG_AGENT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            // A path that does not exist would make cargo rerun this script on every build.
            let watch = |name: &str| {
                let path = git(&["rev-parse", "--path-format=absolute", "--git-path", name])?;
                PathBuf::from(&path)
                    .exists()
                    .then(|| println!("cargo:rerun-if-changed={path}"))
            };
            watch("HEAD");
            watch("packed-refs");
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&branch);
            }
            git(&["rev-parse", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HOTPLUG_AGENT_REVISION={revision}");
}
