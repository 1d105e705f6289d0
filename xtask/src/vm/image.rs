//! The guest: Debian's kernel and an initramfs with busybox, the agent and its libraries.
//!
//! - Kernel: Debian's package ([`super::kernel`]).
//! - initramfs (cpio newc, gzip): `/init` ([`INIT`]), busybox-static, the modules, the
//!   binaries (stripped) with every library `ldd` lists and the dynamic loader. The test
//!   doubles go into a second archive that is appended only for the guests that need them
//!   (the kernel unpacks concatenated archives in turn).
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::kernel::Kernel;
use crate::process;

/// The guest's `/init`.
const INIT: &str = include_str!("init.sh");

/// `insmod` order (VM-HOTPLUG.md), then the virtio-serial driver for the two ports.
pub const MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mem",
    "virtio_console",
];

/// Debian's CA bundle (package ca-certificates), where rustls-native-certs looks first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What QEMU boots.
pub struct Image {
    /// `vmlinux` (PVH) or `vmlinuz`.
    pub kernel: PathBuf,
    /// `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// The base initramfs (the agent), and with the test doubles appended.
    pub initrd: PathBuf,
    pub initrd_doubles: PathBuf,
}

/// The binaries that go into the guest.
pub struct Binaries {
    pub agent: PathBuf,
    pub fake_apiserver: PathBuf,
    pub kubelet_standin: PathBuf,
    pub pod_standin: PathBuf,
}

pub fn prepare(dir: &Path, bins: &Binaries) -> anyhow::Result<Image> {
    let kernel = Kernel::fetch(dir)?;
    let base = dir.join("initramfs");
    let doubles = dir.join("initramfs-doubles");
    stage_base(&base, &kernel, &bins.agent)?;
    fresh_dir(&doubles)?;
    stage_binaries(
        &doubles,
        &[
            &bins.fake_apiserver,
            &bins.kubelet_standin,
            &bins.pod_standin,
        ],
    )?;
    // The kube clients (rustls) refuse to start without CA certificates, plain HTTP or not.
    let certs = doubles.join(CA_BUNDLE.trim_start_matches('/'));
    fs::create_dir_all(certs.parent().context("CA bundle path")?)?;
    fs::copy(CA_BUNDLE, &certs)
        .with_context(|| format!("copying {CA_BUNDLE} (ca-certificates)"))?;
    let initrd = dir.join("initramfs.gz");
    let doubles_gz = dir.join("initramfs-doubles.gz");
    cpio_gz(&base, &initrd)?;
    cpio_gz(&doubles, &doubles_gz)?;
    let initrd_doubles = dir.join("initramfs-with-doubles.gz");
    let mut both = fs::read(&initrd)?;
    both.extend(fs::read(&doubles_gz)?);
    fs::write(&initrd_doubles, both)?;
    Ok(Image {
        kernel: kernel.boot,
        package: kernel.package,
        initrd,
        initrd_doubles,
    })
}

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn stage_base(dir: &Path, kernel: &Kernel, agent: &Path) -> anyhow::Result<()> {
    fresh_dir(dir)?;
    for sub in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "lib/modules",
    ] {
        fs::create_dir_all(dir.join(sub))?;
    }
    write_mode(&dir.join("init"), INIT.as_bytes(), 0o755)?;
    // busybox-static: the dynamic `busybox` package would need its own libraries.
    let busybox = process::which("busybox").context("busybox not found (busybox-static)")?;
    fs::copy(&busybox, dir.join("bin/busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    for name in MODULES {
        let src = kernel.module(name)?;
        let dst = dir.join("lib/modules").join(format!("{name}.ko"));
        if src.extension().is_some_and(|e| e == "xz") {
            let ko = output_bytes(Command::new("xz").arg("-dc").arg(&src))?;
            fs::write(&dst, ko)?;
        } else {
            fs::copy(&src, &dst)?;
        }
    }
    stage_binaries(dir, &[agent])
}

/// Stripped copies in `bin/`, and their libraries at the paths `ldd` resolved them to.
fn stage_binaries(dir: &Path, bins: &[&Path]) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("bin"))?;
    for bin in bins {
        let name = bin.file_name().context("binary without a name")?;
        let dst = dir.join("bin").join(name);
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&dst)
            .arg(bin)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(bin, &dst).with_context(|| format!("copying {}", bin.display()))?;
        }
        for lib in libraries(bin)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib);
            let dst = dir.join(rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            // `cp -L`: the file the link points to, under the name the loader asks for.
            fs::copy(&lib, &dst).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    Ok(())
}

/// The shared libraries and the loader, from `ldd`.
fn libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(bin))?;
    Ok(parse_ldd(&out))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `find . | cpio -o -H newc | gzip` of `dir`, without a shell.
fn cpio_gz(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let mut names = Vec::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        names.push(rel.clone());
        if dir.join(&rel).is_dir() && !dir.join(&rel).is_symlink() {
            let mut children: Vec<PathBuf> = fs::read_dir(dir.join(&rel))?
                .map(|e| e.map(|e| rel.join(e.file_name())))
                .collect::<Result<_, _>>()?;
            children.sort();
            stack.extend(children.into_iter().rev());
        }
    }
    let list: String = names.iter().map(|p| format!("{}\n", p.display())).collect();
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Command::new("cpio")
        .current_dir(dir)
        .args(["-o", "-H", "newc", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cpio")?;
    let mut gzip = Command::new("gzip")
        .args(["-1", "-n"])
        .stdin(cpio.stdout.take().context("cpio stdout")?)
        .stdout(file)
        .spawn()
        .context("starting gzip")?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all(list.as_bytes())?;
    let (c, g) = (cpio.wait()?, gzip.wait()?);
    if !c.success() || !g.success() {
        bail!("cpio ({c}) | gzip ({g}) of {} failed", dir.display());
    }
    Ok(())
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The first entry of `dir` whose name satisfies `pred`.
pub(super) fn find(dir: &Path, pred: impl Fn(&str) -> bool) -> anyhow::Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found.pop())
}

pub(super) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(cmd)?).into_owned())
}

fn output_bytes(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("running `{}`", process::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            process::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007f8e)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8e)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f8e)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libudev.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }
}
