//! A rendered `deploy/kubernetes` overlay's DaemonSet as one `podman run` command line, the
//! way the kubelet would hand its pod to a CRI runtime: the pod's namespaces, the
//! container's securityContext, volumes and mounts, environment (with the downward API
//! and `$(VAR)` expansion), arguments, resources, image pull policy and stop timeout.
//!
//! Nothing here is written again by hand: the flags follow from the YAML, and every field
//! of the Kubernetes types is destructured without `..`, so a field this translation does
//! not know is a compile error when k8s-openapi grows one, and a set field it cannot
//! express is an error naming it ([`refuse`]), never dropped. What Kubernetes does outside
//! the runtime (scheduling, HTTP probes, the API token) is not an error: it is listed in
//! [`PodmanRun::outside`], so the scenario says who does it instead. Pure: unit-tested
//! below on the real overlays.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
            EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
            ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube_quantity::ParsedQuantity;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The objects of one `kubectl kustomize` output that concern a node's runtime.
#[derive(Debug)]
pub struct Rendered {
    pub daemon_set: DaemonSet,
    pub config_maps: Vec<ConfigMap>,
    /// `Kind/name` of what only the API server acts on (Namespace, RBAC, Service).
    pub api_only: Vec<String>,
}

/// Parses a multi-document manifest strictly: every DaemonSet and ConfigMap must round-trip
/// through its k8s-openapi type unchanged (serde would drop an unknown field silently).
pub fn parse(yaml: &str) -> anyhow::Result<Rendered> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| anyhow::anyhow!("not valid YAML: {e}"))?;
    let mut daemon_sets = Vec::new();
    let mut config_maps = Vec::new();
    let mut api_only = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let at = || format!("document {i} ({kind} {name})");
        match (doc["apiVersion"].as_str().unwrap_or_default(), kind) {
            ("apps/v1", "DaemonSet") => {
                daemon_sets.push(strict::<DaemonSet>(doc).with_context(at)?)
            }
            ("v1", "ConfigMap") => config_maps.push(strict::<ConfigMap>(doc).with_context(at)?),
            (_, "") => bail!("{}: no kind", at()),
            _ => api_only.push(format!("{kind}/{name}")),
        }
    }
    ensure!(
        daemon_sets.len() == 1,
        "expected exactly one DaemonSet, found {}",
        daemon_sets.len()
    );
    Ok(Rendered {
        daemon_set: daemon_sets.remove(0),
        config_maps,
        api_only,
    })
}

fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> anyhow::Result<T> {
    let typed: T = serde_json::from_value(doc.clone())
        .with_context(|| format!("does not parse as {}", std::any::type_name::<T>()))?;
    let mut lost = Vec::new();
    unknown_fields("", doc, &serde_json::to_value(&typed)?, &mut lost);
    ensure!(lost.is_empty(), "unknown fields: {}", lost.join(", "));
    Ok(typed)
}

/// Paths present in `original` but not in the round trip `back`.
fn unknown_fields(path: &str, original: &Value, back: &Value, lost: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match b.get(key) {
                    Some(v) => unknown_fields(&at, value, v, lost),
                    None if value.is_null() => {}
                    None => lost.push(at),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            for (i, (o, b)) in o.iter().zip(b).enumerate() {
                unknown_fields(&format!("{path}[{i}]"), o, b, lost);
            }
        }
        _ => {}
    }
}

/// What the kubelet and the API server would fill in for one pod of the DaemonSet.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The pod's name: its hostname, `metadata.name`, and the podman container's name.
    pub pod_name: String,
    pub node_name: String,
    pub node_ip: String,
    /// `status.podIP`: the address podman gives the container on [`Self::network`].
    pub pod_ip: String,
    /// The podman network standing in for the CNI.
    pub network: String,
    /// The guest directory for ConfigMap and emptyDir volumes (the kubelet's
    /// `pods/<uid>/volumes`).
    pub volumes_dir: String,
}

/// One `podman run` and what has to exist before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodmanRun {
    /// After `podman run`: the flags, the image and the arguments.
    pub args: Vec<String>,
    /// ConfigMap volumes: files to write (path, text), read-only in the container.
    pub files: Vec<(String, String)>,
    /// Host directories: (path, create). `hostPath` type `Directory` must exist (the kubelet
    /// refuses the pod otherwise); `DirectoryOrCreate` and disk emptyDirs are created.
    pub dirs: Vec<(String, bool)>,
    /// The kubelet's HTTP probes, resolved to a port.
    pub probes: Vec<HttpProbe>,
    /// What Kubernetes does outside the runtime, and who does it here.
    pub outside: Vec<String>,
}

impl PodmanRun {
    /// `podman run EXTRA... ARGS...`: `extra` is the scenario's (`--detach`, `--runtime`).
    pub fn command(&self, extra: &[&str]) -> Vec<String> {
        let mut argv = vec!["run".to_owned()];
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        argv.extend(self.args.iter().cloned());
        argv
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpProbe {
    /// `liveness`, `readiness`, `startup`.
    pub kind: &'static str,
    pub path: String,
    pub port: u16,
    pub period_s: i32,
    pub failure_threshold: i32,
}

/// `spec.x: not expressible with podman` when the field is set.
macro_rules! refuse {
    ($at:expr; $($field:ident),+ $(,)?) => {
        $(
            if $field.is_some() {
                bail!("{}.{}: set, and not translated to podman", $at, camel(stringify!($field)));
            }
        )+
    };
}

/// `outside` notes for fields that only the scheduler or controllers read.
macro_rules! outside {
    ($out:expr, $at:expr, $who:expr; $($field:ident),+ $(,)?) => {
        $(
            if $field.is_some() {
                $out.push(format!("{}.{}: {}", $at, camel(stringify!($field)), $who));
            }
        )+
    };
}

/// `run_as_user` -> `runAsUser`: error messages name fields as the YAML does.
fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.trim_end_matches('_').chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The DaemonSet's pod as `podman run` arguments.
pub fn podman_run(rendered: &Rendered, at: &Placement) -> anyhow::Result<PodmanRun> {
    let ds = &rendered.daemon_set;
    let namespace = ds
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut run = PodmanRun {
        args: Vec::new(),
        files: Vec::new(),
        dirs: Vec::new(),
        probes: Vec::new(),
        outside: Vec::new(),
    };
    let DaemonSetSpec {
        min_ready_seconds,
        revision_history_limit,
        selector: _,
        template,
        update_strategy,
    } = ds.spec.as_ref().context("DaemonSet without spec")?;
    let who = "the DaemonSet controller's (rollout), no runtime flag";
    outside!(run.outside, "spec", who; min_ready_seconds, revision_history_limit, update_strategy);
    let PodTemplateSpec { metadata, spec } = template;
    if let Some(meta) = metadata {
        template_metadata(meta, &mut run)?;
    }
    let spec = spec.as_ref().context("spec.template.spec missing")?;
    pod(spec, rendered, at, &namespace, &mut run)?;
    Ok(run)
}

fn template_metadata(meta: &ObjectMeta, run: &mut PodmanRun) -> anyhow::Result<()> {
    let ObjectMeta {
        annotations,
        creation_timestamp,
        deletion_grace_period_seconds,
        deletion_timestamp,
        finalizers,
        generate_name,
        generation,
        labels,
        managed_fields,
        name,
        namespace,
        owner_references,
        resource_version,
        self_link,
        uid,
    } = meta;
    let at = "spec.template.metadata";
    refuse!(at; creation_timestamp, deletion_grace_period_seconds, deletion_timestamp,
        finalizers, generate_name, generation, managed_fields, name, namespace,
        owner_references, resource_version, self_link, uid);
    for (k, v) in labels.iter().flatten() {
        run.args.push(format!("--label={k}={v}"));
    }
    for (k, v) in annotations.iter().flatten() {
        run.args.push(format!("--annotation={k}={v}"));
    }
    Ok(())
}

fn pod(
    spec: &PodSpec,
    rendered: &Rendered,
    at: &Placement,
    namespace: &str,
    run: &mut PodmanRun,
) -> anyhow::Result<()> {
    let PodSpec {
        active_deadline_seconds,
        affinity,
        automount_service_account_token,
        containers,
        dns_config,
        dns_policy,
        enable_service_links,
        ephemeral_containers,
        host_aliases,
        host_ipc,
        host_network,
        host_pid,
        host_users,
        hostname,
        hostname_override,
        image_pull_secrets,
        init_containers,
        node_name,
        node_selector,
        os,
        overhead,
        preemption_policy,
        priority,
        priority_class_name,
        readiness_gates,
        resource_claims,
        resources,
        restart_policy,
        runtime_class_name,
        scheduler_name,
        scheduling_gates,
        security_context,
        service_account,
        service_account_name,
        set_hostname_as_fqdn,
        share_process_namespace,
        subdomain,
        termination_grace_period_seconds,
        tolerations,
        topology_spread_constraints,
        volumes,
    } = spec;
    let p = "spec.template.spec";
    refuse!(p; active_deadline_seconds, dns_config, ephemeral_containers, host_aliases,
        hostname, hostname_override, image_pull_secrets, init_containers, overhead,
        resource_claims, resources, runtime_class_name, security_context,
        set_hostname_as_fqdn, subdomain);
    outside!(run.outside, p, "the scheduler's, no runtime flag"; affinity, node_name,
        node_selector, preemption_policy, priority, priority_class_name, readiness_gates,
        scheduler_name, scheduling_gates, tolerations, topology_spread_constraints);
    outside!(run.outside, p, "the API token and KUBERNETES_SERVICE_* come from the API \
        server and the kubelet: none in this guest, the agent runs without an API";
        automount_service_account_token, service_account, service_account_name);
    if let Some(os) = os {
        ensure!(os.name == "linux", "{p}.os.name {:?}: only linux", os.name);
    }
    if enable_service_links != &Some(false) {
        bail!(
            "{p}.enableServiceLinks is not false: the kubelet would put every Service of the \
             namespace into the environment; not translated"
        );
    }
    if share_process_namespace == &Some(true) {
        bail!("{p}.shareProcessNamespace: needs a podman pod; not translated");
    }
    if host_users == &Some(false) {
        bail!("{p}.hostUsers false: a user namespace per pod; not translated");
    }
    let host_network = host_network == &Some(true);
    let pod_ip = if host_network {
        &at.node_ip
    } else {
        &at.pod_ip
    };
    if host_network {
        run.args.push("--network=host".into());
    } else {
        run.args.push(format!("--network={}", at.network));
        run.args.push(format!("--ip={}", at.pod_ip));
        // A pod's hostname is its name (without hostNetwork).
        run.args.push(format!("--hostname={}", at.pod_name));
    }
    if host_pid == &Some(true) {
        run.args.push("--pid=host".into());
    }
    if host_ipc == &Some(true) {
        run.args.push("--ipc=host".into());
    }
    match dns_policy.as_deref() {
        None | Some("ClusterFirst" | "ClusterFirstWithHostNet" | "Default") => {
            run.outside.push(format!(
                "{p}.dnsPolicy {}: no cluster DNS here; podman gives the node's resolv.conf \
                 (as `Default` does)",
                dns_policy.as_deref().unwrap_or("(ClusterFirst)")
            ));
        }
        Some(other) => bail!("{p}.dnsPolicy {other:?}: not translated"),
    }
    match restart_policy.as_deref() {
        // A DaemonSet's pods restart always; podman counts the restarts (RestartCount).
        None | Some("Always") => run.args.push("--restart=always".into()),
        Some(other) => bail!("{p}.restartPolicy {other:?}: a DaemonSet pod restarts Always"),
    }
    if let Some(s) = termination_grace_period_seconds {
        run.args.push(format!("--stop-timeout={s}"));
    }
    let [container] = containers.as_slice() else {
        bail!(
            "{p}.containers: {} containers need a podman pod; translated: exactly one",
            containers.len()
        );
    };
    let volumes: BTreeMap<&str, &Volume> = volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let fields = Fields {
        pod_name: &at.pod_name,
        namespace,
        node_name: &at.node_name,
        node_ip: &at.node_ip,
        pod_ip,
        service_account: service_account_name.as_deref().unwrap_or("default"),
    };
    container_args(
        container,
        &fields,
        &volumes,
        rendered,
        at,
        host_network,
        run,
    )
}

/// The downward API's `fieldRef` values.
struct Fields<'a> {
    pod_name: &'a str,
    namespace: &'a str,
    node_name: &'a str,
    node_ip: &'a str,
    pod_ip: &'a str,
    service_account: &'a str,
}

fn container_args(
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
        mount(m, volumes, rendered, at, &p, run)?;
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
fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
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

fn mount(
    m: &VolumeMount,
    volumes: &BTreeMap<&str, &Volume>,
    rendered: &Rendered,
    at: &Placement,
    p: &str,
    run: &mut PodmanRun,
) -> anyhow::Result<()> {
    let VolumeMount {
        mount_path,
        mount_propagation,
        name,
        read_only,
        recursive_read_only,
        sub_path,
        sub_path_expr,
    } = m;
    let p = format!("{p}.volumeMounts[{name}]");
    refuse!(p; recursive_read_only, sub_path, sub_path_expr);
    let mut opts = Vec::new();
    if read_only == &Some(true) {
        opts.push("ro");
    }
    match mount_propagation.as_deref() {
        None | Some("None") => {}
        Some("HostToContainer") => opts.push("rslave"),
        Some("Bidirectional") => opts.push("rshared"),
        Some(other) => bail!("{p}.mountPropagation {other:?}: unknown"),
    }
    let volume = volumes
        .get(name.as_str())
        .with_context(|| format!("{p}: no volume {name:?} in the pod"))?;
    let bind = |source: &str, opts: &[&str]| {
        if opts.is_empty() {
            format!("--volume={source}:{mount_path}")
        } else {
            format!("--volume={source}:{mount_path}:{}", opts.join(","))
        }
    };
    match source(volume, &p)? {
        Source::HostPath(HostPathVolumeSource { path, type_ }) => {
            match type_.as_deref() {
                None | Some("") => {}
                Some("Directory") => run.dirs.push((path.clone(), false)),
                Some("DirectoryOrCreate") => run.dirs.push((path.clone(), true)),
                Some(other) => bail!("{p}: hostPath type {other:?} not translated"),
            }
            run.args.push(bind(path, &opts));
        }
        Source::ConfigMap(ConfigMapVolumeSource {
            default_mode,
            items,
            name: cm,
            optional,
        }) => {
            let at_cm = format!("{p}: configMap {cm}");
            ensure!(items.is_none(), "{at_cm}: items not translated");
            ensure!(
                default_mode.is_none_or(|m| m == 0o644),
                "{at_cm}: defaultMode not translated"
            );
            let found = rendered
                .config_maps
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(cm.as_str()));
            let Some(found) = found else {
                ensure!(
                    optional == &Some(true),
                    "{at_cm}: not in the rendered objects"
                );
                return Ok(());
            };
            ensure!(
                found.binary_data.is_none(),
                "{at_cm}: binaryData not translated"
            );
            let dir = format!("{}/{name}", at.volumes_dir);
            run.dirs.push((dir.clone(), true));
            for (key, text) in found.data.iter().flatten() {
                ensure!(!key.contains('/'), "{at_cm}: key {key:?}");
                run.files.push((format!("{dir}/{key}"), text.clone()));
            }
            // The kubelet mounts ConfigMaps read-only, whatever the mount says.
            let mut opts = opts.clone();
            if !opts.contains(&"ro") {
                opts.insert(0, "ro");
            }
            run.args.push(bind(&dir, &opts));
        }
        Source::EmptyDir(EmptyDirVolumeSource { medium, size_limit }) => match medium.as_deref() {
            Some("Memory") => {
                let mut spec = format!("--mount=type=tmpfs,destination={mount_path}");
                if let Some(q) = size_limit {
                    let bytes = ParsedQuantity::try_from(q)
                        .ok()
                        .and_then(|q| q.to_bytes_u64())
                        .with_context(|| format!("{p}: sizeLimit {:?}", q.0))?;
                    spec.push_str(&format!(",tmpfs-size={bytes}"));
                }
                if opts.contains(&"ro") {
                    spec.push_str(",ro=true");
                }
                run.args.push(spec);
            }
            None | Some("") => {
                ensure!(size_limit.is_none(), "{p}: disk sizeLimit not translated");
                let dir = format!("{}/{name}", at.volumes_dir);
                run.dirs.push((dir.clone(), true));
                run.args.push(bind(&dir, &opts));
            }
            Some(other) => bail!("{p}: emptyDir medium {other:?} not translated"),
        },
    }
    Ok(())
}

enum Source<'a> {
    HostPath(&'a HostPathVolumeSource),
    ConfigMap(&'a ConfigMapVolumeSource),
    EmptyDir(&'a EmptyDirVolumeSource),
}

fn source<'a>(v: &'a Volume, p: &str) -> anyhow::Result<Source<'a>> {
    let Volume {
        aws_elastic_block_store,
        azure_disk,
        azure_file,
        cephfs,
        cinder,
        config_map,
        csi,
        downward_api,
        empty_dir,
        ephemeral,
        fc,
        flex_volume,
        flocker,
        gce_persistent_disk,
        git_repo,
        glusterfs,
        host_path,
        image,
        iscsi,
        name: _,
        nfs,
        persistent_volume_claim,
        photon_persistent_disk,
        portworx_volume,
        projected,
        quobyte,
        rbd,
        scale_io,
        secret,
        storageos,
        vsphere_volume,
    } = v;
    let p = format!("{p} (volume)");
    refuse!(p; aws_elastic_block_store, azure_disk, azure_file, cephfs, cinder, csi,
        downward_api, ephemeral, fc, flex_volume, flocker, gce_persistent_disk, git_repo,
        glusterfs, image, iscsi, nfs, persistent_volume_claim, photon_persistent_disk,
        portworx_volume, projected, quobyte, rbd, scale_io, secret, storageos, vsphere_volume);
    Ok(match (host_path, config_map, empty_dir) {
        (Some(h), None, None) => Source::HostPath(h),
        (None, Some(c), None) => Source::ConfigMap(c),
        (None, None, Some(e)) => Source::EmptyDir(e),
        _ => bail!("{p}: not exactly one source"),
    })
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

/// `'...'` for `sh -c`: the guest's control shell takes one line.
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=:/.,@+%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
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
        assert_eq!(
            run.args[image + 1..],
            [
                "run",
                "--config=/etc/hotplug-agent/config.toml",
                "--node-name=vm-node",
                "--metrics-addr=10.88.0.10:9477",
                "--cgroup-root=/host/sys/fs/cgroup",
            ]
        );
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
}
