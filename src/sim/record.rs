//! What the simulator remembers about each request, for tests to assert on.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a request ended. The first outcome set sticks: a stream that was
/// evicted stays `Evicted` even though its connection is torn down after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still being answered (this includes a request that hangs).
    InProgress,
    /// Answered in full (including the deliberate `send_done: false` and
    /// `send_finish_reason: false` variants).
    Completed,
    /// The client went away before the answer was complete.
    ClientDisconnected,
    /// The body was aborted on purpose (`drop_after_tokens`).
    Dropped,
    /// The body ended cleanly but early (`end_after_tokens`).
    Truncated,
    /// Aborted because a request for another model arrived (`auto_evict`).
    Evicted,
    /// The stream ended with an in-band error event (`in_stream_error`).
    StreamError,
    /// Answered with this non-2xx status (401, 404, `fail_status`, ...).
    FailedStatus(u16),
}

/// One request as the simulator saw it. Times are microseconds since the
/// UNIX epoch, so records of several simulated hosts can be compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Arrival order on this host, from 1.
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// The `model` of a chat request body.
    pub model: Option<String>,
    /// The raw `Authorization` header.
    pub auth: Option<String>,
    pub stream: bool,
    pub start_us: u64,
    /// When the status line was handed to the connection.
    pub first_byte_us: Option<u64>,
    pub end_us: Option<u64>,
    pub outcome: Outcome,
    /// Content tokens handed to the connection (reasoning and tool-call
    /// fragments are not counted).
    pub tokens_sent: usize,
    /// Chat requests in flight when this one started, itself included if it
    /// is an accepted chat request.
    pub in_flight_at_start: usize,
    /// Distinct models of the other chat requests in flight at that moment.
    pub other_models_in_flight_at_start: Vec<String>,
    /// The parsed JSON body of a POST, `Null` otherwise or if unparsable.
    pub body: Value,
}

impl RequestRecord {
    /// Whether the request has reached its final outcome.
    pub fn is_finished(&self) -> bool {
        self.outcome != Outcome::InProgress
    }
}

/// Counters over all requests since start (or the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Most chat requests ever in flight at once.
    pub peak_in_flight: usize,
    /// Chat requests in flight now.
    pub in_flight: usize,
    /// `GET /v1/models` calls.
    pub manifest_calls: u64,
    /// Chat requests that started while one for a different model was in
    /// flight: what a dispatcher that keeps one model per GPU must avoid.
    pub model_overlaps: u64,
    /// Connections closed unread because `reset_connections` was set.
    pub connections_reset: u64,
    /// Model loads, duplicate instances included (see `ResidencyEvent`).
    pub loads: u64,
    /// Model evictions.
    pub evictions: u64,
}

/// Wall-clock microseconds since the UNIX epoch.
pub(crate) fn now_us() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX)
}
