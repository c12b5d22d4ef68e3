//! Dispatch scenarios over real HTTP on loopback against simulated LM Studio hosts.
//!
//! Ports upstream's dispatch tests (stress, pooled adapter, GPU1 routing, pool and dispatcher)
//! and asserts on what the hosts recorded, not on wall-clock thresholds.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Fleet, assert_host_invariants, host, quick, spec};
use prix_dispatch::ErrorKind;
use prix_dispatch::config::QueueSettings;
use prix_dispatch::sim::{Outcome, RequestRecord, sim_directive};
use prix_dispatch::task::TaskEvent;
use serde_json::json;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A message that makes the simulated host answer `tokens` tokens `interval_ms` apart.
fn sized(tokens: usize, interval_ms: u64) -> String {
    sim_directive(json!({"tokens": tokens, "token_interval_ms": interval_ms}))
}

fn overlaps(a: &RequestRecord, b: &RequestRecord) -> bool {
    a.start_us < b.end_us.unwrap() && b.start_us < a.end_us.unwrap()
}

#[tokio::test]
async fn seed_race_two_requests_two_hosts_one_each() {
    let fleet = Fleet::start(vec![
        host(&["model-a"]).behaviour(quick(5, 40)),
        host(&["model-a"]).behaviour(quick(5, 40)),
    ])
    .await;
    let (x, y) = tokio::join!(
        fleet
            .dispatcher
            .run(spec("model-a", "hi", json!({})), |_| {}),
        fleet
            .dispatcher
            .run(spec("model-a", "hi", json!({})), |_| {}),
    );
    assert_ne!(
        x.unwrap().host,
        y.unwrap().host,
        "both requests went to one host"
    );
    let (r0, r1) = (fleet.chat_records(0), fleet.chat_records(1));
    assert_eq!((r0.len(), r1.len()), (1, 1), "one request per host");
    assert!(overlaps(&r0[0], &r1[0]), "the two ran in parallel");
    assert_host_invariants(&r0, 1);
    assert_host_invariants(&r1, 1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn fan_out_of_one_model_uses_every_host() {
    let fleet = Fleet::start(vec![
        host(&["m"]).behaviour(quick(4, 10)),
        host(&["m"]).behaviour(quick(4, 10)),
        host(&["m"]).behaviour(quick(4, 10)),
    ])
    .await;
    let runs = (0..9).map(|_| fleet.dispatcher.run(spec("m", "hi", json!({})), |_| {}));
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    for i in 0..3 {
        let records = fleet.chat_records(i);
        assert_eq!(records.len(), 3, "host {i} got {} of 9", records.len());
        assert_host_invariants(&records, 1);
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn different_models_on_different_hosts_run_in_parallel() {
    // upstream test_gpu1_routing: A only on gpu0, B only on gpu1.
    let fleet = Fleet::start(vec![
        host(&["model-a"]).behaviour(quick(5, 20)),
        host(&["model-b"]).behaviour(quick(5, 20)),
    ])
    .await;
    let (a, b) = tokio::join!(
        fleet
            .dispatcher
            .run(spec("model-a", "hi", json!({})), |_| {}),
        fleet
            .dispatcher
            .run(spec("model-b", "hi", json!({})), |_| {}),
    );
    assert_eq!(a.unwrap().host, "gpu0");
    assert_eq!(b.unwrap().host, "gpu1");
    assert!(overlaps(
        &fleet.chat_records(0)[0],
        &fleet.chat_records(1)[0]
    ));
    fleet.shutdown().await;
}

#[tokio::test]
async fn no_head_of_line_blocking() {
    let fleet = Fleet::start(vec![host(&["model-a"]), host(&["model-b"])]).await;
    let d = &fleet.dispatcher;
    let long_a = d.submit(spec("model-a", &sized(5, 60), json!({}))).unwrap();
    let waiting_a = d.submit(spec("model-a", &sized(1, 0), json!({}))).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = d
        .run(spec("model-b", &sized(1, 0), json!({})), |_| {})
        .await
        .unwrap();
    assert_eq!(b.host, "gpu1");
    let status = fleet.status().await;
    assert_eq!(
        status.queue.get("model-a"),
        Some(&1),
        "a2 still waits while b finished"
    );
    drop((long_a, waiting_a));
    fleet.shutdown().await;
}

#[tokio::test]
async fn battery_20a_10b_places_b_on_its_only_host_first() {
    // Upstream's FIFO finished this at 0.67 of the ideal: the only host for B ran A.
    let fleet = Fleet::start(vec![
        host(&["model-a", "model-b"]).behaviour(quick(5, 10)),
        host(&["model-a"]).behaviour(quick(5, 10)),
    ])
    .await;
    let models = std::iter::repeat_n("model-a", 20).chain(std::iter::repeat_n("model-b", 10));
    let runs = models.map(|m| fleet.dispatcher.run(spec(m, "hi", json!({})), |_| {}));
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    let gpu0 = fleet.chat_records(0);
    let gpu1 = fleet.chat_records(1);
    assert_host_invariants(&gpu0, 1);
    assert_host_invariants(&gpu1, 1);
    assert!(gpu1.iter().all(|r| r.model.as_deref() == Some("model-a")));
    let mut order: Vec<&RequestRecord> = gpu0.iter().collect();
    order.sort_by_key(|r| r.start_us);
    let b_positions: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, r)| r.model.as_deref() == Some("model-b"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        b_positions,
        (0..10).collect::<Vec<_>>(),
        "gpu0 runs every B before any A"
    );

    // Makespan against the lower bound computed from the recorded durations.
    let all: Vec<&RequestRecord> = gpu0.iter().chain(&gpu1).collect();
    let dur = |r: &RequestRecord| r.end_us.unwrap() - r.start_us;
    let total: u64 = all.iter().map(|r| dur(r)).sum();
    let b_total: u64 = gpu0
        .iter()
        .filter(|r| r.model.as_deref() == Some("model-b"))
        .map(dur)
        .sum();
    let bound = (total / 2).max(b_total);
    let makespan = all.iter().map(|r| r.end_us.unwrap()).max().unwrap()
        - all.iter().map(|r| r.start_us).min().unwrap();
    let efficiency = bound as f64 / makespan as f64;
    // The placement itself is exact (asserted above); what remains is hand-off latency.
    assert!(
        efficiency > 0.85,
        "efficiency {efficiency:.3} (makespan {makespan} us, bound {bound} us)"
    );
    assert!(
        gpu1.len() >= 9,
        "the A-only host did at least its share: {}",
        gpu1.len()
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_task_past_max_bypass_is_never_passed_over_again() {
    let queue = QueueSettings {
        max_bypass: Duration::from_millis(300),
        ..QueueSettings::default()
    };
    let fleet = Fleet::start_with(
        vec![host(&["model-a", "model-b"]), host(&["model-a"])],
        queue,
    )
    .await;
    let d = &fleet.dispatcher;
    // gpu1 is busy with a long A for the whole test.
    let blocker = d
        .submit(spec("model-a", &sized(20, 60), json!({})))
        .unwrap();
    let blocker_host = wait_started(blocker).await;
    assert_eq!(blocker_host.1, "gpu1", "the A-only host takes the first A");
    let mut blocker = blocker_host.0;
    // gpu0 is kept busy with B (which only it serves) while an A waits.
    let mut bs = Vec::new();
    bs.push(d.submit(spec("model-b", &sized(2, 50), json!({}))).unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let a_enqueued = now_us();
    let waiting_a = d
        .submit(spec("model-a", "the waiting one", json!({})))
        .unwrap();
    for _ in 0..12 {
        bs.push(d.submit(spec("model-b", &sized(2, 50), json!({}))).unwrap());
    }
    let mut waiting_a = waiting_a;
    let result = dispatcher_finish(&mut waiting_a).await;
    assert_eq!(
        result.host, "gpu0",
        "the overdue A takes the next free slot that can run it"
    );
    let records = fleet.chat_records(0);
    let a_record = records
        .iter()
        .find(|r| r.body["messages"][0]["content"] == "the waiting one")
        .expect("gpu0 ran the waiting A");
    // 20 ms of slack: a B chosen just before the limit is recorded by the host a moment later.
    let overdue_at = a_enqueued + 320_000;
    let passed_over: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| {
            r.model.as_deref() == Some("model-b")
                && r.start_us > overdue_at
                && r.start_us < a_record.start_us
        })
        .collect();
    assert!(
        passed_over.is_empty(),
        "B started after A was overdue: {passed_over:?}"
    );
    assert!(
        a_record.start_us >= a_enqueued + 250_000,
        "A ran before it was overdue: B had priority"
    );
    blocker.cancel();
    drop(bs);
    fleet.shutdown().await;
}

async fn wait_started(
    mut handle: prix_dispatch::scheduler::TaskHandle,
) -> (prix_dispatch::scheduler::TaskHandle, String) {
    loop {
        match handle.next().await {
            Some(TaskEvent::Started { host, .. }) => return (handle, host),
            Some(TaskEvent::Failed(e)) => panic!("failed: {e}"),
            None | Some(TaskEvent::Finished(_)) => panic!("ended before starting"),
            _ => {}
        }
    }
}

async fn dispatcher_finish(
    handle: &mut prix_dispatch::scheduler::TaskHandle,
) -> prix_dispatch::CompletionResult {
    prix_dispatch::dispatcher::finish(handle, |_| {})
        .await
        .expect("completes")
}

#[tokio::test]
async fn drain_guard_with_two_slots_never_mixes_models() {
    // auto_evict makes the host behave like LM Studio's JIT loader: a request for another
    // model would kill the streams in flight. The record proves it never happened.
    let fleet = Fleet::start(vec![
        host(&["model-a", "model-b"])
            .slots(2)
            .behaviour(quick(4, 10))
            .sim(|c| c.auto_evict = true),
    ])
    .await;
    let models = [
        "model-a", "model-a", "model-b", "model-b", "model-a", "model-b", "model-b", "model-a",
    ];
    let runs = models
        .iter()
        .map(|m| fleet.dispatcher.run(spec(m, "hi", json!({})), |_| {}));
    for r in futures::future::join_all(runs).await {
        r.expect("no stream was evicted");
    }
    let records = fleet.chat_records(0);
    assert_eq!(records.len(), 8);
    assert_host_invariants(&records, 2);
    assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    assert!(
        fleet.sims[0].stats().peak_in_flight == 2,
        "two slots of one model were used"
    );
    // upstream: sequential A then B on one host is exactly [A, B]: the guard resets on drain.
    fleet.shutdown().await;
}

/// A tiny deterministic generator for the random workload.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn two_hundred_random_tasks_keep_every_invariant() {
    let fleet = Fleet::start(vec![
        host(&["model-a", "model-b"])
            .slots(2)
            .sim(|c| c.auto_evict = true),
        host(&["model-a", "model-b"])
            .slots(2)
            .sim(|c| c.auto_evict = true),
    ])
    .await;
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let tasks: Vec<(&str, String)> = (0..200)
        .map(|_| {
            let model = if rng.below(2) == 0 {
                "model-a"
            } else {
                "model-b"
            };
            (model, sized(1 + rng.below(6) as usize, rng.below(4)))
        })
        .collect();
    let runs = tasks
        .iter()
        .map(|(m, content)| fleet.dispatcher.run(spec(m, content, json!({})), |_| {}));
    let results = futures::future::join_all(runs).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    for i in 0..2 {
        let records = fleet.chat_records(i);
        assert_host_invariants(&records, 2);
        assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    }
    assert_eq!(
        fleet.chat_records(0).len() + fleet.chat_records(1).len(),
        200
    );
    fleet.assert_all_slots_return(Duration::from_secs(2)).await;
    let counters = fleet.status().await.counters;
    assert_eq!((counters.started, counters.completed), (200, 200));
    fleet.shutdown().await;
}

#[tokio::test]
async fn cancel_while_queued_removes_the_task() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let d = &fleet.dispatcher;
    let running = d.submit(spec("m", &sized(4, 30), json!({}))).unwrap();
    let (running, _) = wait_started(running).await;
    let mut queued = d.submit(spec("m", "never sent", json!({}))).unwrap();
    assert!(matches!(
        queued.next().await,
        Some(TaskEvent::Queued { position: 1, .. })
    ));
    queued.cancel();
    let status = fleet.status().await;
    assert!(status.queue.is_empty(), "{status:?}");
    let mut running = running;
    dispatcher_finish(&mut running).await;
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    let records = fleet.chat_records(0);
    assert_eq!(
        records.len(),
        1,
        "the cancelled task never reached the host"
    );
    assert_eq!(fleet.status().await.counters.cancelled, 1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn cancel_just_after_assignment_releases_the_slot() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(5, 50))]).await;
    for _ in 0..5 {
        let handle = fleet.dispatcher.submit(spec("m", "hi", json!({}))).unwrap();
        let (mut handle, _) = wait_started(handle).await;
        handle.cancel();
        fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    }
    assert!(
        fleet.sims[0].wait_idle(Duration::from_secs(1)).await,
        "host still streaming"
    );
    for r in fleet.chat_records(0) {
        assert_eq!(r.outcome, Outcome::ClientDisconnected, "{r:?}");
    }
    // The slot works afterwards.
    fleet
        .dispatcher
        .run(spec("m", &sized(1, 0), json!({})), |_| {})
        .await
        .unwrap();
    assert_eq!(fleet.status().await.counters.cancelled, 5);
    fleet.shutdown().await;
}

#[tokio::test]
async fn cancel_mid_stream_drops_the_host_connection() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(100, 20))]).await;
    let mut handle = fleet.dispatcher.submit(spec("m", "hi", json!({}))).unwrap();
    loop {
        if let Some(TaskEvent::Delta(_)) = handle.next().await {
            break;
        }
    }
    drop(handle);
    let dropped_at = std::time::Instant::now();
    assert!(fleet.sims[0].wait_idle(Duration::from_secs(1)).await);
    let seen_after = dropped_at.elapsed();
    let record = &fleet.chat_records(0)[0];
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert!(record.tokens_sent < 100);
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    println!("host saw the disconnect within {seen_after:?}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn transport_errors_with_two_slots_release_exactly_once() {
    let fleet = Fleet::start(vec![host(&["m"]).slots(2)]).await;
    let drop_mid =
        sim_directive(json!({"tokens": 5, "token_interval_ms": 10, "drop_after_tokens": 2}));
    let fine = sized(5, 10);
    let contents = [
        &drop_mid, &fine, &drop_mid, &fine, &fine, &drop_mid, &fine, &fine,
    ];
    let runs = contents
        .iter()
        .map(|c| fleet.dispatcher.run(spec("m", c, json!({})), |_| {}));
    let results = futures::future::join_all(runs).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 3);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind, ErrorKind::StreamTruncated, "{r}");
    }
    let records = fleet.chat_records(0);
    assert_host_invariants(&records, 2);
    assert!(fleet.sims[0].stats().peak_in_flight <= 2);
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    let c = fleet.status().await.counters;
    assert_eq!(c.started, 8);
    assert_eq!(c.completed + c.failed, 8, "each start released once: {c:?}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn unknown_model_triggers_one_coalesced_reread() {
    // upstream TestManifestReRefresh: gpu1 lists nothing at first and model-b later.
    let fleet = Fleet::start(vec![
        host(&["model-a"]),
        host(&["model-b"])
            .sim(|c| c.manifest_sequence = Some(vec![vec![], vec!["model-b".into()]])),
    ])
    .await;
    let runs = (0..5).map(|_| {
        fleet
            .dispatcher
            .run(spec("model-b", "hi", json!({})), |_| {})
    });
    for r in futures::future::join_all(runs).await {
        assert_eq!(r.unwrap().host, "gpu1");
    }
    assert_eq!(
        fleet.sims[1].stats().manifest_calls,
        2,
        "start-up read plus one re-read for five requests"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_model_no_host_lists_fails_fast_after_one_reread() {
    let fleet = Fleet::start(vec![host(&["model-a"]), host(&["model-b"])]).await;
    let err = fleet
        .dispatcher
        .run(spec("no-such-model", "hi", json!({})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelNotAvailable);
    assert!(
        err.message
            .contains("Model 'no-such-model' not available on any server"),
        "{err}"
    );
    assert!(!err.retryable);
    assert_eq!(fleet.sims[0].stats().manifest_calls, 2);
    fleet.shutdown().await;
}

#[tokio::test]
async fn no_models_anywhere_names_each_hosts_error() {
    let fleet = Fleet::start(vec![
        host(&["m"]).sim(|c| c.required_key = Some("secret".into())),
        host(&["m"]).sim(|c| c.manifest_status = Some(500)),
    ])
    .await;
    let err = fleet
        .dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoModelsAvailable);
    assert!(
        err.message.contains("No models available from any server"),
        "{err}"
    );
    assert!(
        err.message.contains("gpu0: HTTP 401") && err.message.contains("gpu1: HTTP 500"),
        "{err}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn each_hosts_key_reaches_only_that_host() {
    let fleet = Fleet::start(vec![
        host(&["m"])
            .key("key-for-gpu0")
            .sim(|c| c.required_key = Some("key-for-gpu0".into())),
        host(&["m", "n"]),
    ])
    .await;
    let runs = (0..4).map(|_| {
        fleet
            .dispatcher
            .run(spec("m", &sized(3, 10), json!({})), |_| {})
    });
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    // A per-request key overrides the host's (n is only on gpu1).
    let r = fleet
        .dispatcher
        .run(
            spec("n", "hi", json!({"api_key": "per-request-key"})),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(r.host, "gpu1");
    let gpu0 = fleet.sims[0].records();
    let gpu1 = fleet.sims[1].records();
    assert!(
        gpu0.iter().any(|r| r.path == "/v1/models")
            && gpu0.iter().any(|r| r.path == "/v1/chat/completions")
    );
    for r in &gpu0 {
        assert_eq!(r.auth.as_deref(), Some("Bearer key-for-gpu0"), "{r:?}");
    }
    for r in &gpu1 {
        assert_ne!(
            r.auth.as_deref(),
            Some("Bearer key-for-gpu0"),
            "gpu0's key leaked to gpu1: {r:?}"
        );
        if r.model.as_deref() == Some("n") {
            assert_eq!(r.auth.as_deref(), Some("Bearer per-request-key"));
        } else {
            assert_eq!(r.auth, None, "no key, no header: {r:?}");
        }
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn queue_wait_is_reported_apart_from_latency() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let (first, second) = tokio::join!(
        fleet
            .dispatcher
            .run(spec("m", &sized(5, 40), json!({})), |_| {}),
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            fleet
                .dispatcher
                .run(spec("m", &sized(1, 0), json!({})), |_| {})
                .await
        }
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(
        second.queue_wait_ms >= first.latency_ms * 0.5,
        "{second:?} / {first:?}"
    );
    assert!(
        second.latency_ms < first.latency_ms,
        "queue wait is not part of latency"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_dead_host_is_reported_and_the_rest_of_the_fleet_serves() {
    // upstream: server0 refuses connections → only server1's models are listed, server0 is
    // unreachable, and work still flows.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let config = prix_dispatch::Config::with_hosts(
        prix_dispatch::config::ConfigSource::Environment,
        vec![
            prix_dispatch::config::HostConfig {
                name: "dead".into(),
                base_url: dead_url.clone(),
                slots: 1,
                api_key: None,
                ..prix_dispatch::config::HostConfig::default()
            },
            prix_dispatch::config::HostConfig {
                name: "alive".into(),
                base_url: fleet.sims[0].url(),
                slots: 1,
                api_key: None,
                ..prix_dispatch::config::HostConfig::default()
            },
        ],
    );
    let dispatcher = prix_dispatch::Dispatcher::start(&config);
    let r = dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await
        .unwrap();
    assert_eq!(r.host, "alive");
    let status = dispatcher.status().await.unwrap();
    let dead_host = &status.hosts[0];
    assert!(!dead_host.reachable && dead_host.state.models.is_empty());
    let why = dead_host.state.last_error.as_deref().unwrap();
    assert!(why.to_lowercase().contains("connect"), "{why}");
    assert_eq!(dead_host.url, dead_url);
    dispatcher.shutdown();
    fleet.shutdown().await;
}

#[tokio::test]
async fn queue_timeout_fails_the_waiting_task_and_not_the_running_one() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let d = &fleet.dispatcher;
    let (running, waiting) =
        tokio::join!(d.run(spec("m", &sized(4, 50), json!({})), |_| {}), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            d.run(
                spec("m", "hi", json!({"queue_timeout_seconds": 0.1})),
                |_| {},
            )
            .await
        });
    let e = waiting.unwrap_err();
    assert_eq!(e.kind, ErrorKind::QueueTimeout);
    assert!(e.message.contains("timeout") && e.retryable, "{e}");
    running.expect("the running task keeps its slot and finishes");
    assert_eq!(
        fleet.chat_records(0).len(),
        1,
        "the timed-out task never reached the host"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn sequential_models_on_one_host_follow_each_other() {
    // upstream: only s0 lists [A, B]; A then B gives exactly [A, B] on s0 (the guard resets).
    let fleet = Fleet::start(vec![host(&["model-a", "model-b"]).slots(2), host(&[])]).await;
    for m in ["model-a", "model-b"] {
        fleet
            .dispatcher
            .run(spec(m, "hi", json!({})), |_| {})
            .await
            .unwrap();
    }
    let models: Vec<String> = fleet
        .chat_records(0)
        .iter()
        .filter_map(|r| r.model.clone())
        .collect();
    assert_eq!(models, ["model-a", "model-b"]);
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}
