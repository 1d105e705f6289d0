//! `hotplug-agent watch`: the event pipeline, written out as it happens.
use std::future::Future;

use crate::{
    error::RunError,
    pipeline::{self, Pipeline},
    record::Record,
    report::sinks::{Sinks, drain},
};

/// Runs until `shutdown` completes or the output goes away (a closed pipe ends quietly).
pub async fn run(
    config: pipeline::Config,
    sinks: &mut Sinks<'_>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let Pipeline {
        ready, mut records, ..
    } = pipeline::start(config).await?;
    drain(
        sinks,
        Record::Agent(Box::new(ready)),
        &mut records,
        shutdown,
        || {},
    )
    .await
    .map_err(RunError::Write)
}
