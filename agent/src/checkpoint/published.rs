//! Every checkpoint with its checksum found published upstream and in public write-ups:
//! each must reproduce, or the rewrite would write files the kubelet calls corrupt.
//! The source of each is next to it.
use super::format::{Layout, parse_cpu, parse_memory};

/// (source, file, expected layout)
const CPU: &[(&str, &str, Layout)] = &[
    // kubernetes/kubernetes pkg/kubelet/cm/cpumanager/state/state_checkpoint_test.go,
    // "Restore checkpoint from v2 (migration)": note `defaultCPUSet`, matched by Go's
    // case-insensitive decoding.
    (
        "k8s state_checkpoint_test.go v2 migration",
        r#"{"policyName":"static","defaultCPUSet":"7-9","entries":{"pod":{"container1":"4-6","container2":"1-3"}},"checksum":1942532442}"#,
        Layout::V2,
    ),
    // Same file, "Fail to restore checkpoint from v1 (migration)": a v1 file (container
    // ID -> CPU set) with its v1 checksum.
    (
        "k8s state_checkpoint_test.go v1 migration",
        r#"{"policyName":"static","defaultCPUSet":"7-9","entries":{"containerID1":"4-6","containerID2":"1-3"},"checksum":2026311253}"#,
        Layout::V1,
    ),
    // Same file, "... with v1 checksum": no entries, v1-style checksum, accepted by
    // kubelets <= 1.35 through their v1 read.
    (
        "k8s state_checkpoint_test.go v1 checksum",
        r#"{"policyName":"none","defaultCPUSet":"1-3","checksum":1694838852}"#,
        Layout::V2,
    ),
    // Same file, the v2 halves of "unparsable default CPU set" / "unparsable assignment".
    (
        "k8s state_checkpoint_test.go unparsable default (v2 part)",
        r#"{"policyName":"none","defaultCPUSet":"7-9","checksum":98002435}"#,
        Layout::V2,
    ),
    (
        "k8s state_checkpoint_test.go unparsable assignment (v2 part)",
        r#"{"policyName":"static","defaultCPUSet":"1-3","entries":{"pod":{"container1":"4-6","container2":"7-9"}},"checksum":1659543133}"#,
        Layout::V2,
    ),
    // Same file, "Restore checkpoint from v3 (migration)" and
    // TestCPUManagerCheckpointV3_VerifyChecksum_Compatibility (legacy name 766259872).
    (
        "k8s state_checkpoint_test.go v3 migration",
        r#"{"policyName":"static","defaultCPUSet":"1-2","entries":{"pod1":{"container1":"5-6","container2":"3-4"}},"podEntries":{"pod2":{"cpuSet":"7-9"}},"checksum":766259872}"#,
        Layout::V3,
    ),
    // TestCPUManagerCheckpointV3_VerifyChecksum_Compatibility "accepts current v3
    // checksum": the same state hashed under the name CPUManagerCheckpointV3.
    (
        "k8s state_checkpoint_test.go v3 current name",
        r#"{"policyName":"static","defaultCPUSet":"1-2","entries":{"pod1":{"container1":"5-6","container2":"3-4"}},"podEntries":{"pod2":{"cpuSet":"7-9"}},"checksum":2284712151}"#,
        Layout::V3,
    ),
    // Same file, v4 (data) checkpoints: the dataChecksum is the hash of the data string.
    (
        "k8s state_checkpoint_test.go v4 default CPU set",
        r#"{"policyName":"other","defaultCPUSet":"1-9","checksum":1234,"data":"{\"policyName\":\"none\",\"defaultCPUSet\":\"4-6\"}","dataChecksum":657950972}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go v4 valid checkpoint",
        r#"{"policyName":"other","defaultCPUSet":"1-9","checksum":1234,"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"7-9\",\"entries\":{\"pod\":{\"container1\":\"4-6\",\"container2\":\"1-3\"}}}","dataChecksum":1420829534}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go v4 policy other",
        r#"{"policyName":"static","defaultCPUSet":"7-9","entries":{"pod":{"container1":"4-6","container2":"1-3"}},"checksum":1942532442,"data":"{\"policyName\":\"other\",\"defaultCPUSet\":\"7-9\",\"entries\":{\"pod\":{\"container1\":\"4-6\",\"container2\":\"1-3\"}}}","dataChecksum":1432271708}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go v4 unknown field in data",
        r#"{"policyName":"other","defaultCPUSet":"1-9","checksum":1234,"data":"{\"policyName\":\"none\",\"defaultCPUSet\":\"4-6\",\"unknownField\":\"value\"}","dataChecksum":3492408555}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go v4 with pod entries and baselines",
        r#"{"policyName":"other","defaultCPUSet":"1-9","checksum":1234,"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"1-3\",\"entries\":{\"pod\":{\"container1\":\"4-6\",\"container2\":\"7-9\"}},\"podEntries\":{\"pod\":{\"cpuSet\":\"4-10\"}},\"baselines\":{\"pod\":{\"container1\":{\"baseline\":\"4-5\"},\"container2\":{\"baseline\":\"7-8\"}}}}","dataChecksum":1032795074}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go TestDeletePod",
        r#"{"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"1-3\",\"entries\":{\"pod1\":{\"container\":\"4-5\"},\"pod2\":{\"container\":\"7-8\"}},\"podEntries\":{\"pod1\":{\"cpuSet\":\"4-6\"},\"pod2\":{\"cpuSet\":\"7-9\"}}}","dataChecksum":2086345991}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go TestGetBaselineCPUSet (without baselines)",
        r#"{"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"1-3\",\"entries\":{\"pod\":{\"container\":\"4-5\"}},\"podEntries\":{\"pod\":{\"cpuSet\":\"4-6\"}}}","dataChecksum":234652157}"#,
        Layout::Data,
    ),
    (
        "k8s state_checkpoint_test.go TestGetBaselineCPUSet (with baselines)",
        r#"{"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"1-3\",\"entries\":{\"pod\":{\"container\":\"4-5\"}},\"podEntries\":{\"pod\":{\"cpuSet\":\"4-6\"}},\"baselines\":{\"pod\":{\"container\":{\"baseline\":\"5\"}}}}","dataChecksum":4038000775}"#,
        Layout::Data,
    ),
    // kubernetes/website, "Control CPU Management Policies on the Node",
    // strict-cpu-reservation section: two files cat'ed from a node.
    (
        "k8s website cpu-management-policies strict-cpu-reservation off",
        r#"{"policyName":"static","defaultCpuSet":"0-63","checksum":1058907510}"#,
        Layout::V2,
    ),
    (
        "k8s website / KEP-4540 strict-cpu-reservation on",
        r#"{"policyName":"static","defaultCpuSet":"2-15,17-31,34-47,49-63","checksum":4141502832}"#,
        Layout::V2,
    ),
    // A public walkthrough of SR-IOV + static CPU manager on EKS (cat of the file).
    (
        "EKS SR-IOV walkthrough",
        r#"{"policyName":"static","defaultCpuSet":"0,2-95,97-191","entries":{"823ca0b5-ed9e-421a-bfca-76fa078f3195":{"ubuntu-netutils":"96"},"b8292fdc-57b1-4bc4-937b-34cd3dd1bcb8":{"ubuntu-netutils":"1"}},"checksum":4076905443}"#,
        Layout::V2,
    ),
    // Huawei Cloud CCE docs (English and Chinese), "NUMA affinity scheduling".
    (
        "Huawei Cloud CCE NUMA affinity docs",
        r#"{"policyName":"static","defaultCpuSet":"0,10-15,25-31","entries":{"777870b5-c64f-42f5-9296-688b9dc212ba":{"container-1":"16-24"},"fb15e10a-b6a5-4aaa-8fcd-76c1aa64e6fd":{"container-1":"1-9"}},"checksum":318470969}"#,
        Layout::V2,
    ),
    // A public topology-manager experiment write-up (two containers, one pod).
    (
        "topology manager single-numa write-up",
        r#"{"policyName":"static","defaultCpuSet":"0-1,6-13,18-23","entries":{"28c11c89-3493-4972-bb67-7090b9d75e0d":{"mytestclient":"2-3,14-15","mytestclient2":"4-5,16-17"}},"checksum":1684933537}"#,
        Layout::V2,
    ),
    // A colocation scheduler's unit test fixture (koordinator-style) written from a node.
    (
        "colocation agent test fixture",
        r#"{"policyName":"static","defaultCpuSet":"0-1","checksum":1636926438}"#,
        Layout::V2,
    ),
];

/// Published files whose checksum the kubelet itself would reject: kept so that the
/// verdict (invalid) stays pinned too.
const CPU_INVALID: &[(&str, &str)] = &[
    // KEP-4540 README: "0-64" on a 64-CPU machine looks hand-edited from the docs' "0-63".
    (
        "KEP-4540 strict-cpu-reservation off (edited)",
        r#"{"policyName":"static","defaultCpuSet":"0-64","checksum":1241370203}"#,
    ),
    // A made-up checksum in a colocation agent's test (static pod).
    (
        "colocation agent static-pod fixture",
        r#"{"policyName":"static","defaultCpuSet":"0,2-7","entries":{"static-pod-xxx":{"demo":"1"}},"checksum":1000000000}"#,
    ),
    // state_checkpoint_test.go "invalid checksum" (v2 part valid, data part not).
    (
        "k8s state_checkpoint_test.go invalid dataChecksum",
        r#"{"policyName":"static","defaultCPUSet":"7-9","entries":{"pod":{"container1":"4-6","container2":"1-3"}},"checksum":1942532442,"data":"{\"policyName\":\"static\",\"defaultCPUSet\":\"7-9\",\"entries\":{\"pod\":{\"container1\":\"4-6\",\"container2\":\"1-3\"}}}","dataChecksum":1234}"#,
    ),
];

const MEMORY: &[(&str, &str, Layout)] = &[
    // kubernetes/kubernetes pkg/kubelet/cm/memorymanager/state/state_checkpoint_test.go,
    // "Restore checkpoint from v1 (migration)".
    (
        "k8s memorymanager state_checkpoint_test.go v1 migration",
        r#"{"policyName":"static","machineState":{"0":{"numberOfAssignments":0,"memoryMap":{"memory":{"total":2048,"systemReserved":512,"allocatable":1536,"reserved":512,"free":1024}},"cells":[]}},"entries":{"pod":{"container1":[{"numaAffinity":[0],"type":"memory","size":512}]}},"checksum":4215593881}"#,
        Layout::V1,
    ),
    // Same file, "Restore checkpoint from v2 with PodLevelResourceManagers enabled".
    (
        "k8s memorymanager state_checkpoint_test.go v2",
        r#"{"policyName":"static","machineState":{"0":{"numberOfAssignments":0,"memoryMap":{"memory":{"total":2048,"systemReserved":512,"allocatable":1536,"reserved":512,"free":1024}},"cells":[]}},"entries":{"pod":{"container1":[{"numaAffinity":[0],"type":"memory","size":512}]}},"podEntries":{"pod":{"memoryBlocks":[{"numaAffinity":[0],"type":"memory","size":512}]}},"checksum":1278640530}"#,
        Layout::V2,
    ),
    // Same file, "Restore valid checkpoint" (v3 data).
    (
        "k8s memorymanager state_checkpoint_test.go v3 data",
        r#"{"policyName":"other","machineState":{"0":{"numberOfAssignments":5,"memoryMap":{"memory":{"total":1024,"systemReserved":256,"allocatable":768,"reserved":256,"free":512}},"cells":[]}},"entries":{"pod":{"containerX":[{"numaAffinity":[0],"type":"memory","size":128}]}},"checksum":1234,"data":"{\"policyName\":\"static\",\"machineState\":{\"0\":{\"numberOfAssignments\":0,\"memoryMap\":{\"memory\":{\"total\":2048,\"systemReserved\":512,\"allocatable\":1536,\"reserved\":512,\"free\":1024}},\"cells\":[]}},\"entries\":{\"pod\":{\"container1\":[{\"numaAffinity\":[0],\"type\":\"memory\",\"size\":512}]}}}","dataChecksum":1849615440}"#,
        Layout::Data,
    ),
    // Same file, "Restore checkpoint ignoring unknown fields in data section".
    (
        "k8s memorymanager state_checkpoint_test.go v3 unknown field",
        r#"{"policyName":"other","checksum":1234,"data":"{\"unknownField\":\"value\",\"policyName\":\"static\",\"machineState\":{\"0\":{\"numberOfAssignments\":0,\"memoryMap\":{\"memory\":{\"total\":2048,\"systemReserved\":512,\"allocatable\":1536,\"reserved\":512,\"free\":1024}},\"cells\":[]}},\"entries\":{\"pod\":{\"container1\":[{\"numaAffinity\":[0],\"type\":\"memory\",\"size\":512}]}}}","dataChecksum":2100279793}"#,
        Layout::Data,
    ),
];

#[test]
fn every_published_cpu_checkpoint_reproduces() {
    let mut failures = Vec::new();
    for (source, text, layout) in CPU {
        let file = parse_cpu(text.as_bytes()).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(file.layout, *layout, "{source}");
        if !file.checksum.valid {
            failures.push(format!("{source}: {:?}", file.checksum));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn published_checkpoints_with_a_wrong_checksum_stay_rejected() {
    for (source, text) in CPU_INVALID {
        let file = parse_cpu(text.as_bytes()).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert!(!file.checksum.valid, "{source}: {:?}", file.checksum);
    }
}

#[test]
fn every_published_memory_checkpoint_reproduces() {
    let mut failures = Vec::new();
    for (source, text, layout) in MEMORY {
        let file = parse_memory(text.as_bytes()).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(file.layout, *layout, "{source}");
        if !file.checksum.valid {
            failures.push(format!("{source}: {:?}", file.checksum));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_v2_checksum_is_the_exact_value_not_only_accepted() {
    // Zero is accepted for v2, so "valid" alone would not catch a wrong hash.
    let website = CPU
        .iter()
        .find(|(s, ..)| s.ends_with("strict-cpu-reservation off"));
    let file = parse_cpu(website.expect("listed").1.as_bytes()).expect("parses");
    assert_eq!(file.checksum.computed, 1058907510);
    let file = parse_memory(MEMORY[0].1.as_bytes()).expect("parses");
    assert_eq!(file.checksum.computed, 4215593881);
}
