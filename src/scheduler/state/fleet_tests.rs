//! Reloads while tasks run: hosts join, leave and change slots; no slot bound is broken and
//! no task is lost.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::error::HostSignal;

use super::test_job::Job;

fn listed(host: usize, models: &[&str]) -> ManifestReport {
    ManifestReport {
        host: HostId(host),
        models: Ok(models.iter().map(|m| m.to_string()).collect()),
        loaded: None,
    }
}

fn done() -> Release<Job> {
    Release {
        outcome: Outcome::Completed,
        signal: HostSignal::Healthy,
        retry: None,
        observed: None,
    }
}

/// Starts per host, and dismissed workers per host, from a batch of decisions.
fn starts(decisions: &[Decision<Job>]) -> Vec<(u64, usize)> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Start { task, host, .. } => Some((task.id, host.0)),
            _ => None,
        })
        .collect()
}

fn dismissed(decisions: &[Decision<Job>]) -> usize {
    decisions
        .iter()
        .map(|d| match d {
            Decision::DismissWorkers { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

struct Fleet {
    state: DispatchState<Job>,
    now: Instant,
    next: u64,
}

impl Fleet {
    fn new(hosts: &[(usize, &[&str])]) -> Self {
        let mut state = DispatchState::new(
            hosts
                .iter()
                .enumerate()
                .map(|(i, (s, _))| (format!("h{i}"), *s)),
            Limits {
                host_wait: Duration::from_secs(30),
                ..Limits::default()
            },
        );
        let now = Instant::now();
        state.start();
        let reports = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, m))| listed(i, m))
            .collect();
        state.manifests_read(reports, now);
        let mut fleet = Fleet {
            state,
            now,
            next: 0,
        };
        for (i, (slots, _)) in hosts.iter().enumerate() {
            for _ in 0..*slots {
                fleet.idle(i);
            }
        }
        fleet
    }

    fn idle(&mut self, host: usize) -> Vec<Decision<Job>> {
        assert!(
            self.state.wants_worker(HostId(host)),
            "no slot for a worker"
        );
        self.state.worker_idle(HostId(host), self.now)
    }

    fn submit(&mut self, model: &'static str) -> Vec<Decision<Job>> {
        self.next += 1;
        let job = Job::new(self.next, model, self.now);
        self.state.submit(job, self.now)
    }
}

#[test]
fn a_removed_host_takes_no_new_work_and_its_running_task_finishes() {
    let mut f = Fleet::new(&[(1, &["a"]), (1, &["a"])]);
    assert_eq!(starts(&f.submit("a")), [(1, 0)]);
    let now = f.now;
    let d = f.state.retire_host(HostId(0), now);
    assert_eq!(dismissed(&d), 0, "its one worker is busy, not idle");
    assert!(f.state.is_retired(HostId(0)));
    // New work goes to the other host only.
    assert_eq!(starts(&f.submit("a")), [(2, 1)]);
    let third = f.submit("a");
    assert!(starts(&third).is_empty(), "host 1 is busy, host 0 retired");
    // The running task on the retired host ends normally; its worker is not wanted back.
    let d = f.state.released(HostId(0), done(), now);
    assert!(starts(&d).is_empty(), "a retired host takes nothing");
    assert!(!f.state.wants_worker(HostId(0)));
    assert_eq!(f.state.counters.completed, 1);
    // The waiting task runs when host 1 frees.
    let d = f.state.released(HostId(1), done(), now);
    assert!(starts(&d).is_empty(), "no idle worker yet on host 1");
    assert_eq!(starts(&f.idle(1)), [(3, 1)]);
    let snap = f.state.snapshot();
    assert!(snap.hosts[0].retired && snap.hosts[0].active == 0);
}

#[test]
fn removing_the_only_host_of_a_model_makes_its_tasks_wait_for_host_wait_then_fail() {
    let mut f = Fleet::new(&[(1, &["a", "b"]), (1, &["a"])]);
    let now = f.now;
    f.state.retire_host(HostId(0), now);
    let d = f.submit("b");
    assert!(
        d.iter().any(|d| matches!(d, Decision::ReadManifests)),
        "an unknown model triggers a re-read"
    );
    let d = f
        .state
        .manifests_read(vec![listed(0, &["a", "b"]), listed(1, &["a"])], now);
    // The retired host's listing is ignored: nobody serves b.
    let failed = d
        .iter()
        .filter(|d| matches!(d, Decision::Fail { .. }))
        .count();
    assert_eq!(failed, 1, "b is not available once its only host left");
}

#[test]
fn an_added_host_takes_work_once_its_manifest_is_read() {
    let mut f = Fleet::new(&[(1, &["a"])]);
    assert_eq!(starts(&f.submit("a")).len(), 1);
    assert!(starts(&f.submit("a")).is_empty());
    let (id, d) = f.state.add_host("new".into(), 2);
    assert_eq!(id, HostId(1));
    assert!(
        d.iter().any(
            |d| matches!(d, Decision::Probe { host, after } if *host == id && after.is_zero())
        ),
        "the new host is read at once"
    );
    // Workers arrive before the probe answers: nothing starts on an unread host.
    assert!(starts(&f.idle(1)).is_empty());
    assert!(starts(&f.idle(1)).is_empty());
    assert!(!f.state.wants_worker(id), "two slots, two workers");
    let now = f.now;
    let d = f.state.probe_result(listed(1, &["a"]), now);
    assert_eq!(starts(&d), [(2, 1)]);
}

#[test]
fn fewer_slots_apply_as_slots_free_and_idle_workers_beyond_them_stop() {
    let mut f = Fleet::new(&[(3, &["a"])]);
    let now = f.now;
    assert_eq!(starts(&f.submit("a")).len(), 1);
    assert_eq!(starts(&f.submit("a")).len(), 1);
    // Two run, one worker idle; down to one slot.
    let d = f.state.set_slots(HostId(0), 1, now);
    assert_eq!(dismissed(&d), 1, "the idle worker has no slot left");
    assert!(starts(&f.submit("a")).is_empty(), "two running > one slot");
    f.state.released(HostId(0), done(), now);
    assert!(
        !f.state.wants_worker(HostId(0)),
        "one still runs: slot full"
    );
    f.state.released(HostId(0), done(), now);
    assert!(f.state.wants_worker(HostId(0)));
    assert_eq!(starts(&f.idle(0)), [(3, 0)]);
    assert!(!f.state.wants_worker(HostId(0)));
    // More slots: wanted workers again, and they take work at once.
    f.submit("a");
    let d = f.state.set_slots(HostId(0), 2, now);
    assert_eq!(dismissed(&d), 0);
    assert!(f.state.wants_worker(HostId(0)));
    assert_eq!(starts(&f.idle(0)), [(4, 0)]);
}

#[test]
fn a_host_listed_again_comes_back_at_its_old_index() {
    let mut f = Fleet::new(&[(1, &["a"])]);
    let now = f.now;
    let d = f.state.retire_host(HostId(0), now);
    assert_eq!(dismissed(&d), 1, "its idle worker stops");
    let d = f.state.revive_host(HostId(0), "back".into(), 1);
    assert!(matches!(d[..], [Decision::Probe { .. }]));
    assert!(f.state.wants_worker(HostId(0)));
    f.idle(0);
    f.state.probe_result(listed(0, &["a"]), now);
    assert_eq!(starts(&f.submit("a")), [(1, 0)]);
    assert_eq!(f.state.snapshot().hosts[0].name, "back");
}
