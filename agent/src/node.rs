//! This node's object in the API: read it, watch it, and report on it (Events and the
//! agent's own condition, in the style of node-problem-detector's conditions).
use std::{future::Future, time::Duration};

use futures::{StreamExt, pin_mut};
use k8s_openapi::{
    api::core::v1::{Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{EvictParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams},
    runtime::events::{self, Event as RecordedEvent, Recorder, Reporter},
};
use serde_json::json;
use tokio::time::Instant;

/// The agent's condition type on the Node. True: the advertised capacity is stale or a
/// refresh failed; False: in sync.
pub const CONDITION: &str = "HotplugCapacityStale";
pub const COMPONENT: &str = "hotplug-agent";
/// Written on the Node together with the agent's cordon (one patch), removed with its
/// uncordon: a cordon without it is someone else's, and the agent leaves it alone.
pub const CORDONED_ANNOTATION: &str = "hotplug-agent.io/cordoned";
/// On the Node as an annotation or a label (any value but `false`): the agent acts on
/// nothing there (no restart, no drain) and only reports, until it is removed.
pub const PAUSE_KEY: &str = "hotplug-agent.io/paused";
/// The Node's capacity as the agent first saw it, written once before its first change to
/// the Node (a kubelet restart) and never overwritten: `{"cpu":"2","memory":"4Gi"}`. A
/// hint for the Cluster Autoscaler's node templates (KEP-3953 discusses an initial-capacity
/// annotation), which a node grown by hotplug would otherwise skew.
pub const INITIAL_CAPACITY_ANNOTATION: &str = "hotplug-agent.io/initial-capacity";

/// The value of [`INITIAL_CAPACITY_ANNOTATION`] for `node`: its `cpu` and `memory`
/// capacity as advertised, quantities as the kubelet wrote them; `None` where the Node
/// already carries the annotation (it is never overwritten) or advertises neither.
pub fn initial_capacity(node: &Node) -> Option<String> {
    let present = node
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INITIAL_CAPACITY_ANNOTATION));
    if present {
        return None;
    }
    let capacity = node.status.as_ref()?.capacity.as_ref()?;
    let picked: std::collections::BTreeMap<&str, &str> = ["cpu", "memory"]
        .into_iter()
        .filter_map(|k| capacity.get(k).map(|q| (k, q.0.as_str())))
        .collect();
    if picked.is_empty() {
        return None;
    }
    Some(serde_json::to_string(&picked).expect("a map of strings serialises"))
}

/// Whether the Node's cordon is the agent's own ([`CORDONED_ANNOTATION`]).
pub fn cordoned_by_agent(node: &Node) -> bool {
    node.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CORDONED_ANNOTATION))
}

/// Whether an operator paused the agent on this Node ([`PAUSE_KEY`]).
pub fn paused(node: &Node) -> bool {
    let set = |m: Option<&std::collections::BTreeMap<String, String>>| {
        m.and_then(|m| m.get(PAUSE_KEY))
            .is_some_and(|v| v != "false")
    };
    set(node.metadata.annotations.as_ref()) || set(node.metadata.labels.as_ref())
}
/// events.k8s.io/v1 refuses a `note` longer than this (bytes).
const NOTE_MAX: usize = 1024;

/// `message` cut to what events.k8s.io/v1 accepts, at a character boundary, with `…` where
/// it was cut. (The Recorder puts a Node's Events in `default`, where the kubelet records
/// its own and `kubectl describe node` finds them.)
fn note(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= NOTE_MAX {
        return message.into();
    }
    const MORE: &str = "…";
    let mut end = NOTE_MAX - MORE.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &message[..end]).into()
}

/// Every API call has a deadline: a server that accepts the connection and never answers
/// must become an error that the controller reports (`api_unreachable`) and retries, not a
/// wait that wedges the controller for good.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: Option<(&str, &str)>, capacity: &[(&str, &str)]) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "annotations": annotations
                .map(|(k, v)| std::collections::BTreeMap::from([(k, v)]))},
            "status": {"capacity": capacity
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()},
        }))
        .expect("a Node")
    }

    #[test]
    fn a_note_is_cut_to_what_events_k8s_io_accepts_at_a_character_boundary() {
        assert_eq!(note("short"), "short");
        let exact = "x".repeat(NOTE_MAX);
        assert_eq!(note(&exact), exact);
        // A two-byte character straddles the limit: cut before it, never inside.
        let long = format!("{}é{}", "x".repeat(NOTE_MAX - 4), "y".repeat(100));
        let cut = note(&long);
        assert!(cut.len() <= NOTE_MAX, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(long.starts_with(cut.trim_end_matches('…')));
    }

    #[test]
    fn initial_capacity_is_cpu_and_memory_as_advertised_and_never_replaces_one() {
        let n = node(None, &[("cpu", "2"), ("memory", "4Gi"), ("pods", "110")]);
        assert_eq!(
            initial_capacity(&n).as_deref(),
            Some(r#"{"cpu":"2","memory":"4Gi"}"#)
        );
        let n = node(Some((INITIAL_CAPACITY_ANNOTATION, "{}")), &[("cpu", "2")]);
        assert_eq!(initial_capacity(&n), None);
        assert_eq!(initial_capacity(&node(None, &[("pods", "110")])), None);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the API server did not answer {call} within {after:?}")]
    Timeout { call: &'static str, after: Duration },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// kube's [`Recorder`] (like client-go's) makes a repeat of the same type and reason one
/// series and keeps the *first* note: a `CapacityChanged` "4Gi -> 8Gi" followed by "8Gi ->
/// 4Gi" would show only the first, twice. One Recorder per distinct message keeps every
/// message and still makes a true repeat (a refresh failing the same way every back-off)
/// one Event with a growing `series.count`. Entries go when their series would have
/// ended anyway (the Recorder's own six minutes).
#[derive(Clone, Default)]
struct Recorders(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<RecorderKey, (Recorder, Instant)>>>,
);

type RecorderKey = (EventType, String, String);

/// How long the Recorder keeps a series open.
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

impl Recorders {
    fn for_message(
        &self,
        client: &Client,
        node: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) -> Recorder {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, (_, used)| now.duration_since(*used) < SERIES_TTL);
        let key = (kind, reason.to_owned(), message.to_owned());
        let (recorder, used) = all.entry(key).or_insert_with(|| {
            let reporter = Reporter {
                controller: COMPONENT.into(),
                instance: Some(node.into()),
            };
            (Recorder::new(client.clone(), reporter), now)
        });
        *used = now;
        recorder.clone()
    }
}

#[derive(Clone)]
pub struct NodeApi {
    client: Client,
    nodes: Api<Node>,
    recorders: Recorders,
    name: String,
    uid: Option<String>,
    timeout: Duration,
}

impl NodeApi {
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client: client.clone(),
            nodes: Api::all(client.clone()),
            recorders: Recorders::default(),
            name: name.into(),
            uid: None,
            timeout: DEFAULT_API_TIMEOUT,
        }
    }

    /// The deadline of each call (a watch's wait for changes is bounded by its caller's).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn within<T>(
        &self,
        call: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, NodeError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(NodeError::Timeout {
                call,
                after: self.timeout,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn get(&mut self) -> Result<Node, NodeError> {
        let node = self.within("GET node", self.nodes.get(&self.name)).await?;
        self.uid = node.metadata.uid.clone();
        Ok(node)
    }

    /// Sets the agent's condition; keeps `lastTransitionTime` unless the status flips.
    pub async fn set_condition(
        &self,
        current: &Node,
        stale: bool,
        reason: &str,
        message: &str,
    ) -> Result<(), NodeError> {
        let status = if stale { "True" } else { "False" };
        let now = Timestamp::now();
        let previous = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == CONDITION));
        let transition = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone().map_or(now, |t| t.0),
            _ => now,
        };
        // Strategic merge: conditions merge by `type`, so the kubelet's own stay untouched.
        let patch = json!({"status": {"conditions": [{
            "type": CONDITION,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": Time(now),
            "lastTransitionTime": Time(transition),
        }]}});
        let params = PatchParams::default();
        let patch = Patch::Strategic(patch);
        self.within(
            "PATCH node status",
            self.nodes.patch_status(&self.name, &params, &patch),
        )
        .await?;
        Ok(())
    }

    /// Records an Event on the Node through kube's [`Recorder`]: events.k8s.io/v1 (the
    /// same objects `kubectl describe node` shows), and a repeat of the same reason and
    /// note within six minutes becomes one Event whose `series.count` grows instead of a
    /// new object each time.
    pub async fn event(
        &self,
        kind: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), NodeError> {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..ObjectReference::default()
        };
        let event = RecordedEvent {
            type_: match kind {
                EventType::Normal => events::EventType::Normal,
                EventType::Warning => events::EventType::Warning,
            },
            reason: reason.into(),
            note: Some(note(message).into()),
            action: reason.into(),
            secondary: None,
        };
        let recorder = self
            .recorders
            .for_message(&self.client, &self.name, kind, reason, message);
        self.within("POST event", recorder.publish(&event, &reference))
            .await?;
        Ok(())
    }

    /// Marks the Node (un)schedulable, as `kubectl cordon`/`uncordon` do.
    pub async fn cordon(&self, unschedulable: bool) -> Result<(), NodeError> {
        let patch = Patch::Merge(json!({"spec": {"unschedulable": unschedulable}}));
        let params = PatchParams::default();
        self.within("PATCH node", self.nodes.patch(&self.name, &params, &patch))
            .await?;
        Ok(())
    }

    /// The agent's own cordon: `unschedulable` and [`CORDONED_ANNOTATION`] set (or both
    /// cleared) in one merge patch, so the mark of who cordoned never lags the cordon.
    pub async fn cordon_by_agent(&self, unschedulable: bool) -> Result<(), NodeError> {
        let mark = unschedulable.then(|| Timestamp::now().to_string());
        let patch = Patch::Merge(json!({
            "metadata": {"annotations": {CORDONED_ANNOTATION: mark}},
            "spec": {"unschedulable": unschedulable},
        }));
        let params = PatchParams::default();
        self.within("PATCH node", self.nodes.patch(&self.name, &params, &patch))
            .await?;
        Ok(())
    }

    /// Sets one annotation on the Node (a merge patch: the others stay).
    pub async fn annotate(&self, key: &str, value: &str) -> Result<(), NodeError> {
        let patch = Patch::Merge(json!({"metadata": {"annotations": {key: value}}}));
        let params = PatchParams::default();
        self.within("PATCH node", self.nodes.patch(&self.name, &params, &patch))
            .await?;
        Ok(())
    }

    /// The pods bound to this Node.
    pub async fn pods(&self) -> Result<Vec<Pod>, NodeError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.name));
        let list = self.within("LIST pods", pods.list(&params)).await?;
        Ok(list.items)
    }

    /// Evicts a pod through the Eviction API, so PodDisruptionBudgets are honoured: the
    /// API answers 429 while a budget forbids it.
    pub async fn evict(&self, namespace: &str, name: &str) -> Result<(), NodeError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = EvictParams::default();
        self.within("POST eviction", pods.evict(name, &params))
            .await?;
        Ok(())
    }

    /// This Node's pods, listed and then watched until `deadline` (see [`PodWatch`]).
    pub fn watch_pods(&self, deadline: Instant) -> PodWatch {
        PodWatch {
            api: self.clone(),
            deadline,
            rv: None,
            listed_at: None,
            watched_at: None,
            stream: None,
        }
    }

    /// Waits until none of `uids` is among this Node's pods any more (evicted pods whose
    /// kubelet has stopped their containers, so their memory is free), watched, not polled:
    /// each deletion is seen as it happens. Returns the ones still there at `deadline`
    /// (`namespace/name`, sorted), empty when all went.
    pub async fn wait_pods_gone(
        &self,
        uids: &[String],
        deadline: Instant,
    ) -> Result<Vec<String>, NodeError> {
        let mut watch = self.watch_pods(deadline);
        let mut left = std::collections::BTreeMap::new();
        let key = |p: &Pod| {
            let (ns, name) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref());
            format!("{}/{}", ns.unwrap_or_default(), name.unwrap_or_default())
        };
        let ours = |p: &Pod| p.metadata.uid.clone().filter(|u| uids.contains(u));
        loop {
            match watch.next().await? {
                None => return Ok(left.into_values().collect()),
                Some(PodChange::Listed(pods)) => {
                    left = pods
                        .iter()
                        .filter_map(|p| Some((ours(p)?, key(p))))
                        .collect();
                }
                // One that comes to match the selector again (it cannot: a pod's node is
                // set once) would still be there.
                Some(PodChange::Applied(p)) => {
                    if let Some(uid) = ours(&p) {
                        left.insert(uid, key(&p));
                    }
                }
                Some(PodChange::Deleted(p)) => {
                    if let Some(uid) = ours(&p) {
                        left.remove(&uid);
                    }
                }
            }
            if left.is_empty() {
                return Ok(Vec::new());
            }
        }
    }

    /// Watches the Node (no polling) until `done` holds or `timeout` passes; returns the
    /// Node that satisfied it, or `None` on timeout.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Node) -> bool,
    ) -> Result<Option<Node>, NodeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.get().await?;
            if done(&node) {
                return Ok(Some(node));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let rv = node.metadata.resource_version.clone().unwrap_or_default();
            let params = WatchParams::default()
                .fields(&format!("metadata.name={}", self.name))
                .timeout(left.as_secs().clamp(1, 290) as u32);
            let stream = self
                .within("WATCH node", self.nodes.watch(&params, &rv))
                .await?;
            pin_mut!(stream);
            loop {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => return Ok(None),
                    Ok(Some(Ok(WatchEvent::Added(n) | WatchEvent::Modified(n)))) if done(&n) => {
                        return Ok(Some(n));
                    }
                    Ok(Some(Ok(WatchEvent::Error(e)))) => {
                        // 410 Gone and friends: start again from a fresh GET.
                        tracing::debug!(code = e.code, message = %e.message, "node watch ended");
                        break;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return Err(e.into()),
                    Ok(None) => break,
                }
            }
        }
    }
}

/// A change to this Node's pods, as [`PodWatch`] saw it.
#[derive(Debug)]
pub enum PodChange {
    /// Every pod, as listed: at the start, and again where the watch could not resume
    /// (410 Expired, a broken stream); it replaces whatever was known before.
    Listed(Vec<Pod>),
    /// A pod added or changed.
    Applied(Pod),
    /// A pod gone from the API.
    Deleted(Pod),
}

/// A LIST, and the opening of a WATCH, at most this often: an API (or a proxy) that ends
/// every watch at once is not asked in a tight loop.
const REQUEST_MIN_INTERVAL: Duration = Duration::from_secs(1);

type PodEvents = futures::stream::BoxStream<'static, Result<WatchEvent<Pod>, kube::Error>>;

/// This Node's pods (a `spec.nodeName` field selector) as the kubelet's own pod source and
/// client-go's reflector follow them: one LIST, then a WATCH from the list's
/// resourceVersion. A watch that times out resumes from the last resourceVersion seen; a
/// 410 Expired or a broken watch lists again. Every LIST and the opening of every WATCH
/// have the per-call deadline of the other [`NodeApi`] calls; the changes are waited for
/// until the overall `deadline`.
pub struct PodWatch {
    api: NodeApi,
    deadline: Instant,
    /// Where the watch resumes; `None`: list (again).
    rv: Option<String>,
    listed_at: Option<Instant>,
    watched_at: Option<Instant>,
    stream: Option<PodEvents>,
}

impl PodWatch {
    /// The next change; `Ok(None)` once `deadline` has passed. The first is always the
    /// list (answered within the per-call deadline even if `deadline` is sooner).
    pub async fn next(&mut self) -> Result<Option<PodChange>, NodeError> {
        loop {
            let now = Instant::now();
            if self.listed_at.is_some() && now >= self.deadline {
                return Ok(None);
            }
            let Some(rv) = self.rv.clone() else {
                if !Self::paced(self.listed_at, self.deadline).await {
                    return Ok(None);
                }
                return self.list().await.map(Some);
            };
            if self.stream.is_none() && !Self::paced(self.watched_at, self.deadline).await {
                return Ok(None);
            }
            let stream = match &mut self.stream {
                Some(s) => s,
                None => {
                    self.watched_at = Some(Instant::now());
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    let params = WatchParams::default()
                        .fields(&self.selector())
                        .timeout(left.as_secs().clamp(1, 290) as u32);
                    let pods: Api<Pod> = Api::all(self.api.client.clone());
                    match self
                        .api
                        .within("WATCH pods", pods.watch(&params, &rv))
                        .await
                    {
                        Ok(events) => self.stream.insert(events.boxed()),
                        // Expired as the answer to the request itself, not as an event in
                        // the stream: the same, a new list.
                        Err(NodeError::Api(kube::Error::Api(s))) if s.code == 410 => {
                            self.relist();
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            match tokio::time::timeout_at(self.deadline, stream.next()).await {
                Err(_) => return Ok(None),
                Ok(Some(Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)))) => {
                    self.rv.clone_from(&p.metadata.resource_version);
                    return Ok(Some(PodChange::Applied(p)));
                }
                Ok(Some(Ok(WatchEvent::Deleted(p)))) => {
                    self.rv.clone_from(&p.metadata.resource_version);
                    return Ok(Some(PodChange::Deleted(p)));
                }
                Ok(Some(Ok(WatchEvent::Bookmark(b)))) => {
                    self.rv = Some(b.metadata.resource_version);
                }
                Ok(Some(Ok(WatchEvent::Error(e)))) => {
                    // 410 Expired (the history is compacted) and any other error the
                    // server ends a watch with: what happened since is only in a new list.
                    tracing::debug!(code = e.code, message = %e.message, "pod watch ended; listing again");
                    self.relist();
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "pod watch broke; listing again");
                    self.relist();
                }
                // The server's timeoutSeconds: resume where it ended.
                Ok(None) => self.stream = None,
            }
        }
    }

    fn selector(&self) -> String {
        format!("spec.nodeName={}", self.api.name)
    }

    fn relist(&mut self) {
        self.stream = None;
        self.rv = None;
    }

    /// Waits until [`REQUEST_MIN_INTERVAL`] after `last` (no wait for a first request);
    /// `false` if the deadline came first.
    /// (A free function: `&self` holds a stream that is not `Sync`.)
    async fn paced(last: Option<Instant>, deadline: Instant) -> bool {
        let Some(at) = last else {
            return true;
        };
        tokio::time::sleep_until((at + REQUEST_MIN_INTERVAL).min(deadline)).await;
        Instant::now() < deadline
    }

    async fn list(&mut self) -> Result<PodChange, NodeError> {
        self.listed_at = Some(Instant::now());
        let pods: Api<Pod> = Api::all(self.api.client.clone());
        let params = ListParams::default().fields(&self.selector());
        let list = self.api.within("LIST pods", pods.list(&params)).await?;
        // A list always carries one; without it the watch would start from the current
        // state, whose ADDED events repeat the list: harmless to every reader here.
        self.rv = Some(list.metadata.resource_version.unwrap_or_default());
        Ok(PodChange::Listed(list.items))
    }
}
