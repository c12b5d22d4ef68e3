//! Slot workers: one per host slot, each pulling its next task only when its slot is idle.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::time::Instant;

use crate::backend::slots::SlotsBusy;
use crate::backend::{HostClient, StreamOutput};
use crate::error::{AttemptError, DispatchError, ErrorKind, HostSignal};
use crate::metrics::{ClientClass, Metrics};
use crate::scheduler::costs::Observed;
use crate::scheduler::state::{HostId, Outcome};
use crate::scheduler::{Assignment, Scheduler};
use crate::task::{CompletionResult, InferenceTask, TaskEvent};

/// How long a slot stays taken after its task was cancelled mid-request (see `run`).
const CANCEL_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs until the scheduler stops, or until the scheduler dismisses this worker (its host
/// left the fleet or has fewer slots after a reload).
pub async fn run(scheduler: Scheduler, host: HostId, metrics: Arc<Metrics>) {
    // The slot asks for its next task as soon as it is free, before the client hears how the
    // last one ended (see `Scheduler::next_task`); every path below sets it again.
    let mut next = scheduler.next_task(host);
    while let Some(Assignment {
        mut task,
        lease,
        client,
        running_here,
        silent_others,
        slots,
        cold,
        gated,
    }) = next.await
    {
        if !task.abandoned()
            && let Some(busy) = busy_elsewhere(&client, running_here, silent_others, slots).await
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
            next = scheduler.next_task(host);
            continue;
        }
        task.attempts += 1;
        let taken = Instant::now();
        let sent = !task.abandoned();
        let result = if sent {
            task.emit(TaskEvent::Started {
                host: client.name.clone(),
                cold,
            });
            if cold || gated || client.may_show_slots() {
                // The scheduler hears of the first byte: for a gated request (a cold load, or
                // the one after a load that failed) it opens the host's other slots, and it
                // marks the request as surely counted by the host's `/slots`.
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
                next = scheduler.next_task(host);
                let result = completion(output, &task, &client.name, taken);
                metrics.completed(ClientClass::of(&task.spec.client_id), &result);
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
                next = scheduler.next_task(host);
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
                next = scheduler.next_task(host);
                let waited = taken.saturating_duration_since(task.enqueued_at);
                metrics.ended_early(
                    ClientClass::of(&task.spec.client_id),
                    waited.as_secs_f64(),
                    taken.elapsed().as_secs_f64(),
                );
                task.emit(TaskEvent::Failed(error));
            }
        }
    }
}

/// Reads a llama.cpp host's `/slots` before sending (see [`hold_back`]).
async fn busy_elsewhere(
    client: &HostClient,
    running_here: usize,
    silent: usize,
    slots: usize,
) -> Option<usize> {
    if !client.may_show_slots() {
        return None;
    }
    hold_back(client.read_slots().await?, running_here, silent, slots)?;
    // llama-server marks a slot idle a moment after it sent the answer's last byte: a request
    // of ours that just ended can still show as processing. Look once more before calling it
    // someone else's (measured: the real-server test sent a task to the other host otherwise).
    tokio::time::sleep(SLOTS_SECOND_LOOK).await;
    hold_back(client.read_slots().await?, running_here, silent, slots)
}

/// How long to wait before the second `/slots` read that confirms load from elsewhere.
const SLOTS_SECOND_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether a task must not be sent to a host whose `/slots` shows `seen`, and if so how many
/// slots to count as busy from elsewhere. `running_here` counts this task. Our other requests
/// that the host already answered surely show as processing; those it has not (`silent`) may
/// or may not, so the check assumes the worst both ways: the processing slots it cannot account
/// for may be someone else's, and our silent requests may not be counted yet.
fn hold_back(seen: SlotsBusy, running_here: usize, silent: usize, slots: usize) -> Option<usize> {
    let ours = running_here.saturating_sub(1);
    let answering = ours.saturating_sub(silent);
    let maybe_elsewhere = seen.processing.saturating_sub(answering);
    let full = seen.processing + silent + 1 > slots.min(seen.total);
    (maybe_elsewhere > 0 && full).then(|| seen.processing.saturating_sub(ours).max(1))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(processing: usize, total: usize) -> SlotsBusy {
        SlotsBusy { processing, total }
    }

    #[test]
    fn a_one_slot_host_busy_from_elsewhere_gets_nothing() {
        assert_eq!(hold_back(seen(1, 1), 1, 0, 1), Some(1));
        assert_eq!(
            hold_back(seen(1, 4), 1, 0, 1),
            Some(1),
            "config says one slot"
        );
        assert_eq!(hold_back(seen(0, 1), 1, 0, 1), None);
    }

    #[test]
    fn a_two_slot_host_with_one_foreign_request_takes_one_of_ours_not_two() {
        // The first of ours: one slot left.
        assert_eq!(hold_back(seen(1, 2), 1, 0, 2), None);
        // The second, while the first has not answered (it may not show yet): held.
        assert_eq!(hold_back(seen(1, 2), 2, 1, 2), Some(1));
        assert_eq!(hold_back(seen(2, 2), 2, 1, 2), Some(1));
        // Our own answering request is no reason to hold the next.
        assert_eq!(hold_back(seen(1, 2), 2, 0, 2), None);
    }
}
