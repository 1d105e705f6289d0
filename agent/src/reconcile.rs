//! Reconcile: the machine's capacity against what the Node advertises.
//!
//! The kubelet's `.status.capacity` comes from cadvisor's machine info, read once at
//! start-up: `memory` is MemTotal in bytes, `cpu` the number of online CPUs, and
//! `hugepages-<size>` the pages reserved of each size times the size
//! (pkg/kubelet/cadvisor/util.go `CapacityFromMachineInfo`). Quantities are parsed with
//! kube_quantity, never by hand.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube_quantity::ParsedQuantity;

use crate::{capacity::Snapshot, record::Advertised};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdvertisedError {
    #[error("the Node has no status.capacity yet")]
    NoCapacity,
    #[error("status.capacity.{resource} is {value:?}, not a quantity")]
    BadQuantity { resource: String, value: String },
}

/// A quantity as a number. kube_quantity's integer conversions truncate the mantissa first
/// ("1.5Gi" would become 1 GiB); f64 is exact for integers below 2^53 bytes (8 PiB).
fn number(resource: &str, value: &str) -> Result<f64, AdvertisedError> {
    let bad = || AdvertisedError::BadQuantity {
        resource: resource.into(),
        value: value.into(),
    };
    let q = ParsedQuantity::try_from(value).map_err(|_| bad())?;
    q.to_bytes_f64()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(bad)
}

fn bytes(resource: &str, value: &str) -> Result<u64, AdvertisedError> {
    Ok(number(resource, value)?.round() as u64)
}

/// Reads `.status.capacity` (and allocatable memory) off a Node.
pub fn advertised(node: &Node) -> Result<Advertised, AdvertisedError> {
    let status = node.status.as_ref();
    let capacity = status
        .and_then(|s| s.capacity.as_ref())
        .ok_or(AdvertisedError::NoCapacity)?;
    let mut adv = Advertised::default();
    for (name, q) in capacity {
        match name.as_str() {
            "memory" => adv.memory_bytes = Some(bytes(name, &q.0)?),
            "cpu" => adv.cpu_millis = Some((number(name, &q.0)? * 1000.0).round() as u64),
            h if h.starts_with("hugepages-") => {
                adv.hugepages.insert(h.to_string(), bytes(name, &q.0)?);
            }
            _ => {}
        }
    }
    if let Some(mem) = status
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("memory"))
    {
        adv.allocatable_memory_bytes = Some(bytes("allocatable.memory", &mem.0)?);
    }
    Ok(adv)
}

/// What the kubelet would advertise for this machine, as it computes it.
pub fn expected(machine: &Snapshot) -> Advertised {
    Advertised {
        memory_bytes: Some(machine.memory_bytes),
        cpu_millis: Some(u64::from(machine.cpus_online) * 1000),
        hugepages: machine
            .hugepages
            .iter()
            .map(|h| (hugepages_resource(h.size_bytes), h.total * h.size_bytes))
            .collect(),
        allocatable_memory_bytes: None,
    }
}

/// `2097152` -> `hugepages-2Mi`, `1073741824` -> `hugepages-1Gi` (the kubelet's names).
pub fn hugepages_resource(size_bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")];
    for (unit, suffix) in UNITS {
        if size_bytes.is_multiple_of(unit) {
            return format!("hugepages-{}{suffix}", size_bytes / unit);
        }
    }
    format!("hugepages-{size_bytes}")
}

/// Every way the Node's capacity differs from the machine's, in words; empty: in sync.
pub fn differences(machine: &Advertised, node: &Advertised) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |what: &str, have: Option<u64>, want: Option<u64>| {
        if have != want {
            let show = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
            out.push(format!(
                "{what}: node {} != machine {}",
                show(have),
                show(want)
            ));
        }
    };
    field("memory", node.memory_bytes, machine.memory_bytes);
    field("cpu_millis", node.cpu_millis, machine.cpu_millis);
    let names: BTreeMap<&String, ()> = machine
        .hugepages
        .keys()
        .chain(node.hugepages.keys())
        .map(|k| (k, ()))
        .collect();
    for name in names.keys() {
        // A size with no pages may be advertised as 0 or not at all.
        let have = node.hugepages.get(*name).copied().filter(|&v| v != 0);
        let want = machine.hugepages.get(*name).copied().filter(|&v| v != 0);
        field(name, have, want);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{api::core::v1::NodeStatus, apimachinery::pkg::api::resource::Quantity};

    use super::*;

    fn node(capacity: &[(&str, &str)], allocatable_memory: Option<&str>) -> Node {
        let q = |v: &str| Quantity(v.to_string());
        Node {
            status: Some(NodeStatus {
                capacity: Some(
                    capacity
                        .iter()
                        .map(|(k, v)| (k.to_string(), q(v)))
                        .collect(),
                ),
                allocatable: allocatable_memory
                    .map(|m| BTreeMap::from([("memory".to_string(), q(m))])),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn parses_the_quantities_the_kubelet_writes() {
        let n = node(
            &[
                ("memory", "24684096Ki"),
                ("cpu", "2"),
                ("hugepages-2Mi", "512Mi"),
                ("pods", "110"),
            ],
            Some("24479296Ki"),
        );
        let a = advertised(&n).unwrap();
        assert_eq!(a.memory_bytes, Some(24_684_096 * 1024));
        assert_eq!(a.cpu_millis, Some(2000));
        assert_eq!(a.hugepages.get("hugepages-2Mi"), Some(&(512 << 20)));
        assert_eq!(a.allocatable_memory_bytes, Some(24_479_296 * 1024));
        // Other spellings of the same values.
        let b = advertised(&node(&[("memory", "25276514304"), ("cpu", "2000m")], None)).unwrap();
        assert_eq!(
            (b.memory_bytes, b.cpu_millis),
            (a.memory_bytes, a.cpu_millis)
        );
        let c = advertised(&node(&[("memory", "1.5Gi"), ("cpu", "1500m")], None)).unwrap();
        assert_eq!((c.memory_bytes, c.cpu_millis), (Some(3 << 29), Some(1500)));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = advertised(&node(&[("memory", "lots")], None)).unwrap_err();
        assert_eq!(
            err,
            AdvertisedError::BadQuantity {
                resource: "memory".into(),
                value: "lots".into()
            }
        );
        assert_eq!(
            advertised(&Node::default()),
            Err(AdvertisedError::NoCapacity)
        );
    }

    #[test]
    fn differences_in_either_direction() {
        let machine = Advertised {
            memory_bytes: Some(128 << 30),
            cpu_millis: Some(4000),
            ..Advertised::default()
        };
        let same = machine.clone();
        assert!(differences(&machine, &same).is_empty());
        let stale = Advertised {
            memory_bytes: Some(64 << 30),
            ..machine.clone()
        };
        let d = differences(&machine, &stale);
        assert_eq!(
            d,
            vec![format!(
                "memory: node {} != machine {}",
                64u64 << 30,
                128u64 << 30
            )]
        );
        // Unplug: the node advertises more than the machine has.
        let more = Advertised {
            cpu_millis: Some(8000),
            ..machine.clone()
        };
        assert_eq!(
            differences(&machine, &more),
            vec!["cpu_millis: node 8000 != machine 4000".to_string()]
        );
    }

    #[test]
    fn hugepages_zero_and_absent_are_the_same() {
        let mut machine = Advertised {
            memory_bytes: Some(1),
            cpu_millis: Some(1000),
            ..Advertised::default()
        };
        machine.hugepages.insert("hugepages-1Gi".into(), 0);
        let mut node = machine.clone();
        node.hugepages.clear();
        assert!(differences(&machine, &node).is_empty());
        node.hugepages.insert("hugepages-2Mi".into(), 2 << 20);
        assert_eq!(differences(&machine, &node).len(), 1);
        assert_eq!(hugepages_resource(2 << 20), "hugepages-2Mi");
        assert_eq!(hugepages_resource(1 << 30), "hugepages-1Gi");
    }
}
