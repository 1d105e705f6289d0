//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build and run the
//! agent, one line per item. Every check is local (no network) so that the common case,
//! nothing missing, costs a few tens of milliseconds: `run` and `test` call this first.
use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::process::{self, Privilege};

/// The version DESIGN.md proves on this toolchain: it links against rustc's own LLVM.
const BPF_LINKER_VERSION: &str = "0.10.2";
/// libudev-dev and pkg-config: the `udev` crate's build script finds libudev through
/// pkg-config. dbus-daemon: the systemd refresh tests run a private bus. qemu-system-x86,
/// busybox-static, kmod, cpio: `cargo xtask vm-test` boots a guest (VM-HOTPLUG.md);
/// mmdebstrap and qemu-utils (qemu-img): its systemd guest's image and per-boot overlay.
/// prometheus (with promtool): tests/monitoring.rs checks the alert rules, a live scrape and
/// a real server's view of a CPU toggle. Without an init system, Debian's policy keeps its
/// service from starting at install time; the tests run their own server.
const DEBIAN_PACKAGES: [&str; 10] = [
    "libudev-dev",
    "pkg-config",
    "dbus-daemon",
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "cpio",
    "mmdebstrap",
    "qemu-utils",
    "prometheus",
];
/// Where aya looks for tracefs first when it attaches tracepoints.
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    tracefs()?;
    eprintln!("setup: done in {:.2?}", started.elapsed());
    Ok(())
}

/// rust-src for the `stable` toolchain: `agent/build.rs` builds the eBPF crate with
/// `aya_build::Toolchain::Custom("stable")` and `-Z build-std=core`, which needs the sources
/// of `core` from that toolchain, whatever toolchain is active for the workspace.
fn rust_src() -> anyhow::Result<()> {
    let Some(rustup) = process::which("rustup") else {
        eprintln!(
            "rust-src: cannot check, rustup not found \
             (the eBPF build needs rust-src for the stable toolchain)"
        );
        return Ok(());
    };
    let installed = || -> anyhow::Result<bool> {
        let out = Command::new(&rustup)
            .args(["component", "list", "--installed", "--toolchain", "stable"])
            .output()
            .context("running `rustup component list`")?;
        if !out.status.success() {
            bail!(
                "`rustup component list --installed --toolchain stable` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // rust-src is target-independent, so rustup lists it without a target suffix.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.trim() == "rust-src"))
    };
    if installed()? {
        eprintln!("rust-src: already installed");
        return Ok(());
    }
    process::run(Command::new(&rustup).args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "stable",
    ]))?;
    eprintln!("rust-src: installed");
    Ok(())
}

/// Debian packages, through apt-get; `apt-get update` runs only when something is missing.
/// A C compiler is checked too: cargo links build scripts through `cc`.
fn debian_packages() -> anyhow::Result<()> {
    if process::which("dpkg-query").is_none() {
        for package in DEBIAN_PACKAGES {
            eprintln!(
                "{package}: cannot check, dpkg-query not found (not Debian?): install it by hand"
            );
        }
        return Ok(());
    }
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        if dpkg_installed(package)? {
            eprintln!("{package}: already installed");
        } else {
            missing.push(package);
        }
    }
    if process::which("cc").is_some() {
        eprintln!("cc: already installed");
    } else {
        missing.extend(["gcc", "libc6-dev"]);
    }
    if missing.is_empty() {
        return Ok(());
    }

    let privilege = Privilege::current();
    let (Some(mut update), Some(mut install)) =
        (privilege.command("apt-get"), privilege.command("env"))
    else {
        bail!(
            "{} missing, and neither root nor sudo to install them; as root, run: \
             apt-get update && apt-get install -y --no-install-recommends {}",
            missing.join(", "),
            missing.join(" ")
        );
    };
    process::run(update.arg("update"))?;
    // Through `env` so that the variable survives sudo's environment reset.
    install
        .args([
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
        ])
        .args(&missing);
    process::run(&mut install)?;
    for package in missing {
        if !dpkg_installed(package)? {
            bail!("{package}: still not installed after apt-get install");
        }
        eprintln!("{package}: installed");
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> anyhow::Result<bool> {
    // Exits 1 for a package dpkg has never heard of: that is "not installed", not an error.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("running dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// bpf-linker as aya-build will find it: first on `PATH`, then in cargo's bin directory (which
/// [`process::cargo`] appends to `PATH`).
fn bpf_linker() -> anyhow::Result<()> {
    match bpf_linker_version()? {
        Some((_, version)) if version == BPF_LINKER_VERSION => {
            eprintln!("bpf-linker: already installed ({version})");
            return Ok(());
        }
        Some((path, version)) => eprintln!(
            "bpf-linker: {} is {version}, need {BPF_LINKER_VERSION}: installing",
            path.display()
        ),
        None => {
            eprintln!("bpf-linker: not found: installing {BPF_LINKER_VERSION} (about a minute)")
        }
    }
    let mut install = process::cargo();
    install.args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]);
    process::echo(&install);
    let status = install.status().context("starting cargo install")?;
    if !status.success() {
        // rustc 1.95's bundled rust-lld has been seen to segfault here while linking a build
        // script, and to succeed on the next attempt.
        eprintln!(
            "bpf-linker: `{}` failed ({status}); retrying once \
             (rust-lld sometimes crashes linking build scripts)",
            process::display(&install)
        );
        process::run(&mut install).context("installing bpf-linker (second attempt)")?;
    }
    match bpf_linker_version()? {
        Some((_, version)) if version == BPF_LINKER_VERSION => {
            eprintln!("bpf-linker: installed ({version})");
            Ok(())
        }
        Some((path, version)) => bail!(
            "bpf-linker: installed {BPF_LINKER_VERSION}, but {} ({version}) comes first on PATH: \
             remove it or put cargo's bin directory first",
            path.display()
        ),
        None => bail!("bpf-linker: installed, but not found on PATH nor in cargo's bin directory"),
    }
}

/// The bpf-linker that would be used and its version (`bpf-linker 0.10.2` -> `0.10.2`).
fn bpf_linker_version() -> anyhow::Result<Option<(std::path::PathBuf, String)>> {
    let Some(path) = process::which("bpf-linker") else {
        return Ok(None);
    };
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", path.display()))?;
    let version = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    Ok(Some((path, version)))
}

/// tracefs at /sys/kernel/tracing: aya attaches tracepoints through it. A failed mount is a
/// warning, not an error: the agent then says which probes it could not attach and goes on
/// with its other sources.
fn tracefs() -> anyhow::Result<()> {
    if tracefs_mounted()? {
        eprintln!("tracefs: already mounted at {TRACEFS}");
        return Ok(());
    }
    if !Path::new(TRACEFS).is_dir() {
        eprintln!("tracefs: skipped, {TRACEFS} does not exist (kernel without tracing?)");
        return Ok(());
    }
    if !process::is_root() {
        eprintln!(
            "tracefs: not mounted, skipped (not root; as root: mount -t tracefs tracefs {TRACEFS})"
        );
        return Ok(());
    }
    match process::run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS])) {
        Ok(()) => eprintln!("tracefs: mounted at {TRACEFS}"),
        Err(err) => eprintln!("tracefs: warning: {err:#}: eBPF tracepoints will not attach"),
    }
    Ok(())
}

fn tracefs_mounted() -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(is_mounted(&mounts, TRACEFS, "tracefs"))
}

/// Whether `/proc/self/mounts` (fstab format: device, mount point, type, ...) has a `fstype`
/// mount at `target`.
fn is_mounted(mounts: &str, target: &str, fstype: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(target) && fields.next() == Some(fstype)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tracefs_mount() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      tracefs /sys/kernel/tracing tracefs rw,relatime 0 0\n";
        assert!(is_mounted(mounts, TRACEFS, "tracefs"));
        assert!(!is_mounted(mounts, "/sys/kernel/debug", "debugfs"));
        assert!(!is_mounted("sysfs /sys sysfs rw 0 0\n", TRACEFS, "tracefs"));
    }
}
