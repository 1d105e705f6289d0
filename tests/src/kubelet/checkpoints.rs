//! The stand-in's `--kubelet-root-dir DIR`: at start-up it reads `DIR/cpu_manager_state`
//! and `DIR/memory_manager_state` as the kubelet's static policies do and refuses to
//! start (exit 1) on a file the kubelet would refuse, so that a wrong rewrite fails a test
//! the way it would crash-loop a real kubelet.
//!
//! Reproduced (pkg/kubelet/cm/{cpumanager,memorymanager}/state/state_checkpoint.go
//! `restoreState` and policy_static.go `validateState`): the file must parse, its checksum
//! must be the kubelet's for its layout (agent's checkpoint/format.rs, pinned against every
//! published checkpoint), and the state must add up to the machine read at start-up: the
//! CPU sets to the online CPUs, reserved CPUs in the default set, no overlap; the memory
//! manager's per-node tables to the ones recomputed from the node totals and assignments.
//! Not reproduced: the configured policy (a checkpoint of another policy is accepted, the
//! kubelet refuses it), and the kubelet's reserved memory and hugepages (taken from the
//! checkpoint itself). A missing file is accepted: the kubelet writes a fresh one.
//!
//! The checks are the agent's own (checkpoint/rewrite.rs `validate_cpu`,
//! `validate_memory`, ports of `validateState`): this catches a rewrite that breaks them,
//! not a mistake in the port itself, which the agent's unit tests hold against upstream.
use std::{collections::BTreeSet, path::Path};

use hotplug_agent::{
    capacity::Snapshot,
    checkpoint::{
        CPU_MANAGER_STATE, MEMORY_MANAGER_STATE, format,
        rewrite::{validate_cpu, validate_memory},
        update::Machine,
    },
};

/// `Ok`: one line per file found, what was accepted. `Err`: the kubelet's refusal.
pub fn validate(
    root: &Path,
    snapshot: &Snapshot,
    reserved: &BTreeSet<u32>,
) -> Result<Vec<String>, String> {
    let machine = Machine::new(snapshot, reserved.clone());
    let mut accepted = Vec::new();
    let cpu = root.join(CPU_MANAGER_STATE);
    if let Some(bytes) = read(&cpu)? {
        let restore = |why: String| {
            format!(
                "could not restore state from checkpoint: {why}, please drain this node and \
                 delete the CPU manager checkpoint file {:?} before restarting Kubelet",
                cpu.display()
            )
        };
        let file = format::parse_cpu(&bytes).map_err(|e| restore(e.to_string()))?;
        if !file.checksum.valid {
            return Err(restore("checkpoint is corrupted".into()));
        }
        if file.state.policy_name == "static" {
            validate_cpu(&file.state, &machine.online, &machine.reserved)
                .map_err(|e| format!("Static policy invalid state, please drain node and remove policy state file: {e}"))?;
        }
        accepted.push(format!(
            "{} accepted: policy {} defaultCpuSet {:?} checksum {}",
            cpu.display(),
            file.state.policy_name,
            file.state.default_cpu_set,
            file.checksum.stored
        ));
    }
    let memory = root.join(MEMORY_MANAGER_STATE);
    if let Some(bytes) = read(&memory)? {
        let restore = |why: String| {
            format!(
                "could not restore state from checkpoint: {why}, please drain this node and \
                 delete the memory manager checkpoint file {:?} before restarting Kubelet",
                memory.display()
            )
        };
        let file = format::parse_memory(&bytes).map_err(|e| restore(e.to_string()))?;
        if !file.checksum.valid {
            return Err(restore("checkpoint is corrupted".into()));
        }
        if file.state.policy_name == "Static" {
            validate_memory(&file.state, &machine.nodes).map_err(|e| {
                format!("Invalid state, please drain node and remove policy state file: {e}")
            })?;
        }
        accepted.push(format!(
            "{} accepted: policy {} checksum {}",
            memory.display(),
            file.state.policy_name,
            file.checksum.stored
        ));
    }
    Ok(accepted)
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}
