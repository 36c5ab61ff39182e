//! Job drivers and the checkpoint coordinator (in progress).

use std::sync::Arc;

use ferry_core::JobId;

use crate::error::JmError;
use crate::metrics::Metrics;
use crate::service::{
    CheckpointInfo, JobInfo, JobManager, JobManagerConfig, SavepointInfo, SubmitOptions,
};
use crate::state::JobState;

pub(crate) struct Inner {
    pub(crate) config: JobManagerConfig,
    pub(crate) metrics: Arc<Metrics>,
}

pub(crate) struct JobEntry;

impl JobEntry {
    pub(crate) fn info(&self) -> JobInfo {
        todo!()
    }
}

impl Inner {
    pub(crate) fn list(&self) -> Vec<JobInfo> {
        todo!()
    }
    pub(crate) fn find(&self, _id: &str) -> Result<Arc<JobEntry>, JmError> {
        todo!()
    }
}

impl JobManager {
    /// Creates a JobManager with no jobs.
    pub fn new(config: JobManagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                metrics: Arc::new(Metrics::new()),
            }),
        }
    }

    /// Starts a validated spec.
    pub async fn submit_spec(
        &self,
        _spec: ferry_core::spec::JobSpec,
        _opts: SubmitOptions,
    ) -> Result<JobInfo, JmError> {
        todo!()
    }

    /// Stops a job, optionally taking a savepoint first (returned if taken).
    pub async fn cancel(
        &self,
        _id: &str,
        _with_savepoint: bool,
    ) -> Result<(JobInfo, Option<SavepointInfo>), JmError> {
        todo!()
    }

    /// Takes a savepoint of a running job without stopping it.
    pub async fn savepoint(&self, _id: &str) -> Result<SavepointInfo, JmError> {
        todo!()
    }

    /// Completed checkpoints and savepoints of a job, newest first.
    pub async fn checkpoints(&self, _id: &str) -> Result<Vec<CheckpointInfo>, JmError> {
        todo!()
    }

    /// Waits until a job reaches a terminal state and returns it.
    pub async fn wait(&self, _id: JobId) -> Result<JobState, JmError> {
        todo!()
    }

    /// Stops every job (with savepoints when asked) and waits for them.
    pub async fn shutdown(&self, _with_savepoints: bool) {
        todo!()
    }

    /// True once the JobManager can accept jobs.
    pub fn is_ready(&self) -> bool {
        true
    }
}
