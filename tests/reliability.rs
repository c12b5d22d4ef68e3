//! Hosts that fail and return, retries, timeouts, backpressure, crashes and bad input:
//! every task either completes or fails with a clear error, and nothing hangs.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, host, quick, spec};
use prix_dispatch::ErrorKind;
use prix_dispatch::scheduler::state::Health;
use prix_dispatch::sim::{Outcome, sim_directive};
use prix_dispatch::task::TaskEvent;
use serde_json::json;

fn fast_health(config: &mut prix_dispatch::Config) {
    config.health.probe_interval = Duration::from_millis(100);
    config.health.manifest_refresh = Duration::from_secs(3600);
}

fn sized(tokens: usize, interval_ms: u64) -> String {
    sim_directive(json!({"tokens": tokens, "token_interval_ms": interval_ms}))
}

#[tokio::test]
async fn a_dead_host_leaves_rotation_its_tasks_run_elsewhere_and_it_returns_by_itself() {
    let mut fleet = Fleet::start_tuned(
        vec![
            host(&["m"]).behaviour(quick(3, 5)),
            host(&["m"]).behaviour(quick(3, 5)),
        ],
        fast_health,
    )
    .await;
    fleet.dispatcher.refresh_manifests().await.unwrap();
    let killed = fleet.kill(1).await;

    // Both hosts look idle: half of these go to the dead one first, fail before any byte,
    // and run on gpu0 instead.
    let runs = (0..6).map(|_| fleet.dispatcher.run(spec("m", "hi", json!({})), |_| {}));
    let results: Vec<_> = futures::future::join_all(runs).await;
    for r in &results {
        let r = r.as_ref().expect("every task completes on the live host");
        assert_eq!(r.host, "gpu0");
    }
    assert!(
        results.iter().any(|r| r.as_ref().unwrap().attempts == 2),
        "one was retried"
    );
    let status = fleet.status().await;
    assert_eq!(status.hosts[1].state.health, Health::Down);
    assert!(!status.hosts[1].reachable);
    assert!(status.counters.retried >= 1);
    assert_eq!(status.counters.completed, 6);

    // Back on the same port: probed, re-read, in rotation without anyone calling list_models.
    fleet.revive(1, killed).await;
    fleet
        .wait_status(Duration::from_secs(3), |s| {
            s.hosts[1].state.health == Health::Up
        })
        .await;
    let runs = (0..4).map(|_| {
        fleet
            .dispatcher
            .run(spec("m", &sized(3, 20), json!({})), |_| {})
    });
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    assert!(
        !fleet.chat_records(1).is_empty(),
        "the revived host takes work again"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_host_that_resets_connections_is_retried_elsewhere_once() {
    let fleet = Fleet::start_tuned(
        vec![
            host(&["m"]).sim(|c| c.reset_connections = true),
            host(&["m", "other"]).behaviour(quick(2, 1)),
        ],
        |c| {
            fast_health(c);
            c.health.probe_interval = Duration::from_secs(60);
        },
    )
    .await;
    // The manifest read of gpu0 fails too (reset): make it look alive first.
    fleet.sims[0].update_config(|c| c.reset_connections = false);
    fleet.dispatcher.refresh_manifests().await.unwrap();
    fleet.sims[0].update_config(|c| c.reset_connections = true);
    fleet.sims[0].cut_connections();

    let r = fleet
        .dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (r.host.as_str(), r.attempts),
        ("gpu1", 2),
        "gpu0 is least versatile, so tried first"
    );
    assert!(fleet.sims[0].stats().connections_reset >= 1);
    assert_eq!(fleet.status().await.hosts[0].state.health, Health::Down);

    // With max_attempts = 1 there is no second try: a clear connection error.
    let fleet1 = Fleet::start_tuned(vec![host(&["m"])], |c| {
        c.queue.max_attempts = 1;
        c.health.probe_interval = Duration::from_secs(60);
    })
    .await;
    fleet1.dispatcher.refresh_manifests().await.unwrap();
    fleet1.sims[0].update_config(|c| c.reset_connections = true);
    fleet1.sims[0].cut_connections();
    let e = fleet1
        .dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connection);
    assert!(
        e.message.contains("connection to gpu0") && e.retryable,
        "{e}"
    );
    fleet.shutdown().await;
    fleet1.shutdown().await;
}

#[tokio::test]
async fn output_that_reached_the_client_is_never_retried() {
    let fleet = Fleet::start(vec![host(&["m"]), host(&["m"])]).await;
    let content =
        sim_directive(json!({"tokens": 5, "token_interval_ms": 5, "drop_after_tokens": 2}));
    let mut deltas = 0;
    let e = fleet
        .dispatcher
        .run(spec("m", &content, json!({})), |ev| {
            if matches!(ev, TaskEvent::Delta(_)) {
                deltas += 1;
            }
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::StreamTruncated);
    assert_eq!(deltas, 2, "the client saw output");
    let sent: usize = (0..2).map(|i| fleet.chat_records(i).len()).sum();
    assert_eq!(sent, 1, "no second attempt after output");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_slow_first_token_or_a_timeout_does_not_mark_a_healthy_host_dead() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let slow = sim_directive(json!({"ttft_ms": 400, "tokens": 1}));
    let e = fleet
        .dispatcher
        .run(
            spec("m", &slow, json!({"first_token_timeout_seconds": 0.1})),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(e.message.starts_with("first-token timeout"), "{e}");
    let hang = sim_directive(json!({"tokens": 3, "hang_after_tokens": 1}));
    let e = fleet
        .dispatcher
        .run(spec("m", &hang, json!({"timeout_seconds": 0.1})), |_| {})
        .await
        .unwrap_err();
    assert!(e.message.starts_with("inactivity timeout"), "{e}");
    let status = fleet.status().await;
    assert_eq!(status.hosts[0].state.health, Health::Up);
    // A model that takes a while to load is fine within first_token_timeout_seconds.
    let r = fleet
        .dispatcher
        .run(
            spec(
                "m",
                &slow,
                json!({"first_token_timeout_seconds": 5, "timeout_seconds": 0.1}),
            ),
            |_| {},
        )
        .await
        .unwrap();
    assert!(r.ttft_ms.unwrap() >= 400.0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn repeated_server_errors_cool_a_host_down() {
    let fleet = Fleet::start_tuned(
        vec![
            host(&["m"]).behaviour(prix_dispatch::sim::Behaviour {
                fail_status: Some(503),
                fail_message: "model crashed".into(),
                ..Default::default()
            }),
            host(&["m"]).behaviour(quick(2, 1)),
        ],
        |c| {
            c.health.failure_threshold = 2;
            c.health.cooldown = Duration::from_millis(700);
        },
    )
    .await;
    // One at a time: each goes to gpu0 (first in order) while it is in rotation.
    let mut errors = 0;
    for _ in 0..6 {
        match fleet
            .dispatcher
            .run(spec("m", "hi", json!({})), |_| {})
            .await
        {
            Ok(r) => assert_eq!(r.host, "gpu1"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::HostError);
                assert!(e.message.contains("HTTP 503") && e.message.contains("model crashed"));
                errors += 1;
            }
        }
    }
    assert_eq!(errors, 2, "the breaker opened after two 5xx in a row");
    assert_eq!(
        fleet.chat_records(0).len(),
        2,
        "a cooling host gets no traffic"
    );
    assert_eq!(fleet.status().await.hosts[0].state.health, Health::Cooling);
    // After the cool-down it is tried again (half-open); one more 5xx cools it again.
    fleet
        .wait_status(Duration::from_secs(3), |s| {
            s.hosts[0].state.health == Health::Up
        })
        .await;
    let _ = fleet
        .dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await;
    assert_eq!(fleet.chat_records(0).len(), 3);
    assert_eq!(fleet.status().await.hosts[0].state.health, Health::Cooling);
    fleet.shutdown().await;
}

#[tokio::test]
async fn manifests_are_re_read_periodically() {
    let fleet = Fleet::start_tuned(
        vec![host(&["m"]).sim(|c| {
            c.manifest_sequence = Some(vec![vec!["m".into()], vec!["m".into(), "n".into()]])
        })],
        |c| c.health.manifest_refresh = Duration::from_millis(200),
    )
    .await;
    let status = fleet
        .wait_status(Duration::from_secs(3), |s| {
            s.hosts[0].state.models.contains(&"n".to_string())
        })
        .await;
    assert_eq!(status.hosts[0].state.models, vec!["m", "n"]);
    fleet.shutdown().await;
}

#[tokio::test]
async fn tasks_wait_for_a_host_to_come_back_then_give_up() {
    let mut fleet = Fleet::start_tuned(vec![host(&["m"]).behaviour(quick(1, 0))], |c| {
        fast_health(c);
        c.queue.host_wait = Duration::from_millis(400);
    })
    .await;
    fleet.dispatcher.refresh_manifests().await.unwrap();
    // The first attempt finds the host gone, marks it down, and the task waits for it.
    let killed = fleet.kill(0).await;
    let started = Instant::now();
    let e = fleet
        .dispatcher
        .run(spec("m", "hi", json!({})), |_| {})
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(e.kind, ErrorKind::ModelNotAvailable);
    assert!(
        e.message.contains("Model 'm' not available on any server")
            && e.message.contains("host_wait_seconds"),
        "{e}"
    );
    assert!(e.message.contains("gpu0:"), "names the host's error: {e}");
    assert!(e.retryable);
    assert!(
        waited >= Duration::from_millis(350),
        "failed too early: {waited:?}"
    );

    // Back within the wait: the task runs.
    let d = fleet.dispatcher.clone();
    let waiting = tokio::spawn(async move { d.run(spec("m", "hi", json!({})), |_| {}).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet.revive(0, killed).await;
    waiting.await.unwrap().expect("the host came back in time");
    fleet.shutdown().await;
}

#[tokio::test]
async fn queue_wait_does_not_count_against_host_timeouts() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let d = &fleet.dispatcher;
    let (long, short) = tokio::join!(d.run(spec("m", &sized(10, 60), json!({})), |_| {}), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.run(
            spec(
                "m",
                &sized(1, 0),
                json!({"timeout_seconds": 0.2, "first_token_timeout_seconds": 0.3}),
            ),
            |_| {},
        )
        .await
    });
    long.unwrap();
    let short = short.expect("0.6 s in the queue is not a host timeout");
    assert!(short.queue_wait_ms > 400.0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn cancellation_reaches_the_host_within_100_ms() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(500, 10))]).await;
    let mut handle = fleet.dispatcher.submit(spec("m", "hi", json!({}))).unwrap();
    while !matches!(handle.next().await, Some(TaskEvent::Delta(_))) {}
    let cancelled_at = std::time::SystemTime::now();
    handle.cancel();
    assert!(fleet.sims[0].wait_idle(Duration::from_secs(1)).await);
    let record = &fleet.chat_records(0)[0];
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    let cancelled_us = cancelled_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let seen_after_ms = record.end_us.unwrap().saturating_sub(cancelled_us) as f64 / 1000.0;
    assert!(
        seen_after_ms < 100.0,
        "the host saw the disconnect {seen_after_ms:.1} ms later"
    );
    // The slot returns after the settle time that lets a host notice the close (src/worker.rs).
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    let status = fleet.status().await;
    assert_eq!(status.counters.cancelled, 1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_drops_nothing() {
    let fleet = Fleet::start_tuned(vec![host(&["m"]).behaviour(quick(3, 20))], |c| {
        c.queue.max_pending = 3
    })
    .await;
    let d = &fleet.dispatcher;
    let mut first = d.submit(spec("m", "hi", json!({}))).unwrap();
    while !matches!(first.next().await, Some(TaskEvent::Started { .. })) {}
    let waiting: Vec<_> = (0..3)
        .map(|_| d.submit(spec("m", "hi", json!({}))).unwrap())
        .collect();
    let e = d.run(spec("m", "hi", json!({})), |_| {}).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::QueueFull);
    assert!(
        e.message.contains("queue full (3 pending)") && e.retryable,
        "{e}"
    );
    prix_dispatch::dispatcher::finish(&mut first, |_| {})
        .await
        .unwrap();
    for mut h in waiting {
        prix_dispatch::dispatcher::finish(&mut h, |_| {})
            .await
            .expect("no queued task is dropped");
    }
    let c = fleet.status().await.counters;
    assert_eq!((c.submitted, c.completed, c.rejected), (5, 4, 1));
    fleet.shutdown().await;
}

#[tokio::test]
async fn graceful_drain_finishes_running_tasks_and_refuses_the_rest() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(5, 40))]).await;
    let d = &fleet.dispatcher;
    let mut running = d.submit(spec("m", "hi", json!({}))).unwrap();
    while !matches!(running.next().await, Some(TaskEvent::Started { .. })) {}
    let mut queued = d.submit(spec("m", "hi", json!({}))).unwrap();
    let drained = d.drain(Duration::from_secs(5));
    let (drained, ran, refused) = tokio::join!(
        drained,
        prix_dispatch::dispatcher::finish(&mut running, |_| {}),
        prix_dispatch::dispatcher::finish(&mut queued, |_| {}),
    );
    assert!(drained, "the running task finished within the grace period");
    ran.expect("running tasks finish");
    let e = refused.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ShuttingDown);
    assert!(e.message.contains("shutting down") && e.retryable);
    assert_eq!(fleet.chat_records(0).len(), 1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_grace_period_that_runs_out_stops_the_running_tasks() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(100, 20))]).await;
    let mut running = fleet.dispatcher.submit(spec("m", "hi", json!({}))).unwrap();
    while !matches!(running.next().await, Some(TaskEvent::Started { .. })) {}
    assert!(!fleet.dispatcher.drain(Duration::from_millis(100)).await);
    let e = prix_dispatch::dispatcher::finish(&mut running, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.kind,
            ErrorKind::Cancelled | ErrorKind::ShuttingDown | ErrorKind::SchedulerStopped
        ),
        "{e}"
    );
    assert!(
        fleet.sims[0].wait_idle(Duration::from_secs(1)).await,
        "host connection dropped"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_scheduler_panic_fails_every_waiting_client_at_once() {
    let fleet = Fleet::start(vec![host(&["m"]).behaviour(quick(50, 20))]).await;
    let d = &fleet.dispatcher;
    let mut running = d.submit(spec("m", "hi", json!({}))).unwrap();
    while !matches!(running.next().await, Some(TaskEvent::Started { .. })) {}
    let mut queued = d.submit(spec("m", "hi", json!({}))).unwrap();
    assert!(matches!(
        queued.next().await,
        Some(TaskEvent::Queued { .. })
    ));
    let at = Instant::now();
    d.inject_scheduler_panic();
    let e = prix_dispatch::dispatcher::finish(&mut queued, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::SchedulerStopped);
    assert!(e.message.contains("Dispatcher loop stopped"), "{e}");
    tokio::time::timeout(Duration::from_secs(1), d.crashed())
        .await
        .expect("the crash is reported");
    // "At once": long before the 1 s the running task still had to go (generous for CI load).
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    let e = d.run(spec("m", "hi", json!({})), |_| {}).await.unwrap_err();
    assert_eq!(
        e.kind,
        ErrorKind::SchedulerStopped,
        "new work fails at once too"
    );
    drop(running);
    fleet.shutdown().await;
}

#[tokio::test]
async fn malformed_host_output_fails_the_task_not_the_daemon() {
    let fleet = Fleet::start(vec![host(&["m"])]).await;
    let d = &fleet.dispatcher;
    let huge = sim_directive(json!({"tokens": 1, "garbage_line_bytes": 9 * 1024 * 1024}));
    let e = d
        .run(spec("m", &huge, json!({})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Protocol);
    assert!(e.message.contains("over 8 MiB"), "{e}");

    let endless = sim_directive(json!({"tokens": 100_000, "ignore_max_tokens": true}));
    let e = d
        .run(spec("m", &endless, json!({"max_tokens": 10})), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Protocol);
    assert!(e.message.contains("past max_tokens (10)"), "{e}");
    assert!(
        fleet.sims[0].wait_idle(Duration::from_secs(1)).await,
        "the endless stream was cut"
    );

    // Small garbage lines are skipped; the daemon keeps serving.
    let small = sim_directive(json!({"tokens": 2, "garbage_line_bytes": 100, "malformed": true}));
    assert_eq!(
        d.run(spec("m", &small, json!({})), |_| {})
            .await
            .unwrap()
            .text,
        "tok0 tok1 "
    );
    fleet.assert_all_slots_return(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}
