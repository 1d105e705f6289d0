//! The container path, run for real (issue #8, item 3): the runtime image built from the
//! Dockerfile without a registry, run by podman inside the systemd guest (Debian 12,
//! kernel 6.1: real root on a real kernel; on this host podman cannot start a container)
//! with the flags of the rendered `deploy/kubernetes` overlays.
//!
//! - [`recipe`]: the Dockerfile's runtime stage -> a base made with mmdebstrap (cached in
//!   `target/vm/container/`) and a Containerfile; `podman import` + `podman build` in the
//!   guest ([`image_from_dockerfile`]).
//! - [`pod`]: `kubectl kustomize deploy/kubernetes/overlays/NAME` -> `podman run` flags,
//!   pure and unit-tested; nothing written again by hand.
//! - [`overlay`]: one pod per overlay (`capabilities` under runc, `privileged` under crun),
//!   with auto-online enabled the way an operator would (an overlay of the overlay with its
//!   own `config.toml`), asserting: the `ready` record in `podman logs`, the kubelet's
//!   probes (/readyz, /healthz) and /metrics on the pod IP, the same kernel hooks as bare
//!   root in the same guest, uevents of a real CPU and memory-block toggle in the
//!   container's log, the stream socket (`podman exec ... hotplug-agent events`),
//!   auto-online of a DIMM hot-added over QMP (or its recorded failure where /sys is
//!   read-only), no restart, and a clean stop (`stopped`, exit 0).
//!
//! All of it runs in one guest, booted for the first scenario; the image scenario comes
//! first, and the overlays fail (saying so) without an image.
use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{
    Figures, Outcome,
    image::Binaries,
    systemd::{
        machine::{BootOptions, Machine, SHARE},
        rootfs,
    },
};
use crate::{process, workspace};

mod overlay;
pub mod pod;
pub mod recipe;

pub type Run = fn(&mut Host, &mut Figures) -> anyhow::Result<()>;

pub struct Scenario {
    pub name: &'static str,
    pub test: &'static str,
    pub run: Run,
}

pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "container",
        test: "vm::container_image_from_dockerfile",
        run: image_from_dockerfile,
    },
    Scenario {
        name: "container",
        test: "vm::container_capabilities_overlay",
        run: overlay::capabilities,
    },
    Scenario {
        name: "container",
        test: "vm::container_privileged_overlay",
        run: overlay::privileged,
    },
];

/// The systemd guest with podman, and what the scenarios set up in it.
pub struct Host {
    pub m: Machine,
    /// The image's name as the DaemonSet has it, once built.
    pub image: Option<String>,
    /// Kernel hooks (`cpuhp_exit`, `online_pages`, ...) that attach for bare root here.
    pub bare_root: Option<BTreeSet<String>>,
    pub block_size: u64,
    /// The release binary `vm-test` built (the one the other guests run).
    agent: std::path::PathBuf,
    next_dimm: u32,
}

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

/// Runs `group` in one guest, in order; counts into `out`.
pub(super) fn run_group(
    group: &[&'static Scenario],
    vm_dir: &Path,
    bins: &Binaries,
    out: &mut Outcome,
) {
    if group.is_empty() {
        return;
    }
    let missing: Vec<&str> = ["mmdebstrap", "qemu-img", "kubectl"]
        .into_iter()
        .filter(|p| process::which(p).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "\n!!! SKIP container scenarios: {} not found after setup (Debian packages \
             mmdebstrap, qemu-utils; kubectl renders the overlays): the container path is NOT \
             tested here.\n",
            missing.join(", ")
        );
        for s in group {
            println!("test {} ... ignored (no {})", s.test, missing.join(", "));
        }
        out.ignored += group.len();
        return;
    }
    let mut host: Option<Host> = None;
    // Without the image no pod can run: the overlays then fail at once, saying why.
    let mut no_image: Option<String> = None;
    for &&Scenario { name, test, run } in group {
        let t = Instant::now();
        let result = (|| {
            if let Some(why) = &no_image {
                anyhow::bail!("no image: {why}");
            }
            if host.is_none() {
                host = Some(Host::boot(vm_dir, bins, &mut out.figures)?);
            }
            let h = host.as_mut().context("no guest")?;
            if h.image.is_none() && test != SCENARIOS[0].test {
                image_from_dockerfile(h, &mut out.figures).context("building the image first")?;
            }
            run(h, &mut out.figures)
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
                if test == SCENARIOS[0].test || host.as_ref().is_some_and(|h| h.image.is_none()) {
                    no_image.get_or_insert_with(|| format!("{e:#}"));
                }
                let diag = host.as_mut().map(Host::diagnostics).unwrap_or_default();
                out.failures.push((test, format!("{name}: {e:#}\n{diag}")));
                // The guest's state is unknown now: the next scenario boots a fresh one.
                host = None;
            }
        }
    }
}

impl Host {
    fn boot(vm_dir: &Path, bins: &Binaries, figures: &mut Figures) -> anyhow::Result<Self> {
        let t = Instant::now();
        let rootfs = rootfs::prepare(vm_dir, &[])?;
        if let Some(d) = rootfs.built_in {
            figures.push(format!(
                "container: systemd guest image built in {:.0} s",
                d.as_secs_f64()
            ));
        }
        let logs = vm_dir.join("logs").join("container");
        eprintln!(
            "vm: booting a systemd guest for the container path (logs in {})",
            logs.display()
        );
        let m = Machine::boot(&rootfs, &logs, &BootOptions::default())?;
        figures.push(format!(
            "container: guest (kernel {}) booted ({}) in {:.1} s, {:.1} s with the image",
            rootfs.kernel_release,
            m.system_state,
            m.booted.as_secs_f64(),
            t.elapsed().as_secs_f64()
        ));
        let mut h = Self {
            m,
            image: None,
            bare_root: None,
            block_size: 0,
            agent: bins.agent.clone(),
            next_dimm: 0,
        };
        let hex =
            h.m.check("cat /sys/devices/system/memory/block_size_bytes")?;
        h.block_size = u64::from_str_radix(hex.trim(), 16).with_context(|| format!("{hex:?}"))?;
        h.m.write_file(overlay::HTTP_GET, overlay::HTTP_GET_PY, 0o755)?;
        Ok(h)
    }

    /// Runs `argv` (quoted for the guest's `sh -c`); its output, failing on rc != 0.
    pub fn podman(&mut self, argv: &[String], timeout: Duration) -> anyhow::Result<String> {
        let line = pod::shell_line(argv);
        let (rc, out) = self.m.run(&format!("podman {line} 2>&1"), timeout)?;
        ensure!(rc == 0, "`podman {line}` exited {rc}:\n{out}");
        Ok(out)
    }

    pub fn next_dimm(&mut self) -> String {
        self.next_dimm += 1;
        format!("ctrdimm{}", self.next_dimm)
    }

    fn diagnostics(&mut self) -> String {
        let state = self
            .m
            .run(
                "podman ps -a --format '{{.Names}} {{.Status}}'; for c in $(podman ps -aq); do \
                 podman logs --tail 15 $c 2>&1 | cut -c1-400; done",
                Duration::from_secs(60),
            )
            .map(|(_, o)| o)
            .unwrap_or_else(|e| format!("(cannot ask podman: {e:#})"));
        format!(
            "--- podman ---\n{state}\n--- console (tail) ---\n{}\n--- logs in {} ---",
            self.m.console_tail(15),
            self.m.log_dir.display()
        )
    }
}

/// The image, from the Dockerfile: the base made here (cached), `podman import`, then
/// `podman build` of the derived Containerfile; its config must say what the Dockerfile
/// says. Also runs the same binary as bare root for the probe baseline.
pub fn image_from_dockerfile(h: &mut Host, figures: &mut Figures) -> anyhow::Result<()> {
    let agent = h.agent.clone();
    let root = workspace::root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).context("Dockerfile")?;
    let recipe = recipe::parse(&dockerfile).context("deriving the image recipe")?;
    let image = overlay::daemonset_image()?;
    let (base, built) = recipe::build_base(&recipe, &workspace::target_dir().join("vm/container"))?;
    figures.push(match built {
        Some(d) => format!(
            "container: base debian:{}-slim + {} made with mmdebstrap in {:.0} s ({} MB)",
            recipe.suite,
            recipe.packages.join(","),
            d.as_secs_f64(),
            std::fs::metadata(&base)?.len() >> 20
        ),
        None => format!("container: base tarball cached ({})", base.display()),
    });
    let share_base = h.m.share.join("base.tar");
    if std::fs::hard_link(&base, &share_base).is_err() {
        std::fs::copy(&base, &share_base).context("base tarball into the share")?;
    }
    let ctx = h.m.share.join("ctx");
    let base_ref = format!("localhost/hotplug-agent-base:{}", recipe.base_key());
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(ctx.join("Containerfile"), recipe.containerfile(&base_ref))?;
    let staged = recipe.stage_builder_outputs(root, &workspace::target_dir(), &ctx)?;
    // The builder's input is the binary `vm-test` built: the one the other guests run.
    ensure!(
        staged.iter().any(|p| p == &agent),
        "the Dockerfile's builder output comes from {staged:?}, not {}",
        agent.display()
    );

    let t = Instant::now();
    h.podman(
        &[
            "import".into(),
            "--quiet".into(),
            format!("{SHARE}/base.tar"),
            base_ref.clone(),
        ],
        Duration::from_secs(600),
    )?;
    let import = t.elapsed();
    let t = Instant::now();
    h.podman(
        &[
            "build".into(),
            "--pull=never".into(),
            format!("--tag={image}"),
            format!("--file={SHARE}/ctx/Containerfile"),
            format!("{SHARE}/ctx"),
        ],
        Duration::from_secs(600),
    )?;
    let build = t.elapsed();
    let config: Value = serde_json::from_str(&h.podman(
        &[
            "image".into(),
            "inspect".into(),
            "--format={{json .Config}}".into(),
            image.clone(),
        ],
        Duration::from_secs(60),
    )?)
    .context("podman image inspect")?;
    for ins in &recipe.kept {
        let (op, rest) = ins.split_once(' ').unwrap_or((ins, ""));
        let want: Value = match op {
            "ENTRYPOINT" | "CMD" => serde_json::from_str(rest)
                .with_context(|| format!("{op} {rest}: only the JSON form is checked"))?,
            _ => continue,
        };
        let field = if op == "CMD" { "Cmd" } else { "Entrypoint" };
        ensure!(
            config[field] == want,
            "image {field} {} != Dockerfile's {want}",
            config[field]
        );
    }
    ensure!(
        config["Labels"]["org.opencontainers.image.title"] == "hotplug-agent",
        "image labels {}",
        config["Labels"]
    );
    let size = h.podman(
        &[
            "image".into(),
            "inspect".into(),
            "--format={{.Size}}".into(),
            image.clone(),
        ],
        Duration::from_secs(60),
    )?;
    figures.push(format!(
        "container: podman import {:.1} s, podman build {:.1} s -> {image} ({} MB)",
        import.as_secs_f64(),
        build.as_secs_f64(),
        size.trim().parse::<u64>().unwrap_or(0) >> 20
    ));
    h.image = Some(image);

    // The same binary as bare root in this guest: the hooks that can attach at all.
    h.m.check(&format!(
        "install -m 0755 {SHARE}/ctx/builder/hotplug-agent /usr/local/bin/hotplug-agent"
    ))?;
    let out =
        h.m.check("hotplug-agent status --format json 2>/dev/null")?;
    let status: Value = serde_json::from_str(&out).with_context(|| format!("status: {out}"))?;
    let bare = overlay::hooks(&status);
    ensure!(
        !bare.is_empty(),
        "no probe attaches as bare root in the guest: {status}"
    );
    figures.push(format!(
        "container: hooks attached as bare root in the guest: {}",
        bare.iter().cloned().collect::<Vec<_>>().join(", ")
    ));
    h.bare_root = Some(bare);
    Ok(())
}
