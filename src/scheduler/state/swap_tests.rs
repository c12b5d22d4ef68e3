//! Swap-aware placement on hosts that pay for switching models: a small discrete-event run of
//! the state machine where a host holds `max_loaded` models (LRU) and a task for any other
//! model first pays the load. Loads are counted from the simulated hosts, not from the
//! scheduler's belief.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::costs::Observed;
use super::*;
use crate::error::HostSignal;

use super::test_job::Job;

/// A simulated GPU: what it really holds, and every load it made.
pub(super) struct Gpu {
    models: Vec<String>,
    resident: Vec<String>,
    loads: usize,
}

pub(super) struct Run {
    state: DispatchState<Job>,
    gpus: Vec<Gpu>,
    pub(super) t0: Instant,
    pub(super) now: Instant,
    next: u64,
    /// (finish time, host, task, model, cold, ttft)
    running: Vec<(Instant, usize, u64, String, bool, Duration)>,
    task: Duration,
    load: Duration,
    /// First bytes still to report: (time, host, task).
    first_bytes: Vec<(Instant, usize, u64)>,
    started_on: BTreeMap<u64, usize>,
    /// When each task started and ended.
    pub(super) started_at: BTreeMap<u64, Instant>,
    pub(super) ended_at: BTreeMap<u64, Instant>,
    models_of: BTreeMap<u64, String>,
}

impl Run {
    /// One-slot hosts; `hosts[i]` lists those models and holds `resident[i]` at the start.
    pub(super) fn new(
        hosts: &[(&[&str], &[&str])],
        task: Duration,
        load: Duration,
        bypass: Duration,
    ) -> Run {
        let t0 = Instant::now();
        let mut state = DispatchState::new(
            hosts.iter().enumerate().map(|(i, _)| (format!("h{i}"), 1)),
            Limits {
                max_bypass: bypass,
                ..Limits::default()
            },
        );
        state.start();
        let reports = hosts
            .iter()
            .enumerate()
            .map(|(i, (models, resident))| ManifestReport {
                host: HostId(i),
                models: Ok(models.iter().map(|m| m.to_string()).collect()),
                loaded: Some(resident.iter().map(|m| m.to_string()).collect()),
            })
            .collect();
        state.manifests_read(reports, t0);
        let gpus = hosts
            .iter()
            .map(|(models, resident)| Gpu {
                models: models.iter().map(|m| m.to_string()).collect(),
                resident: resident.iter().map(|m| m.to_string()).collect(),
                loads: 0,
            })
            .collect();
        let mut run = Run {
            state,
            gpus,
            t0,
            now: t0,
            next: 0,
            running: Vec::new(),
            task,
            load,
            first_bytes: Vec::new(),
            started_on: BTreeMap::new(),
            started_at: BTreeMap::new(),
            ended_at: BTreeMap::new(),
            models_of: BTreeMap::new(),
        };
        for i in 0..hosts.len() {
            let d = run.state.worker_idle(HostId(i), t0);
            run.apply(d);
        }
        run
    }

    pub(super) fn submit(&mut self, model: &str) -> u64 {
        self.submit_from(model, "c", 0)
    }

    /// A task from `client` with `priority`; returns its id.
    pub(super) fn submit_from(&mut self, model: &str, client: &str, priority: i32) -> u64 {
        self.next += 1;
        let job = Job::from(self.next, model, self.now, client, priority);
        self.models_of.insert(self.next, model.to_string());
        let d = self.state.submit(job, self.now);
        self.apply(d);
        self.next
    }

    /// The client of waiting task `id` gives up; whether it was still waiting.
    pub(super) fn cancel(&mut self, id: u64) -> bool {
        let (task, d) = self.state.cancel(TaskId(id), self.now);
        self.apply(d);
        task.is_some()
    }

    fn apply(&mut self, decisions: Vec<Decision<Job>>) {
        for d in decisions {
            if let Decision::Start {
                task,
                host,
                cold: believed_cold,
                ..
            } = d
            {
                let gpu = &mut self.gpus[host.0];
                assert!(gpu.models.contains(&task.model));
                let cold = !gpu.resident.contains(&task.model);
                if cold {
                    gpu.loads += 1;
                    gpu.resident = vec![task.model.clone()];
                }
                let ttft = if cold { self.load } else { Duration::ZERO };
                self.first_bytes.push((self.now + ttft, host.0, task.id));
                // The worker reports what the scheduler believed; the first token tells the truth.
                self.running.push((
                    self.now + ttft + self.task,
                    host.0,
                    task.id,
                    task.model.clone(),
                    believed_cold,
                    ttft,
                ));
                self.started_on.insert(task.id, host.0);
                self.started_at.insert(task.id, self.now);
                assert!(
                    self.running.iter().filter(|r| r.1 == host.0).count() <= 1,
                    "slot bound broken on h{}",
                    host.0
                );
            }
        }
    }

    /// Runs until nothing runs and nothing waits; returns the makespan.
    pub(super) fn finish(&mut self) -> Duration {
        self.run_until(None);
        assert_eq!(self.state.waiting().count(), 0, "every task ran");
        self.now - self.t0
    }

    /// Runs the events due up to `until` (all of them with `None`), then stands at `until`.
    pub(super) fn run_until(&mut self, until: Option<Instant>) {
        loop {
            let next_fb = self.first_bytes.iter().map(|f| f.0).min();
            let next_end = self.running.iter().map(|r| r.0).min();
            let next_tick = self.state.next_deadline();
            let Some(at) = [next_fb, next_end, next_tick].into_iter().flatten().min() else {
                break;
            };
            if until.is_some_and(|u| at > u) {
                break;
            }
            self.now = self.now.max(at);
            if let Some(i) = self.first_bytes.iter().position(|f| f.0 <= self.now) {
                let (_, host, id) = self.first_bytes.swap_remove(i);
                let d = self.state.first_byte(HostId(host), TaskId(id), self.now);
                self.apply(d);
                continue;
            }
            if let Some(i) = self.running.iter().position(|r| r.0 <= self.now) {
                let (_, host, id, model, cold, ttft) = self.running.swap_remove(i);
                self.ended_at.insert(id, self.now);
                let d = self.state.released(
                    HostId(host),
                    Release {
                        outcome: Outcome::Completed,
                        signal: HostSignal::Healthy,
                        retry: None,
                        observed: Some((
                            model,
                            Observed {
                                cold,
                                ttft: Some(ttft + Duration::from_millis(1)),
                                service: ttft + self.task,
                            },
                        )),
                    },
                    self.now,
                );
                self.apply(d);
                let d = self.state.worker_idle(HostId(host), self.now);
                self.apply(d);
                continue;
            }
            let d = self.state.tick(self.now);
            self.apply(d);
            if self.running.is_empty() && self.state.waiting().next().is_none() {
                break;
            }
        }
        if let Some(u) = until {
            self.now = self.now.max(u);
        }
    }

    /// The model of task `id`, as submitted.
    pub(super) fn state_model(&self, id: u64) -> &str {
        &self.models_of[&id]
    }

    pub(super) fn loads(&self) -> usize {
        self.gpus.iter().map(|g| g.loads).sum()
    }
}

const S: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(3600);

#[test]
fn an_interleaved_battery_on_hosts_that_hold_one_model_loads_each_model_about_once() {
    // Two one-slot hosts listing four models, holding none; a load costs 5 tasks; the battery
    // arrives test by test (A B C D A B C D …), 10 tests.
    let all: &[&str] = &["a", "b", "c", "d"];
    let mut run = Run::new(&[(all, &[]), (all, &[])], S, 5 * S, LONG);
    for _ in 0..10 {
        for m in all {
            run.submit(m);
        }
    }
    let makespan = run.finish();
    // At least one load per model; the bound from shared/reference/placement.md: all work and
    // all loads over two hosts.
    let minimum = 4;
    let bound = (40 * S + 4 * 5 * S) / 2;
    assert!(
        run.loads() * 2 <= minimum * 3,
        "{} loads for a minimum of {minimum}",
        run.loads()
    );
    assert!(
        bound.as_secs_f64() / makespan.as_secs_f64() >= 0.85,
        "makespan {makespan:?} against a lower bound of {bound:?}"
    );
}

#[test]
fn a_battery_sent_model_by_model_gives_each_model_a_host_before_any_gets_two() {
    // Four empty hosts, four models of 20 tasks sent a a a … b b b … at one instant, a load
    // costing 20 tasks. Each model's first tasks alone would be worth extra copies; the
    // later models arrive microseconds after. One model per host is the schedule the bound
    // allows; any extra copy of an early model makes a later one wait a whole load more.
    let all: &[&str] = &["a", "b", "c", "d"];
    let hosts = [(all, &[][..]); 4];
    let mut run = Run::new(&hosts, S, 20 * S, Duration::from_secs(30));
    for m in all {
        for _ in 0..20 {
            run.submit(m);
        }
    }
    let makespan = run.finish();
    assert_eq!(run.loads(), 4, "one load per host and model");
    assert!(
        makespan <= 20 * S + 20 * S + 2 * S,
        "each host loads once and runs its model's 20 tasks: {makespan:?}"
    );
}

#[test]
fn a_model_being_loaded_does_not_pull_a_second_host_ahead_of_a_model_none_serves() {
    // Two hosts, four models sent model by model; a load (60 s) lasts longer than
    // max_bypass (30 s). While a host loads c, c's backlog is being served, not passed over:
    // the next free host goes to d, which no host serves, not to a second copy of c.
    let all: &[&str] = &["a", "b", "c", "d"];
    let mut run = Run::new(
        &[(all, &[]), (all, &[])],
        S,
        60 * S,
        Duration::from_secs(30),
    );
    for m in all {
        for _ in 0..30 {
            run.submit(m);
        }
    }
    run.finish();
    assert_eq!(run.loads(), 4, "each model loaded once");
}

#[test]
fn warm_hosts_keep_their_models_on_an_interleaved_battery() {
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(&[(ab, &["a"]), (ab, &["b"])], S, 5 * S, LONG);
    for _ in 0..6 {
        run.submit("a");
        run.submit("b");
    }
    run.finish();
    assert_eq!(run.loads(), 0, "no host switched");
}

#[test]
fn a_call_for_a_model_a_busy_host_holds_waits_for_it_instead_of_evicting_another() {
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(&[(ab, &["a"]), (ab, &["b"])], S, 5 * S, LONG);
    let first = run.submit("b");
    assert_eq!(
        run.started_on[&first], 1,
        "b goes to the host that holds it"
    );
    let second = run.submit("b");
    assert!(
        !run.started_on.contains_key(&second),
        "the idle host holding a does not evict it for one task"
    );
    run.finish();
    assert_eq!(run.started_on[&second], 1);
    assert_eq!(run.loads(), 0);
}

#[test]
fn a_backlog_with_no_warm_host_is_loaded_beside_the_work_of_other_models() {
    // Both hosts hold a; a has 20 tasks, b (which nobody holds) 10: one host switches to b
    // early, instead of both finishing a first.
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(&[(ab, &["a"]), (ab, &["a"])], S, 5 * S, LONG);
    for _ in 0..20 {
        run.submit("a");
    }
    for _ in 0..10 {
        run.submit("b");
    }
    let makespan = run.finish();
    // Lower bound: (30 tasks + one load of b) over two hosts.
    assert!(makespan <= Duration::from_secs(20), "{makespan:?}");
    assert!(run.loads() <= 2, "{} loads", run.loads());
}

#[test]
fn a_model_no_warm_host_serves_starts_within_max_bypass() {
    // One host holding a with a long backlog of a: b would strand a, so it waits — but not
    // past max_bypass.
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(&[(ab, &["a"])], S, 5 * S, 4 * S);
    for _ in 0..30 {
        run.submit("a");
    }
    let b = run.submit("b");
    let t_b = run.now;
    // Run until b has started.
    while !run.started_on.contains_key(&b) {
        let at = [
            run.running.iter().map(|r| r.0).min(),
            run.state.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("something is due");
        run.now = at;
        if let Some(i) = run.running.iter().position(|r| r.0 <= run.now) {
            let (_, host, ..) = run.running.swap_remove(i);
            run.first_bytes.clear();
            let d = run.state.released(
                HostId(host),
                Release {
                    outcome: Outcome::Completed,
                    signal: HostSignal::Healthy,
                    retry: None,
                    observed: None,
                },
                run.now,
            );
            run.apply(d);
            let d = run.state.worker_idle(HostId(host), run.now);
            run.apply(d);
        } else {
            let d = run.state.tick(run.now);
            run.apply(d);
        }
    }
    let waited = run.now - t_b;
    // Overdue after 4 s; the host frees at most one task (1 s) later.
    assert!(waited <= 5 * S, "b waited {waited:?}");
}

#[test]
fn the_first_request_for_a_cold_model_runs_alone_until_its_first_byte() {
    let now = Instant::now();
    let mut s: DispatchState<Job> = DispatchState::new([("gpu".to_string(), 2)], Limits::default());
    s.start();
    s.manifests_read(
        vec![ManifestReport {
            host: HostId(0),
            models: Ok(vec!["a".into(), "b".into()]),
            loaded: Some(vec![]),
        }],
        now,
    );
    s.worker_idle(HostId(0), now);
    s.worker_idle(HostId(0), now);
    let job = |id| Job::new(id, "a", now);
    let starts = |d: &[Decision<Job>]| {
        d.iter()
            .filter(|d| matches!(d, Decision::Start { .. }))
            .count()
    };
    let d = s.submit(job(1), now);
    assert!(matches!(d[..], [Decision::Start { cold: true, .. }]));
    assert_eq!(
        starts(&s.submit(job(2), now)),
        0,
        "one request while it loads"
    );
    assert!(s.snapshot().hosts[0].loading);
    assert_eq!(
        starts(&s.first_byte(HostId(0), TaskId(2), now)),
        0,
        "not its load"
    );
    let d = s.first_byte(HostId(0), TaskId(1), now);
    assert!(
        matches!(d[..], [Decision::Start { cold: false, .. }]),
        "then both slots"
    );
}

#[test]
fn the_belief_follows_a_host_that_says_someone_else_loaded_a_model() {
    let abc: &[&str] = &["a", "b", "c"];
    let mut run = Run::new(&[(abc, &["a"]), (abc, &["b"])], S, 5 * S, LONG);
    assert_eq!(run.state.snapshot().hosts[0].resident_models, ["a"]);
    // Someone loaded c on h0 by hand; the next read says so.
    run.gpus[0].resident = vec!["c".into()];
    let now = run.now;
    let d = run.state.manifests_read(
        vec![
            ManifestReport {
                host: HostId(0),
                models: Ok(abc.iter().map(|m| m.to_string()).collect()),
                loaded: Some(vec!["c".into()]),
            },
            ManifestReport {
                host: HostId(1),
                models: Ok(abc.iter().map(|m| m.to_string()).collect()),
                loaded: Some(vec!["b".into()]),
            },
        ],
        now,
    );
    run.apply(d);
    assert_eq!(run.state.snapshot().hosts[0].resident_models, ["c"]);
    let c = run.submit("c");
    assert_eq!(run.started_on[&c], 0, "c goes where it is loaded");
    run.finish();
    assert_eq!(run.loads(), 0);
}

#[test]
fn a_host_that_reports_two_resident_models_is_believed_to_hold_two() {
    let abc: &[&str] = &["a", "b", "c"];
    let run = Run::new(&[(abc, &["a", "b"])], S, 5 * S, LONG);
    let host = &run.state.snapshot().hosts[0];
    assert_eq!(host.max_loaded_models, 2);
    assert_eq!(host.resident_models, ["a", "b"]);
}

#[test]
fn a_client_alternating_two_models_one_call_at_a_time_loads_each_once() {
    let all: &[&str] = &["a", "b", "c", "d"];
    let mut run = Run::new(&[(all, &[]), (all, &[])], S, 5 * S, LONG);
    for i in 0..12 {
        run.submit(if i % 2 == 0 { "a" } else { "b" });
        run.finish();
    }
    assert_eq!(run.loads(), 2, "each model once, on its own host");
}

#[test]
fn a_gate_holder_that_fails_before_its_first_byte_hands_the_gate_to_the_next_request() {
    let now = Instant::now();
    let mut s: DispatchState<Job> = DispatchState::new([("gpu".to_string(), 2)], Limits::default());
    s.start();
    s.manifests_read(
        vec![ManifestReport {
            host: HostId(0),
            models: Ok(vec!["a".into(), "b".into()]),
            loaded: Some(vec![]),
        }],
        now,
    );
    s.worker_idle(HostId(0), now);
    s.worker_idle(HostId(0), now);
    let starts = |d: &[Decision<Job>]| {
        d.iter()
            .filter(|d| matches!(d, Decision::Start { .. }))
            .count()
    };
    assert_eq!(starts(&s.submit(Job::new(1, "a", now), now)), 1);
    // Its client gave up during the load: the host may still be loading `a`.
    let failed = Release {
        outcome: Outcome::Failed,
        signal: HostSignal::Neutral,
        retry: None,
        observed: None,
    };
    s.released(HostId(0), failed, now);
    s.worker_idle(HostId(0), now);
    let d = s.submit(Job::new(2, "a", now), now);
    assert_eq!(starts(&d), 1);
    // Not cold (believed loaded), but gated: its worker must report the first byte, or the
    // host's other slots stay shut until it ends (LM Studio and Ollama have no /slots).
    assert!(
        matches!(
            d[..],
            [Decision::Start {
                cold: false,
                gated: true,
                ..
            }]
        ),
        "{d:?}"
    );
    assert_eq!(
        starts(&s.submit(Job::new(3, "a", now), now)),
        0,
        "still one at a time"
    );
    assert!(s.snapshot().hosts[0].loading);
    assert_eq!(starts(&s.first_byte(HostId(0), TaskId(2), now)), 1);
}

#[test]
fn a_host_configured_to_hold_more_models_than_it_does_is_found_out_by_its_first_tokens() {
    // The configuration says two models fit; each GPU really holds one. Warm-believed tasks
    // that load anyway correct the belief, so the battery is not a load per task.
    let all: &[&str] = &["a", "b", "c", "d"];
    let mut run = Run::new(&[(all, &[]), (all, &[])], S, 5 * S, LONG);
    for h in 0..2 {
        run.state.set_switching(HostId(h), 2, 5 * S);
    }
    for _ in 0..10 {
        for m in all {
            run.submit(m);
        }
    }
    run.finish();
    assert!(run.loads() <= 12, "{} loads for 40 tasks", run.loads());
    assert_eq!(run.state.snapshot().hosts[0].max_loaded_models, 1);
}

#[test]
fn a_holder_with_work_only_it_can_do_hands_its_shared_backlog_to_a_free_host() {
    // h0 lists a, b and c; h1 lists a and b; each holds one model at a time, nothing loaded at
    // the start. A battery of a, b, c interleaved (a in the first three rounds only), sent
    // 20 ms apart (found by a QA pass: h0 took b first and worked through every b while h1,
    // done with a, stood idle, and c, which only h0 lists, waited behind it all).
    let abc: &[&str] = &["a", "b", "c"];
    let ab: &[&str] = &["a", "b"];
    let mut run = Run::new(
        &[(abc, &[]), (ab, &[])],
        S,
        S * 3 / 2,
        Duration::from_secs(30),
    );
    for round in 0..8 {
        for m in ["a", "b", "c"] {
            if m == "a" && round >= 3 {
                continue;
            }
            run.submit(m);
            let t = run.now + Duration::from_millis(20);
            run.run_until(Some(t));
        }
    }
    let makespan = run.finish();
    let order = |h: usize| -> String {
        let mut ids: Vec<(Instant, u64)> = run
            .started_on
            .iter()
            .filter(|(_, host)| **host == h)
            .map(|(id, _)| (run.started_at[id], *id))
            .collect();
        ids.sort();
        ids.iter().map(|(_, id)| run.state_model(*id)).collect()
    };
    let (h0, h1) = (order(0), order(1));
    // Before: 19.0 s, h0 "bbbbbbbbcccccccc", h1 "aaa" then idle. Turning to c once h1 was
    // free to load b: 14.0 s. Turning to c as soon as h1 would be free before h0 had run
    // through b: 13.0 s, h0 "bcccccccc", h1 "aaabbbbbbb" (the bound: 11.75 s).
    assert!(
        makespan <= Duration::from_millis(13_500),
        "makespan {makespan:?}: h0 ran {h0}, h1 ran {h1}"
    );
    assert!(
        h1.contains('b'),
        "h1 never took b: h0 ran {h0}, h1 ran {h1}"
    );
}
