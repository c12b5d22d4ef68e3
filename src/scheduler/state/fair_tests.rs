//! Fair share, priorities and aging, judged from what the simulated hosts ran (issue 13's
//! targets), on the discrete-event harness of the swap tests.

use std::time::Duration;

use super::swap_tests::Run;

const S: Duration = Duration::from_secs(1);

#[test]
fn two_clients_that_queue_at_once_finish_together() {
    // Two warm one-slot hosts, two clients each sending 100 tasks of one model at one instant.
    let m: &[&str] = &["m"];
    let mut run = Run::new(&[(m, m), (m, m)], S, 5 * S, Duration::from_secs(30));
    let mut ids = [Vec::new(), Vec::new()];
    for _ in 0..100 {
        ids[0].push(run.submit_from("m", "a", 0));
    }
    for _ in 0..100 {
        ids[1].push(run.submit_from("m", "b", 0));
    }
    run.finish();
    let last = |c: usize| {
        ids[c]
            .iter()
            .map(|id| run.ended_at[id] - run.t0)
            .max()
            .unwrap()
    };
    let (a, b) = (last(0).as_secs_f64(), last(1).as_secs_f64());
    assert!(
        (a - b).abs() <= 0.1 * a.max(b),
        "client a's last task ended at {a} s, b's at {b} s"
    );
    assert_eq!(run.loads(), 0);
}

#[test]
fn an_agents_call_beside_a_battery_starts_within_one_task() {
    // One warm host; a 500-task battery queued; an agent's single call 0.5 s later.
    let m: &[&str] = &["m"];
    let mut run = Run::new(&[(m, m)], S, 5 * S, Duration::from_secs(30));
    for _ in 0..500 {
        run.submit_from("m", "battery", 0);
    }
    let t = run.now + Duration::from_millis(500);
    run.run_until(Some(t));
    let call = run.submit_from("m", "agent", 0);
    run.finish();
    let waited = run.started_at[&call] - t;
    assert!(waited <= S, "the call waited {waited:?} behind the battery");
}

#[test]
fn an_urgent_call_of_the_same_client_goes_ahead_of_its_battery() {
    let m: &[&str] = &["m"];
    let mut run = Run::new(&[(m, m)], S, 5 * S, Duration::from_secs(30));
    for _ in 0..50 {
        run.submit_from("m", "prix", 0);
    }
    let t = run.now + Duration::from_millis(500);
    run.run_until(Some(t));
    let judge = run.submit_from("m", "prix", -1);
    run.finish();
    let waited = run.started_at[&judge] - t;
    assert!(waited <= S, "the priority -1 call waited {waited:?}");
}

#[test]
fn a_call_for_a_model_not_resident_starts_within_a_task_and_a_load() {
    // The host holds a; a battery of a runs; an agent asks for b.
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(&[(ab, &["a"])], S, 5 * S, Duration::from_secs(30));
    for _ in 0..200 {
        run.submit_from("a", "battery", 0);
    }
    let t = run.now + Duration::from_millis(500);
    run.run_until(Some(t));
    let call = run.submit_from("b", "agent", -1);
    run.finish();
    let waited = run.started_at[&call] - t;
    // It starts after the running task (the load then runs as its own first-token time).
    assert!(waited <= S, "the call for b waited {waited:?}");
}

#[test]
fn random_clients_priorities_and_arrivals_keep_order_and_bound_every_wait() {
    // A cheap deterministic generator: clients, priorities and arrival gaps vary.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let ab: &[&str] = &["a", "b"];
    for round in 0..5 {
        let mut run = Run::new(
            &[(ab, &["a"]), (ab, &["b"])],
            S,
            3 * S,
            Duration::from_secs(30),
        );
        let mut meta = Vec::new();
        for _ in 0..150 {
            let client = ["x", "y", "z", "w"][next(4) as usize];
            let priority = [0, 0, 0, -1, 1][next(5) as usize];
            let model = ab[next(2) as usize];
            let at = run.now;
            let id = run.submit_from(model, client, priority);
            meta.push((id, client, priority, at));
            let gap = Duration::from_millis(next(800));
            run.run_until(Some(run.now + gap));
        }
        run.finish();
        // Every task ran (finish asserts it) and none waited beyond a bound: 150 one-second
        // tasks on two hosts take about 75 s; aging lets none wait much longer than that.
        for &(id, client, priority, at) in &meta {
            let waited = run.started_at[&id] - at;
            assert!(
                waited <= Duration::from_secs(120),
                "round {round}: task {id} ({client}, priority {priority}) waited {waited:?}"
            );
        }
        // First come, first served within a client, model and priority.
        for &(id, client, priority, _) in &meta {
            for &(other, c2, p2, _) in &meta {
                if other > id && c2 == client && p2 == priority {
                    let same_model = run.state_model(id) == run.state_model(other);
                    if same_model {
                        assert!(
                            run.started_at[&id] <= run.started_at[&other],
                            "round {round}: {client}'s task {other} started before its older {id}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_flood_of_urgent_calls_passes_a_batch_task_over_for_one_step_at_most() {
    // One host, one-second tasks; a batch task, then two priority -1 calls a second from
    // other clients for three minutes: the batch task starts once its priority has been
    // passed over for one step.
    let m: &[&str] = &["m"];
    let mut run = Run::new(&[(m, m)], S, 5 * S, Duration::from_secs(3600));
    run.submit_from("m", "x", -1);
    let batch = run.submit_from("m", "batch", 0);
    let mut n = 0;
    let t0 = run.now;
    while run.now - t0 < Duration::from_secs(180) {
        n += 1;
        let client = if n % 2 == 0 { "x" } else { "y" };
        run.submit_from("m", client, -1);
        run.submit_from("m", client, -1);
        let t = run.now + S;
        run.run_until(Some(t));
    }
    run.finish();
    let waited = run.started_at[&batch] - t0;
    assert!(
        waited >= Duration::from_secs(30),
        "urgent calls went first for a while: {waited:?}"
    );
    assert!(
        waited <= super::fair::PRIORITY_STEP + 2 * S,
        "the batch task waited {waited:?}"
    );
}

#[test]
fn a_client_that_withdrew_its_battery_is_not_pushed_behind_for_it() {
    // Two clients queue 40 tasks each on one warm host; one cancels what it still has queued
    // (a user stopping an evaluation run) and a moment later sends one call.
    let m: &[&str] = &["m"];
    let mut run = Run::new(&[(m, m)], S, 5 * S, Duration::from_secs(300));
    let quitter: Vec<u64> = (0..40)
        .map(|_| run.submit_from("m", "quitter", 0))
        .collect();
    for _ in 0..40 {
        run.submit_from("m", "battery", 0);
    }
    let t = run.now + Duration::from_millis(3_500);
    run.run_until(Some(t));
    let withdrawn = quitter.iter().filter(|&&id| run.cancel(id)).count();
    assert!(withdrawn >= 35, "only {withdrawn} were still queued");
    let call = run.submit_from("m", "quitter", 0);
    run.finish();
    let waited = run.started_at[&call] - t;
    assert!(
        waited <= 2 * S,
        "the call waited {waited:?}: the withdrawn tasks still counted as its share"
    );
}
