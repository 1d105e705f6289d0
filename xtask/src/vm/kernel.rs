//! The guest kernel: Debian's, as its package ships it.
//!
//! `apt-get download linux-image-amd64` and the versioned package it depends on, cached in
//! `target/vm/debs`; only `boot/` and the virtio modules are unpacked. The bzImage's XZ
//! payload is unpacked once more into an ELF `vmlinux` when the kernel has `CONFIG_PVH`:
//! QEMU then boots it directly (PVH entry) instead of letting the guest decompress ~65 MB
//! under TCG, which saves about 4 s per boot here.
use std::{
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::image::{find, output};
use crate::process::{self, Privilege};

pub struct Kernel {
    pub package: String,
    /// What QEMU boots.
    pub boot: PathBuf,
    /// The unpacked package: `boot/`, `lib/modules/*/kernel/drivers/{virtio,char}`.
    root: PathBuf,
}

impl Kernel {
    pub fn fetch(dir: &Path) -> anyhow::Result<Self> {
        let debs = dir.join("debs");
        fs::create_dir_all(&debs)?;
        let meta = cached_or_download(&debs, "linux-image-amd64")?;
        let depends = output(Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"))?;
        let package = versioned_package(&depends).with_context(|| {
            format!(
                "no linux-image-* in {}'s Depends: {depends}",
                meta.display()
            )
        })?;
        let deb = cached_or_download(&debs, &package)?;
        let root = dir.join("kernel").join(&package);
        let done = root.join(".unpacked");
        if !done.exists() {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root)?;
            eprintln!("vm: unpacking boot/ and the virtio modules of {package}");
            unpack(&deb, &root)?;
            fs::write(&done, "")?;
        }
        let vmlinuz = find(&root.join("boot"), |n| n.starts_with("vmlinuz-"))?
            .context("no boot/vmlinuz-* in the package")?;
        let config = find(&root.join("boot"), |n| n.starts_with("config-"))?;
        let pvh = config
            .and_then(|c| fs::read_to_string(c).ok())
            .is_some_and(|c| c.lines().any(|l| l == "CONFIG_PVH=y"));
        let vmlinux = root.join("vmlinux");
        let boot = if vmlinux.exists() {
            vmlinux
        } else if pvh {
            match extract_vmlinux(&vmlinuz, &vmlinux) {
                Ok(()) => vmlinux,
                Err(e) => {
                    eprintln!("vm: booting the compressed kernel ({e:#})");
                    vmlinuz
                }
            }
        } else {
            vmlinuz
        };
        Ok(Self {
            package,
            boot,
            root,
        })
    }

    /// `virtio_pci` -> `.../kernel/drivers/virtio/virtio_pci.ko` (or `.ko.xz`).
    pub fn module(&self, name: &str) -> anyhow::Result<PathBuf> {
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if entry.file_name() == format!("{name}.ko").as_str()
                    || entry.file_name() == format!("{name}.ko.xz").as_str()
                {
                    return Ok(path);
                }
            }
        }
        bail!("module {name} not in {}", self.root.display())
    }
}

/// `linux-image-6.1.0-56-amd64 (= 6.1.192-2)` -> `linux-image-6.1.0-56-amd64`.
fn versioned_package(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|alt| alt.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-") && name != &"linux-image-amd64")
        .map(str::to_owned)
}

/// `DIR/PACKAGE_*.deb`, downloaded with `apt-get download` if not there yet.
fn cached_or_download(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("{package}_");
    let cached = || find(dir, |n| n.starts_with(&prefix) && n.ends_with(".deb"));
    if let Some(deb) = cached()? {
        return Ok(deb);
    }
    let mut download = Command::new("apt-get");
    download.current_dir(dir).args(["download", package]);
    if process::run(&mut download).is_err() {
        // Empty or stale package lists: update them once, as setup would, and retry.
        let Some(mut update) = Privilege::current().command("apt-get") else {
            bail!("`apt-get download {package}` failed; run `apt-get update` as root and retry");
        };
        process::run(update.arg("update"))?;
        process::run(&mut download)?;
    }
    cached()?.with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            dir.display()
        )
    })
}

/// Only what the guest needs from the package: `boot/` and the virtio drivers.
fn unpack(deb: &Path, root: &Path) -> anyhow::Result<()> {
    let mut fsys = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    let status = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(root)
        .args([
            "--wildcards",
            "./boot/*",
            "*/kernel/drivers/virtio/*",
            "*/kernel/drivers/char/virtio_console.ko*",
        ])
        .stdin(fsys.stdout.take().context("dpkg-deb stdout")?)
        .status()
        .context("starting tar")?;
    let fsys_status = fsys.wait()?;
    if !status.success() || !fsys_status.success() {
        bail!(
            "unpacking {} failed (dpkg-deb {fsys_status}, tar {status})",
            deb.display()
        );
    }
    Ok(())
}

/// The ELF kernel inside a bzImage whose payload is XZ (Debian's): from the XZ magic on,
/// through `xz -dc --single-stream` (which ignores what follows the stream).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> anyhow::Result<()> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let image = fs::read(vmlinuz)?;
    let start = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .context("no XZ payload in the bzImage")?;
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting xz")?;
    let mut stdin = xz.stdin.take().context("xz stdin")?;
    let payload = image[start..].to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&payload));
    let mut elf = Vec::new();
    xz.stdout
        .take()
        .context("xz stdout")?
        .read_to_end(&mut elf)?;
    let _ = feeder.join();
    xz.wait()?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("the XZ payload is not an ELF kernel");
    }
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &elf)?;
    fs::rename(&tmp, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_versioned_kernel_package() {
        assert_eq!(
            versioned_package("linux-image-6.1.0-56-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            versioned_package("initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-amd64")
                .as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(versioned_package("kmod"), None);
    }
}
