//! The agent under its shipped unit, doing its job: (a) `systemctl enable --now` and the
//! probes it attaches there, (b) the incident end to end, (c) a burst, (e) a clean stop.
//! Every scenario asserts on the agent's own records (its event log file, as written).
use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use super::{
    Guest,
    deploy::{self, NODE, PODS_LIMIT, RESERVED, RESTARTS_LOG},
};
use crate::{
    vm::{
        Figures,
        guest::Rec,
        session::{MIB, ensure_records},
    },
    workspace,
};

/// Longest `systemctl enable --now`/`restart`: Type=notify waits for the first reconcile.
pub const START_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait from a hot-add to the agent's `verify converged`.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// After convergence: whatever else the hot-add causes comes within this.
const AFTERMATH: Duration = Duration::from_secs(3);
pub const AGENT: &str = "hotplug-agent";

impl Guest {
    /// The doubles and the agent installed, the agent unit active and ready; with the unit
    /// started here, its `ready` record.
    pub fn ensure_agent(&mut self) -> anyhow::Result<()> {
        if !self.deployed {
            deploy::deploy(self)?;
        }
        let [state] = self.props(&["ActiveState"])?;
        if state != "active" {
            let from = self.m.records.mark();
            self.m
                .check("systemctl reset-failed hotplug-agent; systemctl daemon-reload")?;
            let (rc, out) = self
                .m
                .run("systemctl enable --now hotplug-agent", START_TIMEOUT)?;
            ensure!(
                rc == 0,
                "systemctl enable --now hotplug-agent exited {rc}: {out}"
            );
            let ready = self.wait_ready(from)?;
            self.ready.get_or_insert(ready.v);
        }
        Ok(())
    }

    /// `systemctl show` of the agent's unit.
    pub fn props<const N: usize>(&mut self, props: &[&str; N]) -> anyhow::Result<[String; N]> {
        let v = self.m.unit_props(AGENT, props)?;
        v.try_into()
            .map_err(|_| anyhow::anyhow!("systemctl show returned the wrong count"))
    }

    pub fn wait_ready(&mut self, from: usize) -> anyhow::Result<Rec> {
        self.m
            .records
            .wait_for(from, "`ready`", START_TIMEOUT, |r| r.is("agent", "ready"))
    }

    /// Start-ups of the kubelet stand-in so far.
    pub fn kubelet_starts(&mut self) -> anyhow::Result<usize> {
        let log = self
            .m
            .check(&format!("cat {RESTARTS_LOG} 2>/dev/null || true"))?;
        Ok(log.lines().filter(|l| !l.trim().is_empty()).count())
    }

    pub fn memory(&mut self) -> anyhow::Result<u64> {
        let out = self.m.check("head -n 1 /proc/meminfo")?;
        let kb: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("MemTotal from {out:?}"))?;
        Ok(kb * 1024)
    }

    /// Hot-adds a DIMM of `size` bytes; the records index before it and the host time of
    /// `device_add`.
    pub fn plug_dimm(&mut self, size: u64) -> anyhow::Result<(usize, Instant)> {
        let id = self.next("sysdimm");
        self.m.qmp.execute(
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": format!("mem-{id}"), "size": size}),
        )?;
        let from = self.m.records.mark();
        let t0 = Instant::now();
        self.m.qmp.execute(
            "device_add",
            json!({"driver": "pc-dimm", "id": id, "memdev": format!("mem-{id}")}),
        )?;
        Ok((from, t0))
    }

    /// The Node's `.status.capacity.memory` in bytes, from the fake API.
    pub fn node_memory(&mut self) -> anyhow::Result<u64> {
        let node = deploy::api_get(self, &format!("/api/v1/nodes/{NODE}"))?
            .with_context(|| format!("no Node {NODE}"))?;
        node["status"]["capacity"]["memory"]
            .as_str()
            .and_then(quantity_bytes)
            .with_context(|| format!("Node capacity.memory: {}", node["status"]["capacity"]))
    }

    pub fn pods_limit(&mut self) -> anyhow::Result<u64> {
        let out = self.m.check(&format!("cat {PODS_LIMIT}"))?;
        out.trim()
            .parse()
            .with_context(|| format!("{PODS_LIMIT}: {out:?}"))
    }
}

/// (a) `systemctl enable --now` reaches active (Type=notify), the `ready` record names the
/// probes, /readyz answers, and every probe that attaches for bare root in this guest
/// attaches under the unit too. `systemd-analyze verify` and `security` of the installed
/// unit go to `target/vm/systemd-analyze.txt`.
pub fn enable_now(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    if !g.deployed {
        deploy::deploy(g)?;
    }
    if let Some(up) = g.kubelet_up {
        figures.push(format!(
            "systemd guest: kubelet.service start -> Node registered {:.2} s",
            up.as_secs_f64()
        ));
    }
    let from = g.m.records.mark();
    let t0 = Instant::now();
    let (rc, out) = g.m.run(
        "systemctl daemon-reload && systemctl enable --now hotplug-agent",
        START_TIMEOUT,
    )?;
    let to_active = t0.elapsed();
    ensure!(
        rc == 0,
        "systemctl enable --now hotplug-agent exited {rc}: {out}"
    );
    let [state, sub, ty] = g.props(&["ActiveState", "SubState", "Type"])?;
    ensure!(
        state == "active" && sub == "running" && ty == "notify",
        "after enable --now: {state}/{sub}, Type={ty}"
    );
    let ready = g.wait_ready(from)?;
    let to_ready = ready.at.saturating_duration_since(t0);
    g.ready = Some(ready.v.clone());
    let (rc, readyz) = g.python(
        "import urllib.request\n\
         r=urllib.request.urlopen('http://127.0.0.1:9477/readyz', timeout=10)\n\
         print(r.status, r.read().decode().strip())\n",
    )?;
    ensure!(
        rc == 0 && readyz.starts_with("200"),
        "/readyz did not answer 200: {readyz}"
    );
    figures.push(format!(
        "systemd (a): enable --now -> active {:.2} s, -> `ready` record {:.2} s; /readyz {}",
        to_active.as_secs_f64(),
        to_ready.as_secs_f64(),
        readyz.trim()
    ));

    analyze(g, figures)?;

    // The same binary as bare root, in the same guest: which probes can attach at all.
    let (rc, out) = g.m.run(
        "hotplug-agent status --format json",
        Duration::from_secs(120),
    )?;
    ensure!(rc == 0, "hotplug-agent status as root exited {rc}: {out}");
    let bare: Value =
        serde_json::from_str(&out).with_context(|| format!("status --format json: {out}"))?;
    let (unit, root) = (attached(&ready.v), attached(&bare));
    ensure!(
        !unit.is_empty(),
        "the ready record lists no probes: {}",
        ready.v
    );
    let count = |m: &BTreeMap<String, (bool, String)>| m.values().filter(|(a, _)| *a).count();
    let missing: Vec<String> = root
        .iter()
        .filter(|(name, (a, _))| *a && !unit.get(*name).is_some_and(|(u, _)| *u))
        .map(|(name, _)| {
            let why = unit.get(name).map_or("not tried", |(_, e)| e.as_str());
            format!("{name} ({why})")
        })
        .collect();
    figures.push(format!(
        "systemd (a): kernel hooks watched under the unit {}/{}, as bare root {}/{}{}",
        count(&unit),
        unit.len(),
        count(&root),
        root.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; missing under the unit: {}", missing.join(", "))
        }
    ));
    for (name, (a, err)) in &unit {
        let bare = root
            .get(name)
            .map_or("-", |(a, _)| if *a { "attached" } else { "no" });
        figures.push(format!(
            "    {name:<40} unit: {:<60} bare root: {bare}",
            if *a {
                "attached".to_owned()
            } else {
                format!("no, {}", super::super::brief(err))
            }
        ));
    }
    ensure!(
        missing.is_empty(),
        "probes that attach as bare root in this guest did not attach under hotplug-agent.service: {}",
        missing.join("; ")
    );
    Ok(())
}

/// Kernel hook -> (attached by any method, the errors of those that did not). The probe
/// names are `METHOD/[CATEGORY/]HOOK` (`tracepoint/cpuhp/cpuhp_exit`,
/// `raw_tracepoint/cpuhp_exit`): bare root and the unit may use different methods for the
/// same hook, and what counts is whether the hook is watched.
fn attached(v: &Value) -> BTreeMap<String, (bool, String)> {
    let mut out: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for p in v["probes"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?");
        let hook = name.rsplit('/').next().unwrap_or(name).to_owned();
        let entry = out.entry(hook).or_default();
        if p["attached"] == true {
            entry.0 = true;
        } else if let Some(e) = p["error"].as_str() {
            let brief = format!("{}: {}", name, super::super::brief(e));
            entry.1 = if entry.1.is_empty() {
                brief
            } else {
                format!("{}; {brief}", entry.1)
            };
        }
    }
    out
}

/// `systemd-analyze verify` (must pass) and `security` of the installed unit, kept.
fn analyze(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    let (vrc, verify) = g.m.run(
        "systemd-analyze verify /etc/systemd/system/hotplug-agent.service 2>&1",
        Duration::from_secs(120),
    )?;
    let (_, security) = g.m.run(
        "systemd-analyze security --no-pager hotplug-agent.service 2>&1",
        Duration::from_secs(120),
    )?;
    let file = workspace::target_dir().join("vm/systemd-analyze.txt");
    fs::write(
        &file,
        format!(
            "# systemd-analyze verify /etc/systemd/system/hotplug-agent.service (exit {vrc})\n{verify}\n\
             # systemd-analyze security hotplug-agent.service\n{security}"
        ),
    )?;
    let exposure = security
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for hotplug-agent.service:"))
        .map(|(_, s)| s.trim().to_owned())
        .unwrap_or_else(|| "? (no overall line)".into());
    figures.push(format!(
        "systemd (a): systemd-analyze security exposure {exposure}; verify exit {vrc}, {} line(s) (in {})",
        verify.lines().count(),
        file.display()
    ));
    ensure!(
        vrc == 0,
        "systemd-analyze verify of the installed unit failed:\n{verify}"
    );
    Ok(())
}

/// One hot-add through the whole loop: auto-online, one RestartUnit, the Node converged,
/// the pods' cgroup moved. Returns the figure line's parts.
fn hot_add_converges(
    g: &mut Guest,
    size: u64,
) -> anyhow::Result<(Duration, Duration, usize, usize)> {
    g.ensure_agent()?;
    let starts = g.kubelet_starts()?;
    let base = g.memory()?;
    let base_limit = g.pods_limit()?;
    let (from, t0) = g.plug_dimm(size)?;
    let target = base + size;
    let converged =
        g.m.records
            .wait_for(from, "verify converged", CONVERGE_TIMEOUT, |r| {
                r.is("verify", "converged")
            })?;
    let to_converged = converged.at.saturating_duration_since(t0);
    let first =
        g.m.records
            .since(from)
            .iter()
            .find(|r| r.memory() == target)
            .map(|r| r.at);
    let to_capacity = first.map_or(Duration::ZERO, |at| at.saturating_duration_since(t0));
    let after = converged.v["advertised_after"]["memory_bytes"].as_u64();
    ensure!(
        after == Some(target),
        "the Node should advertise {target} bytes after the refresh: {}",
        converged.v
    );
    // Whatever else this hot-add causes (a second refresh, a restart loop) comes by now.
    let recs = g.m.records.settle(from, AFTERMATH).to_vec();
    let count = |kind: &str, action: &str| recs.iter().filter(|r| r.is(kind, action)).count();
    let blocks = (size / g.block_size) as usize;
    ensure_records(
        count("agent", "auto_online") == blocks,
        &format!("{blocks} blocks auto-onlined by the agent"),
        &recs,
    )?;
    ensure_records(
        count("refresh", "succeeded") == 1 && count("refresh", "started") <= 1,
        "exactly one refresh",
        &recs,
    )?;
    let refresh = recs
        .iter()
        .find(|r| r.is("refresh", "succeeded"))
        .context("refresh")?;
    ensure!(
        refresh.v["backend"] == "systemd",
        "the refresh should be RestartUnit over the system bus: {}",
        refresh.v
    );
    let restarts = g.kubelet_starts()? - starts;
    ensure!(restarts == 1, "exactly one kubelet restart: {restarts}");
    ensure!(g.memory()? == target, "MemTotal is not {target}");
    let node = g.node_memory()?;
    ensure!(
        node == target,
        "the Node advertises {node}, the machine has {target}"
    );
    let limit = g.pods_limit()?;
    ensure!(
        limit == target - RESERVED && limit > base_limit,
        "{PODS_LIMIT}: {base_limit} -> {limit}, expected {}",
        target - RESERVED
    );
    let cgroup = &converged.v["cgroup"];
    ensure!(
        cgroup["ok"] == true,
        "the agent's verify should have checked the pods' cgroup: {}",
        converged.v
    );
    Ok((to_capacity, to_converged, blocks, restarts))
}

/// (b) The incident: a 512 MiB DIMM, the kubelet restarted once over the bus, the Node
/// (GET from the fake API) and the pods' cgroup converged.
pub fn incident(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    let (cap, conv, blocks, restarts) = hot_add_converges(g, 512 * MIB)?;
    figures.push(format!(
        "systemd (b): DIMM 512 MiB ({blocks} blocks) device_add -> capacity record {:.2} s, -> Node converged {:.2} s, {restarts} kubelet restart",
        cap.as_secs_f64(),
        conv.as_secs_f64()
    ));
    Ok(())
}

/// (c) A burst: one 2 GiB DIMM, 16 blocks arriving and onlined back to back, one restart.
pub fn burst(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    let (cap, conv, blocks, restarts) = hot_add_converges(g, 2048 * MIB)?;
    figures.push(format!(
        "systemd (c): burst DIMM 2 GiB ({blocks} blocks) -> {restarts} kubelet restart; capacity record {:.2} s, Node converged {:.2} s",
        cap.as_secs_f64(),
        conv.as_secs_f64()
    ));
    Ok(())
}

/// (e) `systemctl stop`: a `stopped` record, exit status 0; started again afterwards.
pub fn stop(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    g.ensure_agent()?;
    let from = g.m.records.mark();
    let t0 = Instant::now();
    let (rc, out) = g.m.run("systemctl stop hotplug-agent", START_TIMEOUT)?;
    let took = t0.elapsed();
    ensure!(rc == 0, "systemctl stop exited {rc}: {out}");
    let stopped =
        g.m.records
            .wait_for(from, "`stopped`", Duration::from_secs(30), |r| {
                r.is("agent", "stopped")
            })?;
    let [state, result, status, code] =
        g.props(&["ActiveState", "Result", "ExecMainStatus", "ExecMainCode"])?;
    // ExecMainCode 1 is CLD_EXITED: it exited, not killed by a signal.
    ensure!(
        state == "inactive" && result == "success" && status == "0" && code == "1",
        "after systemctl stop: ActiveState={state} Result={result} ExecMainStatus={status} ExecMainCode={code}; stopped record {}",
        stopped.v
    );
    figures.push(format!(
        "systemd (e): systemctl stop {:.2} s, `stopped` record, ExecMainStatus 0",
        took.as_secs_f64()
    ));
    g.ensure_agent()
}

/// `663476Ki`, `1Gi`, `1048576` -> bytes (the stand-in writes binary suffixes only).
fn quantity_bytes(q: &str) -> Option<u64> {
    let (digits, shift) = match q {
        q if q.ends_with("Ki") => (&q[..q.len() - 2], 10),
        q if q.ends_with("Mi") => (&q[..q.len() - 2], 20),
        q if q.ends_with("Gi") => (&q[..q.len() - 2], 30),
        q => (q, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}
