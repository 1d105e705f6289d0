//! The agent's unit when things go wrong: (d) a stalled agent and a crash loop, (f) bad
//! input. What must hold: systemd's watchdog and start limit do their job, the kubelet is
//! never restarted more than the agent's guard rails allow, and bad input is said once,
//! with the event log going on and no crash loop.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use super::{
    Guest,
    deploy::{self, AGENT_KUBECONFIG, API_KUBECONFIG, RESTARTS_LOG},
    rootfs::CA_BUNDLE,
};
use crate::vm::{Figures, guest::Rec};

/// The shipped WatchdogSec=30s would make the test wait half a minute for each stall; this
/// drop-in (the documented way to change a unit) shortens it. Nothing else changes.
const WATCHDOG_DROPIN: &str =
    "/etc/systemd/system/hotplug-agent.service.d/50-vm-test-watchdog.conf";
const WATCHDOG_SEC: u64 = 4;
/// The shipped unit's StartLimitBurst.
const START_LIMIT_BURST: usize = 5;
/// The agent's guard rails (defaults of --min-refresh-interval, --max-refreshes-per-hour).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(2);
const MAX_REFRESHES_PER_HOUR: usize = 12;
/// One bad-input start: the agent writes `ready` within seconds here, or never.
const BAD_START: Duration = Duration::from_secs(60);

/// (d) SIGSTOP: systemd's watchdog kills the agent and restarts it. Then a crash loop
/// (SIGKILL right after each `ready`), with the Node made stale first so that every start
/// wants to restart the kubelet: it stops at StartLimitBurst, and the kubelet's restarts
/// stay within the guard rails.
pub fn watchdog(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    g.ensure_agent()?;
    g.m.write_file(
        WATCHDOG_DROPIN,
        &format!(
            "# cargo xtask vm-test: the shipped 30 s, shortened so a stall is caught in seconds.\n\
             [Service]\nWatchdogSec={WATCHDOG_SEC}s\n"
        ),
        0o644,
    )?;
    let from = g.m.records.mark();
    let (rc, out) = g.m.run(
        "systemctl daemon-reload && systemctl restart hotplug-agent",
        super::scenarios::START_TIMEOUT,
    )?;
    ensure!(
        rc == 0,
        "restarting with the watchdog drop-in exited {rc}: {out}"
    );
    g.wait_ready(from)?;
    let [pid, restarts, wd] = g.props(&["MainPID", "NRestarts", "WatchdogUSec"])?;
    ensure!(
        wd == format!("{WATCHDOG_SEC}s"),
        "the drop-in did not apply: WatchdogUSec={wd}"
    );
    let kubelet = g.kubelet_starts()?;
    let from = g.m.records.mark();
    let t0 = Instant::now();
    g.m.check(&format!("kill -STOP {pid}"))?;
    let again = g.m.records.wait_for(
        from,
        "`ready` after the stall",
        Duration::from_secs(90),
        |r| r.is("agent", "ready"),
    )?;
    let took = again.at.saturating_duration_since(t0);
    let [pid2, restarts2, state] = g.props(&["MainPID", "NRestarts", "ActiveState"])?;
    let n: u64 = restarts.parse()?;
    ensure!(
        pid2 != pid && restarts2 == (n + 1).to_string(),
        "after the stall: MainPID {pid} -> {pid2}, NRestarts {restarts} -> {restarts2}"
    );
    let said = g.m.check(
        "journalctl -u hotplug-agent -o cat --no-pager | grep -c 'Watchdog timeout' || true",
    )?;
    ensure!(
        said.trim().parse::<u32>().unwrap_or(0) >= 1,
        "systemd did not log a watchdog timeout"
    );
    ensure!(state == "active", "after the watchdog restart: {state}");
    ensure!(
        g.kubelet_starts()? == kubelet,
        "nothing changed on the machine: the agent's restart must not restart the kubelet"
    );
    figures.push(format!(
        "systemd (d): SIGSTOP -> watchdog ({WATCHDOG_SEC} s) kill and restart -> `ready` {:.1} s, NRestarts {restarts} -> {restarts2}",
        took.as_secs_f64()
    ));
    g.m.check(&format!(
        "rm -f {WATCHDOG_DROPIN} && systemctl daemon-reload"
    ))?;
    crash_loop(g, figures)
}

fn crash_loop(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    g.m.check("systemctl stop hotplug-agent")?;
    // A change the agent does not see (it is stopped): the Node is stale at every start.
    let block = offline_some_block(g)?;
    let kubelet_log_before = g.kubelet_starts()?;
    let mut from = g.m.records.mark();
    let t0 = Instant::now();
    g.m.check("systemctl reset-failed hotplug-agent; systemctl start --no-block hotplug-agent")?;
    let mut starts = 0;
    while starts < START_LIMIT_BURST {
        g.m.records
            .wait_for(
                from,
                "`ready` of the next start",
                Duration::from_secs(60),
                |r| r.is("agent", "ready"),
            )
            .with_context(|| format!("after {starts} start(s)"))?;
        starts += 1;
        from = g.m.records.mark();
        let [pid] = g.props(&["MainPID"])?;
        // SIGKILL: a SIGSEGV sent with kill(2) is swallowed once by the Rust runtime's
        // stack-overflow handler (no guard-page fault: it resets the handler and returns).
        g.m.check(&format!("kill -KILL {pid}"))?;
    }
    // The start after the last crash is refused: the unit fails for good.
    let (rc, out) = g.m.run(
        "timeout 60 sh -c 'until systemctl is-failed --quiet hotplug-agent; do sleep 0.2; done'",
        Duration::from_secs(90),
    )?;
    ensure!(
        rc == 0,
        "the unit did not fail after {starts} crashes ({rc}): {out}"
    );
    let more =
        g.m.records
            .since(from)
            .iter()
            .filter(|r| r.is("agent", "ready"))
            .count();
    starts += more;
    let took = t0.elapsed();
    let [state, result, nrestarts] = g.props(&["ActiveState", "Result", "NRestarts"])?;
    // systemd 252 keeps the last failure's Result (`signal`) when an automatic restart hits
    // the limit, and says so in the journal; a manual start would say `start-limit-hit`.
    let limited = g.m.check(
        "journalctl -u hotplug-agent -o cat --no-pager | grep -c 'Start request repeated too quickly' || true",
    )?;
    ensure!(
        state == "failed" && starts == START_LIMIT_BURST && limited.trim() != "0",
        "crash loop: {starts} starts, then ActiveState={state} Result={result} NRestarts={nrestarts}, \
         start limit hit {} time(s)",
        limited.trim()
    );
    let log = g.m.check(&format!("cat {RESTARTS_LOG}"))?;
    let times: Vec<f64> = log
        .lines()
        .skip(kubelet_log_before)
        .filter_map(|l| day_seconds(l.split_whitespace().next()?))
        .collect();
    let kubelet = g.kubelet_starts()? - kubelet_log_before;
    let too_close = times
        .windows(2)
        .any(|w| w[1] - w[0] < MIN_REFRESH_INTERVAL.as_secs_f64());
    ensure!(
        kubelet <= MAX_REFRESHES_PER_HOUR && kubelet <= starts && !too_close,
        "{starts} agent starts restarted the kubelet {kubelet} times (at {times:?}): beyond the guard rails"
    );
    figures.push(format!(
        "systemd (d): crash loop (SIGKILL after each `ready`, Node stale): {starts} starts in {:.0} s, then failed at the start limit (Result={result}); kubelet restarted {kubelet} time(s)",
        took.as_secs_f64()
    ));
    // Back to a running agent on the whole machine: it sees the block come back.
    g.m.check(&format!(
        "echo online > /sys/devices/system/memory/{block}/state"
    ))?;
    g.m.check("systemctl reset-failed hotplug-agent")?;
    g.ensure_agent()
}

/// Offlines one online memory block (the last one that agrees); its name.
fn offline_some_block(g: &mut Guest) -> anyhow::Result<String> {
    let out = g.m.check(
        "cd /sys/devices/system/memory && for b in $(ls -d memory* | sort -t y -k 2 -n -r); do \
         [ \"$(cat $b/state)\" = online ] && echo offline > $b/state 2>/dev/null && echo $b && exit 0; \
         done; exit 1",
    )?;
    Ok(out.trim().to_owned())
}

/// One bad input, what it must do, and how to set it up and undo it.
struct Case {
    name: &'static str,
    /// Guest commands that make the input bad.
    setup: &'static str,
    /// A substring of what the agent must say about it (case-insensitive; any of them);
    /// empty: nothing is wrong, the start-up reconcile must reach the API.
    says: &'static [&'static str],
    /// Whether the unit may stay `activating` (READY=1 waits for the first reconcile,
    /// which an unreachable API delays; the unit's TimeoutStartSec=10min allows for that).
    may_wait: bool,
}

/// (f) Bad input under the unit: each case restarts the agent with it and checks that the
/// unit says what is wrong (once: a CPU toggle, i.e. a new episode, does not repeat it),
/// keeps the event log going (the toggle's records arrive), and does not crash-loop.
pub fn bad_input(g: &mut Guest, figures: &mut Figures) -> anyhow::Result<()> {
    g.ensure_agent()?;
    let kubeconfig = String::from_utf8(g.m.read_file(API_KUBECONFIG)?)?;
    let own_ca = with_ca(&kubeconfig)?;
    let https_no_ca = kubeconfig.replace("server: http://", "server: https://");
    // Ordinary hosts have ca-certificates; this guest image does not, and the deploy put a
    // bundle in place: these cases take it away again.
    g.m.write_file("/etc/hotplug-agent/kubeconfig.own-ca", &own_ca, 0o600)?;
    g.m.write_file("/etc/hotplug-agent/kubeconfig.https", &https_no_ca, 0o600)?;
    let cases = [
        Case {
            name: "missing kubeconfig file",
            setup: "mv /etc/hotplug-agent/kubeconfig /etc/hotplug-agent/kubeconfig.aside",
            says: &["/etc/hotplug-agent/kubeconfig"],
            may_wait: false,
        },
        Case {
            name: "no CA bundle, plain-HTTP kubeconfig",
            setup: "mv /etc/ssl/certs/ca-certificates.crt /root/ca.aside",
            says: &[],
            may_wait: false,
        },
        Case {
            name: "no CA bundle, kubeconfig with its own CA",
            setup: "mv /etc/ssl/certs/ca-certificates.crt /root/ca.aside && \
                    cp /etc/hotplug-agent/kubeconfig.own-ca /etc/hotplug-agent/kubeconfig",
            says: &[],
            may_wait: false,
        },
        Case {
            name: "no CA bundle, HTTPS kubeconfig without a CA",
            setup: "mv /etc/ssl/certs/ca-certificates.crt /root/ca.aside && \
                    cp /etc/hotplug-agent/kubeconfig.https /etc/hotplug-agent/kubeconfig",
            says: &["certificate", "trust", " ca "],
            may_wait: true,
        },
        Case {
            name: "unreachable API (fake API stopped)",
            setup: "systemctl stop fake-apiserver",
            says: &["api_unreachable"],
            may_wait: true,
        },
    ];
    let mut failed = Vec::new();
    for case in &cases {
        let t = Instant::now();
        match one_case(g, case) {
            Ok(line) => figures.push(format!(
                "systemd (f): {}: {line} ({:.1} s)",
                case.name,
                t.elapsed().as_secs_f64()
            )),
            Err(e) => {
                figures.push(format!("systemd (f): {}: FAILED", case.name));
                failed.push(format!("{}: {e:#}", case.name));
            }
        }
        restore(g).with_context(|| format!("restoring the guest after {:?}", case.name))?;
    }
    if !failed.is_empty() {
        bail!("bad input under the unit:\n{}", failed.join("\n\n"));
    }
    Ok(())
}

fn one_case(g: &mut Guest, case: &Case) -> anyhow::Result<String> {
    g.m.check("systemctl stop hotplug-agent && systemctl reset-failed hotplug-agent")?;
    g.m.check(case.setup)?;
    let from = g.m.records.mark();
    g.m.check("systemctl start --no-block hotplug-agent")?;
    let [invocation] = g.props(&["InvocationID"])?;
    // `ready`, or the agent gone: no need to wait out the whole minute for a crash loop.
    let deadline = Instant::now() + BAD_START;
    loop {
        let ready =
            g.m.records
                .wait_for(from, "`ready`", Duration::from_secs(2), |r| {
                    r.is("agent", "ready")
                });
        if ready.is_ok() {
            break;
        }
        let [state, sub, result, n] =
            g.props(&["ActiveState", "SubState", "Result", "NRestarts"])?;
        let gone = n != "0" || state == "failed" || sub == "auto-restart" || state == "inactive";
        if gone || Instant::now() > deadline {
            bail!(
                "no `ready` record: the agent did not start (ActiveState={state} SubState={sub} Result={result} NRestarts={n}); its journal:\n{}",
                journal(g, &invocation)?
            );
        }
    }
    let said = |g: &mut Guest| -> anyhow::Result<usize> {
        let j = journal(g, &invocation)?.to_lowercase();
        Ok(j.lines()
            .filter(|l| case.says.iter().any(|s| l.contains(s)))
            .count())
    };
    if case.says.is_empty() {
        let rec =
            g.m.records
                .wait_for(from, "the start-up reconcile", BAD_START, |r| {
                    r.v["kind"] == "reconcile" && r.v["episode"] == 0
                })?;
        ensure!(
            rec.v["action"] == "in_sync",
            "the start-up reconcile should reach the API over plain HTTP and be in sync: {}",
            rec.v
        );
    } else {
        // Said by now (the start-up reconcile has run or failed), or never.
        g.m.records
            .wait_for(from, "the start-up reconcile", BAD_START, |r| {
                r.v["kind"] == "reconcile" && r.v["episode"] == 0
            })
            .ok();
    }
    let before = said(g)?;
    ensure!(
        case.says.is_empty() || before >= 1,
        "nothing in the unit's journal says what is wrong (looked for {:?}):\n{}",
        case.says,
        journal(g, &invocation)?
    );
    // A new episode: CPU 1 off and on. Its records must arrive; the problem is not said again.
    let mark = g.m.records.mark();
    g.m.check(
        "echo 0 > /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online",
    )?;
    let is_cpu1 = |r: &Rec, action: &str| {
        r.v["kind"] == "cpu" && r.v["action"] == action && r.device() == "cpu1"
    };
    g.m.records
        .wait_for(mark, "cpu1 offline", Duration::from_secs(30), |r| {
            is_cpu1(r, "offline")
        })?;
    g.m.records
        .wait_for(mark, "cpu1 online", Duration::from_secs(30), |r| {
            is_cpu1(r, "online")
        })?;
    // The episode settles and is handled (or retried) within this.
    let recs = g.m.records.settle(mark, Duration::from_secs(3)).to_vec();
    let after = said(g)?;
    ensure!(
        after == before,
        "said again after a new episode ({before} -> {after} lines):\n{}\nrecords since:\n{}",
        journal(g, &invocation)?,
        recs.iter()
            .map(|r| r.v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let [state, sub, n] = g.props(&["ActiveState", "SubState", "NRestarts"])?;
    let ok_state = state == "active" || (case.may_wait && state == "activating" && sub == "start");
    ensure!(
        ok_state && n == "0",
        "the unit should keep running: ActiveState={state} SubState={sub} NRestarts={n}"
    );
    Ok(format!(
        "{state}/{sub}, NRestarts 0, said in {before} journal line(s), event log going"
    ))
}

/// The unit's journal for one invocation (stdout records and stderr diagnostics both).
fn journal(g: &mut Guest, invocation: &str) -> anyhow::Result<String> {
    g.m.check(&format!(
        "journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={invocation} | tail -n 200"
    ))
}

/// Every case's setup undone, the cluster and the agent running.
fn restore(g: &mut Guest) -> anyhow::Result<()> {
    g.m.check(
        "systemctl stop hotplug-agent; systemctl reset-failed hotplug-agent; \
         if [ -e /root/ca.aside ]; then mv /root/ca.aside /etc/ssl/certs/ca-certificates.crt; fi; \
         rm -f /etc/hotplug-agent/kubeconfig.aside",
    )?;
    if g.m
        .check("systemctl is-active fake-apiserver || true")?
        .trim()
        != "active"
    {
        deploy::start_cluster(g)?;
    } else {
        g.m.check(&format!(
            "install -m 0600 {API_KUBECONFIG} {AGENT_KUBECONFIG}"
        ))?;
    }
    g.ensure_agent()
}

/// The kubeconfig with `certificate-authority-data` (a real CA certificate from this host's
/// bundle) under its cluster.
fn with_ca(kubeconfig: &str) -> anyhow::Result<String> {
    let bundle = std::fs::read_to_string(CA_BUNDLE).context("this host's CA bundle")?;
    let end = "-----END CERTIFICATE-----";
    let first = bundle
        .find("-----BEGIN CERTIFICATE-----")
        .and_then(|b| Some(&bundle[b..bundle[b..].find(end)? + b + end.len()]))
        .context("no certificate in this host's CA bundle")?;
    let data = base64(format!("{first}\n").as_bytes());
    let server = kubeconfig
        .lines()
        .find(|l| l.trim_start().starts_with("server:"))
        .context("no server: in the kubeconfig")?;
    let indent = &server[..server.len() - server.trim_start().len()];
    Ok(kubeconfig.replacen(
        server,
        &format!("{server}\n{indent}certificate-authority-data: {data}"),
        1,
    ))
}

/// `2026-11-30T15:50:01.25Z` -> seconds into that day (the zone is the same on every line).
fn day_seconds(rfc3339: &str) -> Option<f64> {
    let time = rfc3339.split_once('T')?.1;
    let end = time.find(['Z', '+', '-']).unwrap_or(time.len());
    let mut parts = time[..end].split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_time_of_day() {
        assert_eq!(day_seconds("2026-11-30T01:02:03.5Z"), Some(3723.5));
        assert_eq!(day_seconds("2026-11-30T00:00:10+00:00"), Some(10.0));
        assert_eq!(day_seconds("pid 12"), None);
    }

    #[test]
    fn encodes_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
