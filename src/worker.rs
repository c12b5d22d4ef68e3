//! Slot workers: one per host slot, each pulling its next task only when its slot is idle.

use std::sync::Arc;

use tokio::time::Instant;

use crate::backend::HostClient;
use crate::error::{DispatchError, ErrorKind};
use crate::scheduler::state::{HostId, Outcome};
use crate::scheduler::{Assignment, Scheduler};
use crate::task::{CompletionResult, TaskEvent};

/// Runs until the scheduler stops.
pub async fn run(scheduler: Scheduler, host: HostId, client: Arc<HostClient>) {
    while let Some(Assignment { task, mut lease }) = scheduler.next_task(host).await {
        let taken = Instant::now();
        let result = if task.abandoned() {
            // Cancelled between assignment and now: the slot goes straight back.
            Err(DispatchError::cancelled())
        } else {
            task.emit(TaskEvent::Started {
                host: client.name.clone(),
            });
            tokio::select! {
                biased;
                _ = task.abandoned_signal() => Err(DispatchError::cancelled()),
                output = client.stream_chat(&task) => output,
            }
        };
        let event = match result {
            Ok(output) => {
                lease.set_outcome(Outcome::Completed);
                TaskEvent::Finished(CompletionResult {
                    text: output.text,
                    reasoning: output.reasoning,
                    tool_calls: output.tool_calls,
                    finish_reason: output.finish_reason,
                    usage: output.usage,
                    latency_ms: millis(taken.elapsed()),
                    ttft_ms: output.ttft.map(millis),
                    queue_wait_ms: millis(taken.saturating_duration_since(task.enqueued_at)),
                    host: client.name.clone(),
                    model: task.spec.model.clone(),
                })
            }
            Err(error) => {
                let outcome = if error.kind == ErrorKind::Cancelled {
                    Outcome::Cancelled
                } else {
                    tracing::info!(host = %client.name, task = %task.id, model = %task.spec.model, %error, "task failed");
                    Outcome::Failed
                };
                lease.set_outcome(outcome);
                TaskEvent::Failed(error)
            }
        };
        // Give the slot back before the client hears the end, so the next task can start
        // while this answer travels.
        drop(lease);
        task.emit(event);
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
