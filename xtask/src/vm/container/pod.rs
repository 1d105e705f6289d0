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
        core::v1::{ConfigMap, PodSpec, PodTemplateSpec, Volume},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
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

// After the macros: they are in scope in these files.
mod container;
mod volumes;

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
    container::container_args(
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
    pub pod_name: &'a str,
    pub namespace: &'a str,
    pub node_name: &'a str,
    pub node_ip: &'a str,
    pub pod_ip: &'a str,
    pub service_account: &'a str,
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
mod tests;
