//! `hotplug-agent watch`: the event pipeline, written out as it happens.
use std::future::Future;

use crate::{
    pipeline::{self, Pipeline},
    record::Record,
    report::sinks::{Sinks, drain},
};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Start(#[from] pipeline::StartError),
    #[error("writing the event log")]
    Write(#[source] std::io::Error),
}

/// Runs until `shutdown` completes or the output goes away (a closed pipe ends quietly).
pub async fn run(
    config: pipeline::Config,
    sinks: &mut Sinks<'_>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatchError> {
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
    .map_err(WatchError::Write)
}
