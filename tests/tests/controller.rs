//! The controller (`hotplug_agent::run::control`) in-process, without root and without
//! touching this machine: the machine is a fixture tree (`proc/meminfo`,
//! `sys/devices/system/cpu/online`) that the test edits, the events are records the test
//! makes (as the pipeline would for those edits), the API is the in-process fake, and the
//! kubelet stand-in reads the fixture tree (`--root`) once per start, as the real kubelet
//! reads the machine. Everything else — episodes, reconcile, the `command` refresh backend
//! restarting the stand-in, verify watching the Node — is the agent's own code.
//!
//! What is tested here is timing: a second change landing at each point of an episode
//! (while it settles, after it settled, after reconcile, while the kubelet restarts, after
//! the refresh returned, after verify) must never wedge the loop, and a 512-block DIMM
//! that comes online more slowly than the episode bound must still be one episode and one
//! restart.
use hotplug_agent::record::AgentAction;
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
    time::{Duration, Instant},
};

use hotplug_agent::{
    capacity::Summary,
    episode::Timing,
    pipeline::{self, event_record},
    record::{Action, AgentRecord, Kind, Record, Source},
    refresh::{Backend, command::CommandConfig, guard::GuardConfig},
    report::{Format, sinks::Sinks},
    run::{self, StaticPolicy},
    sources::{Change, Detail},
};
use hotplug_tests::{cluster::Cluster, fake_api::FakeApi};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

const NODE: &str = "controller-test";
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 128 << 20;
const BASE_MEMORY: u64 = 4 * GIB;
/// Long enough that a verify wedged on an unreachable target shows as a test failure
/// (the Node checks below give up well before it).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(20);
/// Short, so that a hanging API server is noticed within the test's patience.
const API_TIMEOUT: Duration = Duration::from_secs(2);

/// The machine as files: what `capacity::read_snapshot` and the stand-in's `--root` read.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Self {
        let m = Self {
            dir: tempfile::tempdir().expect("fixture root"),
        };
        fs::create_dir_all(m.root().join("proc")).expect("mkdir");
        fs::create_dir_all(m.root().join("sys/devices/system/cpu")).expect("mkdir");
        m.set(Summary {
            memory_bytes: BASE_MEMORY,
            cpus_online: 2,
        });
        m
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites the fixture; each file is replaced whole (rename), as sysfs and procfs
    /// never show a half-written value.
    fn set(&self, s: Summary) {
        let write = |rel: &str, text: String| {
            let path = self.root().join(rel);
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, text).expect("writing the fixture");
            fs::rename(&tmp, &path).expect("replacing the fixture");
        };
        write(
            "proc/meminfo",
            format!(
                "MemTotal:       {} kB\nMemFree:        {} kB\n",
                s.memory_bytes / 1024,
                s.memory_bytes / 2048
            ),
        );
        let online = match s.cpus_online {
            1 => "0\n".to_owned(),
            n => format!("0-{}\n", n - 1),
        };
        write("sys/devices/system/cpu/online", online);
        write("sys/devices/system/cpu/possible", "0-3\n".into());
    }
}

/// A line writer that hands each NDJSON record to the test thread.
struct Lines {
    tx: std_mpsc::Sender<Value>,
    buf: Vec<u8>,
}

impl Write for Lines {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let v: Value = serde_json::from_slice(&line).expect("the agent writes JSON lines");
            let _ = self.tx.send(v);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Holds every refresh after the kubelet restarted, until the test lets it finish: the
/// refresh command ends with `read < FIFO`, and a thread here opens the FIFO for writing
/// once per refresh, the first time only after [`Gate::open`].
struct Gate {
    fifo: PathBuf,
    open: Option<std_mpsc::Sender<()>>,
}

impl Gate {
    fn new(dir: &Path) -> Self {
        let fifo = dir.join("refresh-gate");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: a valid C string; mkfifo has no other preconditions.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
        let (open, opened) = std_mpsc::channel::<()>();
        let path = fifo.clone();
        thread::spawn(move || {
            if opened.recv().is_err() {
                return;
            }
            // Each open(O_WRONLY) waits for the next refresh's reader. A write can meet
            // the previous reader on its way out (EPIPE): that reader is done, so go on
            // and wait for the next one rather than leave it stuck.
            while let Ok(mut f) = fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.write_all(b"go\n");
            }
        });
        Self {
            fifo,
            open: Some(open),
        }
    }

    fn open(&mut self) {
        if let Some(tx) = self.open.take() {
            let _ = tx.send(());
        }
    }
}

/// How a harness is set up beyond the defaults.
#[derive(Default)]
struct Options {
    timing: Option<Timing>,
    /// Each refresh waits, after the kubelet restarted, until the gate opens.
    gated: bool,
    guard: Option<GuardConfig>,
    /// The agent reaches the API through a [`Proxy`] that can hang.
    proxy: bool,
    /// The refresh command instead of restarting the stand-in, and its timeout.
    refresh: Option<(Vec<String>, Duration)>,
    verify_timeout: Option<Duration>,
    /// The kubelet's CPU manager checkpoint, in its root dir.
    cpu_manager_state: Option<&'static str>,
    /// Where the agent looks for the pods' cgroup, instead of the one the stand-in keeps.
    cgroup_root: Option<PathBuf>,
    /// The kubelet's memory manager checkpoint, in its root dir.
    memory_manager_state: Option<String>,
    /// Instead of `refuse`.
    static_policy: Option<StaticPolicy>,
    /// The stand-in validates the checkpoints at each start as the kubelet's static
    /// policies do, and refuses to start on one they would refuse.
    validating_standin: bool,
    /// The fleet budgets (default: 10 % of the nodes, i.e. one slot here).
    fleet: Option<hotplug_agent::fleet::Config>,
    /// `--static-policy drain-and-reset`, stopping the stand-in by its pidfile.
    drain_and_reset: bool,
    /// With `drain_and_reset`: the stop kills the stand-in in the first half of a second,
    /// just after one of its posts, and the start returns at once while the new stand-in
    /// comes up 2 s later, as `systemctl start` returns for a kubelet still coming up.
    racy_restart: bool,
    /// The agent looks for this Node instead of the one the stand-in registers.
    node_name: Option<&'static str>,
    /// The kubelet's config file (`kubelet-root/config.yaml`); none by default.
    kubelet_config: Option<&'static str>,
    /// Instead of `refuse`.
    shrink_policy: Option<hotplug_agent::shrink::Policy>,
    /// The client does not retry 429/503/504 itself (kube's default does, for minutes).
    no_client_retry: bool,
}

/// A TCP proxy in front of the fake API that can hang: frozen, it accepts connections and
/// never answers, as a wedged API server or a dead load balancer does (and the connections
/// it was forwarding are cut, so pooled keep-alive connections do not slip past); thawed,
/// it forwards again.
struct Proxy {
    addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: std::net::SocketAddr) -> Self {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (frozen, watch) = tokio::sync::watch::channel(false);
        rt.spawn(async move {
            let mut live = tokio::task::JoinSet::new();
            let mut freezes = watch.clone();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut client, _)) = accepted else { return };
                        if *watch.borrow() {
                            // Hold it, answer nothing, until the test ends.
                            live.spawn(async move {
                                std::future::pending::<()>().await;
                                drop(client);
                            });
                            continue;
                        }
                        live.spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                            }
                        });
                    }
                    changed = freezes.changed() => {
                        if changed.is_err() { return; }
                        if *freezes.borrow_and_update() {
                            live.abort_all();
                        }
                    }
                }
            }
        });
        Self { addr, frozen }
    }

    fn freeze(&self, frozen: bool) {
        let _ = self.frozen.send(frozen);
    }
}

struct Harness {
    proxy: Option<Proxy>,
    machine: Machine,
    cluster: Cluster,
    inject: mpsc::Sender<Record>,
    lines: std_mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stop: Option<oneshot::Sender<()>>,
    agent: Option<thread::JoinHandle<Result<(), String>>>,
    gate: Option<Gate>,
    /// The deploy/kubernetes variant whose RBAC must grant every request of this agent.
    rbac: &'static str,
}

impl Harness {
    /// A fixture machine (4 GiB, 2 CPUs), the fake API, the stand-in reading the fixture,
    /// and the controller; returns after the start-up reconcile. `gated`: each refresh
    /// waits, after the kubelet restarted, until the gate opens.
    fn start(timing: Timing, gated: bool) -> Self {
        Self::start_with(Options {
            timing: Some(timing),
            gated,
            ..Options::default()
        })
    }

    fn start_with(options: Options) -> Self {
        let gated = options.gated;
        let timing = options.timing.unwrap_or_else(self::timing);
        let machine = Machine::new();
        let root = machine.root().to_str().expect("utf-8").to_owned();
        let mut standin = vec!["--root", &root, "--repost-ms", "200"];
        if options.validating_standin {
            standin.extend(["--kubelet-root-dir", "@KUBELET_ROOT@"]);
        }
        let cluster = Cluster::start_with(NODE, &standin);
        let gate = gated.then(|| Gate::new(Path::new(&cluster.path(""))));
        let restart = cluster.kubelet.restart_command();
        let script = match &gate {
            Some(g) => format!("{restart} && read line < '{}'", g.fifo.display()),
            None => restart,
        };
        let mut command = CommandConfig::new(vec!["/bin/sh".to_owned(), "-c".to_owned(), script]);
        if let Some((argv, timeout)) = options.refresh {
            command.argv = argv;
            command.timeout = timeout;
        }
        if let Some(state) = &options.memory_manager_state {
            fs::write(cluster.path("kubelet-root/memory_manager_state"), state)
                .expect("writing the checkpoint");
        }
        if options.drain_and_reset {
            let pidfile = cluster.kubelet.pidfile().display().to_string();
            let sh = |c: String| vec!["/bin/sh".to_owned(), "-c".to_owned(), c];
            if options.racy_restart {
                // The stand-in posts every 200 ms: killed 0.25 s after a second's first
                // tenths, its last post has that second, and so has the start that follows.
                command.stop = Some(sh(format!(
                    "while [ \"$(date +%N | cut -c1)\" -ge 3 ]; do sleep 0.02; done; sleep 0.25; kill $(cat '{pidfile}')"
                )));
                command.start = Some(sh(format!(
                    "(sleep 2; exec {}) </dev/null >/dev/null 2>&1 &",
                    cluster.kubelet.restart_command()
                )));
            } else {
                command.stop = Some(sh(format!("kill $(cat '{pidfile}')")));
                command.start = Some(sh(cluster.kubelet.restart_command()));
            }
        }
        if let Some(text) = options.kubelet_config {
            fs::write(cluster.path("kubelet-root/config.yaml"), text)
                .expect("writing the kubelet's config");
        }
        if let Some(state) = options.cpu_manager_state {
            fs::write(cluster.path("kubelet-root/cpu_manager_state"), state)
                .expect("writing the checkpoint");
        }
        let config = run::Config {
            pipeline: pipeline::Config {
                root: machine.root().to_owned(),
                ebpf: false,
                uevent: false,
                ..pipeline::Config::default()
            },
            timing,
            node_name: options.node_name.unwrap_or(NODE).into(),
            backend: Backend::Command(command),
            guard: options.guard.unwrap_or_default(),
            verify_timeout: options.verify_timeout.unwrap_or(VERIFY_TIMEOUT),
            api_timeout: API_TIMEOUT,
            kubelet_root: cluster.path("kubelet-root").into(),
            kubelet_config: cluster.path("kubelet-root/config.yaml").into(),
            static_policy: if options.drain_and_reset {
                StaticPolicy::DrainAndReset
            } else {
                options.static_policy.unwrap_or(StaticPolicy::Refuse)
            },
            cgroup_root: options
                .cgroup_root
                .unwrap_or_else(|| cluster.path("cgroup").into()),
            fleet: options.fleet.clone().unwrap_or_default(),
            shrink_policy: options.shrink_policy.unwrap_or_default(),
        };
        let mut kubeconfig = PathBuf::from(cluster.path("kubeconfig"));
        let proxy = options
            .proxy
            .then(|| Proxy::start(&cluster.rt, cluster.api.addr()));
        if let Some(p) = &proxy {
            let text = fs::read_to_string(&kubeconfig).expect("kubeconfig");
            let text = text.replace(&cluster.api.url(), &format!("http://{}", p.addr));
            kubeconfig = PathBuf::from(cluster.path("kubeconfig-proxy"));
            fs::write(&kubeconfig, text).expect("writing the proxied kubeconfig");
        }
        let (inject, records) = mpsc::channel(65536);
        let (tx, lines) = std_mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let ready = Record::Agent(Box::new(AgentRecord::new(
            AgentAction::Ready,
            machine.summary(),
        )));
        let client_retry = !options.no_client_retry;
        let agent = thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                let mut kube_config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .expect("client config");
                kube_config.default_retry = client_retry;
                // The agent's own client builder: its User-Agent tells its requests apart.
                let client = hotplug_agent::kube_client::from_config(kube_config).expect("client");
                let mut out = Lines {
                    tx,
                    buf: Vec::new(),
                };
                let mut sinks = Sinks::new(&mut out, Format::Json);
                let shutdown = async move {
                    let _ = stopped.await;
                };
                run::control(
                    config,
                    Some(client),
                    ready,
                    records,
                    &mut sinks,
                    shutdown,
                    || {},
                )
                .await
                .map_err(|e| e.to_string())
            })
        });
        let mut h = Self {
            proxy,
            machine,
            cluster,
            inject,
            lines,
            seen: Vec::new(),
            stop: Some(stop),
            agent: Some(agent),
            gate,
            // `--shrink-policy evict` evicts with the drain-and-reset component's rights.
            rbac: if options.drain_and_reset
                || options.shrink_policy == Some(hotplug_agent::shrink::Policy::Evict)
            {
                "overlays/drain-and-reset"
            } else {
                "base"
            },
        };
        h.wait_for("the start-up reconcile", |r| {
            r["kind"] == "reconcile" && r["episode"] == 0
        });
        h
    }

    /// The machine changes: the fixture first, then the record the pipeline would make.
    fn change(&self, kind: Kind, action: Action, device: &str, to: Summary) {
        self.machine.set(to);
        let change = Change {
            source: Source::Uevent,
            kind,
            action,
            device: Some(device.into()),
            detail: Detail::None,
        };
        self.inject
            .blocking_send(Record::Event(Box::new(event_record(change, to))))
            .expect("the controller takes records");
    }

    /// Waits for a record; every record read is kept in `seen`.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(r) = self.seen.iter().find(|r| pred(r)) {
            return r.clone();
        }
        let deadline = Instant::now() + CONVERGE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(r) => {
                    self.seen.push(r.clone());
                    if pred(&r) {
                        return r;
                    }
                }
                Err(_) => panic!(
                    "no record: {what} within {CONVERGE:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    fn log(&self) -> String {
        self.seen.iter().map(|r| format!("{r}\n")).collect()
    }

    /// Waits until the Node advertises the fixture machine as it is now.
    fn wait_converged(&mut self) {
        let want = self.machine.summary();
        let node = self
            .cluster
            .rt
            .block_on(self.cluster.api.wait_node(NODE, CONVERGE, |n| {
                let Ok(node) = serde_json::from_value(n.clone()) else {
                    return false;
                };
                let Ok(adv) = hotplug_agent::reconcile::advertised(&node) else {
                    return false;
                };
                adv.memory_bytes == Some(want.memory_bytes)
                    && adv.cpu_millis == Some(u64::from(want.cpus_online) * 1000)
            }));
        drop(node);
        // And the agent said so: its verify of the final machine.
        self.wait_for("the agent's verify of the final machine", |r| {
            r["kind"] == "verify"
                && r["action"] == "converged"
                && r.get("reason").is_none()
                && r["advertised_after"]["memory_bytes"] == want.memory_bytes
                && r["advertised_after"]["cpu_millis"] == u64::from(want.cpus_online) * 1000
        });
    }

    fn records(&self, kind: &str, action: &str) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|r| r["kind"] == kind && r["action"] == action)
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(g) = self.gate.as_mut() {
            g.open();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(agent) = self.agent.take() {
            let result = agent.join();
            if !thread::panicking() {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("the controller failed: {e}; log:\n{}", self.log()),
                    Err(_) => panic!("the controller thread panicked; log:\n{}", self.log()),
                }
                hotplug_tests::rbac::assert_granted(&self.cluster.api, self.rbac);
            }
        }
    }
}

impl Machine {
    fn summary(&self) -> Summary {
        hotplug_agent::capacity::read_summary(self.root()).expect("reading the fixture")
    }
}

fn timing() -> Timing {
    Timing {
        settle: Duration::from_millis(150),
        max_wait: Duration::from_secs(1),
        in_flight_max_wait: Duration::from_secs(30),
        in_flight_stall: Duration::from_secs(2),
    }
}

/// Where in the first episode the second change lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// Before the first has settled: the two are one episode.
    Settling,
    /// Right after `episode settled`.
    Settled,
    /// Right after `reconcile stale`.
    Stale,
    /// After the kubelet restarted (it read the machine before the change), before the
    /// refresh returned.
    KubeletRestarted,
    /// Right after `refresh succeeded`, before verify saw the Node.
    RefreshSucceeded,
    /// After `verify converged`.
    Converged,
}

/// Memory grows by 1 GiB, then at `point` cpu1 goes offline. Whatever the point: the Node
/// ends at the final machine within seconds, no verify times out, no restart is wasted
/// beyond one per change.
fn second_change_at(point: Point) {
    let mut h = Harness::start(timing(), point == Point::KubeletRestarted);
    let grown = Summary {
        memory_bytes: BASE_MEMORY + GIB,
        cpus_online: 2,
    };
    let one_cpu = Summary {
        memory_bytes: BASE_MEMORY + GIB,
        cpus_online: 1,
    };
    let started = Instant::now();
    h.change(Kind::MemoryBlock, Action::Online, "memory40", grown);
    let ep1 = |r: &Value| r["episode"] == 1;
    match point {
        Point::Settling => {}
        Point::Settled => {
            h.wait_for("episode 1 settled", |r| ep1(r) && r["kind"] == "episode");
        }
        Point::Stale => {
            h.wait_for("episode 1 stale", |r| ep1(r) && r["action"] == "stale");
        }
        Point::KubeletRestarted => {
            // The restarted stand-in posted the grown machine; the refresh command is
            // still running (held at the gate).
            h.cluster
                .rt
                .block_on(h.cluster.api.wait_node(NODE, CONVERGE, |n| {
                    n["status"]["capacity"]["memory"] == "5Gi"
                }));
            assert!(
                h.records("refresh", "succeeded").is_empty(),
                "the gate should hold the refresh; log:\n{}",
                h.log()
            );
        }
        Point::RefreshSucceeded => {
            h.wait_for("refresh succeeded", |r| {
                ep1(r) && r["action"] == "succeeded"
            });
        }
        Point::Converged => {
            h.wait_for("verify converged", |r| ep1(r) && r["action"] == "converged");
        }
    }
    h.change(Kind::Cpu, Action::Offline, "cpu1", one_cpu);
    if let Some(g) = h.gate.as_mut() {
        g.open();
    }
    h.wait_converged();
    let took = started.elapsed();
    let log = h.log();
    assert!(
        h.records("verify", "timeout").is_empty(),
        "{point:?}: a verify timed out; log:\n{log}"
    );
    assert!(
        took < CONVERGE,
        "{point:?}: the Node took {took:?} to converge; log:\n{log}"
    );
    // The stand-in's first start counts as 1: at most one restart per change.
    let restarts = h.cluster.kubelet.restarts() - 1;
    assert!(
        (1..=2).contains(&restarts),
        "{point:?}: {restarts} kubelet restarts; log:\n{log}\nrestarts:\n{}",
        h.cluster.kubelet.restarts_log()
    );
    if point == Point::KubeletRestarted {
        // The kubelet read the machine before cpu1 left: verify accepted that, said so,
        // and the next episode restarted it again.
        h.wait_for("episode 1 converged on what the kubelet read", |r| {
            r["episode"] == 1
                && r["kind"] == "verify"
                && r["action"] == "converged"
                && r["reason"] == "machine_moved"
        });
        assert_eq!(restarts, 2, "log:\n{log}");
    }
    eprintln!("{point:?}: converged in {took:?} with {restarts} restart(s)");
}

#[test]
fn second_change_while_the_first_settles() {
    second_change_at(Point::Settling);
}

#[test]
fn second_change_after_the_episode_settled() {
    second_change_at(Point::Settled);
}

#[test]
fn second_change_after_reconcile() {
    second_change_at(Point::Stale);
}

#[test]
fn second_change_while_the_kubelet_restarts() {
    second_change_at(Point::KubeletRestarted);
}

#[test]
fn second_change_right_after_the_refresh() {
    second_change_at(Point::RefreshSucceeded);
}

#[test]
fn second_change_after_verify() {
    second_change_at(Point::Converged);
}

/// The incident at its own scale, in-process: 512 `add`s at once, then the blocks come
/// online one by one for longer than `max_wait` (1 s here). One episode that waited for
/// the blocks, one restart, verify on the final capacity, nothing cut by the bound.
#[test]
fn a_512_block_dimm_onlined_slowly_is_one_episode_and_one_restart() {
    let mut h = Harness::start(timing(), false);
    let base = h.machine.summary();
    for n in 0..512 {
        h.change(
            Kind::MemoryBlock,
            Action::Add,
            &format!("memory{}", 32 + n),
            base,
        );
    }
    let started = Instant::now();
    for n in 0..512u64 {
        // 512 × 4 ms ≈ 2 s of onlining: twice the bound of an episode without blocks.
        thread::sleep(Duration::from_millis(4));
        let now = Summary {
            memory_bytes: base.memory_bytes + (n + 1) * BLOCK,
            ..base
        };
        h.change(
            Kind::MemoryBlock,
            Action::Online,
            &format!("memory{}", 32 + n),
            now,
        );
    }
    let onlining = started.elapsed();
    assert!(
        onlining > timing().max_wait,
        "onlining took only {onlining:?}"
    );
    h.wait_converged();
    let log = h.log();
    let episodes = h.records("episode", "settled");
    let burst: Vec<_> = episodes
        .iter()
        .filter(|r| r["trigger"] == "events")
        .collect();
    assert_eq!(burst.len(), 1, "one episode for the DIMM; log:\n{log}");
    assert_eq!(burst[0]["events"], 1024);
    assert_eq!(burst[0]["blocks_added"], 512);
    assert_eq!(burst[0]["blocks_pending"], 0);
    assert!(burst[0].get("reason").is_none(), "not cut: {}", burst[0]);
    assert_eq!(h.cluster.kubelet.restarts() - 1, 1, "log:\n{log}");
    assert!(h.records("verify", "timeout").is_empty(), "log:\n{log}");
    let converged = h.records("verify", "converged");
    assert_eq!(converged.len(), 1, "log:\n{log}");
    assert!(converged[0].get("reason").is_none(), "{}", converged[0]);
    assert_eq!(
        converged[0]["advertised_after"]["memory_bytes"],
        base.memory_bytes + 512 * BLOCK
    );
}

/// A server that accepts and never answers (issue: the controller waited 14 minutes, then
/// compared a 14-minute-old snapshot and restarted the kubelet for nothing). Every call has
/// a deadline: the hang becomes `api_unreachable` within the API timeout, the machine
/// changes back meanwhile, and when the API answers again the agent compares the machine
/// of *then*: in sync, no restart.
#[test]
fn a_hanging_api_is_reported_and_a_stale_snapshot_never_acted_on() {
    let mut h = Harness::start_with(Options {
        proxy: true,
        ..Options::default()
    });
    let base = h.machine.summary();
    h.proxy.as_ref().expect("proxy").freeze(true);
    let started = Instant::now();
    let one_cpu = Summary {
        cpus_online: 1,
        ..base
    };
    h.change(Kind::Cpu, Action::Offline, "cpu1", one_cpu);
    h.wait_for("api_unreachable", |r| r["action"] == "api_unreachable");
    let noticed = started.elapsed();
    assert!(
        noticed < API_TIMEOUT + Duration::from_secs(3),
        "the hang was noticed after {noticed:?}"
    );
    // Still hung: cpu1 comes back.
    h.change(Kind::Cpu, Action::Online, "cpu1", base);
    h.proxy.as_ref().expect("proxy").freeze(false);
    h.wait_for("api_reachable", |r| r["action"] == "api_reachable");
    h.wait_for("a reconcile after the API came back", |r| {
        r["kind"] == "reconcile" && r["action"] == "in_sync" && r["episode"] != 0
    });
    let log = h.log();
    assert!(h.records("reconcile", "stale").is_empty(), "log:\n{log}");
    assert!(h.records("refresh", "started").is_empty(), "log:\n{log}");
    assert_eq!(h.cluster.kubelet.restarts(), 1, "no restart; log:\n{log}");
    eprintln!("hang noticed after {noticed:?}");
}

/// The API answers 404 for the agent's Node (not registered yet, deleted, a wrong
/// --node-name): said once as that, never as an unreachable API, which it is not.
#[test]
fn a_missing_node_is_reported_as_missing_not_as_an_unreachable_api() {
    let mut h = Harness::start_with(Options {
        node_name: Some("no-such-node"),
        ..Options::default()
    });
    let r = h.wait_for("the start-up reconcile", |r| {
        r["kind"] == "reconcile" && r["episode"] == 0
    });
    let log = h.log();
    assert_eq!(r["action"], "failed", "log:\n{log}");
    assert_eq!(r["reason"], "node_not_found", "log:\n{log}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"no-such-node\"")),
        "log:\n{log}"
    );
    // A change meanwhile: the Node is still missing, and that is not said again.
    let base = h.machine.summary();
    h.change(
        Kind::Cpu,
        Action::Offline,
        "cpu1",
        Summary {
            cpus_online: 1,
            ..base
        },
    );
    h.wait_for("the episode", |r| {
        r["kind"] == "episode" && r["episode"] == 1
    });
    let log = h.log();
    assert!(
        h.records("reconcile", "api_unreachable").is_empty(),
        "log:\n{log}"
    );
    assert_eq!(h.records("reconcile", "failed").len(), 1, "log:\n{log}");
}

/// After the hourly cap deferred a refresh, someone restarts the kubelet by hand: the
/// agent notices on the Node (watched) and says in sync at once, instead of keeping the
/// node stale for up to an hour.
#[test]
fn a_node_fixed_by_hand_during_a_deferral_is_seen_at_once() {
    let mut h = Harness::start_with(Options {
        guard: Some(GuardConfig {
            max_per_hour: 1,
            ..GuardConfig::default()
        }),
        ..Options::default()
    });
    let base = h.machine.summary();
    let grown = Summary {
        memory_bytes: base.memory_bytes + GIB,
        ..base
    };
    h.change(Kind::MemoryBlock, Action::Online, "memory40", grown);
    h.wait_for("episode 1 converged", |r| {
        r["episode"] == 1 && r["kind"] == "verify" && r["action"] == "converged"
    });
    let one_cpu = Summary {
        cpus_online: 1,
        ..grown
    };
    h.change(Kind::Cpu, Action::Offline, "cpu1", one_cpu);
    let deferred = h.wait_for("the hourly cap", |r| {
        r["action"] == "deferred" && r["reason"] == "hourly_cap"
    });
    let episode = deferred["episode"].clone();
    let started = Instant::now();
    h.cluster.kubelet.restart();
    h.wait_for("in sync after the manual restart", |r| {
        r["episode"] == episode && r["kind"] == "reconcile" && r["action"] == "in_sync"
    });
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "seen after {took:?}");
    // One restart by the agent, one by hand, after the first start.
    assert_eq!(h.cluster.kubelet.restarts(), 3, "log:\n{}", h.log());
}

/// The pipeline's task ends (it panicked): the controller must not stay up doing nothing.
/// It stops with a `stopped` record and an error, so the process exits non-zero and
/// systemd or the kubelet restarts it.
#[test]
fn a_pipeline_that_stops_ends_the_agent_with_an_error() {
    let mut h = Harness::start(timing(), false);
    let (dead, _) = mpsc::channel(1);
    drop(std::mem::replace(&mut h.inject, dead));
    h.wait_for("the stopped record", |r| {
        r["kind"] == "agent" && r["action"] == "stopped"
    });
    let result = h
        .agent
        .take()
        .expect("agent thread")
        .join()
        .expect("no panic");
    let err = result.expect_err("the controller must fail");
    assert!(err.contains("the event pipeline stopped"), "{err}");
}

impl Harness {
    /// Waits until the agent's condition on the Node has this status and reason.
    fn wait_condition(&self, status: &str, reason: &str) {
        self.cluster
            .rt
            .block_on(self.cluster.api.wait_node(NODE, CONVERGE, |n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        c["type"] == hotplug_agent::node::CONDITION
                            && c["status"] == status
                            && c["reason"] == reason
                    })
            }));
    }

    /// No refresh was skipped (no guard rail, pause, stand-down or shrink refusal).
    /// Waits for a Warning Event with `reason` on the API.
    fn wait_warning(&self, reason: &str) -> Value {
        self.cluster
            .rt
            .block_on(self.cluster.api.wait_event(CONVERGE, |e| {
                e["reason"] == reason && e["type"] == "Warning"
            }))
    }

    fn assert_nothing_skipped(&self) {
        assert!(
            self.records("refresh", "skipped").is_empty(),
            "log:\n{}",
            self.log()
        );
    }

    /// The Events posted for the Node with this reason.
    fn events(&self, reason: &str) -> Vec<Value> {
        self.cluster
            .api
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    fn cpu1_offline(&self) {
        let base = self.machine.summary();
        let one_cpu = Summary {
            cpus_online: 1,
            ..base
        };
        self.change(Kind::Cpu, Action::Offline, "cpu1", one_cpu);
    }
}

/// A refresh that fails: recorded with the command's exit, a Warning Event, the condition
/// says RefreshFailed, and the kubelet is left as it was.
#[test]
fn a_failing_refresh_is_recorded_warned_and_set_on_the_node() {
    let mut h = Harness::start_with(Options {
        refresh: Some((vec!["/bin/false".into()], Duration::from_secs(10))),
        ..Options::default()
    });
    h.cpu1_offline();
    let failed = h.wait_for("refresh failed", |r| {
        r["kind"] == "refresh" && r["action"] == "failed"
    });
    assert!(
        failed["message"].as_str().unwrap_or("").contains("exit"),
        "{failed}"
    );
    h.wait_warning("KubeletRefreshFailed");
    h.wait_condition("True", "RefreshFailed");
    assert_eq!(h.cluster.kubelet.restarts(), 1);
}

/// A refresh that hangs is ended at its timeout and recorded as failed.
#[test]
fn a_hanging_refresh_is_ended_at_its_timeout() {
    let mut h = Harness::start_with(Options {
        refresh: Some((
            vec!["/bin/sleep".into(), "600".into()],
            Duration::from_secs(1),
        )),
        ..Options::default()
    });
    h.cpu1_offline();
    let started = h.wait_for("refresh started", |r| r["action"] == "started");
    assert_eq!(started["backend"], "command");
    let t = Instant::now();
    let failed = h.wait_for("refresh failed", |r| {
        r["kind"] == "refresh" && r["action"] == "failed"
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "ended after {took:?}");
    let message = failed["message"].as_str().unwrap_or("");
    assert!(
        message.contains("1s") || message.contains("time"),
        "{failed}"
    );
}

/// A refresh that "works" but the kubelet never picks anything up: verify times out at
/// its deadline with a Warning Event and the condition RefreshNotConverged.
#[test]
fn a_node_that_never_converges_times_out_verify() {
    let mut h = Harness::start_with(Options {
        refresh: Some((vec!["/bin/true".into()], Duration::from_secs(10))),
        verify_timeout: Some(Duration::from_secs(2)),
        ..Options::default()
    });
    h.cpu1_offline();
    h.wait_for("refresh succeeded", |r| r["action"] == "succeeded");
    let t = Instant::now();
    let timeout = h.wait_for("verify timeout", |r| {
        r["kind"] == "verify" && r["action"] == "timeout"
    });
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "timed out after {took:?}: {timeout}"
    );
    h.wait_warning("CapacityNotConverged");
    h.wait_condition("True", "RefreshNotConverged");
    assert!(h.events("CapacityConverged").is_empty());
}

/// A static CPU manager whose checkpoint no longer matches the machine: with the default
/// policy (`refuse`) the kubelet is not restarted (it would crash-loop); a Warning says
/// what to do and the condition names the checkpoint.
#[test]
fn a_static_cpu_manager_checkpoint_blocks_the_restart() {
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        ..Options::default()
    });
    h.cpu1_offline();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "static_policy", "{skipped}");
    h.wait_warning("StaticPolicyBlocksRefresh");
    h.wait_condition("True", "StaticPolicyCheckpoint");
    assert_eq!(h.cluster.kubelet.restarts(), 1, "log:\n{}", h.log());
    assert!(h.records("refresh", "started").is_empty());
}

/// The API server goes away mid-episode: reconcile says `api_unreachable` once (not once per
/// retry), and when the server is back the episode converges with one restart.
#[test]
fn an_api_outage_is_said_once_and_the_episode_converges_when_it_returns() {
    let mut h = Harness::start(timing(), false);
    h.cluster.rt.block_on(h.cluster.api.stop());
    h.cpu1_offline();
    h.wait_for("api_unreachable", |r| {
        r["kind"] == "reconcile" && r["action"] == "api_unreachable"
    });
    h.cluster.rt.block_on(h.cluster.api.restart());
    h.wait_for("api_reachable", |r| {
        r["kind"] == "reconcile" && r["action"] == "api_reachable"
    });
    h.wait_converged();
    assert_eq!(
        h.records("reconcile", "api_unreachable").len(),
        1,
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
}

/// The Node converged but the pods' cgroup memory limit stayed where it was (a kubelet
/// that did not resize its `kubepods` cgroup): verify records the check as failed, a
/// Warning says so, and the condition stays stale.
#[test]
fn a_pods_cgroup_limit_that_did_not_move_is_warned() {
    let stuck = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(stuck.path().join("kubepods.slice")).expect("cgroup fixture");
    fs::write(
        stuck.path().join("kubepods.slice/memory.max"),
        "3221225472\n",
    )
    .expect("cgroup fixture");
    let mut h = Harness::start_with(Options {
        cgroup_root: Some(stuck.path().to_owned()),
        ..Options::default()
    });
    let base = h.machine.summary();
    h.change(
        Kind::MemoryBlock,
        Action::Online,
        "memory40",
        Summary {
            memory_bytes: base.memory_bytes + (1 << 30),
            ..base
        },
    );
    let verify = h.wait_for("verify converged", |r| {
        r["kind"] == "verify" && r["action"] == "converged"
    });
    assert_eq!(verify["cgroup"]["ok"], false, "{verify}");
    assert_eq!(verify["cgroup"]["before"], 3_221_225_472u64, "{verify}");
    assert_eq!(verify["cgroup"]["after"], 3_221_225_472u64, "{verify}");
    h.wait_warning("PodsCgroupLimitStale");
    h.wait_condition("True", "PodsCgroupLimitStale");
}

/// `update-in-place` with a CPU added: the checkpoint is rewritten (the new CPU joins the
/// shared pool, the pinned CPU stays with its pod), the stand-in — validating the
/// checkpoint as the kubelet does — restarts once and accepts it, the Node converges, the
/// old file is kept, and the records and the Event say what changed.
#[test]
fn update_in_place_adds_a_new_cpu_to_the_shared_pool_with_one_restart() {
    const STATE: &str = r#"{"policyName":"static","defaultCpuSet":"0","entries":{"pod-a":{"app":"1"}},"checksum":0}"#;
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(STATE),
        static_policy: Some(StaticPolicy::UpdateInPlace),
        validating_standin: true,
        ..Options::default()
    });
    let three = Summary {
        cpus_online: 3,
        ..h.machine.summary()
    };
    // The pinned container's cgroup, as the systemd driver lays it out.
    let scope = h
        .cluster
        .path("cgroup/kubepods.slice/kubepods-podpod_a.slice/cri-containerd-0123.scope");
    fs::create_dir_all(&scope).expect("mkdir");
    fs::write(format!("{scope}/cpuset.cpus"), "1\n").expect("cpuset");
    h.change(Kind::Cpu, Action::Online, "cpu2", three);
    let rewritten = h.wait_for("checkpoint rewritten", |r| {
        r["kind"] == "reset" && r["action"] == "checkpoint_rewritten"
    });
    let change = &rewritten["checkpoint"];
    assert_eq!(
        (change["before"].as_str(), change["after"].as_str()),
        (Some("0"), Some("0,2")),
        "{rewritten}"
    );
    h.wait_for("kubelet started", |r| {
        r["kind"] == "reset" && r["action"] == "kubelet_started"
    });
    let kept = h.wait_for("cpusets checked", |r| {
        r["kind"] == "reset" && r["action"] == "cpusets_unchanged"
    });
    assert_eq!(
        kept["message"], "1 container cgroups of 1 pinned pods keep their cpuset.cpus",
        "{kept}"
    );
    h.wait_converged();
    assert_eq!(
        h.cluster.kubelet.restarts(),
        2,
        "one restart; log:\n{}",
        h.cluster.kubelet.log()
    );
    assert!(
        h.cluster
            .kubelet
            .log()
            .contains("cpu_manager_state accepted: policy static defaultCpuSet \"0,2\""),
        "the restarted stand-in validated the new file:\n{}",
        h.cluster.kubelet.log()
    );
    let path = h.cluster.path("kubelet-root/cpu_manager_state");
    let file = hotplug_agent::checkpoint::format::parse_cpu(&fs::read(&path).expect("checkpoint"))
        .expect("parses");
    assert_eq!(file.state.default_cpu_set, "0,2");
    assert_eq!(
        file.checksum.stored, file.checksum.computed,
        "the kubelet's checksum"
    );
    assert_ne!(file.checksum.stored, 0);
    let pinned = &file.state.entries.as_ref().expect("entries")["pod-a"]["app"];
    assert_eq!(pinned, "1", "the exclusive assignment did not move");
    let backup = change["backup"].as_str().expect("a backup");
    assert_eq!(fs::read_to_string(backup).expect("backup kept"), STATE);
    h.cluster
        .rt
        .block_on(h.cluster.api.wait_event(CONVERGE, |e| {
            e["reason"] == "KubeletCheckpointUpdated"
                && e["type"] == "Normal"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("CPUs 2 join the shared pool")
        }));
    h.assert_nothing_skipped();
}

/// `update-in-place` when the CPU that went away is pinned to a pod: nothing is written,
/// the kubelet is not restarted, and the refusal (with why) is the Warning.
#[test]
fn update_in_place_never_touches_a_pinned_cpu_and_falls_back_to_refuse() {
    const STATE: &str = r#"{"policyName":"static","defaultCpuSet":"0","entries":{"pod-a":{"app":"1"}},"checksum":0}"#;
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(STATE),
        static_policy: Some(StaticPolicy::UpdateInPlace),
        validating_standin: true,
        ..Options::default()
    });
    h.cpu1_offline();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "static_policy", "{skipped}");
    let message = skipped["message"].as_str().unwrap_or("");
    assert!(
        message.contains("update-in-place not possible")
            && message.contains(
                "CPUs 1 went away but are exclusively assigned to pod pod-a container app"
            ),
        "{skipped}"
    );
    assert_eq!(h.cluster.kubelet.restarts(), 1);
    let path = h.cluster.path("kubelet-root/cpu_manager_state");
    assert_eq!(
        fs::read_to_string(&path).expect("checkpoint"),
        STATE,
        "not rewritten"
    );
    assert!(h.records("reset", "checkpoint_rewritten").is_empty());
}

/// `update-in-place` with memory added to a Static memory manager node: the new memory
/// joins node 0's table (total, allocatable and free grow; the pod's reservation stays),
/// the validating stand-in restarts once and accepts it, and the Node converges.
#[test]
fn update_in_place_adds_hot_added_memory_to_its_numa_node() {
    let reserved = 100u64 << 20;
    let pinned = GIB;
    let table = |total: u64| {
        format!(
            r#"{{"total":{total},"systemReserved":{reserved},"allocatable":{a},"reserved":{pinned},"free":{f}}}"#,
            a = total - reserved,
            f = total - reserved - pinned
        )
    };
    let state = format!(
        r#"{{"policyName":"Static","machineState":{{"0":{{"numberOfAssignments":1,"memoryMap":{{"memory":{}}},"cells":[0]}}}},"entries":{{"pod-m":{{"db":[{{"numaAffinity":[0],"type":"memory","size":{pinned}}}]}}}},"checksum":0}}"#,
        table(BASE_MEMORY)
    );
    let mut h = Harness::start_with(Options {
        memory_manager_state: Some(state.clone()),
        static_policy: Some(StaticPolicy::UpdateInPlace),
        validating_standin: true,
        ..Options::default()
    });
    let grown = Summary {
        memory_bytes: BASE_MEMORY + BLOCK,
        ..h.machine.summary()
    };
    h.change(Kind::MemoryBlock, Action::Online, "memory40", grown);
    let rewritten = h.wait_for("checkpoint rewritten", |r| {
        r["kind"] == "reset" && r["action"] == "checkpoint_rewritten"
    });
    assert_eq!(rewritten["checkpoint"]["manager"], "memory", "{rewritten}");
    assert_eq!(
        rewritten["checkpoint"]["after"],
        format!("node0={}", BASE_MEMORY + BLOCK),
        "{rewritten}"
    );
    h.wait_converged();
    assert_eq!(
        h.cluster.kubelet.restarts(),
        2,
        "log:\n{}",
        h.cluster.kubelet.log()
    );
    assert!(
        h.cluster
            .kubelet
            .log()
            .contains("memory_manager_state accepted: policy Static"),
        "{}",
        h.cluster.kubelet.log()
    );
    let path = h.cluster.path("kubelet-root/memory_manager_state");
    let file = hotplug_agent::checkpoint::format::parse_memory(&fs::read(&path).expect("read"))
        .expect("parses");
    assert!(
        file.checksum.valid && file.checksum.stored != 0,
        "{:?}",
        file.checksum
    );
    let node = file.state.machine_state.as_ref().expect("nodes")[&0]
        .clone()
        .expect("node 0");
    let memory = node.memory_map.as_ref().expect("tables")["memory"].expect("memory");
    assert_eq!(
        (memory.total, memory.reserved, memory.free),
        (
            BASE_MEMORY + BLOCK,
            pinned,
            BASE_MEMORY + BLOCK - reserved - pinned
        )
    );
}

/// A kubelet restart waits for a slot of the fleet's restart budget (held here by another
/// node), records the wait once (`refresh` `deferred`, reason `fleet_budget`, who holds the
/// slots), starts as soon as the slot is given back (the release is watched, not waited
/// out), and gives the slot back once verify converged.
#[test]
fn a_restart_waits_for_a_fleet_budget_slot_and_gives_it_back_after_verify() {
    use hotplug_agent::fleet::{self, Limit};
    let config = fleet::Config {
        namespace: None,
        restarts: Limit::Count(1),
        drains: Limit::Count(1),
        lease_duration: Duration::from_secs(30),
    };
    let mut h = Harness::start_with(Options {
        fleet: Some(config.clone()),
        ..Options::default()
    });
    // Another node is restarting its kubelet: it holds the only slot.
    let other = h.other_node_takes_the_restart_slot(&config);
    let restarts = h.cluster.kubelet.restarts();
    let base = h.machine.summary();
    let grown = Summary {
        memory_bytes: base.memory_bytes + GIB,
        ..base
    };
    h.change(Kind::MemoryBlock, Action::Online, "memory40", grown);
    let deferred = h.wait_for("the wait for a slot", |r| {
        r["kind"] == "refresh" && r["action"] == "deferred" && r["reason"] == "fleet_budget"
    });
    assert_eq!(deferred["fleet"]["budget"], "restart", "{deferred}");
    assert_eq!(deferred["fleet"]["slots"], 1);
    assert_eq!(
        deferred["fleet"]["holders"],
        serde_json::json!(["other-node"])
    );
    assert!(
        h.records("refresh", "started").is_empty(),
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), restarts);

    let released = Instant::now();
    h.cluster
        .rt
        .block_on(other.release())
        .expect("the other node gives its slot back");
    let started = h.wait_for("the restart", |r| {
        r["kind"] == "refresh" && r["action"] == "started"
    });
    let took = released.elapsed();
    // Watched: well before the 30 s lease would have expired.
    assert!(
        took < Duration::from_secs(5),
        "started {took:?} after the release"
    );
    assert_eq!(
        started["fleet"]["lease"], "hotplug-agent-restart-0",
        "{started}"
    );
    assert!(
        started["fleet"]["waited_ms"].as_u64().is_some(),
        "{started}"
    );
    h.wait_converged();
    h.cluster.rt.block_on(h.cluster.api.wait_until(
        "the slot given back after verify",
        CONVERGE,
        |api| {
            let lease = api.lease("default", "hotplug-agent-restart-0")?;
            lease["spec"]
                .get("holderIdentity")
                .is_none_or(serde_json::Value::is_null)
                .then_some(())
        },
    ));
    // Said once, not at every retry.
    assert_eq!(
        h.records("refresh", "deferred").len(),
        1,
        "log:\n{}",
        h.log()
    );
}

impl Harness {
    /// Another node (`other-node`) takes the only slot of the fleet's restart budget, as
    /// its agent would before restarting its kubelet.
    fn other_node_takes_the_restart_slot(
        &self,
        config: &hotplug_agent::fleet::Config,
    ) -> hotplug_agent::fleet::Slot {
        use hotplug_agent::fleet::{Attempt, Fleet};
        let client = self.client();
        self.cluster.rt.block_on(async {
            let mut budget = Fleet::new(client, config, "other-node", API_TIMEOUT).restarts;
            match budget.try_take().await.expect("the API answers") {
                Attempt::Held(slot) => slot,
                Attempt::Full(_) => panic!("the only slot is free"),
            }
        })
    }

    /// A merge patch on the Node, as an operator's `kubectl annotate`/`cordon` would.
    fn patch_node(&self, patch: serde_json::Value) {
        let client = self.client();
        self.cluster.rt.block_on(async {
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
            nodes
                .patch(
                    NODE,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .expect("patching the Node");
        });
    }
}

/// An operator's pause annotation: the agent reports the stale Node and restarts nothing.
#[test]
fn a_paused_node_is_reported_and_not_acted_on() {
    let mut h = Harness::start_with(Options::default());
    h.patch_node(serde_json::json!({"metadata": {"annotations": {"hotplug-agent.io/paused": "maintenance"}}}));
    h.cpu1_offline();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "paused", "{skipped}");
    assert!(
        h.records("reconcile", "stale").len() == 1,
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), 1, "log:\n{}", h.log());
}

/// drain-and-reset respects the operator: a Node cordoned by someone else stays cordoned
/// after the reset; the agent's own cordon is marked on the Node and lifted at the end.
fn reset_with_cordon(cordoned_before: bool) {
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        drain_and_reset: true,
        ..Options::default()
    });
    if cordoned_before {
        h.patch_node(serde_json::json!({"spec": {"unschedulable": true}}));
    }
    h.cpu1_offline();
    h.wait_converged();
    let steps: Vec<String> = h
        .seen
        .iter()
        .filter(|r| r["kind"] == "reset")
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    let last = if cordoned_before {
        "left_cordoned"
    } else {
        "uncordoned"
    };
    assert_eq!(
        steps,
        [
            "started",
            "cordoned",
            "kubelet_stopped",
            "checkpoint_moved",
            "kubelet_started",
            "node_ready",
            last
        ],
        "log:\n{}",
        h.log()
    );
    let node = h.cluster.api.node(NODE).expect("node");
    assert_eq!(
        node["spec"]["unschedulable"] == true,
        cordoned_before,
        "{node}"
    );
    assert!(
        node["metadata"]["annotations"]
            .get("hotplug-agent.io/cordoned")
            .is_none(),
        "the agent's mark is gone with its cordon: {node}"
    );
    // The agent's cordon was marked while it held (the reset's own PATCH).
    let marked = h
        .cluster
        .api
        .requests()
        .iter()
        .filter(|(m, p)| {
            m == "PATCH"
                && p.starts_with(&format!("/api/v1/nodes/{NODE}"))
                && !p.contains("/status")
        })
        .count();
    // And one more: the agent's initial-capacity annotation, before its first change.
    assert_eq!(
        marked,
        if cordoned_before { 2 } else { 3 },
        "cordon+uncordon by the agent, or only the operator's; and the initial capacity"
    );
}

#[test]
fn drain_and_reset_leaves_an_operators_cordon_in_place() {
    reset_with_cordon(true);
}

#[test]
fn drain_and_reset_lifts_only_its_own_cordon() {
    reset_with_cordon(false);
}

/// drain-and-reset waits for the Ready of the kubelet it started, not the one it stopped.
/// The API keeps heartbeats to the second, and here the stopped stand-in's last post is
/// made in the very second the new one is started, while the new one posts only 2 s
/// later: a Ready taken "from the start's second on" would be the stopped kubelet's, and
/// the Node uncordoned before any kubelet runs.
#[test]
fn drain_and_reset_waits_for_the_started_kubelets_own_ready() {
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        drain_and_reset: true,
        racy_restart: true,
        ..Options::default()
    });
    h.cpu1_offline();
    h.wait_converged();
    let time = |r: &Value| -> k8s_openapi::jiff::Timestamp {
        r["time"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time: {r}"))
    };
    let started = h.wait_for("kubelet_started", |r| {
        r["kind"] == "reset" && r["action"] == "kubelet_started"
    });
    let ready = h.wait_for("node_ready", |r| {
        r["kind"] == "reset" && r["action"] == "node_ready"
    });
    // The new stand-in's start-up: the last line of the restarts log (to the second).
    let log = h.cluster.kubelet.restarts_log();
    let came_up: k8s_openapi::jiff::Timestamp = log
        .lines()
        .last()
        .and_then(|l| l.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no start-up in the restarts log:\n{log}"));
    assert_eq!(h.cluster.kubelet.restarts(), 2, "restarts log:\n{log}");
    assert!(
        time(&ready) >= came_up,
        "node_ready at {} before the started kubelet came up at {came_up} (started at {}); log:\n{}",
        time(&ready),
        time(&started),
        h.log()
    );
    let uncordoned = h.wait_for("uncordoned", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    assert!(time(&uncordoned) >= came_up);
}

const INITIAL_CAPACITY: &str = "hotplug-agent.io/initial-capacity";

impl Harness {
    /// The ready record the controller wrote first.
    fn ready(&mut self) -> Value {
        self.wait_for("the ready record", |r| {
            r["kind"] == "agent" && r["action"] == "ready"
        })
    }

    /// The agent's non-status PATCHes of the Node so far.
    fn node_patches(&self) -> usize {
        self.cluster
            .api
            .requests()
            .iter()
            .filter(|(m, p)| {
                m == "PATCH"
                    && p.starts_with(&format!("/api/v1/nodes/{NODE}"))
                    && !p.contains("/status")
            })
            .count()
    }

    fn annotation(&self, key: &str) -> Option<String> {
        let node = self.cluster.api.node(NODE).expect("node");
        node["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }
}

/// The kubelet's config turns `InPlaceNodeResourceResize` on: the kubelet resizes the Node
/// itself, so the agent says so once at start-up (ready record, a Normal Event), reports
/// the stale Node, and neither restarts the kubelet nor writes on the Node.
#[test]
fn with_the_upstream_resize_gate_on_the_agent_only_reports() {
    let mut h = Harness::start_with(Options {
        kubelet_config: Some(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             featureGates:\n  InPlaceNodeResourceResize: true\n",
        ),
        ..Options::default()
    });
    let ready = h.ready();
    assert_eq!(ready["kubelet_config"]["upstream_resize"], true, "{ready}");
    assert_eq!(ready["kubelet_config"]["found"], true, "{ready}");
    let event = h.cluster.rt.block_on(
        h.cluster
            .api
            .wait_event(CONVERGE, |e| e["reason"] == "UpstreamNodeResizeEnabled"),
    );
    assert!(
        event["message"]
            .as_str()
            .unwrap_or("")
            .contains("InPlaceNodeResourceResize"),
        "{event}"
    );
    h.cpu1_offline();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "upstream_resize", "{skipped}");
    assert_eq!(
        h.records("reconcile", "stale").len(),
        1,
        "log:\n{}",
        h.log()
    );
    assert!(
        h.records("refresh", "started").is_empty(),
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), 1, "log:\n{}", h.log());
    assert_eq!(h.node_patches(), 0, "nothing written on the Node");
    assert_eq!(
        h.cluster
            .api
            .events()
            .iter()
            .filter(|e| e["reason"] == "UpstreamNodeResizeEnabled")
            .count(),
        1,
        "said once"
    );
}

/// A kubelet config that is not YAML is said (in the ready record, with the file) and
/// ignored: the agent restarts the kubelet as it would without the file.
#[test]
fn a_garbled_kubelet_config_is_reported_and_ignored() {
    let mut h = Harness::start_with(Options {
        kubelet_config: Some("featureGates: [InPlaceNodeResourceResize: true\n  : : :\n"),
        ..Options::default()
    });
    let ready = h.ready();
    let status = &ready["kubelet_config"];
    assert_eq!(status["upstream_resize"], false, "{ready}");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or("")
            .contains("config.yaml"),
        "{ready}"
    );
    h.cpu1_offline();
    h.wait_converged();
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    h.assert_nothing_skipped();
}

/// The Node's capacity as first seen is written once before the agent's first restart
/// (its value is the capacity before the change), and neither a second episode nor an
/// operator's own value is overwritten.
#[test]
fn the_initial_capacity_is_annotated_once_before_the_first_restart() {
    let mut h = Harness::start_with(Options::default());
    let before = h.cluster.api.node(NODE).expect("node")["status"]["capacity"].clone();
    assert_eq!(
        h.annotation(INITIAL_CAPACITY),
        None,
        "not before any change"
    );
    let ready = h.ready();
    assert_eq!(ready["kubelet_config"]["found"], false, "{ready}");
    let base = h.machine.summary();
    h.cpu1_offline();
    h.wait_converged();
    let written = h.annotation(INITIAL_CAPACITY).expect("written");
    let value: Value = serde_json::from_str(&written).expect("JSON");
    assert_eq!(
        value,
        serde_json::json!({"cpu": before["cpu"], "memory": before["memory"]}),
        "the capacity before the restart, not after"
    );
    assert_eq!(value["cpu"], "2");
    assert_eq!(h.node_patches(), 1);
    // A second episode: the kubelet restarts again, the annotation stays as it was.
    h.change(Kind::Cpu, Action::Online, "cpu1", base);
    h.wait_converged();
    assert_eq!(h.cluster.kubelet.restarts(), 3, "log:\n{}", h.log());
    assert_eq!(
        h.annotation(INITIAL_CAPACITY).as_deref(),
        Some(written.as_str())
    );
    assert_eq!(h.node_patches(), 1, "written once");
}

/// An annotation already on the Node (an operator's, or a previous agent's) is kept.
#[test]
fn an_initial_capacity_already_on_the_node_is_never_overwritten() {
    let mut h = Harness::start_with(Options::default());
    let theirs = r#"{"cpu":"8","memory":"32Gi"}"#;
    h.patch_node(serde_json::json!({"metadata": {"annotations": {INITIAL_CAPACITY: theirs}}}));
    h.cpu1_offline();
    h.wait_converged();
    assert_eq!(h.annotation(INITIAL_CAPACITY).as_deref(), Some(theirs));
    assert_eq!(h.node_patches(), 1, "only the operator's own PATCH");
}

// Safe shrink (agent/src/shrink.rs, run/shrink.rs): before a restart on a smaller machine
// the pods are held against the allocatable after it. The pods' cgroup tree is a fixture in
// the cluster's scratch dir (`cgroup`, where the stand-in writes the kubepods limit), the
// pods live in the fake API. The stand-in reserves 100 MiB: on a 3 GiB machine the Node
// will advertise 2972 MiB allocatable.

const MIB: u64 = 1 << 20;

impl Harness {
    /// One 1 GiB memory block range goes offline: 4 GiB -> 3 GiB.
    fn memory_offline_1gib(&self) {
        let base = self.machine.summary();
        self.change(
            Kind::MemoryBlock,
            Action::Offline,
            "memory31",
            Summary {
                memory_bytes: base.memory_bytes - GIB,
                ..base
            },
        );
    }

    /// A running pod on the Node; returns its UID.
    fn add_pod(&self, name: &str, priority: i32, memory_request: &str) -> String {
        self.cluster.api.add_pod(serde_json::json!({
            "metadata": {"name": name, "namespace": "work"},
            "spec": {
                "nodeName": NODE,
                "priority": priority,
                "containers": [{"name": "c", "image": "x",
                    "resources": {"requests": {"memory": memory_request}}}],
            },
            "status": {"phase": "Running"},
        }));
        self.cluster.api.pod("work", name).expect("the pod")["metadata"]["uid"]
            .as_str()
            .expect("a uid")
            .to_owned()
    }

    /// The pods' cgroup (v2, systemd driver) using `total` bytes, with each pod's own
    /// cgroup (Burstable) using its share.
    fn pods_cgroup(&self, total: u64, pods: &[(&str, u64)]) {
        let root = PathBuf::from(self.cluster.path("cgroup/kubepods.slice"));
        fs::write(root.join("memory.current"), format!("{total}\n")).expect("cgroup fixture");
        fs::write(root.join("memory.stat"), "anon 1\ninactive_file 0\n").expect("cgroup fixture");
        for (uid, bytes) in pods {
            let dir = root.join(format!(
                "kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ));
            fs::create_dir_all(&dir).expect("cgroup fixture");
            fs::write(dir.join("memory.current"), format!("{bytes}\n")).expect("cgroup fixture");
        }
    }

    fn steps(&self, reason: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|r| r["kind"] == "reset" && r["reason"] == reason)
            .map(|r| match r["action"].as_str().unwrap_or_default() {
                "evicted" => format!("evicted {}", r["message"].as_str().unwrap_or_default()),
                a => a.to_owned(),
            })
            .collect()
    }

    fn node_cordoned(&self) -> bool {
        let node = self.cluster.api.node(NODE).expect("node");
        node["spec"]["unschedulable"] == true
            || node["metadata"]["annotations"]
                .get("hotplug-agent.io/cordoned")
                .is_some()
    }

    fn client(&self) -> kube::Client {
        let kubeconfig = PathBuf::from(self.cluster.path("kubeconfig"));
        self.cluster.rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .expect("client config");
            kube::Client::try_from(config).expect("client")
        })
    }
}

/// Memory goes away and the pods fit in what is left: the check is said in the `started`
/// record and the kubelet restarts.
#[test]
fn a_shrink_the_pods_fit_restarts_the_kubelet() {
    let mut h = Harness::start_with(Options::default());
    let uid = h.add_pod("small", 0, "1Gi");
    h.pods_cgroup(GIB + 64 * MIB, &[(&uid, GIB)]);
    h.memory_offline_1gib();
    h.wait_converged();
    let started = h.wait_for("refresh started", |r| {
        r["kind"] == "refresh" && r["action"] == "started"
    });
    let check = &started["shrink"];
    assert_eq!(check["fits"], true, "{started}");
    assert_eq!(
        check["memory_allocatable_after"],
        3 * GIB - 100 * MIB,
        "{started}"
    );
    assert_eq!(check["memory_in_use"], GIB + 64 * MIB, "{started}");
    assert_eq!(check["memory_requests"], GIB, "{started}");
    assert_eq!(check["pods"], 1, "{started}");
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    h.assert_nothing_skipped();
}

/// The pods use more than the smaller machine will allow them: no restart (it would lower
/// their cgroup limit below their use), a `shrink_unsafe` record with the numbers, a
/// Warning Event and the condition; nothing evicted, nothing cordoned.
#[test]
fn a_shrink_the_pods_would_not_fit_is_refused_with_a_warning() {
    let mut h = Harness::start_with(Options::default());
    let uid = h.add_pod("big", 0, "1Gi");
    h.pods_cgroup(3 * GIB + 512 * MIB, &[(&uid, 3 * GIB)]);
    h.memory_offline_1gib();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "shrink_unsafe", "{skipped}");
    assert_eq!(skipped["shrink"]["fits"], false, "{skipped}");
    assert_eq!(
        skipped["shrink"]["memory_in_use"],
        3 * GIB + 512 * MIB,
        "{skipped}"
    );
    assert_eq!(
        skipped["shrink"]["memory_allocatable_after"],
        3 * GIB - 100 * MIB,
        "{skipped}"
    );
    let event = h.wait_warning("ShrinkUnsafe");
    assert!(
        event["message"]
            .as_str()
            .unwrap_or("")
            .contains("--shrink-policy evict"),
        "{event}"
    );
    h.wait_condition("True", "ShrinkUnsafe");
    assert_eq!(h.cluster.kubelet.restarts(), 1, "log:\n{}", h.log());
    assert!(
        h.records("refresh", "started").is_empty(),
        "log:\n{}",
        h.log()
    );
    assert!(h.cluster.api.pod("work", "big").is_some());
    assert!(!h.node_cordoned());
}

impl Harness {
    /// The shrink's steps with [`three_pods`]: `low`, then `mid` evicted under the agent's
    /// cordon, lifted at the end.
    fn assert_low_and_mid_evicted(&self) {
        assert_eq!(
            self.steps("shrink"),
            [
                "started",
                "cordoned",
                "evicted work/low",
                "evicted work/mid",
                "uncordoned"
            ],
            "log:\n{}",
            self.log()
        );
    }
}

/// The three pods of `evict_*`: 3.5 GiB in use, 2972 MiB allowed after the shrink; `low`
/// and `mid` use 512 MiB each, `high` 2 GiB.
fn three_pods(h: &Harness) {
    let low = h.add_pod("low", 0, "512Mi");
    let mid = h.add_pod("mid", 100, "512Mi");
    let high = h.add_pod("high", 1000, "512Mi");
    h.pods_cgroup(
        3 * GIB + 512 * MIB,
        &[(&low, 512 * MIB), (&mid, 512 * MIB), (&high, 2 * GIB)],
    );
}

/// `--shrink-policy evict` (API errors surfacing at once, no client retries), with
/// [`three_pods`] on the Node.
fn evict_mode_with_three_pods() -> Harness {
    let h = Harness::start_with(Options {
        shrink_policy: Some(hotplug_agent::shrink::Policy::Evict),
        no_client_retry: true,
        ..Options::default()
    });
    three_pods(&h);
    h
}

/// `--shrink-policy evict`: the lowest-priority pods are evicted, one by one, until the
/// rest fit (`low`, then `mid`; `high` stays), under the agent's own cordon and a drain slot
/// of the fleet budget; then the restart, and the cordon is lifted.
#[test]
fn evict_mode_evicts_the_lowest_priority_first_until_the_rest_fit() {
    let mut h = evict_mode_with_three_pods();
    h.memory_offline_1gib();
    h.wait_converged();
    h.wait_for("the agent's uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    h.assert_low_and_mid_evicted();
    let started = h.records("reset", "started")[0].clone();
    assert_eq!(
        started["shrink"]["evict"],
        serde_json::json!(["work/low", "work/mid"]),
        "{started}"
    );
    assert!(h.cluster.api.pod("work", "low").is_none());
    assert!(h.cluster.api.pod("work", "mid").is_none());
    assert!(h.cluster.api.pod("work", "high").is_some());
    // The restart came after the evictions.
    let at = |pred: &dyn Fn(&Value) -> bool| h.seen.iter().position(pred).expect("record");
    assert!(
        at(&|r| r["kind"] == "reset" && r["action"] == "evicted" && r["message"] == "work/mid")
            < at(&|r| r["kind"] == "refresh" && r["action"] == "started"),
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    assert!(!h.node_cordoned());
    // The drain budget was taken for the evictions (and given back).
    let leases = h.cluster.api.leases("default");
    assert!(
        leases.iter().any(|l| l["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("hotplug-agent-drain-")),
        "{leases:?}"
    );
}

/// A PodDisruptionBudget refuses the second eviction (429): the agent stops there, lifts its
/// cordon, says so, and never restarts the kubelet into the OOM kill.
#[test]
fn evict_mode_stops_at_a_refused_eviction_and_never_restarts() {
    let mut h = evict_mode_with_three_pods();
    h.cluster.api.block_evictions("work", "mid");
    h.memory_offline_1gib();
    let skipped = h.wait_for("refresh skipped", |r| {
        r["kind"] == "refresh" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "shrink_unsafe", "{skipped}");
    let message = skipped["message"].as_str().unwrap_or("");
    assert!(
        message.contains("work/mid") && message.contains("refused"),
        "{skipped}"
    );
    assert_eq!(
        h.steps("shrink"),
        [
            "started",
            "cordoned",
            "evicted work/low",
            "uncordoned",
            "failed"
        ],
        "log:\n{}",
        h.log()
    );
    h.wait_warning("ShrinkUnsafe");
    assert!(
        h.records("refresh", "started").is_empty(),
        "log:\n{}",
        h.log()
    );
    assert_eq!(h.cluster.kubelet.restarts(), 1, "log:\n{}", h.log());
    assert!(h.cluster.api.pod("work", "mid").is_some());
    assert!(h.cluster.api.pod("work", "high").is_some());
    assert!(!h.node_cordoned(), "the agent's cordon is lifted");
}

impl Harness {
    /// A 1 GiB DIMM (ACPI `PNP0C80:00`, blocks 32-39 of 128 MiB) in sysfs, each block in
    /// `state`, with the links the kernel makes between the device and its blocks.
    fn dimm(&self, state: &str) {
        let root = self.machine.root();
        let memory = root.join("sys/devices/system/memory");
        let acpi = "LNXSYSTM:00/LNXSYBUS:00/PNP0A06:00/PNP0C80:00";
        fs::create_dir_all(root.join("sys/devices").join(acpi)).expect("sysfs fixture");
        fs::create_dir_all(&memory).expect("sysfs fixture");
        fs::write(memory.join("block_size_bytes"), "8000000\n").expect("sysfs fixture");
        for n in 0..8 {
            let dir = memory.join(format!("memory{}", 32 + n));
            fs::create_dir_all(&dir).expect("sysfs fixture");
            fs::write(dir.join("state"), format!("{state}\n")).expect("sysfs fixture");
            let link = dir.join("firmware_node");
            if !link.exists() {
                std::os::unix::fs::symlink(format!("../../../{acpi}"), &link).expect("link");
                let name = match n {
                    0 => "physical_node".to_owned(),
                    n => format!("physical_node{n}"),
                };
                std::os::unix::fs::symlink(
                    format!("../../../../system/memory/memory{}", 32 + n),
                    root.join("sys/devices").join(acpi).join(name),
                )
                .expect("link");
            }
        }
    }

    /// The kernel's worker starts offlining the DIMM's first block (an ACPI eject): sysfs
    /// shows it `going-offline`, MemTotal has not moved yet, and the `offline_pages` probe
    /// record arrives, naming the block as the pipeline does. The episode it begins holds
    /// until that block's `offline` (or the 2 s stall window).
    fn eject_starts(&self) {
        let memory = self.machine.root().join("sys/devices/system/memory");
        fs::write(memory.join("memory32/state"), "going-offline\n").expect("sysfs fixture");
        let now = self.machine.summary();
        let change = Change {
            source: Source::Ebpf,
            kind: Kind::Memory,
            action: Action::Resize,
            device: Some("memory32".into()),
            detail: Detail::Probe {
                probe: "fentry/offline_pages",
                kernel_ns: 1,
                delivery_ns: 1,
                pid: 77,
                comm: "kworker/u4:3".into(),
                cpu: 0,
                pages: Some(-32768),
                hits: 1,
            },
        };
        self.inject
            .blocking_send(Record::Event(Box::new(event_record(change, now))))
            .expect("the controller takes records");
    }

    /// The eject finishes: every block offline, MemTotal 1 GiB smaller, the uevents.
    fn eject_finishes(&self) {
        self.dimm("offline");
        let base = self.machine.summary();
        for n in 0..8 {
            self.change(
                Kind::MemoryBlock,
                Action::Offline,
                &format!("memory{}", 32 + n),
                Summary {
                    memory_bytes: base.memory_bytes - GIB,
                    ..base
                },
            );
        }
    }
}

/// `--shrink-policy evict` and an ACPI eject whose offlining has only begun: the agent
/// checks the pods against the machine without the whole DIMM and evicts at once, before
/// the kernel is done (the real kernel cannot finish while the pods' pages need room:
/// `cargo xtask vm-test --scenario shrink-unplug`); the restart comes after the kernel
/// finished, once, and then the agent's cordon goes.
#[test]
fn evictions_start_while_the_kernel_is_still_offlining() {
    let mut h = evict_mode_with_three_pods();
    h.dimm("online");
    h.eject_starts();
    h.wait_for("the second eviction", |r| {
        r["kind"] == "reset" && r["action"] == "evicted" && r["message"] == "work/mid"
    });
    let started = h.records("reset", "started")[0].clone();
    // The episode the offline's first event began, not the start-up's.
    assert_eq!(started["episode"], 1, "{started}");
    let blocks: Vec<String> = (32..40).map(|n| format!("memory{n}")).collect();
    assert_eq!(
        started["shrink"]["offlining"],
        serde_json::json!(blocks),
        "{started}"
    );
    assert_eq!(
        started["shrink"]["memory_allocatable_after"],
        3 * GIB - 100 * MIB,
        "{started}"
    );
    assert!(
        started["message"]
            .as_str()
            .unwrap_or("")
            .contains("the kernel is offlining memory32"),
        "{started}"
    );
    assert!(h.node_cordoned(), "cordoned while the kernel is offlining");
    assert_eq!(
        h.cluster.kubelet.restarts(),
        1,
        "no restart before the kernel is done"
    );
    assert!(
        h.records("refresh", "started").is_empty(),
        "log:\n{}",
        h.log()
    );

    // The kubelet stopped the evicted pods: their memory is free (`high`'s 2 GiB is left).
    h.pods_cgroup(2 * GIB, &[]);
    h.eject_finishes();
    h.wait_converged();
    h.wait_for("the agent's uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    h.assert_low_and_mid_evicted();
    let refresh = h.records("refresh", "started");
    assert_eq!(refresh.len(), 1, "log:\n{}", h.log());
    assert_eq!(refresh[0]["shrink"]["fits"], true, "{}", refresh[0]);
    assert_eq!(refresh[0]["episode"], 1, "one episode: {}", refresh[0]);
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    assert!(!h.node_cordoned());
    assert!(h.cluster.api.pod("work", "high").is_some());
}

/// The same start with the default policy: a Warning now (`reset` `skipped`,
/// `shrink_unsafe`, naming the blocks), nothing evicted or cordoned.
#[test]
fn refuse_mode_warns_while_the_kernel_is_still_offlining() {
    let mut h = Harness::start_with(Options::default());
    h.dimm("online");
    three_pods(&h);
    h.eject_starts();
    let skipped = h.wait_for("the early refusal", |r| {
        r["kind"] == "reset" && r["action"] == "skipped"
    });
    assert_eq!(skipped["reason"], "shrink_unsafe", "{skipped}");
    assert_eq!(skipped["shrink"]["offlining"][7], "memory39", "{skipped}");
    h.cluster
        .rt
        .block_on(h.cluster.api.wait_event(CONVERGE, |e| {
            e["reason"] == "ShrinkUnsafe"
                && e["message"]
                    .as_str()
                    .is_some_and(|n| n.contains("the kernel is offlining memory32"))
        }));
    assert!(!h.node_cordoned());
    assert_eq!(h.cluster.kubelet.restarts(), 1);
    assert_eq!(h.steps("shrink"), Vec::<String>::new(), "log:\n{}", h.log());
}

impl Harness {
    /// CPU 1 and 1 GiB go in one change: 4 GiB, 2 CPUs -> 3 GiB, 1 CPU.
    fn cpu1_and_1gib_offline(&self) {
        let base = self.machine.summary();
        self.change(
            Kind::Cpu,
            Action::Offline,
            "cpu1",
            Summary {
                memory_bytes: base.memory_bytes - GIB,
                cpus_online: 1,
            },
        );
    }

    fn reset_steps(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|r| r["kind"] == "reset")
            .map(|r| match r["action"].as_str().unwrap_or_default() {
                "evicted" => format!("evicted {}", r["message"].as_str().unwrap_or_default()),
                a => a.to_owned(),
            })
            .collect()
    }
}

/// drain-and-reset on a machine that also shrank: one plan. The pinned pod goes with the
/// reset's drain anyway, so the shrink's check counts it as gone and adds only what is
/// still too much (`low`, then `mid`); one drain evicts all three, one restart, `high`
/// stays.
#[test]
fn a_reset_on_a_smaller_machine_drains_what_does_not_fit_in_the_same_drain() {
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        drain_and_reset: true,
        shrink_policy: Some(hotplug_agent::shrink::Policy::Evict),
        no_client_retry: true,
        ..Options::default()
    });
    let low = h.add_pod("low", 0, "512Mi");
    let mid = h.add_pod("mid", 100, "512Mi");
    let high = h.add_pod("high", 1000, "512Mi");
    let pinned = h.add_pod("pinned", 2000, "512Mi");
    h.pods_cgroup(
        3 * GIB + 768 * MIB,
        &[
            (&low, 512 * MIB),
            (&mid, 512 * MIB),
            (&high, 2 * GIB),
            (&pinned, 256 * MIB),
        ],
    );
    fs::write(
        h.cluster.path("kubelet-root/cpu_manager_state"),
        format!(
            r#"{{"policyName":"static","defaultCpuSet":"0","entries":{{"{pinned}":{{"c":"1"}}}},"checksum":0}}"#
        ),
    )
    .expect("checkpoint");
    h.cpu1_and_1gib_offline();
    h.wait_converged();
    let mut steps = h.reset_steps();
    // The drain goes in the API's order; which pods, not their order, is the plan.
    steps[2..5].sort();
    assert_eq!(
        steps,
        [
            "started",
            "cordoned",
            "evicted work/low",
            "evicted work/mid",
            "evicted work/pinned",
            "kubelet_stopped",
            "checkpoint_moved",
            "kubelet_started",
            "node_ready",
            "uncordoned"
        ],
        "log:\n{}",
        h.log()
    );
    let started = h.records("reset", "started")[0].clone();
    assert_eq!(
        started["shrink"]["evict"],
        serde_json::json!(["work/low", "work/mid"]),
        "{started}"
    );
    // 3.75 GiB in use, minus the pinned pod's 256 MiB that the drain frees anyway.
    assert_eq!(
        started["shrink"]["memory_in_use"],
        3 * GIB + 512 * MIB,
        "{started}"
    );
    assert!(h.cluster.api.pod("work", "high").is_some());
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    assert!(
        h.records("refresh", "skipped").is_empty(),
        "log:\n{}",
        h.log()
    );
}

/// update-in-place on a machine that also shrank: the pods there is no room for are
/// evicted under the agent's cordon first, then the checkpoint is rewritten for the
/// smaller CPU set, one restart, and the cordon goes.
#[test]
fn update_in_place_on_a_smaller_machine_evicts_first_then_rewrites() {
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        static_policy: Some(StaticPolicy::UpdateInPlace),
        validating_standin: true,
        shrink_policy: Some(hotplug_agent::shrink::Policy::Evict),
        no_client_retry: true,
        ..Options::default()
    });
    three_pods(&h);
    h.cpu1_and_1gib_offline();
    h.wait_converged();
    h.wait_for("the agent's uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    let steps = h.reset_steps();
    assert_eq!(
        steps,
        [
            "started",
            "cordoned",
            "evicted work/low",
            "evicted work/mid",
            "checkpoint_rewritten",
            "kubelet_started",
            "cpusets_unchanged",
            "uncordoned"
        ],
        "log:\n{}",
        h.log()
    );
    let path = h.cluster.path("kubelet-root/cpu_manager_state");
    let state = fs::read_to_string(&path).expect("checkpoint");
    assert!(state.contains(r#""defaultCpuSet":"0""#), "{state}");
    assert!(h.cluster.api.pod("work", "high").is_some());
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    assert!(!h.node_cordoned());
}

impl Harness {
    /// `record` names only `victim` as failed at admission, with `reason` and `message`,
    /// and so does the Warning Event; the pod failed before the restart is in neither.
    fn assert_only_victim_rejected(&self, record: &Value, reason: &str, message: &str) {
        assert_eq!(
            record["rejected_pods"],
            serde_json::json!([{
                "namespace": "work",
                "name": "victim",
                "reason": reason,
                "message": message,
            }]),
            "{record}"
        );
        let event = self.wait_warning("PodsRejectedAfterRestart");
        let text = event["message"].as_str().unwrap_or("");
        assert!(text.contains(&format!("work/victim ({reason})")), "{event}");
        assert!(!text.contains("work/old"), "{event}");
    }

    /// A running pod `victim` and a pod `old` the kubelet had failed at admission before,
    /// then 1 GiB comes online.
    fn victim_and_an_old_rejection_then_1gib_online(&self) {
        self.add_pod("victim", 0, "64Mi");
        self.cluster.api.add_pod(serde_json::json!({
            "metadata": {"name": "old", "namespace": "work"},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Failed", "reason": "OutOfmemory", "message": "Pod was rejected: earlier"},
        }));
        let base = self.machine.summary();
        self.change(
            Kind::MemoryBlock,
            Action::Online,
            "memory40",
            Summary {
                memory_bytes: base.memory_bytes + GIB,
                ..base
            },
        );
    }
}

/// After the restart the kubelet fails a running pod at admission (`OutOfcpu`): verify
/// names it (`rejected_pods`) and a Warning Event does; a pod that had failed before the
/// restart is not blamed on it.
#[test]
fn pods_failed_at_admission_after_the_restart_are_reported() {
    let mut h = Harness::start_with(Options {
        gated: true,
        ..Options::default()
    });
    h.victim_and_an_old_rejection_then_1gib_online();
    h.wait_for("refresh started", |r| {
        r["kind"] == "refresh" && r["action"] == "started"
    });
    // The restarted kubelet re-admits the pod and fails it, as pkg/kubelet/kubelet.go
    // `rejectPod` writes it.
    let client = h.client();
    h.cluster.rt.block_on(async {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, "work");
        pods.patch_status(
            "victim",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {
                "phase": "Failed",
                "reason": "OutOfcpu",
                "message": "Pod was rejected: Node didn't have enough resource: cpu",
            }})),
        )
        .await
        .expect("failing the pod");
    });
    h.gate.as_mut().expect("gated").open();
    let verify = h.wait_for("verify converged", |r| {
        r["kind"] == "verify" && r["action"] == "converged"
    });
    h.assert_only_victim_rejected(
        &verify,
        "OutOfcpu",
        "Pod was rejected: Node didn't have enough resource: cpu",
    );
}

impl Harness {
    /// The kubelet fails a pod at admission, as pkg/kubelet/kubelet.go `rejectPod` writes
    /// it (through the status subresource).
    fn fail_pod(&self, name: &str, reason: &str, message: &str) {
        let client = self.client();
        self.cluster.rt.block_on(async {
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(client, "work");
            pods.patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"status": {
                    "phase": "Failed",
                    "reason": reason,
                    "message": message,
                }})),
            )
            .await
            .expect("failing the pod");
        });
    }

    /// The agent's (LISTs, WATCHes) of pods among its requests from `since` on.
    fn agent_pod_requests(&self, since: usize) -> (usize, usize) {
        let agent = self.cluster.api.requests_from("hotplug-agent/");
        FakeApi::pod_lists_and_watches(&agent[since.min(agent.len())..])
    }
}

/// `--shrink-policy evict` with a pod that terminates gracefully (the eviction leaves it
/// terminating until its kubelet deletes it): no restart while it is there, and the wait
/// watches for its deletion instead of listing the pods again and again.
#[test]
fn evict_mode_restarts_when_the_evicted_pod_is_deleted_watched_not_polled() {
    let mut h = evict_mode_with_three_pods();
    h.cluster.api.hold_evictions("work", "low");
    h.memory_offline_1gib();
    h.wait_for("the second eviction", |r| {
        r["kind"] == "reset" && r["action"] == "evicted" && r["message"] == "work/mid"
    });
    // `low`'s grace period: its kubelet deletes it a while after the eviction. A 1 s poll
    // would have listed the pods twice more by then.
    thread::sleep(Duration::from_millis(2500));
    let low = h.cluster.api.pod("work", "low").expect("still terminating");
    assert!(low["metadata"]["deletionTimestamp"].is_string(), "{low}");
    assert_eq!(
        h.cluster.kubelet.restarts(),
        1,
        "no restart while an evicted pod is there; log:
{}",
        h.log()
    );
    let agent = h.cluster.api.requests_from("hotplug-agent/");
    let evicted = agent
        .iter()
        .rposition(|(m, p)| m == "POST" && p.contains("/eviction"))
        .expect("the evictions");
    assert_eq!(
        h.agent_pod_requests(evicted),
        (1, 1),
        "one LIST, then the watch: {:?}",
        &agent[evicted..]
    );
    let deleted = Instant::now();
    assert!(h.cluster.api.delete_pod("work", "low"));
    h.wait_for("refresh started", |r| {
        r["kind"] == "refresh" && r["action"] == "started"
    });
    eprintln!(
        "the restart began {:?} after the evicted pod was deleted",
        deleted.elapsed()
    );
    h.wait_converged();
    h.wait_for("the agent's uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    assert!(!h.node_cordoned());
}

/// The kubelet fails a pod at admission after the Node has already converged (its first
/// syncs re-admit pods after its first status post): the watch after convergence sees it,
/// a `verify` record (`rejected_after_convergence`, `rejected_pods`) and the Warning Event
/// say so; a pod failed before the restart is not blamed on it, even when it changes.
#[test]
fn a_pod_failed_at_admission_after_convergence_is_reported() {
    let mut h = Harness::start_with(Options::default());
    h.victim_and_an_old_rejection_then_1gib_online();
    h.wait_converged();
    let converged = h
        .records("verify", "converged")
        .into_iter()
        .rfind(|r| r.get("reason").is_none())
        .expect("the verify")
        .clone();
    assert!(converged.get("rejected_pods").is_none(), "{converged}");
    let message = "Pod was rejected: Node didn't have enough resource: memory";
    h.fail_pod("old", "OutOfmemory", "Pod was rejected: earlier, again");
    h.fail_pod("victim", "OutOfmemory", message);
    let late = h.wait_for("the verify record after convergence", |r| {
        r["kind"] == "verify" && r["reason"] == "rejected_after_convergence"
    });
    assert_eq!(late["action"], "converged", "{late}");
    assert_eq!(late["episode"], converged["episode"], "{late}");
    h.assert_only_victim_rejected(&late, "OutOfmemory", message);
    // Said once: a change of the failed pod is not a new failure.
    h.fail_pod("victim", "OutOfmemory", "Pod was rejected: said again");
    h.fail_pod("old", "OutOfmemory", "Pod was rejected: a third time");
    h.add_pod("marker", 0, "64Mi");
    h.fail_pod("marker", "OutOfcpu", "Pod was rejected: cpu");
    let marker = h.wait_for("the marker's record", |r| {
        r["reason"] == "rejected_after_convergence" && r["rejected_pods"][0]["name"] == "marker"
    });
    assert_eq!(
        marker["rejected_pods"].as_array().map(Vec::len),
        Some(1),
        "{marker}"
    );
    let late: Vec<&Value> = h
        .seen
        .iter()
        .filter(|r| r["reason"] == "rejected_after_convergence")
        .collect();
    assert_eq!(late.len(), 2, "victim, then marker: log:\n{}", h.log());
}

/// The API refuses the initial-capacity annotation (403: RBAC without `nodes` `patch`):
/// said once, by a Warning Event, and the agent carries on with the restart; the next
/// change tries the write again, and a second refusal is not said again.
#[test]
fn a_refused_initial_capacity_write_is_said_once_and_the_agent_carries_on() {
    // No minimum interval: the second change is not deferred (a deferral retries the
    // write too, which would make the count of attempts depend on timing).
    let mut h = Harness::start_with(Options {
        guard: Some(GuardConfig {
            min_interval: Duration::ZERO,
            ..GuardConfig::default()
        }),
        ..Options::default()
    });
    // Only the Node itself, not its status, which the stand-in patches all the time.
    h.cluster
        .api
        .fail_next_exact("PATCH", &format!("/api/v1/nodes/{NODE}"), 403, 2);
    let base = h.machine.summary();
    h.cpu1_offline();
    h.wait_converged();
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    let event = h.wait_warning("InitialCapacityNotAnnotated");
    assert!(
        event["message"].as_str().unwrap_or("").contains("403"),
        "{event}"
    );
    assert!(
        h.records("refresh", "deferred").is_empty(),
        "a refusal is not waited for: log:\n{}",
        h.log()
    );
    h.change(Kind::Cpu, Action::Online, "cpu1", base);
    h.wait_converged();
    assert_eq!(h.cluster.kubelet.restarts(), 3, "log:\n{}", h.log());
    assert_eq!(
        h.node_patches(),
        2,
        "tried before each change: {:?}\nlog:\n{}",
        h.cluster.api.requests(),
        h.log()
    );
    assert_eq!(h.annotation(INITIAL_CAPACITY), None, "both refused");
    assert_eq!(
        h.cluster
            .api
            .events()
            .iter()
            .filter(|e| e["reason"] == "InitialCapacityNotAnnotated")
            .count(),
        1,
        "said once"
    );
}

/// The agent's own cordon left behind (an agent stopped between its evictions and the
/// restart) is lifted after the next restart; an operator's is not (drain-and-reset tests).
#[test]
fn an_agent_cordon_left_behind_is_lifted_after_the_next_restart() {
    let mut h = Harness::start_with(Options::default());
    h.patch_node(serde_json::json!({
        "metadata": {"annotations": {"hotplug-agent.io/cordoned": "2026-11-30T12:00:00Z"}},
        "spec": {"unschedulable": true},
    }));
    h.memory_offline_1gib();
    h.wait_converged();
    h.wait_for("the agent's uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    assert!(!h.node_cordoned(), "log:\n{}", h.log());
}

/// The API fails the annotation with a server error (500: it may take it next time): the
/// agent changes nothing before it is written; the restart waits (`refresh` `deferred`,
/// reason `initial_capacity`) and goes ahead once a retry wrote it.
#[test]
fn a_failed_initial_capacity_write_defers_the_restart_until_it_is_written() {
    let mut h = Harness::start_with(Options::default());
    h.cluster
        .api
        .fail_next_exact("PATCH", &format!("/api/v1/nodes/{NODE}"), 500, 1);
    h.cpu1_offline();
    let deferred = h.wait_for("the deferral", |r| {
        r["kind"] == "refresh" && r["action"] == "deferred" && r["reason"] == "initial_capacity"
    });
    assert!(
        deferred["message"]
            .as_str()
            .unwrap_or("")
            .contains(INITIAL_CAPACITY),
        "{deferred}"
    );
    h.wait_converged();
    assert_eq!(h.cluster.kubelet.restarts(), 2, "log:\n{}", h.log());
    let position = |action: &str| {
        h.seen
            .iter()
            .position(|r| r["kind"] == "refresh" && r["action"] == action)
            .expect(action)
    };
    assert!(
        position("deferred") < position("started"),
        "log:\n{}",
        h.log()
    );
    assert!(h.annotation(INITIAL_CAPACITY).is_some());
    assert_eq!(h.node_patches(), 2, "the failed write and its retry");
}

/// RBAC derived from the requests: one agent makes every API call it has — the start-up
/// GET, the condition on `nodes/status`, Events, the initial-capacity annotation, fleet
/// budgets by percentage (the Node count), a slot created, one waited for by LIST and
/// WATCH then taken over and given back, drain-and-reset (cordon, this node's pods, an
/// eviction, uncordon) and verify's watch of the Node — with its Leases in its own
/// namespace, apart from `default` where Events about a Node belong. What it asked for, as
/// the API server's authorizer sees it, must be exactly what
/// deploy/kubernetes/overlays/drain-and-reset grants its ServiceAccount, where it grants
/// it: nothing denied, nothing granted and unused.
#[test]
fn the_deployed_rbac_is_exactly_what_the_agent_calls() {
    use hotplug_agent::fleet::{self, Limit};
    use hotplug_tests::rbac;
    const OWN_NAMESPACE: &str = "hotplug-agent";
    let Some(grants) = rbac::deployed("overlays/drain-and-reset") else {
        return;
    };
    let config = fleet::Config {
        namespace: Some(OWN_NAMESPACE.into()),
        restarts: Limit::Percent(10),
        drains: Limit::Count(1),
        lease_duration: Duration::from_secs(30),
    };
    let mut h = Harness::start_with(Options {
        cpu_manager_state: Some(r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":0}"#),
        drain_and_reset: true,
        fleet: Some(config.clone()),
        ..Options::default()
    });
    // A pod holding cpu1 exclusively, which the reset must evict.
    h.cluster.api.add_pod(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pinned", "namespace": "default"},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
    }));
    let uid = h.cluster.api.pod("default", "pinned").expect("the pod")["metadata"]["uid"]
        .as_str()
        .expect("a uid")
        .to_owned();
    fs::write(
        h.cluster.path("kubelet-root/cpu_manager_state"),
        format!(
            r#"{{"policyName":"static","defaultCpuSet":"0","entries":{{"{uid}":{{"app":"1"}}}},"checksum":0}}"#
        ),
    )
    .expect("writing the checkpoint");
    // Another node is restarting: the agent waits for the slot (LIST, WATCH).
    let other = h.other_node_takes_the_restart_slot(&config);
    h.cpu1_offline();
    h.wait_for("the wait for a restart slot", |r| {
        r["action"] == "deferred" && r["reason"] == "fleet_budget"
    });
    h.cluster
        .rt
        .block_on(other.release())
        .expect("the other node gives its slot back");
    h.wait_converged();
    h.wait_for("the eviction", |r| {
        r["kind"] == "reset" && r["action"] == "evicted"
    });
    h.wait_for("the uncordon", |r| {
        r["kind"] == "reset" && r["action"] == "uncordoned"
    });
    h.cluster.rt.block_on(
        h.cluster
            .api
            .wait_until("both slots given back", CONVERGE, |api| {
                let leases = api.leases(OWN_NAMESPACE);
                (leases.len() == 2
                    && leases
                        .iter()
                        .all(|l| l["spec"].get("holderIdentity").is_none_or(Value::is_null)))
                .then_some(())
            }),
    );
    // The watch after convergence (LIST, WATCH pods): a pod failed after it is named; the
    // second can only have come through the watch, whichever the first came through.
    for name in ["late-1", "late-2"] {
        h.add_pod(name, 0, "64Mi");
        h.fail_pod(name, "OutOfcpu", "Pod was rejected: cpu");
        h.wait_for("the record of a pod failed after convergence", |r| {
            r["reason"] == "rejected_after_convergence" && r["rejected_pods"][0]["name"] == name
        });
    }
    // A repeated Event: the Recorder PATCHes the first one's series. The agent repeats an
    // Event only when the same thing happens again within six minutes (a refresh failing
    // the same way every back-off), which this flow does not, so the repeat goes through
    // the agent's own NodeApi and client (its User-Agent) directly.
    let kubeconfig = PathBuf::from(h.cluster.path("kubeconfig"));
    h.cluster.rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let kube_config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("client config");
        let client = hotplug_agent::kube_client::from_config(kube_config).expect("client");
        let mut node = hotplug_agent::node::NodeApi::new(client, NODE);
        node.get().await.expect("the Node");
        for _ in 0..2 {
            node.event(
                hotplug_agent::node::EventType::Warning,
                "KubeletRefreshFailed",
                "command refresh failed: exit status 1",
            )
            .await
            .expect("the Event");
        }
    });

    let used = rbac::agent_accesses(&h.cluster.api);
    let denied: Vec<String> = used
        .iter()
        .filter(|a| grants.rule_for(a, false).is_none())
        .map(ToString::to_string)
        .collect();
    let needed: std::collections::BTreeSet<_> = used
        .iter()
        .filter_map(|a| grants.rule_for(a, false))
        .collect();
    let unused: Vec<String> = grants
        .rules
        .iter()
        .filter(|r| !needed.contains(r))
        .map(ToString::to_string)
        .collect();
    let used: Vec<String> = used.iter().map(ToString::to_string).collect();
    assert!(
        denied.is_empty() && unused.is_empty(),
        "deploy/kubernetes RBAC does not fit the agent's calls.\ndenied (a real cluster \
         answers 403):\n  {}\ngranted but never used:\n  {}\nthe agent's calls:\n  {}\nlog:\n{}",
        denied.join("\n  "),
        unused.join("\n  "),
        used.join("\n  "),
        h.log()
    );
}
