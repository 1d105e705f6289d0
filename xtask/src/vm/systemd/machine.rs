//! One booted systemd guest: QEMU on a qcow2 overlay of the cached image, a 9p share with
//! the host, the control shell and the records port, QMP.
//!
//! TCG, `-machine pc -cpu qemu64 -smp 2,maxcpus=4 -m 2G,slots=4,maxmem=8G` (DESIGN.md:
//! `-cpu host` aborts and KVM with qemu64 hung here), no network device (`-nic none`: the
//! guest's loopback is all the scenarios use), Debian's kernel and initrd from the image
//! with `root=/dev/vda`. `memhp_default_state=offline`: hot-added memory stays offline
//! unless the agent onlines it, so auto-online is the agent's doing.
//!
//! The share (`-virtfs`, tag `hostshare`, mounted at [`SHARE`]) is a per-boot directory on
//! the host: files go in and out through it while the guest runs. It is mounted by the
//! first command after boot, not from fstab, so a share problem is an error that says so.
use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::rootfs::Rootfs;
use crate::{
    process,
    vm::{
        guest::{Records, Shell},
        qemu::{self, tail},
        qmp::Qmp,
    },
};

/// podman's boot-time units (auto-update, restarting containers) took 40-60 s of a TCG
/// boot here and nothing needs them: masked from the kernel command line (systemd reads
/// `systemd.mask=`), so the cached image stays as it is.
const MASKED: &str = "systemd.mask=podman-auto-update.service systemd.mask=podman-auto-update.timer \
                      systemd.mask=podman-restart.service systemd.mask=e2scrub_reap.service";

/// Where the host's share is mounted in the guest.
pub const SHARE: &str = "/mnt/host";
/// systemd to multi-user.target takes ~15-40 s under TCG here; room for a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// A default for one guest command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// `-m`.
    pub memory: String,
    /// `-smp`.
    pub smp: String,
    /// Appended to the kernel command line.
    pub append: String,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            memory: "2G,slots=4,maxmem=8G".into(),
            smp: "2,maxcpus=4".into(),
            append: String::new(),
        }
    }
}

pub struct Machine {
    child: Child,
    sock_dir: PathBuf,
    /// console.log, qemu.log, records.ndjson, overlay.qcow2 (removed on drop).
    pub log_dir: PathBuf,
    /// The host side of [`SHARE`].
    pub share: PathBuf,
    pub qmp: Qmp,
    pub shell: Shell,
    /// The agent's event log file ([`super::rootfs::AGENT_LOG`]) as it is written.
    pub records: Records,
    /// QEMU start to the control shell answering.
    pub shell_up: Duration,
    /// QEMU start to `systemctl is-system-running --wait` returning.
    pub booted: Duration,
    /// What `is-system-running` said (`running`, or `degraded` with the failed units).
    pub system_state: String,
    next_copy: u32,
}

impl Machine {
    pub fn boot(rootfs: &Rootfs, log_dir: &Path, opts: &BootOptions) -> anyhow::Result<Self> {
        let _ = fs::remove_dir_all(log_dir);
        fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let share = log_dir.join("share");
        fs::create_dir_all(share.join("out"))?;
        let overlay = log_dir.join("overlay.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&rootfs.image)
            .arg(&overlay)
            .output()
            .context("running qemu-img (package qemu-utils)")?;
        ensure!(
            out.status.success(),
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let sock_dir = std::env::temp_dir().join(format!(
            "hotplug-sysvm-{}-{}",
            std::process::id(),
            log_dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        let _ = fs::remove_dir_all(&sock_dir);
        fs::create_dir_all(&sock_dir)?;
        let (qmp_sock, ctl_sock, rec_sock) = (
            sock_dir.join("qmp"),
            sock_dir.join("ctl"),
            sock_dir.join("rec"),
        );
        let console = log_dir.join("console.log");
        let qemu_log = fs::File::create(log_dir.join("qemu.log"))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "pc", "-accel", "tcg", "-cpu", "qemu64"])
            .args(["-m", &opts.memory, "-smp", &opts.smp])
            .arg("-kernel")
            .arg(&rootfs.kernel)
            .arg("-initrd")
            .arg(&rootfs.initrd)
            .arg("-append")
            .arg(format!(
                "root=/dev/vda rw console=ttyS0 memhp_default_state=offline panic=-1 {MASKED} {}",
                opts.append
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=unsafe",
                overlay.display()
            ))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=hostshare,security_model=none,id=hostshare",
                share.display()
            ))
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .args(["-device", "virtio-serial-pci,id=vser0"]);
        // wait=on: QEMU starts the guest only once we hold both ports (vm/qemu.rs).
        for (id, sock, name) in [
            ("ctl", &ctl_sock, "org.hotplug.control"),
            ("rec", &rec_sock, "org.hotplug.records"),
        ] {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id={id},path={},server=on,wait=on",
                    sock.display()
                ))
                .arg("-device")
                .arg(format!("virtserialport,chardev={id},name={name}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log);
        process::echo(&cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let setup = (|| {
            let ctl = connect(&mut child, &ctl_sock, log_dir)?;
            let rec = connect(&mut child, &rec_sock, log_dir)?;
            connect(&mut child, &qmp_sock, log_dir)?;
            let qmp = Qmp::connect(&qmp_sock, Duration::from_secs(60))?;
            let mut shell = Shell::new(ctl)?;
            let records = Records::spawn(rec, &log_dir.join("records.ndjson"))?;
            shell.wait_ready(BOOT_TIMEOUT)?;
            anyhow::Ok((qmp, shell, records))
        })();
        let (qmp, shell, records) = match setup {
            Ok(parts) => parts,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_dir_all(&sock_dir);
                return Err(e.context(format!(
                    "booting the systemd guest; console:\n{}",
                    tail(&console, 40)
                )));
            }
        };
        let mut m = Self {
            child,
            sock_dir,
            log_dir: log_dir.to_owned(),
            share,
            qmp,
            shell,
            records,
            shell_up: started.elapsed(),
            booted: Duration::ZERO,
            system_state: String::new(),
            next_copy: 0,
        };
        // Exit 1 for `degraded` (some unit failed): a state to report, not a failed boot.
        let (_, state) = m.shell.run(
            "systemctl is-system-running --wait; systemctl --failed --no-legend --plain",
            BOOT_TIMEOUT,
        )?;
        m.booted = started.elapsed();
        m.system_state = state.split_whitespace().collect::<Vec<_>>().join(" ");
        m.check(&format!(
            "mkdir -p {SHARE} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hostshare {SHARE}"
        ))
        .context("mounting the host's share")?;
        Ok(m)
    }

    /// Runs one command line (`sh -c`) in the guest; its exit code and output.
    pub fn run(&mut self, command: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        self.shell.run(command, timeout)
    }

    /// Runs one command line, failing unless it exits 0; its output.
    pub fn check(&mut self, command: &str) -> anyhow::Result<String> {
        let (rc, out) = self.shell.run(command, COMMAND_TIMEOUT)?;
        if rc != 0 {
            bail!("`{command}` exited {rc} in the guest:\n{out}");
        }
        Ok(out)
    }

    /// A file for the guest, through the share; its path in the guest.
    fn stage(
        &mut self,
        name: &str,
        write: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<String> {
        self.next_copy += 1;
        let rel = format!("in/{}-{name}", self.next_copy);
        let host = self.share.join(&rel);
        fs::create_dir_all(host.parent().context("share")?)?;
        write(&host)?;
        Ok(format!("{SHARE}/{rel}"))
    }

    /// Copies a host file to `guest` (parents made) with `mode`.
    pub fn copy_in(&mut self, host: &Path, guest: &str, mode: u32) -> anyhow::Result<()> {
        let name = host
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file")
            .to_owned();
        let staged = self.stage(&name, |dst| {
            fs::copy(host, dst).with_context(|| format!("copying {}", host.display()))?;
            Ok(())
        })?;
        self.check(&format!("install -D -m {mode:o} {staged} {guest}"))?;
        Ok(())
    }

    /// Writes `text` to `guest` (parents made) with `mode`.
    pub fn write_file(&mut self, guest: &str, text: &str, mode: u32) -> anyhow::Result<()> {
        let name = Path::new(guest)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file")
            .to_owned();
        let staged = self.stage(&name, |dst| Ok(fs::write(dst, text)?))?;
        self.check(&format!("install -D -m {mode:o} {staged} {guest}"))?;
        Ok(())
    }

    /// The guest file `guest`, read through the share.
    pub fn read_file(&mut self, guest: &str) -> anyhow::Result<Vec<u8>> {
        self.next_copy += 1;
        let rel = format!("out/{}", self.next_copy);
        self.check(&format!("cp {guest} {SHARE}/{rel}"))?;
        let host = self.share.join(&rel);
        let bytes = fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
        let _ = fs::remove_file(&host);
        Ok(bytes)
    }

    /// Copies the guest file `guest` to `host`.
    pub fn copy_out(&mut self, guest: &str, host: &Path) -> anyhow::Result<()> {
        let bytes = self.read_file(guest)?;
        fs::write(host, bytes).with_context(|| format!("writing {}", host.display()))
    }

    /// `systemctl show -p P --value UNIT` for each property, in order.
    pub fn unit_props(&mut self, unit: &str, props: &[&str]) -> anyhow::Result<Vec<String>> {
        let out = self.check(&format!(
            "systemctl show {unit} {}",
            props
                .iter()
                .map(|p| format!("-p {p}"))
                .collect::<Vec<_>>()
                .join(" ")
        ))?;
        props
            .iter()
            .map(|p| {
                out.lines()
                    .find_map(|l| l.strip_prefix(p)?.strip_prefix('='))
                    .map(str::to_owned)
                    .with_context(|| format!("{unit} has no property {p}: {out}"))
            })
            .collect()
    }

    /// The last `n` lines of the kernel console (the journal is on it too).
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.log_dir.join("console.log"), n)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        qemu::stop(&mut self.qmp, &mut self.child);
        let _ = fs::remove_dir_all(&self.sock_dir);
        // The overlay is as large as what the guest wrote; the logs stay.
        let _ = fs::remove_file(self.log_dir.join("overlay.qcow2"));
    }
}

fn connect(child: &mut Child, path: &Path, log_dir: &Path) -> anyhow::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "QEMU exited ({status}) before listening on {}:\n{}",
                path.display(),
                tail(&log_dir.join("qemu.log"), 20)
            );
        }
        if Instant::now() > deadline {
            bail!("QEMU did not listen on {} within 30 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
