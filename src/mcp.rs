//! The MCP tool server: `complete_stream`, `complete`, `list_models`, `dispatch_status`.
//!
//! Names, parameters and defaults are prompt-prix's, so it can switch over unchanged. Every
//! call goes through the one [`Dispatcher`]; concurrent calls on one session share its queue.

use std::collections::BTreeMap;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::JsonObject;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    CreateTaskResult, DetailedTask, GetTaskParams, GetTaskResult, Implementation,
    ServerCapabilities, ServerConfig, Task, TaskPayload, TaskStatus,
};
use rmcp::service::{NotificationContext, Peer, RequestContext};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::marker::PhantomData;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

use crate::clients::ClientGuard;
use crate::dispatcher::{Dispatcher, HostStatus};
use crate::error::DispatchError;
use crate::error::ErrorKind;
use crate::mcp_progress::{Phase, Progress};
use crate::mcp_tasks::{Snapshot, State, iso8601};
use crate::params;
use crate::scheduler::TaskHandle;
use crate::task::{CompletionRequest, CompletionResult, TaskEvent};
use std::sync::Arc;

#[derive(Clone)]
pub struct PrixServer {
    dispatcher: Dispatcher,
    /// The connected client this session serves (stdio, bridge, HTTP session).
    client: Arc<ClientGuard>,
    /// Fired when the client is gone: its tasks stop at once.
    gone: CancellationToken,
    /// Whose MCP tasks this session sees: its client's, or (HTTP, where a stateless request
    /// is a session of its own) anyone's who holds the task id.
    task_owner: Option<u64>,
    tool_router: ToolRouter<Self>,
}

/// `list_models` result: prompt-prix's shape plus per-host detail.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ModelList {
    /// Every model some reachable host lists, sorted, without duplicates.
    pub models: Vec<String>,
    /// Host URL to the models it lists (every configured host, possibly empty).
    pub servers: BTreeMap<String, Vec<String>>,
    /// URLs of hosts whose manifest could not be read (out of rotation).
    pub unreachable: Vec<String>,
    pub hosts: Vec<HostStatus>,
}

#[tool_router]
impl PrixServer {
    /// A Streamable HTTP session (or, in the stateless 2026-07-28 protocol, one request),
    /// listed among the clients until the session ends: at DELETE, or when it has been idle,
    /// with no call in flight, for `[server] session_idle_seconds` (see `http::sessions`).
    /// Its calls are cancelled one by one, by rmcp, when their streams close.
    pub fn for_http(dispatcher: Dispatcher) -> Self {
        let client = dispatcher.clients().connect("http", None);
        let mut server = Self::for_client(dispatcher, client, CancellationToken::new());
        server.task_owner = None;
        server
    }

    /// A session of a registered client whose tasks stop when `gone` fires.
    pub fn for_client(
        dispatcher: Dispatcher,
        client: ClientGuard,
        gone: CancellationToken,
    ) -> Self {
        Self {
            dispatcher,
            task_owner: Some(client.id()),
            client: Arc::new(client),
            gone,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Run one chat completion on the GPU fleet and stream it. The request waits in \
        the shared queue until a host that lists model_id has a free slot (never two requests on \
        one GPU), then runs there. With a progressToken you receive the queue position while \
        waiting, then each text delta as progress. Returns the full text, plus structured \
        {text, reasoning, tool_calls, finish_reason, usage, latency_ms, ttft_ms, queue_wait_ms, \
        host, model}. Errors carry kind and retryable."
    )]
    async fn complete_stream(
        &self,
        Parameters(args): Parameters<Args<CompletionRequest>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        match args.parse() {
            Ok(request) => self.run_completion(request, ctx).await,
            Err(e) => Ok(error_result(&e)),
        }
    }

    #[tool(
        description = "Run one chat completion on the GPU fleet and return its text (same \
        parameters and result as complete_stream; progress is sent only if the call carries a \
        progressToken)."
    )]
    async fn complete(
        &self,
        Parameters(args): Parameters<Args<CompletionRequest>>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        match args.parse() {
            Ok(request) => self.run_completion(request, ctx).await,
            Err(e) => Ok(error_result(&e)),
        }
    }

    #[tool(
        description = "Re-read every host's model list and return {models, servers: {url: [ids]}, \
        unreachable: [urls], hosts: [{name, url, slots, active, current_model, models, \
        loaded_models, last_error, reachable}]}. With LM Studio's JIT loading, models are all \
        downloaded models; loaded_models says what is in memory. Never fails when hosts are down: \
        they are listed as unreachable."
    )]
    async fn list_models(&self) -> Result<CallToolResult, McpError> {
        if let Err(e) = self.dispatcher.refresh_manifests().await {
            return Ok(error_result(&e));
        }
        let status = match self.dispatcher.status().await {
            Ok(s) => s,
            Err(e) => return Ok(error_result(&e)),
        };
        let mut models: Vec<String> = status
            .hosts
            .iter()
            .flat_map(|h| h.state.models.clone())
            .collect();
        models.sort();
        models.dedup();
        let list = ModelList {
            models,
            servers: status
                .hosts
                .iter()
                .map(|h| (h.url.clone(), h.state.models.clone()))
                .collect(),
            // A host that answers with an empty list (Ollama with nothing pulled) is up.
            unreachable: status
                .hosts
                .iter()
                .filter(|h| !h.reachable)
                .map(|h| h.url.clone())
                .collect(),
            hosts: status.hosts,
        };
        Ok(structured(&list, None))
    }

    #[tool(
        description = "The dispatcher's state: per host its slots, active requests, current model \
        and last error; waiting tasks per model; counters (submitted, started, completed, failed, \
        cancelled, rejected)."
    )]
    async fn dispatch_status(&self) -> Result<CallToolResult, McpError> {
        match self.dispatcher.status().await {
            Ok(status) => Ok(structured(&status, None)),
            Err(e) => Ok(error_result(&e)),
        }
    }
}

impl PrixServer {
    async fn run_completion(
        &self,
        request: CompletionRequest,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let (mut handle, model) = match self.submit(request, Some(&ctx.peer)) {
            Ok(submitted) => submitted,
            Err(refused) => return Ok(refused),
        };
        let mut progress = Progress::new(ctx.peer.clone(), ctx.meta.get_progress_token());
        // The client cancelled, or went away: dropping the handle takes the task out of the
        // queue or off its host. rmcp sends no response for a cancelled request.
        let stop = async {
            tokio::select! {
                _ = ctx.ct.cancelled() => {}
                _ = self.gone.cancelled() => {}
            }
        };
        let interval = self.dispatcher.progress_interval();
        match follow(&mut handle, &model, &mut progress, interval, stop, |_| {}).await {
            Some(outcome) => Ok(call_result(outcome)),
            None => {
                handle.cancel();
                Err(McpError::internal_error("request cancelled", None))
            }
        }
    }

    /// Checks a request and puts it in the queue: its handle and model, or the tool error
    /// that refuses it.
    fn submit(
        &self,
        request: CompletionRequest,
        peer: Option<&Peer<RoleServer>>,
    ) -> Result<(TaskHandle, String), CallToolResult> {
        let model = request.model_id.clone();
        if !request.unknown.is_empty() {
            let names: Vec<&String> = request.unknown.keys().collect();
            tracing::debug!(?names, "ignoring parameters this server does not know");
        }
        let size = request.payload_bytes();
        let limit = self.dispatcher.max_request_bytes();
        if size > limit {
            let error = DispatchError::invalid(format!(
                "request too large: {size} bytes of messages and tools, over the limit of {limit} \
                 ([server] max_request_bytes); shorten the conversation or raise the limit"
            ));
            return Err(error_result(&error));
        }
        let mut spec = request.into_spec().map_err(|e| error_result(&e))?;
        spec.client = Some(self.client.id());
        spec.client_id = format!("mcp:{}", self.client.id());
        if let Some(info) = peer.and_then(|peer| peer.peer_info()) {
            self.client.set_name(&info.client_info.name);
        }
        let handle = self.dispatcher.submit(spec).map_err(|e| error_result(&e))?;
        Ok((handle, model))
    }
}

/// Follows a submitted task to its end: sends its text deltas and phases as progress (at
/// least every `interval` while the client has a token), tells `on_phase` of every phase
/// change, and returns the outcome; `None` if `stop` resolved first (the caller cancels).
pub(crate) async fn follow(
    handle: &mut TaskHandle,
    model: &str,
    progress: &mut Progress,
    interval: Duration,
    stop: impl Future<Output = ()>,
    mut on_phase: impl FnMut(&Phase),
) -> Option<Result<CompletionResult, DispatchError>> {
    tokio::pin!(stop);
    let mut phase = Phase::Submitted;
    on_phase(&phase);
    loop {
        let keep_alive = progress.last_sent() + interval;
        let event = tokio::select! {
            biased;
            _ = &mut stop => return None,
            // Before the events: a host streaming only reasoning must not starve it.
            _ = tokio::time::sleep_until(keep_alive), if progress.wanted() => {
                progress.send(phase.message(model, Instant::now())).await;
                continue;
            }
            event = handle.next() => event,
        };
        let Some(event) = event else {
            return Some(Err(DispatchError::scheduler_stopped()));
        };
        if let Some(next) = phase.after(&event) {
            phase = next;
            on_phase(&phase);
        }
        match event {
            TaskEvent::Finished(result) => return Some(Ok(result)),
            TaskEvent::Failed(error) => return Some(Err(error)),
            TaskEvent::Delta(text) => progress.send(text).await,
            TaskEvent::Queued { .. } | TaskEvent::NoHost { .. } | TaskEvent::Started { .. } => {
                progress.send(phase.message(model, Instant::now())).await;
            }
            TaskEvent::ReasoningDelta(_) | TaskEvent::Answer { .. } | TaskEvent::Bytes(_) => {}
        }
    }
}

/// A completion's outcome as the tool result a plain call returns.
pub(crate) fn call_result(outcome: Result<CompletionResult, DispatchError>) -> CallToolResult {
    match outcome {
        Ok(result) => {
            let text = completion_text(&result);
            structured(&result, Some(text))
        }
        Err(error) => error_result(&error),
    }
}

/// A tool's arguments as the client sent them, read by the tool itself rather than by rmcp:
/// rmcp answers a value it cannot read with a protocol error (`failed to deserialize
/// parameters: invalid type: string "50", expected i64`) that names no parameter and carries
/// no `kind` or `retryable`. Read here, every argument error is a tool error that names the
/// parameter and says what it should be. The advertised schema is `T`'s, with `null` taken
/// out of optional parameters' types ([`params::strip_null`]).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Args<T> {
    raw: JsonObject,
    #[serde(skip)]
    _of: PhantomData<T>,
}

impl<T: DeserializeOwned> Args<T> {
    /// The arguments as `T`, or an `invalid_request` error naming the parameter at fault.
    pub fn parse(self) -> Result<T, DispatchError> {
        serde_path_to_error::deserialize(Value::Object(self.raw)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                DispatchError::invalid(format!("invalid arguments: {inner}"))
            } else {
                DispatchError::invalid(format!("invalid parameter {path}: {inner}"))
            }
        })
    }
}

impl<T: JsonSchema> JsonSchema for Args<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = T::json_schema(generator);
        params::strip_null(&mut schema);
        schema
    }
}

/// The text content of a completion's result, never empty: clients that read only `content`
/// (and some that reject an empty text block) must still see the answer. An answer that is
/// only tool calls is the structured result's JSON (the MCP spec: a tool returning structured
/// content SHOULD also return it serialised in a text block); one that is only reasoning says so.
fn completion_text(result: &CompletionResult) -> String {
    if !result.text.is_empty() {
        return result.text.clone();
    }
    let finish = result.finish_reason.as_deref().unwrap_or("none");
    if !result.tool_calls.is_empty() {
        return serde_json::to_string(result).unwrap_or_else(|_| {
            format!(
                "The model answered with {} tool call(s)",
                result.tool_calls.len()
            )
        });
    }
    match result.reasoning.as_deref().filter(|r| !r.is_empty()) {
        Some(reasoning) => {
            let hint = if finish == "length" {
                "; it reached max_tokens while reasoning: raise max_tokens for an answer"
            } else {
                ""
            };
            format!(
                "The model returned only reasoning, no answer text (finish_reason: {finish}{hint}). \
                 Its reasoning:\n{reasoning}"
            )
        }
        None => format!("The model returned an empty answer (finish_reason: {finish})."),
    }
}

/// A successful result: readable text (the completion text, or the JSON) plus structured data.
fn structured<T: Serialize>(value: &T, text: Option<String>) -> CallToolResult {
    let data = serde_json::to_value(value).unwrap_or(Value::Null);
    let mut result = CallToolResult::structured(data);
    if let Some(text) = text {
        result.content = vec![ContentBlock::text(text)];
    }
    result
}

/// A tool error: `isError: true`, the message as text, `kind` and `retryable` as data.
/// When the host gave the failure an HTTP status, `host_status` carries it too.
pub fn error_result(error: &DispatchError) -> CallToolResult {
    let mut data = json!({
        "kind": error.kind,
        "retryable": error.retryable,
        "message": error.message,
    });
    if let Some(status) = error.host_status {
        data["host_status"] = status.into();
    }
    let mut result = CallToolResult::structured_error(data);
    result.content = vec![ContentBlock::text(error.message.clone())];
    result
}

const INSTRUCTIONS: &str = "Dispatches chat completions to a fleet of local GPU inference servers \
    (LM Studio or any OpenAI-compatible server) from one queue: never two requests on one GPU, no \
    idle GPU while work waits. Use complete_stream for completions, list_models to see what each \
    host serves, dispatch_status for queue and slot state. Clients that declare the \
    io.modelcontextprotocol/tasks extension, or send task on tools/call (stdio, or HTTP with a \
    session), get complete and complete_stream as tasks.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for PrixServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
        .with_server_info(Implementation::new(
            "prix-dispatch",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS.to_string())
    }

    /// The client's name (its `clientInfo`) is known from the handshake: status lists it
    /// by name before its first completion (a session that only runs tasks or reads status
    /// showed `name: null`).
    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if let Some(info) = context.peer.peer_info() {
            self.client.set_name(&info.client_info.name);
        }
    }

    /// `complete` and `complete_stream` from a client that declared the tasks extension
    /// (SEP-2663) become tasks; everything else is an ordinary call.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let as_task = TASK_TOOLS.contains(&request.name.as_ref())
            && context
                .client_capabilities()
                .is_some_and(|caps| caps.supports_tasks());
        if as_task {
            return Ok(self.start_task(request, &context.peer));
        }
        let call = ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        let tasks = self.dispatcher.mcp_tasks();
        let task = tasks
            .get(&request.task_id, self.task_owner)
            .map_err(|e| McpError::invalid_params(e.to_string(), None))?;
        Ok(GetTaskResult::new(detailed(&task)))
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.dispatcher
            .mcp_tasks()
            .cancel(&request.task_id, self.task_owner)
            .map_err(|e| McpError::invalid_params(e.to_string(), None))?;
        Ok(())
    }
}

/// The tools that run as tasks when the client can take one.
pub(crate) const TASK_TOOLS: [&str; 2] = ["complete", "complete_stream"];

impl PrixServer {
    /// Submits the call and answers at once with its task (or with the tool error that
    /// refuses it, as a plain call would); the call runs on, detached, until it ends or is
    /// cancelled (`tasks/cancel`, or its client going away).
    fn start_task(
        &self,
        request: CallToolRequestParams,
        peer: &Peer<RoleServer>,
    ) -> CallToolResponse {
        match self.launch_task(request.arguments.unwrap_or_default(), None, Some(peer)) {
            Ok(task) => CallToolResponse::Task(CreateTaskResult::new(wire_task(&task))),
            Err(Refused::Invalid(result)) => result.into(),
            Err(Refused::Full(e)) => {
                error_result(&DispatchError::new(ErrorKind::QueueFull, e.to_string())).into()
            }
        }
    }

    /// Starts `complete` / `complete_stream` with `arguments` as a task in the store, run
    /// detached through the same submit + [`follow`] path as a plain call; returns the new
    /// task at once. A call the queue refuses (unknown model, too large) is still a task,
    /// failed with the plain call's refusal as its result; arguments that do not parse are
    /// refused without a task. `ttl` is the client's wish (2025-11-25 form), `peer` the
    /// rmcp peer when started from an rmcp request (it names the client).
    pub(crate) fn launch_task(
        &self,
        arguments: JsonObject,
        ttl: Option<Duration>,
        peer: Option<&Peer<RoleServer>>,
    ) -> Result<Snapshot, Refused> {
        let args = Args::<CompletionRequest> {
            raw: arguments,
            _of: PhantomData,
        };
        let request = args
            .parse()
            .map_err(|e| Refused::Invalid(error_result(&e)))?;
        let tasks = self.dispatcher.mcp_tasks().clone();
        let (task, cancel) = tasks
            .create(self.task_owner, &request.model_id, ttl)
            .map_err(Refused::Full)?;
        let (mut handle, model) = match self.submit(request, peer) {
            Ok(submitted) => submitted,
            Err(refused) => {
                // Refused before it was queued: the task ends with the refusal as its result.
                tasks.update(&task.id, State::Failed(refused));
                return Ok(task);
            }
        };
        let id = task.id.clone();
        let interval = self.dispatcher.progress_interval();
        let gone = self.gone.clone();
        // Kept until the task ends: an HTTP task outlives the request that started it, and
        // its client stays listed (fair share, status) while it runs.
        let client = self.client.clone();
        // The result goes to the store, not to a request: a progress token would be stale
        // once the task handle is answered, so no progress is sent.
        let mut progress = Progress::silent();
        tokio::spawn(async move {
            let _client = client;
            let stop = async {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = gone.cancelled() => {}
                }
            };
            let on_phase = |phase: &Phase| {
                tasks.update(&id, State::Active(phase.clone()));
            };
            let end =
                match follow(&mut handle, &model, &mut progress, interval, stop, on_phase).await {
                    Some(Ok(result)) => State::Completed(call_result(Ok(result))),
                    Some(Err(error)) => State::Failed(error_result(&error)),
                    None => {
                        handle.cancel();
                        State::Cancelled
                    }
                };
            tracing::debug!(task = %id, status = end.status(), "MCP task ended");
            tasks.update(&id, end);
        });
        Ok(task)
    }

    /// This session with its tasks bound to its own client: what the 2025-11-25 task layer on
    /// Streamable HTTP uses for a session with an `Mcp-Session-Id`, so one session cannot
    /// read, list or cancel another's tasks (`for_http` leaves them anyone's who holds the id,
    /// which a stateless request needs).
    pub(crate) fn owning_tasks(mut self) -> Self {
        self.task_owner = Some(self.client.id());
        self
    }

    /// Whose tasks this session sees (see `task_owner`).
    pub(crate) fn task_owner(&self) -> Option<u64> {
        self.task_owner
    }

    /// The dispatcher this session feeds.
    pub(crate) fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

/// Why a call could not become a task.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Its arguments do not parse: the plain call's tool error.
    Invalid(CallToolResult),
    /// The store is full.
    Full(crate::mcp_tasks::TaskError),
}

/// A stored task as the spec's `Task`: a working task's status message is its phase
/// ("queued for m: position 2, starts in about 40 s", "loading m on gpu1").
fn wire_task(task: &Snapshot) -> Task {
    let mut wire = Task::new(
        task.id.clone(),
        TaskStatus::Working,
        iso8601(task.created),
        iso8601(task.updated),
    )
    .with_ttl_ms(task.ttl.as_millis() as u64)
    .with_poll_interval_ms(crate::mcp_tasks::POLL_INTERVAL.as_millis() as u64);
    wire = wire.with_status_message(status_message(task));
    wire
}

/// A task's status message in both wire forms: a working task's phase ("queued for m:
/// position 2, starts in about 40 s", "loading m on gpu1", ...), else how it ended.
pub(crate) fn status_message(task: &Snapshot) -> String {
    match &task.state {
        State::Active(phase) => phase.message(&task.model, Instant::now()),
        State::Completed(_) => "completed".to_string(),
        State::Failed(result) => format!("failed: {}", result_text(result)),
        State::Cancelled => "cancelled".to_string(),
    }
}

/// The spec's `DetailedTask` of `tasks/get`. A call that ended in a tool error is
/// `completed` with its `isError: true` result, as SEP-2663 has it (`failed` is for a
/// JSON-RPC error, which these tools never return); its status message says it failed.
fn detailed(task: &Snapshot) -> DetailedTask {
    let payload = match &task.state {
        State::Active(_) => TaskPayload::Working,
        State::Completed(result) | State::Failed(result) => TaskPayload::Completed {
            result: result_object(result),
        },
        State::Cancelled => TaskPayload::Cancelled,
    };
    DetailedTask::new(wire_task(task), payload)
}

fn result_object(result: &CallToolResult) -> JsonObject {
    match serde_json::to_value(result) {
        Ok(Value::Object(map)) => map,
        _ => JsonObject::new(),
    }
}

fn result_text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

/// Serves MCP over stdin/stdout in this process until the client closes stdin.
pub async fn serve_stdio(
    dispatcher: Dispatcher,
) -> Result<(), rmcp::service::ServerInitializeError> {
    let client = dispatcher
        .clients()
        .connect("stdio", Some(std::process::id()));
    serve_client(
        dispatcher,
        client,
        crate::stdio::stdin(),
        crate::stdio::stdout(),
    )
    .await
}

/// Serves one client over a byte stream (stdin/stdout, or a bridge's socket) until it closes
/// its side; then its tasks are cancelled at once (rmcp itself would let running handlers go
/// on for seconds to flush answers nobody can read).
pub async fn serve_client<R, W>(
    dispatcher: Dispatcher,
    client: ClientGuard,
    reader: R,
    writer: W,
) -> Result<(), rmcp::service::ServerInitializeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use rmcp::ServiceExt;
    let gone = CancellationToken::new();
    let id = client.id();
    let server = PrixServer::for_client(dispatcher, client, gone.clone());
    // The 2025-11-25 task form is answered in front of rmcp (see `mcp_tasks_wire`); the
    // layer also fires `gone` when the client closes its side.
    let wire = crate::mcp_tasks_wire::TaskWire::new(server.clone());
    let (reader, writer) = crate::mcp_tasks_wire::serve_stream(wire, reader, writer, gone.clone());
    let service = server.serve((reader, writer)).await?;
    let reason = match service.waiting().await {
        Ok(rmcp::service::QuitReason::Closed) => "it closed the connection".to_string(),
        Ok(rmcp::service::QuitReason::Cancelled) => "the service was stopped".to_string(),
        Ok(rmcp::service::QuitReason::JoinError(e)) | Err(e) => {
            format!("the MCP service task failed: {e}")
        }
        // `QuitReason` is non-exhaustive: a reason added later is still named.
        Ok(other) => format!("{other:?}"),
    };
    gone.cancel();
    tracing::info!(
        client = id,
        "MCP client went away ({reason}); its tasks are cancelled"
    );
    Ok(())
}
