//! The `systemd` refresh backend: `RestartUnit kubelet.service` over D-Bus, as
//! `systemctl restart` does it, and waiting for the job to finish.
//!
//! The sequence mirrors systemctl (src/systemctl/systemctl-start-unit.c and
//! src/shared/bus-wait-for-jobs.c, systemd v252): add a match for the Manager's
//! `JobRemoved(u id, o job, s unit, s result)` signal and call `Subscribe` *before*
//! enqueuing the job, because systemd may finish the job before the caller has read the
//! reply; then `RestartUnit(unit, "replace")` returns the job's object path, and the job is
//! over when `JobRemoved` names that path. Its `result` is `done` on success, otherwise
//! `canceled`, `timeout`, `failed`, `dependency`, `skipped` or `invalid`
//! (https://www.freedesktop.org/software/systemd/man/latest/org.freedesktop.systemd1.html).
//!
//! The bus is the system bus, or any address (a DaemonSet mounts the host's socket, e.g.
//! `unix:path=/host/run/dbus/system_bus_socket`); no hostPID is needed.
use std::{env, num::NonZeroUsize, time::Duration};

use futures::StreamExt as _;
use tokio::time::{Instant, timeout_at};
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, connection, fdo, message::Type};

use super::{Outcome, RefreshError};

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
/// systemd's answer to a job for a unit it cannot load (src/core/dbus-manager.c).
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
/// The D-Bus specification's default system bus address, used without
/// `DBUS_SYSTEM_BUS_ADDRESS`.
const DEFAULT_SYSTEM_BUS: &str = "unix:path=/var/run/dbus/system_bus_socket";
/// JobRemoved signals of other jobs may queue up while we wait for the reply to our call.
const SIGNAL_QUEUE: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

pub const DEFAULT_UNIT: &str = "kubelet.service";
/// systemd's own DefaultTimeoutStartSec: a restart that takes longer is stuck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct SystemdConfig {
    pub unit: String,
    /// `None`: the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the specification's default).
    pub bus_address: Option<String>,
    /// For the whole action: connecting, enqueuing the job and waiting for it.
    pub timeout: Duration,
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            unit: DEFAULT_UNIT.to_owned(),
            bus_address: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl SystemdConfig {
    /// The address this configuration connects to, for messages and the event log.
    pub fn address(&self) -> String {
        self.bus_address.clone().unwrap_or_else(|| {
            env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| DEFAULT_SYSTEM_BUS.to_owned())
        })
    }
}

/// `RestartUnit(unit, "replace")` and wait for the job.
pub async fn restart_unit(cfg: &SystemdConfig) -> Result<Outcome, RefreshError> {
    job(cfg, "RestartUnit").await
}

/// `StopUnit(unit, "replace")` and wait for the job.
pub async fn stop_unit(cfg: &SystemdConfig) -> Result<Outcome, RefreshError> {
    job(cfg, "StopUnit").await
}

/// `StartUnit(unit, "replace")` and wait for the job.
pub async fn start_unit(cfg: &SystemdConfig) -> Result<Outcome, RefreshError> {
    job(cfg, "StartUnit").await
}

async fn job(cfg: &SystemdConfig, method: &'static str) -> Result<Outcome, RefreshError> {
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let address = cfg.address();
    let unit = cfg.unit.as_str();
    let timed_out = |what: String| RefreshError::Timeout {
        what,
        timeout: cfg.timeout,
    };

    // A socket that accepts but never answers the handshake must not hang us either.
    let conn = timeout_at(
        deadline,
        connection::Builder::address(address.as_str()).build(),
    )
    .await
    .map_err(|_| timed_out(format!("connecting to the D-Bus at {address}")))?
    .map_err(|source| RefreshError::BusConnect {
        address: address.clone(),
        source,
    })?;
    let what = format!("systemd {method} {unit}");
    let (job, mut removed) = timeout_at(deadline, enqueue(&conn, &address, unit, method))
        .await
        .map_err(|_| timed_out(what.clone()))??;
    let result = timeout_at(deadline, job_result(&mut removed, &job))
        .await
        .map_err(|_| timed_out(format!("{what} (job {})", job.as_str())))?
        .ok_or_else(|| RefreshError::BusClosed {
            address,
            unit: unit.to_owned(),
        })?;
    let job = job.as_str().to_owned();
    if result != "done" {
        return Err(RefreshError::JobFailed {
            method,
            unit: unit.to_owned(),
            job,
            result,
        });
    }
    Ok(Outcome {
        backend: "systemd",
        detail: format!("{method} {unit}: job {job} done"),
        duration: started.elapsed(),
    })
}

/// Subscribes to `JobRemoved`, then enqueues the job; returns its path and the signals.
async fn enqueue(
    conn: &Connection,
    address: &str,
    unit: &str,
    method: &'static str,
) -> Result<(OwnedObjectPath, MessageStream), RefreshError> {
    let error =
        |method: &'static str| move |source: zbus::Error| classify(source, method, unit, address);
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(SYSTEMD)
        .path(MANAGER_PATH)
        .interface(MANAGER)
        .member("JobRemoved")
        .build()
        .map_err(error("AddMatch"))?;
    let removed = MessageStream::for_match_rule(rule, conn, Some(SIGNAL_QUEUE))
        .await
        .map_err(error("AddMatch"))?;
    // systemd emits job signals only while some client is subscribed.
    conn.call_method(Some(SYSTEMD), MANAGER_PATH, Some(MANAGER), "Subscribe", &())
        .await
        .map_err(error("Subscribe"))?;
    let reply = conn
        .call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some(MANAGER),
            method,
            &(unit, "replace"),
        )
        .await
        .map_err(error(method))?;
    let job = reply
        .body()
        .deserialize::<OwnedObjectPath>()
        .map_err(error(method))?;
    Ok((job, removed))
}

/// The `result` of the `JobRemoved` that names `job`; `None` if the connection ends first.
async fn job_result(removed: &mut MessageStream, job: &OwnedObjectPath) -> Option<String> {
    while let Some(msg) = removed.next().await {
        let msg = msg.ok()?;
        // JobRemoved(u id, o job, s unit, s result); other jobs' signals are skipped.
        if let Ok((_id, path, _unit, result)) = msg
            .body()
            .deserialize::<(u32, OwnedObjectPath, String, String)>()
            && path == *job
        {
            return Some(result);
        }
    }
    None
}

fn classify(source: zbus::Error, method: &'static str, unit: &str, address: &str) -> RefreshError {
    match &source {
        zbus::Error::MethodError(name, _, _) if name.as_str() == NO_SUCH_UNIT => {
            RefreshError::NoSuchUnit {
                unit: unit.to_owned(),
                source,
            }
        }
        // No owner, and activation failed: the systemd package installs a D-Bus activation
        // file for org.freedesktop.systemd1 with `Exec=/bin/false`, so a bus without systemd
        // running answers SpawnChildExited rather than ServiceUnknown.
        zbus::Error::FDO(e) if no_systemd(e) => RefreshError::NoSystemd {
            address: address.to_owned(),
            source,
        },
        _ => RefreshError::Systemd {
            method,
            unit: unit.to_owned(),
            source,
        },
    }
}

fn no_systemd(e: &fdo::Error) -> bool {
    use fdo::Error::*;
    matches!(
        e,
        ServiceUnknown(_)
            | NameHasNoOwner(_)
            | SpawnExecFailed(_)
            | SpawnForkFailed(_)
            | SpawnChildExited(_)
            | SpawnChildSignaled(_)
            | SpawnFailed(_)
            | SpawnServiceNotFound(_)
    )
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::{BufRead as _, BufReader},
        process::{Child, Command, Stdio},
        sync::{Arc, Mutex},
    };

    use zbus::message::Header;

    use super::*;

    /// A private bus: `dbus-daemon --session` on a socket in a tempdir, killed on drop.
    struct TestBus {
        daemon: Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl TestBus {
        fn start() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let address = format!("unix:path={}", dir.path().join("bus").display());
            let mut daemon = match Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address"])
                .arg(format!("--address={address}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(daemon) => daemon,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "dbus-daemon not found: the systemd tests run a private D-Bus; \
                     run `cargo xtask setup` (installs Debian's dbus-daemon)"
                ),
                Err(e) => panic!("starting dbus-daemon: {e}"),
            };
            // It prints its address once it listens.
            let mut line = String::new();
            BufReader::new(daemon.stdout.take().expect("piped stdout"))
                .read_line(&mut line)
                .expect("reading dbus-daemon's address");
            assert!(line.starts_with(&address), "dbus-daemon printed {line:?}");
            Self {
                daemon,
                address,
                _dir: dir,
            }
        }

        fn config(&self, unit: &str, timeout: Duration) -> SystemdConfig {
            SystemdConfig {
                unit: unit.to_owned(),
                bus_address: Some(self.address.clone()),
                timeout,
            }
        }
    }

    impl Drop for TestBus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }

    /// A stand-in for systemd's Manager object, faithful in what this backend relies on:
    /// it owns `org.freedesktop.systemd1` on a real bus (so calls go through dbus-daemon's
    /// routing and match rules, not a p2p shortcut); `Subscribe`, `RestartUnit`,
    /// `StopUnit` and `StartUnit` at `/org/freedesktop/systemd1` with systemd's signatures;
    /// a job path `/org/freedesktop/systemd1/job/N` in the reply; `JobRemoved(uoss)`
    /// broadcast *after* the reply, preceded by another job's `JobRemoved` as on a busy
    /// system; `NoSuchUnit` for units it does not know; `InvalidArgs` for a bad job mode.
    /// Not reproduced: JobNew, unit state, job merging, polkit.
    struct FakeSystemd {
        calls: Arc<Mutex<Vec<String>>>,
        _conn: Connection,
    }

    impl FakeSystemd {
        /// `units`: each unit's job result, or `None` for a job that never finishes.
        async fn start(bus: &TestBus, units: &[(&str, Option<&'static str>)]) -> Self {
            let conn = connection::Builder::address(bus.address.as_str())
                .build()
                .await
                .expect("connecting the fake systemd");
            conn.request_name(SYSTEMD)
                .await
                .expect("owning org.freedesktop.systemd1");
            let calls = Arc::new(Mutex::new(Vec::new()));
            let units = units.iter().map(|(u, r)| ((*u).to_owned(), *r)).collect();
            tokio::spawn(serve(conn.clone(), units, calls.clone()));
            Self { calls, _conn: conn }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("calls").clone()
        }
    }

    async fn serve(
        conn: Connection,
        units: HashMap<String, Option<&'static str>>,
        calls: Arc<Mutex<Vec<String>>>,
    ) {
        let mut incoming = MessageStream::from(&conn);
        let mut jobs = 0u32;
        while let Some(Ok(msg)) = incoming.next().await {
            if msg.message_type() != Type::MethodCall {
                continue;
            }
            let hdr = msg.header();
            let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            let ours = hdr.path().is_some_and(|p| p.as_str() == MANAGER_PATH)
                && hdr.interface().is_some_and(|i| i.as_str() == MANAGER);
            calls.lock().expect("calls").push(member.clone());
            let _ = match (ours, member.as_str()) {
                (true, "Subscribe") => conn.reply(&hdr, &()).await,
                (true, "RestartUnit" | "StopUnit" | "StartUnit") => {
                    let Ok((unit, mode)) = msg.body().deserialize::<(String, String)>() else {
                        let _ = error(&conn, &hdr, "org.freedesktop.DBus.Error.InvalidArgs", "ss")
                            .await;
                        continue;
                    };
                    let Some(result) = units.get(&unit).copied() else {
                        let _ = error(
                            &conn,
                            &hdr,
                            NO_SUCH_UNIT,
                            &format!("Unit {unit} not found."),
                        )
                        .await;
                        continue;
                    };
                    if !["replace", "fail", "isolate", "ignore-dependencies"]
                        .contains(&mode.as_str())
                    {
                        let _ = error(
                            &conn,
                            &hdr,
                            "org.freedesktop.DBus.Error.InvalidArgs",
                            "Job mode invalid.",
                        )
                        .await;
                        continue;
                    }
                    jobs += 1;
                    let job = job_path(jobs);
                    let replied = conn.reply(&hdr, &job).await;
                    if let Some(result) = result {
                        tokio::spawn(job_removed(conn.clone(), jobs, unit, result));
                    }
                    replied
                }
                _ => {
                    error(
                        &conn,
                        &hdr,
                        "org.freedesktop.DBus.Error.UnknownMethod",
                        &member,
                    )
                    .await
                }
            };
        }
    }

    fn job_path(id: u32) -> OwnedObjectPath {
        OwnedObjectPath::try_from(format!("{MANAGER_PATH}/job/{id}")).expect("valid path")
    }

    async fn error(
        conn: &Connection,
        hdr: &Header<'_>,
        name: &str,
        text: &str,
    ) -> zbus::Result<()> {
        conn.reply_error(hdr, name, &text).await
    }

    /// Runs after the reply has been sent, as systemd's job runs after the call returns.
    async fn job_removed(conn: Connection, id: u32, unit: String, result: &'static str) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = id + 1000;
        let signal = |id, unit: String, result: &'static str| (id, job_path(id), unit, result);
        for body in [
            signal(other, "other.service".into(), "failed"),
            signal(id, unit, result),
        ] {
            let _ = conn
                .emit_signal(None::<&str>, MANAGER_PATH, MANAGER, "JobRemoved", &body)
                .await;
        }
    }

    const QUICK: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn restart_stop_and_start_succeed_and_subscribe_first() {
        let bus = TestBus::start();
        let systemd = FakeSystemd::start(&bus, &[("kubelet.service", Some("done"))]).await;
        let cfg = bus.config("kubelet.service", QUICK);
        let outcome = restart_unit(&cfg).await.expect("restart succeeds");
        assert_eq!(outcome.backend, "systemd");
        assert_eq!(
            outcome.detail,
            "RestartUnit kubelet.service: job /org/freedesktop/systemd1/job/1 done"
        );
        assert_eq!(systemd.calls(), ["Subscribe", "RestartUnit"]);

        let backend = super::super::Backend::Systemd(cfg);
        super::super::stop(&backend).await.expect("stop succeeds");
        super::super::start(&backend).await.expect("start succeeds");
        super::super::refresh(&backend)
            .await
            .expect("refresh succeeds");
        let calls = systemd.calls();
        assert_eq!(
            &calls[2..],
            [
                "Subscribe",
                "StopUnit",
                "Subscribe",
                "StartUnit",
                "Subscribe",
                "RestartUnit"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_job_is_an_error_naming_unit_and_result() {
        let bus = TestBus::start();
        let _systemd = FakeSystemd::start(&bus, &[("kubelet.service", Some("failed"))]).await;
        let err = restart_unit(&bus.config("kubelet.service", QUICK))
            .await
            .expect_err("failed");
        assert_eq!(
            err.to_string(),
            "systemd RestartUnit kubelet.service: job /org/freedesktop/systemd1/job/1 \
             finished with result \"failed\""
        );
    }

    #[tokio::test]
    async fn an_unknown_unit_is_no_such_unit() {
        let bus = TestBus::start();
        let _systemd = FakeSystemd::start(&bus, &[("kubelet.service", Some("done"))]).await;
        let err = restart_unit(&bus.config("kubelet-typo.service", QUICK))
            .await
            .expect_err("unknown");
        assert!(matches!(err, RefreshError::NoSuchUnit { .. }), "{err:?}");
        assert_eq!(err.to_string(), "unit kubelet-typo.service not found");
    }

    #[tokio::test]
    async fn a_bus_without_systemd_says_so() {
        let bus = TestBus::start();
        let err = restart_unit(&bus.config("kubelet.service", QUICK))
            .await
            .expect_err("no systemd");
        assert!(matches!(err, RefreshError::NoSystemd { .. }), "{err:?}");
        assert!(err.to_string().contains(&bus.address), "{err}");
    }

    #[tokio::test]
    async fn an_address_pointing_nowhere_names_the_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("unix:path={}", dir.path().join("nowhere").display());
        let cfg = SystemdConfig {
            bus_address: Some(address.clone()),
            ..SystemdConfig::default()
        };
        let err = restart_unit(&cfg).await.expect_err("nothing listens there");
        assert!(matches!(err, RefreshError::BusConnect { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot connect to the D-Bus at {address}")
        );
    }

    #[tokio::test]
    async fn a_job_that_never_finishes_times_out() {
        let bus = TestBus::start();
        let _systemd = FakeSystemd::start(&bus, &[("kubelet.service", None)]).await;
        let started = Instant::now();
        let err = restart_unit(&bus.config("kubelet.service", Duration::from_millis(300)))
            .await
            .expect_err("no JobRemoved");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            err.to_string(),
            "systemd RestartUnit kubelet.service (job /org/freedesktop/systemd1/job/1) \
             did not finish within 300ms"
        );
    }
}
