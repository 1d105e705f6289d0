//! Into a booted systemd guest: the test doubles as units, then the agent exactly as the
//! README and the unit's header say.
//!
//! - `fake-apiserver.service`: the fake API server (plain HTTP on the guest's loopback; it
//!   writes its kubeconfig to [`API_KUBECONFIG`] once it listens).
//! - `kubelet.service`: the kubelet stand-in (`kubelet-standin run`), which reads the
//!   machine's capacity once at start-up and posts it, as a real kubelet does; it writes
//!   one line per start-up to [`RESTARTS_LOG`] and the pods' memory limit into a real cgroup,
//!   `/sys/fs/cgroup/kubepods/memory.max` (the cgroupfs driver's pods cgroup), which the
//!   agent's verify reads. It talks to the API as a client: its CA bundle comes from the
//!   share (`SSL_CERT_FILE`), because the guest deliberately has none.
//! - a CA bundle at the standard path (this host's), as on an ordinary host: the image has
//!   none, and [`super::failures`] takes it away again for the bad-input cases;
//! - the agent: `install -m 0755 ... /usr/local/bin/hotplug-agent`, the unit to
//!   `/etc/systemd/system/`, `hotplug-agent.default` to `/etc/default/hotplug-agent` with
//!   this test's settings appended ([`agent_settings`]), a kubeconfig at the path the default
//!   file names, `systemctl daemon-reload && systemctl enable --now hotplug-agent`.
use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{
    Guest,
    machine::SHARE,
    rootfs::{AGENT_LOG, CA_BUNDLE},
};
use crate::{vm::image::Binaries, workspace};

pub const NODE: &str = "vm-node";
/// Written by the fake API server once it listens.
pub const API_KUBECONFIG: &str = "/run/fake-apiserver/kubeconfig";
/// The agent's kubeconfig: where the shipped /etc/default/hotplug-agent looks.
pub const AGENT_KUBECONFIG: &str = "/etc/hotplug-agent/kubeconfig";
/// One line per start-up of the kubelet stand-in.
pub const RESTARTS_LOG: &str = "/var/lib/kubelet-standin/restarts.log";
/// The pods' cgroup limit the stand-in writes at start-up.
pub const PODS_LIMIT: &str = "/sys/fs/cgroup/kubepods/memory.max";
/// The stand-in's kube-reserved + system-reserved (its default).
pub const RESERVED: u64 = 100 << 20;

/// Appended to the shipped /etc/default/hotplug-agent: what an operator would uncomment.
/// The log file is what the guest forwards to the records port.
fn agent_settings() -> String {
    format!(
        "\n# --- cargo xtask vm-test ---\nNODE_NAME={NODE}\n\
         HOTPLUG_AGENT_AUTO_ONLINE_MEMORY=online_movable\nHOTPLUG_AGENT_LOG_FILE={AGENT_LOG}\n"
    )
}

const FAKE_API_UNIT: &str = "[Unit]
Description=fake kube-apiserver (tests/src/bin/fake-apiserver) on loopback
[Service]
RuntimeDirectory=fake-apiserver
RuntimeDirectoryPreserve=yes
ExecStartPre=/bin/rm -f /run/fake-apiserver/kubeconfig
ExecStart=/usr/local/bin/fake-apiserver --kubeconfig /run/fake-apiserver/kubeconfig
";

const KUBELET_UNIT: &str = "[Unit]
Description=kubelet stand-in (tests/src/bin/kubelet-standin): caches capacity at start-up
[Service]
Environment=SSL_CERT_FILE=/usr/local/share/hotplug-vm/ca-certificates.crt
StateDirectory=kubelet-standin
# The cgroupfs driver's pods cgroup, with the memory controller it limits.
ExecStartPre=/bin/sh -c 'echo +memory > /sys/fs/cgroup/cgroup.subtree_control'
ExecStartPre=/bin/mkdir -p /sys/fs/cgroup/kubepods
ExecStart=/usr/local/bin/kubelet-standin run --kubeconfig /etc/kubernetes/kubelet.conf \
 --node-name vm-node --pidfile /run/kubelet-standin.pid --repost-ms 1000 \
 --restarts-log /var/lib/kubelet-standin/restarts.log \
 --cgroup-file /sys/fs/cgroup/kubepods/memory.max
[Install]
WantedBy=multi-user.target
";

/// Stripped binaries, the unit files and a CA bundle for the doubles, into the share.
pub fn stage(share: &Path, bins: &Binaries) -> anyhow::Result<()> {
    let bin = share.join("bin");
    fs::create_dir_all(&bin)?;
    for src in [&bins.agent, &bins.fake_apiserver, &bins.kubelet_standin] {
        let dst = bin.join(src.file_name().context("binary name")?);
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&dst)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let deploy = share.join("deploy");
    fs::create_dir_all(&deploy)?;
    for entry in fs::read_dir(workspace::root().join("deploy/systemd"))? {
        let entry = entry?;
        fs::copy(entry.path(), deploy.join(entry.file_name()))?;
    }
    fs::copy(CA_BUNDLE, share.join("ca-certificates.crt"))
        .context("copying this host's CA bundle for the test doubles (package ca-certificates)")?;
    Ok(())
}

/// The doubles running and the Node registered; the agent installed and enabled.
pub fn deploy(g: &mut Guest) -> anyhow::Result<()> {
    let m = &mut g.m;
    m.check(&format!(
        "install -m 0755 {SHARE}/bin/fake-apiserver {SHARE}/bin/kubelet-standin /usr/local/bin/ && \
         install -D -m 0644 {SHARE}/ca-certificates.crt /usr/local/share/hotplug-vm/ca-certificates.crt"
    ))?;
    if !g.rootfs.ca_bundle {
        // An ordinary host has ca-certificates; this image deliberately does not (the
        // bad-input scenarios take this file away again). Same file as the package's.
        m.copy_in(Path::new(CA_BUNDLE), CA_BUNDLE, 0o644)?;
    }
    m.write_file(
        "/etc/systemd/system/fake-apiserver.service",
        FAKE_API_UNIT,
        0o644,
    )?;
    m.write_file("/etc/systemd/system/kubelet.service", KUBELET_UNIT, 0o644)?;
    start_cluster(g)?;

    // The README's commands, from the share instead of target/ and deploy/.
    let m = &mut g.m;
    m.check(&format!(
        "install -m 0755 {SHARE}/bin/hotplug-agent /usr/local/bin/hotplug-agent && \
         install -m 0644 {SHARE}/deploy/hotplug-agent.service /etc/systemd/system/ && \
         install -m 0644 {SHARE}/deploy/hotplug-agent.default /etc/default/hotplug-agent && \
         install -d /usr/local/share/man/man1 && \
         hotplug-agent man > /usr/local/share/man/man1/hotplug-agent.1 && \
         hotplug-agent man run > /usr/local/share/man/man1/hotplug-agent-run.1"
    ))?;
    let default = String::from_utf8(m.read_file("/etc/default/hotplug-agent")?)?;
    ensure!(
        default.contains(&format!("HOTPLUG_AGENT_KUBECONFIG={AGENT_KUBECONFIG}")),
        "the shipped /etc/default/hotplug-agent no longer names {AGENT_KUBECONFIG}: the test's kubeconfig would not be read"
    );
    m.write_file(
        "/etc/default/hotplug-agent",
        &format!("{default}{}", agent_settings()),
        0o644,
    )?;
    g.deployed = true;
    Ok(())
}

/// The fake API server up, its kubeconfig where the agent and the kubelet read it, the
/// kubelet (re)started and its Node registered. Also after the API was stopped: a new
/// server listens on a new port with an empty store.
pub fn start_cluster(g: &mut Guest) -> anyhow::Result<()> {
    let m = &mut g.m;
    m.check("systemctl daemon-reload && systemctl restart fake-apiserver")?;
    // The kubeconfig appears (renamed into place) once the server listens.
    m.check(&format!(
        "for i in $(seq 600); do [ -f {API_KUBECONFIG} ] && exit 0; sleep 0.1; done; \
         journalctl -u fake-apiserver -o cat | tail; exit 1"
    ))?;
    m.check(&format!(
        "install -D -m 0600 {API_KUBECONFIG} {AGENT_KUBECONFIG} && \
         install -D -m 0600 {API_KUBECONFIG} /etc/kubernetes/kubelet.conf && \
         systemctl enable --quiet kubelet && systemctl restart kubelet"
    ))?;
    let t = Instant::now();
    wait_node(g, Duration::from_secs(90))
        .context("the kubelet stand-in did not register its Node")?;
    g.kubelet_up = Some(t.elapsed());
    Ok(())
}

/// GET a path of the fake API from inside the guest; the JSON, or `None` on 404.
pub fn api_get(g: &mut Guest, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let script = format!(
        "import re,sys,urllib.request,urllib.error\n\
         server=re.search(r'server: *(\\S+)', open('{API_KUBECONFIG}').read()).group(1)\n\
         try:\n    sys.stdout.write(urllib.request.urlopen(server+'{path}', timeout=10).read().decode())\n\
         except urllib.error.HTTPError as e:\n    sys.exit(0 if e.code==404 else 1)\n"
    );
    let (rc, out) = g.python(&script)?;
    ensure!(rc == 0, "GET {path} from the fake API failed ({rc}): {out}");
    if out.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&out).with_context(|| format!("GET {path}: {out}"))?,
    ))
}

fn wait_node(g: &mut Guest, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let path = format!("/api/v1/nodes/{NODE}");
    loop {
        let node = api_get(g, &path)?;
        if node.is_some_and(|n| n["status"]["capacity"]["memory"].is_string()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "no Node {NODE} with a capacity");
        // The stand-in posts within a second of starting; its first post is what we await.
        std::thread::sleep(Duration::from_millis(200));
    }
}
