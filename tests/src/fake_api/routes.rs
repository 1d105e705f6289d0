//! HTTP requests to store operations: the REST paths, verbs, patch content types and
//! query parameters a kube client uses, and the responses and status codes it expects.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
};
use serde_json::{Value, json};

use super::{
    Body, Selector,
    error::ApiError,
    patch,
    resources::{Group, Kind, api_version, check_type_meta, from_view, view},
    store::{Key, Shared, Sub},
    watch::{self, Since, WatchRequest},
};

/// The real server's `--min-request-timeout` default, for watches without `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

struct Ctx {
    shared: Arc<Shared>,
    method: String,
    target: String,
    path: String,
    query: Vec<(String, String)>,
    content_type: String,
    body: Bytes,
}

#[derive(Clone, Copy)]
enum PatchType {
    Merge,
    Strategic,
    Apply,
    Json,
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or_default());
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let injected = shared.write(|st| {
        st.requests.push((method.clone(), target.clone()));
        st.user_agents.push(user_agent);
        st.take_failure(&method, &path)
    });
    if let Some(code) = injected {
        return Ok(error(&ApiError::injected(code)));
    }
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let ctx = Ctx {
        shared,
        method,
        target,
        path,
        query,
        content_type,
        body,
    };
    Ok(route(&ctx).unwrap_or_else(|e| error(&e)))
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(full(v.to_string()))
        .expect("a valid response")
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

impl Ctx {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1"))
    }

    /// Records a request no handler serves and answers 404.
    fn unhandled(&self) -> ApiError {
        self.shared.write(|st| {
            st.unhandled
                .push((self.method.clone(), self.target.clone()))
        });
        ApiError::no_route(&self.path)
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })
    }
}

fn route(ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = ctx.path.split('/').filter(|s| !s.is_empty()).collect();
    match (ctx.method.as_str(), segments.as_slice()) {
        ("GET", ["version"]) => Ok(json_response(
            200,
            &json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2025-08-27T00:00:00Z", "goVersion": "go1.24.6",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        )),
        ("GET", ["healthz" | "livez" | "readyz"]) => Ok(Response::builder()
            .status(200)
            .header(CONTENT_TYPE, "text/plain")
            .body(full("ok".into()))
            .expect("a valid response")),
        ("GET", ["api"]) => Ok(json_response(
            200,
            &json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ctx.shared.addr.to_string()}],
            }),
        )),
        ("GET", ["apis"]) => Ok(json_response(
            200,
            &json!({
                "kind": "APIGroupList", "apiVersion": "v1",
                "groups": [{
                    "name": "events.k8s.io",
                    "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "events.k8s.io/v1", "version": "v1"},
                }, {
                    "name": "coordination.k8s.io",
                    "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"},
                }],
            }),
        )),
        ("GET", ["api", "v1"]) => Ok(json_response(200, &resource_list(Group::Core))),
        ("GET", ["apis", "events.k8s.io", "v1"]) => {
            Ok(json_response(200, &resource_list(Group::Events)))
        }
        (_, ["api", "v1", rest @ ..]) => resource(ctx, Group::Core, rest),
        ("GET", ["apis", "coordination.k8s.io", "v1"]) => {
            Ok(json_response(200, &resource_list(Group::Coordination)))
        }
        (_, ["apis", "events.k8s.io", "v1", rest @ ..]) => resource(ctx, Group::Events, rest),
        (_, ["apis", "coordination.k8s.io", "v1", rest @ ..]) => {
            resource(ctx, Group::Coordination, rest)
        }
        _ => Err(ctx.unhandled()),
    }
}

fn resource_list(group: Group) -> Value {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let sub_verbs = json!(["get", "patch", "update"]);
    let resources = match group {
        Group::Core => json!([
            {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node", "verbs": verbs},
            {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node", "verbs": sub_verbs},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": verbs},
            {"name": "pods/status", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": sub_verbs},
            {"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]},
            {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event", "verbs": verbs},
        ]),
        Group::Events => json!([
            {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event", "verbs": verbs},
        ]),
        Group::Coordination => json!([
            {"name": "leases", "singularName": "lease", "namespaced": true, "kind": "Lease", "verbs": verbs},
        ]),
    };
    let group_version = match group {
        Group::Core => "v1",
        Group::Events => "events.k8s.io/v1",
        Group::Coordination => "coordination.k8s.io/v1",
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn resource(ctx: &Ctx, group: Group, rest: &[&str]) -> Result<Response<Body>, ApiError> {
    let (ns, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(ctx.unhandled()),
    };
    let Some(kind) = Kind::from_plural(group, plural) else {
        return Err(ctx.unhandled());
    };
    if kind.namespaced() != ns.is_some() && (name.is_some() || !kind.namespaced()) {
        return Err(ctx.unhandled());
    }
    let sub = match sub {
        None => Sub::Main,
        Some("status") if kind.has_status() => Sub::Status,
        Some("eviction") if kind == Kind::Pod => {
            let key = key(kind, ns, name.unwrap_or_default());
            return match ctx.method.as_str() {
                "POST" => evict(ctx, &key),
                other => Err(ApiError::method_not_allowed(other)),
            };
        }
        Some(_) => return Err(ctx.unhandled()),
    };
    match (ctx.method.as_str(), name) {
        ("GET", None) if ctx.flag("watch") => watch(ctx, kind, group, ns),
        ("GET", None) => list(ctx, kind, group, ns),
        ("POST", None) if ns.is_some() || !kind.namespaced() => {
            create(ctx, kind, group, ns.unwrap_or_default())
        }
        ("GET", Some(name)) => {
            let key = key(kind, ns, name);
            let obj = ctx
                .shared
                .read(|st| st.get(&key))
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(200, &view(kind, group, &obj)))
        }
        ("PUT", Some(name)) => put(ctx, &key(kind, ns, name), group, sub),
        ("PATCH", Some(name)) => patch(ctx, &key(kind, ns, name), group, sub),
        ("DELETE", Some(name)) if sub == Sub::Main => {
            let key = key(kind, ns, name);
            let obj = ctx.shared.write(|st| st.delete(&key))?;
            Ok(json_response(200, &view(kind, group, &obj)))
        }
        (method, _) => Err(ApiError::method_not_allowed(method)),
    }
}

fn key(kind: Kind, ns: Option<&str>, name: &str) -> Key {
    Key {
        kind,
        ns: ns.unwrap_or_default().to_owned(),
        name: name.to_owned(),
    }
}

fn list(ctx: &Ctx, kind: Kind, group: Group, ns: Option<&str>) -> Result<Response<Body>, ApiError> {
    let selector = Selector::parse(ctx.param("fieldSelector"), ctx.param("labelSelector"))?;
    let (items, rv) = ctx.shared.read(|st| (st.list(kind, ns, &selector), st.rv));
    let items: Vec<Value> = items
        .iter()
        .map(|obj| {
            // List items carry no apiVersion/kind on the wire; the list does.
            let mut v = view(kind, group, obj);
            if let Value::Object(m) = &mut v {
                m.remove("apiVersion");
                m.remove("kind");
            }
            v
        })
        .collect();
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": api_version(kind, group),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    ))
}

fn watch(
    ctx: &Ctx,
    kind: Kind,
    group: Group,
    ns: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let selector = Selector::parse(ctx.param("fieldSelector"), ctx.param("labelSelector"))?;
    let since = match ctx.param("resourceVersion") {
        None | Some("" | "0") => Since::Now,
        Some(rv) => Since::Rv(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let timeout = match ctx.param("timeoutSeconds") {
        Some(s) => Duration::from_secs(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {s}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let req = WatchRequest {
        kind,
        group,
        ns: ns.map(str::to_owned),
        selector,
        since,
        timeout,
        initial_events_end: ctx.flag("sendInitialEvents"),
    };
    Ok(Response::builder()
        .status(200)
        .header(CONTENT_TYPE, "application/json")
        .body(watch::body(ctx.shared.clone(), req))
        .expect("a valid response"))
}

fn create(ctx: &Ctx, kind: Kind, group: Group, ns: &str) -> Result<Response<Body>, ApiError> {
    let body = ctx.json_body()?;
    check_type_meta(&body, kind, group)?;
    let obj = from_view(kind, group, body);
    let created = ctx
        .shared
        .write(|st| st.create(kind, group, ns, obj, true))?;
    Ok(json_response(201, &view(kind, group, &created)))
}

fn put(ctx: &Ctx, key: &Key, group: Group, sub: Sub) -> Result<Response<Body>, ApiError> {
    let body = ctx.json_body()?;
    check_type_meta(&body, key.kind, group)?;
    let body_name = body
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if body_name != key.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    let obj = from_view(key.kind, group, body);
    let updated = ctx.shared.write(|st| st.update(key, group, obj, sub))?;
    Ok(json_response(200, &view(key.kind, group, &updated)))
}

fn patch(ctx: &Ctx, key: &Key, group: Group, sub: Sub) -> Result<Response<Body>, ApiError> {
    let kind = key.kind;
    let ptype = match ctx.content_type.as_str() {
        "application/merge-patch+json" => PatchType::Merge,
        "application/strategic-merge-patch+json" => PatchType::Strategic,
        "application/apply-patch+yaml" => PatchType::Apply,
        "application/json-patch+json" => PatchType::Json,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    let body: Value = match serde_json::from_slice(&ctx.body) {
        Ok(v) => v,
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "error decoding patch (the fake accepts only the JSON form of YAML): {e}"
            )));
        }
    };
    let mut created_by_apply = false;
    if let PatchType::Apply = ptype {
        if ctx.param("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(
                "PATCH requests with apply-patch+yaml content type require fieldManager".into(),
            ));
        }
        if body.get("apiVersion").is_none() || body.get("kind").is_none() {
            return Err(ApiError::bad_request(
                "apiVersion and kind must be set in an apply patch".into(),
            ));
        }
        check_type_meta(&body, kind, group)?;
        let name = body.pointer("/metadata/name").and_then(Value::as_str);
        if name.is_some_and(|n| n != key.name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({})",
                name.unwrap_or_default(),
                key.name
            )));
        }
    }
    let result = ctx.shared.write(|st| {
        let Some(current) = st.get(key) else {
            // Server-side apply creates what does not exist yet.
            if matches!(ptype, PatchType::Apply) && sub == Sub::Main {
                created_by_apply = true;
                let mut obj = from_view(kind, group, body.clone());
                obj["metadata"]["name"] = json!(key.name);
                return st.create(kind, group, &key.ns, obj, false);
            }
            return Err(ApiError::not_found(kind, &key.name));
        };
        let mut doc = view(kind, group, &current);
        match ptype {
            PatchType::Merge => patch::merge_patch(&mut doc, &body),
            PatchType::Strategic | PatchType::Apply => {
                patch::strategic_merge(&mut doc, &body, kind.strategies())
                    .map_err(ApiError::unprocessable)?;
            }
            PatchType::Json => {
                patch::json_patch(&mut doc, &body).map_err(ApiError::unprocessable)?
            }
        }
        st.update(key, group, from_view(kind, group, doc), sub)
    })?;
    let code = if created_by_apply { 201 } else { 200 };
    Ok(json_response(code, &view(kind, group, &result)))
}

/// pkg/registry/core/pod/storage/eviction.go: deletes the pod unless a
/// PodDisruptionBudget (here: `FakeApi::block_evictions`) forbids it.
fn evict(ctx: &Ctx, key: &Key) -> Result<Response<Body>, ApiError> {
    let body = ctx.json_body()?;
    let name = body
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !name.is_empty() && name != key.name {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object".into(),
        ));
    }
    ctx.shared.write(|st| {
        if st.get(key).is_none() {
            return Err(ApiError::not_found(Kind::Pod, &key.name));
        }
        if st
            .blocked_evictions
            .contains(&(key.ns.clone(), key.name.clone()))
        {
            return Err(ApiError::disruption_budget(&key.name));
        }
        if st
            .held_evictions
            .contains(&(key.ns.clone(), key.name.clone()))
        {
            // A graceful deletion: the pod stays, terminating, until its kubelet deletes it.
            let mut pod = view(Kind::Pod, Group::Core, &st.get(key).expect("checked"));
            pod["metadata"]["deletionTimestamp"] = json!(super::store::now_rfc3339());
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
            let pod = from_view(Kind::Pod, Group::Core, pod);
            return st.update(key, Group::Core, pod, Sub::Main);
        }
        st.delete(key)
    })?;
    Ok(json_response(
        201,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let q = parse_query("watch=1&fieldSelector=metadata.name%3Dnode-1&x=a+b&bad=%zz&end=%4");
        assert_eq!(q[0], ("watch".into(), "1".into()));
        assert_eq!(
            q[1],
            ("fieldSelector".into(), "metadata.name=node-1".into())
        );
        assert_eq!(q[2].1, "a b");
        assert_eq!(q[3].1, "%zz");
        assert_eq!(q[4].1, "%4");
    }
}
