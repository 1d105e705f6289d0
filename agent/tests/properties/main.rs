//! Property tests of every parser the outside world feeds (issue #9): uevent datagrams,
//! eBPF ring-buffer records, the sysfs/procfs files of `capacity`, the kubelet's
//! checkpoints, config files, stream queries and kubeconfigs.
//!
//! For each parser, three kinds of property: arbitrary and mutated input never panics and
//! fails with a typed error that names the input (its file, field or parameter); valid
//! input generated from a model parses back to the model; and where a writer exists, what
//! it writes parses back to what it was given.
//!
//! The budget is fixed so that `cargo xtask test` stays fast and every run tries the same
//! inputs: a fixed number of cases per property and a fixed seed ([`SEED`]), no failure
//! files (a failure is reproduced by the seed; inputs it found are kept as plain
//! regression tests next to the property). Every input tried is counted in a [`Tally`]
//! per property, which `cargo xtask test` sums after the suite.
use std::{
    fmt::Debug,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::atomic::Ordering::Relaxed,
};

use proptest::{
    collection::vec,
    prelude::any,
    strategy::Strategy,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};

#[path = "../../../tests/tests/support/tally.rs"]
mod tally;

mod capacity;
mod checkpoint;
mod config;
mod kubeconfig;
mod sources;
mod stream;

use tally::Tally;

/// Every run tries the same inputs; change it to explore (and keep what it finds as a
/// regression test).
const SEED: u64 = 0x0009_2026_1130;

/// Runs `property` on `cases` inputs from `strategy` (plus shrinking, after a failure).
/// A panic in the code under test is counted as a crash and fails the property with the
/// smallest input that still panics.
fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let tally = Tally::new(name);
    let config = Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(SEED),
        max_shrink_iters: 512,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |input| {
        tally.input();
        match catch_unwind(AssertUnwindSafe(|| property(input))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                tally.crashes.fetch_add(1, Relaxed);
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(not a string)");
                Err(TestCaseError::fail(format!("panicked: {what}")))
            }
        }
    });
    if let Err(e) = result {
        panic!(
            "property {name} failed after {} inputs: {e}",
            tally.inputs()
        );
    }
}

/// Fails the case unless `cond`, with a message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(proptest::test_runner::TestCaseError::fail(format!($($msg)+)));
        }
    };
}
pub(crate) use ensure;

/// A scratch directory for a generated tree, in memory where there is a tmpfs: the
/// properties write thousands of small files, which on a busy disk cost seconds, not CPU.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a scratch directory")
}

/// `valid` with 1 to `max_edits - 1` bytes changed, inserted or cut: what a corrupted or
/// hostile copy of a valid input looks like.
fn mutated(
    valid: impl Strategy<Value = Vec<u8>>,
    max_edits: usize,
) -> impl Strategy<Value = Vec<u8>> {
    (
        valid,
        vec((any::<u16>(), any::<u8>(), 0u8..3), 1..max_edits),
    )
        .prop_map(|(mut bytes, edits)| {
            for (at, byte, how) in edits {
                let at = usize::from(at) % (bytes.len() + 1);
                match how {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => bytes.truncate(at),
                }
            }
            bytes
        })
}
