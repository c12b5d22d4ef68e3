//! The client for one OpenAI-compatible host (LM Studio, llama.cpp's llama-server, ...).
//!
//! `{base_url}/v1/...` is built here and nowhere else. A host's key is sent only to that host.

pub mod request;
pub mod sse;

use std::error::Error as _;
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, timeout};

use crate::config::HostConfig;
use crate::error::{DispatchError, ErrorKind};
use crate::task::{ApiKey, InferenceTask, TaskEvent, ToolCall, Usage};
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
}

/// One HTTP client for all hosts: connection pooling, and an idle timeout shorter than the
/// keep-alive of llama-server (5 s), so a pooled connection the server already closed is not
/// reused for a POST that cannot be retried.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(4))
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .expect("the HTTP client builds with static settings")
}

impl HostClient {
    pub fn new(config: &HostConfig, http: reqwest::Client) -> Self {
        Self {
            name: config.name.clone(),
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            http,
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
    pub async fn read_manifest(&self) -> Result<Vec<String>, String> {
        let response = self
            .get("/v1/models")
            .timeout(MANIFEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("bad /v1/models body: {}", describe(&e)))?;
        let Some(data) = body.get("data").and_then(Value::as_array) else {
            // LM Studio answers unknown paths with 200 and {"error": ...}.
            let why = body
                .get("error")
                .map(sse::error_message)
                .unwrap_or_else(|| {
                    "/v1/models answered without a \"data\" list: not an OpenAI-compatible server?"
                        .into()
                });
            return Err(why);
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
    /// `task.spec.timeout` bounds the wait for the first byte and every gap between bytes;
    /// the task's queue wait is not part of it. Dropping the future drops the connection,
    /// which is how a cancelled task stops the host.
    pub async fn stream_chat(&self, task: &InferenceTask) -> Result<StreamOutput, DispatchError> {
        let model = &task.spec.model;
        let body = request::chat_body(model, &task.spec.params);
        let mut request = self
            .http
            .post(format!("{}/v1/chat/completions", self.base_url))
            .json(&body);
        if let Some(key) = task.spec.api_key.as_ref().or(self.api_key.as_ref()) {
            request = request.bearer_auth(key.expose());
        }
        let limit = task.spec.timeout;
        let sent = Instant::now();
        let response = match timeout(limit, request.send()).await {
            Err(_) => {
                return Err(self.timeout_error(model, limit, "before answering"));
            }
            Ok(Err(e)) => return Err(self.connection_error(&e)),
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
            ));
        }
        if !status.is_success() {
            let detail = match timeout(limit, response.bytes()).await {
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
            return Err(error);
        }

        let mut decoder = SseDecoder::default();
        let mut stream = ChatStream::default();
        let mut payloads = Vec::new();
        let mut ttft = None;
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            // A server that ignores `stream: true` (or LM Studio's 200-with-error on unknown
            // paths) answers with one JSON document; read it as a single chunk.
            let bytes = match timeout(limit, response.bytes()).await {
                Err(_) => return Err(self.timeout_error(model, limit, "mid-answer")),
                Ok(Err(e)) => return Err(self.connection_error(&e)),
                Ok(Ok(bytes)) => bytes,
            };
            self.apply(
                task,
                &mut stream,
                &String::from_utf8_lossy(&bytes),
                sent,
                &mut ttft,
            )?;
            stream.done = stream.finish_reason.is_some() || stream.has_output();
            return self.finish(model, stream, ttft, None);
        }
        let mut response = response;
        let mut broken: Option<String> = None;
        'read: while !stream.done {
            let chunk = match timeout(limit, response.chunk()).await {
                Err(_) => {
                    let when = if ttft.is_some() {
                        "mid-stream"
                    } else {
                        "before the first token"
                    };
                    return Err(self.timeout_error(model, limit, when));
                }
                Ok(Err(e)) => {
                    broken = Some(describe(&e));
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(bytes))) => bytes,
            };
            if decoder.push(&chunk, &mut payloads).is_err() {
                return Err(DispatchError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{} sent a stream line over {} MiB for {model}; not a chat stream",
                        self.name,
                        sse::MAX_LINE_BYTES >> 20
                    ),
                ));
            }
            for payload in payloads.drain(..) {
                self.apply(task, &mut stream, &payload, sent, &mut ttft)?;
                if stream.done {
                    break 'read;
                }
            }
        }
        if !stream.done {
            decoder.finish(&mut payloads);
            for payload in payloads.drain(..) {
                self.apply(task, &mut stream, &payload, sent, &mut ttft)?;
            }
        }
        self.finish(model, stream, ttft, broken)
    }

    /// Tells a complete answer from an aborted or truncated stream.
    fn finish(
        &self,
        model: &str,
        stream: ChatStream,
        ttft: Option<Duration>,
        broken: Option<String>,
    ) -> Result<StreamOutput, DispatchError> {
        if stream.bad_payloads > 0 {
            tracing::debug!(host = %self.name, count = stream.bad_payloads, "skipped stream lines that were not JSON");
        }
        if !stream.complete() {
            let cause = broken
                .map(|b| format!(": connection lost ({b})"))
                .unwrap_or_default();
            return Err(if stream.has_output() {
                DispatchError::new(
                    ErrorKind::StreamTruncated,
                    format!(
                        "Stream truncated for {model} at {}: it ended after {} chars without [DONE] \
                         or a finish_reason{cause}; the answer is incomplete, retry",
                        self.name,
                        stream.text.len()
                    ),
                )
            } else {
                DispatchError::new(
                    ErrorKind::StreamAborted,
                    format!(
                        "Stream aborted for {model} at {} (no [DONE], no content){cause}; \
                         the host may have aborted a model load, retry",
                        self.name
                    ),
                )
            });
        }
        let tool_calls = stream.tool_calls();
        Ok(StreamOutput {
            text: stream.text,
            reasoning: Some(stream.reasoning).filter(|r| !r.is_empty()),
            tool_calls,
            finish_reason: stream.finish_reason,
            usage: stream.usage,
            ttft,
        })
    }

    fn apply(
        &self,
        task: &InferenceTask,
        stream: &mut ChatStream,
        payload: &str,
        sent: Instant,
        ttft: &mut Option<Duration>,
    ) -> Result<(), DispatchError> {
        let applied = stream.apply(payload).map_err(|InStreamError(message)| {
            DispatchError::new(
                ErrorKind::StreamError,
                format!(
                    "Inference error for {} at {} (in the stream): {message}",
                    task.spec.model, self.name
                ),
            )
        })?;
        if ttft.is_none()
            && (applied.content.is_some() || applied.reasoning.is_some() || applied.tool_call)
        {
            *ttft = Some(sent.elapsed());
        }
        if let Some(text) = applied.reasoning {
            task.emit(TaskEvent::ReasoningDelta(text));
        }
        if let Some(text) = applied.content {
            task.emit(TaskEvent::Delta(text));
        }
        Ok(())
    }

    fn timeout_error(&self, model: &str, limit: Duration, when: &str) -> DispatchError {
        DispatchError::new(
            ErrorKind::Timeout,
            format!(
                "timeout: {} sent nothing for {:.1}s {when} ({model}); raise timeout_seconds \
                 if the model is slow to load",
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
