//! A call with a progress token hears from the daemon at least every
//! `[server] progress_interval_seconds` while nothing else would be said: while it waits in the
//! queue behind another call on a one-slot host, and while its host loads the model (issue 13,
//! item 4). Measured on the client's side of the MCP session (rmcp's client, in process).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fleet, host, spec};
use prix_dispatch::TaskEvent;
use prix_dispatch::mcp::serve_client;
use prix_dispatch::sim::{ResidencyEventKind, sim_directive};
use rmcp::ServiceExt;
use rmcp::handler::client::ClientHandler;
use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_secs(1);
/// Scheduling noise on a busy two-core machine; without keep-alive the gaps are the whole
/// wait (about 4 s here).
const SLACK: Duration = Duration::from_millis(800);

#[derive(Clone, Default)]
struct Heard {
    progress: Arc<Mutex<Vec<(Instant, ProgressNotificationParam)>>>,
}

impl ClientHandler for Heard {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().await.push((Instant::now(), params));
    }
}

async fn session(fleet: &Fleet) -> (RunningService<RoleClient, Heard>, Heard) {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (server_read, server_write) = tokio::io::split(server_end);
    let dispatcher = fleet.dispatcher.clone();
    let guard = dispatcher.clients().connect("test", None);
    tokio::spawn(serve_client(dispatcher, guard, server_read, server_write));
    let heard = Heard::default();
    let client = heard
        .clone()
        .serve(tokio::io::split(client_end))
        .await
        .expect("MCP handshake");
    (client, heard)
}

fn call(content: &str) -> CallToolRequestParams {
    let args = json!({"model_id": "m", "messages": [{"role": "user", "content": content}]});
    CallToolRequestParams::new("complete").with_arguments(args.as_object().unwrap().clone())
}

/// Calls `complete` and returns its result, every progress message, and the longest silence
/// between the call, its notifications and its result.
async fn timed_call(
    client: &RunningService<RoleClient, Heard>,
    heard: &Heard,
    content: &str,
) -> (CallToolResult, Vec<String>, Duration) {
    let sent = Instant::now();
    let result = client.call_tool(call(content)).await.unwrap();
    let returned = Instant::now();
    let progress = heard.progress.lock().await.clone();
    let mut times: Vec<Instant> = vec![sent];
    times.extend(progress.iter().map(|(t, _)| *t));
    times.push(returned);
    let widest = times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap();
    // rmcp's client runs each notification's handler on a task of its own (rmcp 3.11
    // service.rs, `spawn_service_task` per notification), so the handler order is not the
    // wire order under load: the values must be distinct and all there, 1..=n.
    let mut values: Vec<f64> = progress.iter().map(|(_, p)| p.progress).collect();
    values.sort_by(f64::total_cmp);
    let expected: Vec<f64> = (1..=values.len()).map(|n| n as f64).collect();
    assert_eq!(
        values, expected,
        "progress values are 1, 2, 3, … with none repeated"
    );
    let messages = progress
        .into_iter()
        .filter_map(|(_, p)| p.message)
        .collect();
    (result, messages, widest)
}

fn structured(result: &CallToolResult) -> Value {
    assert_eq!(result.is_error, Some(false), "{result:?}");
    result.structured_content.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_in_the_queue_hears_its_position_every_interval() {
    let fleet = Fleet::start_tuned(vec![host(&["m"])], |c| {
        c.server.progress_interval = INTERVAL;
    })
    .await;
    // The one slot is busy for 4 s with a call from elsewhere.
    let mut blocker = fleet
        .dispatcher
        .submit(spec(
            "m",
            &sim_directive(json!({"ttft_ms": 4000, "tokens": 1})),
            json!({}),
        ))
        .unwrap();
    while !matches!(blocker.next().await, Some(TaskEvent::Started { .. })) {}

    let (client, heard) = session(&fleet).await;
    let (result, messages, widest) = timed_call(&client, &heard, "hi").await;
    let data = structured(&result);
    assert!(data["queue_wait_ms"].as_f64().unwrap() > 2500.0, "{data}");
    assert!(
        widest <= INTERVAL + SLACK,
        "longest silence {widest:?} (interval {INTERVAL:?}): {messages:?}"
    );
    let queued: Vec<&String> = messages
        .iter()
        .filter(|m| m.starts_with("queued for m: position 1"))
        .collect();
    assert!(queued.len() >= 3, "the position is repeated: {messages:?}");
    // The host never had the two requests at once: the call really waited in the queue.
    let records = fleet.chat_records(0);
    assert_eq!(records.len(), 2);
    common::assert_host_invariants(&records, 1);
    client.cancel().await.unwrap();
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_model_loads_hears_of_the_load_every_interval() {
    let fleet = Fleet::start_tuned(
        vec![host(&["m"]).sim(|c| c.max_loaded_models = Some(1))],
        |c| c.server.progress_interval = INTERVAL,
    )
    .await;
    let (client, heard) = session(&fleet).await;
    let slow_load = sim_directive(json!({"load_ms": 4000, "tokens": 2}));
    let (result, messages, widest) = timed_call(&client, &heard, &slow_load).await;
    assert_eq!(structured(&result)["text"], "tok0 tok1 ");
    assert!(
        widest <= INTERVAL + SLACK,
        "longest silence {widest:?} (interval {INTERVAL:?}): {messages:?}"
    );
    let loading = messages
        .iter()
        .filter(|m| *m == "loading m on gpu0")
        .count();
    assert!(loading >= 3, "the load is repeated: {messages:?}");
    // The host did load the model for this request, for as long as asked.
    let loads: Vec<_> = fleet.sims[0]
        .residency_events()
        .into_iter()
        .filter(|e| e.kind == ResidencyEventKind::Load)
        .collect();
    assert_eq!(loads.len(), 1, "{loads:?}");
    assert_eq!((loads[0].model.as_str(), loads[0].duration_ms), ("m", 4000));
    client.cancel().await.unwrap();
    fleet.shutdown().await;
}

#[test]
fn the_interval_is_a_setting_of_10_s_that_must_be_positive() {
    use prix_dispatch::config::{Config, ConfigSource};
    let no_env = |_: &str| None;
    let parse = |text: &str| Config::from_toml(text, ConfigSource::File("t.toml".into()), &no_env);
    let host = "[[host]]\nname = \"gpu0\"\nurl = \"http://127.0.0.1:1234\"\n";
    assert_eq!(
        parse(host).unwrap().server.progress_interval,
        Duration::from_secs(10)
    );
    let set = parse(&format!(
        "[server]\nprogress_interval_seconds = 2.5\n{host}"
    ))
    .unwrap();
    assert_eq!(set.server.progress_interval, Duration::from_millis(2500));
    for bad in ["0", "-1"] {
        let e = parse(&format!(
            "[server]\nprogress_interval_seconds = {bad}\n{host}"
        ))
        .unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("[server] progress_interval_seconds must be a number of seconds > 0"),
            "{e}"
        );
    }
}
