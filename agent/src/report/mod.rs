//! Writing records: NDJSON for machines, aligned text for people.
use std::io::{self, Write};

use crate::record::Record;

pub mod http;
pub mod metrics;
pub mod readiness;
pub mod sinks;
pub mod source_metrics;
pub mod stream;
pub mod text;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line (the event log).
    #[default]
    Json,
    /// Aligned, readable at a glance.
    Text,
}

/// Writes one record as one line.
pub fn write_record(out: &mut impl Write, record: &Record, format: Format) -> io::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, record).map_err(io::Error::other)?;
            out.write_all(b"\n")
        }
        Format::Text => writeln!(out, "{}", text::line(record)),
    }
}
