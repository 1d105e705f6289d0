use std::process::Command;

use super::{container::expand, *};
use crate::workspace;

fn placement() -> Placement {
    Placement {
        pod_name: "hotplug-agent-x1".into(),
        node_name: "vm-node".into(),
        node_ip: "10.0.2.15".into(),
        pod_ip: "10.88.0.10".into(),
        network: "podman".into(),
        volumes_dir: "/var/lib/pods/x1".into(),
    }
}

/// `kubectl kustomize` of an overlay, or `None` (said loudly) without kubectl.
fn render(overlay: &str) -> Option<String> {
    let dir = workspace::root()
        .join("deploy/kubernetes/overlays")
        .join(overlay);
    match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(o) if o.status.success() => Some(String::from_utf8(o.stdout).unwrap()),
        Ok(o) => panic!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("!!! SKIPPED: kubectl cannot run ({e}): overlays not translated");
            None
        }
    }
}

fn has(run: &PodmanRun, arg: &str) -> bool {
    run.args.iter().any(|a| a == arg)
}

#[test]
fn capabilities_overlay() {
    let Some(yaml) = render("capabilities") else {
        return;
    };
    let rendered = parse(&yaml).unwrap();
    let run = podman_run(&rendered, &placement()).unwrap();
    for arg in [
        "--cap-drop=ALL",
        "--cap-add=CAP_BPF",
        "--cap-add=CAP_PERFMON",
        "--cap-add=CAP_NET_ADMIN",
        "--cap-add=CAP_SYS_RESOURCE",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--read-only-tmpfs=false",
        "--user=0:0",
        "--network=podman",
        "--ip=10.88.0.10",
        "--env=NODE_NAME=vm-node",
        "--env=POD_IP=10.88.0.10",
        "--env=HOTPLUG_AGENT_REFRESH=none",
        "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
        "--volume=/var/lib/kubelet:/var/lib/kubelet:ro,rslave",
        "--volume=/sys/fs/cgroup:/host/sys/fs/cgroup:ro",
        "--volume=/var/lib/pods/x1/config:/etc/hotplug-agent:ro",
        "--mount=type=tmpfs,destination=/run/hotplug-agent,tmpfs-size=1048576",
        "--memory=67108864",
        "--cpu-shares=10",
        "--stop-timeout=30",
        "--pull=missing",
        "--restart=always",
    ] {
        assert!(has(&run, arg), "{arg} missing from {:?}", run.args);
    }
    assert!(!has(&run, "--privileged"));
    // The arguments, expanded, after the image.
    let image = run
        .args
        .iter()
        .position(|a| a == "hotplug-agent:0.1.0")
        .unwrap();
    assert_eq!(run.args[image + 1..], ["run"]);
    // The settings are variables (so that `hotplug-agent config` in the pod sees them),
    // `$(POD_IP)` expanded.
    for env in [
        "--env=HOTPLUG_AGENT_CONFIG=/etc/hotplug-agent/config.toml",
        "--env=HOTPLUG_AGENT_METRICS_ADDR=10.88.0.10:9477",
        "--env=HOTPLUG_AGENT_CGROUP_ROOT=/host/sys/fs/cgroup",
        "--env=NODE_NAME=vm-node",
    ] {
        assert!(has(&run, env), "{env} missing from {:?}", run.args);
    }
    assert_eq!(run.files.len(), 1);
    assert_eq!(run.files[0].0, "/var/lib/pods/x1/config/config.toml");
    assert!(run.files[0].1.contains("settle_ms"));
    assert!(run.dirs.contains(&("/sys/kernel/tracing".into(), false)));
    let ready = run.probes.iter().find(|p| p.kind == "readiness").unwrap();
    assert_eq!((ready.path.as_str(), ready.port), ("/readyz", 9477));
    assert!(run.outside.iter().any(|o| o.contains("tolerations")));
    assert!(run.outside.iter().any(|o| o.contains("RuntimeDefault")));
}

#[test]
fn privileged_overlay() {
    let Some(yaml) = render("privileged") else {
        return;
    };
    let run = podman_run(&parse(&yaml).unwrap(), &placement()).unwrap();
    assert!(has(&run, "--privileged"));
    assert!(!run.args.iter().any(|a| a.starts_with("--cap-")));
    assert!(!has(&run, "--security-opt=no-new-privileges"));
    // No seccompProfile in the privileged context: the kubelet's default, Unconfined.
    assert!(has(&run, "--security-opt=seccomp=unconfined"));
    assert!(has(&run, "--read-only"));
}

/// Bad input: each untranslatable field is an error that names it.
#[test]
fn refuses_what_it_cannot_express() {
    let Some(yaml) = render("capabilities") else {
        return;
    };
    let base: Value = serde_saphyr::from_multiple::<Value>(&yaml)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    type Case = (&'static str, fn(&mut Value), &'static str);
    let cases: [Case; 7] = [
        (
            "hostUsers",
            |d| d["spec"]["template"]["spec"]["hostUsers"] = false.into(),
            "hostUsers",
        ),
        (
            "subPath",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["subPath"] =
                    "x".into()
            },
            "subPath",
        ),
        (
            "secret env",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"] =
                    serde_json::json!({"secretKeyRef": {"name": "s", "key": "k"}})
            },
            "secretKeyRef",
        ),
        (
            "fieldRef",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]
                    ["fieldPath"] = "metadata.uid".into()
            },
            "metadata.uid",
        ),
        (
            "second container",
            |d| {
                let c = d["spec"]["template"]["spec"]["containers"][0].clone();
                d["spec"]["template"]["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(c);
            },
            "2 containers",
        ),
        (
            "lifecycle",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["lifecycle"] =
                    serde_json::json!({"preStop": {"exec": {"command": ["true"]}}})
            },
            "lifecycle",
        ),
        (
            "unknown field",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] =
                    true.into()
            },
            "privilegd",
        ),
    ];
    for (what, change, expect) in cases {
        let mut doc = base.clone();
        change(&mut doc);
        let yaml = serde_json::to_string(&doc).unwrap();
        let err = parse(&yaml)
            .and_then(|r| podman_run(&r, &placement()))
            .expect_err(what);
        assert!(format!("{err:#}").contains(expect), "{what}: {err:#}");
    }
}

#[test]
fn expansion_follows_kubernetes() {
    let env = |k: &str| (k == "A").then(|| "1".to_owned());
    assert_eq!(expand("x=$(A)", env), "x=1");
    assert_eq!(expand("$(B)/$(A)", env), "$(B)/1");
    assert_eq!(expand("$$(A) $$ $", env), "$(A) $ $");
    assert_eq!(expand("$(A", env), "$(A");
    assert_eq!(expand("[$(A)]:9", env), "[1]:9");
}

#[test]
fn shell_quoting() {
    let argv: Vec<String> = ["podman", "run", "--label=a=b c", "it's"]
        .map(String::from)
        .into();
    assert_eq!(shell_line(&argv), r"podman run '--label=a=b c' 'it'\''s'");
}
