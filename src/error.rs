//! What a task can fail with, as callers see it.
//!
//! Every failure a client can observe is a [`DispatchError`]: a machine-readable [`ErrorKind`],
//! whether retrying the same request makes sense, and a message that names what failed, where,
//! and what to do. The messages keep the substrings that prompt-prix's retry classifier already
//! matches (`timeout`, `connection`, `Stream aborted`, `Authentication failed`,
//! `not available on any server`, `No models available`, `queue full`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The class of a failure. Serialised in snake_case into MCP error results and HTTP bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is malformed (missing messages, bad ranges, ...).
    InvalidRequest,
    /// No host lists the requested model, even after a fresh manifest read.
    ModelNotAvailable,
    /// No host lists any model at all (all down, all unauthorised, all empty).
    NoModelsAvailable,
    /// The task waited in the queue longer than its queue timeout.
    QueueTimeout,
    /// The queue holds `max_pending` tasks already.
    QueueFull,
    /// The host sent nothing for longer than the inactivity timeout.
    Timeout,
    /// The host could not be reached, or the connection broke.
    Connection,
    /// The host answered 401/403.
    Authentication,
    /// The host answered with another HTTP error status.
    HostError,
    /// The stream ended with neither content nor `[DONE]` (typically an aborted model load).
    StreamAborted,
    /// The stream ended after some content but before `[DONE]` or a finish reason.
    StreamTruncated,
    /// The host sent an `{"error": ...}` chunk inside the stream.
    StreamError,
    /// The host sent something that is not an OpenAI-compatible stream.
    Protocol,
    /// The client cancelled the task.
    Cancelled,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The scheduler stopped; the daemon must be restarted.
    SchedulerStopped,
}

/// A failure of one task, with enough context for a person and for a retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{message}")]
pub struct DispatchError {
    pub kind: ErrorKind,
    /// True when sending the same request again may succeed.
    pub retryable: bool,
    pub message: String,
    /// The HTTP status the host gave this failure (its response status, or the `code` of an
    /// error it reported inside a 200), when it did. The OpenAI front door answers a host's
    /// 4xx with that 4xx, so clients do not retry a request the host will always refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<u16>,
}

impl DispatchError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            retryable: kind.retryable_by_default(),
            message: message.into(),
            host_status: None,
        }
    }

    /// This error as the answer to a host status: a 4xx other than 408 and 429 means the host
    /// will refuse the same request again (not retryable); 408, 429 and 5xx may pass.
    pub fn with_host_status(mut self, status: u16) -> Self {
        self.host_status = Some(status);
        self.retryable = status >= 500 || status == 408 || status == 429;
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "request cancelled by the client")
    }

    pub fn scheduler_stopped() -> Self {
        Self::new(
            ErrorKind::SchedulerStopped,
            "Dispatcher loop stopped: the prix-dispatch scheduler is gone; restart the daemon",
        )
    }
}

impl ErrorKind {
    fn retryable_by_default(self) -> bool {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::ModelNotAvailable
            | ErrorKind::NoModelsAvailable
            | ErrorKind::Authentication
            | ErrorKind::Cancelled
            | ErrorKind::SchedulerStopped
            | ErrorKind::Protocol => false,
            ErrorKind::QueueTimeout
            | ErrorKind::QueueFull
            | ErrorKind::Timeout
            | ErrorKind::Connection
            | ErrorKind::HostError
            | ErrorKind::StreamAborted
            | ErrorKind::StreamTruncated
            | ErrorKind::StreamError
            | ErrorKind::ShuttingDown => true,
        }
    }
}

/// What one attempt says about its host's health, for the scheduler's health rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSignal {
    /// The host answered properly: clears the circuit breaker.
    Healthy,
    /// The host could not be reached or dropped the connection.
    Unreachable(String),
    /// A 5xx answer: counts toward the circuit breaker.
    ServerError(String),
    /// Nothing learnt (cancellation, a slow model, a 4xx, a bad stream).
    Neutral,
    /// The host's own `/slots` showed this many slots busy with requests this daemon did not
    /// send, so the task was not sent (it goes back to its place in the queue).
    BusyElsewhere(usize),
}

/// A failed attempt on one host: what the client hears, what it says about the host, and
/// whether the task may run elsewhere (only when the host sent no byte at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub error: DispatchError,
    pub signal: HostSignal,
    pub retry_elsewhere: bool,
}

impl From<DispatchError> for AttemptError {
    fn from(error: DispatchError) -> Self {
        Self {
            error,
            signal: HostSignal::Neutral,
            retry_elsewhere: false,
        }
    }
}

/// Why a host's model list could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFailure {
    /// Short, for status pages: "HTTP 401", "connection refused".
    pub reason: String,
    /// The host answered (an HTTP error or a bad body) rather than being unreachable.
    pub answered: bool,
}

impl ManifestFailure {
    /// What to check next about the host at `base_url` (`check-config --probe`), by the kind
    /// of failure: unreachable, refused for want of a key, or not an OpenAI-compatible server.
    pub fn what_to_check(&self, base_url: &str) -> String {
        let reason = self.reason.to_ascii_lowercase();
        if !self.answered {
            if reason.contains("timed out") || reason.contains("timeout") {
                format!(
                    "nothing answered at {base_url} in time: is the machine up, the port right, \
                     and no firewall dropping it?"
                )
            } else {
                format!(
                    "is the server running and listening at {base_url}? (LM Studio: Developer > \
                     Start Server, with \"Serve on Local Network\" for another machine; \
                     llama-server: --host and --port); `curl {base_url}/v1/models` should list \
                     its models"
                )
            }
        } else if reason.contains("401") || reason.contains("403") {
            "the server wants an API key: set api_key_env (or api_key) for this [[host]], or \
             LOCAL_INFERENCE_SERVER_N_KEY / LMSTUDIO_API_KEY"
                .to_string()
        } else {
            format!(
                "{base_url} answers, but not as an OpenAI-compatible server: is the URL the \
                 server's base (like http://127.0.0.1:1234, without /v1/chat/completions), and \
                 is it LM Studio, llama-server, Ollama, vLLM or another server with /v1/models?"
            )
        }
    }
}

impl std::fmt::Display for ManifestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}
