//! `hotplug-agent watch`: the event pipeline, written out as it happens.
use std::{future::Future, io::Write};

use crate::{
    pipeline::{self, Pipeline},
    record::{AgentRecord, Record},
    report::{Format, write_record},
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
    format: Format,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatchError> {
    let Pipeline {
        ready, mut records, ..
    } = pipeline::start(config).await?;
    let mut last = ready.capacity;
    let result = async {
        write_record(out, &Record::Agent(Box::new(ready)), format)?;
        out.flush()?;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                rec = records.recv() => {
                    let Some(mut rec) = rec else { break };
                    loop {
                        if let Record::Event(e) = &rec {
                            last = e.capacity;
                        }
                        write_record(out, &rec, format)?;
                        // Drain what is already there, then flush once: a burst costs one write.
                        match records.try_recv() {
                            Ok(next) => rec = next,
                            Err(_) => break,
                        }
                    }
                    out.flush()?;
                }
                () = &mut shutdown => break,
            }
        }
        Ok::<_, std::io::Error>(())
    }
    .await;
    match result {
        Ok(()) => {
            let stopped = Record::Agent(Box::new(AgentRecord::new("stopped", last)));
            let _ = write_record(out, &stopped, format).and_then(|()| out.flush());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(WatchError::Write(e)),
    }
}
