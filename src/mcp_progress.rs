//! What an MCP call tells its client while it runs: the phase of its task as a progress
//! message, repeated at least every `[server] progress_interval_seconds` until the result.
//!
//! Clients reset their per-call timeout on progress (the TypeScript SDK's
//! `resetTimeoutOnProgress`, `@modelcontextprotocol/sdk` `shared/protocol.js` `_onprogress`;
//! Claude Code's idle timeout), so a call that waits minutes in the queue or behind a model
//! load is not given up while nothing is wrong. The spec allows progress at any rate as long
//! as `progress` increases and only tokens of requests still in progress are used
//! (<https://modelcontextprotocol.io/specification/2025-11-25/basic/utilities/progress>).

use std::time::Duration;

use rmcp::RoleServer;
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::Peer;
use tokio::time::Instant;

use crate::task::TaskEvent;

/// Where a task is, as far as its client can be told.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Submitted; the scheduler has not said where in line it is (it tells only the first
    /// few of a model's queue).
    Submitted,
    /// Waiting in the queue. `starts_in` is the scheduler's estimate at `at` of when the task
    /// starts (from its learned service and load times).
    Queued {
        position: usize,
        starts_in: Option<Duration>,
        at: Instant,
    },
    /// Waiting because no host that is up lists the model (`why`: which hosts do, and what is
    /// wrong with them).
    NoHost { position: usize, why: String },
    /// Sent to `host`, which the scheduler believes must load the model first.
    Loading { host: String },
    /// Sent to `host` (model believed loaded); no byte back yet.
    FirstToken { host: String },
    /// `host` is answering (text, reasoning or tool calls).
    Generating { host: String },
}

impl Phase {
    /// The phase after `event`, or `None` when the event does not change it.
    pub fn after(&self, event: &TaskEvent) -> Option<Phase> {
        match event {
            TaskEvent::Queued {
                position,
                starts_in,
            } => Some(Phase::Queued {
                position: *position,
                starts_in: *starts_in,
                at: Instant::now(),
            }),
            TaskEvent::NoHost { position, why } => Some(Phase::NoHost {
                position: *position,
                why: why.clone(),
            }),
            TaskEvent::Started { host, cold: true } => Some(Phase::Loading { host: host.clone() }),
            TaskEvent::Started { host, cold: false } => {
                Some(Phase::FirstToken { host: host.clone() })
            }
            TaskEvent::Delta(_)
            | TaskEvent::ReasoningDelta(_)
            | TaskEvent::Answer { .. }
            | TaskEvent::Bytes(_) => match self {
                Phase::Loading { host } | Phase::FirstToken { host } => {
                    Some(Phase::Generating { host: host.clone() })
                }
                _ => None,
            },
            TaskEvent::Finished(_) | TaskEvent::Failed(_) => None,
        }
    }

    /// A one-line message for the client, as of `now`; e.g. "queued for qwen2.5-7b:
    /// position 2, starts in about 40 s", "loading qwen2.5-7b on gpu1".
    pub fn message(&self, model: &str, now: Instant) -> String {
        match self {
            Phase::Submitted => format!("queued for {model}"),
            Phase::Queued {
                position,
                starts_in,
                at,
            } => {
                let line = format!("queued for {model}: position {position}");
                match starts_in {
                    None => line,
                    Some(estimate) => {
                        let left = estimate.saturating_sub(now.saturating_duration_since(*at));
                        if left < Duration::from_secs(1) {
                            format!("{line}, starts shortly")
                        } else {
                            // Rounded up: "about 0 s" would read as "now".
                            let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                            format!("{line}, starts in about {seconds} s")
                        }
                    }
                }
            }
            Phase::NoHost { position, why } => {
                format!("queued for {model}: position {position}; no host can run it now: {why}")
            }
            Phase::Loading { host } => format!("loading {model} on {host}"),
            Phase::FirstToken { host } => {
                format!("running {model} on {host}, waiting for the first token")
            }
            Phase::Generating { host } => format!("{model} is generating on {host}"),
        }
    }
}

/// Progress notifications for one call: `progress` strictly increases, and every one is sent
/// (awaited) before the result, so none can follow it. Without a token nothing is sent.
pub struct Progress {
    /// None for a silent call.
    peer: Option<Peer<RoleServer>>,
    token: Option<ProgressToken>,
    count: u64,
    last: Instant,
}

impl Progress {
    pub fn new(peer: Peer<RoleServer>, token: Option<ProgressToken>) -> Self {
        Self {
            peer: Some(peer),
            token,
            count: 0,
            last: Instant::now(),
        }
    }

    /// A call nobody hears progress of: a task started outside an rmcp request (the
    /// 2025-11-25 task form, `mcp_tasks_wire`), whose result goes to the store.
    pub fn silent() -> Self {
        Self {
            peer: None,
            token: None,
            count: 0,
            last: Instant::now(),
        }
    }

    /// Whether the client asked for progress.
    pub fn wanted(&self) -> bool {
        self.token.is_some()
    }

    /// When the last notification went out (or the call began).
    pub fn last_sent(&self) -> Instant {
        self.last
    }

    pub async fn send(&mut self, message: String) {
        let (Some(token), Some(peer)) = (&self.token, &self.peer) else {
            return;
        };
        self.count += 1;
        self.last = Instant::now();
        let param =
            ProgressNotificationParam::new(token.clone(), self.count as f64).with_message(message);
        if let Err(e) = peer.notify_progress(param).await {
            tracing::debug!(error = %e, "progress notification not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_messages_count_the_estimate_down_and_round_up() {
        let at = Instant::now();
        let queued = |starts_in| Phase::Queued {
            position: 2,
            starts_in,
            at,
        };
        let m = "qwen2.5-7b";
        assert_eq!(
            queued(None).message(m, at),
            "queued for qwen2.5-7b: position 2"
        );
        let estimate = Some(Duration::from_millis(40_200));
        assert_eq!(
            queued(estimate).message(m, at),
            "queued for qwen2.5-7b: position 2, starts in about 41 s"
        );
        assert_eq!(
            queued(estimate).message(m, at + Duration::from_secs(30)),
            "queued for qwen2.5-7b: position 2, starts in about 11 s"
        );
        assert_eq!(
            queued(estimate).message(m, at + Duration::from_secs(90)),
            "queued for qwen2.5-7b: position 2, starts shortly"
        );
    }

    #[test]
    fn a_task_no_host_can_run_says_why() {
        let phase = Phase::NoHost {
            position: 1,
            why: "gpu0 is down: connection refused".into(),
        };
        assert_eq!(
            phase.message("m", Instant::now()),
            "queued for m: position 1; no host can run it now: gpu0 is down: connection refused"
        );
    }

    #[test]
    fn a_cold_start_reads_as_a_load_until_the_first_byte() {
        let now = Instant::now();
        let cold = Phase::Submitted
            .after(&TaskEvent::Started {
                host: "gpu1".into(),
                cold: true,
            })
            .unwrap();
        assert_eq!(
            cold.message("qwen2.5-7b", now),
            "loading qwen2.5-7b on gpu1"
        );
        let warm = Phase::Submitted
            .after(&TaskEvent::Started {
                host: "gpu1".into(),
                cold: false,
            })
            .unwrap();
        assert_eq!(
            warm.message("m", now),
            "running m on gpu1, waiting for the first token"
        );
        let generating = cold.after(&TaskEvent::ReasoningDelta("hm".into())).unwrap();
        assert_eq!(generating.message("m", now), "m is generating on gpu1");
        assert_eq!(generating.after(&TaskEvent::Delta("x".into())), None);
    }
}
