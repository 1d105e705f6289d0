//! The deployment artefacts: `deploy/kubernetes` (Kustomize), `deploy/systemd`, the
//! `Dockerfile`. No root and no cluster needed.
//!
//! - Every Kustomize overlay is rendered with `kubectl kustomize` (offline) and every object
//!   is parsed into its k8s-openapi type *strictly*: k8s-openapi ignores unknown fields, so
//!   each object is deserialized, serialized back and compared with the original, and any
//!   field that did not survive (a typo, a field of another kind, a wrong level) fails with
//!   its path. Then the invariants the agent needs are checked per variant (probes, mounts,
//!   RBAC verbs, no user namespace, hostNetwork and privileged only where wanted, ...).
//! - The agent binary, where built, checks what the manifests and the unit hand it: every
//!   flag, every `HOTPLUG_AGENT_*` variable and every key of the config files must be one it
//!   accepts (`hotplug-agent config`).
//! - The systemd units are parsed and their key directives checked, and verified with
//!   `systemd-analyze verify` where it is installed.
//! - The Dockerfile follows the build recipe of `cargo xtask setup`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Display,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount,
            Volume, VolumeMount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "hotplug-agent";
const CONTAINER: &str = "agent";
const METRICS_PORT: i32 = 9477;
const BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Strict parsing into the Kubernetes API types
// ---------------------------------------------------------------------------------------

/// Every object of a rendered manifest, each parsed strictly into its API type.
#[derive(Debug, Default)]
struct Rendered {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    /// The namespaced rights: the fleet budgets' Leases.
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    /// What admits the critical priority class in the agent's namespace.
    quotas: Vec<ResourceQuota>,
    config_maps: Vec<ConfigMap>,
    /// The monitoring component's: Grafana dashboards (ConfigMaps labelled
    /// `grafana_dashboard`) and the Prometheus Operator's objects (no k8s-openapi type;
    /// tests/monitoring.rs checks them).
    dashboards: Vec<ConfigMap>,
    monitoring: Vec<Value>,
}

/// Parses a multi-document manifest; an error names the object and the offending path.
fn parse_manifests(yaml: &str) -> Result<Rendered, String> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| format!("not valid YAML: {e}"))?;
    if docs.is_empty() {
        return Err("no objects".into());
    }
    let mut out = Rendered::default();
    for (i, doc) in docs.iter().enumerate() {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let at = |e: String| format!("document {i} ({kind} {name}): {e}");
        match (api_version, kind) {
            ("v1", "Namespace") => out.namespaces.push(strict(doc).map_err(at)?),
            ("v1", "ServiceAccount") => out.service_accounts.push(strict(doc).map_err(at)?),
            ("v1", "Service") => out.services.push(strict(doc).map_err(at)?),
            ("v1", "ResourceQuota") => out.quotas.push(strict(doc).map_err(at)?),
            ("v1", "ConfigMap") if doc["metadata"]["labels"]["grafana_dashboard"].is_string() => {
                out.dashboards.push(strict(doc).map_err(at)?)
            }
            ("v1", "ConfigMap") => out.config_maps.push(strict(doc).map_err(at)?),
            ("monitoring.coreos.com/v1", "PodMonitor" | "ServiceMonitor" | "PrometheusRule") => {
                out.monitoring.push(doc.clone())
            }
            ("apps/v1", "DaemonSet") => out.daemon_sets.push(strict(doc).map_err(at)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                out.cluster_roles.push(strict(doc).map_err(at)?)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                out.bindings.push(strict(doc).map_err(at)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => out.roles.push(strict(doc).map_err(at)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                out.role_bindings.push(strict(doc).map_err(at)?)
            }
            _ => return Err(at(format!("unexpected object {api_version}/{kind}"))),
        }
    }
    Ok(out)
}

/// Deserializes `doc` into `T`, then requires that serializing it back gives `doc` again:
/// a field `T` does not know (which serde would silently drop) fails, with its path.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone())
        .map_err(|e| format!("does not parse as {}: {e}", std::any::type_name::<T>()))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("does not serialize: {e}"))?;
    let mut problems = Vec::new();
    compare("", doc, &back, &mut problems);
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(problems.join("; "))
    }
}

fn compare(path: &str, original: &Value, back: &Value, problems: &mut Vec<String>) {
    let field = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                match b.get(key) {
                    Some(v) => compare(&field(key), value, v, problems),
                    // An explicit null is the same as an absent optional field.
                    None if value.is_null() => {}
                    None => problems.push(format!("unknown field `{}`", field(key))),
                }
            }
            for key in b.keys().filter(|k| !o.contains_key(*k)) {
                problems.push(format!("`{}` appeared in the round trip", field(key)));
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (o, b)) in o.iter().zip(b).enumerate() {
                compare(&format!("{path}[{i}]"), o, b, problems);
            }
        }
        (o, b) if o == b => {}
        (o, b) => problems.push(format!("`{path}`: {o} became {b}")),
    }
}

// ---------------------------------------------------------------------------------------
// Tools: kubectl, the agent binary, systemd-analyze
// ---------------------------------------------------------------------------------------

fn have(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).output() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("running {program}: {e}"),
    }
}

fn kubectl() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let found = have("kubectl", &["version", "--client"]);
        if !found {
            eprintln!(
                "\n!!! SKIPPED: kubectl is not installed, so the Kustomize manifests are NOT \
                 rendered nor checked.\n!!! Install kubectl (it renders offline) and run \
                 again.\n"
            );
        }
        found
    })
}

/// `kubectl kustomize DIR`, or `None` (loudly) without kubectl.
fn render(dir: &Path) -> Option<String> {
    if !kubectl() {
        return None;
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("UTF-8 output"))
}

/// The agent binary (`HOTPLUG_AGENT_BIN`, as `cargo xtask test` sets it, else
/// target/debug), or `None` (loudly) when it has not been built.
fn agent_bin() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = std::env::var_os("HOTPLUG_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/hotplug-agent"));
        if path.exists() {
            Some(path)
        } else {
            eprintln!(
                "\n!!! SKIPPED: {} is not built, so the flags, variables and config keys of \
                 the manifests are NOT checked against the agent.\n!!! Run `cargo build -p \
                 hotplug-agent` (or `cargo xtask test`) first.\n",
                path.display()
            );
            None
        }
    })
    .clone()
}

/// What `hotplug-agent config ARGS` prints with exactly `env`: `key -> (value, source)`.
/// Panics, with the agent's message, when it refuses a flag, a variable or a config key.
fn agent_config(
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
    what: &str,
) -> BTreeMap<String, (String, String)> {
    let out = Command::new(bin)
        .args(["config", "--local"])
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running hotplug-agent config");
    assert!(
        out.status.success(),
        "{what}: the agent refuses its settings ({}):\n{}\nargs {args:?}\nenv {env:?}\n(a stale \
         binary? `cargo build -p hotplug-agent`)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut settings = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `key = "value"  # source`, or `# key (unset)`, or `# config file: PATH`.
        let Some((setting, source)) = line.rsplit_once("  # ") else {
            continue;
        };
        let Some((key, value)) = setting.split_once(" = ") else {
            continue;
        };
        let value = value.trim_matches('"').to_string();
        settings.insert(key.to_string(), (value, source.to_string()));
    }
    assert!(
        !settings.is_empty(),
        "{what}: no settings in the output of `hotplug-agent config`"
    );
    settings
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refresh {
    None,
    Systemd,
    Command,
}

impl Refresh {
    fn flag(self) -> &'static str {
        match self {
            Refresh::None => "none",
            Refresh::Systemd => "systemd",
            Refresh::Command => "command",
        }
    }
}

/// What a rendered variant must be.
#[derive(Clone, Copy, Debug)]
struct Variant {
    name: &'static str,
    privileged: bool,
    refresh: Refresh,
    drain_and_reset: bool,
    /// `None`: `hotplug-agent:<the agent's version>`.
    image: Option<&'static str>,
}

const fn variant(name: &'static str) -> Variant {
    Variant {
        name,
        privileged: false,
        refresh: Refresh::None,
        drain_and_reset: false,
        image: None,
    }
}

/// Every overlay in deploy/kubernetes/overlays, and what it must render to.
const OVERLAYS: [Variant; 7] = [
    variant("capabilities"),
    Variant {
        privileged: true,
        ..variant("privileged")
    },
    Variant {
        refresh: Refresh::Systemd,
        ..variant("refresh-systemd")
    },
    Variant {
        refresh: Refresh::Command,
        ..variant("refresh-command")
    },
    Variant {
        refresh: Refresh::Systemd,
        drain_and_reset: true,
        ..variant("drain-and-reset")
    },
    Variant {
        refresh: Refresh::Systemd,
        image: Some("registry.example.com/platform/hotplug-agent:0.1.0"),
        ..variant("example")
    },
    variant("monitoring"),
];

/// Collects every violated invariant of one variant, to report them all at once.
struct Checker {
    variant: &'static str,
    problems: Vec<String>,
}

impl Checker {
    fn check(&mut self, ok: bool, what: impl Display) {
        if !ok {
            self.problems.push(what.to_string());
        }
    }

    fn finish(self) {
        assert!(
            self.problems.is_empty(),
            "{}: {} problem(s):\n  - {}",
            self.variant,
            self.problems.len(),
            self.problems.join("\n  - ")
        );
    }
}

fn agent_version() -> String {
    read("agent/Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("a version in agent/Cargo.toml")
        .to_string()
}

fn volume<'a>(pod: &'a PodSpec, mount: &VolumeMount) -> Option<&'a Volume> {
    pod.volumes.iter().flatten().find(|v| v.name == mount.name)
}

fn host_path<'a>(pod: &'a PodSpec, mount: &VolumeMount) -> Option<&'a str> {
    volume(pod, mount)?
        .host_path
        .as_ref()
        .map(|h| h.path.as_str())
}

/// The mount that carries `path` (the longest mountPath that contains it).
fn mount_of<'a>(container: &'a Container, path: &str) -> Option<&'a VolumeMount> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            path == m.mount_path
                || path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/')))
        })
        .max_by_key(|m| m.mount_path.len())
}

/// The host's path behind a path in the container, where a hostPath volume holds it.
fn host_path_of(pod: &PodSpec, container: &Container, path: &str) -> Option<String> {
    let mount = mount_of(container, path)?;
    let host = host_path(pod, mount)?;
    Some(format!("{host}{}", &path[mount.mount_path.len()..]))
}

fn literal_env(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn field_env(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone())
}

/// `rules` as `(apiGroup, resource) -> verbs`; wildcards and resourceNames are problems.
fn rbac(rendered: &Rendered, c: &mut Checker) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let roles = rendered
        .cluster_roles
        .iter()
        .map(|r| (&r.metadata, &r.rules))
        .chain(rendered.roles.iter().map(|r| (&r.metadata, &r.rules)));
    for (meta, rules) in roles {
        let name = meta.name.clone().unwrap_or_default();
        for rule in rules.iter().flatten() {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            for word in groups.iter().chain(&resources).chain(&rule.verbs) {
                c.check(
                    !word.contains('*'),
                    format!("ClusterRole {name}: wildcard {word:?}"),
                );
            }
            c.check(
                rule.non_resource_urls.is_none(),
                format!("ClusterRole {name}: nonResourceURLs"),
            );
            for group in &groups {
                for resource in &resources {
                    granted
                        .entry((group.clone(), resource.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
    }
    granted
}

fn expected_rbac(v: &Variant) -> BTreeMap<(String, String), BTreeSet<String>> {
    // The same as tests/controller.rs derives from the agent's requests
    // (`the_deployed_rbac_is_exactly_what_the_agent_calls`), per variant.
    let mut rules = vec![
        ("", "nodes", vec!["get", "list", "watch", "patch"]),
        ("", "pods", vec!["list", "watch"]),
        ("", "nodes/status", vec!["patch"]),
        ("events.k8s.io", "events", vec!["create", "patch"]),
        (
            "coordination.k8s.io",
            "leases",
            vec!["get", "list", "watch", "create", "update"],
        ),
    ];
    if v.drain_and_reset {
        rules.extend([
            ("", "pods", vec!["list"]),
            ("", "pods/eviction", vec!["create"]),
        ]);
    }
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (group, resource, verbs) in rules {
        out.entry((group.into(), resource.into()))
            .or_default()
            .extend(verbs.into_iter().map(String::from));
    }
    out
}

/// Every invariant of one rendered variant.
fn check_variant(v: &Variant, yaml: &str) {
    let rendered = parse_manifests(yaml).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    let mut c = Checker {
        variant: v.name,
        problems: Vec::new(),
    };

    // One of each, in our namespace.
    let counts = [
        ("Namespace", rendered.namespaces.len()),
        ("ServiceAccount", rendered.service_accounts.len()),
        ("DaemonSet", rendered.daemon_sets.len()),
        ("Service", rendered.services.len()),
        ("ResourceQuota", rendered.quotas.len()),
        ("ConfigMap", rendered.config_maps.len()),
    ];
    for (kind, n) in counts {
        c.check(n == 1, format!("{n} {kind} objects, expected 1"));
    }
    let ns = &rendered.namespaces[0];
    c.check(
        ns.metadata.name.as_deref() == Some(NAMESPACE),
        "the Namespace is not hotplug-agent",
    );
    c.check(
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
            .map(String::as_str)
            == Some("privileged"),
        "the Namespace does not admit the agent's pod (pod-security enforce: privileged)",
    );
    let namespaced = rendered
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(rendered.daemon_sets.iter().map(|o| &o.metadata))
        .chain(rendered.services.iter().map(|o| &o.metadata))
        .chain(rendered.quotas.iter().map(|o| &o.metadata))
        .chain(rendered.config_maps.iter().map(|o| &o.metadata));
    for meta in namespaced {
        c.check(
            meta.namespace.as_deref() == Some(NAMESPACE),
            format!("{:?} is not in namespace {NAMESPACE}", meta.name),
        );
    }

    // RBAC: exactly the verbs the agent uses, bound to its ServiceAccount.
    let sa = rendered.service_accounts[0]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    let granted = rbac(&rendered, &mut c);
    let expected = expected_rbac(v);
    c.check(
        granted == expected,
        format!("RBAC grants {granted:?}, expected exactly {expected:?}"),
    );
    let roles: BTreeSet<_> = rendered
        .cluster_roles
        .iter()
        .filter_map(|r| r.metadata.name.clone())
        .collect();
    let mut bound = BTreeSet::new();
    for b in &rendered.bindings {
        let name = b.metadata.name.clone().unwrap_or_default();
        c.check(
            b.role_ref.kind == "ClusterRole" && roles.contains(&b.role_ref.name),
            format!("ClusterRoleBinding {name} refers to a missing role"),
        );
        bound.insert(b.role_ref.name.clone());
        let subjects = b.subjects.clone().unwrap_or_default();
        c.check(
            subjects.len() == 1
                && subjects[0].kind == "ServiceAccount"
                && subjects[0].name == sa
                && subjects[0].namespace.as_deref() == Some(NAMESPACE),
            format!("ClusterRoleBinding {name} binds {subjects:?}, not the agent's account"),
        );
    }
    c.check(bound == roles, format!("roles {roles:?}, bound {bound:?}"));
    // The Lease Role in the agent's namespace, the Event Role in `default` (where Events
    // about a Node belong), each bound there to the agent's account.
    for b in &rendered.role_bindings {
        let name = b.metadata.name.clone().unwrap_or_default();
        let subjects = b.subjects.clone().unwrap_or_default();
        c.check(
            b.role_ref.kind == "Role"
                && rendered.roles.iter().any(|r| {
                    r.metadata.name.as_ref() == Some(&b.role_ref.name)
                        && r.metadata.namespace == b.metadata.namespace
                })
                && subjects.len() == 1
                && subjects[0].name == sa
                && subjects[0].namespace.as_deref() == Some(NAMESPACE),
            format!(
                "RoleBinding {name} does not bind a Role of its namespace to the agent's account"
            ),
        );
    }
    let role_namespaces: BTreeMap<_, _> = rendered
        .roles
        .iter()
        .map(|r| {
            let rule = r.rules.iter().flatten().next();
            let resource = rule
                .and_then(|r| r.resources.as_ref())
                .and_then(|r| r.first().cloned())
                .unwrap_or_default();
            (resource, r.metadata.namespace.clone().unwrap_or_default())
        })
        .collect();
    c.check(
        role_namespaces
            == BTreeMap::from([
                ("events".to_owned(), "default".to_owned()),
                ("leases".to_owned(), NAMESPACE.to_owned()),
            ])
            && rendered.role_bindings.len() == 2,
        format!(
            "Roles by resource and namespace {role_namespaces:?}: the Event Role belongs in \
             `default`, the Lease Role in {NAMESPACE}, each bound once"
        ),
    );

    // The DaemonSet.
    let ds = &rendered.daemon_sets[0];
    let Some(spec) = ds.spec.as_ref() else {
        c.check(false, "the DaemonSet has no spec");
        return c.finish();
    };
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone());
    let template_labels = template_labels.unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    c.check(
        !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| template_labels.get(k) == Some(v)),
        "the DaemonSet's selector does not match its pods",
    );
    let strategy = spec.update_strategy.as_ref();
    let max_unavailable = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref());
    let gentle = match max_unavailable {
        Some(IntOrString::Int(n)) => *n == 1,
        Some(IntOrString::String(s)) => s == "10%",
        None => false,
    };
    c.check(
        strategy.and_then(|s| s.type_.as_deref()) == Some("RollingUpdate") && gentle,
        "updateStrategy is not RollingUpdate with maxUnavailable 10% or 1",
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let port = METRICS_PORT.to_string();
    for (key, value) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", port.as_str()),
        ("prometheus.io/path", "/metrics"),
    ] {
        c.check(
            annotations.get(key).map(String::as_str) == Some(value),
            format!("pod annotation {key} is not {value:?}"),
        );
    }

    let Some(pod) = spec.template.spec.as_ref() else {
        c.check(false, "the DaemonSet has no pod spec");
        return c.finish();
    };
    // No user namespace: uevents reach only network namespaces of the initial one.
    c.check(
        pod.host_users != Some(false),
        "hostUsers: false (the pod would receive no kernel uevents)",
    );
    c.check(
        pod.host_pid != Some(true),
        "hostPID (systemd is reached over D-Bus)",
    );
    c.check(pod.host_ipc != Some(true), "hostIPC");
    // Kernel uevents reach the pod's own network namespace; no source needs the host's.
    c.check(pod.host_network != Some(true), "hostNetwork");
    c.check(
        pod.priority_class_name.as_deref() == Some("system-node-critical"),
        "priorityClassName is not system-node-critical",
    );
    // Clusters that limit the critical priority classes admit the pod outside kube-system
    // only with a quota scoped to its class in its namespace (checked above).
    let quota = rendered
        .quotas
        .first()
        .and_then(|q| q.spec.clone())
        .unwrap_or_default();
    let scoped = quota
        .scope_selector
        .iter()
        .flat_map(|s| s.match_expressions.iter().flatten())
        .any(|e| {
            e.scope_name == "PriorityClass"
                && e.operator == "In"
                && e.values
                    .iter()
                    .flatten()
                    .any(|v| Some(v) == pod.priority_class_name.as_ref())
        });
    c.check(
        scoped,
        "no ResourceQuota scoped to the pod's priority class (PriorityClass In [...])",
    );
    let pods = quota.hard.as_ref().and_then(|h| h.get("pods"));
    c.check(
        pods.and_then(|q| q.0.parse::<u64>().ok()).is_some_and(|n| n >= 5000),
        format!("the quota's pods {pods:?} could refuse the DaemonSet's pods (one per node, 5,000 nodes)"),
    );
    c.check(
        pod.service_account_name.as_deref() == Some(sa.as_str()),
        "the pod does not run as the agent's ServiceAccount",
    );
    c.check(
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        }),
        "no toleration `operator: Exists` (every taint of every node)",
    );

    let Some(agent) = pod.containers.iter().find(|c| c.name == CONTAINER) else {
        c.check(false, "no container named agent");
        return c.finish();
    };
    let image = v
        .image
        .map(String::from)
        .unwrap_or_else(|| format!("hotplug-agent:{}", agent_version()));
    c.check(
        agent.image.as_deref() == Some(image.as_str()),
        format!("image {:?}, expected {image}", agent.image),
    );

    // Probes and the metrics port.
    let metrics = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"));
    c.check(
        metrics.is_some_and(|p| p.container_port == METRICS_PORT),
        "no container port `metrics` 9477",
    );
    let metrics_port = IntOrString::String("metrics".into());
    for (what, probe, path) in [
        ("liveness", &agent.liveness_probe, "/healthz"),
        ("readiness", &agent.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        c.check(
            get.is_some_and(|g| g.path.as_deref() == Some(path) && g.port == metrics_port),
            format!("{what} probe is not GET {path} on port `metrics`"),
        );
    }

    // Downward API and arguments.
    c.check(
        field_env(agent, "NODE_NAME").as_deref() == Some("spec.nodeName"),
        "NODE_NAME is not from fieldRef spec.nodeName",
    );
    c.check(
        field_env(agent, "POD_IP").as_deref() == Some("status.podIP"),
        "POD_IP is not from fieldRef status.podIP",
    );
    let args = agent.args.clone().unwrap_or_default();
    c.check(
        args.first().map(String::as_str) == Some("run"),
        "the agent does not `run`",
    );
    // Settings are variables, so that `hotplug-agent config` run in the container (which
    // inherits them, not the main process's arguments) describes what the agent runs with.
    c.check(
        args == ["run"],
        format!("arguments {args:?}: settings belong in env"),
    );
    c.check(
        literal_env(agent, "HOTPLUG_AGENT_METRICS_ADDR").as_deref()
            == Some(format!("$(POD_IP):{METRICS_PORT}").as_str()),
        "HOTPLUG_AGENT_METRICS_ADDR is not $(POD_IP):9477",
    );
    let resources = agent.resources.as_ref();
    let requests = resources
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    let limits = resources.and_then(|r| r.limits.clone()).unwrap_or_default();
    c.check(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "no cpu and memory requests",
    );
    c.check(limits.contains_key("memory"), "no memory limit");

    // Security context.
    let sc = agent.security_context.clone().unwrap_or_default();
    c.check(
        (sc.privileged == Some(true)) == v.privileged,
        format!("privileged {:?}, wanted {}", sc.privileged, v.privileged),
    );
    c.check(sc.run_as_user == Some(0), "not runAsUser 0");
    if !v.privileged {
        let caps = sc.capabilities.clone().unwrap_or_default();
        let add: BTreeSet<_> = caps.add.iter().flatten().map(String::as_str).collect();
        let drop: BTreeSet<_> = caps.drop.iter().flatten().map(String::as_str).collect();
        c.check(
            add == BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]),
            format!("capabilities add {add:?}"),
        );
        c.check(
            drop == BTreeSet::from(["ALL"]),
            format!("capabilities drop {drop:?}"),
        );
        c.check(
            sc.allow_privilege_escalation == Some(false),
            "allowPrivilegeEscalation is not false",
        );
    }

    // Mounts: every one backed by a volume; the host paths the agent needs.
    for mount in agent.volume_mounts.iter().flatten() {
        c.check(
            volume(pod, mount).is_some(),
            format!("mount {} has no volume {}", mount.mount_path, mount.name),
        );
    }
    let kubelet_read_only = !v.drain_and_reset;
    let host_mounts = [
        ("/sys/kernel/btf", "/sys/kernel/btf", Some(true)),
        ("/sys/kernel/tracing", "/sys/kernel/tracing", None),
        (
            "/var/lib/kubelet",
            "/var/lib/kubelet",
            Some(kubelet_read_only),
        ),
        ("/host/sys/fs/cgroup", "/sys/fs/cgroup", Some(true)),
    ];
    for (path, host, read_only) in host_mounts {
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path);
        let Some(mount) = mount else {
            c.check(false, format!("no mount at {path}"));
            continue;
        };
        c.check(
            host_path(pod, mount) == Some(host),
            format!("{path} is not the host's {host}"),
        );
        if let Some(read_only) = read_only {
            c.check(
                mount.read_only.unwrap_or(false) == read_only,
                format!("{path}: readOnly {:?}, wanted {read_only}", mount.read_only),
            );
        }
    }
    // The agent pins nothing (no bpffs) and needs no other host path.
    let allowed = |host: &str| {
        host_mounts.iter().any(|(_, h, _)| *h == host)
            || host.starts_with("/run/dbus")
            || host.starts_with("/run/hotplug-agent-refresh")
    };
    for v in pod.volumes.iter().flatten() {
        if let Some(h) = &v.host_path {
            c.check(
                allowed(&h.path),
                format!("hostPath {} is not used by the agent", h.path),
            );
        }
    }
    let kubelet = mount_of(agent, "/var/lib/kubelet");
    c.check(
        kubelet.and_then(|m| m.mount_propagation.as_deref()) == Some("HostToContainer"),
        "/var/lib/kubelet without mountPropagation HostToContainer (would pin pod volumes)",
    );
    c.check(
        literal_env(agent, "HOTPLUG_AGENT_CGROUP_ROOT").as_deref() == Some("/host/sys/fs/cgroup"),
        "HOTPLUG_AGENT_CGROUP_ROOT does not point at the host's cgroup mount",
    );

    // The config file: a mounted ConfigMap with config.toml, named by HOTPLUG_AGENT_CONFIG.
    let cm = &rendered.config_maps[0];
    let config_toml = cm.data.as_ref().and_then(|d| d.get("config.toml"));
    c.check(config_toml.is_some(), "the ConfigMap has no config.toml");
    let config_arg = literal_env(agent, "HOTPLUG_AGENT_CONFIG");
    let config_arg = config_arg.as_deref();
    let config_mount = config_arg.and_then(|p| mount_of(agent, p));
    let config_volume = config_mount.and_then(|m| volume(pod, m));
    c.check(
        config_arg.is_some_and(|p| p.ends_with("/config.toml"))
            && config_volume
                .and_then(|v| v.config_map.as_ref())
                .is_some_and(|cmv| Some(&cmv.name) == cm.metadata.name.as_ref()),
        "HOTPLUG_AGENT_CONFIG does not name config.toml of the generated ConfigMap",
    );

    // Refresh backend and what it needs.
    let refresh = literal_env(agent, "HOTPLUG_AGENT_REFRESH");
    c.check(
        refresh.as_deref() == Some(v.refresh.flag()),
        format!(
            "HOTPLUG_AGENT_REFRESH {refresh:?}, wanted {}",
            v.refresh.flag()
        ),
    );
    let dbus_mounted = pod.volumes.iter().flatten().any(|v| {
        v.host_path
            .as_ref()
            .is_some_and(|h| h.path.starts_with("/run/dbus"))
    });
    c.check(
        dbus_mounted == (v.refresh == Refresh::Systemd),
        format!(
            "host D-Bus mounted: {dbus_mounted}, refresh {:?}",
            v.refresh
        ),
    );
    if v.refresh == Refresh::Systemd {
        let bus = literal_env(agent, "HOTPLUG_AGENT_SYSTEMD_BUS").unwrap_or_default();
        let socket = bus.strip_prefix("unix:path=").unwrap_or_default();
        c.check(
            host_path_of(pod, agent, socket).as_deref() == Some(BUS_SOCKET),
            format!("--systemd-bus {bus:?} is not the host's {BUS_SOCKET}"),
        );
    }
    if v.refresh == Refresh::Command {
        let command = literal_env(agent, "HOTPLUG_AGENT_REFRESH_COMMAND").unwrap_or_default();
        let request = command.split_whitespace().last().unwrap_or_default();
        let writable = mount_of(agent, request).is_some_and(|m| m.read_only != Some(true));
        c.check(writable, format!("{request} is not on a writable mount"));
        let host = host_path_of(pod, agent, request);
        let path_unit = read("deploy/systemd/kubelet-refresh.path");
        let watched = unit_values(&path_unit, "Path", "PathExists");
        c.check(
            host.as_ref().is_some_and(|h| watched.contains(h)),
            format!("the refresh command writes the host's {host:?}, kubelet-refresh.path watches {watched:?}"),
        );
    }
    let policy = literal_env(agent, "HOTPLUG_AGENT_STATIC_POLICY");
    c.check(
        (policy.as_deref() == Some("drain-and-reset")) == v.drain_and_reset,
        format!("HOTPLUG_AGENT_STATIC_POLICY {policy:?}"),
    );

    // The Service: headless, on the metrics port of these pods.
    let svc = rendered.services[0].spec.clone().unwrap_or_default();
    c.check(
        svc.cluster_ip.as_deref() == Some("None"),
        "the Service is not headless",
    );
    let svc_selector = svc.selector.unwrap_or_default();
    c.check(
        !svc_selector.is_empty()
            && svc_selector
                .iter()
                .all(|(k, v)| template_labels.get(k) == Some(v)),
        "the Service does not select the agent's pods",
    );
    c.check(
        svc.ports.iter().flatten().any(|p| {
            p.name.as_deref() == Some("metrics")
                && p.port == METRICS_PORT
                && p.target_port.as_ref() == Some(&metrics_port)
        }),
        "the Service has no port `metrics` 9477 -> metrics",
    );

    // What the agent itself makes of the flags, variables and config.toml.
    if let (Some(bin), Some(toml)) = (agent_bin(), config_toml) {
        check_with_agent(&bin, v, agent, pod, toml, &mut c);
    }
    c.finish();
}

/// Runs `hotplug-agent config` with the container's arguments, literal environment and the
/// rendered config.toml: every flag, variable and key must be accepted, and take effect.
fn check_with_agent(
    bin: &Path,
    v: &Variant,
    agent: &Container,
    pod: &PodSpec,
    toml: &str,
    c: &mut Checker,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, toml).expect("writing config.toml");
    let args: Vec<String> = agent
        .args
        .iter()
        .flatten()
        .skip(1)
        .map(|a| {
            if a.starts_with("--config=") {
                format!("--config={}", file.display())
            } else {
                a.replace("$(NODE_NAME)", "node-a")
                    .replace("$(POD_IP)", "10.1.2.3")
            }
        })
        .collect();
    let env: Vec<(String, String)> = agent
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let value = match e.name.as_str() {
                "HOTPLUG_AGENT_CONFIG" => file.display().to_string(),
                _ => e.value.clone()?.replace("$(POD_IP)", "10.1.2.3"),
            };
            Some((e.name.clone(), value))
        })
        .chain([("NODE_NAME".to_owned(), "node-a".to_owned())])
        .collect();
    let settings = agent_config(bin, &args, &env, v.name);
    let get = |key: &str| settings.get(key).cloned().unwrap_or_default();
    for (name, _) in &env {
        c.check(
            settings
                .values()
                .any(|(_, source)| source == &format!("env {name}")),
            format!("the agent does not read the variable {name}"),
        );
    }
    c.check(
        get("node_name").0 == "node-a",
        "--node-name (NODE_NAME) did not take effect",
    );
    c.check(
        get("metrics_addr").0 == format!("10.1.2.3:{METRICS_PORT}"),
        "--metrics-addr did not take effect",
    );
    c.check(get("refresh").0 == v.refresh.flag(), "the refresh backend");
    c.check(
        settings.values().any(|(_, source)| source == "file"),
        "nothing came from config.toml",
    );
    // The stream socket's directory is the writable emptyDir.
    let socket = get("stream_socket").0;
    let run = mount_of(agent, &socket);
    c.check(
        run.and_then(|m| volume(pod, m))
            .is_some_and(|v| v.empty_dir.is_some())
            && run.is_some_and(|m| m.read_only != Some(true)),
        format!("the stream socket {socket} is not on a writable emptyDir"),
    );
    // The kubelet root the agent reads is the mounted one.
    let kubelet_root = get("kubelet_root_dir").0;
    c.check(
        host_path_of(pod, agent, &kubelet_root).as_deref() == Some("/var/lib/kubelet"),
        format!("--kubelet-root-dir {kubelet_root} is not the host's /var/lib/kubelet"),
    );
}

#[test]
fn every_overlay_renders_strictly_typed_with_its_invariants() {
    let overlays = repo().join("deploy/kubernetes/overlays");
    // Every overlay on disk has an entry in OVERLAYS, and every entry a directory.
    let on_disk: BTreeSet<String> = std::fs::read_dir(&overlays)
        .expect("deploy/kubernetes/overlays")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let known: BTreeSet<String> = OVERLAYS.iter().map(|v| v.name.to_string()).collect();
    assert_eq!(
        on_disk, known,
        "overlays on disk vs. the variants this test knows"
    );

    for v in &OVERLAYS {
        if let Some(yaml) = render(&overlays.join(v.name)) {
            check_variant(v, &yaml);
        }
    }
}

#[test]
fn base_renders_as_the_default_variant() {
    if let Some(yaml) = render(&repo().join("deploy/kubernetes/base")) {
        check_variant(&variant("base"), &yaml);
    }
}

/// The components combine: all of them at once (privileged, systemd refresh,
/// drain-and-reset) in an operator's own kustomization outside this repository.
#[test]
fn components_compose_in_an_operators_overlay() {
    let components = repo().join("deploy/kubernetes/components");
    let mut names: Vec<String> = std::fs::read_dir(&components)
        .expect("deploy/kubernetes/components")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    // Every component is exercised by some overlay.
    for name in &names {
        let used = OVERLAYS.iter().any(|v| {
            read(format!(
                "deploy/kubernetes/overlays/{}/kustomization.yaml",
                v.name
            ))
            .contains(&format!("components/{name}\n"))
        });
        assert!(used, "component {name} is in no overlay");
    }
    // refresh-command and refresh-systemd are alternatives; the rest stack.
    let dir = tempfile::tempdir().expect("tempdir");
    // Kustomize takes relative paths only.
    let up = relative(dir.path(), &repo());
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n\
         components:\n",
        up.join("deploy/kubernetes/base").display()
    );
    for name in ["privileged", "refresh-systemd", "drain-and-reset"] {
        assert!(names.iter().any(|n| n == name), "no component {name}");
        let component = up.join("deploy/kubernetes/components").join(name);
        kustomization.push_str(&format!("  - {}\n", component.display()));
    }
    std::fs::write(dir.path().join("kustomization.yaml"), kustomization).expect("writing");
    if let Some(yaml) = render(dir.path()) {
        check_variant(
            &Variant {
                privileged: true,
                refresh: Refresh::Systemd,
                drain_and_reset: true,
                ..variant("privileged+refresh-systemd+drain-and-reset")
            },
            &yaml,
        );
    }
}

/// `to` as a path relative to the directory `from`.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().expect("canonical path");
    let to = to.canonicalize().expect("canonical path");
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    to.components().skip(common).for_each(|c| out.push(c));
    out
}

/// The example overlay's knobs take effect: image, config.toml, resources, nodeSelector.
#[test]
fn the_example_overlays_knobs_take_effect() {
    let Some(yaml) = render(&repo().join("deploy/kubernetes/overlays/example")) else {
        return;
    };
    let rendered = parse_manifests(&yaml).expect("strict parse");
    let config = rendered.config_maps[0].data.clone().unwrap_or_default();
    assert_eq!(
        config.get("config.toml"),
        Some(&read("deploy/kubernetes/overlays/example/config.toml")),
        "the overlay's config.toml replaces the base's"
    );
    let pod = rendered.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let selector = pod.node_selector.clone().unwrap_or_default();
    assert_eq!(
        selector.get("example.com/hotplug").map(String::as_str),
        Some("true")
    );
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .expect("agent");
    let limits = agent
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
}

/// The strict check catches what a lenient parse would drop: a misspelled field, a field at
/// the wrong level, a value of the wrong type.
#[test]
fn a_broken_manifest_fails_the_strict_check() {
    let daemon_set = |container_extra: &str, pod_extra: &str| {
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  selector:\n    \
             matchLabels: {{app: x}}\n  template:\n    metadata:\n      labels: {{app: x}}\n    \
             spec:\n{pod_extra}      containers:\n        - name: agent\n          image: x\n\
             {container_extra}"
        )
    };
    // Free-form maps (labels) and known fields pass.
    let ok = daemon_set(
        "          readinessProbe:\n            httpGet: {path: /readyz, port: metrics}\n",
        "      hostNetwork: false\n",
    );
    parse_manifests(&ok).expect("a correct DaemonSet passes");

    let cases = [
        (
            // A typo in a field name.
            daemon_set(
                "          readinesProbe:\n            httpGet: {path: /readyz, port: metrics}\n",
                "",
            ),
            "spec.template.spec.containers[0].readinesProbe",
        ),
        (
            // A pod field put on the container.
            daemon_set("          hostNetwork: true\n", ""),
            "spec.template.spec.containers[0].hostNetwork",
        ),
        (
            // A misspelled nested field.
            daemon_set(
                "          volumeMounts:\n            - {name: k, mountPath: /k, \
                 mountPropagaton: HostToContainer}\n",
                "",
            ),
            "spec.template.spec.containers[0].volumeMounts[0].mountPropagaton",
        ),
        (
            // The wrong type.
            daemon_set("", "      hostNetwork: yes-please\n"),
            "does not parse",
        ),
        (
            // A kind this deployment has no business shipping.
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n".to_string(),
            "unexpected object v1/Secret",
        ),
    ];
    for (yaml, expected) in cases {
        let err = parse_manifests(&yaml).expect_err(&format!("accepted:\n{yaml}"));
        assert!(
            err.contains(expected),
            "error {err:?} does not name {expected:?}"
        );
    }

    // The same through a second document and an RBAC kind.
    let two = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\napiVersion: \
               rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: r\nrules:\n  \
               - apiGroups: [\"\"]\n    resources: [nodes]\n    verbs: [get]\n    \
               resourceName: [n]\n";
    let err = parse_manifests(two).expect_err("a misspelled rule field");
    assert!(err.contains("document 1 (ClusterRole r)"), "{err}");
    assert!(err.contains("rules[0].resourceName"), "{err}");
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

/// A unit file as `section -> [(key, value)]`, in order (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("line {}: outside a section", n + 1));
        sections
            .entry(section)
            .or_default()
            .push((key.trim().to_string(), value.trim().to_string()));
    }
    sections
}

fn unit_values(text: &str, section: &str, key: &str) -> Vec<String> {
    parse_unit(text)
        .get(section)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

/// The service's directives, each a single value (a repeated key is a problem, except the
/// few that systemd accumulates).
fn service_directives(text: &str) -> BTreeMap<(String, String), String> {
    const ACCUMULATE: [&str; 5] = [
        "ReadWritePaths",
        "ReadOnlyPaths",
        "SystemCallFilter",
        "After",
        "Wants",
    ];
    let mut out = BTreeMap::new();
    for (section, entries) in parse_unit(text) {
        for (key, value) in entries {
            let slot = out
                .entry((section.clone(), key.clone()))
                .or_insert_with(String::new);
            assert!(
                slot.is_empty() || ACCUMULATE.contains(&key.as_str()),
                "[{section}] {key} set twice"
            );
            if !slot.is_empty() {
                slot.push(' ');
            }
            slot.push_str(&value);
        }
    }
    out
}

#[test]
fn systemd_unit_has_the_directives_the_agent_needs() {
    let unit = read("deploy/systemd/hotplug-agent.service");
    let d = service_directives(&unit);
    let get = |section: &str, key: &str| d.get(&(section.into(), key.into())).cloned();
    let words = |section: &str, key: &str| -> BTreeSet<String> {
        get(section, key)
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let set =
        |items: &[&str]| -> BTreeSet<String> { items.iter().map(|s| s.to_string()).collect() };

    let exact = [
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        ("Service", "WatchdogSec", "30s"),
        ("Service", "MemoryMax", "128M"),
        ("Service", "TasksMax", "256"),
        (
            "Unit",
            "Documentation",
            "file:/usr/local/share/doc/hotplug-agent/README.md",
        ),
        ("Service", "Restart", "on-failure"),
        ("Service", "EnvironmentFile", "-/etc/default/hotplug-agent"),
        ("Service", "RuntimeDirectory", "hotplug-agent"),
        // $STATE_DIRECTORY: the default --state-dir, the guard rails' history.
        ("Service", "StateDirectory", "hotplug-agent"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "SystemCallArchitectures", "native"),
        ("Service", "LockPersonality", "yes"),
        ("Service", "MemoryDenyWriteExecute", "yes"),
        ("Service", "RestrictRealtime", "yes"),
        ("Service", "RestrictNamespaces", "yes"),
        ("Service", "ProtectKernelModules", "yes"),
        ("Service", "ProtectClock", "yes"),
        ("Service", "ProtectHostname", "yes"),
        ("Service", "ProtectControlGroups", "yes"),
        ("Install", "WantedBy", "multi-user.target"),
    ];
    for (section, key, value) in exact {
        assert_eq!(
            get(section, key).as_deref(),
            Some(value),
            "[{section}] {key}"
        );
    }
    for (section, key) in [
        ("Service", "RestartSec"),
        ("Unit", "StartLimitIntervalSec"),
        ("Unit", "StartLimitBurst"),
    ] {
        assert!(get(section, key).is_some(), "[{section}] {key} missing");
    }
    let exec = get("Service", "ExecStart").expect("ExecStart");
    assert_eq!(
        exec, "/usr/local/bin/hotplug-agent run",
        "ExecStart (no flags: they would beat the EnvironmentFile)"
    );

    // Root, cut down by the bounding set to what it needs.
    assert!(get("Service", "User").is_none() && get("Service", "DynamicUser").is_none());
    let caps = set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
    assert_eq!(words("Service", "CapabilityBoundingSet"), caps);
    assert!(words("Service", "AmbientCapabilities").is_subset(&caps));
    assert_eq!(get("Service", "LimitMEMLOCK").as_deref(), Some("infinity"));
    assert_eq!(
        words("Service", "RestrictAddressFamilies"),
        set(&["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"])
    );
    let filter = words("Service", "SystemCallFilter");
    for call in ["bpf", "perf_event_open"] {
        assert!(filter.contains(call), "SystemCallFilter lacks {call}");
    }
    // What would break the agent: read-only /sys (it onlines memory and CPUs), a private
    // network or user namespace (no API, no capabilities for bpf), /proc without meminfo.
    let off = |key: &str| get("Service", key).is_none_or(|v| v == "no" || v == "false");
    for key in ["ProtectKernelTunables", "PrivateNetwork", "PrivateUsers"] {
        assert!(off(key), "{key} must be off: see the comment in the unit");
    }
    assert_ne!(get("Service", "ProcSubset").as_deref(), Some("pid"));
    // The kubelet's root dir is writable (drain-and-reset), and optional.
    assert!(words("Service", "ReadWritePaths").contains("-/var/lib/kubelet"));
}

/// The unit's directories match the agent's defaults, and every variable of the
/// EnvironmentFile example (commented or not) is one the agent reads, with a valid value.
#[test]
fn systemd_environment_file_matches_the_agent() {
    let unit = read("deploy/systemd/hotplug-agent.service");
    let default = read("deploy/systemd/hotplug-agent.default");
    let Some(bin) = agent_bin() else { return };

    let defaults = agent_config(&bin, &[], &[], "the unit's defaults");
    let runtime_dir = unit_values(&unit, "Service", "RuntimeDirectory").join(" ");
    let socket = &defaults["stream_socket"].0;
    assert_eq!(
        Path::new(socket).parent(),
        Some(Path::new("/run").join(&runtime_dir).as_path()),
        "the default stream socket is not in RuntimeDirectory"
    );
    let kubelet_root = &defaults["kubelet_root_dir"].0;
    assert!(
        unit_values(&unit, "Service", "ReadWritePaths")
            .iter()
            .any(|p| p.trim_start_matches('-') == kubelet_root),
        "--kubelet-root-dir {kubelet_root} is not writable"
    );
    let logs_dir = unit_values(&unit, "Service", "LogsDirectory").join(" ");

    let mut seen = 0;
    for line in default.lines() {
        let line = line.trim_start_matches('#');
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') || name == "RUST_LOG" {
            continue;
        }
        seen += 1;
        let mut value = value.trim_matches('"').to_string();
        if name == "HOTPLUG_AGENT_CONFIG" {
            // It must exist to be read: check the DaemonSet's, which has the same keys.
            value = repo()
                .join("deploy/kubernetes/base/config.toml")
                .display()
                .to_string();
        }
        if name == "HOTPLUG_AGENT_LOG_FILE" {
            assert_eq!(
                Path::new(&value).parent(),
                Some(Path::new("/var/log").join(&logs_dir).as_path()),
                "the log file is not in LogsDirectory"
            );
        }
        let env = [(name.to_string(), value)];
        let settings = agent_config(&bin, &[], &env, &format!("hotplug-agent.default: {name}"));
        assert!(
            settings
                .values()
                .any(|(_, source)| source == &format!("env {name}")),
            "hotplug-agent.default: the agent does not read {name}"
        );
    }
    assert!(seen >= 10, "only {seen} variables in hotplug-agent.default");
}

/// `systemd-analyze verify` on the units (warnings count as failures), where installed.
#[test]
fn systemd_analyze_verifies_the_units() {
    if !have("systemd-analyze", &["--version"]) {
        eprintln!(
            "\n!!! SKIPPED: systemd-analyze is not installed; the units were only parsed \
             (systemd_unit_has_the_directives_the_agent_needs).\n"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // verify requires ExecStart's program to exist: stand one in for the agent.
    let stand_in = dir.path().join("hotplug-agent");
    std::fs::write(&stand_in, "#!/bin/sh\n").expect("writing the stand-in");
    std::fs::set_permissions(
        &stand_in,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut units = Vec::new();
    for name in [
        "hotplug-agent.service",
        "kubelet-refresh.path",
        "kubelet-refresh.service",
    ] {
        let text = read(format!("deploy/systemd/{name}")).replace(
            "/usr/local/bin/hotplug-agent",
            &stand_in.display().to_string(),
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing the unit");
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------

/// The image is built the way `cargo xtask setup` prepares a machine, on the workspace's
/// toolchain, and ships the binary where the systemd unit expects it too.
#[test]
fn dockerfile_follows_the_build_recipe() {
    let dockerfile = read("Dockerfile");
    let setup = read("xtask/src/setup.rs");
    let workspace = read("Cargo.toml");
    let quoted = |text: &str, prefix: &str| -> String {
        let start = text
            .find(prefix)
            .unwrap_or_else(|| panic!("{prefix} not found"))
            + prefix.len();
        text[start..]
            .split('"')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let bpf_linker = quoted(&setup, "const BPF_LINKER_VERSION: &str = \"");
    let rust_version = quoted(&workspace, "rust-version = \"");

    let froms: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(
        froms,
        [
            format!("rust:{rust_version}-bookworm AS builder").as_str(),
            "debian:bookworm-slim"
        ],
        "the stages"
    );
    let (builder, runtime) = dockerfile
        .split_once("\nFROM debian:bookworm-slim")
        .expect("a runtime stage");
    for needle in [
        format!("cargo install bpf-linker@{bpf_linker} --locked"),
        "rustup component add rust-src".to_string(),
        "cargo build --release --locked -p hotplug-agent".to_string(),
    ] {
        assert!(builder.contains(&needle), "the builder lacks `{needle}`");
    }
    for package in ["libudev-dev", "pkg-config"] {
        assert!(
            setup.contains(&format!("\"{package}\"")),
            "xtask setup no longer installs {package}"
        );
        assert!(
            builder.contains(package),
            "the builder does not install {package}"
        );
    }
    let runtime_packages = runtime
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("apt-get install in the runtime stage");
    assert!(runtime_packages.contains("libudev1") && runtime_packages.contains("ca-certificates"));
    assert!(
        !runtime.contains("libudev-dev"),
        "build dependencies in the runtime image"
    );
    assert!(runtime.contains("/usr/local/bin/hotplug-agent"));
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/hotplug-agent\"]"));
    assert!(runtime.contains("CMD [\"run\"]"));
    let unit = read("deploy/systemd/hotplug-agent.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/hotplug-agent "));

    let dockerignore = read(".dockerignore");
    let ignore: BTreeSet<&str> = dockerignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(
        ignore.contains("target/") && ignore.contains(".git"),
        "{ignore:?}"
    );
}
