//! The monitoring pack (deploy/kubernetes/components/monitoring) against the real tools of
//! Debian's `prometheus` package (`cargo xtask setup` installs it):
//! - `promtool check rules` and `promtool test rules` on the alert rules, extracted from the
//!   PrometheusRule by this test, with tests/monitoring/alerts.test.yaml: every alert must
//!   fire and resolve there;
//! - `promtool check metrics` on a live `/metrics` scrape of a running agent, and the
//!   dashboard and the rules checked to name only metrics that scrape has;
//! - a real Prometheus server (loopback, its own port and data dir, killed by PID) scraping
//!   a running agent through one CPU offline/online, read back through its HTTP API.
//!
//! Without promtool or prometheus a test says so loudly and does not count as passed.
use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hotplug_tests::{
    Agent, CpuOffline, MachineLock, can_change_machine, cluster::Cluster, free_port, http_get,
    is_event,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
/// The job name the PodMonitor and the ServiceMonitor give the agent (`jobLabel`).
const JOB: &str = "hotplug-agent";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(path: &str) -> String {
    let path = repo().join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `program` on PATH, or `None` after saying loudly that `test` cannot run.
fn tool(program: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!(
            "\n*** SKIP {test}: `{program}` not found (Debian package `prometheus`; \
             `cargo xtask setup` installs it) ***\n"
        );
    }
    found
}

/// Runs `cmd`; returns its exit status and everything it printed.
fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running a promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The PrometheusRule's `spec.groups`, as a Prometheus rule file (JSON is YAML).
fn rule_file() -> Value {
    let rule: Value = serde_saphyr::from_str(&read(
        "deploy/kubernetes/components/monitoring/prometheusrule.yaml",
    ))
    .expect("prometheusrule.yaml parses");
    assert_eq!(rule["kind"], "PrometheusRule");
    serde_json::json!({ "groups": rule["spec"]["groups"] })
}

fn alerts(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            (
                r["alert"]
                    .as_str()
                    .expect("every rule is an alert")
                    .to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

#[test]
fn promtool_checks_and_tests_every_alert() {
    let test = "promtool_checks_and_tests_every_alert";
    let Some(promtool) = tool("promtool", test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = rule_file();
    fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("writing rules.yaml");
    let unit_tests = read("tests/monitoring/alerts.test.yaml");
    fs::write(dir.path().join("alerts.test.yaml"), &unit_tests).expect("writing the tests");

    let (ok, text) = output(
        Command::new(&promtool)
            .args(["check", "rules", "rules.yaml"])
            .current_dir(dir.path()),
    );
    let names = alerts(&rules);
    eprintln!("promtool check rules:\n{text}");
    assert!(ok, "promtool check rules failed:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{text}"
    );

    // Every alert has a case where it fires and, later in that case, one where it is gone.
    let cases: Value = serde_saphyr::from_str(&unit_tests).expect("alerts.test.yaml parses");
    let mut checks = 0;
    for (alert, _) in &names {
        let covered = cases["tests"]
            .as_array()
            .expect("tests")
            .iter()
            .any(|case| {
                let evals: Vec<&Value> = case["alert_rule_test"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|t| t["alertname"] == alert.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                let minutes = |t: &Value| {
                    t["eval_time"]
                        .as_str()
                        .and_then(|s| s.strip_suffix('m')?.parse::<u32>().ok())
                        .expect("eval_time in minutes")
                };
                let fires = evals
                    .iter()
                    .filter(|t| t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
                    .map(|t| minutes(t))
                    .min();
                let resolved = evals
                    .iter()
                    .filter(|t| t["exp_alerts"].as_array().is_some_and(|a| a.is_empty()))
                    .map(|t| minutes(t))
                    .max();
                matches!((fires, resolved), (Some(f), Some(r)) if r > f)
            });
        assert!(
            covered,
            "{alert}: no unit test where it fires and then resolves"
        );
    }
    for case in cases["tests"].as_array().expect("tests") {
        checks += case["alert_rule_test"].as_array().map_or(0, Vec::len);
    }

    let (ok, text) = output(
        Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yaml"])
            .current_dir(dir.path()),
    );
    eprintln!(
        "promtool test rules: {} alerts, {} cases, {checks} checks:\n{text}",
        names.len(),
        cases["tests"].as_array().map_or(0, Vec::len)
    );
    assert!(
        ok && text.contains("SUCCESS"),
        "promtool test rules:\n{text}"
    );
}

/// The metric names a scrape in the Prometheus text format 0.0.4 declares or has samples of.
fn scraped_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
            // A histogram is used through its series.
            for suffix in ["_bucket", "_sum", "_count"] {
                if line.starts_with("# TYPE") && line.ends_with(" histogram") {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every `hotplug_agent_*` metric name in a PromQL expression.
fn agent_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hotplug_agent_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// Every PromQL expression of the dashboard (panels' targets, the templating queries).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("hotplug_agent_") => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The agent, run as `run` with `args` (default: without a cluster), with `/metrics` on a
/// free loopback port.
fn agent_with_metrics(args: &[String]) -> (Agent, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["run", "--stream-socket", "off", "--metrics-addr", &addr];
    if args.is_empty() {
        all.extend(["--refresh", "none", "--no-kubernetes"]);
    }
    all.extend(args.iter().map(String::as_str));
    let (mut agent, _ready) = Agent::start(&all);
    agent.wait_for("the start-up reconcile", WAIT, |v| v["kind"] == "reconcile");
    (agent, addr)
}

#[test]
fn promtool_checks_a_live_scrape() {
    let test = "promtool_checks_a_live_scrape";
    let Some(promtool) = tool("promtool", test) else {
        return;
    };
    let (agent, addr) = agent_with_metrics(&[]);
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    // The running agent's own configuration, with where each value came from.
    let (status, config) = http_get(&addr, "/config");
    assert_eq!(status, 200, "{config}");
    let line = config
        .lines()
        .find(|l| l.contains("metrics_addr"))
        .unwrap_or_else(|| panic!("no metrics_addr in /config:\n{config}"));
    assert!(line.contains(&addr) && line.contains("flag"), "{line}");
    // `hotplug-agent config` in the agent's environment (as `kubectl exec` has it) shows
    // the running agent's configuration, saying so; with no agent, what it computes here.
    let config_command = |args: &[&str]| {
        let out = Command::new(hotplug_tests::agent_bin())
            .arg("config")
            .args(args)
            .env_clear()
            .env("HOTPLUG_AGENT_METRICS_ADDR", &addr)
            .output()
            .expect("running hotplug-agent config");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let shown = config_command(&[]);
    assert_eq!(
        shown,
        format!("# the running agent's configuration, from http://{addr}/config\n{config}"),
        "not the running agent's"
    );
    // The agent was started with flags this environment does not have: what is shown is
    // what runs, not what a fresh parse of this environment gives.
    assert!(shown.contains("refresh = \"none\"  # flag"), "{shown}");
    let local = config_command(&["--local"]);
    assert!(
        local.starts_with("# computed here") && local.contains("refresh = \"systemd\"  # default"),
        "{local}"
    );
    drop(agent);
    let fallback = config_command(&[]);
    assert!(
        fallback.starts_with(
            "# computed here from this command's flags, environment and config \
             file: no running agent answered"
        ) && fallback.contains(&format!(
            "metrics_addr = \"{addr}\"  # env HOTPLUG_AGENT_METRICS_ADDR"
        )),
        "{fallback}"
    );

    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool check metrics");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feeding the scrape to promtool");
    let out = check.wait_with_output().expect("promtool check metrics");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}\nscrape:\n{body}",
        out.status
    );

    let scraped = scraped_names(&body);
    eprintln!(
        "promtool check metrics: clean, {} metric names",
        scraped.len()
    );
    for required in [
        "hotplug_agent_build_info",
        "hotplug_agent_uevents_malformed_total",
        "hotplug_agent_ringbuf_undecodable_records_total",
        "hotplug_agent_uevent_seqnum_gaps_total",
    ] {
        assert!(
            scraped.contains(required),
            "{required} not on /metrics:\n{body}"
        );
    }
    assert!(
        body.contains(r#"hotplug_agent_machine_capacity{resource="cpu",unit="core"}"#)
            && body.contains(r#"hotplug_agent_machine_capacity{resource="memory",unit="byte"}"#),
        "capacities without their unit:\n{body}"
    );
}

/// The dashboard and the rules name only metrics that `body` (a scrape of an agent that
/// went through a whole episode: events, reconcile, refresh, verify) has.
fn check_names_against(body: &str) {
    let scraped = scraped_names(body);
    let dashboard: Value = serde_json::from_str(&read(
        "deploy/kubernetes/components/monitoring/dashboard.json",
    ))
    .expect("dashboard.json is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| agent_metrics(e)).collect();
    let rules: BTreeSet<String> = alerts(&rule_file())
        .iter()
        .flat_map(|(_, e)| agent_metrics(e))
        .collect();
    eprintln!(
        "{} metric names on /metrics; the dashboard uses {} ({} expressions), the rules {}",
        scraped.len(),
        used.len(),
        exprs.len(),
        rules.len()
    );
    assert!(used.len() >= 15, "the dashboard shows too little: {used:?}");
    let missing: Vec<&String> = used
        .union(&rules)
        .filter(|n| !scraped.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the rules name metrics the agent does not have: {missing:?}\n\
         the agent has: {scraped:?}"
    );
}

/// A Prometheus server of our own: loopback only, a temporary data dir, killed by PID.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dir.path().join("rules.yaml");
        fs::write(&rules, rule_file().to_string()).expect("writing rules.yaml");
        let config = serde_json::json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
            "rule_files": [rules],
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{ "targets": [target], "labels": { "node": "this-host" } }],
            }],
        });
        let config_file = dir.path().join("prometheus.yml");
        fs::write(&config_file, config.to_string()).expect("writing prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let server = Self {
            child,
            addr,
            _dir: dir,
        };
        server.until("/-/ready answers 200", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&server.addr).is_ok()
                && get(&server.addr, "/-/ready").0 == 200
        });
        server
    }

    fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `done` until it holds: Prometheus scrapes on its own clock and has no way to
    /// tell us a scrape happened, so its API is asked until the answer shows it.
    fn until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "Prometheus: {what}: not within {timeout:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query's single value, if it has exactly one series.
    fn query(&self, promql: &str) -> Option<f64> {
        let (status, body) = get(
            &self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
        let result = v["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET in HTTP/1.0, so that Prometheus answers with a plain body, never chunked.
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to Prometheus");
    write!(s, "GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").expect("sending the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_an_agent_through_a_cpu_toggle() {
    let test = "prometheus_scrapes_an_agent_through_a_cpu_toggle";
    let Some(binary) = tool("prometheus", test) else {
        return;
    };
    if !can_change_machine(test) {
        return;
    }
    let _lock = MachineLock::take();
    let Some(cpu) = CpuOffline::pick().filter(|&c| c != 0) else {
        eprintln!("\n*** SKIP {test}: no CPU but cpu0 can go offline here ***\n");
        return;
    };
    let started = Instant::now();
    // Against the fake API and the kubelet stand-in: each toggle is an episode that
    // reconciles, refreshes (the stand-in restarts) and verifies, so every metric the
    // dashboard shows has series.
    let cluster = Cluster::start("monitoring-node");
    let (mut agent, addr) = agent_with_metrics(&cluster.run_args());
    let prometheus = Prometheus::start(&binary, &addr);
    let ready_after = started.elapsed();
    let cpus =
        format!(r#"hotplug_agent_machine_capacity{{job="{JOB}",resource="cpu",unit="core"}}"#);
    let (_, before) = hotplug_tests::machine();
    let before = before as f64;

    // The first scrapes: the target is up (Prometheus parsed our OpenMetrics) and says
    // what the machine has.
    prometheus.until("the agent's first scrape", WAIT, || {
        prometheus.query(&format!(r#"up{{job="{JOB}"}}"#)) == Some(1.0)
            && prometheus.query(&cpus) == Some(before)
    });
    let info = format!(r#"hotplug_agent_build_info{{job="{JOB}",node="this-host"}}"#);
    assert_eq!(prometheus.query(&info), Some(1.0));

    let dev = format!("cpu{cpu}");
    let mut offline = CpuOffline::new(cpu);
    agent.wait_for("the CPU's offline uevent", WAIT, |v| {
        is_event(v, "uevent", "cpu", "offline", Some(&dev))
    });
    prometheus.until("one CPU fewer", WAIT, || {
        prometheus.query(&cpus) == Some(before - 1.0)
    });
    let offlines = format!(
        r#"hotplug_agent_events_total{{job="{JOB}",source="uevent",kind="cpu",action="offline"}}"#
    );
    assert_eq!(prometheus.query(&offlines), Some(1.0));

    offline.restore();
    agent.wait_for("the CPU's online uevent", WAIT, |v| {
        is_event(v, "uevent", "cpu", "online", Some(&dev))
    });
    prometheus.until("the CPU back", WAIT, || {
        prometheus.query(&cpus) == Some(before)
    });
    // The CPU's return is its own episode (a restart, then verify) or, when it came back
    // before the first episode's refresh began, part of that one (whose refresh then reads
    // the whole machine, and the next episode finds the Node in sync). Either way the agent
    // ends on a record that has the whole machine and the Node agreeing.
    let whole = before as u64;
    agent.wait_for(
        "converged or in sync with the CPU back",
        Duration::from_secs(60),
        |v| {
            v["capacity"]["cpus_online"].as_u64() == Some(whole)
                && v["episode"].as_u64().is_some_and(|e| e >= 1)
                && ((v["kind"] == "verify" && v["action"] == "converged")
                    || (v["kind"] == "reconcile" && v["action"] == "in_sync"))
        },
    );
    let verified = agent
        .seen
        .iter()
        .filter(|v| v["kind"] == "verify" && v["action"] == "converged")
        .count();
    assert!(
        (1..=2).contains(&verified),
        "one or two restarts for one toggle: {:?}",
        agent.seen
    );
    let advertised = format!(
        r#"hotplug_agent_node_advertised_capacity{{job="{JOB}",resource="cpu",unit="core"}}"#
    );
    prometheus.until("the Node advertising the CPU again", WAIT, || {
        prometheus.query(&advertised) == Some(before)
    });
    let converged =
        format!(r#"hotplug_agent_verifications_total{{job="{JOB}",result="converged"}}"#);
    prometheus.until("as many converged verifications as the log", WAIT, || {
        prometheus.query(&converged) == Some(verified as f64)
    });
    // The dip is in Prometheus' own storage, not only in its latest sample.
    assert_eq!(
        prometheus.query(&format!("min_over_time({cpus}[5m])")),
        Some(before - 1.0)
    );
    assert_eq!(
        prometheus.query(&format!("max_over_time({cpus}[5m])")),
        Some(before)
    );
    // The rules load into a real server.
    let (_, rules) = get(&prometheus.addr, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).expect("rules JSON");
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, alerts(&rule_file()).len(), "{rules}");
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    check_names_against(&body);
    eprintln!(
        "{test}: Prometheus ready {:.1?} after the start, the whole toggle seen through it in {:.1?}",
        ready_after,
        started.elapsed()
    );
}

/// `kubectl kustomize DIR` as parsed objects, or `None` (loudly) without kubectl.
fn render(dir: &Path, test: &str) -> Option<Vec<Value>> {
    let kubectl = tool("kubectl", test)?;
    let (ok, text) = output(Command::new(kubectl).arg("kustomize").arg(dir));
    assert!(ok, "kubectl kustomize {}: {text}", dir.display());
    Some(serde_saphyr::from_multiple(&text).expect("rendered YAML"))
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "{} {kind} objects", found.len());
    found[0]
}

/// `labels` has every key and value of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn the_pack_renders_with_either_monitor_selecting_the_agents() {
    let test = "the_pack_renders_with_either_monitor_selecting_the_agents";
    let Some(objects) = render(&repo().join("deploy/kubernetes/overlays/monitoring"), test) else {
        return;
    };
    let ds = one(&objects, "DaemonSet");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        ports
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "metrics")),
        "no `metrics` port: {ports}"
    );
    let check_monitor = |monitor: &Value, target_labels: &Value, endpoints: &str| {
        let spec = &monitor["spec"];
        assert!(
            selects(&spec["selector"]["matchLabels"], target_labels),
            "{} selects nothing: {spec}",
            monitor["kind"]
        );
        let job_label = spec["jobLabel"].as_str().expect("jobLabel");
        assert_eq!(target_labels[job_label], JOB, "the job would not be {JOB}");
        let endpoint = &spec[endpoints][0];
        assert_eq!(endpoint["port"], "metrics");
        assert_eq!(endpoint["path"], "/metrics");
        assert!(
            endpoint["relabelings"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| {
                    r["targetLabel"] == "node"
                        && r["sourceLabels"][0] == "__meta_kubernetes_pod_node_name"
                })),
            "no `node` label: {endpoint}"
        );
        assert_eq!(monitor["metadata"]["namespace"], "hotplug-agent");
    };
    check_monitor(
        one(&objects, "PodMonitor"),
        pod_labels,
        "podMetricsEndpoints",
    );
    assert!(!objects.iter().any(|o| o["kind"] == "ServiceMonitor"));
    let rule = one(&objects, "PrometheusRule");
    assert_eq!(rule["spec"]["groups"], rule_file()["groups"]);
    let dashboard = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json = dashboard["data"]["hotplug-agent.json"]
        .as_str()
        .expect("the dashboard");
    assert_eq!(
        serde_json::from_str::<Value>(json).expect("dashboard JSON"),
        serde_json::from_str::<Value>(&read(
            "deploy/kubernetes/components/monitoring/dashboard.json"
        ))
        .expect("dashboard.json")
    );

    // The ServiceMonitor instead, in an operator's overlay outside the repository (Kustomize
    // takes relative paths only).
    let dir = tempfile::tempdir().expect("tempdir");
    let up: PathBuf = dir
        .path()
        .canonicalize()
        .expect("canonical")
        .components()
        .skip(1)
        .map(|_| "..")
        .collect();
    let k = repo().canonicalize().expect("canonical repo");
    let rel = |p: &str| up.join(k.strip_prefix("/").expect("absolute")).join(p);
    fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - {}\ncomponents:\n  - {}\n  - {}\n",
            rel("deploy/kubernetes/base").display(),
            rel("deploy/kubernetes/components/monitoring").display(),
            rel("deploy/kubernetes/components/monitoring/service-monitor").display(),
        ),
    )
    .expect("writing the kustomization");
    let Some(objects) = render(dir.path(), test) else {
        return;
    };
    assert!(
        !objects.iter().any(|o| o["kind"] == "PodMonitor"),
        "both monitors"
    );
    let service = one(&objects, "Service");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "metrics")),
        "the Service has no `metrics` port"
    );
    assert!(selects(&service["spec"]["selector"], pod_labels));
    check_monitor(
        one(&objects, "ServiceMonitor"),
        &service["metadata"]["labels"],
        "endpoints",
    );
}
