//! The client for one OpenAI-compatible host (LM Studio, llama.cpp's llama-server, ...).
//!
//! `{base_url}/v1/...` is built here and nowhere else. A host's key is sent only to that host.

pub mod request;
pub mod residency;
pub mod slots;
pub mod sse;

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::HostConfig;
pub use crate::error::ManifestFailure;
use crate::error::{AttemptError, DispatchError, ErrorKind, HostSignal};
use crate::task::{ApiKey, InferenceTask, TaskBody, TaskEvent, ToolCall, Usage};
use sse::{ChatStream, InStreamError, SseDecoder};

/// How long a manifest read may take, as upstream had it.
pub const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the optional loaded-state read may take.
const LOADED_STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of an error body kept for the message.
const ERROR_BODY_BYTES: usize = 200;

/// The model's answer, as the host streamed it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutput {
    pub text: String,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// From sending the request to the first output delta.
    pub ttft: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct HostClient {
    pub name: String,
    pub base_url: String,
    api_key: Option<ApiKey>,
    http: reqwest::Client,
    /// `{base_url}/v1/chat/completions`, parsed once: parsing it (host name mapping included)
    /// was a measurable part of every request. `None` if `base_url` is not a URL (a
    /// `HostConfig` built by hand); the string is then sent as is and the request fails there.
    chat_url: Option<reqwest::Url>,
    /// Whether the host has llama.cpp's `/slots` (see [`slots`]); learnt at the first read.
    slots_support: Arc<AtomicU8>,
}

/// One HTTP client for all hosts: connection pooling, and an idle timeout shorter than the
/// keep-alive of llama-server (5 s), so a pooled connection the server already closed is not
/// reused for a POST that cannot be retried.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(4))
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        // reqwest's default policy retries HTTP/2 and HTTP/3 refusals, which this build (HTTP/1
        // only) never sees, yet it copies every request's headers to be ready for a retry.
        // Retries are the scheduler's decision anyway.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .build()
        .expect("the HTTP client builds with static settings")
}

impl HostClient {
    /// Whether both clients send the same key (or none): a reload that changes only the key
    /// is still a change worth logging.
    pub fn same_key(&self, other: &HostClient) -> bool {
        self.api_key.as_ref().map(ApiKey::expose) == other.api_key.as_ref().map(ApiKey::expose)
    }

    pub fn new(config: &HostConfig, http: reqwest::Client) -> Self {
        Self {
            name: config.name.clone(),
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            http,
            chat_url: reqwest::Url::parse(&chat_url(&config.base_url)).ok(),
            slots_support: Arc::default(),
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }

    /// `GET /v1/models`: the ids this host can serve (with LM Studio's JIT loading, every
    /// downloaded model). The error is short, for status pages: "HTTP 401", "connection refused".
    pub async fn read_manifest(&self) -> Result<Vec<String>, ManifestFailure> {
        let answered = |reason: String| ManifestFailure {
            reason,
            answered: true,
        };
        let response = self
            .get("/v1/models")
            .timeout(MANIFEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| ManifestFailure {
                reason: describe(&e),
                answered: false,
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(answered(format!("HTTP {}", status.as_u16())));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| answered(format!("bad /v1/models body: {}", describe(&e))))?;
        let Some(data) = body.get("data").and_then(Value::as_array) else {
            // LM Studio answers unknown paths with 200 and {"error": ...}.
            let why = body
                .get("error")
                .map(sse::error_message)
                .unwrap_or_else(|| {
                    "/v1/models answered without a \"data\" list: not an OpenAI-compatible server?"
                        .into()
                });
            return Err(answered(why));
        };
        Ok(data
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str))
            .map(str::to_string)
            .collect())
    }

    /// Models loaded in memory, from LM Studio's `/api/v1/models` (falling back to
    /// `/api/v0/models`); `None` when the host does not say (llama-server, older servers).
    pub async fn read_loaded_models(&self) -> Option<Vec<String>> {
        if let Some(body) = self.get_json("/api/v1/models").await
            && let Some(models) = body.get("models").and_then(Value::as_array)
        {
            return Some(
                models
                    .iter()
                    .filter(|m| {
                        m.get("loaded_instances")
                            .and_then(Value::as_array)
                            .is_some_and(|i| !i.is_empty())
                    })
                    .filter_map(|m| m.get("key").and_then(Value::as_str).map(str::to_string))
                    .collect(),
            );
        }
        let body = self.get_json("/api/v0/models").await?;
        let data = body.get("data").and_then(Value::as_array)?;
        Some(
            data.iter()
                .filter(|m| m.get("state").and_then(Value::as_str) == Some("loaded"))
                .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                .collect(),
        )
    }

    async fn get_json(&self, path: &str) -> Option<Value> {
        let response = self
            .get(path)
            .timeout(LOADED_STATE_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Runs one chat completion, forwarding deltas to the task's client as they arrive.
    ///
    /// `first_token` bounds the wait from sending to the host's first byte (a cold model load);
    /// `inactivity` bounds every gap between bytes after that. The task's queue wait is part of
    /// neither. Dropping the future drops the connection, which is how a cancelled task stops
    /// the host.
    pub async fn stream_chat(&self, task: &InferenceTask) -> Result<StreamOutput, AttemptError> {
        let model = &task.spec.model;
        let relay = matches!(task.spec.body, TaskBody::Relay { .. });
        let request = match &self.chat_url {
            Some(url) => self.http.post(url.clone()),
            None => self.http.post(chat_url(&self.base_url)),
        };
        let mut request = match &task.spec.body {
            TaskBody::Chat(params) => request.json(&request::chat_body(model, params)),
            // The client's bytes as they came (a cheap reference-counted clone).
            TaskBody::Relay { body, .. } => request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone()),
        };
        if let Some(key) = task.spec.api_key.as_ref().or(self.api_key.as_ref()) {
            request = request.bearer_auth(key.expose());
        }
        let limits = task.timeouts;
        let sent = Instant::now();
        let first_byte_by = sent + limits.first_token;
        let response = match timeout_at(first_byte_by, request.send()).await {
            Err(_) => return Err(self.first_token_timeout(model, limits.first_token).into()),
            Ok(Err(e)) => {
                // Nothing reached the client and the host sent nothing: safe to run elsewhere.
                let error = self.connection_error(&e);
                return Err(AttemptError {
                    signal: HostSignal::Unreachable(short_cause(&e)),
                    retry_elsewhere: true,
                    error,
                });
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(DispatchError::new(
                ErrorKind::Authentication,
                format!(
                    "Authentication failed for {model} at {} (HTTP {}) — check api_key for this host",
                    self.name,
                    status.as_u16()
                ),
            )
            .into());
        }
        if !status.is_success() {
            let detail = match timeout(limits.inactivity, response.bytes()).await {
                Ok(Ok(bytes)) => error_detail(&bytes),
                _ => String::from("(no body)"),
            };
            let mut error = DispatchError::new(
                ErrorKind::HostError,
                format!(
                    "Inference error for {model} at {}: HTTP {}: {detail}",
                    self.name,
                    status.as_u16()
                ),
            );
            error.retryable = status.is_server_error() || status.as_u16() == 429;
            let signal = if status.is_server_error() {
                HostSignal::ServerError(format!("HTTP {}: {detail}", status.as_u16()))
            } else {
                HostSignal::Neutral
            };
            return Err(AttemptError {
                error,
                signal,
                retry_elsewhere: false,
            });
        }

        let mut reader = StreamReader {
            host: self,
            task,
            stream: ChatStream::default(),
            sent,
            ttft: None,
            deltas: 0,
        };
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/event-stream")
            .to_string();
        if relay {
            task.emit(TaskEvent::Answer {
                content_type: content_type.clone(),
            });
        }
        if content_type.starts_with("application/json") {
            // A server that ignores `stream: true` (or LM Studio's 200-with-error on unknown
            // paths) answers with one JSON document; read it as a single chunk.
            let bytes = match timeout_at(first_byte_by, response.bytes()).await {
                Err(_) => return Err(self.first_token_timeout(model, limits.first_token).into()),
                Ok(Err(e)) => return Err(self.lost_mid_answer(&e)),
                Ok(Ok(bytes)) => bytes,
            };
            if relay {
                task.emit(TaskEvent::Bytes(bytes.clone()));
            }
            reader.apply(&String::from_utf8_lossy(&bytes))?;
            reader.stream.done =
                reader.stream.finish_reason.is_some() || reader.stream.has_output();
            return reader.finish(None);
        }

        let mut response = response;
        let mut decoder = SseDecoder::default();
        let mut payloads = Vec::new();
        let mut got_bytes = false;
        let mut broken: Option<reqwest::Error> = None;
        'read: while !reader.stream.done {
            let next = if got_bytes {
                timeout(limits.inactivity, response.chunk()).await
            } else {
                timeout_at(first_byte_by, response.chunk()).await
            };
            let chunk = match next {
                Err(_) if got_bytes => {
                    return Err(self.inactivity_timeout(model, limits.inactivity).into());
                }
                Err(_) => return Err(self.first_token_timeout(model, limits.first_token).into()),
                Ok(Err(e)) => {
                    broken = Some(e);
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(bytes))) => bytes,
            };
            got_bytes = true;
            if relay {
                // Forwarded before parsing: the client sees bytes as soon as we do.
                task.emit(TaskEvent::Bytes(chunk.clone()));
            }
            if decoder.push(&chunk, &mut payloads).is_err() {
                return Err(DispatchError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{} sent a stream line over {} MiB for {model}; not a chat stream",
                        self.name,
                        sse::MAX_LINE_BYTES >> 20
                    ),
                )
                .into());
            }
            for payload in payloads.drain(..) {
                reader.apply(&payload)?;
                if reader.stream.done {
                    break 'read;
                }
            }
        }
        if !reader.stream.done {
            decoder.finish(&mut payloads);
            for payload in payloads.drain(..) {
                reader.apply(&payload)?;
            }
        }
        reader.finish(broken)
    }

    fn first_token_timeout(&self, model: &str, limit: Duration) -> DispatchError {
        DispatchError::new(
            ErrorKind::Timeout,
            format!(
                "first-token timeout: {} sent no byte for {model} within {:.1}s of the request \
                 (first_token_timeout_seconds); the model may still be loading, raise it for cold loads",
                self.name,
                limit.as_secs_f64()
            ),
        )
    }

    fn inactivity_timeout(&self, model: &str, limit: Duration) -> DispatchError {
        DispatchError::new(
            ErrorKind::Timeout,
            format!(
                "inactivity timeout: {} went silent for {:.1}s mid-stream for {model} (timeout_seconds)",
                self.name,
                limit.as_secs_f64()
            ),
        )
    }

    fn connection_error(&self, e: &reqwest::Error) -> DispatchError {
        DispatchError::new(
            ErrorKind::Connection,
            format!(
                "connection to {} ({}) failed: {} — is the server running and reachable?",
                self.name,
                self.base_url,
                describe(e)
            ),
        )
    }

    fn lost_mid_answer(&self, e: &reqwest::Error) -> AttemptError {
        AttemptError {
            error: DispatchError::new(
                ErrorKind::Connection,
                format!(
                    "connection to {} lost mid-answer: {}",
                    self.name,
                    describe(e)
                ),
            ),
            signal: HostSignal::Unreachable(short_cause(e)),
            retry_elsewhere: false,
        }
    }
}

/// Folds one stream into a [`StreamOutput`], forwarding deltas as they come.
struct StreamReader<'a> {
    host: &'a HostClient,
    task: &'a InferenceTask,
    stream: ChatStream,
    sent: Instant,
    ttft: Option<Duration>,
    /// Output deltas seen: a host that streams far past `max_tokens` is broken.
    deltas: u64,
}

impl StreamReader<'_> {
    fn apply(&mut self, payload: &str) -> Result<(), AttemptError> {
        let model = &self.task.spec.model;
        let applied = self
            .stream
            .apply(payload)
            .map_err(|InStreamError(message)| {
                DispatchError::new(
                    ErrorKind::StreamError,
                    format!(
                        "Inference error for {model} at {} (in the stream): {message}",
                        self.host.name
                    ),
                )
            })?;
        let output = applied.content.is_some() || applied.reasoning.is_some() || applied.tool_call;
        if output {
            self.ttft.get_or_insert_with(|| self.sent.elapsed());
            self.deltas += 1;
            let max = self.task.spec.body.max_tokens().unwrap_or(u64::MAX / 4);
            if self.deltas > 2 * max + 32 {
                return Err(DispatchError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{} kept streaming past max_tokens ({max}) for {model}: {} deltas; stopped it",
                        self.host.name, self.deltas
                    ),
                )
                .into());
            }
        }
        // A relayed task's client already has the raw bytes; deltas are for typed clients.
        if matches!(self.task.spec.body, TaskBody::Chat(_)) {
            if let Some(range) = applied.reasoning {
                let text = self.stream.reasoning[range].to_string();
                self.task.emit(TaskEvent::ReasoningDelta(text));
            }
            if let Some(range) = applied.content {
                let text = self.stream.text[range].to_string();
                self.task.emit(TaskEvent::Delta(text));
            }
        }
        Ok(())
    }

    /// Tells a complete answer from an aborted or truncated stream.
    fn finish(self, broken: Option<reqwest::Error>) -> Result<StreamOutput, AttemptError> {
        let host = &self.host.name;
        let model = &self.task.spec.model;
        let stream = self.stream;
        if stream.bad_payloads > 0 {
            tracing::debug!(%host, count = stream.bad_payloads, "skipped stream lines that were not JSON");
        }
        if !stream.complete() {
            let cause = broken
                .as_ref()
                .map(|b| format!(": connection lost ({})", describe(b)))
                .unwrap_or_default();
            let error = if stream.has_output() {
                DispatchError::new(
                    ErrorKind::StreamTruncated,
                    format!(
                        "Stream truncated for {model} at {host}: it ended after {} chars without \
                         [DONE] or a finish_reason{cause}; the answer is incomplete, retry",
                        stream.text.len()
                    ),
                )
            } else {
                DispatchError::new(
                    ErrorKind::StreamAborted,
                    format!(
                        "Stream aborted for {model} at {host} (no [DONE], no content){cause}; \
                         the host may have aborted a model load, retry"
                    ),
                )
            };
            // A broken connection may be a host that died: have it probed at once.
            let signal = broken.as_ref().map_or(HostSignal::Neutral, |b| {
                HostSignal::Unreachable(short_cause(b))
            });
            return Err(AttemptError {
                error,
                signal,
                retry_elsewhere: false,
            });
        }
        let tool_calls = stream.tool_calls();
        Ok(StreamOutput {
            text: stream.text,
            reasoning: Some(stream.reasoning).filter(|r| !r.is_empty()),
            tool_calls,
            finish_reason: stream.finish_reason,
            usage: stream.usage,
            ttft: self.ttft,
        })
    }
}

fn chat_url(base_url: &str) -> String {
    format!("{base_url}/v1/chat/completions")
}

/// The innermost cause, short enough for a status page ("Connection refused (os error 111)").
fn short_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A reqwest error with its causes: the top-level text alone hides "connection refused".
pub fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The host's own words for an HTTP error: `error.message`, a string `error`, or the start of the body.
fn error_detail(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body)
        && let Some(error) = value.get("error")
    {
        return sse::error_message(error);
    }
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(ERROR_BODY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_string()
}
