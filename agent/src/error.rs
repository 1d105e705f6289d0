//! Why `hotplug-agent watch` or `run` ended with an error: one type for both, since both
//! are the same loop (a pipeline drained into the sinks) with or without a controller.
use crate::pipeline;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] pipeline::StartError),
    #[error("writing the event log")]
    Write(#[source] std::io::Error),
    /// A task the agent cannot run without ended: the process must end non-zero, so that
    /// systemd or the kubelet restarts it, rather than stay "ready" and do nothing.
    #[error(transparent)]
    Fault(#[from] Fault),
}

/// A task of `run` that ended on its own.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The pipeline's records stopped, or the controller ran out of episodes (which only
    /// happens once the pipeline has stopped).
    #[error("the event pipeline stopped")]
    PipelineStopped,
    /// The panic message of the task that forwards the pipeline's records.
    #[error("the record pump failed: {0}")]
    Pump(String),
    /// The panic message of the controller task.
    #[error("the controller failed: {0}")]
    Controller(String),
}
