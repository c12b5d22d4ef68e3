//! Model switches on a simulated host: residency limits, load time, the log
//! of loads and evictions, the four loaded-state listings, and how auto-evict
//! plays with them. Driven over HTTP like `tests.rs`.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;

const PATIENCE: Duration = Duration::from_secs(5);
const LOAD_MS: u64 = 200;

fn chat(model: &str, directive: Option<Value>) -> Value {
    let content = directive.map_or_else(|| "hi".to_owned(), sim_directive);
    json!({"model": model, "stream": false, "messages": [{"role": "user", "content": content}]})
}

/// A streamed request: its first byte goes out before the generation.
fn streamed(model: &str, directive: Value) -> Value {
    let mut body = chat(model, Some(directive));
    body["stream"] = json!(true);
    body
}

fn url(host: &SimHost, path: &str) -> String {
    format!("{}{path}", host.url())
}

/// Sends a chat request and returns the HTTP status once the answer is read.
async fn ask(host: &SimHost, body: Value) -> u16 {
    let response = reqwest::Client::new()
        .post(url(host, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    // An evicted request's body breaks off; only the status matters then.
    let _ = response.bytes().await;
    status
}

fn spawn_ask(host: &SimHost, body: Value) -> tokio::task::JoinHandle<u16> {
    let url = url(host, "/v1/chat/completions");
    tokio::spawn(async move {
        let Ok(response) = reqwest::Client::new().post(url).json(&body).send().await else {
            return 0;
        };
        let status = response.status().as_u16();
        let _ = response.bytes().await;
        status
    })
}

async fn get(host: &SimHost, path: &str) -> (u16, String) {
    let response = reqwest::get(url(host, path)).await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn get_json(host: &SimHost, path: &str) -> Value {
    let (status, text) = get(host, path).await;
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).expect("JSON body")
}

/// Milliseconds from arrival to first byte of the `n`-th chat request (0-based).
fn ttfb_ms(host: &SimHost, n: usize) -> u64 {
    let record = &host.chat_records()[n];
    (record.first_byte_us.expect("answered") - record.start_us) / 1_000
}

/// `(kind, model)` of every residency event, e.g. `("load", "a")`.
fn events(host: &SimHost) -> Vec<(&'static str, String)> {
    host.residency_events()
        .into_iter()
        .map(|e| {
            let kind = match e.kind {
                ResidencyEventKind::Load => "load",
                ResidencyEventKind::Evict => "evict",
            };
            (kind, e.model)
        })
        .collect()
}

fn ev(kind: &'static str, model: &str) -> (&'static str, String) {
    (kind, model.to_owned())
}

fn held(host: &SimHost) -> Vec<String> {
    host.resident_models()
        .into_iter()
        .map(|r| r.model)
        .collect()
}

/// Waits until `check` holds for the host's chat records.
async fn until(host: &SimHost, check: impl Fn(&[RequestRecord]) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check(&host.chat_records()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never met"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn swapping(max: usize, models: &[&str]) -> SimConfig {
    SimConfig {
        max_loaded_models: Some(max),
        default: Behaviour {
            load_ms: LOAD_MS,
            tokens: 2,
            ..Behaviour::default()
        },
        ..SimConfig::with_models(models.iter().copied())
    }
}

#[tokio::test]
async fn max_one_charges_each_switch_once_then_serves_warm() {
    let config = SimConfig {
        initially_loaded: Some("a".to_owned()),
        ..swapping(1, &["a", "b"])
    };
    let host = SimHost::start(config).await.unwrap();
    for model in ["a", "b", "b", "a"] {
        assert_eq!(ask(&host, chat(model, None)).await, 200);
    }
    // a was resident at start: no load; b is loaded once, then warm; a again.
    assert!(ttfb_ms(&host, 0) < LOAD_MS / 2, "initially loaded is warm");
    assert!(ttfb_ms(&host, 1) >= LOAD_MS, "cold b pays its load");
    assert!(ttfb_ms(&host, 2) < LOAD_MS / 2, "b is warm the second time");
    assert!(
        ttfb_ms(&host, 3) >= LOAD_MS,
        "a was evicted, so it loads again"
    );
    assert_eq!(
        events(&host),
        [
            ev("evict", "a"),
            ev("load", "b"),
            ev("evict", "b"),
            ev("load", "a")
        ]
    );
    let log = host.residency_events();
    assert_eq!(log[1].duration_ms, LOAD_MS);
    assert_eq!(log[1].seq, host.chat_records()[1].seq);
    assert_eq!(log[0].duration_ms, 0);
    assert!(log.iter().all(|e| !e.while_busy));
    let stats = host.stats();
    assert_eq!((stats.loads, stats.evictions), (2, 2));
    assert_eq!(held(&host), ["a"]);

    host.reset();
    assert!(host.residency_events().is_empty());
    assert_eq!(held(&host), ["a"], "reset holds initially_loaded again");
}

#[tokio::test]
async fn max_two_evicts_the_least_recently_used() {
    let host = SimHost::start(swapping(2, &["a", "b", "c"])).await.unwrap();
    for model in ["a", "b", "a", "c"] {
        ask(&host, chat(model, Some(json!({"load_ms": 0})))).await;
    }
    // a was used after b, so c takes b's place.
    assert_eq!(held(&host), ["a", "c"]);
    ask(&host, chat("b", Some(json!({"load_ms": 0})))).await;
    assert_eq!(held(&host), ["c", "b"]);
    assert_eq!(
        events(&host),
        [
            ev("load", "a"),
            ev("load", "b"),
            ev("evict", "b"),
            ev("load", "c"),
            ev("evict", "a"),
            ev("load", "b"),
        ]
    );
    // The directive's load_ms is what the load was charged.
    assert!(host.residency_events().iter().all(|e| e.duration_ms == 0));
}

#[tokio::test]
async fn without_auto_evict_a_switch_waits_for_the_busy_model() {
    let host = SimHost::start(swapping(1, &["a", "b"])).await.unwrap();
    let slow = json!({"load_ms": 0, "tokens": 10, "token_interval_ms": 30});
    let first = spawn_ask(&host, streamed("a", slow));
    until(&host, |r| {
        r.first().is_some_and(|r| r.first_byte_us.is_some())
    })
    .await;
    assert_eq!(ask(&host, chat("b", None)).await, 200);
    assert_eq!(first.await.unwrap(), 200);
    let records = host.chat_records();
    assert_eq!(
        records[0].outcome,
        Outcome::Completed,
        "a finishes untouched"
    );
    assert_eq!(records[0].tokens_sent, 10);
    // b's first byte comes after a has ended and b has loaded.
    let a_end = records[0].end_us.unwrap();
    assert!(records[1].first_byte_us.unwrap() >= a_end + LOAD_MS * 1_000);
    assert_eq!(
        events(&host),
        [ev("load", "a"), ev("evict", "a"), ev("load", "b")]
    );
    assert!(!host.residency_events()[1].while_busy);
    assert_eq!(host.stats().model_overlaps, 1, "b arrived while a ran");
}

#[tokio::test]
async fn auto_evict_with_max_one_aborts_the_busy_model() {
    let config = SimConfig {
        auto_evict: true,
        ..swapping(1, &["a", "b"])
    };
    let host = SimHost::start(config).await.unwrap();
    let slow = json!({"load_ms": 0, "tokens": 50, "token_interval_ms": 20});
    let first = spawn_ask(&host, streamed("a", slow));
    until(&host, |r| {
        r.first().is_some_and(|r| r.first_byte_us.is_some())
    })
    .await;
    assert_eq!(ask(&host, chat("b", None)).await, 200);
    first.await.unwrap();
    let records = host.chat_records();
    assert_eq!(records[0].outcome, Outcome::Evicted);
    assert_eq!(records[1].outcome, Outcome::Completed);
    assert!(ttfb_ms(&host, 1) >= LOAD_MS, "b still pays its load");
    let log = host.residency_events();
    assert_eq!(
        events(&host),
        [ev("load", "a"), ev("evict", "a"), ev("load", "b")]
    );
    assert!(log[1].while_busy, "a was evicted mid-stream");
    assert_eq!(log[1].seq, records[1].seq);
    assert!(host.wait_idle(PATIENCE).await);
}

#[tokio::test]
async fn auto_evict_with_max_two_takes_an_idle_model_before_a_busy_one() {
    let config = SimConfig {
        auto_evict: true,
        ..swapping(2, &["a", "b", "c"])
    };
    let host = SimHost::start(config).await.unwrap();
    let slow = json!({"load_ms": 0, "tokens": 15, "token_interval_ms": 20});
    let first = spawn_ask(&host, streamed("a", slow));
    until(&host, |r| {
        r.first().is_some_and(|r| r.first_byte_us.is_some())
    })
    .await;
    ask(&host, chat("b", Some(json!({"load_ms": 0})))).await;
    // a is the least recently used but busy; b is idle, so b goes.
    ask(&host, chat("c", Some(json!({"load_ms": 0})))).await;
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(host.chat_records()[0].outcome, Outcome::Completed);
    assert_eq!(held(&host), ["a", "c"]);
    assert_eq!(events(&host)[2], ev("evict", "b"));
}

#[tokio::test]
async fn concurrent_cold_requests_load_the_model_twice() {
    let host = SimHost::start(swapping(1, &["a"])).await.unwrap();
    let (first, second) = tokio::join!(ask(&host, chat("a", None)), ask(&host, chat("a", None)));
    assert_eq!((first, second), (200, 200));
    assert_eq!(events(&host), [ev("load", "a"), ev("load", "a")]);
    assert_eq!(host.stats().loads, 2);
    let resident = host.resident_models();
    assert_eq!(
        resident.len(),
        1,
        "two instances of one model take one place"
    );
    assert_eq!(resident[0].loaded_instances, 2);
    let v1 = get_json(&host, "/api/v1/models").await;
    assert_eq!(
        v1["models"][0]["loaded_instances"],
        json!([{"id": "a"}, {"id": "a:2"}])
    );
    // Once loaded, a third request uses it without another load.
    ask(&host, chat("a", None)).await;
    assert_eq!(host.stats().loads, 2);
}

#[tokio::test]
async fn a_router_or_ollama_host_loads_once_for_concurrent_cold_requests() {
    for api in [ResidencyApi::LlamaRouter, ResidencyApi::Ollama] {
        let config = SimConfig {
            residency_api: api,
            ..swapping(1, &["a"])
        };
        let host = SimHost::start(config).await.unwrap();
        let (first, second) =
            tokio::join!(ask(&host, chat("a", None)), ask(&host, chat("a", None)));
        assert_eq!((first, second), (200, 200));
        assert_eq!(events(&host), [ev("load", "a")], "{api:?}");
        // Both waited for the one load.
        assert!(ttfb_ms(&host, 0) >= LOAD_MS && ttfb_ms(&host, 1) >= LOAD_MS / 2);
        assert_eq!(host.resident_models()[0].loaded_instances, 1);
    }
}

/// The state of `model` in each listing, in the order LM Studio v1, LM Studio
/// v0, router, Ollama; switching `residency_api` on the fly between reads.
async fn views(host: &SimHost, model: &str) -> [String; 4] {
    host.update_config(|c| c.residency_api = ResidencyApi::LmStudio);
    let v1 = get_json(host, "/api/v1/models").await;
    let v1 = v1["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == model)
        .map(|m| m["loaded_instances"].as_array().unwrap().len())
        .unwrap();
    let v0 = get_json(host, "/api/v0/models").await;
    let v0 = v0["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .map(|m| m["state"].as_str().unwrap().to_owned())
        .unwrap();
    host.update_config(|c| c.residency_api = ResidencyApi::LlamaRouter);
    let router = get_json(host, "/v1/models").await;
    let router = router["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .map(|m| m["status"]["value"].as_str().unwrap().to_owned())
        .unwrap();
    host.update_config(|c| c.residency_api = ResidencyApi::Ollama);
    let ps = get_json(host, "/api/ps").await;
    let ps = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == model && m["model"] == model);
    [
        format!("v1:{v1}"),
        format!("v0:{v0}"),
        format!("router:{router}"),
        format!("ps:{ps}"),
    ]
}

#[tokio::test]
async fn the_four_listings_agree_with_what_happened() {
    let config = SimConfig {
        initially_loaded: Some("a".to_owned()),
        ..swapping(2, &["a", "b", "c"])
    };
    let host = SimHost::start(config).await.unwrap();
    ask(&host, chat("b", Some(json!({"load_ms": 0})))).await;
    let loaded = ["v1:1", "v0:loaded", "router:loaded", "ps:true"];
    let unloaded = ["v1:0", "v0:not-loaded", "router:unloaded", "ps:false"];
    assert_eq!(views(&host, "a").await, loaded);
    assert_eq!(views(&host, "b").await, loaded);
    assert_eq!(views(&host, "c").await, unloaded);

    // c takes a long load; meanwhile it shows as loading (router) or not yet
    // loaded (the others), and a, the least recently used, is gone.
    let cold = spawn_ask(&host, chat("c", Some(json!({"load_ms": 3_000}))));
    until(&host, |r| r.len() == 2).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while host.resident_models().iter().all(|r| r.model != "c") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never became resident"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        views(&host, "c").await,
        ["v1:0", "v0:not-loaded", "router:loading", "ps:false"]
    );
    assert_eq!(views(&host, "a").await, unloaded);
    assert_eq!(views(&host, "b").await, loaded);
    assert_eq!(cold.await.unwrap(), 200);
    assert_eq!(views(&host, "c").await, loaded);

    // The control API reports the same log and holdings as the library.
    let report = get_json(&host, "/sim/residency").await;
    let log: Vec<ResidencyEvent> = serde_json::from_value(report["events"].clone()).unwrap();
    assert_eq!(log, host.residency_events());
    let resident: Vec<ResidentModel> = serde_json::from_value(report["resident"].clone()).unwrap();
    assert_eq!(resident, host.resident_models());
    assert_eq!(report["stats"]["loads"], 2);
    assert_eq!(report["stats"]["evictions"], 1);
}

#[tokio::test]
async fn hosts_answer_listings_they_lack_as_the_real_servers_do() {
    let host = SimHost::start(SimConfig::default()).await.unwrap();
    // LM Studio: 200 with an error string for Ollama's path.
    let (status, body) = get(&host, "/api/ps").await;
    assert_eq!(status, 200);
    assert!(body.contains("Unexpected endpoint"), "{body}");
    host.update_config(|c| c.residency_api = ResidencyApi::LmStudioV0);
    let (status, body) = get(&host, "/api/v1/models").await;
    assert_eq!(status, 200);
    assert!(body.contains("Unexpected endpoint"), "{body}");
    assert_eq!(get(&host, "/api/v0/models").await.0, 200);
    for api in [ResidencyApi::LlamaRouter, ResidencyApi::None] {
        host.update_config(|c| c.residency_api = api);
        for path in ["/api/v0/models", "/api/v1/models", "/api/ps"] {
            let (status, body) = get(&host, path).await;
            assert_eq!((status, body.contains("File Not Found")), (404, true));
        }
    }
    host.update_config(|c| c.residency_api = ResidencyApi::Ollama);
    assert_eq!(
        get(&host, "/api/v1/models").await,
        (404, "404 page not found".to_owned())
    );
    // Only the router's listing carries a status.
    let plain = get_json(&host, "/v1/models").await;
    assert!(plain["data"][0].get("status").is_none());
}

#[tokio::test]
async fn a_waiting_switch_goes_ahead_when_room_is_made() {
    let host = SimHost::start(swapping(1, &["a", "b"])).await.unwrap();
    let stuck = spawn_ask(
        &host,
        streamed("a", json!({"load_ms": 0, "hang_after_tokens": 1})),
    );
    until(&host, |r| r.first().is_some_and(|r| r.tokens_sent == 1)).await;
    let waiting = spawn_ask(&host, chat("b", Some(json!({"load_ms": 0}))));
    until(&host, |r| r.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = host.chat_records();
    assert_eq!(
        records[1].first_byte_us, None,
        "b waits while a holds the only place"
    );
    assert_eq!(held(&host), ["a"]);

    host.update_config(|c| c.max_loaded_models = Some(2));
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(held(&host), ["a", "b"]);
    assert_eq!(events(&host), [ev("load", "a"), ev("load", "b")]);
    stuck.abort();
}

#[tokio::test]
async fn a_replayed_answer_for_a_cold_model_waits_for_its_load() {
    // Raw replays skipped the load before: a swap test using one got switches for free.
    let host = SimHost::start(swapping(1, &["a", "b"])).await.unwrap();
    let body = chat("b", Some(json!({"raw": {"chunks": ["data: [DONE]\n\n"]}})));
    assert_eq!(ask(&host, body).await, 200);
    assert!(
        ttfb_ms(&host, 0) >= LOAD_MS,
        "first byte after {} ms, the load takes {LOAD_MS}",
        ttfb_ms(&host, 0)
    );
    assert_eq!(events(&host), [("load", "b".to_string())]);
}
