//! One QEMU guest: the command line of ../shared/VM-HOTPLUG.md, its sockets, its logs.
//!
//! TCG, no network device at all (`-nic none`: the guest talks to nobody, its own
//! loopback included only for the incident scenario's fake API server), the kernel
//! console to a file, and three unix sockets: QMP, and the two virtio-serial ports of
//! [`super::guest`]. The control and records sockets are `wait=on`: QEMU does not start
//! the guest before we are connected to both, so the guest never writes to a port nobody
//! reads (a virtio console port with no host side answers reads with EOF).
use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    guest::{Records, Shell},
    image::Image,
    qmp::Qmp,
};

/// TCG boots the Debian kernel to `/init` in ~5 s here; leave room for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What differs between guests: the memory layout, the kernel's arguments, the size of
/// virtio-mem's backend. [`Machine::DEFAULT`] is VM-HOTPLUG.md's recipe.
pub struct Machine {
    /// `-m`: base RAM, DIMM slots and the ceiling of all hot-added memory (DIMMs and
    /// virtio-mem's region count against `maxmem`).
    pub memory: &'static str,
    /// Kernel arguments after the console and `panic=-1`.
    pub append: &'static str,
    /// virtio-mem's backend, the most it can grow to: `size=1G` or
    /// `size=64G,reserve=false` (without `reserve=false` QEMU would have to commit it all).
    pub vmem_backend: &'static str,
}

impl Machine {
    pub const DEFAULT: Self = Self {
        memory: "512M,slots=4,maxmem=4G",
        append: "memhp_default_state=offline",
        vmem_backend: "size=1G",
    };
}

pub struct Vm {
    child: Child,
    /// The sockets (short paths: unix socket names are limited to 108 bytes).
    sock_dir: PathBuf,
    /// console.log, qemu.log, records.ndjson.
    pub log_dir: PathBuf,
    pub qmp: Qmp,
    pub shell: Shell,
    pub records: Records,
    /// From starting QEMU to `/init` answering on the control port.
    pub boot_time: Duration,
}

impl Vm {
    /// Boots `image` with `initrd` on `machine`; returns once `/init` reads commands.
    pub fn boot(
        image: &Image,
        initrd: &Path,
        machine: &Machine,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let sock_dir = unique_sock_dir()?;
        let qmp_sock = sock_dir.join("qmp");
        let ctl_sock = sock_dir.join("ctl");
        let rec_sock = sock_dir.join("rec");
        let console = log_dir.join("console.log");
        let qemu_log = fs::File::create(log_dir.join("qemu.log"))?;

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "pc", "-accel", "tcg", "-cpu", "qemu64"])
            .args(["-m", machine.memory, "-smp", "1,maxcpus=4"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(initrd)
            // panic=-1: a guest panic reboots at once, and -no-reboot turns that into an exit.
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 {}", machine.append))
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-nic", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .arg("-object")
            .arg(format!(
                "memory-backend-ram,id=vmem0,{}",
                machine.vmem_backend
            ))
            .args([
                "-device",
                "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0",
            ])
            .args(["-device", "virtio-serial-pci,id=vser0"]);
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
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;

        let connect = |child: &mut Child, path: &Path| -> anyhow::Result<UnixStream> {
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
        };
        let setup = (|| {
            // In command-line order: QEMU waits for each wait=on socket in turn.
            let ctl = connect(&mut child, &ctl_sock)?;
            let rec = connect(&mut child, &rec_sock)?;
            connect(&mut child, &qmp_sock)?; // the QMP socket exists: QEMU is up
            let qmp = Qmp::connect(&qmp_sock, Duration::from_secs(60))?;
            let mut shell = Shell::new(ctl)?;
            let records = Records::spawn(rec, &log_dir.join("records.ndjson"))?;
            shell.wait_ready(BOOT_TIMEOUT)?;
            anyhow::Ok((qmp, shell, records))
        })();
        match setup {
            Ok((qmp, shell, records)) => Ok(Self {
                child,
                sock_dir,
                log_dir: log_dir.to_owned(),
                qmp,
                shell,
                records,
                boot_time: started.elapsed(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_dir_all(&sock_dir);
                Err(e.context(format!(
                    "booting the guest; console:\n{}",
                    tail(&console, 30)
                )))
            }
        }
    }

    /// The last `n` lines of the guest's kernel console.
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.log_dir.join("console.log"), n)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        stop(&mut self.qmp, &mut self.child);
        let _ = fs::remove_dir_all(&self.sock_dir);
    }
}

/// Ends a guest: `quit` over QMP is the clean way, and QEMU gets 5 s to exit; then it is
/// killed (by its own child handle), which is as good for a throw-away guest. Both guest
/// kinds (this initramfs one and the systemd one) end this way.
pub fn stop(qmp: &mut Qmp, child: &mut Child) {
    let _ = qmp.execute("quit", serde_json::json!({}));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `/tmp/hotplug-vm-PID-N`, fresh.
fn unique_sock_dir() -> anyhow::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hotplug-vm-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
