//! The cluster `hotplug-agent run` is tested and benchmarked against: the in-process fake
//! API server, a kubeconfig for it, the kubelet stand-in (which caches the machine's
//! capacity at start-up, as the real kubelet does) and a scratch directory holding the
//! kubelet's root dir and a pods' cgroup with its memory limit.
use std::time::Duration;

use serde_json::Value;

use crate::{fake_api::FakeApi, kubelet::Kubelet, machine};

pub struct Cluster {
    /// Runs the test side's async calls (the fake API has its own runtime).
    pub rt: tokio::runtime::Runtime,
    pub api: FakeApi,
    pub kubelet: Kubelet,
    pub node: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything and waits until the stand-in registered the Node.
    pub fn start(node: &str) -> Self {
        let cluster = Self::start_with(node, &[]);
        cluster.wait_node_matches_machine(Duration::from_secs(30));
        cluster
    }

    /// The same, with more flags for the stand-in (`--root DIR` for a fixture machine);
    /// returns once the stand-in has posted its first status.
    pub fn start_with(node: &str, standin: &[&str]) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let api = rt.block_on(FakeApi::start());
        let dir = tempfile::tempdir().expect("scratch dir");
        api.write_kubeconfig(&dir.path().join("kubeconfig"));
        for sub in ["kubelet-root", "cgroup/kubepods.slice"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("scratch dirs");
        }
        let cgroup_file = dir.path().join("cgroup/kubepods.slice/memory.max");
        let mut flags = vec!["--cgroup-file", cgroup_file.to_str().expect("utf-8 path")];
        // `@KUBELET_ROOT@` in the stand-in's flags: this cluster's kubelet root dir.
        let kubelet_root = dir.path().join("kubelet-root").display().to_string();
        let standin: Vec<String> = standin
            .iter()
            .map(|f| f.replace("@KUBELET_ROOT@", &kubelet_root))
            .collect();
        flags.extend(standin.iter().map(String::as_str));
        let kubelet = Kubelet::start(&dir.path().join("kubeconfig"), node, dir.path(), &flags);
        Self {
            rt,
            api,
            kubelet,
            node: node.into(),
            dir,
        }
    }

    pub fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    /// The flags that point `hotplug-agent run` at this cluster, restarting the stand-in.
    /// `hotplug-agent run` against this cluster with [`Cluster::run_args`] and `extra`,
    /// once its start-up reconcile is recorded; returns the agent and that record.
    pub fn start_run(&self, extra: &[&str]) -> (crate::Agent, serde_json::Value) {
        let mut args = vec!["run".to_owned()];
        args.extend(self.run_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut agent, _ready) = crate::Agent::start(&args);
        let startup = agent.wait_for(
            "the start-up reconcile",
            std::time::Duration::from_secs(120),
            |v| v["kind"] == "reconcile" && v["episode"] == 0,
        );
        (agent, startup)
    }

    pub fn run_args(&self) -> Vec<String> {
        [
            "--format",
            "json",
            "--kubeconfig",
            &self.path("kubeconfig"),
            "--node-name",
            &self.node,
            "--refresh",
            "command",
            "--refresh-command",
            &self.kubelet.restart_command(),
            "--kubelet-root-dir",
            &self.path("kubelet-root"),
            "--cgroup-root",
            &self.path("cgroup"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Waits until the Node advertises the machine's capacity.
    pub fn wait_node_matches_machine(&self, timeout: Duration) -> Value {
        self.rt.block_on(
            self.api
                .wait_node(&self.node, timeout, node_matches_machine),
        )
    }
}

/// Every request the agent made against this cluster must be one the deployed RBAC grants
/// (the drain-and-reset overlay: the base and the one component with API rights of its
/// own, so any flags a test gave the agent are covered).
impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            crate::rbac::assert_granted(&self.api, "overlays/drain-and-reset");
        }
    }
}

/// The Node's `cpu` and `memory` capacity (parsed by the agent's own quantity code, which
/// has unit tests of its own) equal the machine's online CPUs and MemTotal.
pub fn node_matches_machine(node: &Value) -> bool {
    let Ok(node) = serde_json::from_value(node.clone()) else {
        return false;
    };
    let Ok(adv) = hotplug_agent::reconcile::advertised(&node) else {
        return false;
    };
    let (mem, cpus) = machine();
    adv.memory_bytes == Some(mem) && adv.cpu_millis == Some(cpus * 1000)
}
