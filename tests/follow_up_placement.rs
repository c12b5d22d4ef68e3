//! A call a client sends the moment its previous answer arrives finds that answer's slot free.
//!
//! A slot used to ask for its next task only after its client had heard the end: a follow-up
//! sent at once could find the host still "busy" and go to another, warm but more versatile
//! host, where a model only that host lists then waited behind it (the real-server test saw
//! it once in CI: the shared model's long task took `gpu1` and `gpu1`'s own model waited).

mod common;

use common::{Fleet, host, quick, spec};
use prix_dispatch::scheduler::TaskHandle;
use prix_dispatch::task::TaskEvent;
use serde_json::json;

async fn started_on(handle: &mut TaskHandle) -> String {
    loop {
        match handle.next().await {
            Some(TaskEvent::Started { host, .. }) => return host,
            Some(TaskEvent::Failed(e)) => panic!("failed: {e}"),
            None | Some(TaskEvent::Finished(_)) => panic!("ended before starting"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_call_takes_the_host_its_last_answer_came_from() {
    // gpu0 lists the shared model only; gpu1 lists it and one of its own, and holds both at
    // once, so the shared model is warm on both and only the versatility rule prefers gpu0.
    let fleet = Fleet::start(vec![
        host(&["shared"])
            .behaviour(quick(2, 1))
            .sim(|s| s.initially_loaded = Some("shared".into())),
        host(&["shared", "only-b"]).behaviour(quick(2, 1)).sim(|s| {
            s.max_loaded_models = Some(2);
            s.initially_loaded = Some("shared".into());
        }),
    ])
    .await;
    let mut misplaced = Vec::new();
    for round in 0..200 {
        let first = fleet
            .dispatcher
            .run(spec("shared", "first", json!({})), |_| {})
            .await
            .expect("completes");
        assert_eq!(first.host, "gpu0", "round {round}: the less versatile host");
        // Sent on hearing the answer, as an agent or a fan-out client does.
        let mut shared = fleet
            .dispatcher
            .submit(spec("shared", "follow-up", json!({})))
            .expect("accepted");
        let mut only_b = fleet
            .dispatcher
            .submit(spec("only-b", "follow-up", json!({})))
            .expect("accepted");
        let hosts = (started_on(&mut shared).await, started_on(&mut only_b).await);
        if hosts != ("gpu0".to_owned(), "gpu1".to_owned()) {
            misplaced.push((round, hosts));
        }
        for mut handle in [shared, only_b] {
            prix_dispatch::dispatcher::finish(&mut handle, |_| {})
                .await
                .expect("completes");
        }
    }
    assert!(
        misplaced.is_empty(),
        "follow-ups that did not find their host free (round, (shared, only-b)): {misplaced:?}"
    );
    for i in 0..2 {
        common::assert_host_invariants(&fleet.chat_records(i), 1);
    }
    fleet.shutdown().await;
}
