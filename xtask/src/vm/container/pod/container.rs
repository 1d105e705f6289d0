//! The container's part of the pod: securityContext, resources, environment and the
//! downward API, ports, probes, image and arguments.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Probe, ResourceRequirements, SecurityContext, Volume,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube_quantity::ParsedQuantity;

use super::{Fields, HttpProbe, Placement, PodmanRun, Rendered, camel, volumes};

pub(super) fn container_args(
    c: &Container,
    fields: &Fields,
    volumes: &BTreeMap<&str, &Volume>,
    rendered: &Rendered,
    at: &Placement,
    host_network: bool,
    run: &mut PodmanRun,
) -> anyhow::Result<()> {
    let Container {
        args,
        command,
        env,
        env_from,
        image,
        image_pull_policy,
        lifecycle,
        liveness_probe,
        name,
        ports,
        readiness_probe,
        resize_policy,
        resources,
        restart_policy,
        restart_policy_rules,
        security_context,
        startup_probe,
        stdin,
        stdin_once,
        termination_message_path,
        termination_message_policy,
        tty,
        volume_devices,
        volume_mounts,
        working_dir,
    } = c;
    let p = format!("containers[{name}]");
    refuse!(p; env_from, lifecycle, restart_policy, restart_policy_rules, volume_devices);
    outside!(run.outside, p, "the kubelet's, no runtime flag"; resize_policy,
        termination_message_path, termination_message_policy);
    for (flag, value) in [("stdin", stdin), ("stdinOnce", stdin_once), ("tty", tty)] {
        ensure!(value != &Some(true), "{p}.{flag}: not translated");
    }
    run.args.push(format!("--name={}", at.pod_name));
    security(security_context.as_ref(), &p, run)?;
    if let Some(r) = resources {
        limits(r, &p, run)?;
    }
    let env = environment(env.as_deref().unwrap_or_default(), fields, &p)?;
    for (k, v) in &env {
        run.args.push(format!("--env={k}={v}"));
    }
    for m in volume_mounts.iter().flatten() {
        volumes::mount(m, volumes, rendered, at, &p, run)?;
    }
    let ports = ports.as_deref().unwrap_or_default();
    for port in ports {
        publish(port, host_network, &p, run)?;
    }
    for (kind, probe) in [
        ("liveness", liveness_probe),
        ("readiness", readiness_probe),
        ("startup", startup_probe),
    ] {
        if let Some(probe) = probe {
            run.probes.push(http_probe(kind, probe, ports, &p)?);
            run.outside.push(format!(
                "{p}.{kind}Probe: the kubelet's; the scenario makes the same HTTP request"
            ));
        }
    }
    if let Some(dir) = working_dir {
        run.args.push(format!("--workdir={dir}"));
    }
    run.args.push(
        match image_pull_policy.as_deref() {
            None | Some("IfNotPresent") => "--pull=missing",
            Some("Never") => "--pull=never",
            Some("Always") => "--pull=always",
            Some(other) => bail!("{p}.imagePullPolicy {other:?}: unknown"),
        }
        .into(),
    );
    let expand_all = |s: &String| {
        expand(s, |var| {
            env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
        })
    };
    if let Some(command) = command {
        // Kubernetes ignores the image's ENTRYPOINT *and* CMD when command is set; podman
        // keeps CMD unless arguments follow the image, so demand them explicitly.
        ensure!(args.is_some(), "{p}.command without args: not translated");
        let command: Vec<String> = command.iter().map(expand_all).collect();
        run.args
            .push(format!("--entrypoint={}", serde_json::to_string(&command)?));
    }
    run.args.push(
        image
            .clone()
            .with_context(|| format!("{p}.image missing"))?,
    );
    run.args.extend(args.iter().flatten().map(expand_all));
    Ok(())
}

fn security(sc: Option<&SecurityContext>, p: &str, run: &mut PodmanRun) -> anyhow::Result<()> {
    let Some(SecurityContext {
        allow_privilege_escalation,
        app_armor_profile,
        capabilities,
        privileged,
        proc_mount,
        read_only_root_filesystem,
        run_as_group,
        run_as_non_root,
        run_as_user,
        se_linux_options,
        seccomp_profile,
        windows_options,
    }) = sc
    else {
        bail!("{p}.securityContext missing: the runtimes' defaults differ; not translated");
    };
    let p = format!("{p}.securityContext");
    refuse!(p; se_linux_options, windows_options);
    let privileged = privileged == &Some(true);
    if privileged {
        run.args.push("--privileged".into());
    }
    match allow_privilege_escalation {
        Some(false) if privileged => bail!("{p}: privileged with allowPrivilegeEscalation false"),
        Some(false) => run.args.push("--security-opt=no-new-privileges".into()),
        _ => {}
    }
    match capabilities {
        Some(Capabilities { add, drop }) => {
            for cap in drop.iter().flatten() {
                run.args.push(format!("--cap-drop={}", cap_name(cap)));
            }
            for cap in add.iter().flatten() {
                run.args.push(format!("--cap-add={}", cap_name(cap)));
            }
        }
        // A privileged container has them all.
        None if privileged => {}
        None => {
            bail!("{p}.capabilities unset: podman's default set is not containerd's; list them")
        }
    }
    if read_only_root_filesystem == &Some(true) {
        // podman would add tmpfs on /run, /tmp, /var/tmp; a Kubernetes pod has none.
        run.args.push("--read-only".into());
        run.args.push("--read-only-tmpfs=false".into());
    }
    match (run_as_user, run_as_group) {
        (Some(u), Some(g)) => run.args.push(format!("--user={u}:{g}")),
        (Some(u), None) => run.args.push(format!("--user={u}")),
        (None, Some(_)) => bail!("{p}.runAsGroup without runAsUser: not translated"),
        (None, None) => {}
    }
    if run_as_non_root == &Some(true) && run_as_user.is_none_or(|u| u == 0) {
        bail!("{p}.runAsNonRoot with uid 0 (or the image's user): the kubelet refuses it");
    }
    match proc_mount.as_deref() {
        None | Some("Default") => {}
        Some(other) => bail!("{p}.procMount {other:?}: not translated"),
    }
    match seccomp_profile
        .as_ref()
        .map(|s| (s.type_.as_str(), &s.localhost_profile))
    {
        Some(("RuntimeDefault", None)) => run.outside.push(format!(
            "{p}.seccompProfile RuntimeDefault: podman's default profile \
             (/usr/share/containers/seccomp.json) stands in for the CRI runtime's"
        )),
        // Without a profile, the kubelet's default (no --seccomp-default) is Unconfined.
        Some(("Unconfined", None)) | None => {
            run.args.push("--security-opt=seccomp=unconfined".into());
        }
        Some((other, _)) => bail!("{p}.seccompProfile {other:?}: not translated"),
    }
    match app_armor_profile.as_ref().map(|a| a.type_.as_str()) {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => run.args.push("--security-opt=apparmor=unconfined".into()),
        Some(other) => bail!("{p}.appArmorProfile {other:?}: not translated"),
    }
    Ok(())
}

/// `BPF` -> `CAP_BPF`; `ALL` stays.
fn cap_name(cap: &str) -> String {
    if cap == "ALL" || cap.starts_with("CAP_") {
        cap.to_owned()
    } else {
        format!("CAP_{cap}")
    }
}

fn limits(r: &ResourceRequirements, p: &str, run: &mut PodmanRun) -> anyhow::Result<()> {
    let ResourceRequirements {
        claims,
        limits,
        requests,
    } = r;
    let p = format!("{p}.resources");
    refuse!(p; claims);
    let value = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
        ParsedQuantity::try_from(q)
            .ok()
            .and_then(|q| q.to_bytes_f64())
            .with_context(|| format!("{p}: quantity {:?}", q.0))
    };
    for (name, q) in limits.iter().flatten() {
        match name.as_str() {
            "memory" => run.args.push(format!("--memory={}", value(q)? as u64)),
            "cpu" => run.args.push(format!("--cpus={}", value(q)?)),
            other => bail!("{p}.limits.{other}: not translated"),
        }
    }
    for (name, q) in requests.iter().flatten() {
        match name.as_str() {
            // The kubelet's cpu.shares for a request (pkg/kubelet/cm: milliCPUToShares).
            "cpu" => {
                let shares = ((value(q)? * 1000.0) as u64 * 1024 / 1000).max(2);
                run.args.push(format!("--cpu-shares={shares}"));
            }
            "memory" => run.outside.push(format!(
                "{p}.requests.memory: the scheduler's (no cgroup setting without MemoryQoS)"
            )),
            other => bail!("{p}.requests.{other}: not translated"),
        }
    }
    Ok(())
}

/// The container's variables in order, `$(VAR)` expanded against those before it (as the
/// kubelet does), `fieldRef`s filled from the placement.
fn environment(env: &[EnvVar], fields: &Fields, p: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for EnvVar {
        name,
        value,
        value_from,
    } in env
    {
        let v = match (value, value_from) {
            (Some(v), None) => expand(v, |var| {
                out.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
            }),
            (None, Some(from)) => {
                field_ref(from, fields).with_context(|| format!("{p}.env[{name}].valueFrom"))?
            }
            (None, None) => String::new(),
            (Some(_), Some(_)) => bail!("{p}.env[{name}]: both value and valueFrom"),
        };
        out.retain(|(k, _)| k != name);
        out.push((name.clone(), v));
    }
    Ok(out)
}

fn field_ref(from: &EnvVarSource, f: &Fields) -> anyhow::Result<String> {
    let EnvVarSource {
        config_map_key_ref,
        field_ref,
        file_key_ref,
        resource_field_ref,
        secret_key_ref,
    } = from;
    let at = "";
    refuse!(at; config_map_key_ref, file_key_ref, resource_field_ref, secret_key_ref);
    let ObjectFieldSelector {
        api_version,
        field_path,
    } = field_ref.as_ref().context("empty valueFrom")?;
    ensure!(
        api_version.as_deref().is_none_or(|v| v == "v1"),
        "fieldRef apiVersion {api_version:?}"
    );
    Ok(match field_path.as_str() {
        "metadata.name" => f.pod_name,
        "metadata.namespace" => f.namespace,
        "spec.nodeName" => f.node_name,
        "spec.serviceAccountName" => f.service_account,
        "status.podIP" => f.pod_ip,
        "status.hostIP" => f.node_ip,
        other => bail!("fieldRef {other:?}: not translated"),
    }
    .to_owned())
}

/// Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion): `$(VAR)` becomes
/// the value when VAR is known and stays as written otherwise; `$$` is a `$`.
pub(super) fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn publish(
    port: &ContainerPort,
    host_network: bool,
    p: &str,
    run: &mut PodmanRun,
) -> anyhow::Result<()> {
    let ContainerPort {
        container_port,
        host_ip,
        host_port,
        name: _,
        protocol,
    } = port;
    let proto = protocol.as_deref().unwrap_or("TCP").to_lowercase();
    match host_port {
        // The pod's own address serves it; with hostNetwork the node's does.
        None => {}
        Some(h) if host_network => {
            ensure!(
                h == container_port,
                "{p}: hostPort {h} != containerPort with hostNetwork"
            )
        }
        Some(h) => run.args.push(match host_ip {
            Some(ip) => format!("--publish={ip}:{h}:{container_port}/{proto}"),
            None => format!("--publish={h}:{container_port}/{proto}"),
        }),
    }
    Ok(())
}

fn http_probe(
    kind: &'static str,
    probe: &Probe,
    ports: &[ContainerPort],
    p: &str,
) -> anyhow::Result<HttpProbe> {
    let Probe {
        exec,
        failure_threshold,
        grpc,
        http_get,
        initial_delay_seconds: _,
        period_seconds,
        success_threshold: _,
        tcp_socket,
        termination_grace_period_seconds,
        timeout_seconds: _,
    } = probe;
    let p = format!("{p}.{kind}Probe");
    refuse!(p; exec, grpc, tcp_socket, termination_grace_period_seconds);
    let HTTPGetAction {
        host,
        http_headers,
        path,
        port,
        scheme,
    } = http_get
        .as_ref()
        .with_context(|| format!("{p}: no httpGet"))?;
    refuse!(p; host, http_headers);
    ensure!(
        scheme.as_deref().is_none_or(|s| s == "HTTP"),
        "{p}: scheme {scheme:?} not translated"
    );
    let port = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => ports
            .iter()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.container_port)
            .with_context(|| format!("{p}: no container port named {name:?}"))?,
    };
    Ok(HttpProbe {
        kind,
        path: path.clone().unwrap_or_else(|| "/".into()),
        port: u16::try_from(port).with_context(|| format!("{p}: port {port}"))?,
        period_s: period_seconds.unwrap_or(10),
        failure_threshold: failure_threshold.unwrap_or(3),
    })
}
