//! What the TaskManager's integration tests share.

use std::sync::Arc;

use ferry_taskmanager::metrics::TaskMetrics;
use ferry_taskmanager::protocol::{Msg, TaskError, TaskId};
use ferry_taskmanager::task::{Chain, Output, TaskContext, run_downstream_task};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A downstream task (stage 1, subtask 0) with no operators, reading
/// `inputs` and passing what it forwards to `outputs`, and what it
/// returns. Its command and event channels stay open while it runs.
pub fn downstream_task(
    inputs: Vec<mpsc::Receiver<Msg>>,
    outputs: Vec<mpsc::Sender<Msg>>,
) -> JoinHandle<Result<(), TaskError>> {
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let ctx = TaskContext {
        id: TaskId {
            stage: 1,
            subtask: 0,
        },
        commands,
        events,
        uploads: tokio_util::task::TaskTracker::new(),
        chains: None,
    };
    let chain = Chain {
        ops: Vec::new(),
        output: Output::Exchange {
            senders: outputs,
            key_idx: Vec::new(),
        },
        metrics: Arc::new(TaskMetrics::default()),
    };
    tokio::spawn(async move {
        let _keep = (commands_tx, events_rx);
        run_downstream_task(ctx, inputs, chain).await
    })
}
