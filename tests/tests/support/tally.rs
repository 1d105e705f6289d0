//! The hostile-input tally: how many bad inputs a test tried and what went wrong with them.
//!
//! Issue #9's closing note wants counts (inputs tried, crashes, hangs, leaks, records lost)
//! produced by the tests, not added up by hand. Each test keeps a [`Tally`]; when it is
//! dropped (a failing test included: it is written while the panic unwinds) it writes one
//! JSON file under `target/tmp/hostile-tally/`, and `cargo xtask test` sums the files
//! after the suite. Test crates include this file by path (`#[path] mod tally;`: it needs
//! `CARGO_TARGET_TMPDIR`, which cargo sets for integration tests only), so the agent's
//! property tests and these write the same format.
use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// Where the tallies go: cargo's scratch dir for integration tests (`target/tmp`).
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-tally")
}

/// Counts for one test. Shared by reference between the cases of a property.
#[derive(Debug)]
pub struct Tally {
    name: String,
    pub inputs: AtomicU64,
    pub crashes: AtomicU64,
    pub hangs: AtomicU64,
    pub leaks: AtomicU64,
    pub lost: AtomicU64,
}

#[allow(
    dead_code,
    reason = "included by path into several test crates; not each uses every helper"
)]
impl Tally {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            inputs: AtomicU64::new(0),
            crashes: AtomicU64::new(0),
            hangs: AtomicU64::new(0),
            leaks: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    pub fn input(&self) {
        self.inputs.fetch_add(1, Relaxed);
    }

    pub fn inputs(&self) -> u64 {
        self.inputs.load(Relaxed)
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let get = |c: &AtomicU64| c.load(Relaxed);
        let json = format!(
            "{{\"test\":\"{}\",\"inputs\":{},\"crashes\":{},\"hangs\":{},\"leaks\":{},\"lost\":{},\"failed\":{}}}\n",
            self.name,
            get(&self.inputs),
            get(&self.crashes),
            get(&self.hangs),
            get(&self.leaks),
            get(&self.lost),
            std::thread::panicking(),
        );
        let dir = dir();
        // A tally that cannot be written shows up as a missing test in the summary; it
        // must not turn a passing test into a failing one, nor panic while unwinding.
        if fs::create_dir_all(&dir).is_ok() {
            let _ = fs::write(dir.join(format!("{}.json", self.name)), json);
        }
        eprintln!(
            "tally {}: {} inputs, {} crashes, {} hangs, {} leaks, {} lost",
            self.name,
            get(&self.inputs),
            get(&self.crashes),
            get(&self.hangs),
            get(&self.leaks),
            get(&self.lost)
        );
    }
}
