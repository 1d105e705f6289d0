//! CPU-hotplug state numbers, by name.
//!
//! The `cpuhp_exit` tracepoint reports state numbers, and `enum cpuhp_state`
//! (include/linux/cpuhotplug.h) changes between kernels and configs, so the numbers are
//! looked up at start-up in `/sys/devices/system/cpu/hotplug/states`, which lists
//! `  NNN: name` for every state that has callbacks (kernel/cpu.c, `states_show`).
use std::path::Path;

/// The two states the kernel filter needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuhpStates {
    /// `online`: CPUHP_ONLINE, reached when bring-up is complete.
    pub online: i32,
    /// `cpu:teardown`: CPUHP_TEARDOWN_CPU, whose teardown removes the CPU.
    pub teardown: i32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuhpError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: String },
    #[error("state {0:?} not listed in the hotplug states file")]
    Missing(&'static str),
    #[error("line {line}: {text:?} is not `NNN: name`")]
    BadLine { line: usize, text: String },
}

pub fn parse_states(text: &str) -> Result<CpuhpStates, CpuhpError> {
    let (mut online, mut teardown) = (None, None);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || CpuhpError::BadLine {
            line: i + 1,
            text: line.into(),
        };
        let (num, name) = line.split_once(':').ok_or_else(bad)?;
        let num: i32 = num.trim().parse().map_err(|_| bad())?;
        match name.trim() {
            "online" => online = Some(num),
            "cpu:teardown" => teardown = Some(num),
            _ => {}
        }
    }
    Ok(CpuhpStates {
        online: online.ok_or(CpuhpError::Missing("online"))?,
        teardown: teardown.ok_or(CpuhpError::Missing("cpu:teardown"))?,
    })
}

pub fn read_states(root: &Path) -> Result<CpuhpStates, CpuhpError> {
    let path = root.join("sys/devices/system/cpu/hotplug/states");
    let text = std::fs::read_to_string(&path).map_err(|e| CpuhpError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    parse_states(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_online_and_teardown_by_name() {
        // Excerpt of the 6.18 host's file.
        let text = "  0: offline\n  1: threads:prepare\n 83: cpu:bringup\n 84: idle:dead\n144: cpu:teardown\n235: sched:active\n236: online\n";
        assert_eq!(
            parse_states(text),
            Ok(CpuhpStates {
                online: 236,
                teardown: 144
            })
        );
        // Another kernel numbers them differently (6.1 guest-like).
        let text = "  0: offline\n 96: cpu:teardown\n 99: ap:online-idle\n233: online\n";
        assert_eq!(
            parse_states(text),
            Ok(CpuhpStates {
                online: 233,
                teardown: 96
            })
        );
    }

    #[test]
    fn missing_or_garbled_states_are_errors() {
        assert_eq!(
            parse_states("  0: offline\n236: online\n"),
            Err(CpuhpError::Missing("cpu:teardown"))
        );
        assert!(matches!(
            parse_states("zz: online\n"),
            Err(CpuhpError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse_states("no colon\n"),
            Err(CpuhpError::BadLine { .. })
        ));
    }

    #[test]
    fn the_running_kernel_has_both_states() {
        let root = Path::new("/");
        if !root.join("sys/devices/system/cpu/hotplug/states").exists() {
            eprintln!("SKIP: this kernel has no CPU hotplug states file");
            return;
        }
        let s = read_states(root).unwrap();
        assert!(s.teardown > 0 && s.online > s.teardown, "{s:?}");
    }
}
