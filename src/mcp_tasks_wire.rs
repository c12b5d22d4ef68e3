//! MCP tasks in the 2025-11-25 experimental form, served in front of rmcp.
//!
//! The TypeScript SDK 1.32.2 (`@modelcontextprotocol/sdk`) runs a long call as a task this
//! way: `client.experimental.tasks.callToolStream` puts `params.task = {ttl?}` on
//! `tools/call` (dist/esm/shared/protocol.js:685), expects `{task: Task}` back
//! (`CreateTaskResultSchema`, dist/esm/types.js:652), polls `tasks/get` (a `Task`,
//! types.js:678) every `pollInterval` ms, and once the task is terminal fetches
//! `tasks/result` (the call's own `CallToolResult`, types.js:694); see protocol.js:558-628.
//! It does so only for tools that `tools/list` marks `execution: {taskSupport: "optional" |
//! "required"}` while the server declares `capabilities.tasks.requests.tools.call`
//! (client/index.js:511, `isToolTask`), or when the caller passes `task` itself. Spec:
//! <https://modelcontextprotocol.io/specification/2025-11-25/basic/utilities/tasks>.
//!
//! rmcp 3.11 knows only the SEP-2663 extension form: its `CallToolRequestParams` has no
//! `task` field (model.rs:4441), so it would drop `params.task` and answer plainly, and it
//! refuses `tasks/get` / `tasks/cancel` from clients without the extension capability
//! (handler/server.rs:33-49). So this layer reads every client message first and takes
//! exactly these: `tools/call` of `complete` / `complete_stream` with `params.task`,
//! `tasks/result`, `tasks/list`, and `tasks/get` / `tasks/cancel` from clients that did not
//! declare the SEP-2663 extension (those go on to rmcp's SEP-2663 handlers). It adds the
//! `tasks` capability to the `initialize` answer and `execution` to the two tools in
//! `tools/list`. Everything else passes through untouched. Tasks live in the same store
//! ([`crate::mcp_tasks::TaskStore`]) and run through the same submit + `follow` path as
//! SEP-2663 tasks and plain calls.
//!
//! The core ([`route`], [`patch_response`], [`task_json`]) is pure; [`TaskWire`] executes
//! what it takes; [`serve_stream`] puts it on a byte stream (stdio, bridge sockets), and
//! `crate::http::tasks` on Streamable HTTP (`/mcp`, sessions with an `Mcp-Session-Id`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mcp::{PrixServer, Refused, TASK_TOOLS, status_message};
use crate::mcp_tasks::{POLL_INTERVAL, Snapshot, State, TaskError, iso8601};

/// The SEP-2663 extension's id: a client declaring it speaks that form, served by rmcp.
pub const TASKS_EXTENSION_ID: &str = "io.modelcontextprotocol/tasks";
/// `_meta` key tying a message to its task (2025-11-25 spec, "Related task metadata";
/// `RELATED_TASK_META_KEY` in the TS SDK's types.js:5).
pub const RELATED_TASK_META_KEY: &str = "io.modelcontextprotocol/related-task";
/// Tasks per `tasks/list` page.
pub const LIST_PAGE: usize = 100;

/// JSON-RPC "invalid params": bad ttl, unknown task, bad cursor, nothing to cancel.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC "internal error": the task store is full.
pub const INTERNAL_ERROR: i64 = -32603;

/// A task request this layer answers itself.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskCall {
    /// `tools/call` of a task tool with `params.task`; `ttl` is the client's wish.
    Create {
        arguments: Map<String, Value>,
        ttl: Option<Duration>,
    },
    Get(String),
    /// Blocks until the task has ended.
    Result(String),
    List(Option<String>),
    Cancel(String),
}

/// What to add to the answer of a request passed to rmcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patch {
    /// `initialize`: the `tasks` capability.
    Initialize,
    /// `tools/list`: `execution.taskSupport` on the task tools.
    ToolsList,
}

/// Where one client message goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// To rmcp unchanged; its answer (same id) gets the patch if any.
    Pass(Option<Patch>),
    /// Answered here: the request's id and what it asks.
    Take { id: Value, call: TaskCall },
    /// Answered here at once with this JSON-RPC message (a malformed task request).
    Answer(Value),
}

/// Where `message` goes. `sep2663` says the client declared the SEP-2663 extension at
/// `initialize` (its `tasks/get` and `tasks/cancel` are rmcp's); a request's own `_meta`
/// declaring it counts too (per-request capabilities of the stateless HTTP protocol).
pub fn route(message: &Value, sep2663: bool) -> Route {
    let (Some(method), Some(id)) = (
        message.get("method").and_then(Value::as_str),
        message.get("id"),
    ) else {
        // Notifications, answers to our requests, batches: rmcp's.
        return Route::Pass(None);
    };
    // Borrowed: a `tools/call` carries the whole conversation, and most messages pass.
    let params = message.get("params").unwrap_or(&Value::Null);
    let task_id = || -> Result<String, Value> {
        match params.get("taskId").and_then(Value::as_str) {
            Some(task_id) => Ok(task_id.to_string()),
            None => Err(error(
                id,
                INVALID_PARAMS,
                &format!(
                    "{method} needs params.taskId, the id a task-augmented tools/call returned"
                ),
            )),
        }
    };
    let sep2663 = sep2663 || meta_declares_extension(params);
    let call = match method {
        "initialize" => return Route::Pass(Some(Patch::Initialize)),
        "tools/list" => return Route::Pass(Some(Patch::ToolsList)),
        "tools/call" => {
            let Some(task) = params.get("task") else {
                return Route::Pass(None);
            };
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            if !TASK_TOOLS.contains(&name) {
                return Route::Answer(error(
                    id,
                    INVALID_PARAMS,
                    &format!(
                        "tool {name:?} does not run as a task (only {} do); call it without \
                         params.task",
                        TASK_TOOLS.join(" and ")
                    ),
                ));
            }
            let ttl = match parse_ttl(task) {
                Ok(ttl) => ttl,
                Err(message) => return Route::Answer(error(id, INVALID_PARAMS, &message)),
            };
            let arguments = match params.get("arguments") {
                Some(Value::Object(arguments)) => arguments.clone(),
                // Missing or not an object: the tool itself says which parameter is missing.
                _ => Map::new(),
            };
            TaskCall::Create { arguments, ttl }
        }
        "tasks/get" | "tasks/cancel" if sep2663 => return Route::Pass(None),
        "tasks/get" => match task_id() {
            Ok(task_id) => TaskCall::Get(task_id),
            Err(answer) => return Route::Answer(answer),
        },
        "tasks/cancel" => match task_id() {
            Ok(task_id) => TaskCall::Cancel(task_id),
            Err(answer) => return Route::Answer(answer),
        },
        "tasks/result" => match task_id() {
            Ok(task_id) => TaskCall::Result(task_id),
            Err(answer) => return Route::Answer(answer),
        },
        "tasks/list" => TaskCall::List(
            params
                .get("cursor")
                .and_then(Value::as_str)
                .map(str::to_string),
        ),
        _ => return Route::Pass(None),
    };
    Route::Take {
        id: id.clone(),
        call,
    }
}

/// `task.ttl`: absent, null, or milliseconds as a non-negative number.
fn parse_ttl(task: &Value) -> Result<Option<Duration>, String> {
    let Some(object) = task.as_object() else {
        return Err(format!(
            "params.task must be an object like {{\"ttl\": 60000}}, not {task}"
        ));
    };
    match object.get("ttl") {
        None | Some(Value::Null) => Ok(None),
        Some(ttl) => match ttl.as_f64() {
            Some(ms) if ms >= 0.0 && ms.is_finite() => Ok(Some(Duration::from_millis(ms as u64))),
            _ => Err(format!(
                "params.task.ttl must be a number of milliseconds >= 0, not {ttl}; omit it for \
                 the server's time-to-live"
            )),
        },
    }
}

/// Whether a request's `_meta` declares the SEP-2663 extension (per-request capabilities).
fn meta_declares_extension(params: &Value) -> bool {
    fn has_key(value: &Value) -> bool {
        match value {
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| k == TASKS_EXTENSION_ID || has_key(v)),
            _ => false,
        }
    }
    params.get("_meta").is_some_and(has_key)
}

/// Whether `initialize` params declare the SEP-2663 extension
/// (`capabilities.extensions["io.modelcontextprotocol/tasks"]`).
pub fn initialize_declares_extension(message: &Value) -> bool {
    message
        .pointer("/params/capabilities/extensions")
        .and_then(Value::as_object)
        .is_some_and(|extensions| extensions.contains_key(TASKS_EXTENSION_ID))
}

/// Adds this form's declarations to rmcp's answer: `capabilities.tasks = {list, cancel,
/// requests.tools.call}` (`ServerTasksCapabilitySchema`, TS SDK types.js:385) to
/// `initialize`, `execution.taskSupport = "optional"` (`ToolExecutionSchema`, types.js:1215)
/// to the task tools in `tools/list`. An error answer is left alone.
pub fn patch_response(patch: Patch, response: &mut Value) {
    let Some(result) = response.get_mut("result").and_then(Value::as_object_mut) else {
        return;
    };
    match patch {
        Patch::Initialize => {
            if let Some(Value::Object(capabilities)) = result.get_mut("capabilities") {
                capabilities.insert(
                    "tasks".to_string(),
                    json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}),
                );
            }
        }
        Patch::ToolsList => {
            let Some(Value::Array(tools)) = result.get_mut("tools") else {
                return;
            };
            for tool in tools {
                let is_task_tool = tool
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|name| TASK_TOOLS.contains(&name));
                if let (true, Some(tool)) = (is_task_tool, tool.as_object_mut()) {
                    tool.insert("execution".to_string(), json!({"taskSupport": "optional"}));
                }
            }
        }
    }
}

/// A stored task as the 2025-11-25 `Task` (TS SDK `TaskSchema`, types.js:627): `taskId`,
/// `status` (`working`, `completed`, `failed` for an `isError` result as the SDK's own
/// example server stores it, examples/server/simpleStreamableHttp.js:302, `cancelled`),
/// `ttl` and `pollInterval` in ms, `createdAt` / `lastUpdatedAt` ISO 8601, and the phase or
/// end as `statusMessage`.
pub fn task_json(task: &Snapshot) -> Value {
    json!({
        "taskId": task.id,
        "status": task.state.status(),
        "ttl": task.ttl.as_millis() as u64,
        "createdAt": iso8601(task.created),
        "lastUpdatedAt": iso8601(task.updated),
        "pollInterval": POLL_INTERVAL.as_millis() as u64,
        "statusMessage": status_message(task),
    })
}

/// One `tasks/list` page of `tasks` (oldest first) after the task `cursor` names.
pub fn list_page(tasks: &[Snapshot], cursor: Option<&str>) -> Result<Value, String> {
    let start = match cursor {
        None => 0,
        Some(cursor) => match tasks.iter().position(|t| t.id == cursor) {
            Some(at) => at + 1,
            None => {
                return Err(format!(
                    "cursor {cursor:?} names no task of yours any more (it expired); list \
                     again without a cursor"
                ));
            }
        },
    };
    let page: Vec<Value> = tasks
        .iter()
        .skip(start)
        .take(LIST_PAGE)
        .map(task_json)
        .collect();
    let mut result = json!({ "tasks": page });
    if start + LIST_PAGE < tasks.len() {
        result["nextCursor"] = json!(tasks[start + LIST_PAGE - 1].id);
    }
    Ok(result)
}

/// A JSON-RPC error answer.
pub fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn answer(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Executes the requests [`route`] takes, for one session's client.
#[derive(Clone)]
pub struct TaskWire {
    server: PrixServer,
}

impl TaskWire {
    /// Tasks are started as `server`'s client and seen as its owner sees them.
    pub fn new(server: PrixServer) -> Self {
        Self { server }
    }

    /// Cancels this wire's working tasks: its session ended, so no one can reach them any
    /// more (they are bound to it) and their hosts' slots are better given back.
    pub fn end(&self) {
        if let Some(owner) = self.server.task_owner() {
            self.server.dispatcher().mcp_tasks().cancel_all_of(owner);
        }
    }

    /// The JSON-RPC answer to `call`. `tasks/result` waits until the task has ended.
    pub async fn answer(&self, id: &Value, call: TaskCall) -> Value {
        let store = self.server.dispatcher().mcp_tasks().clone();
        let owner = self.server.task_owner();
        let refused = |e: TaskError| error(id, INVALID_PARAMS, &e.to_string());
        match call {
            TaskCall::Create { arguments, ttl } => {
                match self.server.launch_task(arguments.clone(), ttl, None) {
                    Ok(task) => answer(id, json!({ "task": task_json(&task) })),
                    Err(Refused::Full(e)) => error(id, INTERNAL_ERROR, &e.to_string()),
                    Err(Refused::Invalid(result)) => {
                        // Arguments the tool refuses: still a task, failed with the plain
                        // call's tool error, so the client's task flow sees the same result.
                        let model = arguments
                            .get("model_id")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        match store.create(owner, model, ttl) {
                            Ok((task, _)) => {
                                store.update(&task.id, State::Failed(result));
                                let task = store.get(&task.id, owner).unwrap_or(task);
                                answer(id, json!({ "task": task_json(&task) }))
                            }
                            Err(e) => error(id, INTERNAL_ERROR, &e.to_string()),
                        }
                    }
                }
            }
            TaskCall::Get(task_id) => match store.get(&task_id, owner) {
                Ok(task) => answer(id, task_json(&task)),
                Err(e) => refused(e),
            },
            TaskCall::Cancel(task_id) => match store.cancel(&task_id, owner) {
                Ok(task) => answer(id, task_json(&task)),
                Err(e) => refused(e),
            },
            TaskCall::List(cursor) => match list_page(&store.list(owner), cursor.as_deref()) {
                Ok(page) => answer(id, page),
                Err(message) => error(id, INVALID_PARAMS, &message),
            },
            TaskCall::Result(task_id) => match store.wait_end(&task_id, owner).await {
                Ok(task) => match task.state {
                    State::Completed(result) | State::Failed(result) => {
                        let mut result = serde_json::to_value(result).unwrap_or(json!({}));
                        if let Some(object) = result.as_object_mut() {
                            // A 2026-07-28 field rmcp's serialisation adds (its wire layer
                            // strips it for older protocols); the 2025-11-25 result has none.
                            object.remove("resultType");
                            object.insert(
                                "_meta".to_string(),
                                json!({ RELATED_TASK_META_KEY: {"taskId": task_id} }),
                            );
                        }
                        answer(id, result)
                    }
                    _ => error(
                        id,
                        INVALID_PARAMS,
                        &format!(
                            "task {task_id} was cancelled, so it has no result; start the call \
                             again"
                        ),
                    ),
                },
                Err(e) => refused(e),
            },
        }
    }
}

/// Ids of requests passed to rmcp whose answers need a patch.
type Pending = Arc<Mutex<HashMap<String, Patch>>>;

/// The JSON-RPC answer to a line that is not JSON: what was wrong, and the framing MCP's stdio
/// transport wants (one message per line, no headers).
fn parse_error(line: &[u8], error: &serde_json::Error) -> Value {
    let text = String::from_utf8_lossy(line);
    let framing = if text
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("content-length:")
    {
        " (MCP over stdio sends no Content-Length headers, unlike LSP)"
    } else {
        ""
    };
    json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": format!(
        "Parse error: a line on stdin is not JSON ({error}){framing}; each line must be exactly \
         one JSON-RPC message"
    )}})
}

/// The -32600 answer to a JSON value that is no JSON-RPC message (not an object, a batch,
/// or an object with neither `method` nor `result`/`error`); `None` for a message. Its `id`
/// is the value's, when it has a usable one, else null.
pub fn invalid_request(value: &Value) -> Option<Value> {
    let why = match value {
        Value::Array(_) => "a batch (an array): MCP sends one message per line, no batches",
        Value::Object(o)
            if o.contains_key("method") || o.contains_key("result") || o.contains_key("error") =>
        {
            return None;
        }
        Value::Object(_) => "an object with neither \"method\" nor \"result\"/\"error\"",
        _ => "not an object",
    };
    let id = match value.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => Value::Null,
    };
    Some(
        json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32600, "message": format!(
            "Invalid request: a line on stdin is JSON but no JSON-RPC message ({why}); send \
             {{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":...}}"
        )}}),
    )
}

/// Puts the layer on a newline-delimited JSON-RPC byte stream (MCP stdio): returns the
/// reader and writer rmcp should serve. `eof` fires when the client closes its side.
/// Messages taken are answered on `writer` between rmcp's lines, never inside one.
pub fn serve_stream<R, W>(
    wire: TaskWire,
    reader: R,
    writer: W,
    eof: CancellationToken,
) -> (tokio::io::DuplexStream, tokio::io::DuplexStream)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    const PIPE: usize = 1 << 16;
    let (mut to_rmcp, rmcp_reads) = tokio::io::duplex(PIPE);
    let (rmcp_writes, from_rmcp) = tokio::io::duplex(PIPE);
    let pending: Pending = Arc::default();
    let (answers, mut answered) = mpsc::unbounded_channel::<Value>();

    let inbound_pending = pending.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut sep2663 = false;
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let route = match serde_json::from_slice::<Value>(&line) {
                // JSON but no JSON-RPC message: rmcp answers without the id, which JSON-RPC
                // 2.0 requires (null when it cannot be read).
                Ok(message) if invalid_request(&message).is_some() => {
                    Route::Answer(invalid_request(&message).unwrap_or_default())
                }
                Ok(message) => {
                    if message.get("method").and_then(Value::as_str) == Some("initialize") {
                        sep2663 = initialize_declares_extension(&message);
                    }
                    let route = route(&message, sep2663);
                    if let (Route::Pass(Some(patch)), Some(id)) = (&route, message.get("id")) {
                        inbound_pending
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(id.to_string(), *patch);
                    }
                    route
                }
                // A blank line is no message: nothing to answer.
                Err(_) if line.trim_ascii().is_empty() => continue,
                // Not JSON: rmcp drops such a line without a word, and the client waits
                // forever for an answer; JSON-RPC 2.0 answers it with -32700 (id null, as the
                // id cannot be read).
                Err(e) => Route::Answer(parse_error(&line, &e)),
            };
            match route {
                Route::Pass(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    if to_rmcp.write_all(&line).await.is_err() {
                        break;
                    }
                }
                Route::Answer(message) => {
                    let _ = answers.send(message);
                }
                Route::Take { id, call } => {
                    let wire = wire.clone();
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        let _ = answers.send(wire.answer(&id, call).await);
                    });
                }
            }
        }
        // The client closed stdin: its tasks stop, and rmcp sees the end too.
        eof.cancel();
        let _ = to_rmcp.shutdown().await;
    });

    tokio::spawn(async move {
        let mut writer = writer;
        let mut from_rmcp = BufReader::new(from_rmcp);
        let mut line = Vec::new();
        loop {
            // `read_until` is not cancel-safe: when an answer of ours wins the race, the part
            // of rmcp's line already read stays in `line` and the next read appends the rest.
            // So `line` is cleared only once that line has been written whole.
            let (out, whole_line) = tokio::select! {
                read = from_rmcp.read_until(b'\n', &mut line) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => (patched(&pending, &line), true),
                },
                Some(message) = answered.recv() => {
                    (Some(format!("{message}\n").into_bytes()), false)
                }
            };
            let bytes = out.as_deref().unwrap_or(&line);
            let written = writer.write_all(bytes).await.is_ok() && writer.flush().await.is_ok();
            if whole_line {
                line.clear();
            }
            if !written {
                break;
            }
        }
    });
    (rmcp_reads, rmcp_writes)
}

/// rmcp's `line` with its patch applied, if it answers a request that needs one.
fn patched(pending: &Pending, line: &[u8]) -> Option<Vec<u8>> {
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    if pending.is_empty() {
        return None;
    }
    let mut message: Value = serde_json::from_slice(line).ok()?;
    if message.get("method").is_some() {
        return None;
    }
    let patch = pending.remove(&message.get("id")?.to_string())?;
    patch_response(patch, &mut message);
    Some(format!("{message}\n").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_that_is_no_message_is_answered_with_its_id() {
        let answer = invalid_request(&json!({"id": 9})).expect("no method");
        assert_eq!(answer["id"], 9);
        assert_eq!(answer["error"]["code"], -32600);
        for value in [json!(42), json!([]), json!([{"jsonrpc": "2.0", "id": 1}])] {
            let answer = invalid_request(&value).expect("not a message");
            assert_eq!(answer["id"], Value::Null, "{value}");
        }
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        assert!(invalid_request(&request).is_none());
        let response = json!({"jsonrpc": "2.0", "id": 1, "result": {}});
        assert!(invalid_request(&response).is_none());
    }
    use std::time::SystemTime;

    fn request(method: &str, params: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
    }

    #[test]
    fn a_task_call_is_taken_and_anything_else_passes() {
        let call = request(
            "tools/call",
            json!({"name": "complete", "arguments": {"model_id": "m"}, "task": {"ttl": 60000}}),
        );
        let Route::Take { id, call } = route(&call, false) else {
            panic!("taken");
        };
        assert_eq!(id, json!(7));
        assert_eq!(
            call,
            TaskCall::Create {
                arguments: json!({"model_id": "m"}).as_object().unwrap().clone(),
                ttl: Some(Duration::from_secs(60)),
            }
        );
        let plain = request("tools/call", json!({"name": "complete", "arguments": {}}));
        assert_eq!(route(&plain, false), Route::Pass(None));
        let empty_task = request("tools/call", json!({"name": "complete", "task": {}}));
        assert!(matches!(
            route(&empty_task, false),
            Route::Take {
                call: TaskCall::Create { ttl: None, .. },
                ..
            }
        ));
        assert_eq!(
            route(&request("initialize", json!({})), false),
            Route::Pass(Some(Patch::Initialize))
        );
        assert_eq!(
            route(&request("tools/list", json!({})), false),
            Route::Pass(Some(Patch::ToolsList))
        );
        assert_eq!(route(&request("ping", json!({})), false), Route::Pass(None));
        let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        assert_eq!(route(&notification, false), Route::Pass(None));
    }

    #[test]
    fn task_methods_are_ours_unless_the_client_speaks_sep_2663() {
        let get = request("tasks/get", json!({"taskId": "t"}));
        assert!(matches!(
            route(&get, false),
            Route::Take {
                call: TaskCall::Get(_),
                ..
            }
        ));
        assert_eq!(route(&get, true), Route::Pass(None));
        let per_request = request(
            "tasks/cancel",
            json!({"taskId": "t", "_meta": {"caps": {"extensions": {TASKS_EXTENSION_ID: {}}}}}),
        );
        assert_eq!(route(&per_request, false), Route::Pass(None));
        // Not in SEP-2663: always ours.
        let result = request("tasks/result", json!({"taskId": "t"}));
        assert!(matches!(
            route(&result, true),
            Route::Take {
                call: TaskCall::Result(_),
                ..
            }
        ));
        let list = request("tasks/list", json!({"cursor": "c"}));
        assert!(matches!(
            route(&list, false),
            Route::Take { call: TaskCall::List(Some(c)), .. } if c == "c"
        ));
        let init = request(
            "initialize",
            json!({"capabilities": {"extensions": {TASKS_EXTENSION_ID: {}}}}),
        );
        assert!(initialize_declares_extension(&init));
        assert!(!initialize_declares_extension(&request(
            "initialize",
            json!({"capabilities": {}})
        )));
    }

    #[test]
    fn malformed_task_requests_are_answered_with_errors_that_say_why() {
        let message = |route: Route| match route {
            Route::Answer(answer) => {
                assert_eq!(answer["error"]["code"], INVALID_PARAMS);
                answer["error"]["message"].as_str().unwrap().to_string()
            }
            other => panic!("answered, not {other:?}"),
        };
        let bad_ttl = request(
            "tools/call",
            json!({"name": "complete", "task": {"ttl": "soon"}}),
        );
        assert!(message(route(&bad_ttl, false)).contains("ttl must be a number"));
        let negative = request(
            "tools/call",
            json!({"name": "complete", "task": {"ttl": -1}}),
        );
        assert!(message(route(&negative, false)).contains(">= 0"));
        let not_a_task_tool = request("tools/call", json!({"name": "list_models", "task": {}}));
        assert!(message(route(&not_a_task_tool, false)).contains("without params.task"));
        let no_id = request("tasks/get", json!({}));
        assert!(message(route(&no_id, false)).contains("params.taskId"));
    }

    #[test]
    fn answers_get_the_capability_and_the_tools_their_execution() {
        let mut init =
            json!({"jsonrpc": "2.0", "id": 1, "result": {"capabilities": {"tools": {}}}});
        patch_response(Patch::Initialize, &mut init);
        assert_eq!(
            init["result"]["capabilities"]["tasks"],
            json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}})
        );
        let mut tools = json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
            {"name": "complete"}, {"name": "list_models"}, {"name": "complete_stream"}
        ]}});
        patch_response(Patch::ToolsList, &mut tools);
        let support: Vec<Value> = tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["execution"]["taskSupport"].clone())
            .collect();
        assert_eq!(support, [json!("optional"), Value::Null, json!("optional")]);
        let mut failed = json!({"jsonrpc": "2.0", "id": 3, "error": {"code": 1, "message": "x"}});
        let before = failed.clone();
        patch_response(Patch::Initialize, &mut failed);
        assert_eq!(failed, before);
    }

    fn snapshot(id: &str, state: State) -> Snapshot {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_752_858);
        Snapshot {
            id: id.to_string(),
            model: "m".to_string(),
            state,
            created: at,
            updated: at,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn tasks_have_the_2025_11_25_shape_and_lists_page() {
        let task = task_json(&snapshot("a", State::Cancelled));
        assert_eq!(
            task,
            json!({
                "taskId": "a", "status": "cancelled", "ttl": 60000,
                "createdAt": "2026-11-27T04:14:18.000Z",
                "lastUpdatedAt": "2026-11-27T04:14:18.000Z",
                "pollInterval": 1000, "statusMessage": "cancelled",
            })
        );
        let tasks: Vec<Snapshot> = (0..LIST_PAGE + 5)
            .map(|i| snapshot(&format!("t{i}"), State::Cancelled))
            .collect();
        let first = list_page(&tasks, None).unwrap();
        assert_eq!(first["tasks"].as_array().unwrap().len(), LIST_PAGE);
        let cursor = first["nextCursor"].as_str().unwrap();
        let second = list_page(&tasks, Some(cursor)).unwrap();
        assert_eq!(second["tasks"].as_array().unwrap().len(), 5);
        assert_eq!(second["tasks"][0]["taskId"], format!("t{LIST_PAGE}"));
        assert!(second.get("nextCursor").is_none());
        assert!(
            list_page(&tasks, Some("gone"))
                .unwrap_err()
                .contains("list again")
        );
    }
}
