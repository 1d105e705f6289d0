//! The hostile-input tally of `cargo xtask test`: the tests write one JSON file per test
//! (tests/tests/support/tally.rs) under `target/tmp/hostile-tally/`; this clears them
//! before the suite and sums them after it, for issue #9's closing counts.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::workspace;

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
struct Entry {
    #[serde(default)]
    test: String,
    inputs: u64,
    crashes: u64,
    hangs: u64,
    leaks: u64,
    lost: u64,
    failed: bool,
}

fn dir() -> PathBuf {
    workspace::target_dir().join("tmp/hostile-tally")
}

/// Before the suite: no counts from an earlier run.
pub fn clear() {
    let _ = fs::remove_dir_all(dir());
}

/// After the suite: one line with the sums, and the tests whose tallies are not clean.
pub fn report() {
    for line in summary(&dir()) {
        println!("{line}");
    }
}

/// The lines [`report`] prints for the tallies in `dir`.
fn summary(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec!["hostile input: no tallies written (no hostile-input test ran)".to_owned()];
    };
    let mut sum = Entry::default();
    let mut tests = 0;
    let mut unclean = Vec::new();
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(e) = serde_json::from_str::<Entry>(&text) else {
            unclean.push(format!("{} (unreadable tally)", entry.path().display()));
            continue;
        };
        tests += 1;
        sum.inputs += e.inputs;
        sum.crashes += e.crashes;
        sum.hangs += e.hangs;
        sum.leaks += e.leaks;
        sum.lost += e.lost;
        if e.failed || e.crashes + e.hangs + e.leaks + e.lost > 0 {
            unclean.push(e.test);
        }
    }
    let mut lines = vec![format!(
        "hostile input: {} inputs tried in {tests} tallies; {} crashes, {} hangs, {} leaks, \
         {} records lost",
        sum.inputs, sum.crashes, sum.hangs, sum.leaks, sum.lost
    )];
    unclean.sort();
    lines.extend(
        unclean
            .into_iter()
            .map(|t| format!("hostile input: not clean: {t}")),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_tallies_and_names_the_unclean_ones() {
        let dir = std::env::temp_dir().join(format!("xtask-tally-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, json: &str| fs::write(dir.join(name), json).unwrap();
        write(
            "a.json",
            r#"{"test":"a","inputs":10,"crashes":0,"hangs":0,"leaks":0,"lost":0,"failed":false}"#,
        );
        write(
            "b.json",
            r#"{"test":"b","inputs":5,"crashes":1,"hangs":2,"leaks":3,"lost":4,"failed":false}"#,
        );
        write(
            "c.json",
            r#"{"test":"c","inputs":1,"crashes":0,"hangs":0,"leaks":0,"lost":0,"failed":true}"#,
        );
        let lines = summary(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            lines,
            [
                "hostile input: 16 inputs tried in 3 tallies; 1 crashes, 2 hangs, 3 leaks, 4 records lost",
                "hostile input: not clean: b",
                "hostile input: not clean: c",
            ]
        );
    }
}
