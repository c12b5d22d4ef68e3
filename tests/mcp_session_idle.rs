//! An MCP session over Streamable HTTP (the 2025-11-25 session protocol, spoken raw as clients
//! do) is never dropped while a call is in flight, however long the call is silent; a session
//! idle past `session_idle_seconds` answers 404, so a client that follows the spec starts a new
//! one (rmcp's own keep-alive dropped a session mid-call and then answered 500).

mod common;

use std::time::Duration;

use common::{Fleet, HttpFront, host};
use prix_dispatch::http::HttpOptions;
use prix_dispatch::sim::sim_directive;
use serde_json::{Value, json};

const VERSION: &str = "2025-11-25";

struct Raw {
    http: reqwest::Client,
    url: String,
}

impl Raw {
    async fn post(&self, session: Option<&str>, body: Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", VERSION)
            .json(&body);
        if let Some(id) = session {
            request = request.header("mcp-session-id", id);
        }
        request.send().await.unwrap()
    }

    /// `initialize` + `notifications/initialized`: the session id.
    async fn open(&self) -> String {
        let r = self
            .post(
                None,
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": VERSION, "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"}}}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
        r.text().await.unwrap();
        let r = self
            .post(
                Some(&id),
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            )
            .await;
        assert!(r.status().is_success(), "{}", r.status());
        id
    }
}

/// A one-host fleet and its HTTP front (an MCP session idle limit of `idle`, else the
/// default), with a raw client for its `/mcp`.
async fn start(idle: Option<Duration>) -> (Fleet, HttpFront, Raw) {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let mut options = HttpOptions {
        max_request_bytes: 1 << 20,
        ..Default::default()
    };
    if let Some(idle) = idle {
        options.session_idle = idle;
    }
    let front = HttpFront::start_with(&fleet.dispatcher, options).await;
    let raw = Raw {
        http: reqwest::Client::new(),
        url: format!("{}/mcp", front.base),
    };
    (fleet, front, raw)
}

impl Raw {
    /// `tools/call` with `params` as request `id` on `session`: its JSON-RPC answer.
    async fn call(&self, session: &str, id: u64, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        let r = self.post(Some(session), body).await;
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        response_with_id(&body, id).unwrap_or_else(|| panic!("no response: {body}"))
    }
}

/// The JSON-RPC message with `id` in an SSE (or JSON) response body.
fn response_with_id(body: &str, id: u64) -> Option<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .chain(std::iter::once(body))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m["id"] == json!(id))
}

#[tokio::test]
async fn a_silent_call_outlives_the_idle_limit_and_an_idle_session_answers_404() {
    let (fleet, front, raw) = start(Some(Duration::from_millis(500))).await;
    let session = raw.open().await;

    // The host is silent for 1.5 s (a model load): three idle limits with no event at all.
    let slow = sim_directive(json!({"ttft_ms": 1500, "tokens": 2}));
    let response = raw
        .call(
            &session,
            2,
            json!({"name": "complete", "arguments": {
            "model_id": "m", "messages": [{"role": "user", "content": slow}]}}),
        )
        .await;
    assert_eq!(response["result"]["isError"], false, "{response}");
    assert_eq!(
        response["result"]["structuredContent"]["text"],
        "tok0 tok1 "
    );
    assert_eq!(fleet.status().await.counters.cancelled, 0);

    // Used again within the limit: still there.
    let r = raw
        .post(
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(response_with_id(&r.text().await.unwrap(), 3).is_some());

    // Idle past the limit with nothing in flight: 404, and a new session works.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = raw
        .post(
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
        )
        .await;
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    let again = raw.open().await;
    assert_ne!(again, session);
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_session_whose_client_went_silent_ends_on_its_own_and_its_tasks_stop() {
    let (fleet, front, raw) = start(Some(Duration::from_millis(500))).await;
    let session = raw.open().await;
    // A 20 s generation as a 2025-11-25 task: the call is answered at once with the task, so
    // nothing is in flight on the session afterwards.
    let long = sim_directive(json!({"tokens": 400, "token_interval_ms": 50}));
    let created = raw
        .call(
            &session,
            2,
            json!({"name": "complete", "task": {"ttl": 60000}, "arguments": {
            "model_id": "m", "messages": [{"role": "user", "content": long}]}}),
        )
        .await;
    assert_eq!(created["result"]["task"]["status"], "working", "{created}");

    // Then the client goes away without a word, and no other client comes: the session
    // expires on the daemon's timer and its running task is cancelled on the host.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = fleet.chat_records(0);
        if records
            .first()
            .is_some_and(|r| r.outcome == prix_dispatch::sim::Outcome::ClientDisconnected)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned session's task still runs 5 s later: {:?}",
            records.iter().map(|r| r.outcome).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.assert_all_slots_return(Duration::from_secs(2)).await;
    drop(front);
    fleet.shutdown().await;
}

/// A client ending its session with `DELETE` hears 200 (the Python `mcp` SDK takes only 200 or
/// 204 and logs a failed termination on rmcp's 202), and the session is gone.
#[tokio::test]
async fn a_deleted_session_answers_200_and_then_404() {
    let (fleet, front, raw) = start(None).await;
    let session = raw.open().await;
    let r = raw
        .http
        .delete(&raw.url)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", VERSION)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = raw
        .post(
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
    assert_eq!(r.status(), 404);
    drop(front);
    fleet.shutdown().await;
}

#[test]
fn the_idle_limit_is_a_setting_whose_default_outlasts_the_daemons_waits() {
    use prix_dispatch::config::{Config, ConfigSource};
    let no_env = |_: &str| None;
    let parse = |text: &str| Config::from_toml(text, ConfigSource::File("t.toml".into()), &no_env);
    let host = "[[host]]\nname = \"gpu0\"\nurl = \"http://127.0.0.1:1234\"\n";
    let defaults = parse(host).unwrap();
    assert!(
        defaults.server.session_idle > defaults.timeouts.first_token + defaults.timeouts.inactivity,
        "{:?}",
        defaults.server.session_idle
    );
    let set = parse(&format!("[server]\nsession_idle_seconds = 90\n{host}")).unwrap();
    assert_eq!(set.server.session_idle, Duration::from_secs(90));
    let e = parse(&format!("[server]\nsession_idle_seconds = 0\n{host}")).unwrap_err();
    assert!(
        e.to_string().contains("[server] session_idle_seconds"),
        "{e}"
    );
}
