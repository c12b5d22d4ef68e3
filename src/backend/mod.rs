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

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::HostConfig;
pub use crate::error::ManifestFailure;
use crate::error::{AttemptError, DispatchError, ErrorKind, HostSignal};
use crate::task::{ApiKey, InferenceTask, TaskBody, TaskEvent, ToolCall, Usage};
use sse::{ChatStream, HostMessage, InStreamError, SseDecoder, SseEvent};

/// How long a manifest read may take, as upstream had it.
pub const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an error body kept for the message when it is not JSON (an HTML error page);
/// a JSON error's message is kept whole.
const ERROR_BODY_BYTES: usize = 1000;

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
    /// Which residency listing the host has (see [`residency`]); learnt as it answers.
    residency: Arc<residency::ResidencyProbe>,
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
            residency: Arc::default(),
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
        // LM Studio answers unknown paths with 200 and {"error": ...}.
        if let Some(error) = sse::error_payload(&body) {
            return Err(answered(error.message));
        }
        match body.get("data") {
            Some(Value::Array(data)) => Ok(data
                .iter()
                .filter_map(|m| m.get("id").and_then(Value::as_str))
                .map(str::to_string)
                .collect()),
            // Ollama answers `{"object":"list","data":null}` when no model is pulled (a Go nil
            // slice marshals as null): a server that is up and lists nothing.
            Some(Value::Null) => Ok(Vec::new()),
            _ => Err(answered(
                "/v1/models answered without a \"data\" list: not an OpenAI-compatible server?"
                    .into(),
            )),
        }
    }

    /// Models resident in memory (loaded or loading), from whichever listing the host has:
    /// LM Studio's `/api/v1/models` or `/api/v0/models`, llama-server's router `/v1/models`
    /// `status`, Ollama's `/api/ps` (see [`residency`]). `None` when the host tells none of
    /// these (a single-model llama-server, vLLM, other servers) or the read failed.
    pub async fn read_loaded_models(&self) -> Option<Vec<String>> {
        match self.read_residency(&self.residency).await {
            Ok(Some(r)) => {
                let mut models = r.loaded;
                models.extend(r.loading);
                Some(models)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(host = %self.name, error = %e, "residency read failed");
                None
            }
        }
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
            let (detail, said) = match timeout(limits.inactivity, response.bytes()).await {
                Ok(Ok(bytes)) => error_detail(&bytes),
                _ => (String::from("(no body)"), None),
            };
            let http = status.as_u16();
            // A 5xx whose body says the request is at fault (llama.cpp's context overflow)
            // is a refusal: retrying it, here or in the client, cannot help.
            let code = said
                .filter(|s| http >= 500 && (400..500).contains(s))
                .unwrap_or(http);
            let error = DispatchError::new(
                ErrorKind::HostError,
                format!(
                    "Inference error for {model} at {}: HTTP {http}: {detail}{}",
                    self.name,
                    refusal_hint(code)
                ),
            )
            .with_host_status(code);
            let signal = if code >= 500 {
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
            events: 0,
            head: Vec::new(),
        };
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/event-stream")
            .to_string();
        let mut relay_out = relay.then(|| RelayOut::new(content_type.clone()));
        if content_type.starts_with("application/json") {
            // A server that ignores `stream: true` (or LM Studio's 200-with-error on unknown
            // paths) answers with one JSON document; read it as a single chunk. It is read
            // whole before a byte is relayed, so an error in it reaches the client as an error
            // status, never as a 200 whose body is the host's error.
            let bytes = match timeout_at(first_byte_by, response.bytes()).await {
                Err(_) => return Err(self.first_token_timeout(model, limits.first_token).into()),
                Ok(Err(e)) => return Err(self.lost_mid_answer(&e)),
                Ok(Ok(bytes)) => bytes,
            };
            reader.apply(&String::from_utf8_lossy(&bytes))?;
            // One document arrives when the answer is whole: its arrival is no first-token
            // time, and taken as one it made every task look like a model load (the cost
            // model then priced a task at nothing and a backlog at microseconds).
            reader.ttft = None;
            reader.stream.done =
                reader.stream.finish_reason.is_some() || reader.stream.has_output();
            let output = reader.finish(None)?;
            if let Some(mut out) = relay_out {
                out.send(task, bytes);
            }
            return Ok(output);
        }

        let mut response = response;
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        let mut payloads: Vec<String> = Vec::new();
        let mut got_bytes = false;
        let mut broken: Option<reqwest::Error> = None;
        while !reader.stream.done {
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
            if reader.head.len() < ERROR_BODY_BYTES {
                let room = ERROR_BODY_BYTES - reader.head.len();
                reader
                    .head
                    .extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if decoder.push(&chunk, &mut events).is_err() {
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
            payloads.clear();
            let mut reindexed = false;
            for event in events.drain(..) {
                let payload = reader.event(event)?;
                reindexed |= payload.reindexed;
                // Kept only to re-serialise renumbered tool calls for a relayed client.
                if relay_out.is_some() {
                    payloads.push(payload.text);
                }
                if reader.stream.done {
                    break;
                }
            }
            // Parsed first (microseconds), so that an error in this chunk is not relayed as if
            // it were part of an answer; the client then sees the bytes as soon as we do.
            if let Some(out) = relay_out.as_mut() {
                // Whole events only: the bytes of an event not yet complete wait for its end.
                let complete = out.take_complete(&chunk, decoder.unfinished_bytes());
                if reindexed {
                    // Tool calls the host sent at one index go out renumbered: the events this
                    // chunk completed, re-serialised (the only case the relay changes the
                    // host's bytes).
                    let mut bytes = String::new();
                    for payload in &payloads {
                        bytes.push_str("data: ");
                        bytes.push_str(payload);
                        bytes.push_str("\n\n");
                    }
                    out.send(task, Bytes::from(bytes));
                } else {
                    out.send(task, complete);
                }
            }
        }
        if !reader.stream.done {
            decoder.finish(&mut events);
            for event in events.drain(..) {
                reader.event(event)?;
            }
        }
        let saw_done = reader.stream.done;
        let output = reader.finish(broken)?;
        if let Some(mut out) = relay_out {
            out.flush(task);
            // Complete by its finish reason, but the host closed without `[DONE]`: OpenAI
            // clients wait for it. (A blank line first, in case the host left an event open.)
            if out.event_stream && !saw_done {
                out.send(task, Bytes::from_static(b"\n\ndata: [DONE]\n\n"));
            }
        }
        Ok(output)
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

/// One event's payload, as a relayed client should get it.
struct Payload {
    text: String,
    /// `text` differs from the host's payload (renumbered tool calls).
    reindexed: bool,
}

/// Folds one stream into a [`StreamOutput`], forwarding deltas as they come.
struct StreamReader<'a> {
    host: &'a HostClient,
    task: &'a InferenceTask,
    stream: ChatStream,
    sent: Instant,
    ttft: Option<Duration>,
    /// Events decoded: none at all means the body was not an event stream.
    events: u64,
    /// The first bytes of the body, quoted when it turns out not to be an event stream.
    head: Vec<u8>,
    /// Output deltas seen: a host that streams far past `max_tokens` is broken.
    deltas: u64,
}

impl StreamReader<'_> {
    /// Folds one event in: the payload as a relayed client should get it.
    fn event(&mut self, event: SseEvent) -> Result<Payload, AttemptError> {
        self.events += 1;
        match event {
            SseEvent::Data(payload) => match self.apply(&payload)? {
                Some(fixed) => Ok(Payload {
                    text: fixed,
                    reindexed: true,
                }),
                None => Ok(Payload {
                    text: payload,
                    reindexed: false,
                }),
            },
            SseEvent::Error(value) => Err(self.in_stream_error(self.stream.error_field(&value))),
        }
    }

    /// An error the host reported inside a 200 answer.
    fn in_stream_error(&self, InStreamError(error): InStreamError) -> AttemptError {
        let model = &self.task.spec.model;
        let host = &self.host.name;
        let HostMessage { message, code } = error;
        // LM Studio's answer to a path it does not serve: the configured URL is wrong, and no
        // retry can fix that.
        if message.starts_with("Unexpected endpoint or method") {
            return DispatchError::new(
                ErrorKind::Protocol,
                format!(
                    "{host} does not serve chat completions at {}: it answered \"{message}\"; \
                     check the host's url in the configuration",
                    self.host.base_url
                ),
            )
            .into();
        }
        let error = DispatchError::new(
            ErrorKind::StreamError,
            format!(
                "Inference error for {model} at {host} (in the stream): {message}{}",
                code.map(refusal_hint).unwrap_or_default()
            ),
        );
        match code {
            Some(code) => error.with_host_status(code).into(),
            None => error.into(),
        }
    }

    /// Folds one payload in; returns it with corrected tool-call indices when it needs them.
    fn apply(&mut self, payload: &str) -> Result<Option<String>, AttemptError> {
        let model = &self.task.spec.model;
        let applied = match self.stream.apply(payload) {
            Ok(applied) => applied,
            Err(error) => return Err(self.in_stream_error(error)),
        };
        // Failed at once: the chunk that says so, and the `[DONE]` after it, are not relayed.
        if self.stream.aborted.is_some() {
            return Err(self.incomplete(None));
        }
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
        Ok(applied.reindexed)
    }

    /// Tells a complete answer from an aborted or truncated stream.
    fn finish(self, broken: Option<reqwest::Error>) -> Result<StreamOutput, AttemptError> {
        if self.stream.bad_payloads > 0 {
            tracing::debug!(host = %self.host.name, count = self.stream.bad_payloads, "skipped stream lines that were not JSON");
        }
        if !self.stream.complete() {
            return Err(self.incomplete(broken));
        }
        let stream = self.stream;
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

    /// The failure of an answer the host did not complete: cut off, given up on by the host
    /// (`finish_reason: "abort"`), or no event stream at all.
    fn incomplete(&self, broken: Option<reqwest::Error>) -> AttemptError {
        let host = &self.host.name;
        let model = &self.task.spec.model;
        let stream = &self.stream;
        let cause = match (&broken, &stream.aborted) {
            (Some(b), _) => format!(": connection lost ({})", describe(b)),
            (None, Some(reason)) => format!(
                ": the host ended it with finish_reason \"{reason}\", which says it gave up on \
                 the request (vLLM does when its engine pauses, shuts down or aborts it)"
            ),
            (None, None) => String::new(),
        };
        let (missing, nothing) = match stream.aborted {
            Some(_) => ("", "no content"),
            None => (
                " without [DONE] or a finish_reason",
                "no [DONE], no content",
            ),
        };
        let error = if stream.has_output() {
            DispatchError::new(
                ErrorKind::StreamTruncated,
                format!(
                    "Stream truncated for {model} at {host}: it ended after {} chars{missing}\
                     {cause}; the answer is incomplete, retry",
                    stream.text.len()
                ),
            )
        } else if self.events == 0 && !self.head.is_empty() {
            // A 200 whose body is no event stream at all (a proxy's error page, a server
            // that is not OpenAI-compatible): its own words say more than "no content".
            let head = String::from_utf8_lossy(&self.head);
            DispatchError::new(
                ErrorKind::StreamAborted,
                format!(
                    "Stream aborted for {model} at {host} ({nothing}){cause}: it answered \
                     HTTP 200 with a body that is not an event stream, starting {:?}; check \
                     that the host's url leads to an OpenAI-compatible server",
                    head.trim()
                ),
            )
        } else {
            DispatchError::new(
                ErrorKind::StreamAborted,
                format!(
                    "Stream aborted for {model} at {host} ({nothing}){cause}; the host may have \
                     aborted a model load, retry"
                ),
            )
        };
        // A broken connection may be a host that died: have it probed at once.
        let signal = broken.as_ref().map_or(HostSignal::Neutral, |b| {
            HostSignal::Unreachable(short_cause(b))
        });
        AttemptError {
            error,
            signal,
            retry_elsewhere: false,
        }
    }
}

/// What a relayed task's client is sent of the host's answer: whole lines, each only after it
/// was parsed. A line cut by a failure is never sent, so an error event the front door appends
/// starts on a line of its own instead of being glued onto half a chunk; and the client's
/// response starts ([`TaskEvent::Answer`]) only with the first line, so a host that fails
/// before its first line (llama.cpp's context-size error, a first-token timeout) reaches the
/// client as an error status.
struct RelayOut {
    content_type: String,
    /// The host answers with an event stream (a streamed request), not one JSON body.
    event_stream: bool,
    answered: bool,
    /// Bytes of an event not yet complete, held until it is.
    tail: BytesMut,
}

impl RelayOut {
    fn new(content_type: String) -> Self {
        Self {
            event_stream: content_type.starts_with("text/event-stream"),
            content_type,
            answered: false,
            tail: BytesMut::new(),
        }
    }

    /// The bytes that end whole events once `chunk` is added: everything held and received
    /// but the last `unfinished` bytes, which stay held.
    fn take_complete(&mut self, chunk: &Bytes, unfinished: usize) -> Bytes {
        if self.tail.is_empty() && unfinished == 0 {
            return chunk.clone(); // the usual case: whole events, no copy
        }
        self.tail.extend_from_slice(chunk);
        let complete = self.tail.len().saturating_sub(unfinished);
        self.tail.split_to(complete).freeze()
    }

    /// The answer is complete: whatever is held back goes out too.
    fn flush(&mut self, task: &InferenceTask) {
        let rest = self.tail.split().freeze();
        self.send(task, rest);
    }

    fn send(&mut self, task: &InferenceTask, bytes: Bytes) {
        if !self.answered {
            self.answered = true;
            task.emit(TaskEvent::Answer {
                content_type: std::mem::take(&mut self.content_type),
            });
        }
        if !bytes.is_empty() {
            task.emit(TaskEvent::Bytes(bytes));
        }
    }
}

/// What a host's 4xx means for the caller, appended to the host's message.
fn refusal_hint(status: u16) -> &'static str {
    match status {
        408 | 429 => " (the host is busy; retry later)",
        400..=499 => {
            " (the host refuses this request as it is; retrying the same request will not help)"
        }
        _ => "",
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

/// The host's own words for an HTTP error, whole, from any of the shapes servers use (see
/// [`sse::host_message`]), or the start of a body that is not JSON; and the status the body
/// itself gives the error, if any.
fn error_detail(body: &[u8]) -> (String, Option<u16>) {
    if let Ok(value) = serde_json::from_slice::<Value>(body)
        && let Some(error) = sse::host_message(&value)
    {
        return (error.message, error.code);
    }
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(ERROR_BODY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].trim().to_string(), None)
}
