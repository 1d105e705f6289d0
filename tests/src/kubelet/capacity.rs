//! What the kubelet advertises, computed from the machine as it computes it
//! (pkg/kubelet/nodestatus/setters.go `MachineInfo`, pkg/kubelet/cm
//! `node_container_manager_linux.go`, v1.34), with quantities in the canonical form
//! `resource.Quantity` serialises to.

use std::collections::BTreeMap;

use hotplug_agent::capacity::Snapshot;

/// A byte count as `resource.NewQuantity(n, resource.BinarySI).String()`: the largest
/// power-of-1024 suffix that divides it exactly, plain digits below 1024.
/// `25276514304` → `24684096Ki`; `2097152` → `2Mi`.
pub fn binary_quantity(bytes: u64) -> String {
    if bytes < 1024 {
        return bytes.to_string();
    }
    let (mut value, mut k) = (bytes, 0);
    while k < 6 && value % 1024 == 0 {
        value /= 1024;
        k += 1;
    }
    format!("{value}{}", ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][k])
}

/// `hugepages-2Mi` for 2 MiB pages, `hugepages-1Gi` for 1 GiB pages.
pub fn hugepages_resource(page_bytes: u64) -> String {
    format!("hugepages-{}", binary_quantity(page_bytes))
}

/// The Node's `capacity` and `allocatable`, and the pods' cgroup memory limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `cpu` (online CPUs), `memory` (MemTotal), `hugepages-*` (pages × size), `pods`.
    pub capacity: BTreeMap<String, String>,
    /// As `capacity`, but `memory` less the reservation and the pre-allocated hugepages.
    pub allocatable: BTreeMap<String, String>,
    /// The `kubepods` cgroup `memory.max`: MemTotal less the reservation (the kubelet
    /// sets it from capacity minus kube- and system-reserved, once, at start-up).
    pub kubepods_memory_limit: u64,
}

/// The kubelet's view of `snapshot` with `reserved_memory` bytes reserved.
pub fn capacity_of(snapshot: &Snapshot, reserved_memory: u64) -> Capacity {
    let mut capacity = BTreeMap::from([
        ("cpu".to_owned(), snapshot.cpus_online.to_string()),
        ("memory".to_owned(), binary_quantity(snapshot.memory_bytes)),
        // --max-pods default.
        ("pods".to_owned(), "110".to_owned()),
    ]);
    let mut hugepages_bytes = 0u64;
    for pages in &snapshot.hugepages {
        let bytes = pages.total.saturating_mul(pages.size_bytes);
        hugepages_bytes = hugepages_bytes.saturating_add(bytes);
        capacity.insert(hugepages_resource(pages.size_bytes), binary_quantity(bytes));
    }
    let kubepods_memory_limit = snapshot.memory_bytes.saturating_sub(reserved_memory);
    let mut allocatable = capacity.clone();
    allocatable.insert(
        "memory".to_owned(),
        binary_quantity(kubepods_memory_limit.saturating_sub(hugepages_bytes)),
    );
    Capacity {
        capacity,
        allocatable,
        kubepods_memory_limit,
    }
}

#[cfg(test)]
mod tests {
    use hotplug_agent::capacity::Hugepages;

    use super::*;

    #[test]
    fn quantities_are_canonical() {
        assert_eq!(binary_quantity(25_276_514_304), "24684096Ki");
        assert_eq!(binary_quantity(8 << 30), "8Gi");
        assert_eq!(binary_quantity(2 << 20), "2Mi");
        assert_eq!(binary_quantity(1536), "1536");
        assert_eq!(binary_quantity(0), "0");
        assert_eq!(hugepages_resource(2048 * 1024), "hugepages-2Mi");
        assert_eq!(hugepages_resource(1_048_576 * 1024), "hugepages-1Gi");
    }

    #[test]
    fn allocatable_subtracts_the_reservation_and_hugepages() {
        let snapshot = Snapshot {
            memory_bytes: 4 << 30,
            cpus_online: 2,
            cpus_online_list: "0-1".into(),
            cpus_possible: 2,
            memory_block_size: None,
            memory_blocks: Vec::new(),
            hugepages: vec![
                Hugepages {
                    size_bytes: 2 << 20,
                    total: 512,
                    free: 512,
                },
                Hugepages {
                    size_bytes: 1 << 30,
                    total: 0,
                    free: 0,
                },
            ],
            numa_nodes: Vec::new(),
        };
        let c = capacity_of(&snapshot, 100 << 20);
        assert_eq!(c.capacity["cpu"], "2");
        assert_eq!(c.capacity["memory"], "4Gi");
        assert_eq!(c.capacity["hugepages-2Mi"], "1Gi");
        assert_eq!(c.capacity["hugepages-1Gi"], "0");
        assert_eq!(
            c.allocatable["memory"],
            binary_quantity((4 << 30) - (100 << 20) - (1 << 30))
        );
        assert_eq!(c.kubepods_memory_limit, (4 << 30) - (100 << 20));
    }
}
