//! A task waiting because every host that lists its model is down hears why, with the host
//! and its error, not only "queued, position 1" until `host_wait_seconds` runs out (found by
//! a QA pass); and when a host comes back, it runs.

mod common;

use std::time::Duration;

use common::{Fleet, host, quick, spec};
use prix_dispatch::scheduler::state::Health;
use prix_dispatch::task::TaskEvent;
use serde_json::json;

#[tokio::test]
async fn a_task_whose_only_host_is_down_is_told_which_and_why_then_runs_when_it_returns() {
    let mut fleet = Fleet::start_tuned(vec![host(&["m"]).behaviour(quick(2, 1))], |c| {
        c.health.probe_interval = Duration::from_millis(100);
        c.health.manifest_refresh = Duration::from_secs(3600);
        c.queue.host_wait = Duration::from_secs(20);
    })
    .await;
    fleet.dispatcher.refresh_manifests().await.unwrap();
    let killed = fleet.kill(0).await;

    // Sent to the host that still looks up, it fails before a byte; the host is marked down
    // and the task waits for it, told why.
    let mut handle = fleet
        .dispatcher
        .submit(spec("m", "hi", json!({})))
        .expect("accepted");
    let why = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match handle.next().await {
                Some(TaskEvent::NoHost { position, why }) => return (position, why),
                Some(TaskEvent::Failed(e)) => panic!("failed before being told: {e}"),
                Some(TaskEvent::Finished(_)) | None => panic!("ended before being told"),
                Some(_) => {}
            }
        }
    })
    .await
    .expect("told within 10 s");
    assert_eq!(why.0, 1);
    assert!(
        why.1.starts_with("gpu0 is down: ") && why.1.contains("host_wait_seconds"),
        "{}",
        why.1
    );
    assert_eq!(fleet.status().await.hosts[0].state.health, Health::Down);

    // The host comes back: the task runs there.
    fleet.revive(0, killed).await;
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        prix_dispatch::dispatcher::finish(&mut handle, |_| {}),
    )
    .await
    .expect("runs within 10 s of the host's return")
    .expect("completes");
    assert_eq!(result.host, "gpu0");
    fleet.shutdown().await;
}
