//! `prix-dispatch stdio --connect URL`: a launch on one machine joins the fleet's daemon on
//! another.
//!
//! The GPUs of a fleet sit on LAN workstations, and exactly one daemon may schedule them (one
//! owner per host). An agent host on a laptop still launches MCP servers as child processes
//! speaking newline-delimited JSON-RPC on stdin/stdout, so this launch bridges that to the
//! daemon's `/mcp` endpoint (MCP Streamable HTTP). It holds no queue.
//!
//! It behaves like the local bridge (`bridge.rs`): every request is its own POST, so calls run
//! concurrently and their progress notifications arrive as they are sent; `notifications/cancelled`
//! is forwarded and the call's stream dropped; closing stdin (or SIGTERM/SIGINT) cancels the
//! calls in flight, drops their streams and ends the session (DELETE), so the daemon stops this
//! client's tasks at once. If the daemon goes away, the
//! calls in flight fail with an error naming it, and the next call re-initialises the session
//! by replaying the client's handshake (also when the daemon answers 404 for a session it no
//! longer knows: restarted, or the session expired).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_util::sync::CancellationToken;
use url::Url;

/// The environment variable that holds the bearer token for the daemon.
pub const TOKEN_ENV: &str = "PRIX_DISPATCH_TOKEN";

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// Streamable HTTP requires a client to accept both answer forms on every POST.
const ACCEPTS: &str = "application/json, text/event-stream";
/// The first protocol revision without sessions, whose requests carry their version in
/// `_meta` and name their method in headers.
const STATELESS_VERSION: &str = "2026-07-28";
const PROTOCOL_VERSION_META: &str = "/params/_meta/io.modelcontextprotocol~1protocolVersion";

/// A LAN connect is quick or not happening; a longer wait only delays the error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon sends an SSE keep-alive every 15 s while a call runs, so this much silence means
/// its machine is gone (powered off, cable out: no RST ever comes).
const SILENCE_LIMIT: Duration = Duration::from_secs(90);
/// Notifications and the final DELETE must not hold up the session or the exit for long.
const SHORT_EXCHANGE: Duration = Duration::from_secs(10);

/// What can go wrong between this launch and the daemon. A bad URL or token stops the launch;
/// everything else becomes the JSON-RPC error of the request that ran into it.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url:?} is not a daemon URL: {why}; expected e.g. http://workstation:8765")]
    BadUrl { url: String, why: String },
    #[error(
        "PRIX_DISPATCH_TOKEN holds characters an HTTP header cannot carry (a line break?): set \
         it to the token the daemon's auth_token_env names"
    )]
    BadToken,
    #[error(
        "{url}: this build of prix-dispatch speaks plain http only; reach the daemon with \
         http:// on the LAN, or through an SSH tunnel"
    )]
    NoTls { url: Url },
    #[error(
        "cannot reach the prix-dispatch daemon at {url}: {why}; is `prix-dispatch serve` running \
         there, and does its [server] listen / allowed_hosts admit this machine?"
    )]
    Unreachable { url: Url, why: String },
    #[error(
        "the daemon at {url} refused the token: set PRIX_DISPATCH_TOKEN to the token its \
         auth_token_env names"
    )]
    TokenRefused { url: Url },
    #[error(
        "the daemon at {url} refused the request without a token: PRIX_DISPATCH_TOKEN is not set; \
         set it to the token its auth_token_env names"
    )]
    TokenMissing { url: Url },
    #[error(
        "the daemon at {url} does not accept the name this machine reached it by ({host}): add \
         it to the daemon's [server] allowed_hosts"
    )]
    HostNotAllowed { url: Url, host: String },
    #[error(
        "{url} answered HTTP 404: no MCP endpoint there; give the address of `prix-dispatch \
         serve` (its [server] listen)"
    )]
    NoEndpoint { url: Url },
    #[error("the prix-dispatch daemon at {url} went away while this call ran; retry")]
    WentAway { url: Url },
    #[error("the daemon at {url} answered HTTP {status}: {body}")]
    Http { url: Url, status: u16, body: String },
    #[error("the daemon at {url} answered something this bridge cannot use: {why}")]
    Protocol { url: Url, why: String },
    #[error("stdin/stdout failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the daemon is, and the token to show it.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    endpoint: Url,
    /// Marked sensitive, so that `Debug` prints "Sensitive" and never the token.
    token: Option<HeaderValue>,
}

impl RemoteSpec {
    /// The daemon at `url` (`http://host:port`, with or without a trailing `/` or `/mcp`) with
    /// an optional bearer token.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, RemoteError> {
        let endpoint = endpoint(url)?;
        let token = match token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| RemoteError::BadToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self { endpoint, token })
    }

    /// The daemon at `url`, with the token from `PRIX_DISPATCH_TOKEN` when it is set.
    pub fn from_env(url: &str) -> Result<Self, RemoteError> {
        Self::new(url, std::env::var(TOKEN_ENV).ok())
    }

    /// The daemon's MCP endpoint (`…/mcp`).
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }
}

/// The `/mcp` endpoint for a base URL given with or without a trailing `/` or `/mcp`. A path
/// prefix (a reverse proxy's) is kept.
pub fn endpoint(raw: &str) -> Result<Url, RemoteError> {
    let bad = |why: String| RemoteError::BadUrl {
        url: raw.to_string(),
        why,
    };
    let mut url = Url::parse(raw.trim()).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("it must start with http:// or https://".into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host name".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment".into()));
    }
    let path = url.path().trim_end_matches('/');
    let base = path.strip_suffix("/mcp").unwrap_or(path).to_string();
    url.set_path(&format!("{base}/mcp"));
    if url.scheme() == "https" {
        // reqwest is built without TLS (no C toolchain or certificate store needed): say so
        // at launch instead of failing every call.
        return Err(RemoteError::NoTls { url });
    }
    Ok(url)
}

/// The session the daemon gave this client, and a counter of sessions so that concurrent
/// calls that all find the old one gone re-initialise once.
#[derive(Debug, Clone, Default)]
struct Session {
    id: Option<HeaderValue>,
    /// The protocol version the handshake negotiated, sent on every later request.
    version: Option<String>,
    /// An initialize succeeded and nothing since says the daemon forgot it.
    established: bool,
    epoch: u64,
}

/// The client's handshake, replayed to a daemon that no longer knows the session.
#[derive(Default)]
struct Handshake {
    initialize: Option<String>,
    initialized: Option<String>,
}

/// A request whose answer is still expected; cancelling the token drops its stream.
struct InFlight {
    seq: u64,
    /// The request's JSON-RPC id; `None` for `initialize`, which must not be cancelled.
    cancellable: Option<Value>,
    stop: CancellationToken,
}

enum Sent {
    Answer(reqwest::Response),
    /// 404 for the session id sent: the daemon restarted, or the session expired.
    SessionGone,
}

struct Bridge {
    http: reqwest::Client,
    spec: RemoteSpec,
    out: mpsc::UnboundedSender<String>,
    /// Held across a handshake, so that calls wait for the session instead of racing it.
    session: Arc<tokio::sync::Mutex<Session>>,
    handshake: Mutex<Handshake>,
    in_flight: Mutex<(u64, HashMap<String, InFlight>)>,
}

/// Relays stdin/stdout to the daemon at `spec` until the client closes stdin.
pub async fn run(spec: RemoteSpec) -> Result<(), RemoteError> {
    let (out, out_rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(write_lines(out_rx));
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(SILENCE_LIMIT)
        // One connection per POST: a pooled connection to a daemon that has since restarted
        // would fail the next call, and a resend could run a completion twice. On a LAN a
        // connect costs well under a millisecond.
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| RemoteError::Protocol {
            url: spec.endpoint.clone(),
            why: format!("cannot build the HTTP client: {e}"),
        })?;
    tracing::info!(url = %spec.endpoint, token = spec.token.is_some(), "joining the prix-dispatch daemon");
    let bridge = Arc::new(Bridge {
        http,
        spec,
        out,
        session: Arc::default(),
        handshake: Mutex::default(),
        in_flight: Mutex::default(),
    });
    let mut lines = BufReader::new(crate::stdio::stdin()).lines();
    // A host may stop its MCP servers with a signal rather than by closing stdin. A closed
    // TCP connection does not end an HTTP session the way a closed socket ends a local one,
    // so leave the same way as at end of input.
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ended = loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            _ = signalled(&mut terminate) => {
                tracing::info!("signal received: leaving the daemon's session");
                break Ok(());
            }
        };
        match line {
            Ok(Some(line)) => bridge.accept(line).await,
            Ok(None) => break Ok(()),
            Err(e) => break Err(RemoteError::Io(e)),
        }
    };
    bridge.close().await;
    drop(bridge);
    // Calls just cancelled may still hold the writer's channel for a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    ended
}

/// SIGTERM or SIGINT.
async fn signalled(terminate: &mut Option<tokio::signal::unix::Signal>) {
    let term = async {
        match terminate {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn write_lines(mut lines: mpsc::UnboundedReceiver<String>) {
    let mut stdout = crate::stdio::stdout();
    while let Some(mut line) = lines.recv().await {
        line.push('\n');
        if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
            break;
        }
    }
}

impl Bridge {
    /// Handles one line from the client. Requests run in their own task (one POST each);
    /// notifications are delivered before the next line is read, so that they reach the
    /// daemon in the order the client sent them (`initialized` before the first call).
    async fn accept(self: &Arc<Self>, line: String) {
        if line.trim().is_empty() {
            return;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(Value::Object(m)) => Value::Object(m),
            Ok(_) => {
                self.reply_error(
                    &Value::Null,
                    -32600,
                    "expected one JSON-RPC message per line",
                );
                return;
            }
            Err(e) => {
                self.reply_error(&Value::Null, -32700, &format!("parse error: {e}"));
                return;
            }
        };
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let id = message.get("id").filter(|_| method.is_some()).cloned();
        match (method.as_deref(), id) {
            (Some("initialize"), Some(id)) => {
                {
                    let mut handshake = lock(&self.handshake);
                    handshake.initialize = Some(line.clone());
                    handshake.initialized = None;
                }
                // Taken here, before the next line is read: whatever the client sends next
                // waits for this session.
                let session = self.session.clone().lock_owned().await;
                self.spawn_call(line, message, id, Some(session));
            }
            (Some(_), Some(id)) => self.spawn_call(line, message, id, None),
            (Some("notifications/initialized"), None) => {
                lock(&self.handshake).initialized = Some(line.clone());
                self.notify(&line, &message).await;
            }
            (Some("notifications/cancelled"), None) => self.cancel(&line, &message).await,
            // Other notifications, and the client's answers to the daemon's requests.
            _ => self.notify(&line, &message).await,
        }
    }

    /// Runs one request in its own task, tracked until it is answered or cancelled.
    /// `initialize` carries the session lock taken for it.
    fn spawn_call(
        self: &Arc<Self>,
        line: String,
        message: Value,
        id: Value,
        initialize: Option<OwnedMutexGuard<Session>>,
    ) {
        let key = id.to_string();
        let stop = CancellationToken::new();
        let seq = {
            let mut in_flight = lock(&self.in_flight);
            in_flight.0 += 1;
            let seq = in_flight.0;
            let entry = InFlight {
                seq,
                cancellable: initialize.is_none().then(|| id.clone()),
                stop: stop.clone(),
            };
            if in_flight.1.insert(key.clone(), entry).is_some() {
                tracing::warn!(id = %key, "the client reused the id of a request still in flight");
            }
            seq
        };
        let bridge = self.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = bridge.exchange(initialize, &line, &message, &id) => Some(outcome),
                _ = stop.cancelled() => None,
            };
            // Still ours unless the client cancelled it (or reused its id).
            let wanted = {
                let mut in_flight = lock(&bridge.in_flight);
                let ours = in_flight.1.get(&key).is_some_and(|e| e.seq == seq);
                if ours {
                    in_flight.1.remove(&key);
                }
                ours
            };
            if let (Some(Err(e)), true) = (outcome, wanted) {
                tracing::warn!(id = %key, error = %e, "call failed");
                bridge.reply_error(&id, -32603, &e.to_string());
            }
        });
    }

    /// One request: the client's `initialize` (with the session lock taken for it), or
    /// anything else.
    async fn exchange(
        &self,
        initialize: Option<OwnedMutexGuard<Session>>,
        line: &str,
        message: &Value,
        id: &Value,
    ) -> Result<(), RemoteError> {
        match initialize {
            Some(session) => self.client_initialize(session, line, message, id).await,
            None => self.call(line, message, id).await,
        }
    }

    /// A request other than `initialize`: POST it and relay its answer stream.
    async fn call(&self, line: &str, message: &Value, id: &Value) -> Result<(), RemoteError> {
        let response = self.send_in_session(line, message).await?;
        match self.relay(response, id, false).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(self.went_away()),
            Err(e) => Err(e),
        }
    }

    /// The client's own `initialize`: a new session, whose answer the client sees.
    async fn client_initialize(
        &self,
        mut session: OwnedMutexGuard<Session>,
        line: &str,
        message: &Value,
        id: &Value,
    ) -> Result<(), RemoteError> {
        if let Some(old) = session.id.take() {
            self.spawn_delete(old);
        }
        let epoch = session.epoch + 1;
        *session = Session {
            epoch,
            ..Session::default()
        };
        let fresh = self.initialize(line, message, id, false).await?;
        *session = Session { epoch, ..fresh };
        Ok(())
    }

    /// Sends an `initialize` and reads its answer; the session it opened if it succeeded.
    /// `replay` swallows the answer (the client had its own long ago).
    async fn initialize(
        &self,
        line: &str,
        message: &Value,
        id: &Value,
        replay: bool,
    ) -> Result<Session, RemoteError> {
        let request = self.post(line, message, &Session::default());
        let Sent::Answer(response) = self.send(request, false).await? else {
            unreachable!("no session id was sent")
        };
        let id_header = response.headers().get(SESSION_HEADER).cloned();
        let answer = self
            .relay(response, id, replay)
            .await?
            .ok_or_else(|| self.went_away())?;
        if let Some(error) = answer.get("error") {
            if replay {
                return Err(self.protocol(format!("it refused the replayed initialize: {error}")));
            }
            // The client got the daemon's own error; there is no session.
            return Ok(Session::default());
        }
        let version = answer
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Session {
            id: id_header,
            version,
            established: true,
            epoch: 0,
        })
    }

    /// POSTs a message in the current session, re-initialising it first when the daemon has
    /// forgotten it (a 404) or it was never opened (the daemon was down at the handshake).
    async fn send_in_session(
        &self,
        line: &str,
        message: &Value,
    ) -> Result<reqwest::Response, RemoteError> {
        let mut renewed = false;
        loop {
            let session = self.ready_session().await?;
            let request = self.post(line, message, &session);
            match self.send(request, session.id.is_some()).await? {
                Sent::Answer(response) => return Ok(response),
                Sent::SessionGone if !renewed => {
                    tracing::info!(url = %self.spec.endpoint, "the daemon no longer knows this session (restarted, or it expired): re-initialising");
                    renewed = true;
                    self.forget(session.epoch).await;
                }
                Sent::SessionGone => {
                    return Err(self.protocol(
                        "it did not know the session it had just opened (HTTP 404)".into(),
                    ));
                }
            }
        }
    }

    /// The session to send in, after replaying the handshake if there is one to replay and
    /// no live session.
    async fn ready_session(&self) -> Result<Session, RemoteError> {
        let mut session = self.session.lock().await;
        if session.established {
            return Ok(session.clone());
        }
        let (initialize, initialized) = {
            let handshake = lock(&self.handshake);
            (handshake.initialize.clone(), handshake.initialized.clone())
        };
        // A client of the stateless protocol revision has no handshake: nothing to replay.
        let Some(initialize) = initialize else {
            return Ok(session.clone());
        };
        let message: Value = serde_json::from_str(&initialize).unwrap_or_default();
        let id = message.get("id").cloned().unwrap_or_default();
        let epoch = session.epoch + 1;
        let fresh = self.initialize(&initialize, &message, &id, true).await?;
        *session = Session { epoch, ..fresh };
        if let Some(initialized) = initialized {
            let message: Value = serde_json::from_str(&initialized).unwrap_or_default();
            let request = self.post(&initialized, &message, &session);
            if let Sent::SessionGone = self.send(request, true).await? {
                session.established = false;
                return Err(self
                    .protocol("it did not know the session it had just opened (HTTP 404)".into()));
            }
        }
        tracing::info!(url = %self.spec.endpoint, "re-initialised the session (replayed the client's handshake)");
        Ok(session.clone())
    }

    /// Marks the session of `epoch` dead, unless another call has already replaced it.
    async fn forget(&self, epoch: u64) {
        let mut session = self.session.lock().await;
        if session.epoch == epoch {
            session.established = false;
            session.id = None;
        }
    }

    /// Delivers a notification (or an answer to a daemon's request); failures are only logged,
    /// as there is no request to answer.
    async fn notify(&self, line: &str, message: &Value) {
        let delivered =
            tokio::time::timeout(SHORT_EXCHANGE, self.send_in_session(line, message)).await;
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("a response");
        match delivered {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(method, error = %e, "could not deliver a notification"),
            Err(_) => {
                tracing::warn!(method, url = %self.spec.endpoint, "the daemon did not take a notification in time")
            }
        }
    }

    /// Forwards `notifications/cancelled`, then drops the call's stream: the daemon stops the
    /// task either way (the 2026-07-28 protocol cancels by closing the stream alone), and the
    /// client expects no answer.
    async fn cancel(&self, line: &str, message: &Value) {
        let call = message
            .pointer("/params/requestId")
            .map(Value::to_string)
            .and_then(|key| lock(&self.in_flight).1.remove(&key));
        self.notify(line, message).await;
        if let Some(call) = call {
            call.stop.cancel();
        }
    }

    /// The client closed stdin: cancel its calls, drop every open stream and end the session,
    /// so that the daemon stops this client's tasks at once and forgets it.
    async fn close(&self) {
        let open: Vec<InFlight> = lock(&self.in_flight).1.drain().map(|(_, c)| c).collect();
        // Each call is cancelled explicitly: a closed stream does not stop a call of a
        // session, and rmcp lets a closed session's calls run on for seconds before it stops
        // them. The session lock is not needed (and an initialize in flight holds it).
        let session = self
            .session
            .try_lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if session.established {
            let cancels = open
                .iter()
                .filter_map(|call| call.cancellable.as_ref())
                .map(|id| {
                    let message = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                    "params": {"requestId": id, "reason": "the client closed its connection"}});
                    let request = self.post(&message.to_string(), &message, &session);
                    async move {
                        let _ = request.timeout(SHORT_EXCHANGE).send().await;
                    }
                });
            futures::future::join_all(cancels).await;
        }
        for call in open {
            call.stop.cancel();
        }
        let Ok(session) = tokio::time::timeout(SHORT_EXCHANGE, self.session.lock()).await else {
            return;
        };
        if let Some(id) = session.id.clone() {
            self.delete(id).await;
        }
    }

    fn spawn_delete(&self, id: HeaderValue) {
        let request = self.delete_request(id);
        tokio::spawn(async move {
            let _ = request.send().await;
        });
    }

    async fn delete(&self, id: HeaderValue) {
        match self.delete_request(id).send().await {
            Ok(response) => tracing::debug!(status = %response.status(), "ended the session"),
            Err(e) => tracing::debug!(error = %e, "could not end the session"),
        }
    }

    fn delete_request(&self, id: HeaderValue) -> reqwest::RequestBuilder {
        self.authorised(self.http.delete(self.spec.endpoint.clone()))
            .header(SESSION_HEADER, id)
            .timeout(SHORT_EXCHANGE)
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.spec.token {
            Some(token) => request.header(AUTHORIZATION, token.clone()),
            None => request,
        }
    }

    /// The POST of one message with the session's headers.
    fn post(&self, line: &str, message: &Value, session: &Session) -> reqwest::RequestBuilder {
        let mut request = self
            .authorised(self.http.post(self.spec.endpoint.clone()))
            .header(ACCEPT, ACCEPTS)
            .header(CONTENT_TYPE, "application/json")
            .body(line.to_string());
        if let Some(id) = &session.id {
            request = request.header(SESSION_HEADER, id.clone());
        }
        for (name, value) in protocol_headers(message, session.version.as_deref()) {
            request = request.header(name, value);
        }
        request
    }

    /// Sends, and turns every HTTP-level failure into the error the client should read.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        with_session: bool,
    ) -> Result<Sent, RemoteError> {
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Sent::Answer(response));
        }
        if status == StatusCode::NOT_FOUND && with_session {
            return Ok(Sent::SessionGone);
        }
        let url = self.spec.endpoint.clone();
        let body = response.text().await.unwrap_or_default();
        Err(match status {
            // rmcp answers 403 for a Host header outside [server] allowed_hosts.
            StatusCode::FORBIDDEN if body.contains("Host header") => RemoteError::HostNotAllowed {
                host: url.host_str().unwrap_or_default().to_string(),
                url,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.spec.token.is_none() => {
                RemoteError::TokenMissing { url }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RemoteError::TokenRefused { url },
            StatusCode::NOT_FOUND => RemoteError::NoEndpoint { url },
            _ => RemoteError::Http {
                url,
                status: status.as_u16(),
                body: body
                    .chars()
                    .take(300)
                    .collect::<String>()
                    .trim()
                    .to_string(),
            },
        })
    }

    /// Reads one POST's answer, writing every message in it to stdout except `id`'s answer
    /// when `swallow`; returns `id`'s answer, or `None` if the answer ended without it.
    async fn relay(
        &self,
        response: reqwest::Response,
        id: &Value,
        swallow: bool,
    ) -> Result<Option<Value>, RemoteError> {
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            let mut events = SseParser::default();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    tracing::debug!(error = %e, "the daemon's stream broke");
                    self.went_away()
                })?;
                for data in events.feed(&chunk) {
                    match serde_json::from_str::<Value>(&data) {
                        Ok(message) if !is_json_rpc(&message) => {
                            tracing::warn!(event = %data, "skipped an event that is not JSON-RPC");
                        }
                        Ok(message) => {
                            if let Some(answer) = self.deliver(message, Some(data), id, swallow) {
                                return Ok(Some(answer));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "skipped an event that is not JSON"),
                    }
                }
            }
            Ok(None)
        } else if content_type.starts_with("application/json") {
            let bytes = response.bytes().await.map_err(|_| self.went_away())?;
            let messages = match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Array(batch)) => batch,
                Ok(message) => vec![message],
                Err(e) => {
                    return Err(self.protocol(format!("a JSON answer that does not parse: {e}")));
                }
            };
            // Another HTTP server at this address (LM Studio answers 200 with its own error
            // object to any path): nothing of it may reach stdout.
            if !messages.iter().all(is_json_rpc) {
                let shown: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
                return Err(self.protocol(format!(
                    "an answer that is not MCP JSON-RPC ({shown}); is this the address of \
                     `prix-dispatch serve`?"
                )));
            }
            let mut answer = None;
            for message in messages {
                answer = answer.or(self.deliver(message, None, id, swallow));
            }
            Ok(answer)
        } else {
            Err(self.protocol(format!(
                "HTTP {} with content type {content_type:?} to a request",
                response.status().as_u16()
            )))
        }
    }

    /// Writes one message from the daemon to stdout (unless it is `id`'s answer and
    /// `swallow`); returns it if it is `id`'s answer.
    fn deliver(
        &self,
        message: Value,
        raw: Option<String>,
        id: &Value,
        swallow: bool,
    ) -> Option<Value> {
        let is_answer = message.get("method").is_none() && message.get("id") == Some(id);
        if !(is_answer && swallow) {
            // stdout is line-delimited: a message spread over several data: lines is re-encoded.
            let line = match raw {
                Some(raw) if !raw.contains('\n') => raw,
                _ => message.to_string(),
            };
            let _ = self.out.send(line);
        }
        is_answer.then_some(message)
    }

    fn reply_error(&self, id: &Value, code: i64, message: &str) {
        let line = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
        let _ = self.out.send(line.to_string());
    }

    fn went_away(&self) -> RemoteError {
        RemoteError::WentAway {
            url: self.spec.endpoint.clone(),
        }
    }

    fn protocol(&self, why: String) -> RemoteError {
        RemoteError::Protocol {
            url: self.spec.endpoint.clone(),
            why,
        }
    }

    /// A failed send: no connection at all, or one lost before the daemon answered.
    fn transport(&self, e: &reqwest::Error) -> RemoteError {
        if e.is_connect() {
            RemoteError::Unreachable {
                url: self.spec.endpoint.clone(),
                why: cause(e),
            }
        } else {
            tracing::debug!(error = %e, "lost the connection before the daemon answered");
            self.went_away()
        }
    }
}

fn is_json_rpc(message: &Value) -> bool {
    message.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
}

/// The innermost cause of a connection failure, in words ("connection refused").
fn cause(e: &reqwest::Error) -> String {
    let mut innermost = e.to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            // An OS error's kind reads better than "Connection refused (os error 111)".
            return if io.raw_os_error().is_some() {
                io.kind().to_string()
            } else {
                io.to_string()
            };
        }
        innermost = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())
    } else {
        innermost
    }
}

/// `MCP-Protocol-Version` (the request's own, in the stateless revision, else the negotiated
/// one), and in the stateless revision the `Mcp-Method` / `Mcp-Name` headers it requires.
fn protocol_headers(message: &Value, negotiated: Option<&str>) -> Vec<(&'static str, HeaderValue)> {
    let own = message
        .pointer(PROTOCOL_VERSION_META)
        .and_then(Value::as_str);
    let Some(version) = own.or(negotiated) else {
        return Vec::new();
    };
    let mut headers = Vec::new();
    if let Ok(value) = HeaderValue::from_str(version) {
        headers.push((VERSION_HEADER, value));
    }
    // Version strings are dates: they compare as text.
    if version >= STATELESS_VERSION
        && let Some(method) = message.get("method").and_then(Value::as_str)
    {
        if let Ok(value) = HeaderValue::from_str(method) {
            headers.push(("mcp-method", value));
        }
        let key = match method {
            "tools/call" | "prompts/get" => Some("name"),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
            "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
            _ => None,
        };
        let name = key.and_then(|k| message.get("params")?.get(k)?.as_str());
        // Names that need the Base64 header form are left out; none of ours do.
        if let Some(name) = name.filter(|n| n.bytes().all(|b| (0x21..0x7f).contains(&b)))
            && let Ok(value) = HeaderValue::from_str(name)
        {
            headers.push(("mcp-name", value));
        }
    }
    headers
}

/// Splits a `text/event-stream` body into the data of its events. Comments (keep-alives) and
/// the `id:`, `retry:` and `event:` fields are dropped, and so are events without data (rmcp
/// primes each stream with one).
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds the next bytes of the body; returns the data of every event they complete.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            // A line is complete here, so a character split across chunks is whole again.
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if line.is_empty() {
                if std::mem::take(&mut self.has_data) && !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
                self.data.clear();
            } else if let Some(value) = line.strip_prefix("data") {
                let value = match value.strip_prefix(':') {
                    Some(v) => v.strip_prefix(' ').unwrap_or(v),
                    None if value.is_empty() => "",
                    // "database: x" is another field.
                    None => continue,
                };
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
        }
        events
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_the_base_url_with_or_without_mcp() {
        for raw in [
            "http://gpu-box:8765",
            "http://gpu-box:8765/",
            "http://gpu-box:8765/mcp",
            "http://gpu-box:8765/mcp/",
            " http://gpu-box:8765 ",
        ] {
            assert_eq!(
                endpoint(raw).unwrap().as_str(),
                "http://gpu-box:8765/mcp",
                "{raw}"
            );
        }
        assert_eq!(
            endpoint("http://proxy/fleet/").unwrap().as_str(),
            "http://proxy/fleet/mcp"
        );
    }

    #[test]
    fn endpoint_rejects_what_cannot_be_a_daemon() {
        for raw in [
            "gpu-box:8765",
            "ftp://gpu-box/",
            "http://gpu-box/?a=1",
            "nonsense",
        ] {
            let e = endpoint(raw).unwrap_err();
            assert!(matches!(e, RemoteError::BadUrl { .. }), "{raw}: {e}");
            assert!(e.to_string().contains("http://workstation:8765"), "{e}");
        }
        let e = endpoint("https://gpu-box:8765").unwrap_err();
        assert!(matches!(e, RemoteError::NoTls { .. }), "{e}");
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let spec = RemoteSpec::new("http://gpu-box:8765", Some("s3cret-value".into())).unwrap();
        let printed = format!("{spec:?}");
        assert!(!printed.contains("s3cret-value"), "{printed}");
        assert!(spec.token.is_some());
        let none = RemoteSpec::new("http://gpu-box:8765", Some(String::new())).unwrap();
        assert!(none.token.is_none(), "an empty variable is no token");
        let bad = RemoteSpec::new("http://gpu-box:8765", Some("a\nb".into())).unwrap_err();
        assert!(matches!(bad, RemoteError::BadToken), "{bad}");
        assert!(bad.to_string().contains(TOKEN_ENV), "{bad}");
        assert!(!bad.to_string().contains("a\nb"));
    }

    #[test]
    fn sse_events_across_chunks_without_priming_and_keepalives() {
        let mut p = SseParser::default();
        let body = "id: 0\nretry: 3000\ndata:\n\n: keep-alive\n\ndata: {\"a\":1}\nid: 1/0\n\n\
                    data: {\"b\":\r\ndata: \"é\"}\r\n\r\nevent: message\ndata:{\"c\":3}\n\n";
        let mut events = Vec::new();
        // One byte at a time: every boundary, including inside the two-byte "é".
        for byte in body.as_bytes() {
            events.extend(p.feed(std::slice::from_ref(byte)));
        }
        assert_eq!(events, ["{\"a\":1}", "{\"b\":\n\"é\"}", "{\"c\":3}"]);
        // An event cut off before its blank line is not delivered.
        assert!(p.feed(b"data: {\"d\":4}\n").is_empty());
    }

    #[test]
    fn stateless_requests_carry_their_version_and_method_headers() {
        let legacy = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "complete", "arguments": {}}});
        let headers = protocol_headers(&legacy, Some("2025-06-18"));
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0, VERSION_HEADER);
        assert_eq!(headers[0].1, "2025-06-18");
        assert!(protocol_headers(&legacy, None).is_empty());

        let stateless = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "complete", "arguments": {},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let headers: Vec<(&str, String)> = protocol_headers(&stateless, None)
            .into_iter()
            .map(|(n, v)| (n, v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            headers,
            [
                (VERSION_HEADER, "2026-07-28".to_string()),
                ("mcp-method", "tools/call".to_string()),
                ("mcp-name", "complete".to_string())
            ]
        );
    }

    #[test]
    fn errors_name_the_url_and_the_fix() {
        let url = endpoint("http://gpu-box:8765").unwrap();
        let refused = RemoteError::Unreachable {
            url: url.clone(),
            why: "connection refused".into(),
        }
        .to_string();
        assert!(refused.starts_with(
            "cannot reach the prix-dispatch daemon at http://gpu-box:8765/mcp: connection refused; \
             is `prix-dispatch serve` running there"
        ), "{refused}");
        let gone = RemoteError::WentAway { url: url.clone() }.to_string();
        assert_eq!(
            gone,
            "the prix-dispatch daemon at http://gpu-box:8765/mcp went away while this call ran; retry"
        );
        let token = RemoteError::TokenRefused { url }.to_string();
        assert!(token.contains("set PRIX_DISPATCH_TOKEN"), "{token}");
    }
}
