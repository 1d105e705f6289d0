//! The test doubles against the real kube client: the fake API server
//! (`hotplug_tests::fake_api`) and the kubelet stand-in (`kubelet-standin`).
//! No root needed; the stand-in reads this machine's capacity but changes nothing.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use hotplug_tests::{
    fake_api::FakeApi,
    kubelet::{self, Kubelet, binary_quantity, process},
    machine,
};
use k8s_openapi::api::core::v1::{Event, Node, ObjectReference, Pod};
use kube::{
    Api,
    api::{EvictParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter},
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "capacity": {"cpu": "2", "memory": "4Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }))
    .expect("a Node")
}

fn api_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn condition_types(node: &Value) -> Vec<String> {
    node["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| c["type"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn nodes_get_create_and_every_patch_type() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(api.client(dir.path()).await);

    let created = nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().expect("uid set on create");
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        api_code(nodes.create(&PostParams::default(), &node("n1")).await),
        (409, "AlreadyExists".into())
    );
    assert_eq!(api_code(nodes.get("nope").await), (404, "NotFound".into()));
    assert!(nodes.get_opt("nope").await.unwrap().is_none());
    let got = nodes.get("n1").await.unwrap();
    assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));

    // Merge patch on the status subresource; the quantity is stored canonically.
    let patched = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": {"memory": "8388608Ki"}}})),
        )
        .await
        .unwrap();
    let memory = &patched.status.as_ref().unwrap().capacity.as_ref().unwrap()["memory"];
    assert_eq!(memory.0, "8Gi");
    let rv2: u64 = patched
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);

    // Strategic merge: conditions merge by type.
    let pp = PatchParams::default();
    let add = json!({"status": {"conditions": [{"type": "HotplugCapacityStale", "status": "True", "reason": "Stale"}]}});
    nodes
        .patch_status("n1", &pp, &Patch::Strategic(add))
        .await
        .unwrap();
    let n = api.node("n1").unwrap();
    assert_eq!(condition_types(&n), ["Ready", "HotplugCapacityStale"]);
    let update = json!({"status": {"conditions": [{"type": "HotplugCapacityStale", "status": "False", "reason": "InSync"}]}});
    nodes
        .patch_status("n1", &pp, &Patch::Strategic(update))
        .await
        .unwrap();
    let n = api.node("n1").unwrap();
    assert_eq!(condition_types(&n), ["Ready", "HotplugCapacityStale"]);
    assert_eq!(
        n["status"]["conditions"][0]["status"], "True",
        "Ready untouched"
    );
    assert_eq!(n["status"]["conditions"][1]["reason"], "InSync");
    // A merge patch, by contrast, replaces the list.
    let replace = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    nodes
        .patch_status("n1", &pp, &Patch::Merge(replace))
        .await
        .unwrap();
    assert_eq!(condition_types(&api.node("n1").unwrap()), ["Ready"]);

    // Server-side apply, as kube sends it.
    let apply = PatchParams::apply("hotplug-agent").force();
    let body = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {"conditions": [{"type": "HotplugCapacityStale", "status": "False", "reason": "Applied"}]},
    });
    nodes
        .patch_status("n1", &apply, &Patch::Apply(body))
        .await
        .unwrap();
    let n = api.node("n1").unwrap();
    assert_eq!(condition_types(&n), ["Ready", "HotplugCapacityStale"]);
    assert!(
        api.requests()
            .iter()
            .any(|(m, p)| m == "PATCH" && p.contains("fieldManager=hotplug-agent"))
    );

    // The main resource ignores .status; it does take spec and metadata.
    let main = json!({"metadata": {"labels": {"x": "y"}}, "spec": {"unschedulable": true}, "status": {"capacity": {"cpu": "64"}}});
    let n = nodes.patch("n1", &pp, &Patch::Merge(main)).await.unwrap();
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    assert_eq!(n.status.unwrap().capacity.unwrap()["cpu"].0, "2");
    assert_eq!(n.metadata.labels.unwrap()["x"], "y");

    // A patch that changes nothing keeps the resourceVersion.
    let before = api.resource_version();
    nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    assert_eq!(api.resource_version(), before);

    // A stale resourceVersion in the patch: 409 Conflict.
    let stale =
        json!({"metadata": {"resourceVersion": rv1.to_string()}, "spec": {"unschedulable": false}});
    assert_eq!(
        api_code(nodes.patch("n1", &pp, &Patch::Merge(stale)).await),
        (409, "Conflict".into())
    );

    // An invalid quantity: 422 Invalid.
    let bad = json!({"status": {"capacity": {"memory": "lots"}}});
    assert_eq!(
        api_code(nodes.patch_status("n1", &pp, &Patch::Merge(bad)).await),
        (422, "Invalid".into())
    );

    // JSON patch and an unsupported content type, through raw requests.
    let kube_client = api.client(dir.path()).await;
    let json_patch = hyper::http::Request::patch("/api/v1/nodes/n1/status")
        .header("Content-Type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([
                {"op": "test", "path": "/status/capacity/cpu", "value": "2"},
                {"op": "replace", "path": "/status/capacity/cpu", "value": "3"},
                {"op": "add", "path": "/status/capacity/pods", "value": "110"},
            ]))
            .unwrap(),
        )
        .unwrap();
    let n: Node = kube_client.request(json_patch).await.unwrap();
    let cap = n.status.unwrap().capacity.unwrap();
    assert_eq!(
        (cap["cpu"].0.as_str(), cap["pods"].0.as_str()),
        ("3", "110")
    );
    let xml = hyper::http::Request::patch("/api/v1/nodes/n1/status")
        .header("Content-Type", "application/xml")
        .body(b"<node/>".to_vec())
        .unwrap();
    assert_eq!(
        api_code(kube_client.request::<Node>(xml).await),
        (415, "UnsupportedMediaType".into())
    );

    // PUT on the status subresource: optimistic concurrency on resourceVersion.
    let mut current = nodes.get("n1").await.unwrap();
    let stale_copy = current.clone();
    current
        .status
        .as_mut()
        .unwrap()
        .capacity
        .as_mut()
        .unwrap()
        .insert(
            "memory".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("12Gi".into()),
        );
    current.spec.as_mut().unwrap().unschedulable = Some(false);
    let replaced = nodes
        .replace_status("n1", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(
        replaced.status.unwrap().capacity.unwrap()["memory"].0,
        "12Gi"
    );
    assert_eq!(
        replaced.spec.unwrap().unschedulable,
        Some(true),
        "PUT status keeps spec"
    );
    assert_eq!(
        api_code(
            nodes
                .replace_status("n1", &PostParams::default(), &stale_copy)
                .await
        ),
        (409, "Conflict".into())
    );

    // List with a field selector.
    nodes
        .create(&PostParams::default(), &node("n2"))
        .await
        .unwrap();
    let list = nodes
        .list(&ListParams::default().fields("metadata.name=n2"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("n2"));
    assert_eq!(
        list.metadata.resource_version,
        Some(api.resource_version().to_string())
    );

    assert!(
        api.unhandled().is_empty(),
        "unexpected requests: {:?}",
        api.unhandled()
    );
}

#[tokio::test]
async fn watch_from_a_resource_version_and_410_when_too_old() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(api.client(dir.path()).await);
    let created = nodes
        .create(&PostParams::default(), &node("w1"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();

    let wp = WatchParams::default()
        .fields("metadata.name=w1")
        .timeout(30);
    let mut stream = nodes.watch(&wp, &rv).await.unwrap().boxed();
    let patch = json!({"status": {"capacity": {"memory": "16Gi"}}});
    nodes
        .patch_status("w1", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    // Another node's change must not show up in this watch.
    nodes
        .create(&PostParams::default(), &node("other"))
        .await
        .unwrap();
    nodes
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": {"cpu": "4"}}})),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first {
        WatchEvent::Modified(n) => {
            assert_eq!(n.status.unwrap().capacity.unwrap()["memory"].0, "16Gi")
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    let second = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match second {
        WatchEvent::Modified(n) => assert_eq!(n.status.unwrap().capacity.unwrap()["cpu"].0, "4"),
        other => panic!("expected MODIFIED for w1 again, got {other:?}"),
    }

    // Without a resourceVersion ("0"): the current state first, as ADDED.
    let mut from_zero = nodes.watch(&wp, "0").await.unwrap().boxed();
    match tokio::time::timeout(WAIT, from_zero.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("w1")),
        other => panic!("expected ADDED, got {other:?}"),
    }

    // After a compaction the old resourceVersion is gone: an ERROR event with 410.
    api.compact();
    let mut too_old = nodes.watch(&wp, &rv).await.unwrap().boxed();
    match tokio::time::timeout(WAIT, too_old.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, too_old.try_next())
            .await
            .unwrap()
            .unwrap()
            .is_none(),
        "the stream ends"
    );

    // stop() cuts open watches.
    api.stop().await;
    let end = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the watch ends when the API stops");
    assert!(
        !matches!(end, Some(Ok(_))),
        "no more events after stop: {end:?}"
    );
}

#[tokio::test]
async fn events_through_both_api_groups() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node("e1"))
        .await
        .unwrap();

    // core/v1, as a classic event recorder writes it.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let core: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "e1."},
        "involvedObject": {"kind": "Node", "name": "e1", "uid": "e1"},
        "reason": "CapacityChanged",
        "message": "memory 4Gi -> 8Gi",
        "type": "Normal",
        "source": {"component": "hotplug-agent", "host": "e1"},
        "count": 1,
    }))
    .unwrap();
    let created = events.create(&PostParams::default(), &core).await.unwrap();
    assert!(created.metadata.name.unwrap().starts_with("e1."));

    // An Event about a Node outside `default` is rejected, as by the real validation.
    let elsewhere: Api<Event> = Api::namespaced(client.clone(), "kube-system");
    assert_eq!(
        api_code(elsewhere.create(&PostParams::default(), &core).await),
        (422, "Invalid".into())
    );

    // events.k8s.io/v1 through kube's Recorder; the second publish patches a series.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "hotplug-agent".into(),
            instance: Some("e1".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some("e1".into()),
        ..ObjectReference::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "KubeletRefreshFailed".into(),
        note: Some("exit status 1".into()),
        action: "Refresh".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let all = api.events();
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(all[0]["reason"], "CapacityChanged");
    assert_eq!(all[0]["apiVersion"], "v1");
    let refreshed = &all[1];
    assert_eq!(refreshed["reason"], "KubeletRefreshFailed");
    assert_eq!(
        refreshed["message"], "exit status 1",
        "note is core/v1 message"
    );
    assert_eq!(refreshed["involvedObject"]["name"], "e1");
    assert_eq!(refreshed["reportingComponent"], "hotplug-agent");
    assert_eq!(refreshed["series"]["count"], 2);
    let found = api
        .wait_event(WAIT, |e| e["reason"] == "CapacityChanged")
        .await;
    assert_eq!(found["message"], "memory 4Gi -> 8Gi");
    let listed = events
        .list(&ListParams::default().fields("involvedObject.name=e1"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    assert!(
        api.unhandled().is_empty(),
        "unexpected requests: {:?}",
        api.unhandled()
    );
}

/// The agent's own Events (`NodeApi::event`, through kube's Recorder): a repeat is one
/// Event whose series grows, not a new object each back-off; a message longer than
/// events.k8s.io/v1 takes is cut to fit instead of being refused (and lost).
#[tokio::test]
async fn the_agents_events_repeat_as_one_series_and_always_fit() {
    use hotplug_agent::node::{EventType as AgentEventType, NodeApi};
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node("e2"))
        .await
        .unwrap();
    let mut agent = NodeApi::new(client, "e2");
    agent.get().await.expect("the Node");
    let failed = "command refresh failed: `/bin/false` exited with exit status: 1";
    for _ in 0..3 {
        agent
            .event(AgentEventType::Warning, "KubeletRefreshFailed", failed)
            .await
            .expect("posted");
    }
    let long = format!("command refresh failed: {}", "é".repeat(2000));
    agent
        .event(AgentEventType::Warning, "KubeletRefreshFailed", &long)
        .await
        .expect("a long message is cut, not refused");
    // The same reason with another message is an Event of its own, message kept (kube's
    // Recorder alone would count it into the first series under the first message).
    for message in ["memory 4Gi -> 8Gi", "memory 8Gi -> 4Gi"] {
        agent
            .event(AgentEventType::Normal, "CapacityChanged", message)
            .await
            .expect("posted");
    }

    let events = api.events();
    assert_eq!(
        events.len(),
        4,
        "one series, one long Event, two changes: {events:#?}"
    );
    let changes: Vec<&str> = events[2..]
        .iter()
        .map(|e| e["message"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(changes, ["memory 4Gi -> 8Gi", "memory 8Gi -> 4Gi"]);
    let series = &events[0];
    assert_eq!(series["message"], failed);
    assert_eq!(series["series"]["count"], 3, "{series}");
    assert_eq!(series["involvedObject"]["name"], "e2");
    assert!(series["involvedObject"]["uid"].is_string(), "{series}");
    assert_eq!(series["reportingComponent"], "hotplug-agent");
    assert_eq!(series["reportingInstance"], "e2");
    let cut = events[1]["message"].as_str().expect("a message");
    assert!(
        cut.len() <= 1024 && cut.ends_with('…'),
        "{} bytes",
        cut.len()
    );
    assert!(long.starts_with(cut.trim_end_matches('…')));
}

#[tokio::test]
async fn pods_by_node_and_evictions_honour_disruption_budgets() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    for (name, node) in [("a", "p1"), ("b", "p1"), ("c", "elsewhere")] {
        api.add_pod(json!({
            "metadata": {"name": name, "namespace": "work"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running"},
        }));
    }
    let all_pods: Api<Pod> = Api::all(client.clone());
    let on_node = all_pods
        .list(&ListParams::default().fields("spec.nodeName=p1"))
        .await
        .unwrap();
    let mut names: Vec<String> = on_node
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);

    let pods: Api<Pod> = Api::namespaced(client, "work");
    api.block_evictions("work", "b");
    pods.evict("a", &EvictParams::default()).await.unwrap();
    assert!(api.pod("work", "a").is_none(), "evicted pods are deleted");
    assert_eq!(
        api_code(pods.evict("b", &EvictParams::default()).await),
        (429, "TooManyRequests".into())
    );
    assert!(api.pod("work", "b").is_some());
    api.unblock_evictions("work", "b");
    pods.evict("b", &EvictParams::default()).await.unwrap();
    assert_eq!(
        api_code(pods.evict("zz", &EvictParams::default()).await),
        (404, "NotFound".into())
    );
}

/// The agent's requests for pods: (LISTs, WATCHes), as the API server's log has them.
fn pod_requests(api: &FakeApi) -> (usize, usize) {
    FakeApi::pod_lists_and_watches(&api.requests())
}

/// `NodeApi::wait_pods_gone`, the wait for evicted pods: a pod deleted gracefully (the
/// server keeps it, terminating, until its kubelet deletes it) is seen gone by the watch
/// the moment it is deleted: one LIST and one WATCH, no polling. One that never goes is
/// named at the deadline.
#[tokio::test]
async fn evicted_pods_are_waited_for_by_watching_them_within_a_deadline() {
    use hotplug_agent::node::NodeApi;
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    for (name, node) in [("slow", "w1"), ("stays", "w1"), ("other", "w2")] {
        api.add_pod(json!({
            "metadata": {"name": name, "namespace": "work"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running"},
        }));
    }
    let uid = |name: &str| {
        api.pod("work", name).expect("the pod")["metadata"]["uid"]
            .as_str()
            .expect("a uid")
            .to_owned()
    };
    let agent = NodeApi::new(client, "w1").with_timeout(WAIT);
    let slow = uid("slow");
    api.hold_evictions("work", "slow");
    agent.evict("work", "slow").await.expect("the eviction");
    let terminating = api.pod("work", "slow").expect("terminating, not gone yet");
    assert!(
        terminating["metadata"]["deletionTimestamp"].is_string(),
        "{terminating}"
    );

    let waiting = tokio::spawn({
        let (agent, uids) = (agent.clone(), vec![slow.clone()]);
        async move {
            let left = agent
                .wait_pods_gone(&uids, tokio::time::Instant::now() + 6 * WAIT)
                .await;
            (left, tokio::time::Instant::now())
        }
    });
    // Another node's pod going is not ours.
    assert!(api.delete_pod("work", "other"));
    // The pod's grace period: its kubelet deletes it a while after the eviction. A 1 s
    // poll would have listed the pods twice more by then.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(pod_requests(&api), (1, 1), "{:?}", api.requests());
    let deleted = tokio::time::Instant::now();
    assert!(api.delete_pod("work", "slow"));
    let (left, done) = waiting.await.expect("the wait");
    assert_eq!(left.expect("the API answers"), Vec::<String>::new());
    eprintln!(
        "wait_pods_gone returned {:?} after the delete",
        done - deleted
    );
    assert_eq!(
        pod_requests(&api),
        (1, 1),
        "one LIST, then the watch: {:?}",
        api.requests()
    );

    // A pod that does not go: named at the deadline, not before, not much after.
    let start = tokio::time::Instant::now();
    let left = agent
        .wait_pods_gone(&[uid("stays")], start + Duration::from_millis(800))
        .await
        .expect("the API answers");
    let took = start.elapsed();
    assert_eq!(left, ["work/stays"]);
    assert!(
        took >= Duration::from_millis(800) && took < WAIT,
        "{took:?}"
    );
    // Nothing to wait for: one LIST and done.
    let before = pod_requests(&api);
    let left = agent
        .wait_pods_gone(&[slow], start + WAIT)
        .await
        .expect("the API answers");
    assert!(left.is_empty());
    assert_eq!(pod_requests(&api), (before.0 + 1, before.1));
}

/// `NodeApi::watch_pods` resumes from the list's resourceVersion; where that is compacted
/// away (410 Expired), it lists again, and the list has what changed meanwhile.
#[tokio::test]
async fn the_pod_watch_lists_again_after_410_expired() {
    use hotplug_agent::node::{NodeApi, PodChange};
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    let pod = |name: &str| {
        json!({
            "metadata": {"name": name, "namespace": "work"},
            "spec": {"nodeName": "x1", "containers": [{"name": "c", "image": "x"}]},
        })
    };
    api.add_pod(pod("first"));
    let agent = NodeApi::new(client, "x1").with_timeout(WAIT);
    let mut watch = agent.watch_pods(tokio::time::Instant::now() + WAIT);
    let names = |change| match change {
        Some(PodChange::Listed(pods)) => pods
            .iter()
            .filter_map(|p: &Pod| p.metadata.name.clone())
            .collect::<Vec<_>>(),
        other => panic!("expected a list, got {other:?}"),
    };
    assert_eq!(names(watch.next().await.expect("listed")), ["first"]);
    // Changes after the list, then a compaction: the watch from the list's version fails.
    api.add_pod(pod("second"));
    api.compact();
    let mut again = names(watch.next().await.expect("listed again"));
    again.sort();
    assert_eq!(again, ["first", "second"]);
    assert_eq!(pod_requests(&api), (2, 1), "{:?}", api.requests());
    // And from that list on it watches: a change comes as itself.
    api.add_pod(pod("third"));
    match watch.next().await.expect("watched") {
        Some(PodChange::Applied(p)) => assert_eq!(p.metadata.name.as_deref(), Some("third")),
        other => panic!("expected the new pod, got {other:?}"),
    }
    assert_eq!(pod_requests(&api), (2, 2), "{:?}", api.requests());
    // 410 as the answer to the WATCH request itself: listed again all the same.
    let mut watch = agent.watch_pods(tokio::time::Instant::now() + WAIT);
    assert_eq!(names(watch.next().await.expect("listed")).len(), 3);
    api.fail_next("GET", "/api/v1/pods", 410, 1);
    assert_eq!(names(watch.next().await.expect("listed again")).len(), 3);
    assert_eq!(pod_requests(&api), (4, 3), "{:?}", api.requests());
}

#[tokio::test]
async fn stop_fails_requests_and_restart_serves_the_same_state_on_the_same_port() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(api.client(dir.path()).await);
    nodes
        .create(&PostParams::default(), &node("s1"))
        .await
        .unwrap();
    let url = api.url();

    api.stop().await;
    match nodes.get("s1").await {
        Err(kube::Error::Api(s)) => panic!("expected a connection error, got an API answer {s:?}"),
        Err(_) => {}
        Ok(_) => panic!("the API is stopped, yet the request succeeded"),
    }
    api.restart().await;
    assert_eq!(api.url(), url);
    let n = nodes
        .get("s1")
        .await
        .expect("the same client reconnects after restart");
    assert_eq!(n.metadata.name.as_deref(), Some("s1"));
    // A kube watcher rides out the outage: it re-watches from its last resourceVersion.
    let mut watched = kube::runtime::watcher::watch_object(nodes.clone(), "s1").boxed();
    let first = tokio::time::timeout(WAIT, watched.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.flatten().is_some());
    api.stop().await;
    api.restart().await;
    let patch = json!({"status": {"capacity": {"memory": "64Gi"}}});
    nodes
        .patch_status("s1", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match watched.next().await {
                Some(Ok(Some(n)))
                    if n.status
                        .as_ref()
                        .and_then(|s| s.capacity.as_ref())
                        .is_some_and(|c| c["memory"].0 == "64Gi") =>
                {
                    break n;
                }
                Some(_) => continue,
                None => panic!("the watcher ended"),
            }
        }
    })
    .await
    .expect("the watcher saw the change made after the restart");
    assert_eq!(after.metadata.name.as_deref(), Some("s1"));

    // Unknown paths are answered 404 and recorded.
    let raw = hyper::http::Request::get("/apis/apps/v1/daemonsets")
        .body(Vec::new())
        .unwrap();
    assert!(nodes.clone().into_client().request_text(raw).await.is_err());
    assert_eq!(
        api.unhandled(),
        [("GET".to_owned(), "/apis/apps/v1/daemonsets".to_owned())]
    );
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn memory_of(node: &Value) -> &str {
    node["status"]["capacity"]["memory"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test]
async fn kubelet_standin_reposts_its_cached_capacity_and_restarts() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = api.client(dir.path()).await;
    let kubeconfig = dir.path().join("kubeconfig");
    let (memory, cpus) = machine();
    let memory_q = binary_quantity(memory);
    let cpus_q = cpus.to_string();
    assert_eq!(
        memory_q,
        format!("{}Ki", memory / 1024),
        "MemTotal here is not MiB-aligned, so the kubelet writes Ki"
    );
    let matches_machine = |n: &Value| {
        memory_of(n) == memory_q && n["status"]["capacity"]["cpu"].as_str() == Some(cpus_q.as_str())
    };
    let cgroup_file: PathBuf = dir.path().join("memory.max");

    let kubelet = Kubelet::start(
        &kubeconfig,
        "standin",
        &dir.path().join("kubelet"),
        &[
            "--repost-ms",
            "200",
            "--cgroup-file",
            cgroup_file.to_str().unwrap(),
        ],
    );
    assert_eq!(kubelet.restarts(), 1, "the initial start counts as one");
    let n = api.wait_node("standin", WAIT, matches_machine).await;
    assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "standin");
    let ready = n["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("KubeletReady"))
    );
    let limit: u64 = std::fs::read_to_string(&cgroup_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        limit,
        memory - (100 << 20),
        "kubepods limit = capacity - reserved"
    );
    let first_pid = kubelet.pid().expect("an instance is running");

    // Someone else patches the capacity (and adds a condition): the stand-in puts its
    // cached capacity back within a few reposts; the foreign condition survives.
    let nodes: Api<Node> = Api::all(client);
    let patch = json!({"status": {
        "capacity": {"memory": "1Ki"},
        "conditions": [{"type": "HotplugCapacityStale", "status": "True", "reason": "Stale"}],
    }});
    let patched = nodes
        .patch_status("standin", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().capacity.unwrap()["memory"].0, "1Ki");
    let n = api
        .wait_node("standin", Duration::from_secs(3), |n| {
            matches_machine(n) && condition_types(n).contains(&"HotplugCapacityStale".to_owned())
        })
        .await;
    assert!(condition_types(&n).contains(&"Ready".to_owned()));

    // The agent's refresh command, run through a shell as words.
    let out = Command::new("sh")
        .arg("-c")
        .arg(kubelet.restart_command())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restart failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        kubelet.log()
    );
    assert_eq!(kubelet.restarts(), 2, "{}", kubelet.restarts_log());
    let second_pid = kubelet.pid().expect("the new instance is running");
    assert_ne!(first_pid, second_pid);
    assert!(!alive(first_pid), "the old instance exited");
    let n = api.wait_node("standin", WAIT, matches_machine).await;
    assert!(
        std::fs::read_to_string(kubelet::ready_path(kubelet.pidfile()))
            .unwrap()
            .trim()
            == second_pid.to_string()
    );
    assert_eq!(memory_of(&n), memory_q);

    // SIGTERM: it exits promptly (no SIGKILL needed) and cleans up its pidfile.
    let pidfile = kubelet.pidfile().to_owned();
    assert_eq!(kubelet.stop(), process::Stopped::Terminated(second_pid));
    assert!(!alive(second_pid));
    assert!(!pidfile.exists(), "the pidfile is removed on exit");
    assert!(kubelet.log().contains("stopping"));
    drop(kubelet);
    for pid in [first_pid, second_pid] {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "stand-in {pid} left behind (zombie?)"
        );
    }
    assert!(
        api.unhandled().is_empty(),
        "unexpected requests: {:?}",
        api.unhandled()
    );
}

#[tokio::test]
async fn kubelet_standin_exits_zero_on_sigterm() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let pidfile = dir.path().join("k.pid");
    let child = Command::new(kubelet::standin_bin())
        .args([
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            "direct",
        ])
        .args(["--pidfile", pidfile.to_str().unwrap(), "--repost-ms", "100"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    api.wait_node("direct", WAIT, |n| {
        n["status"]["capacity"]["cpu"].is_string()
    })
    .await;
    // SAFETY: signalling our own child by its PID.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit status on SIGTERM: {}\n{log}",
        out.status
    );
    assert!(log.contains("stopping"), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn kube_runtime_watchers_list_then_watch_and_stream_lists() {
    use kube::runtime::{WatchStreamExt, wait::await_condition, watcher};

    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(api.client(dir.path()).await);
    nodes
        .create(&PostParams::default(), &node("r1"))
        .await
        .unwrap();

    // await_condition: watch_object (list + watch by metadata.name) until it holds.
    let waiter = tokio::spawn(await_condition(nodes.clone(), "r1", |n: Option<&Node>| {
        n.and_then(|n| n.status.as_ref()?.capacity.as_ref()?.get("memory"))
            .is_some_and(|q| q.0 == "32Gi")
    }));
    nodes
        .patch_status(
            "r1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": {"memory": "32Gi"}}})),
        )
        .await
        .unwrap();
    let seen = tokio::time::timeout(WAIT, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.status.unwrap().capacity.unwrap()["memory"].0, "32Gi");

    // A streaming-list watcher (sendInitialEvents + the initial-events-end bookmark).
    let config = watcher::Config::default()
        .fields("metadata.name=r1")
        .streaming_lists();
    let mut objects = watcher(nodes.clone(), config).applied_objects().boxed();
    let first = tokio::time::timeout(WAIT, objects.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("r1"));
    nodes
        .patch_status(
            "r1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": {"cpu": "8"}}})),
        )
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, objects.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status.unwrap().capacity.unwrap()["cpu"].0, "8");
    let watched = api
        .requests()
        .into_iter()
        .filter(|(_, p)| p.contains("sendInitialEvents=true"))
        .count();
    assert_eq!(watched, 1);
    assert!(
        api.unhandled().is_empty(),
        "unexpected requests: {:?}",
        api.unhandled()
    );
}
