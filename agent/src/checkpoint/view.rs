//! `hotplug-agent checkpoint`: what an operator runs when the kubelet crash-loops after a
//! hotplug. Per checkpoint: policy, layout, checksum (stored and computed), whether the
//! kubelet would start on it on this machine now (if not, in its own words), and what
//! `--static-policy update-in-place` would write. Read-only.
use std::io::{self, Write};

use serde::Serialize;

use super::update::{Inspection, Update};
use crate::report::Format;

#[derive(Serialize)]
struct Json<'a> {
    manager: &'a str,
    path: String,
    policy: &'a Option<String>,
    layout: Option<&'static str>,
    checksum_stored: Option<u64>,
    checksum_computed: Option<u64>,
    checksum_valid: Option<bool>,
    kubelet_accepts: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    kubelet_error: Option<&'a str>,
    update_in_place: &'a Update,
}

pub fn write(out: &mut impl Write, found: &[Inspection], format: Format) -> io::Result<()> {
    if found.is_empty() && format == Format::Text {
        return writeln!(out, "no CPU or memory manager checkpoint found");
    }
    for i in found {
        match format {
            Format::Json => {
                let line = Json {
                    manager: i.manager,
                    path: i.path.display().to_string(),
                    policy: &i.policy,
                    layout: i.layout.map(|l| l.name()),
                    checksum_stored: i.checksum.as_ref().map(|c| c.stored),
                    checksum_computed: i.checksum.as_ref().map(|c| c.computed),
                    checksum_valid: i.checksum.as_ref().map(|c| c.valid),
                    kubelet_accepts: i.kubelet_accepts.is_ok(),
                    kubelet_error: i.kubelet_accepts.as_ref().err().map(|e| e.0.as_str()),
                    update_in_place: &i.update,
                };
                serde_json::to_writer(&mut *out, &line)?;
                writeln!(out)?;
            }
            Format::Text => text(out, i)?,
        }
    }
    Ok(())
}

fn text(out: &mut impl Write, i: &Inspection) -> io::Result<()> {
    writeln!(out, "{} manager checkpoint {}", i.manager, i.path.display())?;
    let unknown = "?".to_owned();
    writeln!(
        out,
        "  policy:          {}",
        i.policy.as_ref().unwrap_or(&unknown)
    )?;
    if let Some(layout) = i.layout {
        writeln!(out, "  layout:          {}", layout.name())?;
    }
    if let Some(c) = &i.checksum {
        let verdict = if c.valid {
            "valid"
        } else {
            "WRONG (the kubelet calls it corrupt)"
        };
        writeln!(
            out,
            "  checksum:        {} stored, {} computed: {verdict}",
            c.stored, c.computed
        )?;
    }
    match &i.kubelet_accepts {
        Ok(()) => writeln!(out, "  kubelet accepts: yes, on this machine now")?,
        Err(why) => writeln!(out, "  kubelet accepts: NO: {why}")?,
    }
    match &i.update {
        Update::NotNeeded => writeln!(out, "  update-in-place: nothing to change")?,
        Update::Rewrite { summary, .. } => {
            writeln!(out, "  update-in-place: would write: {summary}")?
        }
        Update::Refused { reason } => writeln!(
            out,
            "  update-in-place: would not rewrite ({reason}); the configured --static-policy applies"
        )?,
    }
    Ok(())
}
