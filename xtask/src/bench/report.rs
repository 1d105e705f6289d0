//! What a benchmark section produces, printed as a table and serialised as JSON.
//!
//! A section is a name, rows and notes. A row is either a distribution of nanosecond samples
//! (shown as p50, p99 and max in µs) or a single value with its unit, and may carry a target
//! it passes or fails.
use std::fmt::Write as _;

use serde::Serialize;

use super::stats::Summary;

#[derive(Debug, Serialize)]
pub struct Section {
    pub name: String,
    pub rows: Vec<Row>,
    /// Context a reader needs to trust the figures (what was toggled, what was not measured).
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Adds a distribution row; an empty sample becomes a row saying so.
    pub fn latency(
        &mut self,
        name: impl Into<String>,
        samples_ns: Vec<i64>,
        target: Option<LatencyTarget>,
    ) {
        let summary = Summary::of(&samples_ns);
        let target = target.map(|t| Target {
            pass: summary.as_ref().map(|s| s.p99_ns < t.p99_below_ns),
            text: format!("p99 < {}", human_ns(t.p99_below_ns)),
        });
        self.rows.push(Row {
            name: name.into(),
            measure: Measure::Latency {
                summary,
                samples_ns,
            },
            target,
        });
    }

    pub fn value(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
        target: Option<Target>,
    ) {
        self.rows.push(Row {
            name: name.into(),
            measure: Measure::Value {
                value: value.into(),
            },
            target,
        });
    }
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    #[serde(flatten)]
    pub measure: Measure,
    pub target: Option<Target>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Latency {
        /// `None` when nothing was measured.
        summary: Option<Summary>,
        samples_ns: Vec<i64>,
    },
    Value {
        value: String,
    },
}

/// A goal and whether the measurement met it (`None`: nothing to judge).
#[derive(Debug, Serialize)]
pub struct Target {
    pub text: String,
    pub pass: Option<bool>,
}

impl Target {
    pub fn new(text: impl Into<String>, pass: bool) -> Self {
        Self {
            text: text.into(),
            pass: Some(pass),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LatencyTarget {
    pub p99_below_ns: i64,
}

impl LatencyTarget {
    pub const fn p99_below_ms(ms: i64) -> Self {
        Self {
            p99_below_ns: ms * 1_000_000,
        }
    }
}

/// Microseconds with a precision that suits the size: 3.42, 91.7, 1234.
pub fn us(ns: i64) -> String {
    let us = ns as f64 / 1000.0;
    if us.abs() < 10.0 {
        format!("{us:.2}")
    } else if us.abs() < 1000.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

fn human_ns(ns: i64) -> String {
    if ns >= 1_000_000 && ns % 1_000_000 == 0 {
        format!("{} ms", ns / 1_000_000)
    } else {
        format!("{} µs", us(ns))
    }
}

/// The sections as a table, one block per section.
pub fn table(sections: &[Section]) -> String {
    let width = sections
        .iter()
        .flat_map(|s| &s.rows)
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("measurement".len());
    let mut out = String::new();
    for section in sections {
        let _ = writeln!(out, "\n{}", section.name);
        let latencies = section
            .rows
            .iter()
            .any(|r| matches!(r.measure, Measure::Latency { .. }));
        let header = if latencies {
            format!("{:>5} {:>9} {:>9} {:>9}", "n", "p50 µs", "p99 µs", "max µs")
        } else {
            format!("{:>35}", "value")
        };
        let _ = writeln!(
            out,
            "  {:<width$} {header}  {:<20} result",
            "measurement", "target"
        );
        for row in &section.rows {
            let figures = match &row.measure {
                Measure::Latency {
                    summary: Some(s), ..
                } => format!(
                    "{:>5} {:>9} {:>9} {:>9}",
                    s.n,
                    us(s.p50_ns),
                    us(s.p99_ns),
                    us(s.max_ns)
                ),
                Measure::Latency { summary: None, .. } => format!("{:>5} {:>29}", 0, "-"),
                Measure::Value { value } => format!("{value:>35}"),
            };
            let (target, result) = match &row.target {
                Some(t) => (
                    t.text.as_str(),
                    match t.pass {
                        Some(true) => "pass",
                        Some(false) => "FAIL",
                        None => "n/a",
                    },
                ),
                None => ("", ""),
            };
            let line = format!("  {:<width$} {figures}  {target:<20} {result}", row.name);
            let _ = writeln!(out, "{}", line.trim_end());
        }
        for note in &section.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microseconds_keep_three_significant_figures_or_more() {
        assert_eq!(us(3_421), "3.42");
        assert_eq!(us(-120_000), "-120.0");
        assert_eq!(us(91_655), "91.7");
        assert_eq!(us(1_234_567), "1235");
    }

    #[test]
    fn latency_rows_judge_the_p99() {
        let mut section = Section::new("s");
        section.latency(
            "fast",
            vec![100_000; 10],
            Some(LatencyTarget::p99_below_ms(1)),
        );
        section.latency(
            "slow",
            vec![2_000_000],
            Some(LatencyTarget::p99_below_ms(1)),
        );
        section.latency("none", vec![], Some(LatencyTarget::p99_below_ms(1)));
        let passes: Vec<_> = section
            .rows
            .iter()
            .map(|r| r.target.as_ref().unwrap().pass)
            .collect();
        assert_eq!(passes, [Some(true), Some(false), None]);
        let table = table(&[section]);
        assert!(table.contains("p99 < 1 ms"), "{table}");
        assert!(table.contains("FAIL"), "{table}");
    }
}
