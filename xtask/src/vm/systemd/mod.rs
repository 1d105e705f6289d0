//! The second guest kind of `cargo xtask vm-test`: Debian 12 with systemd as PID 1, the
//! agent installed as the shipped unit (issue #8, item 2).
//!
//! - [`rootfs`]: the disk image (`mmdebstrap` minbase + systemd, dbus, udev, Debian's kernel,
//!   python3, podman, runc, crun; no ca-certificates), cached in `target/vm/systemd/<key>/`;
//! - [`machine`]: one boot on a fresh qcow2 overlay, a 9p share, the control shell and the
//!   agent's event log over virtio-serial, QMP;
//! - [`deploy`]: the test doubles as `fake-apiserver.service` and `kubelet.service`, the
//!   agent as the README says;
//! - [`scenarios`] and [`failures`]: what runs in it, each asserting on the agent's records.
//!
//! All scenarios of this kind share one boot (in table order); a failed one costs the
//! guest, and the next boots a fresh one.
//!
//! # For other scenarios (the container path)
//! ```ignore
//! let rootfs = rootfs::prepare(&vm_dir, &["some-extra-package"])?; // cached per package set
//! let mut m = machine::Machine::boot(&rootfs, &log_dir, &machine::BootOptions::default())?;
//! let out = m.check("podman info")?;            // one line, `sh -c`, as root; fails on rc != 0
//! let (rc, out) = m.run("cmd", timeout)?;       // the exit code instead
//! m.copy_in(host_path, "/guest/path", 0o644)?;  // through the share (mounted at /mnt/host)
//! m.write_file("/guest/path", "text", 0o644)?;
//! m.copy_out("/guest/path", host_path)?;        // or m.read_file(...) -> bytes
//! m.share                                       // host side of /mnt/host: big files go here
//! m.qmp.execute("device_add", json!({...}))?;   // hotplug
//! m.records                                     // /var/log/hotplug-agent/events.ndjson as written
//! ```
//! Or, in this table's guest, a [`Run`] gets a [`Guest`] with the doubles and the agent unit
//! already installed and running (`g.m` is the machine; [`Guest::ensure_agent`]).
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{Figures, Outcome, image::Binaries};
use crate::{process, workspace};

pub mod deploy;
mod failures;
pub mod machine;
pub mod rootfs;
mod scenarios;

pub use failures::{bad_input, watchdog};
pub use scenarios::{burst, enable_now, incident, stop};

/// A scenario in the systemd guest.
pub type Run = fn(&mut Guest, &mut Figures) -> anyhow::Result<()>;

pub struct Scenario {
    /// For `--scenario`.
    pub name: &'static str,
    /// As libtest prints it.
    pub test: &'static str,
    pub run: Run,
}

/// In the order they run, in one guest: (f) and (d) last, they break things on purpose
/// (and put them back).
pub const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "systemd-enable",
        test: "vm::systemd_enable_now_ready_probes",
        run: enable_now,
    },
    Scenario {
        name: "systemd-incident",
        test: "vm::systemd_incident_end_to_end",
        run: incident,
    },
    Scenario {
        name: "systemd-burst",
        test: "vm::systemd_burst_one_restart",
        run: burst,
    },
    Scenario {
        name: "systemd-stop",
        test: "vm::systemd_stop_exit_0",
        run: stop,
    },
    Scenario {
        name: "systemd-watchdog",
        test: "vm::systemd_watchdog_and_crash_loop",
        run: watchdog,
    },
    Scenario {
        name: "systemd-bad-input",
        test: "vm::systemd_bad_input_no_crash_loop",
        run: bad_input,
    },
];

/// The scenarios `args` selects (names were checked by `vm::select`).
pub(super) fn select(args: &super::Args) -> Vec<&'static Scenario> {
    SCENARIOS
        .iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|n| n == s.name))
        .filter(|s| {
            args.filters.is_empty() || args.filters.iter().any(|f| s.test.contains(f.as_str()))
        })
        .collect()
}

/// A booted systemd guest and what has been set up in it.
pub struct Guest {
    pub m: machine::Machine,
    pub rootfs: rootfs::Rootfs,
    pub block_size: u64,
    /// The doubles and the agent unit are installed ([`deploy::deploy`]).
    pub deployed: bool,
    /// kubelet start to its Node registered, last time.
    pub kubelet_up: Option<Duration>,
    /// The agent's `ready` record under the unit, the first one seen.
    pub ready: Option<serde_json::Value>,
    next_id: u32,
    next_script: u32,
}

impl Guest {
    fn boot(
        rootfs: &rootfs::Rootfs,
        bins: &Binaries,
        log_dir: &Path,
        figures: &mut Figures,
    ) -> anyhow::Result<Self> {
        let m = machine::Machine::boot(rootfs, log_dir, &machine::BootOptions::default())?;
        figures.push(format!(
            "systemd guest: control shell up {:.1} s, boot finished ({}) {:.1} s after QEMU started",
            m.shell_up.as_secs_f64(),
            m.system_state,
            m.booted.as_secs_f64()
        ));
        let mut g = Self {
            m,
            rootfs: rootfs.clone(),
            block_size: 0,
            deployed: false,
            kubelet_up: None,
            ready: None,
            next_id: 0,
            next_script: 0,
        };
        let t = Instant::now();
        deploy::stage(&g.m.share, bins)?;
        let hex =
            g.m.check("cat /sys/devices/system/memory/block_size_bytes")?;
        g.block_size = u64::from_str_radix(hex.trim(), 16)
            .with_context(|| format!("block_size_bytes {hex:?}"))?;
        figures.push(format!(
            "systemd guest: binaries and units staged into the 9p share in {:.2} s",
            t.elapsed().as_secs_f64()
        ));
        Ok(g)
    }

    pub fn next(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    /// Runs a python3 script in the guest; its exit code and output.
    pub fn python(&mut self, script: &str) -> anyhow::Result<(i32, String)> {
        self.next_script += 1;
        let rel = format!("py/{}.py", self.next_script);
        let host = self.m.share.join(&rel);
        std::fs::create_dir_all(host.parent().context("share")?)?;
        std::fs::write(&host, script)?;
        self.m.run(
            &format!("python3 {}/{rel}", machine::SHARE),
            Duration::from_secs(60),
        )
    }

    /// What helps with a failure: the agent's unit state and journal, the last records,
    /// the console.
    pub fn diagnostics(&mut self) -> String {
        let journal = self
            .m
            .run(
                "systemctl status --no-pager -n 0 hotplug-agent kubelet fake-apiserver; \
                 journalctl -u hotplug-agent -o short-monotonic --no-pager | tail -n 25",
                Duration::from_secs(20),
            )
            .map(|(_, out)| out)
            .unwrap_or_else(|e| format!("(cannot read: {e:#})"));
        let recs: Vec<String> = {
            let seen = self.m.records.since(0);
            seen[seen.len().saturating_sub(12)..]
                .iter()
                .map(|r| r.v.to_string())
                .collect()
        };
        let full = self.m.log_dir.join("agent-journal.txt");
        let _ = self
            .m
            .check(
                "journalctl -u hotplug-agent -o short-monotonic --no-pager >/run/agent-journal.txt",
            )
            .and_then(|_| self.m.copy_out("/run/agent-journal.txt", &full));
        format!(
            "--- units and agent journal ---\n{journal}\n--- last agent records ---\n{}\n--- console (tail) ---\n{}\n--- logs in {} ---",
            recs.join("\n"),
            self.m.console_tail(15),
            self.m.log_dir.display()
        )
    }
}

/// The image for `group`, built on a thread while cargo builds the binaries (both take
/// minutes on a fresh machine); `None` when nothing runs in the systemd guest or it cannot
/// be built here ([`run_group`] says why).
pub(super) fn prepare_image(
    group: &[&'static Scenario],
    vm_dir: &Path,
) -> Option<std::thread::JoinHandle<anyhow::Result<rootfs::Rootfs>>> {
    if group.is_empty() || !can_build() {
        return None;
    }
    let vm_dir = vm_dir.to_owned();
    Some(std::thread::spawn(move || rootfs::prepare(&vm_dir, &[])))
}

fn can_build() -> bool {
    process::which("mmdebstrap").is_some() && process::which("qemu-img").is_some()
}

/// Runs `group` in one systemd guest, in order, on the image from [`prepare_image`];
/// counts into `out`.
pub(super) fn run_group(
    group: &[&'static Scenario],
    image: Option<std::thread::JoinHandle<anyhow::Result<rootfs::Rootfs>>>,
    bins: &Binaries,
    out: &mut Outcome,
) {
    if group.is_empty() {
        return;
    }
    if !can_build() {
        eprintln!(
            "\n!!! SKIP systemd guest scenarios: mmdebstrap or qemu-img not found after setup \
             (Debian packages mmdebstrap, qemu-utils); the guest image cannot be built here.\n"
        );
        for s in group {
            println!("test {} ... ignored (no mmdebstrap or qemu-img)", s.test);
        }
        out.ignored += group.len();
        return;
    }
    let t = Instant::now();
    let built = image.context("no image build was started").and_then(|h| {
        h.join()
            .map_err(|_| anyhow::anyhow!("the image build panicked"))?
    });
    let rootfs = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: building the systemd guest image: {e:#}");
            for s in group {
                println!("test {} ... FAILED (systemd guest image not built)", s.test);
                out.failures.push((s.test, format!("{e:#}")));
            }
            return;
        }
    };
    out.figures.push(match rootfs.built_in {
        Some(d) => format!(
            "systemd guest image built in {:.0} s (kernel {}, CA bundle: {}; {})",
            d.as_secs_f64(),
            rootfs.kernel_release,
            rootfs.ca_bundle,
            rootfs.packages.join(",")
        ),
        None => format!(
            "systemd guest image cached (kernel {}, CA bundle: {}), waited {:.2} s for it",
            rootfs.kernel_release,
            rootfs.ca_bundle,
            t.elapsed().as_secs_f64()
        ),
    });
    let mut guest: Option<Guest> = None;
    for &&Scenario { name, test, run } in group {
        let t = Instant::now();
        let result = (|| {
            if guest.is_none() {
                let logs = workspace::target_dir().join("vm/logs").join(name);
                eprintln!(
                    "vm: booting a systemd guest for {name} (logs in {})",
                    logs.display()
                );
                guest = Some(Guest::boot(&rootfs, bins, &logs, &mut out.figures)?);
            }
            let g = guest.as_mut().context("no guest")?;
            run(g, &mut out.figures)
        })();
        match result {
            Ok(()) => {
                out.passed += 1;
                println!("test {test} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                println!(
                    "test {test} ... FAILED ({:.1} s)",
                    t.elapsed().as_secs_f64()
                );
                let diag = guest.as_mut().map(|g| g.diagnostics()).unwrap_or_default();
                out.failures.push((test, format!("{e:#}\n{diag}")));
                guest = None;
            }
        }
    }
}
