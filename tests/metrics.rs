//! `/metrics` as an operator of GPUs reads it: every known model has a queue-depth series even
//! when nothing waits (so `sum(prix_queue_depth)` reads 0, not "no data"), busy seconds per host
//! grow while a task runs (not only when it ends) and stop when the host is idle, model loads
//! are counted per host and model, and queue wait is told apart by client class.

mod common;

use std::time::Duration;

use common::{Fleet, HttpFront, host, quick, sample, scrape, value};
use serde_json::json;

const CLASSES: [&str; 5] = [
    "mcp",
    "openai-user",
    "openai-header",
    "openai-key",
    "anonymous",
];

#[tokio::test]
async fn at_rest_every_series_is_there_at_zero() {
    let fleet = Fleet::start(vec![host(&["a", "b"]), host(&["b"])]).await;
    fleet
        .wait_status(Duration::from_secs(5), |s| {
            s.hosts.iter().all(|h| !h.state.models.is_empty())
        })
        .await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let m = scrape(&front.base).await;
    for model in ["a", "b"] {
        assert_eq!(
            value(&m, &format!("prix_queue_depth{{model=\"{model}\"}}")),
            Some(0.0),
            "queue depth of {model} at rest: {m:?}"
        );
    }
    for h in ["gpu0", "gpu1"] {
        assert_eq!(
            value(&m, &format!("prix_host_busy_seconds_total{{host=\"{h}\"}}")),
            Some(0.0),
            "{m:?}"
        );
        assert_eq!(
            value(
                &m,
                &format!("prix_host_slot_busy_seconds_total{{host=\"{h}\"}}")
            ),
            Some(0.0),
            "{m:?}"
        );
    }
    for class in CLASSES {
        assert_eq!(
            value(
                &m,
                &format!("prix_queue_wait_seconds_count{{class=\"{class}\"}}")
            ),
            Some(0.0),
            "queue wait of {class}: {m:?}"
        );
    }
    // Nothing else may name a client: the class label has five values, whatever connects.
    assert!(
        !m.iter()
            .any(|(n, _)| n.contains("class=") && !CLASSES.iter().any(|c| n.contains(c))),
        "{m:?}"
    );
    drop(front);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_busy_seconds_grow_while_a_task_runs() {
    // One slot; each task about 1.5 s (30 tokens, 50 ms apart).
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(30, 50))]).await;
    let front = HttpFront::start(&fleet.dispatcher, None, 1 << 20).await;
    let base = front.base.clone();
    let client = reqwest::Client::new();
    let send = |extra: serde_json::Value, header: Option<&'static str>| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut request = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body);
        if let Some(name) = header {
            request = request.header("X-Prix-Client", name);
        }
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        })
    };
    let first = send(json!({"user": "alice"}), None);
    fleet
        .wait_status(Duration::from_secs(5), |s| s.hosts[0].state.active == 1)
        .await;
    let second = send(json!({}), Some("battery"));
    fleet
        .wait_status(Duration::from_secs(5), |s| s.queued_total == 1)
        .await;

    let during = scrape(&base).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = scrape(&base).await;
    let busy = "prix_host_busy_seconds_total{host=\"gpu0\"}";
    assert_eq!(sample(&later, "prix_host_active{host=\"gpu0\"}"), 1.0);
    assert!(
        sample(&later, busy) - sample(&during, busy) >= 0.4,
        "busy time grows while the task runs: {} then {}",
        sample(&during, busy),
        sample(&later, busy)
    );
    assert_eq!(sample(&during, "prix_queue_depth{model=\"m\"}"), 1.0);

    first.await.unwrap();
    second.await.unwrap();
    fleet.assert_all_slots_return(Duration::from_secs(5)).await;
    let done = scrape(&base).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = scrape(&base).await;
    assert_eq!(
        value(&done, "prix_queue_depth{model=\"m\"}"),
        Some(0.0),
        "the drained queue reads 0"
    );
    let total = sample(&done, busy);
    assert!(
        (2.5..6.0).contains(&total),
        "two tasks of ~1.5 s back to back: {total}"
    );
    assert_eq!(sample(&idle, busy), total, "no busy time while idle");
    assert!(
        (sample(&done, "prix_host_slot_busy_seconds_total{host=\"gpu0\"}") - total).abs() < 1e-6,
        "one slot: request-time is busy time"
    );
    assert_eq!(
        sample(
            &done,
            "prix_host_model_loads_total{host=\"gpu0\",model=\"m\"}"
        ),
        1.0,
        "one load, then warm"
    );
    for (class, n) in [
        ("openai-user", 1.0),
        ("openai-header", 1.0),
        ("anonymous", 0.0),
    ] {
        assert_eq!(
            sample(
                &done,
                &format!("prix_queue_wait_seconds_count{{class=\"{class}\"}}")
            ),
            n,
            "{class}"
        );
    }
    // The second waited for the first: over a second of queue wait, all of it `openai-header`.
    assert!(
        sample(
            &done,
            "prix_queue_wait_seconds_sum{class=\"openai-header\"}"
        ) > 1.0
    );
    drop(front);
    fleet.shutdown().await;
}
