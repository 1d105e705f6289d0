//! RBAC from the requests the agent really makes: each request the fake API received from
//! the agent (its `User-Agent`, [`hotplug_agent::kube_client::USER_AGENT`]) is turned into
//! the attributes the API server's authorizer checks, and compared with the rules that
//! `deploy/kubernetes` grants the agent's ServiceAccount once rendered (`kubectl
//! kustomize`, offline).
//!
//! The attributes follow the API server's `RequestInfoFactory`
//! (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go, v1.34): `/api/v1/...` is the
//! core group, `/apis/GROUP/VERSION/...` a named one; `namespaces/NS/` scopes it; a GET
//! without a name is `list`, or `watch` with `watch=true`; POST `create`, PUT `update`,
//! PATCH `patch`, DELETE `delete` (`deletecollection` without a name); a subresource is
//! `resource/sub`. A binding's rules hold where it is: a ClusterRoleBinding everywhere, a
//! RoleBinding in its own namespace.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

use serde_json::Value;

use crate::fake_api::FakeApi;

/// What the authorizer is asked for one request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    /// `None`: a cluster-scoped resource (or, in a grant, every namespace).
    pub namespace: Option<String>,
    pub group: String,
    pub resource: String,
    pub verb: String,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        match &self.namespace {
            Some(ns) => write!(f, " in {ns}"),
            None => write!(f, " (cluster-wide)"),
        }
    }
}

/// The non-resource paths every authenticated client may read (the `system:discovery`
/// and `system:public-info-viewer` ClusterRoles of every cluster).
const DISCOVERY: [&str; 6] = ["/api", "/apis", "/version", "/healthz", "/livez", "/readyz"];

/// The authorizer's attributes of `METHOD target`; `Err(path)` for a non-resource path.
pub fn access(method: &str, target: &str) -> Result<Access, String> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => (String::new(), rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => ((*group).to_owned(), rest),
        _ => return Err(path.to_owned()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some((*ns).to_owned()), tail),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [plural] => ((*plural).to_owned(), false),
        [plural, _name] => ((*plural).to_owned(), true),
        [plural, _name, sub] => (format!("{plural}/{sub}"), true),
        _ => return Err(path.to_owned()),
    };
    let watch = query
        .split('&')
        .any(|p| matches!(p, "watch=true" | "watch=1"));
    let verb = match (method, named) {
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => other,
    };
    Ok(Access {
        namespace,
        group,
        resource,
        verb: verb.to_ascii_lowercase(),
    })
}

/// The agent's requests to `api` as authorizer attributes; panics on a non-resource path
/// outside discovery (no cluster would let the agent read it).
pub fn agent_accesses(api: &FakeApi) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for (method, target) in api.requests_from(hotplug_agent::kube_client::USER_AGENT) {
        match access(&method, &target) {
            Ok(a) => {
                out.insert(a);
            }
            Err(path) => assert!(
                DISCOVERY.contains(&path.as_str()),
                "the agent asked for the non-resource path {method} {path}, which no role grants"
            ),
        }
    }
    out
}

/// The rules granted to the agent's ServiceAccount by one rendered variant.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    pub rules: BTreeSet<Access>,
}

impl Grants {
    /// Parses the output of `kubectl kustomize`: the rules of every Role and ClusterRole
    /// bound to ServiceAccount `namespace/account`, where each binding puts them.
    pub fn from_manifests(yaml: &str, namespace: &str, account: &str) -> Result<Grants, String> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| format!("not valid YAML: {e}"))?;
        let key = |d: &Value| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["namespace"].as_str().map(str::to_owned),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        };
        let roles: BTreeMap<_, &Value> = docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
            .map(|d| (key(d), d))
            .collect();
        let mut rules = BTreeSet::new();
        for binding in &docs {
            let kind = binding["kind"].as_str().unwrap_or_default();
            let scope = match kind {
                "ClusterRoleBinding" => None,
                "RoleBinding" => Some(
                    binding["metadata"]["namespace"]
                        .as_str()
                        .ok_or("a RoleBinding without a namespace")?
                        .to_owned(),
                ),
                _ => continue,
            };
            let ours = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == account
                        && s["namespace"] == namespace
                });
            if !ours {
                continue;
            }
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_ns = (role_kind == "Role").then(|| scope.clone()).flatten();
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            let role = roles
                .get(&(role_kind.to_owned(), role_ns, role_name.to_owned()))
                .ok_or_else(|| format!("{kind} binds the missing {role_kind} {role_name}"))?;
            for rule in role["rules"].as_array().into_iter().flatten() {
                let list = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                };
                if rule.get("resourceNames").is_some() {
                    return Err(format!(
                        "{role_kind} {role_name}: resourceNames (not modelled)"
                    ));
                }
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for verb in list("verbs") {
                            rules.insert(Access {
                                namespace: scope.clone(),
                                group: group.clone(),
                                resource: resource.clone(),
                                verb,
                            });
                        }
                    }
                }
            }
        }
        Ok(Grants { rules })
    }

    /// The rule that allows `a`: the namespaced one where there is one, else the
    /// cluster-wide one. `any_namespace`: a namespaced rule allows `a` in any namespace
    /// (for tests whose agent keeps its Leases in `default`, as the kubeconfig says).
    pub fn rule_for(&self, a: &Access, any_namespace: bool) -> Option<&Access> {
        let same = |r: &&Access| r.group == a.group && r.resource == a.resource && r.verb == a.verb;
        self.rules
            .iter()
            .filter(same)
            .find(|r| {
                r.namespace.is_some()
                    && a.namespace.is_some()
                    && (any_namespace || r.namespace == a.namespace)
            })
            .or_else(|| {
                self.rules
                    .iter()
                    .filter(same)
                    .find(|r| r.namespace.is_none())
            })
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The agent's grants in `deploy/kubernetes/DIR` (`base`, `overlays/drain-and-reset`,
/// ...), rendered once per process; `None`, said loudly once, without kubectl.
pub fn deployed(dir: &str) -> Option<Grants> {
    static CACHE: OnceLock<Mutex<BTreeMap<String, Option<Grants>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache
        .entry(dir.to_owned())
        .or_insert_with(|| render(dir))
        .clone()
}

fn render(dir: &str) -> Option<Grants> {
    let path = repo().join("deploy/kubernetes").join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "\n!!! SKIPPED: kubectl is not installed, so the agent's API calls are NOT \
                 checked against the RBAC of deploy/kubernetes.\n"
            );
            return None;
        }
        Err(e) => panic!("running kubectl kustomize: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("UTF-8 output");
    Some(
        Grants::from_manifests(&yaml, "hotplug-agent", "hotplug-agent")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
}

/// Panics, naming each, if the agent made a request `deploy/kubernetes/DIR` does not
/// grant it. Namespaces are not compared: the tests' agents keep their Leases in their
/// kubeconfig's `default`, which is also where Events go (the exact comparison, with the
/// agent's own namespace apart from `default`, is controller.rs's RBAC test).
pub fn assert_granted(api: &FakeApi, dir: &str) {
    let Some(grants) = deployed(dir) else { return };
    let denied: Vec<String> = agent_accesses(api)
        .iter()
        .filter(|a| grants.rule_for(a, true).is_none())
        .map(ToString::to_string)
        .collect();
    assert!(
        denied.is_empty(),
        "the agent made requests that deploy/kubernetes/{dir} does not grant it (a real \
         cluster answers 403):\n  {}",
        denied.join("\n  ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ns: Option<&str>, group: &str, resource: &str, verb: &str) -> Access {
        Access {
            namespace: ns.map(str::to_owned),
            group: group.into(),
            resource: resource.into(),
            verb: verb.into(),
        }
    }

    #[test]
    fn requests_become_the_authorizers_attributes() {
        let cases = [
            ("GET", "/api/v1/nodes/n1", a(None, "", "nodes", "get")),
            (
                "GET",
                "/api/v1/nodes?fieldSelector=metadata.name%3Dn1",
                a(None, "", "nodes", "list"),
            ),
            (
                "GET",
                "/api/v1/nodes?&watch=true&timeoutSeconds=5&fieldSelector=metadata.name%3Dn1",
                a(None, "", "nodes", "watch"),
            ),
            (
                "PATCH",
                "/api/v1/nodes/n1/status?",
                a(None, "", "nodes/status", "patch"),
            ),
            (
                "POST",
                "/api/v1/namespaces/default/events?",
                a(Some("default"), "", "events", "create"),
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/pods/p/eviction?",
                a(Some("ns"), "", "pods/eviction", "create"),
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/l?",
                a(Some("x"), "coordination.k8s.io", "leases", "update"),
            ),
            (
                "DELETE",
                "/apis/coordination.k8s.io/v1/namespaces/x/leases",
                a(
                    Some("x"),
                    "coordination.k8s.io",
                    "leases",
                    "deletecollection",
                ),
            ),
        ];
        for (method, target, want) in cases {
            assert_eq!(access(method, target), Ok(want), "{method} {target}");
        }
        assert_eq!(access("GET", "/version"), Err("/version".into()));
        assert_eq!(access("GET", "/apis"), Err("/apis".into()));
    }

    #[test]
    fn bindings_grant_where_they_are_and_only_to_their_subject() {
        let yaml = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: c}
rules: [{apiGroups: [""], resources: [nodes], verbs: [get, watch]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: c}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: c}
subjects: [{kind: ServiceAccount, name: sa, namespace: ns}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: e, namespace: default}
rules: [{apiGroups: [""], resources: [events], verbs: [create]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: e, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: e}
subjects: [{kind: ServiceAccount, name: sa, namespace: ns}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: other}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: c}
subjects: [{kind: ServiceAccount, name: someone-else, namespace: ns}]
"#;
        let g = Grants::from_manifests(yaml, "ns", "sa").expect("parses");
        assert_eq!(g.rules.len(), 3, "{g:?}");
        let event = a(Some("default"), "", "events", "create");
        assert!(g.rule_for(&event, false).is_some());
        let elsewhere = a(Some("kube-system"), "", "events", "create");
        assert!(g.rule_for(&elsewhere, false).is_none());
        assert!(g.rule_for(&elsewhere, true).is_some());
        assert!(g.rule_for(&a(None, "", "nodes", "list"), false).is_none());
        assert_eq!(
            g.rule_for(&a(None, "", "nodes", "get"), false),
            Some(&a(None, "", "nodes", "get"))
        );
    }
}
