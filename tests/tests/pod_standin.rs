//! The pod stand-in (`pod-standin`, src/bin) against the fake API server: the Pod it
//! creates, the pod cgroup it enters (a directory tree standing in for cgroupfs), the
//! pages it pins, and its exit once the Pod is evicted. Needs root for the PFNs in
//! /proc/self/pagemap; the VM scenario shrink-unplug uses it for real.
use std::{path::Path, process::Stdio, time::Duration};

use hotplug_tests::fake_api::FakeApi;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::EvictParams};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{ChildStdout, Command},
};

const WAIT: Duration = Duration::from_secs(20);

/// The next stdout line of the stand-in, within [`WAIT`].
async fn line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line from pod-standin in time")
        .expect("reading pod-standin's stdout")
        .expect("pod-standin ended its output early")
}

#[tokio::test]
async fn pod_standin_holds_pinned_pages_in_its_pod_cgroup_until_evicted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "\n*** SKIP pod_standin_holds_pinned_pages_in_its_pod_cgroup_until_evicted: needs \
             root to read PFNs from /proc/self/pagemap ***\n"
        );
        return;
    }
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    let cgroup = dir.path().join("cgroup");
    let ready = dir.path().join("hog.ready");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pod-standin"))
        .args(["--kubeconfig", path(&dir.path().join("kubeconfig"))])
        .args(["--node-name", "n1", "--name", "hog", "--priority", "7"])
        .args(["--memory-request", "300Mi", "--hold-bytes", "4Mi", "--pin"])
        .args(["--cgroup-root", path(&cgroup), "--ready-file", path(&ready)])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting pod-standin");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // 4 MiB: 1024 pages, every one counted in some memory block.
    let pinned = line(&mut lines).await;
    let (head, blocks) = pinned.split_once(": ").expect("`pinned N pages: ...`");
    assert_eq!(head, "pinned 1024 pages", "{pinned}");
    let counted: u64 = blocks
        .split(", ")
        .map(|b| {
            let (name, n) = b.split_once(' ').expect("`memoryN count`");
            assert!(name.starts_with("memory"), "{pinned}");
            n.parse::<u64>().expect("a count")
        })
        .sum();
    assert_eq!(counted, 1024, "{pinned}");
    let cgroup_line = line(&mut lines).await;
    assert_eq!(line(&mut lines).await, "running");
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "running\n");

    // The Pod as a scheduler would have bound it, Running, and its cgroup where the
    // kubelet's systemd driver puts a Burstable pod, with the stand-in in it.
    let pod = api.pod("default", "hog").expect("the Pod was created");
    assert_eq!(pod["spec"]["nodeName"], "n1");
    assert_eq!(pod["spec"]["priority"], 7);
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["requests"]["memory"],
        "300Mi"
    );
    assert_eq!(pod["status"]["phase"], "Running");
    let uid = pod["metadata"]["uid"].as_str().unwrap().replace('-', "_");
    let pod_dir = cgroup.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
    ));
    assert_eq!(cgroup_line, format!("cgroup {}", pod_dir.display()));
    assert_eq!(
        std::fs::read_to_string(pod_dir.join("cgroup.procs")).unwrap(),
        child.id().unwrap().to_string()
    );
    for level in [
        "",
        "kubepods.slice",
        "kubepods.slice/kubepods-burstable.slice",
    ] {
        let control = cgroup.join(level).join("cgroup.subtree_control");
        assert_eq!(std::fs::read_to_string(control).unwrap(), "+memory");
    }

    // The eviction deletes the Pod at once (the fake has no grace period); the stand-in
    // sees it through its watch and exits, which releases the pins.
    let pods: Api<Pod> = Api::default_namespaced(client);
    pods.evict("hog", &EvictParams::default()).await.unwrap();
    assert_eq!(line(&mut lines).await, "deleted");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("pod-standin exits after its Pod was deleted")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(api.pod("default", "hog").is_none());
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}
