//! The sysfs and procfs files of `capacity`: CPU lists, meminfo, memory block state,
//! block size, NUMA nodes and hugepages, read from a generated tree.
use std::{collections::BTreeSet, fs, path::Path};

use hotplug_agent::{
    capacity::{self, BlockState, Hugepages, MemoryBlock, NumaNode, Snapshot},
    sources::error_chain,
};
use proptest::{collection::vec, option, prelude::*, sample::select};

use crate::{check, ensure};

const MAX_CPU_ID: u32 = 65_535;

fn cpu_set() -> impl Strategy<Value = BTreeSet<u32>> {
    // Runs, as real machines have them, and scattered ids up to the limit.
    let run = (0u32..=MAX_CPU_ID, 1u32..64)
        .prop_map(|(a, n)| (a..a.saturating_add(n).min(MAX_CPU_ID + 1)).collect::<Vec<_>>());
    prop_oneof![
        vec(run, 0..6).prop_map(|runs| runs.into_iter().flatten().collect()),
        vec(0u32..=MAX_CPU_ID, 0..40).prop_map(BTreeSet::from_iter),
        vec(0u32..16, 0..16).prop_map(BTreeSet::from_iter),
    ]
}

#[test]
fn cpu_lists_round_trip_through_the_kernel_format() {
    check("cpu_list_round_trip", 3000, cpu_set(), |set| {
        let ids = Vec::from_iter(set.iter().copied());
        let text = capacity::format_cpu_list(&ids);
        let back = capacity::parse_cpu_list(&format!("{text}\n"));
        ensure!(back.as_ref() == Ok(&ids), "{text:?} parsed to {back:?}");
        Ok(())
    });
}

#[test]
fn cpu_lists_written_any_valid_way_parse_to_their_set() {
    // Overlapping, unsorted, repeated elements, spaces around them: all valid input to
    // the kernel's bitmap_parselist.
    let element = (
        0u32..=MAX_CPU_ID,
        0u32..40,
        any::<bool>(),
        select(&["", " ", "\t"][..]),
    );
    check("cpu_list_model", 3000, vec(element, 0..12), |elements| {
        let mut want = BTreeSet::new();
        let mut text = Vec::new();
        for (first, len, single, pad) in &elements {
            let last = first.saturating_add(*len).min(MAX_CPU_ID);
            if *single {
                want.insert(*first);
                text.push(format!("{pad}{first}{pad}"));
            } else {
                want.extend(*first..=last);
                text.push(format!("{pad}{first}-{last}{pad}"));
            }
        }
        let text = text.join(",");
        let got = capacity::parse_cpu_list(&text);
        ensure!(got == Ok(Vec::from_iter(want)), "{text:?}: {got:?}");
        Ok(())
    });
}

#[test]
fn any_cpu_list_is_parsed_or_refused_by_its_element() {
    let alphabet = select(
        &[
            '0', '1', '9', '-', ',', ' ', '\n', '+', 'x', 'é', '6', '5', '3',
        ][..],
    );
    let text = prop_oneof![
        vec(alphabet, 0..40).prop_map(String::from_iter),
        any::<String>(),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("{a}-{b}")),
    ];
    check("cpu_list_any", 6000, text, |text| {
        match capacity::parse_cpu_list(&text) {
            Ok(ids) => ensure!(
                ids.windows(2).all(|w| w[0] < w[1]) && ids.last().is_none_or(|&l| l <= MAX_CPU_ID),
                "{text:?}: {ids:?} not sorted, unique and in range"
            ),
            Err(e) => ensure!(
                text.contains(&e.element),
                "{e} does not name a part of {text:?}"
            ),
        }
        Ok(())
    });
}

#[test]
fn cpu_list_regressions() {
    // 2,000 repeats of the whole range: every element used to be expanded before the
    // duplicates were dropped, 500 MB here; a checkpoint may hold 4 MiB of this.
    let text = vec!["0-65535"; 2000].join(",");
    assert_eq!(capacity::parse_cpu_list(&text).map(|l| l.len()), Ok(65_536));
}

#[test]
fn meminfo_totals_follow_cadvisors_rule() {
    let other = vec(
        (
            select(
                &[
                    "MemFree",
                    "Cached",
                    "HugePages_Total",
                    "Memtotal",
                    "MemTotalX",
                ][..],
            ),
            any::<u32>(),
        ),
        0..6,
    );
    let total = prop_oneof![any::<u64>(), 0u64..(1 << 40)];
    check(
        "meminfo_model",
        3000,
        (other, total, 0usize..6, select(&[" ", "   ", "\t"][..])),
        |(other, total, at, pad)| {
            let mut lines: Vec<String> = other
                .iter()
                .map(|(k, v)| format!("{k}:{pad}{v} kB"))
                .collect();
            lines.insert(at.min(lines.len()), format!("MemTotal:{pad}{total} kB"));
            let text = lines.join("\n") + "\n";
            let got = capacity::parse_meminfo_total(&text);
            ensure!(got == total.checked_mul(1024), "{text:?}: {got:?}");
            Ok(())
        },
    );
    check("meminfo_any", 3000, any::<String>(), |text| {
        let _ = capacity::parse_meminfo_total(&text);
        let _ = capacity::parse_meminfo_total(&format!("MemTotal:{text}"));
        Ok(())
    });
}

/// A machine as sysfs and procfs show it.
#[derive(Clone, Debug)]
struct Machine {
    mem_kb: u64,
    online: BTreeSet<u32>,
    possible: Option<BTreeSet<u32>>,
    block_size: Option<u64>,
    /// id, state text, valid_zones text, node link.
    blocks: Vec<(u32, &'static str, Option<&'static str>, Option<u32>)>,
    /// id, cpulist, MemTotal kB.
    nodes: Vec<(u32, BTreeSet<u32>, u64)>,
    /// page size kB, total, free.
    hugepages: Vec<(u64, u64, u64)>,
}

fn machine() -> impl Strategy<Value = Machine> {
    let state = select(&["online", "offline", "going-offline", "ERROR-UNKNOWN-7", ""][..]);
    let zones = option::of(select(
        &["Normal", "Movable", "DMA32", "none", "Normal Movable", ""][..],
    ));
    let blocks = vec((0u32..4096, state, zones, option::of(0u32..4)), 0..12);
    let nodes = vec((0u32..4, cpu_set(), 0u64..(1 << 34)), 0..4);
    let hugepages = vec(
        (
            select(&[2048u64, 1_048_576, 64][..]),
            0u64..1 << 20,
            0u64..1 << 20,
        ),
        0..3,
    );
    (
        (
            0u64..(1 << 44),
            cpu_set(),
            option::of(cpu_set()),
            option::of(1u64..(1 << 40)),
        ),
        (blocks, nodes, hugepages),
    )
        .prop_map(
            |((mem_kb, online, possible, block_size), (mut blocks, mut nodes, mut hugepages))| {
                blocks.sort_by_key(|b| b.0);
                blocks.dedup_by_key(|b| b.0);
                nodes.sort_by_key(|n| n.0);
                nodes.dedup_by_key(|n| n.0);
                hugepages.sort_by_key(|h| h.0);
                hugepages.dedup_by_key(|h| h.0);
                Machine {
                    mem_kb,
                    online,
                    possible,
                    block_size,
                    blocks,
                    nodes,
                    hugepages,
                }
            },
        )
}

fn list(set: &BTreeSet<u32>) -> String {
    capacity::format_cpu_list(&Vec::from_iter(set.iter().copied())) + "\n"
}

impl Machine {
    fn write(&self, root: &Path) {
        let put = |rel: &str, text: &str| {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        put(
            "proc/meminfo",
            &format!("MemTotal:       {} kB\nMemFree:        1 kB\n", self.mem_kb),
        );
        put("sys/devices/system/cpu/online", &list(&self.online));
        if let Some(p) = &self.possible {
            put("sys/devices/system/cpu/possible", &list(p));
        }
        if let Some(size) = self.block_size {
            put(
                "sys/devices/system/memory/block_size_bytes",
                &format!("{size:x}\n"),
            );
        }
        for (id, state, zones, node) in &self.blocks {
            let dir = format!("sys/devices/system/memory/memory{id}");
            put(&format!("{dir}/state"), &format!("{state}\n"));
            if let Some(z) = zones {
                put(&format!("{dir}/valid_zones"), &format!("{z}\n"));
            }
            if let Some(n) = node {
                fs::create_dir_all(root.join(format!("{dir}/node{n}"))).expect("mkdir");
            }
        }
        for (id, cpus, kb) in &self.nodes {
            let dir = format!("sys/devices/system/node/node{id}");
            put(&format!("{dir}/cpulist"), &list(cpus));
            put(
                &format!("{dir}/meminfo"),
                &format!("Node {id} MemTotal:       {kb} kB\nNode {id} MemFree:  1 kB\n"),
            );
        }
        for (kb, total, free) in &self.hugepages {
            let dir = format!("sys/kernel/mm/hugepages/hugepages-{kb}kB");
            put(&format!("{dir}/nr_hugepages"), &format!("{total}\n"));
            put(&format!("{dir}/free_hugepages"), &format!("{free}\n"));
        }
    }

    fn snapshot(&self) -> Snapshot {
        let node_ids: Vec<u32> = self.nodes.iter().map(|n| n.0).collect();
        Snapshot {
            memory_bytes: self.mem_kb * 1024,
            cpus_online: self.online.len() as u32,
            cpus_online_list: list(&self.online).trim_end().to_owned(),
            cpus_possible: self.possible.as_ref().map_or(0, |p| p.len() as u32),
            memory_block_size: self.block_size,
            memory_blocks: self
                .blocks
                .iter()
                .map(|&(id, state, zones, node)| {
                    let state = match state {
                        "online" => BlockState::Online,
                        "offline" => BlockState::Offline,
                        "going-offline" => BlockState::GoingOffline,
                        _ => BlockState::Unknown,
                    };
                    let zone = zones.filter(|z| {
                        state == BlockState::Online
                            && !z.is_empty()
                            && *z != "none"
                            && !z.contains(' ')
                    });
                    // A link to a node the machine does not list is still found (the fallback).
                    let _ = &node_ids;
                    MemoryBlock {
                        id,
                        state,
                        zone: zone.map(String::from),
                        node,
                    }
                })
                .collect(),
            hugepages: self
                .hugepages
                .iter()
                .map(|&(kb, total, free)| Hugepages {
                    size_bytes: kb * 1024,
                    total,
                    free,
                })
                .collect(),
            numa_nodes: self
                .nodes
                .iter()
                .map(|(id, cpus, kb)| NumaNode {
                    id: *id,
                    cpus: Vec::from_iter(cpus.iter().copied()),
                    memory_bytes: kb * 1024,
                })
                .collect(),
        }
    }
}

#[test]
fn sysfs_trees_from_the_model_read_to_the_model() {
    check("sysfs_model", 300, machine(), |m| {
        let dir = crate::scratch();
        m.write(dir.path());
        let got = capacity::read_snapshot(dir.path())
            .map_err(|e| TestCaseError::fail(format!("{m:?}: {}", error_chain(&e))))?;
        let want = m.snapshot();
        ensure!(got == want, "{m:?}\n read {got:?}\n want {want:?}");
        let summary =
            capacity::read_summary(dir.path()).map_err(|e| TestCaseError::fail(error_chain(&e)))?;
        ensure!(summary == want.summary(), "summary {summary:?}");
        Ok(())
    });
}

/// The files of a tree, any of which may be corrupted.
const FILES: [&str; 4] = [
    "proc/meminfo",
    "sys/devices/system/cpu/online",
    "sys/devices/system/cpu/possible",
    "sys/devices/system/memory/block_size_bytes",
];

#[test]
fn a_corrupt_sysfs_file_is_an_error_that_names_it() {
    let garbage = prop_oneof![
        vec(any::<u8>(), 0..64),
        any::<String>().prop_map(String::into_bytes),
        select(
            &[
                "",
                "\n",
                "-1\n",
                "0x10\n",
                "ffffffffffffffffff\n",
                "MemTotal: 1 MB\n",
                "4294967296\n"
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
    ];
    let target = prop_oneof![
        select(&FILES[..]).prop_map(String::from),
        Just("node0/cpulist".to_owned()),
        Just("node0/meminfo".to_owned()),
        Just("hugepages/nr_hugepages".to_owned()),
        Just("memory/state".to_owned()),
        Just("memory/valid_zones".to_owned()),
    ];
    check(
        "sysfs_corrupt",
        400,
        (machine(), target, garbage),
        |(mut m, target, garbage)| {
            // Make sure the file to corrupt exists.
            m.possible.get_or_insert_with(BTreeSet::new);
            m.block_size.get_or_insert(0x800_0000);
            if m.nodes.is_empty() {
                m.nodes.push((0, BTreeSet::from([0]), 1));
            }
            if m.hugepages.is_empty() {
                m.hugepages.push((2048, 1, 1));
            }
            if m.blocks.is_empty() {
                m.blocks.push((0, "online", Some("Normal"), None));
            }
            let dir = crate::scratch();
            m.write(dir.path());
            let path = match target.as_str() {
                "node0/cpulist" | "node0/meminfo" => {
                    let id = m.nodes[0].0;
                    format!("sys/devices/system/node/node{id}/{}", &target[6..])
                }
                "hugepages/nr_hugepages" => format!(
                    "sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
                    m.hugepages[0].0
                ),
                "memory/state" | "memory/valid_zones" => {
                    format!(
                        "sys/devices/system/memory/memory{}/{}",
                        m.blocks[0].0,
                        &target[7..]
                    )
                }
                file => file.to_owned(),
            };
            let path = dir.path().join(path);
            fs::write(&path, &garbage).expect("write");
            match capacity::read_snapshot(dir.path()) {
                Ok(_) => {}
                Err(e) => {
                    let text = error_chain(&e);
                    ensure!(
                        text.contains(&path.display().to_string()),
                        "{text:?} does not name {}",
                        path.display()
                    );
                }
            }
            Ok(())
        },
    );
}
