//! kubelet-standin: a kubelet that is wrong in the way the real one is wrong.
//!
//! `kubelet-standin [run] --kubeconfig K --node-name N --pidfile P [...]` reads the
//! machine's capacity once (as the kubelet caches cadvisor's MachineInfo), writes the
//! pods' cgroup memory limit once (`--cgroup-file`), registers the Node and re-posts its
//! cached status every `--repost-ms`. SIGTERM: exit 0 at once.
//!
//! `kubelet-standin restart [same flags] [--timeout-ms T]` stops the instance owning the
//! pidfile (SIGTERM, SIGKILL after T), starts a new detached one with the same flags and
//! exits 0 once that one has posted its status; with nothing running it just starts one
//! (as `systemctl restart`). If the new instance has not posted within T it is left
//! running (it keeps retrying, as a kubelet does) and `restart` exits 1.
//!
//! See hotplug_tests::kubelet for the files it writes.

use std::{
    ffi::OsString,
    fs,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Parser};
use hotplug_tests::kubelet::{self, Capacity, capacity_of, process};
use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

#[derive(Args, Clone, Debug)]
struct RunArgs {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long)]
    node_name: String,
    /// Where /proc and /sys are (a fixture tree in tests).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    #[arg(long)]
    pidfile: PathBuf,
    /// Appends one line per start-up: time, PID and the capacity read.
    #[arg(long)]
    restarts_log: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    repost_ms: u64,
    /// Stands for kube-reserved + system-reserved memory.
    #[arg(long, default_value_t = 100 << 20)]
    reserved_memory_bytes: u64,
    /// Receives the `kubepods` memory limit in bytes at start-up, like cgroup v2 memory.max.
    #[arg(long)]
    cgroup_file: Option<PathBuf>,
    /// Exit when this process exits (the test that started us), so nothing is left over.
    #[arg(long)]
    owner_pid: Option<i32>,
    /// Validate the CPU/memory manager checkpoints here at start-up as the kubelet's static
    /// policies do, and refuse to start on one the kubelet would refuse
    /// (hotplug_tests::kubelet::checkpoints).
    #[arg(long)]
    kubelet_root_dir: Option<PathBuf>,
    /// The kubelet's `--reserved-cpus`, for that validation.
    #[arg(long, default_value = "")]
    reserved_cpus: String,
}

impl RunArgs {
    /// The flags again, for the next instance.
    fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--kubeconfig".into(),
            self.kubeconfig.clone().into(),
            "--node-name".into(),
            self.node_name.clone().into(),
            "--root".into(),
            self.root.clone().into(),
            "--pidfile".into(),
            self.pidfile.clone().into(),
            "--repost-ms".into(),
            self.repost_ms.to_string().into(),
            "--reserved-memory-bytes".into(),
            self.reserved_memory_bytes.to_string().into(),
        ];
        let optional = [
            (
                "--restarts-log",
                self.restarts_log.clone().map(OsString::from),
            ),
            (
                "--cgroup-file",
                self.cgroup_file.clone().map(OsString::from),
            ),
            ("--owner-pid", self.owner_pid.map(|p| p.to_string().into())),
            (
                "--kubelet-root-dir",
                self.kubelet_root_dir.clone().map(OsString::from),
            ),
            (
                "--reserved-cpus",
                Some(self.reserved_cpus.clone().into()).filter(|_| !self.reserved_cpus.is_empty()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value);
            }
        }
        args
    }
}

#[derive(Parser)]
#[command(
    name = "kubelet-standin",
    about = "A kubelet that caches capacity at start-up (`kubelet-standin restart --help` for restarting)"
)]
struct RunCli {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Parser)]
#[command(
    name = "kubelet-standin restart",
    about = "Restart the stand-in owning --pidfile; exit 0 once the new one has posted its status"
)]
struct RestartCli {
    #[command(flatten)]
    run: RunArgs,
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let result = match argv.get(1).and_then(|a| a.to_str()) {
        Some("restart") => {
            argv.remove(1);
            let cli = RestartCli::parse_from(argv);
            restart(&cli.run, Duration::from_millis(cli.timeout_ms))
        }
        sub => {
            if sub == Some("run") {
                argv.remove(1);
            }
            let cli = RunCli::parse_from(argv);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the runtime")
                .and_then(|rt| rt.block_on(run(cli.run)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubelet-standin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn log(msg: &str) {
    eprintln!("{} kubelet-standin[{}]: {msg}", now(), std::process::id());
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn restart(run: &RunArgs, timeout: Duration) -> anyhow::Result<()> {
    // One restart at a time per pidfile.
    let lock_path = run.pidfile.with_extension("lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own, released when it closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + timeout;
    match process::stop_instance(&run.pidfile, timeout).context("stopping the running instance")? {
        process::Stopped::Killed(pid) => eprintln!("kubelet-standin {pid} ignored SIGTERM; killed"),
        process::Stopped::Terminated(_) | process::Stopped::NotRunning => {}
    }
    let ready = kubelet::ready_path(&run.pidfile);
    let _ = fs::remove_file(&ready);
    let log_path = kubelet::log_path(&run.pidfile);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(std::env::current_exe().context("finding our own binary")?);
    cmd.args(run.to_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and close_range are async-signal-safe system calls. The new
    // instance leaves our session so it outlives whoever ran `restart` (a supervisor's
    // job, here).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // Whatever the caller leaked without O_CLOEXEC (a pipe to its reader, say)
            // must not stay open for the instance's lifetime. Best effort.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the new instance")?;
    let pid = child.id();
    // The new instance writes its PID to the ready file after its first post. Polled:
    // a short-lived tool, and a deadline bounds it.
    loop {
        if fs::read_to_string(&ready).is_ok_and(|s| s.trim() == pid.to_string()) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the new instance ({pid}) exited ({status}) before posting its status; see {}:\n{}",
                log_path.display(),
                tail(&log_path, 10)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the new instance ({pid}) has not posted its status after {timeout:?}; it keeps trying; see {}:\n{}",
                log_path.display(),
                tail(&log_path, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes our pidfile and ready marker on the way out, if they are still ours.
struct Cleanup {
    pidfile: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        for path in [kubelet::ready_path(&self.pidfile), self.pidfile.clone()] {
            if fs::read_to_string(&path).is_ok_and(|s| s.trim() == me) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // The one read of the machine, as NewMainKubelet caches cadvisor's MachineInfo.
    let snapshot = hotplug_agent::capacity::read_snapshot(&args.root)
        .with_context(|| format!("reading the capacity under {}", args.root.display()))?;
    let cap = capacity_of(&snapshot, args.reserved_memory_bytes);
    if let Some(root) = &args.kubelet_root_dir {
        let reserved = hotplug_agent::capacity::parse_cpu_list(&args.reserved_cpus)
            .context("--reserved-cpus")?
            .into_iter()
            .collect();
        match kubelet::checkpoints::validate(root, &snapshot, &reserved) {
            Ok(accepted) => accepted
                .iter()
                .for_each(|a| log(&format!("checkpoint {a}"))),
            // As the kubelet: "Failed to start ContainerManager", exit 1, restarted by
            // its supervisor into the same refusal.
            Err(why) => bail!("Failed to start ContainerManager: {why}"),
        }
    }
    let pid = std::process::id();
    write_atomic(&args.pidfile, &format!("{pid}\n"))?;
    let _cleanup = Cleanup {
        pidfile: args.pidfile.clone(),
    };
    let summary = cap
        .capacity
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(path) = &args.restarts_log {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{} pid={pid} {summary}", now())?;
    }
    if let Some(path) = &args.cgroup_file {
        fs::write(path, format!("{}\n", cap.kubepods_memory_limit))
            .with_context(|| format!("writing the kubepods limit to {}", path.display()))?;
    }
    log(&format!("started, capacity cached: {summary}"));
    let api: Api<Node> = Api::all(
        hotplug_tests::kubelet::client(&args.kubeconfig, Some(Duration::from_secs(10))).await?,
    );
    let started = now();
    let owner = owner_exit(args.owner_pid);
    tokio::pin!(owner);
    let mut tick = tokio::time::interval(Duration::from_millis(args.repost_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut registered, mut ready, mut failing) = (false, false, false);
    loop {
        let posted = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = &mut owner => {
                log("owner process exited; stopping");
                break;
            }
            posted = async {
                tick.tick().await;
                post(&api, &args.node_name, &cap, &started, &mut registered).await
            } => posted,
        };
        match posted {
            Ok(()) => {
                if failing {
                    log("API server reachable again");
                    failing = false;
                }
                if !ready {
                    write_atomic(&kubelet::ready_path(&args.pidfile), &format!("{pid}\n"))?;
                    log("node status posted");
                    ready = true;
                }
            }
            Err(e) => {
                if !failing {
                    log(&format!(
                        "posting the node status failed (retrying every {} ms): {e}",
                        args.repost_ms
                    ));
                    failing = true;
                }
            }
        }
    }
    log("stopping");
    Ok(())
}

/// Resolves when `owner` exits (never without one).
async fn owner_exit(owner: Option<i32>) {
    let Some(pid) = owner else {
        return std::future::pending().await;
    };
    let registered = process::pidfd_open(pid).and_then(|fd| {
        // SAFETY: an OwnedFd keeps the same open descriptor until the AsyncFd drops it.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)
    });
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => {
            log(&format!("cannot watch owner {pid}: {e}"));
            std::future::pending::<()>().await;
        }
    }
}

/// Registers the Node if needed (kubelet_node_status.go `registerWithAPIServer`: create,
/// and an existing Node is fine), then PATCHes the cached status, as
/// `tryUpdateNodeStatus` does: a strategic merge with `$setElementOrder`.
async fn post(
    api: &Api<Node>,
    name: &str,
    cap: &Capacity,
    started: &str,
    registered: &mut bool,
) -> Result<(), kube::Error> {
    if !*registered {
        let node: Node = serde_json::from_value(kubelet::node_object(name, cap, started))
            .map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
        *registered = true;
    }
    let patch = kubelet::status_patch(name, cap, started);
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                // Deleted under us: register again on the next tick.
                *registered = false;
            }
            Err(e)
        }
    }
}
