//! The kubelet stand-in (`kubelet-standin`, src/bin/kubelet-standin.rs) and the handle
//! the tests drive it with.
//!
//! The stand-in does what the real kubelet does wrong for us: it reads the machine's
//! capacity once, at start-up, registers the Node, and re-posts that cached status every
//! `--repost-ms` (a strategic-merge PATCH of `nodes/<name>/status`), so a capacity that
//! anyone else patches is overwritten, while foreign conditions survive (merged by
//! `type`). Only a restart makes it see hot-plugged capacity: `kubelet-standin restart`
//! stops the running instance and starts a new one, and is what the agent's
//! `--refresh command` backend runs ([`Kubelet::restart_command`]).
//!
//! Files, all named after the pidfile: `<pidfile>` (the running instance's PID),
//! `<pidfile>.ready` (its PID again, once its first status post succeeded),
//! `<pidfile>.log` (every instance's stderr, appended); and `--restarts-log`, one line
//! per start-up. The pidfile path identifies an instance: pass the same path (as the
//! same string) to `run` and `restart`.
//!
//! `--root DIR` makes it read `DIR/proc/meminfo` and `DIR/sys/...` instead of the
//! machine's, so a test without root can fake a hot-add by editing a fixture tree and
//! restarting. Quantities are canonical, as the kubelet's: MemTotal is written in `Ki`
//! unless it is a whole number of MiB (then `Mi`, or `Gi`...).

mod capacity;
pub mod checkpoints;
pub mod process;
mod status;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub use self::{
    capacity::{Capacity, binary_quantity, capacity_of, hugepages_resource},
    status::{go_arch, node_object, status_patch},
};

/// `<pidfile>.ready`: written by an instance after its first successful status post.
pub fn ready_path(pidfile: &Path) -> PathBuf {
    suffixed(pidfile, ".ready")
}

/// `<pidfile>.log`: the instances' stderr.
pub fn log_path(pidfile: &Path) -> PathBuf {
    suffixed(pidfile, ".log")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// The stand-in binary: `KUBELET_STANDIN_BIN` if set; else next to the running test's
/// target directory (integration tests run from `target/<profile>/deps/`, and cargo
/// builds the package's binaries for them); else `target/debug`.
pub fn standin_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBELET_STANDIN_BIN") {
        return p.into();
    }
    let beside_tests = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("kubelet-standin")))
        .filter(|p| p.exists());
    if let Some(p) = beside_tests {
        return p;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kubelet-standin");
    assert!(
        p.exists(),
        "{} not built: run `cargo test -p hotplug-tests` or `cargo build -p hotplug-tests`",
        p.display()
    );
    p
}

/// Quotes a word for a command line that is split as a shell would (shell-words).
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=@%+,".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A running stand-in; SIGTERMed (whichever instance is current) and awaited on drop.
///
/// Starting one makes the test process a child subreaper (see
/// [`process::become_subreaper`]), so stopped instances are reaped rather than left as
/// zombies where PID 1 does not reap.
pub struct Kubelet {
    bin: PathBuf,
    /// The instance's flags (what `restart` is given too).
    args: Vec<String>,
    pidfile: PathBuf,
    restarts_log: PathBuf,
}

impl Kubelet {
    /// Starts a stand-in for Node `node` with its files in `dir`, and returns once it has
    /// registered the Node and posted its status. `extra` are more flags
    /// (`--repost-ms 200`, `--cgroup-file PATH`, `--root PATH`, ...). The instance also
    /// exits by itself if this test process dies (`--owner-pid`).
    pub fn start(kubeconfig: &Path, node: &str, dir: &Path, extra: &[&str]) -> Kubelet {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let pidfile = dir.join("kubelet.pid");
        let restarts_log = dir.join("restarts.log");
        let mut args: Vec<String> = vec![
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            node.into(),
            "--pidfile".into(),
            pidfile.display().to_string(),
            "--restarts-log".into(),
            restarts_log.display().to_string(),
            "--owner-pid".into(),
            std::process::id().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let kubelet = Kubelet {
            bin: standin_bin(),
            args,
            pidfile,
            restarts_log,
        };
        process::become_subreaper();
        // `restart` with nothing running starts an instance, like `systemctl restart`.
        kubelet.restart();
        kubelet
    }

    /// The exact `--refresh-command` for the agent: stops the current instance, starts
    /// a new one (which reads the machine again) and exits 0 once it has posted its
    /// status; non-zero with a message on stderr otherwise.
    pub fn restart_command(&self) -> String {
        std::iter::once(self.bin.display().to_string())
            .chain(std::iter::once("restart".to_owned()))
            .chain(self.args.iter().cloned())
            .map(|w| quote(&w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the restart command now; panics with its stderr and the log on failure.
    pub fn restart(&self) {
        let out = Command::new(&self.bin)
            .arg("restart")
            .args(&self.args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()));
        assert!(
            out.status.success(),
            "`kubelet-standin restart` failed ({}):\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Start-ups so far: the initial start counts as 1, each restart adds 1.
    pub fn restarts(&self) -> usize {
        fs::read_to_string(&self.restarts_log)
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    /// The restarts log: one line per start-up, RFC 3339 time, PID and capacity.
    pub fn restarts_log(&self) -> String {
        fs::read_to_string(&self.restarts_log).unwrap_or_default()
    }

    pub fn pidfile(&self) -> &Path {
        &self.pidfile
    }

    /// The current instance's PID, if one is running.
    pub fn pid(&self) -> Option<i32> {
        process::running_instance(&self.pidfile).map(|(pid, _)| pid)
    }

    /// Every instance's stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(log_path(&self.pidfile)).unwrap_or_default()
    }

    /// SIGTERM to the current instance, and waits for it to exit.
    pub fn stop(&self) -> process::Stopped {
        let stopped = process::stop_instance(&self.pidfile, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("stopping the kubelet stand-in: {e}"));
        process::reap_exited_standins();
        stopped
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        match process::stop_instance(&self.pidfile, Duration::from_secs(10)) {
            Ok(process::Stopped::Killed(pid)) => {
                eprintln!("warning: kubelet-standin {pid} ignored SIGTERM and was killed");
            }
            Ok(_) => {}
            Err(e) => eprintln!("warning: stopping kubelet-standin: {e}"),
        }
        process::reap_exited_standins();
    }
}

/// The kube client of the stand-in doubles (`kubelet-standin`, `pod-standin`) from their
/// kubeconfig, with a short connect timeout. `read_timeout`: also for reads and writes
/// (the stand-in's status posts); none for a client that holds a watch open.
pub async fn client(
    kubeconfig: &Path,
    read_timeout: Option<std::time::Duration>,
) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
    config.connect_timeout = Some(std::time::Duration::from_secs(2));
    config.read_timeout = read_timeout;
    config.write_timeout = read_timeout;
    kube::Client::try_from(config).context("building the kube client")
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_survives_shell_splitting() {
        assert_eq!(quote("/tmp/a-b_c.d"), "/tmp/a-b_c.d");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
