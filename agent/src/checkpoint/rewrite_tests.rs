use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::checkpoint::format::{
    Block, CpuState, MemoryState, MemoryTable, NumaNodeState, parse_cpu, parse_memory, write_cpu,
    write_memory,
};

fn set(list: &str) -> CpuSet {
    cpus("test", list).expect("fixture CPU list")
}

/// A file as the kubelet (<= 1.35) writes it: v2, its checksum.
fn cpu_file(default: &str, entries: &[(&str, &str, &str)]) -> CpuFile {
    let mut pods: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (pod, container, set) in entries {
        pods.entry((*pod).into())
            .or_default()
            .insert((*container).into(), (*set).into());
    }
    let state = CpuState {
        policy_name: "static".into(),
        default_cpu_set: default.into(),
        entries: Some(pods),
        pod_entries: Some(BTreeMap::new()),
    };
    reparse_cpu(&state)
}

fn reparse_cpu(state: &CpuState) -> CpuFile {
    let template = parse_cpu(br#"{"policyName":"static","defaultCpuSet":"0"}"#).expect("template");
    let bytes = write_cpu(&template, state);
    let file = parse_cpu(&bytes).expect("what we write parses");
    assert!(
        file.checksum.valid,
        "{}: {:?}",
        String::from_utf8_lossy(&bytes),
        file.checksum
    );
    file
}

/// Found by the property below: the last shared CPU going away while another is pinned
/// would leave the kubelet an empty shared pool, which it refuses.
#[test]
fn the_last_shared_cpu_going_away_is_refused() {
    let file = cpu_file("1", &[("pod-a", "app", "0")]);
    let refused = plan_cpu(&file, &set("0"), &set("")).expect_err("no shared CPU would be left");
    assert!(
        refused.0.contains("default cpuset cannot be empty"),
        "{refused:?}"
    );
}

#[test]
fn scale_up_adds_the_new_cpus_to_the_shared_pool_only() {
    let file = cpu_file("0,3", &[("pod-a", "app", "1-2")]);
    let plan = plan_cpu(&file, &set("0-5"), &set("0"))
        .expect("safe")
        .expect("a change");
    assert_eq!(plan.after.default_cpu_set, "0,3-5");
    assert_eq!(
        (list(&plan.added), list(&plan.removed)),
        ("4-5".into(), "".into())
    );
    assert_eq!(
        plan.after.entries, file.state.entries,
        "no assignment moves"
    );
    let written = reparse_cpu(&plan.after);
    assert_eq!(written.state, plan.after);
    validate_cpu(&written.state, &set("0-5"), &set("0")).expect("the kubelet accepts it");
}

#[test]
fn scale_down_of_a_shared_cpu_removes_it_and_an_exclusive_or_reserved_one_is_refused() {
    let file = cpu_file("0,3", &[("pod-a", "app", "1-2")]);
    let plan = plan_cpu(&file, &set("0-2"), &set("0"))
        .expect("3 is shared")
        .expect("change");
    assert_eq!(plan.after.default_cpu_set, "0");

    let why = plan_cpu(&file, &set("0,2-3"), &set("0")).expect_err("1 is pinned");
    assert!(
        why.0
            .contains("exclusively assigned to pod pod-a container app"),
        "{why}"
    );
    let why = plan_cpu(&file, &set("1-3"), &set("0")).expect_err("0 is reserved");
    assert!(why.0.contains("CPUs 0 went away but are reserved"), "{why}");
}

#[test]
fn a_matching_or_none_checkpoint_needs_no_rewrite() {
    let file = cpu_file("0,3", &[("pod-a", "app", "1-2")]);
    assert_eq!(plan_cpu(&file, &set("0-3"), &BTreeSet::new()), Ok(None));
    let none = parse_cpu(br#"{"policyName":"none","defaultCpuSet":"","checksum":0}"#).expect("ok");
    assert_eq!(plan_cpu(&none, &set("0-7"), &BTreeSet::new()), Ok(None));
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let online = set("0-7");
    let none = BTreeSet::new();
    let wrong = parse_cpu(br#"{"policyName":"static","defaultCpuSet":"0-3","checksum":12345}"#)
        .expect("parses");
    let why = plan_cpu(&wrong, &online, &none).expect_err("wrong checksum");
    assert!(why.0.contains("checksum 12345 is not the"), "{why}");

    let unknown = parse_cpu(br#"{"policyName":"fancy","defaultCpuSet":"0-3"}"#).expect("parses");
    let why = plan_cpu(&unknown, &online, &none).expect_err("unknown policy");
    assert!(
        why.0.contains("unknown CPU manager policy \"fancy\""),
        "{why}"
    );

    let extra =
        parse_cpu(br#"{"policyName":"static","defaultCpuSet":"0-3","color":"blue"}"#).expect("ok");
    let why = plan_cpu(&extra, &online, &none).expect_err("unknown field");
    assert!(
        why.0.contains("fields this agent does not know (color)"),
        "{why}"
    );

    assert!(
        parse_cpu(br#"{"policyName":"static","defaultCpuSet":"0-3""#).is_err(),
        "truncated"
    );
}

#[test]
fn layouts_are_kept_and_the_data_layout_gets_its_data_checksum() {
    let v3 = br#"{"policyName":"static","defaultCPUSet":"1-2","entries":{"pod1":{"container1":"5-6","container2":"3-4"}},"podEntries":{"pod2":{"cpuSet":"7-9"}},"checksum":766259872}"#;
    let file = parse_cpu(v3).expect("v3");
    let plan = plan_cpu(&file, &set("1-10"), &BTreeSet::new())
        .expect("ok")
        .expect("change");
    assert_eq!(plan.after.default_cpu_set, "1-2,10");
    let out = parse_cpu(&write_cpu(&file, &plan.after)).expect("parses");
    assert_eq!((out.layout, out.checksum.valid), (Layout::V3, true));

    let v4 = br#"{"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"1-3\",\"entries\":{\"pod1\":{\"container\":\"4-5\"},\"pod2\":{\"container\":\"7-8\"}},\"podEntries\":{\"pod1\":{\"cpuSet\":\"4-6\"},\"pod2\":{\"cpuSet\":\"7-9\"}}}","dataChecksum":2086345991}"#;
    let file = parse_cpu(v4).expect("v4");
    let plan = plan_cpu(&file, &set("1-11"), &BTreeSet::new())
        .expect("ok")
        .expect("change");
    let out = parse_cpu(&write_cpu(&file, &plan.after)).expect("parses");
    assert_eq!((out.layout, out.checksum.valid), (Layout::Data, true));
    assert_eq!(out.state, plan.after);
}

// ---- Memory ---------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

fn table(total: u64, system_reserved: u64) -> MemoryTable {
    MemoryTable {
        total,
        system_reserved,
        allocatable: total - system_reserved,
        reserved: 0,
        free: total - system_reserved,
    }
}

/// A consistent Static state as the kubelet would have written it.
fn memory_state(
    machine: &BTreeMap<i64, u64>,
    reserved: u64,
    pods: &[(&str, Vec<i64>, u64)],
) -> MemoryState {
    let template: BTreeMap<i64, Option<NumaNodeState>> = machine
        .iter()
        .map(|(id, total)| {
            let map = BTreeMap::from([
                ("memory".to_owned(), Some(table(*total, reserved))),
                ("hugepages-2Mi".to_owned(), Some(table(0, 0))),
            ]);
            let node = NumaNodeState {
                number_of_assignments: 0,
                memory_map: Some(map),
                cells: Some(vec![*id]),
            };
            (*id, Some(node))
        })
        .collect();
    let entries = pods
        .iter()
        .map(|(pod, affinity, size)| {
            let block = Block {
                numa_affinity: Some(affinity.clone()),
                kind: "memory".into(),
                size: *size,
            };
            let containers = BTreeMap::from([("c".to_owned(), Some(vec![block]))]);
            ((*pod).to_owned(), Some(containers))
        })
        .collect();
    let mut state = MemoryState {
        policy_name: "Static".into(),
        machine_state: Some(template.clone()),
        entries: Some(entries),
        pod_entries: Some(BTreeMap::new()),
    };
    let computed = kubelet_machine_state(&template, machine, &state).expect("fits");
    state.machine_state = Some(computed.into_iter().map(|(k, v)| (k, Some(v))).collect());
    validate_memory(&state, machine).expect("consistent by construction");
    state
}

fn reparse_memory(state: &MemoryState) -> MemoryFile {
    let template = parse_memory(br#"{"policyName":"Static","machineState":{}}"#).expect("ok");
    let bytes = write_memory(&template, state);
    let file = parse_memory(&bytes).expect("what we write parses");
    assert!(file.checksum.valid, "{:?}", file.checksum);
    assert_eq!(&file.state, state, "round trip");
    file
}

#[test]
fn memory_joins_the_node_it_arrived_on() {
    let before = BTreeMap::from([(0, 4096 * MIB), (1, 4096 * MIB)]);
    let state = memory_state(&before, 512 * MIB, &[("pod-b", vec![0], 1024 * MIB)]);
    let file = reparse_memory(&state);
    let after = BTreeMap::from([(0, 4096 * MIB), (1, 6144 * MIB)]);
    let plan = plan_memory(&file, &after).expect("safe").expect("a change");
    assert_eq!(plan.changes.len(), 1);
    assert_eq!(plan.changes[0].node, 1);
    assert_eq!(plan.changes[0].after.free, 6144 * MIB - 512 * MIB);
    assert_eq!(plan.after.entries, state.entries);
    validate_memory(&reparse_memory(&plan.after).state, &after).expect("kubelet accepts");
    // Memory added where a pod holds memory is fine too while it is single-node.
    let after = BTreeMap::from([(0, 8192 * MIB), (1, 4096 * MIB)]);
    assert!(plan_memory(&file, &after).expect("safe").is_some());
}

#[test]
fn a_new_numa_node_or_a_spanning_assignment_falls_back() {
    let before = BTreeMap::from([(0, 1024 * MIB), (1, 4096 * MIB)]);
    let state = memory_state(&before, 0, &[("pod-x", vec![0, 1], 2048 * MIB)]);
    let file = reparse_memory(&state);
    let grown = BTreeMap::from([(0, 2048 * MIB), (1, 4096 * MIB)]);
    let why = plan_memory(&file, &grown).expect_err("node 0 would take more of the block");
    assert!(why.0.contains("span NUMA nodes"), "{why}");
    let three = BTreeMap::from([(0, 1024 * MIB), (1, 4096 * MIB), (2, 4096 * MIB)]);
    let why = plan_memory(&file, &three).expect_err("node 2 appeared");
    assert!(why.0.contains("a node appeared or went away"), "{why}");
}

// ---- Properties -----------------------------------------------------------------------

/// CPUs 0..n: each in the shared pool (None) or given to one of a few containers.
fn topology() -> impl Strategy<Value = (u32, Vec<Option<u8>>, Vec<bool>)> {
    (2u32..48).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(prop::option::weighted(0.3, 0u8..6), n as usize),
            prop::collection::vec(prop::bool::weighted(0.1), n as usize),
        )
    })
}

#[derive(Debug, Clone)]
enum Op {
    Online(u32),
    Offline(u32),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            (0u32..64).prop_map(Op::Online),
            (0u32..64).prop_map(Op::Offline)
        ],
        1..12,
    )
}

proptest! {
    // A fixed seed: every run (CI's too) tries the same cases; a random one once found the
    // emptied shared pool below only on some runs.
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x0011_2026_1130),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cpu_rewrites_always_validate_and_never_move_an_assignment(
        (n, owners, reserved_mask) in topology(),
        ops in ops(),
    ) {
        let mut shared = CpuSet::new();
        let mut entries: Vec<(String, String, CpuSet)> = Vec::new();
        for (cpu, owner) in owners.iter().enumerate() {
            let cpu = cpu as u32;
            match owner {
                None => { shared.insert(cpu); }
                Some(k) => {
                    let (pod, container) = (format!("pod-{}", k % 3), format!("c{k}"));
                    match entries.iter_mut().find(|(p, c, _)| *p == pod && *c == container) {
                        Some((.., set)) => { set.insert(cpu); }
                        None => entries.push((pod, container, CpuSet::from([cpu]))),
                    }
                }
            }
        }
        prop_assume!(!shared.is_empty());
        let reserved: CpuSet = shared.iter().copied()
            .filter(|c| reserved_mask[*c as usize]).collect();
        let lists: Vec<(String, String, String)> = entries.iter()
            .map(|(p, c, s)| (p.clone(), c.clone(), list(s))).collect();
        let refs: Vec<(&str, &str, &str)> = lists.iter()
            .map(|(p, c, s)| (p.as_str(), c.as_str(), s.as_str())).collect();
        let original = cpu_file(&list(&shared), &refs);
        let mut file = original.clone();
        let mut online: CpuSet = (0..n).collect();
        for op in ops {
            match op {
                Op::Online(c) => { online.insert(c); }
                Op::Offline(c) => { online.remove(&c); }
            }
            match plan_cpu(&file, &online, &reserved) {
                Ok(Some(plan)) => {
                    let written = reparse_cpu(&plan.after);
                    prop_assert_eq!(&written.state, &plan.after);
                    prop_assert_eq!(validate_cpu(&written.state, &online, &reserved), Ok(()));
                    prop_assert_eq!(&written.state.entries, &original.state.entries);
                    file = written;
                }
                Ok(None) => {
                    prop_assert_eq!(validate_cpu(&file.state, &online, &reserved), Ok(()));
                }
                Err(why) => {
                    // Only a pinned or reserved CPU going away stops a rewrite, or the last
                    // shared CPU going away while CPUs are pinned (the static policy keeps
                    // a shared pool: "default cpuset cannot be empty").
                    let pinned_gone = entries.iter().any(|(.., s)| !s.is_subset(&online));
                    let reserved_gone = !reserved.is_subset(&online);
                    let pinned = entries.iter().fold(CpuSet::new(), |all, (.., s)| &all | s);
                    let pool_emptied = !pinned.is_empty() && (&online - &pinned).is_empty();
                    prop_assert!(pinned_gone || reserved_gone || pool_emptied, "refused: {}", why);
                    prop_assert!(validate_cpu(&file.state, &online, &reserved).is_err());
                }
            }
        }
    }

    #[test]
    fn memory_rewrites_always_validate_and_never_move_an_assignment(
        totals in prop::collection::vec(1u64..64, 1..4),
        pods in prop::collection::vec((0usize..4, 1usize..3, 1u64..8), 0..5),
        deltas in prop::collection::vec((0usize..4, -16i64..32), 1..6),
    ) {
        let machine: BTreeMap<i64, u64> = totals.iter().enumerate()
            .map(|(i, t)| (i as i64, (t + 8) * 256 * MIB)).collect();
        let n = machine.len();
        let names: Vec<String> = (0..pods.len()).map(|i| format!("pod-{i}")).collect();
        let assignments: Vec<(&str, Vec<i64>, u64)> = pods.iter().zip(&names)
            .map(|((first, width, size), name)| {
                let affinity = (0..*width).map(|w| ((first + w) % n) as i64)
                    .collect::<BTreeSet<_>>().into_iter().collect();
                (name.as_str(), affinity, size * 128 * MIB)
            }).collect();
        let state = memory_state(&machine, 256 * MIB, &assignments);
        let mut file = reparse_memory(&state);
        let mut now = machine.clone();
        for (node, delta) in deltas {
            let node = (node % n) as i64;
            let total = now[&node] as i64 + delta * 128 * MIB as i64;
            now.insert(node, total.max(0) as u64);
            match plan_memory(&file, &now) {
                Ok(Some(plan)) => {
                    let written = reparse_memory(&plan.after);
                    prop_assert_eq!(validate_memory(&written.state, &now), Ok(()));
                    prop_assert_eq!(&written.state.entries, &state.entries);
                    file = written;
                }
                Ok(None) => prop_assert_eq!(validate_memory(&file.state, &now), Ok(())),
                Err(_) => prop_assert!(validate_memory(&file.state, &now).is_err()),
            }
        }
    }
}
