//! The hostile-input tally of `cargo xtask test`: the tests write one JSON file per test
//! (tests/tests/support/tally.rs) under `target/tmp/hostile-tally/`; this clears them
//! before the suite and sums them after it, for issue #9's closing counts.
use std::{fs, path::PathBuf};

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
    let Ok(entries) = fs::read_dir(dir()) else {
        println!("hostile input: no tallies written (no hostile-input test ran)");
        return;
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
    println!(
        "hostile input: {} inputs tried in {tests} tallies; {} crashes, {} hangs, {} leaks, {} records lost",
        sum.inputs, sum.crashes, sum.hangs, sum.leaks, sum.lost
    );
    unclean.sort();
    for test in unclean {
        println!("hostile input: not clean: {test}");
    }
}
