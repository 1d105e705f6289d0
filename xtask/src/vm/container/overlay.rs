//! One pod of an overlay's DaemonSet, run by podman in the guest and checked from outside
//! the way the kubelet and an operator would see it (see `../container.rs` for the list).
use std::{
    collections::BTreeSet,
    path::{Component, Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use super::{Host, pod};
use crate::{
    vm::{Figures, guest::Rec, systemd::rootfs::AGENT_LOG},
    workspace,
};

/// How long the agent may take from `podman run` to its `ready` record under TCG.
const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// GET a URL: the status on the first line, then the body (HTTP errors included).
pub const HTTP_GET: &str = "/usr/local/lib/hotplug-vm/http-get.py";
pub const HTTP_GET_PY: &str = "import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    print(r.status)
    print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
    print(e.read().decode())
";
/// A kernel event to its record in the container's log.
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

struct Variant {
    overlay: &'static str,
    /// The OCI runtime podman uses: both of Debian's, one per overlay.
    runtime: &'static str,
    pod_ip: &'static str,
    /// Whether the container's /sys is writable, so auto-online can work.
    sys_writable: bool,
    /// The operator's overlay also sets `seccompProfile: Unconfined`.
    unconfined: bool,
    /// Whether every hook that attaches for bare root must attach here; else the runtime's
    /// seccomp profile refuses bpf(2), and the agent must say so and run on uevents.
    probes_expected: bool,
}

/// `deploy/kubernetes/overlays/capabilities` under runc: /sys is read-only there, so
/// auto-online must fail and say so. The probes: as bare root where the runtime's default
/// seccomp profile lets CAP_BPF and CAP_PERFMON holders call bpf(2) and perf_event_open(2)
/// (containerd's does); where it wants CAP_SYS_ADMIN for them (podman's
/// containers-common 0.50, Debian 12), none may attach and the ready record must say why,
/// and the same pod with `seccompProfile: Unconfined` (an operator's overlay) must then
/// attach them all: the capabilities are enough, the profile is what refuses.
pub fn capabilities(h: &mut Host, figures: &mut Figures) -> anyhow::Result<()> {
    let gate = seccomp_gate(h)?;
    let allows = gate.allows_capabilities();
    figures.push(format!(
        "container: podman's RuntimeDefault seccomp ({}): bpf with {:?}, perf_event_open with {:?}",
        gate.package, gate.bpf, gate.perf_event_open
    ));
    let v = Variant {
        overlay: "capabilities",
        runtime: "runc",
        pod_ip: "10.88.0.10",
        sys_writable: false,
        unconfined: false,
        probes_expected: allows,
    };
    run(h, figures, &v)?;
    if !allows {
        let v = Variant {
            pod_ip: "10.88.0.12",
            unconfined: true,
            probes_expected: true,
            ..v
        };
        run(h, figures, &v)?;
    }
    Ok(())
}

/// `deploy/kubernetes/overlays/privileged` under crun: auto-online must work.
pub fn privileged(h: &mut Host, figures: &mut Figures) -> anyhow::Result<()> {
    run(
        h,
        figures,
        &Variant {
            overlay: "privileged",
            runtime: "crun",
            pod_ip: "10.88.0.11",
            sys_writable: true,
            unconfined: false,
            probes_expected: true,
        },
    )
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("kubectl output")
}

fn overlay_dir(name: &str) -> PathBuf {
    workspace::root()
        .join("deploy/kubernetes/overlays")
        .join(name)
}

/// The image the DaemonSet runs (the same in every overlay).
pub fn daemonset_image() -> anyhow::Result<String> {
    let rendered = pod::parse(&render(&overlay_dir("capabilities"))?)?;
    let spec = rendered.daemon_set.spec.context("no spec")?;
    let pod = spec.template.spec.context("no pod spec")?;
    pod.containers
        .first()
        .and_then(|c| c.image.clone())
        .context("the DaemonSet's container has no image")
}

/// An operator's overlay of `overlay` that turns auto-online on, the documented way (its
/// own `config.toml`, `configMapGenerator` `behavior: replace`), and with `unconfined`
/// sets the container's `seccompProfile` to `Unconfined`.
fn operator_overlay(overlay: &str, unconfined: bool) -> anyhow::Result<PathBuf> {
    let dir = workspace::target_dir()
        .join("vm/container/overlays")
        .join(format!(
            "{overlay}-auto-online{}",
            if unconfined { "-unconfined" } else { "" }
        ));
    std::fs::create_dir_all(&dir)?;
    let base =
        std::fs::read_to_string(workspace::root().join("deploy/kubernetes/base/config.toml"))?;
    let off = "auto_online_memory = \"off\"";
    ensure!(
        base.lines().filter(|l| *l == off).count() == 1,
        "deploy/kubernetes/base/config.toml has no line `{off}`: update this test"
    );
    std::fs::write(
        dir.join("config.toml"),
        base.replace(off, "auto_online_memory = \"online_movable\""),
    )?;
    let resource = relative(&dir, &overlay_dir(overlay));
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "# Written by cargo xtask vm-test (xtask/src/vm/container/overlay.rs).\n\
             apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - {}\n\
             configMapGenerator:\n  - name: hotplug-agent-config\n    namespace: hotplug-agent\n    \
             behavior: replace\n    files:\n      - config.toml\n{}",
            resource.display(),
            if unconfined { UNCONFINED_PATCH } else { "" }
        ),
    )?;
    Ok(dir)
}

const UNCONFINED_PATCH: &str = "patches:
  - target: {group: apps, version: v1, kind: DaemonSet, name: hotplug-agent}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/securityContext/seccompProfile
        value: {type: Unconfined}
";

/// `to` relative to `from` (both absolute): kustomize refuses absolute resources.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// The attached probes of a `ready` record, by method (`raw_tracepoint/cpuhp_exit`).
fn attached_names(v: &Value) -> Vec<String> {
    v["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attached"] == true)
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// Kernel hooks attached according to a `ready` record or `status --format json`: the part
/// of each attached probe's name after its last `/` (`raw_tracepoint/cpuhp_exit` and
/// `tracepoint/cpuhp/cpuhp_exit` are both `cpuhp_exit`).
pub fn hooks(v: &Value) -> BTreeSet<String> {
    v["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attached"] == true)
        .filter_map(|p| p["name"].as_str()?.rsplit('/').next().map(str::to_owned))
        .collect()
}

fn run(h: &mut Host, figures: &mut Figures, v: &Variant) -> anyhow::Result<()> {
    let image = h.image.clone().context("no image built")?;
    let bare = h.bare_root.clone().context("no bare-root baseline")?;
    let node =
        h.m.check("cat /proc/sys/kernel/hostname")?
            .trim()
            .to_owned();
    let label = format!(
        "{}{}",
        v.overlay,
        if v.unconfined { "-unconfined" } else { "" }
    );
    let at = pod::Placement {
        pod_name: format!("hotplug-agent-{label}"),
        node_name: node,
        // No network device in the guest: its loopback is the node's only address.
        node_ip: "127.0.0.1".into(),
        pod_ip: v.pod_ip.into(),
        network: "podman".into(),
        volumes_dir: format!("/var/lib/hotplug-pods/{label}"),
    };
    let plain = pod::podman_run(&pod::parse(&render(&overlay_dir(v.overlay))?)?, &at)
        .with_context(|| format!("translating overlays/{}", v.overlay))?;
    let rendered = pod::parse(&render(&operator_overlay(v.overlay, v.unconfined)?)?)?;
    let run = pod::podman_run(&rendered, &at).context("translating the operator's overlay")?;
    eprintln!(
        "vm: container {}: the API server's alone: {}",
        v.overlay,
        rendered.api_only.join(", ")
    );
    // The operator's overlay changes config.toml, and with `unconfined` that one flag.
    let mut expected = plain.args.clone();
    if v.unconfined {
        expected.retain(|a| !a.starts_with("--security-opt=seccomp="));
        expected.insert(
            expected.iter().position(|a| a == &image).unwrap_or(0),
            "--security-opt=seccomp=unconfined".into(),
        );
    }
    let (mut got, mut want) = (run.args.clone(), expected);
    got.sort();
    want.sort();
    ensure!(
        got == want && run.files != plain.files,
        "the operator's overlay changed more than it should:\n{:?}\n{:?}",
        run.args,
        plain.args
    );
    ensure!(
        run.args.contains(&image),
        "the pod does not run {image}: {:?}",
        run.args
    );
    for note in &run.outside {
        eprintln!("vm: container {}: not the runtime's: {note}", v.overlay);
    }
    let name = at.pod_name.clone();

    // The node: the kubelet's root dir exists on every node (a hostPath of type Directory).
    h.m.check("mkdir -p /var/lib/kubelet /var/log/hotplug-agent")?;
    for (dir, create) in &run.dirs {
        if *create {
            h.m.check(&format!("mkdir -p {dir}"))?;
        } else {
            let (rc, _) =
                h.m.run(&format!("test -d {dir}"), Duration::from_secs(10))?;
            ensure!(
                rc == 0,
                "hostPath {dir} (type Directory) is missing on the node: the kubelet would not start the pod"
            );
        }
    }
    for (path, text) in &run.files {
        h.m.write_file(path, text, 0o644)?;
    }

    let from = h.m.records.mark();
    let t0 = Instant::now();
    let runtime = format!("--runtime={}", v.runtime);
    h.podman(
        &run.command(&["--detach", &runtime]),
        Duration::from_secs(300),
    )?;
    let started = t0.elapsed();
    // The container's log onto the records port, as it is written.
    h.m.check(&format!(
        "setsid sh -c 'exec podman logs --follow {name} >>{AGENT_LOG} 2>&1' </dev/null >/dev/null 2>&1 &"
    ))?;
    let ready =
        h.m.records
            .wait_for(from, "`ready` in podman logs", READY_TIMEOUT, |r| {
                r.is("agent", "ready")
            })?;
    let to_ready = ready.at.saturating_duration_since(t0);
    let mut problems = Vec::new();

    // The kubelet's probes and a Prometheus scrape, on the pod's IP.
    for probe in &run.probes {
        let url = format!("http://{}:{}{}", v.pod_ip, probe.port, probe.path);
        let (code, body) = http_until_ok(h, &url, Duration::from_secs(60))?;
        if code != 200 {
            problems.push(format!("{} probe {url}: {code} {body}", probe.kind));
        }
    }
    let (code, metrics) = http_until_ok(
        h,
        &format!("http://{}:9477/metrics", v.pod_ip),
        Duration::from_secs(30),
    )?;
    let attached_n = ready.v["probes"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["attached"] == true).count());
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hotplug_agent_probes_attached "))
        .map(str::trim);
    if code != 200 || gauge != Some(attached_n.to_string().as_str()) {
        problems.push(format!("/metrics: {code}, hotplug_agent_probes_attached {gauge:?}, ready record says {attached_n}"));
    }

    // The same kernel hooks as bare root in this guest.
    let hooks = hooks(&ready.v);
    let missing: Vec<&String> = bare.difference(&hooks).collect();
    let ebpf_error = ready.v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "ebpf")
        .and_then(|s| s["error"].as_str())
        .map(str::to_owned);
    let why = ebpf_error.clone().unwrap_or_default();
    if v.probes_expected && !missing.is_empty() {
        problems.push(format!(
            "hooks that attach as bare root did not attach in the {label} pod: {missing:?} ({why})"
        ));
    }
    let refused = hooks.is_empty() && why.contains("Operation not permitted");
    if !v.probes_expected && !refused {
        problems.push(format!(
            "the runtime's seccomp profile refuses bpf(2) to CAP_BPF, yet the {label} pod \
             attached {hooks:?} (eBPF source: {why:?})"
        ));
    }

    // A real CPU toggle, in the container's log.
    let mark = h.m.records.mark();
    h.m.check("echo 0 > /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online")?;
    let cpu_off = wait_uevent(h, mark, "cpu", "offline", "cpu1")?;
    wait_uevent(h, mark, "cpu", "online", "cpu1")?;

    // A DIMM over QMP: auto-online from the container, or its recorded failure.
    let (blocks, onlined) = hot_add(h, v, &mut problems)?;
    // A memory-block toggle (from the guest, as an operator would).
    let block = &blocks[0];
    let state = format!("/sys/devices/system/memory/{block}/state");
    let mark = h.m.records.mark();
    let order = if onlined {
        ["offline", "online_movable"]
    } else {
        ["online_movable", "offline"]
    };
    for to in order {
        h.m.check(&format!("echo {to} > {state}"))?;
        let action = if to == "offline" { "offline" } else { "online" };
        wait_uevent(h, mark, "memory_block", action, block)?;
    }

    // The live stream socket, through the image's own client.
    let stream = h.podman(
        &[
            "exec",
            &name,
            "hotplug-agent",
            "events",
            "--tail",
            "1000",
            "--format",
            "json",
        ]
        .map(String::from),
        Duration::from_secs(60),
    )?;
    let seqnum = &cpu_off.v["seqnum"];
    if !stream
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|r| r["kind"] == "cpu" && r["action"] == "offline" && &r["seqnum"] == seqnum)
    {
        problems.push(format!(
            "the stream socket did not replay the cpu1 offline uevent (seqnum {seqnum})"
        ));
    }

    let restarts = h.podman(
        &["inspect", "--format={{.RestartCount}}", &name].map(String::from),
        Duration::from_secs(60),
    )?;
    if restarts.trim() != "0" {
        problems.push(format!("the container restarted {} times", restarts.trim()));
    }

    // terminationGracePeriodSeconds: SIGTERM, the `stopped` record, exit 0.
    let mark = h.m.records.mark();
    let t = Instant::now();
    h.podman(&["stop", &name].map(String::from), Duration::from_secs(120))?;
    h.m.records
        .wait_for(mark, "`stopped`", EVENT_TIMEOUT, |r| {
            r.is("agent", "stopped")
        })?;
    let stop = t.elapsed();
    let code = h.podman(
        &["inspect", "--format={{.State.ExitCode}}", &name].map(String::from),
        Duration::from_secs(60),
    )?;
    if code.trim() != "0" {
        problems.push(format!("exit code {} after podman stop", code.trim()));
    }
    h.podman(&["rm", &name].map(String::from), Duration::from_secs(120))?;

    figures.push(format!(
        "container {} ({}): podman run {:.1} s, run -> `ready` {:.1} s, stop -> exit {:.1} s; \
         hooks {}/{} of bare root ({}){}; auto-online of {} blocks: {}",
        label,
        v.runtime,
        started.as_secs_f64(),
        to_ready.as_secs_f64(),
        stop.as_secs_f64(),
        hooks.len(),
        bare.len(),
        attached_names(&ready.v).join(", "),
        ebpf_error
            .map(|e| format!("; eBPF: {}", super::super::brief(&e)))
            .unwrap_or_default(),
        blocks.len(),
        if onlined {
            "onlined by the agent"
        } else {
            "refused, /sys read-only (recorded)"
        },
    ));
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

fn wait_uevent(
    h: &mut Host,
    from: usize,
    kind: &str,
    action: &str,
    device: &str,
) -> anyhow::Result<Rec> {
    h.m.records.wait_for(
        from,
        &format!("uevent {kind} {action} {device}"),
        EVENT_TIMEOUT,
        |r| r.source() == "uevent" && r.is(kind, action) && r.device() == device,
    )
}

/// Hot-adds a two-block DIMM; its blocks, and whether the agent onlined them. Where /sys
/// is read-only, the agent must record the refusal and the blocks stay offline.
fn hot_add(
    h: &mut Host,
    v: &Variant,
    problems: &mut Vec<String>,
) -> anyhow::Result<(Vec<String>, bool)> {
    let id = h.next_dimm();
    h.m.qmp.execute(
        "object-add",
        json!({"qom-type": "memory-backend-ram", "id": format!("mem-{id}"), "size": 2 * h.block_size}),
    )?;
    let mark = h.m.records.mark();
    h.m.qmp.execute(
        "device_add",
        json!({"driver": "pc-dimm", "id": id, "memdev": format!("mem-{id}")}),
    )?;
    let mut blocks: Vec<String> = Vec::new();
    while blocks.len() < 2 {
        let seen = blocks.clone();
        let rec =
            h.m.records
                .wait_for(mark, "memory_block add uevents", EVENT_TIMEOUT, |r| {
                    r.source() == "uevent"
                        && r.is("memory_block", "add")
                        && !seen.iter().any(|b| b == r.device())
                })?;
        blocks.push(rec.device().to_owned());
    }
    for block in &blocks {
        let rec = h.m.records.wait_for(
            mark,
            &format!("auto_online of {block}"),
            EVENT_TIMEOUT,
            |r| r.is("agent", "auto_online") && r.device() == block,
        )?;
        let error = rec.v["error"].as_str().unwrap_or("");
        let state =
            h.m.check(&format!("cat /sys/devices/system/memory/{block}/state"))?;
        let state = state.trim();
        match (v.sys_writable, error.is_empty(), state) {
            (true, true, "online") | (false, false, "offline") => {}
            _ => problems.push(format!(
                "auto-online of {block}: error {error:?}, state {state}"
            )),
        }
        if !v.sys_writable && !error.contains("Read-only file system") {
            problems.push(format!(
                "auto-online of {block} in a read-only /sys: {error:?}"
            ));
        }
    }
    Ok((blocks, v.sys_writable))
}

/// `(status, body)` of a GET from the guest, retried until 200 or `within`: the kubelet
/// probes the same way (every period until it answers).
fn http_until_ok(h: &mut Host, url: &str, within: Duration) -> anyhow::Result<(u16, String)> {
    let deadline = Instant::now() + within;
    loop {
        let (rc, out) = h.m.run(
            &format!("python3 {HTTP_GET} {url}"),
            Duration::from_secs(30),
        )?;
        let (code, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        let code: u16 = code.trim().parse().unwrap_or(0);
        if (rc == 0 && code == 200) || Instant::now() > deadline {
            return Ok((
                code,
                format!("{body}{}", if rc == 0 { "" } else { "(no answer)" }),
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What podman's default seccomp profile (its RuntimeDefault) wants for the eBPF calls.
struct SeccompGate {
    package: String,
    /// The capabilities that each rule allowing the call includes (`[]`: allowed always).
    bpf: Vec<Vec<String>>,
    perf_event_open: Vec<Vec<String>>,
}

impl SeccompGate {
    /// Whether CAP_BPF allows bpf(2) and CAP_PERFMON perf_event_open(2), as in containerd's
    /// default profile.
    fn allows_capabilities(&self) -> bool {
        let by = |rules: &[Vec<String>], cap: &str| {
            rules
                .iter()
                .any(|caps| caps.is_empty() || caps.iter().any(|c| c == cap))
        };
        by(&self.bpf, "CAP_BPF") && by(&self.perf_event_open, "CAP_PERFMON")
    }
}

fn seccomp_gate(h: &mut Host) -> anyhow::Result<SeccompGate> {
    let out = h.m.check(
        "python3 -c \"import json; j=json.load(open('/usr/share/containers/seccomp.json')); \
         print(json.dumps({n: [s.get('includes',{}).get('caps') or [] for s in j['syscalls'] \
         if s['action']=='SCMP_ACT_ALLOW' and n in s['names']] for n in ('bpf','perf_event_open')}))\" && \
         dpkg-query -W -f '${Package} ${Version}' golang-github-containers-common",
    )?;
    let (rules, package) = out.split_once('\n').context("seccomp rules and package")?;
    let rules: Value = serde_json::from_str(rules).with_context(|| format!("{rules:?}"))?;
    let list = |n: &str| -> Vec<Vec<String>> {
        serde_json::from_value(rules[n].clone()).unwrap_or_default()
    };
    Ok(SeccompGate {
        package: package.trim().to_owned(),
        bpf: list("bpf"),
        perf_event_open: list("perf_event_open"),
    })
}
