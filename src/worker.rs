//! Slot workers: one per host slot, each pulling its next task only when its slot is idle.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::time::Instant;

use crate::backend::{HostClient, StreamOutput};
use crate::error::{AttemptError, DispatchError, ErrorKind, HostSignal};
use crate::metrics::Metrics;
use crate::scheduler::costs::Observed;
use crate::scheduler::state::{HostId, Outcome};
use crate::scheduler::{Assignment, Scheduler};
use crate::task::{CompletionResult, InferenceTask, TaskEvent};

/// How long a slot stays taken after its task was cancelled mid-request (see `run`).
const CANCEL_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs until the scheduler stops, or until the scheduler dismisses this worker (its host
/// left the fleet or has fewer slots after a reload).
pub async fn run(scheduler: Scheduler, host: HostId, metrics: Arc<Metrics>) {
    while let Some(Assignment {
        mut task,
        lease,
        client,
        running_here,
        slots,
        cold,
    }) = scheduler.next_task(host).await
    {
        if !task.abandoned()
            && let Some(busy) = busy_elsewhere(&client, running_here, slots).await
        {
            // Not sent, so not an attempt: the task goes back to its place in the queue and
            // the slots held from elsewhere count as taken until they are free.
            tracing::debug!(host = %client.name, task = %task.id, busy, "host busy with requests from elsewhere; task back to the queue");
            lease.retry(
                task,
                DispatchError::new(
                    ErrorKind::HostError,
                    format!("{} is busy with requests from elsewhere", client.name),
                ),
                HostSignal::BusyElsewhere(busy),
            );
            continue;
        }
        task.attempts += 1;
        let taken = Instant::now();
        let sent = !task.abandoned();
        let result = if sent {
            task.emit(TaskEvent::Started {
                host: client.name.clone(),
            });
            if cold {
                // The cold-load gate: the scheduler opens this host's other slots at the
                // first byte, when the model is loaded.
                let first = tokio_util::sync::CancellationToken::new();
                task.first_output = Some(first.clone());
                let run = attempt(&client, &task);
                tokio::pin!(run);
                tokio::select! {
                    result = &mut run => result,
                    _ = first.cancelled() => {
                        scheduler.first_byte(host, task.id);
                        run.await
                    }
                }
            } else {
                attempt(&client, &task).await
            }
        } else {
            // Cancelled between assignment and now: nothing was sent, the slot goes straight back.
            Err(DispatchError::cancelled().into())
        };
        match result {
            Ok(output) => {
                lease.completed(
                    task.spec.model.clone(),
                    Observed {
                        cold,
                        ttft: output.ttft,
                        service: taken.elapsed(),
                    },
                );
                let result = completion(output, &task, &client.name, taken);
                metrics.completed(&result);
                task.emit(TaskEvent::Finished(result));
            }
            Err(AttemptError {
                error,
                signal,
                retry_elsewhere: true,
            }) => {
                tracing::info!(host = %client.name, task = %task.id, %error, "host failed before answering; the task goes back to the queue");
                // The scheduler runs it elsewhere or fails it; the client hears from there.
                lease.retry(task, error, signal);
            }
            Err(AttemptError { error, signal, .. }) => {
                let outcome = if error.kind == ErrorKind::Cancelled {
                    if sent {
                        // The connection is closed, but a host notices only at its next write:
                        // until then it still generates. Keep the slot a moment so the next
                        // request does not land beside the cancelled one.
                        tokio::time::sleep(CANCEL_SETTLE).await;
                    }
                    Outcome::Cancelled
                } else {
                    tracing::info!(host = %client.name, task = %task.id, model = %task.spec.model, %error, "task failed");
                    Outcome::Failed
                };
                // Give the slot back before the client hears the end, so the next task can
                // start while this answer travels.
                lease.release(outcome, signal);
                let waited = taken.saturating_duration_since(task.enqueued_at);
                metrics.ended_early(waited.as_secs_f64(), taken.elapsed().as_secs_f64());
                task.emit(TaskEvent::Failed(error));
            }
        }
    }
}

/// Slots of a llama.cpp host busy with requests this daemon did not send, when they leave
/// this task no slot (`None`: send it). `running_here` counts this task; our other requests may
/// not show as processing yet, so they are subtracted as if they did.
async fn busy_elsewhere(client: &HostClient, running_here: usize, slots: usize) -> Option<usize> {
    if !client.may_show_slots() {
        return None;
    }
    let seen = client.read_slots().await?;
    let ours = running_here.saturating_sub(1);
    let elsewhere = seen.processing.saturating_sub(ours);
    let full = ours + elsewhere >= slots || seen.processing >= seen.total;
    (elsewhere > 0 && full).then_some(elsewhere)
}

/// One attempt on the host, stopped at once when the client goes away. A panic in it fails
/// the task, not the worker: the slot must keep serving.
async fn attempt(client: &HostClient, task: &InferenceTask) -> Result<StreamOutput, AttemptError> {
    let run = async {
        tokio::select! {
            biased;
            _ = task.abandoned_signal() => Err(DispatchError::cancelled().into()),
            output = client.stream_chat(task) => output,
        }
    };
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(host = %client.name, task = %task.id, "the host client panicked; failing the task");
            Err(DispatchError::new(
                ErrorKind::Protocol,
                format!(
                    "internal error while reading {}'s answer for {} (a bug in prix-dispatch); retry",
                    client.name, task.spec.model
                ),
            )
            .into())
        }
    }
}

fn completion(
    output: StreamOutput,
    task: &InferenceTask,
    host: &str,
    taken: Instant,
) -> CompletionResult {
    CompletionResult {
        text: output.text,
        reasoning: output.reasoning,
        tool_calls: output.tool_calls,
        finish_reason: output.finish_reason,
        usage: output.usage,
        latency_ms: millis(taken.elapsed()),
        ttft_ms: output.ttft.map(millis),
        queue_wait_ms: millis(taken.saturating_duration_since(task.enqueued_at)),
        host: host.to_string(),
        model: task.spec.model.clone(),
        attempts: task.attempts,
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
