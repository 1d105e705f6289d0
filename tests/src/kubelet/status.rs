//! The Node the stand-in registers and the status PATCH it re-posts, shaped as the
//! kubelet's (pkg/kubelet/kubelet_node_status.go, nodestatus/setters.go, v1.34).

use serde_json::{Value, json};

use super::Capacity;

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// `runtime.GOARCH` for this machine.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The kubelet's four conditions, heartbeat now, transitioned at `started`.
fn conditions(started: &str) -> Value {
    let now = now();
    let condition = |ty: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": ty, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": started,
        })
    };
    json!([
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

fn status(name: &str, cap: &Capacity, started: &str) -> Value {
    json!({
        "capacity": cap.capacity,
        "allocatable": cap.allocatable,
        "conditions": conditions(started),
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "kubeletVersion": "v1.34.0-standin",
            "operatingSystem": "linux",
            "architecture": go_arch(),
        },
    })
}

/// The Node `registerWithAPIServer` creates: name, the well-known labels, the status.
pub fn node_object(name: &str, cap: &Capacity, started: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": go_arch(),
            },
        },
        "status": status(name, cap, started),
    })
}

/// The strategic-merge patch of `nodes/<name>/status` that `tryUpdateNodeStatus` sends:
/// the cached capacity and allocatable (overwriting anyone else's), the kubelet's
/// conditions merged by `type` (foreign ones survive), with `$setElementOrder`.
pub fn status_patch(name: &str, cap: &Capacity, started: &str) -> Value {
    let mut patch = json!({"status": status(name, cap, started)});
    patch["status"]["$setElementOrder/conditions"] = json!([
        {"type": "MemoryPressure"}, {"type": "DiskPressure"}, {"type": "PIDPressure"}, {"type": "Ready"},
    ]);
    patch
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::fake_api::{ListStrategy, strategic_merge};

    fn node_lists(path: &str) -> Option<ListStrategy> {
        matches!(path, "status.conditions" | "status.addresses")
            .then_some(ListStrategy::MergeKey("type"))
    }

    #[test]
    fn the_repost_overwrites_capacity_and_keeps_foreign_conditions() {
        let cap = Capacity {
            capacity: BTreeMap::from([("memory".to_owned(), "4Gi".to_owned())]),
            allocatable: BTreeMap::from([("memory".to_owned(), "3Gi".to_owned())]),
            kubepods_memory_limit: 3 << 30,
        };
        let mut node = node_object("n", &cap, "2025-01-01T00:00:00Z");
        node["status"]["capacity"]["memory"] = json!("1Ki");
        node["status"]["conditions"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "HotplugCapacityStale", "status": "True"}));
        strategic_merge(
            &mut node,
            &status_patch("n", &cap, "2025-01-01T00:00:00Z"),
            node_lists,
        )
        .unwrap();
        assert_eq!(node["status"]["capacity"]["memory"], "4Gi");
        let types: Vec<&str> = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "MemoryPressure",
                "DiskPressure",
                "PIDPressure",
                "Ready",
                "HotplugCapacityStale"
            ]
        );
    }
}
