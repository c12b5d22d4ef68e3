//! The typed unit of work and everything that flows back from it.
//!
//! A front end (MCP, later HTTP) turns a [`CompletionRequest`] into an [`InferenceTask`], submits
//! it, and reads [`TaskEvent`]s until a terminal one arrives. Nothing here is stringly typed:
//! the request travels as data to the host client, results come back as [`CompletionResult`].

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::DispatchError;
use crate::params;

/// Identifies one task for the life of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task-{}", self.0)
    }
}

/// An API key. Its `Debug` never shows the value, so it cannot leak through logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
    /// The raw key, for the one place that needs it: the Authorization header to its host.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl JsonSchema for ApiKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ApiKey".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

pub const DEFAULT_TEMPERATURE: f64 = 0.7;
pub const DEFAULT_MAX_TOKENS: u32 = 2048;

fn default_temperature() -> f64 {
    DEFAULT_TEMPERATURE
}
fn default_max_tokens() -> i64 {
    DEFAULT_MAX_TOKENS as i64
}

/// `temperature`, where `null` means "not given" (the default) as for every optional parameter.
fn temperature_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(params::optional_number(d)?.unwrap_or_else(default_temperature))
}

/// `max_tokens`, where `null` means "not given" (the default).
fn max_tokens_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Ok(params::optional_whole_number(d)?.unwrap_or_else(default_max_tokens))
}

/// One chat completion, as a client asks for it (the parameters of `complete_stream`).
///
/// Every parameter declares its type, and each is read the way real clients send it (see
/// [`crate::params`]): integers may come as whole-number floats, object and array parameters
/// as strings holding their JSON; anything else is refused with the parameter's name.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct CompletionRequest {
    /// Model id as the hosts list it in `/v1/models`.
    pub model_id: String,
    /// OpenAI chat messages (objects with a `role`), passed to the host verbatim
    /// (multimodal parts included).
    #[serde(deserialize_with = "params::objects")]
    #[schemars(with = "params::ObjectsSchema")]
    pub messages: Vec<Value>,
    /// Sampling temperature, 0 to 2.
    #[serde(
        default = "default_temperature",
        deserialize_with = "temperature_or_default"
    )]
    pub temperature: f64,
    /// Most tokens to generate (at least 1).
    #[serde(
        default = "default_max_tokens",
        deserialize_with = "max_tokens_or_default"
    )]
    pub max_tokens: i64,
    /// Longest silence from the host between bytes once it has started answering, in
    /// seconds (default 300, or the daemon's [timeouts] timeout_seconds). Queue wait never counts.
    #[serde(default, deserialize_with = "params::optional_number")]
    #[schemars(extend("default" = 300))]
    pub timeout_seconds: Option<f64>,
    /// Longest wait from sending the request to the host's first byte, in seconds; covers a
    /// cold model load (default 600, or the daemon's [timeouts] first_token_timeout_seconds).
    #[serde(default, deserialize_with = "params::optional_number")]
    #[schemars(extend("default" = 600))]
    pub first_token_timeout_seconds: Option<f64>,
    /// Longest wait in the queue for a free slot, in seconds; 0 = no limit (default: the
    /// daemon's [queue] wait_timeout_seconds, 0).
    #[serde(default, deserialize_with = "params::optional_number")]
    pub queue_timeout_seconds: Option<f64>,
    /// Tool definitions (objects); flat `{name, description, parameters}` ones are wrapped as
    /// OpenAI functions.
    #[serde(default, deserialize_with = "params::optional_objects")]
    #[schemars(with = "Option<params::ObjectsSchema>")]
    pub tools: Option<Vec<Value>>,
    /// OpenAI `tool_choice`: `"auto"`, `"none"`, `"required"` or an object naming a function;
    /// passed through.
    #[serde(default, deserialize_with = "params::optional_string_or_object")]
    #[schemars(with = "Option<params::StringOrObjectSchema>")]
    pub tool_choice: Option<Value>,
    /// Sampling seed, passed through.
    #[serde(default, deserialize_with = "params::optional_whole_number")]
    pub seed: Option<i64>,
    /// llama.cpp / LM Studio repetition penalty; sent only when it is not 1.0.
    #[serde(default, deserialize_with = "params::optional_number")]
    pub repeat_penalty: Option<f64>,
    /// OpenAI `response_format`, an object (e.g. `{"type": "json_object"}` or a JSON schema),
    /// passed through.
    #[serde(default, deserialize_with = "params::optional_object")]
    #[schemars(with = "Option<params::ObjectSchema>")]
    pub response_format: Option<Value>,
    /// Key for this request only; overrides the host's configured key.
    #[serde(default)]
    pub api_key: Option<ApiKey>,
    /// Lower runs earlier, default 0 (vLLM's convention): a call with priority -1 goes ahead
    /// of waiting batch work; a waiting task's claim grows with its wait, so none starves.
    #[serde(default, deserialize_with = "params::optional_whole_number")]
    pub priority: Option<i64>,
    /// Parameters this daemon does not know; ignored (and logged at debug).
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: Map<String, Value>,
}

/// What the host is asked to do: the chat parameters, already checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatParams {
    pub messages: Vec<Value>,
    pub temperature: f64,
    pub max_tokens: u32,
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    pub seed: Option<i64>,
    pub repeat_penalty: Option<f64>,
    pub response_format: Option<Value>,
}

/// What is sent to the host.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskBody {
    /// Built from typed parameters (MCP): always streamed, usage included.
    Chat(ChatParams),
    /// An OpenAI request forwarded byte for byte as the client wrote it (the front end checked
    /// that it is a chat request for the task's model); the host's answer is relayed byte for
    /// byte ([`TaskEvent::Answer`], [`TaskEvent::Bytes`]).
    Relay {
        body: bytes::Bytes,
        /// `max_completion_tokens`, else `max_tokens`, as the client set it.
        max_tokens: Option<u64>,
    },
}

impl TaskBody {
    /// The token limit the client asked for, if any (a host streaming far past it is broken).
    pub fn max_tokens(&self) -> Option<u64> {
        match self {
            TaskBody::Chat(params) => Some(u64::from(params.max_tokens)),
            TaskBody::Relay { max_tokens, .. } => *max_tokens,
        }
    }
}

/// Everything needed to run a task, minus the plumbing: built from a request after validation.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub model: String,
    pub body: TaskBody,
    pub api_key: Option<ApiKey>,
    /// Longest silence between bytes; `None` = the daemon's default.
    pub timeout: Option<Duration>,
    /// Longest wait for the first byte; `None` = the daemon's default.
    pub first_token_timeout: Option<Duration>,
    /// Longest wait in the queue; `None` = the daemon's default, zero = no limit.
    pub queue_timeout: Option<Duration>,
    /// The connected client that asked (see `clients`), for status pages.
    pub client: Option<u64>,
    /// Who asked, for fair share between clients: `mcp:<session>` for an MCP session (each
    /// bridged stdio launch is one), `user:<id>` for an OpenAI request's `user` field,
    /// `header:<name>` for an `X-Prix-Client` header, `key:<hash>` per bearer token, else
    /// [`ANONYMOUS`].
    pub client_id: String,
    /// Lower runs earlier (vLLM's `priority` convention); 0 by default. Interactive work
    /// uses negative values.
    pub priority: i32,
}

/// The client id of a request that names no client.
pub const ANONYMOUS: &str = "anonymous";

/// The host-side timeouts of one task, with the daemon's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub first_token: Duration,
    pub inactivity: Duration,
}

impl CompletionRequest {
    /// Bytes of the payload a host would receive (messages, tools, response format): what
    /// `[server] max_request_bytes` bounds.
    pub fn payload_bytes(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        let _ = serde_json::to_writer(&mut count, &self.messages);
        let _ = serde_json::to_writer(&mut count, &self.tools);
        let _ = serde_json::to_writer(&mut count, &self.response_format);
        count.0
    }

    /// Checks ranges and shapes; every rejection names the parameter and what it accepts.
    pub fn into_spec(self) -> Result<TaskSpec, DispatchError> {
        if self.model_id.trim().is_empty() {
            return Err(DispatchError::invalid("model_id must not be empty"));
        }
        if self.messages.is_empty() {
            return Err(DispatchError::invalid(
                "messages must hold at least one message, e.g. [{\"role\":\"user\",\"content\":\"hi\"}]",
            ));
        }
        for (i, message) in self.messages.iter().enumerate() {
            let role = message.as_object().and_then(|m| m.get("role"));
            if !matches!(role, Some(Value::String(r)) if !r.is_empty()) {
                return Err(DispatchError::invalid(format!(
                    "messages[{i}] must be an object with a string \"role\" (system, user, assistant or tool)"
                )));
            }
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(DispatchError::invalid(format!(
                "temperature must be between 0 and 2, got {}",
                self.temperature
            )));
        }
        let max_tokens = u32::try_from(self.max_tokens)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                let bound = if self.max_tokens < 1 {
                    "at least 1".to_string()
                } else {
                    format!("at most {}", u32::MAX)
                };
                DispatchError::invalid(format!(
                    "max_tokens must be {bound}, got {}",
                    self.max_tokens
                ))
            })?;
        let timeout = self
            .timeout_seconds
            .map(|s| positive_seconds("timeout_seconds", s))
            .transpose()?;
        let first_token_timeout = self
            .first_token_timeout_seconds
            .map(|s| positive_seconds("first_token_timeout_seconds", s))
            .transpose()?;
        let queue_timeout = match self.queue_timeout_seconds {
            None => None,
            Some(0.0) => Some(Duration::ZERO),
            Some(s) => Some(positive_seconds("queue_timeout_seconds", s)?),
        };
        if let Some(p) = self.repeat_penalty
            && !(p.is_finite() && p > 0.0)
        {
            return Err(DispatchError::invalid(format!(
                "repeat_penalty must be a positive number, got {p}"
            )));
        }
        let priority = match self.priority {
            None => 0,
            Some(p) => check_priority(p)?,
        };
        Ok(TaskSpec {
            model: self.model_id,
            body: TaskBody::Chat(ChatParams {
                messages: self.messages,
                temperature: self.temperature,
                max_tokens,
                tools: self.tools.unwrap_or_default(),
                tool_choice: self.tool_choice,
                seed: self.seed,
                repeat_penalty: self.repeat_penalty,
                response_format: self.response_format,
            }),
            api_key: self.api_key.filter(|k| !k.expose().is_empty()),
            timeout,
            first_token_timeout,
            queue_timeout,
            client: None,
            client_id: ANONYMOUS.to_string(),
            priority,
        })
    }
}

/// A request's `priority`, checked: an integer within ±1,000,000.
pub fn check_priority(p: i64) -> Result<i32, DispatchError> {
    if p.abs() <= 1_000_000 {
        Ok(p as i32)
    } else {
        Err(DispatchError::invalid(format!(
            "priority must be an integer from -1000000 to 1000000 (lower runs earlier), got {p}"
        )))
    }
}

fn positive_seconds(name: &str, seconds: f64) -> Result<Duration, DispatchError> {
    if seconds > 0.0 && seconds < 1e9 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(DispatchError::invalid(format!(
            "{name} must be a positive number of seconds, got {seconds}"
        )))
    }
}

/// A task inside the daemon: the spec plus the plumbing that ties it to its client.
#[derive(Debug)]
pub struct InferenceTask {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub timeouts: Timeouts,
    /// Longest wait in the queue, resolved; `None` = no limit.
    pub queue_timeout: Option<Duration>,
    /// Times a host has been sent this task (retries happen only before any response byte).
    pub attempts: u32,
    pub enqueued_at: Instant,
    /// Fired when the client gives up; whoever holds the task stops working on it.
    pub cancel: CancellationToken,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// Fired at the host's first output byte, when the worker wants to know (a cold load).
    pub first_output: Option<CancellationToken>,
    /// Whether `first_output` was fired: after the first byte, a plain load per event
    /// instead of the token's lock.
    pub first_fired: std::sync::atomic::AtomicBool,
    /// Its place in the fair-share line, given by the scheduler at submission.
    pub queue_key: Option<crate::scheduler::fair::QueueKey>,
}

impl InferenceTask {
    /// True once nobody is listening any more: cancelled, or the client dropped its receiver.
    pub fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Resolves when the task is [`abandoned`](Self::abandoned).
    pub async fn abandoned_signal(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.events.closed() => {}
        }
    }

    pub fn emit(&self, event: TaskEvent) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(first) = &self.first_output
            && !self.first_fired.load(Relaxed)
            && matches!(
                event,
                TaskEvent::Delta(_) | TaskEvent::ReasoningDelta(_) | TaskEvent::Bytes(_)
            )
            && !self.first_fired.swap(true, Relaxed)
        {
            first.cancel();
        }
        // A closed receiver means the client left; the worker notices through `abandoned`.
        let _ = self.events.send(event);
    }
}

/// What a client hears about its task, in order; `Finished` and `Failed` are terminal.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// Waiting; `position` 1 means next in line for this model; `starts_in` the scheduler's
    /// rough estimate of when it starts (from the learned service and load times).
    Queued {
        position: usize,
        starts_in: Option<std::time::Duration>,
    },
    /// Waiting at `position` because no host that is up lists the model; `why` names the
    /// hosts that do and what is wrong with them.
    NoHost {
        position: usize,
        why: String,
    },
    /// A host slot took the task and the request is on its way to `host`.
    Started {
        host: String,
        /// The scheduler believes `host` does not hold the model, so the request starts with
        /// a model load (its first byte comes only after the load).
        cold: bool,
    },
    Delta(String),
    ReasoningDelta(String),
    /// Relay only: the host's answer starts, with this content type. Sent together with the
    /// first bytes relayed, so that a failure before them still reaches the client as an
    /// error status.
    Answer {
        content_type: String,
    },
    /// Relay only: bytes of the host's answer, as they arrived.
    Bytes(bytes::Bytes),
    Finished(CompletionResult),
    Failed(DispatchError),
}

/// A tool call the model made, arguments as the raw string the model produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCall {
    pub id: Option<String>,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// The outcome of a completed task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompletionResult {
    pub text: String,
    /// Reasoning (`reasoning_content`) the model produced, if any.
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// From sending the request to the host to the end of the stream; queue wait excluded.
    pub latency_ms: f64,
    /// From sending the request to the first content, reasoning or tool-call delta.
    pub ttft_ms: Option<f64>,
    /// Time spent in the queue before a slot took the task.
    pub queue_wait_ms: f64,
    /// Name of the host that served the task.
    pub host: String,
    pub model: String,
    /// Hosts tried: 1, or more when an earlier one failed before answering.
    pub attempts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(extra: Value) -> Result<CompletionRequest, serde_json::Error> {
        let mut body = json!({"model_id": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body)
    }

    #[test]
    fn null_for_a_parameter_with_a_default_is_the_default() {
        let r = request(json!({"max_tokens": null, "temperature": null})).unwrap();
        assert_eq!(r.max_tokens, i64::from(DEFAULT_MAX_TOKENS));
        assert_eq!(r.temperature, DEFAULT_TEMPERATURE);
        let r = request(json!({"max_tokens": 50.0, "temperature": 0})).unwrap();
        assert_eq!((r.max_tokens, r.temperature), (50, 0.0));
    }

    #[test]
    fn max_tokens_beyond_its_range_names_the_range() {
        let e = request(json!({"max_tokens": 5_000_000_000u64}))
            .unwrap()
            .into_spec()
            .unwrap_err();
        assert!(e.message.contains("at most 4294967295"), "{}", e.message);
    }
}
