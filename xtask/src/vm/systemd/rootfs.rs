//! The systemd guest's disk: Debian 12 made by `mmdebstrap`, cached by its inputs.
//!
//! `mmdebstrap --variant=minbase --include=PACKAGES --mode=root bookworm DIR` (it uses this
//! host's apt sources; the kernel's postinst writes `boot/initrd.img-*`), a few files of our
//! own ([`configure`]: the control shell, the records forwarder, masked gettys and timers),
//! then `mke2fs -t ext4 -d DIR` into a sparse raw image. The kernel and initrd are copied
//! next to it, and DIR is removed. Everything sits in `target/vm/systemd/<key>/`, where the
//! key hashes the package list, the suite and [`RECIPE_VERSION`] with the files we add: a
//! changed input builds a new image, an unchanged one is reused (about 2-6 minutes to build
//! here, under load; nothing to do when cached). Boots never write to it: each one gets a
//! qcow2 overlay ([`super::machine`]).
use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{process, vm::image::find};

/// Bump when [`configure`] or the build steps change in a way the file texts do not show.
const RECIPE_VERSION: u32 = 1;
const SUITE: &str = "bookworm";

/// What every systemd guest has. systemd, dbus, udev: the init, the system bus the agent
/// restarts the kubelet over, device links for the virtio ports. The kernel and
/// initramfs-tools: the guest boots Debian's own kernel with the initrd its postinst makes.
/// python3: HTTP requests to /readyz and the fake API from inside the guest. podman, runc,
/// crun: the container path runs its runtime in here; netavark and iptables give its
/// containers a pod network of their own (podman's bridge, `--ip`), as a pod has
/// (vm/container.rs). libudev1: the agent links it.
///
/// Not `ca-certificates`: a scenario needs a host without a CA bundle. podman does not pull
/// it in (its Depends do not reach it; mmdebstrap installs no Recommends), which
/// [`Rootfs::ca_bundle`] checks on every build, so the base image is that host, and the
/// test doubles get a bundle of their own (`SSL_CERT_FILE`) from the share.
pub const BASE_PACKAGES: [&str; 13] = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "podman",
    "runc",
    "crun",
    "netavark",
    "iptables",
    "libudev1",
];

/// Debian's CA bundle, where rustls-native-certs looks first.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The guest's control shell (`org.hotplug.control`): the protocol of `vm/init.sh`.
const CONTROL_SH: &str = r#"#!/bin/sh
# hotplug-vm control shell (xtask/src/vm/systemd/rootfs.rs): one command line at a time from
# the host, run with sh -c, answered with its output and `@@rc N` (the protocol of vm/init.sh).
port=/dev/virtio-ports/org.hotplug.control
while [ ! -e "$port" ]; do sleep 0.05; done
exec 3<>"$port"
echo "@@ready" >&3
while read -r line <&3; do
    sh -c "$line" </dev/null >/run/hotplug-vm.out 2>&1 3>&-
    rc=$?
    cat /run/hotplug-vm.out >&3
    [ -s /run/hotplug-vm.out ] && [ -n "$(tail -c 1 /run/hotplug-vm.out)" ] && echo >&3
    echo "@@rc $rc" >&3
done
"#;

const CONTROL_UNIT: &str = "[Unit]
Description=cargo xtask vm-test control shell on virtio-serial
# Early, so the host can watch the rest of the boot (systemctl is-system-running --wait).
DefaultDependencies=no
After=systemd-udevd.service local-fs.target
[Service]
ExecStart=/usr/local/lib/hotplug-vm/control.sh
# Commands started from the shell (`... &`) are the host's business, not this unit's.
KillMode=process
[Install]
WantedBy=sysinit.target
";

/// The agent's event log file (`HOTPLUG_AGENT_LOG_FILE`), as it is written, onto the
/// records port: the host stamps each record on arrival. `tail -F` follows the file across
/// agent restarts and rotations.
pub const AGENT_LOG: &str = "/var/log/hotplug-agent/events.ndjson";
const RECORDS_UNIT: &str = "[Unit]
Description=cargo xtask vm-test: the agent's event log file onto virtio-serial
DefaultDependencies=no
After=systemd-udevd.service local-fs.target
[Service]
ExecStart=/bin/sh -c 'while [ ! -e /dev/virtio-ports/org.hotplug.records ]; do sleep 0.05; done; \
exec tail -q -F -n +1 /var/log/hotplug-agent/events.ndjson >/dev/virtio-ports/org.hotplug.records 2>/dev/null'
[Install]
WantedBy=sysinit.target
";

/// Units that would compete for the console or the CPU (TCG is slow enough).
const MASKED: [&str; 8] = [
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-timesyncd.service",
];

/// A built image and what boots it.
#[derive(Clone, Debug)]
pub struct Rootfs {
    /// ext4, raw, never written to.
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `6.1.0-41-amd64`.
    pub kernel_release: String,
    pub packages: Vec<String>,
    /// Whether the image has [`CA_BUNDLE`] (some extra package may bring it).
    pub ca_bundle: bool,
    /// Build time when it was built now; `None` when it came from the cache.
    pub built_in: Option<Duration>,
}

/// The image with [`BASE_PACKAGES`] and `extra`, built unless cached.
pub fn prepare(vm_dir: &Path, extra: &[&str]) -> anyhow::Result<Rootfs> {
    let mut packages: Vec<String> = BASE_PACKAGES
        .iter()
        .chain(extra)
        .map(|p| (*p).to_owned())
        .collect();
    packages.sort();
    packages.dedup();
    let key = cache_key(&packages);
    let dir = vm_dir.join("systemd").join(&key);
    let started = Instant::now();
    let built = if dir.join("manifest").exists() {
        false
    } else {
        build(&dir, &packages)?;
        true
    };
    let manifest = fs::read_to_string(dir.join("manifest"))?;
    let field = |name: &str| {
        manifest
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
            .with_context(|| format!("{name} missing from {}/manifest", dir.display()))
    };
    Ok(Rootfs {
        image: dir.join("base.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        kernel_release: field("kernel_release")?,
        packages,
        ca_bundle: field("ca_bundle")? == "yes",
        built_in: built.then(|| started.elapsed()),
    })
}

/// Hex of a hash over every input of the image.
fn cache_key(packages: &[String]) -> String {
    let mut h = DefaultHasher::new();
    (RECIPE_VERSION, SUITE, packages).hash(&mut h);
    (CONTROL_SH, CONTROL_UNIT, RECORDS_UNIT, MASKED).hash(&mut h);
    format!("{SUITE}-{:016x}", h.finish())
}

fn build(dir: &Path, packages: &[String]) -> anyhow::Result<()> {
    if process::which("mmdebstrap").is_none() {
        bail!("mmdebstrap not found (Debian package mmdebstrap; `cargo xtask setup` installs it)");
    }
    // Built aside and renamed into place: a concurrent run never sees half an image.
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let root = tmp.join("root");
    eprintln!(
        "vm: building the systemd guest image ({}; a few minutes, once)",
        packages.join(",")
    );
    let t = Instant::now();
    process::run(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--mode=root", "--quiet"])
            .arg(format!("--include={}", packages.join(",")))
            .arg(SUITE)
            .arg(&root),
    )?;
    eprintln!("vm: mmdebstrap took {:.0} s", t.elapsed().as_secs_f64());
    configure(&root)?;

    let boot = root.join("boot");
    let vmlinuz = find(&boot, |n| n.starts_with("vmlinuz-"))?.context("no boot/vmlinuz-*")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel file name")?
        .to_owned();
    let initrd = boot.join(format!("initrd.img-{release}"));
    fs::copy(&vmlinuz, tmp.join("vmlinuz"))?;
    fs::copy(&initrd, tmp.join("initrd.img"))
        .with_context(|| format!("copying {} (initramfs-tools' postinst)", initrd.display()))?;
    let ca_bundle = root.join(CA_BUNDLE.trim_start_matches('/')).exists();

    // 4 GiB, sparse: room for what scenarios install and for the container images.
    process::run(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "root", "-F", "-d"])
            .arg(&root)
            .arg(tmp.join("base.img"))
            .arg("4G"),
    )?;
    fs::remove_dir_all(&root)?;
    fs::write(
        tmp.join("manifest"),
        format!(
            "kernel_release={release}\nca_bundle={}\npackages={}\n",
            if ca_bundle { "yes" } else { "no" },
            packages.join(",")
        ),
    )?;
    if dir.exists() {
        // Another run finished the same image first.
        fs::remove_dir_all(&tmp)?;
    } else {
        fs::rename(&tmp, dir)?;
    }
    eprintln!(
        "vm: systemd guest image ready in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the guest needs beyond the packages: a root file system in fstab, our two
/// services, the masks.
fn configure(root: &Path) -> anyhow::Result<()> {
    let write = |rel: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().context("parent")?)?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("etc/hostname", "sysguest\n", 0o644)?;
    write("etc/hosts", "127.0.0.1 localhost sysguest\n", 0o644)?;
    // Pass 0: the overlay is fresh and clean at every boot; no fsck under TCG.
    write(
        "etc/fstab",
        "/dev/vda / ext4 rw,errors=remount-ro 0 0\n",
        0o644,
    )?;
    write("usr/local/lib/hotplug-vm/control.sh", CONTROL_SH, 0o755)?;
    let units = "etc/systemd/system";
    write(
        &format!("{units}/hotplug-vm-control.service"),
        CONTROL_UNIT,
        0o644,
    )?;
    write(
        &format!("{units}/hotplug-vm-records.service"),
        RECORDS_UNIT,
        0o644,
    )?;
    let wants = root.join(units).join("sysinit.target.wants");
    fs::create_dir_all(&wants)?;
    for unit in ["hotplug-vm-control.service", "hotplug-vm-records.service"] {
        symlink(format!("/{units}/{unit}"), wants.join(unit))?;
    }
    for unit in MASKED {
        let link = root.join(units).join(unit);
        let _ = fs::remove_file(&link);
        symlink("/dev/null", &link)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_the_package_list() {
        let a = cache_key(&["dbus".into(), "systemd".into()]);
        assert_eq!(a, cache_key(&["dbus".into(), "systemd".into()]));
        assert_ne!(a, cache_key(&["dbus".into(), "podman".into()]));
        assert!(a.starts_with("bookworm-"));
    }
}
