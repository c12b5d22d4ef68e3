//! The scheduler's brain: a plain state machine with no I/O and no clock of its own.
//!
//! Events come in as method calls (`submit`, `worker_idle`, `released`, `cancel`,
//! `manifests_read`, `tick`), each with the current time; decisions come out
//! ([`Decision::Start`], [`Decision::Fail`], [`Decision::ReadManifests`]). Matching a task to
//! an idle slot happens only in [`DispatchState::dispatch`], so "find" and "acquire" are one
//! step by construction, and every placement rule can be tested without sockets or sleeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::{DispatchError, ErrorKind};
use crate::task::TaskId;

/// What the state machine needs to know about a queued task.
pub trait Queueable {
    fn id(&self) -> TaskId;
    fn model(&self) -> &str;
    fn enqueued_at(&self) -> Instant;
    /// When the task gives up waiting for a slot, if ever.
    fn queue_deadline(&self) -> Option<Instant>;
    /// Tells the client where it stands; 1 = next for its model.
    fn notify_position(&self, position: usize);
}

/// Index of a host in configuration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostId(pub usize);

#[derive(Debug)]
pub enum Decision<T> {
    /// Hand `task` to an idle worker of `host`; its slot is already counted as taken.
    Start { task: T, host: HostId },
    /// Tell the task's client it failed.
    Fail { task: T, error: DispatchError },
    /// Read every host's manifest and report with `manifests_read`.
    ReadManifests,
}

/// How a running task ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// One host's manifest read.
#[derive(Debug, Clone)]
pub struct ManifestReport {
    pub host: HostId,
    /// The ids the host lists, or why it could not be read ("HTTP 401", "connection refused").
    pub models: Result<Vec<String>, String>,
    /// Models loaded in memory, where the host tells (LM Studio); `None` = unknown.
    pub loaded: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_pending: usize,
    pub max_bypass: Duration,
}

#[derive(Debug)]
struct Host {
    name: String,
    slots: usize,
    active: usize,
    idle_workers: usize,
    /// The model in flight; set while `active > 0` (the drain guard).
    current_model: Option<String>,
    /// The model most recently started here; likely still in VRAM.
    last_model: Option<String>,
    models: BTreeSet<String>,
    loaded: Option<Vec<String>>,
    last_error: Option<String>,
    started: u64,
}

impl Host {
    fn can_take(&self, model: &str) -> bool {
        self.idle_workers > 0
            && self.active < self.slots
            && self.models.contains(model)
            && (self.active == 0 || self.current_model.as_deref() == Some(model))
    }
}

/// Tasks by what became of them since the daemon started.
#[derive(Debug, Default, Clone, Copy, Serialize, JsonSchema, PartialEq, Eq)]
pub struct Counters {
    pub submitted: u64,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub rejected: u64,
}

/// A point-in-time view for `list_models`, `dispatch_status` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub hosts: Vec<HostSnapshot>,
    /// Waiting tasks per model (only models with waiting tasks).
    pub queue: BTreeMap<String, usize>,
    /// Tasks waiting for a manifest read before they can be queued or refused.
    pub awaiting_manifest: usize,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HostSnapshot {
    pub name: String,
    pub slots: usize,
    /// Requests in flight now.
    pub active: usize,
    /// The model streaming now (the drain guard keeps other models out until it finishes).
    pub current_model: Option<String>,
    pub models: Vec<String>,
    /// Models loaded in memory, when the host tells (LM Studio); null when unknown.
    pub loaded_models: Option<Vec<String>>,
    /// Why the last manifest read failed, if it did.
    pub last_error: Option<String>,
    /// Tasks started on this host since the daemon started.
    pub tasks_started: u64,
}

pub struct DispatchState<T> {
    hosts: Vec<Host>,
    limits: Limits,
    /// Per model, waiting tasks by arrival sequence: the head is the oldest.
    queues: HashMap<String, BTreeMap<u64, T>>,
    /// Where each waiting task sits, for O(log n) cancellation.
    index: HashMap<TaskId, (String, u64)>,
    deadlines: BTreeSet<(Instant, TaskId)>,
    /// Tasks whose model no host listed, waiting for the manifest read in flight, which
    /// started after they arrived: its answer settles them.
    parked: Vec<T>,
    /// Such tasks that arrived while a read was already running: that read may predate the
    /// model's appearance, so if it does not list the model they get one more read.
    parked_next: Vec<T>,
    manifests_known: bool,
    reading_manifests: bool,
    /// How many hosts list each model: the scarcity used by the placement rule.
    coverage: HashMap<String, usize>,
    next_seq: u64,
    waiting: usize,
    counters: Counters,
}

/// How many of the first waiting tasks of a model hear their new position when the line moves.
const POSITION_UPDATES: usize = 8;

impl<T: Queueable> DispatchState<T> {
    /// `hosts` as (name, slots) in configuration order. Manifests are unknown until the first
    /// `manifests_read`; tasks submitted before that wait for it.
    pub fn new(hosts: impl IntoIterator<Item = (String, usize)>, limits: Limits) -> Self {
        Self {
            hosts: hosts
                .into_iter()
                .map(|(name, slots)| Host {
                    name,
                    slots,
                    active: 0,
                    idle_workers: 0,
                    current_model: None,
                    last_model: None,
                    models: BTreeSet::new(),
                    loaded: None,
                    last_error: None,
                    started: 0,
                })
                .collect(),
            limits,
            queues: HashMap::new(),
            index: HashMap::new(),
            deadlines: BTreeSet::new(),
            parked: Vec::new(),
            parked_next: Vec::new(),
            manifests_known: false,
            reading_manifests: false,
            coverage: HashMap::new(),
            next_seq: 0,
            waiting: 0,
            counters: Counters::default(),
        }
    }

    /// Starts the first manifest read. Call once, when the actor starts.
    pub fn start(&mut self) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        self.request_manifests(&mut out);
        out
    }

    /// Asks for a fresh manifest read unless one is already running (single-flight).
    pub fn request_manifests(&mut self, out: &mut Vec<Decision<T>>) {
        if !self.reading_manifests {
            self.reading_manifests = true;
            out.push(Decision::ReadManifests);
        }
    }

    pub fn submit(&mut self, task: T, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        self.counters.submitted += 1;
        let pending = self.waiting + self.parked.len() + self.parked_next.len();
        if pending >= self.limits.max_pending {
            self.counters.rejected += 1;
            let error = DispatchError::new(
                ErrorKind::QueueFull,
                format!(
                    "queue full ({pending} pending): retry later, or raise [queue] max_pending"
                ),
            );
            out.push(Decision::Fail { task, error });
            return out;
        }
        if !self.manifests_known || !self.coverage.contains_key(task.model()) {
            // Unknown model: a host may have been loading at the last read. One coalesced
            // re-read decides; until then the task waits here.
            if self.reading_manifests {
                self.parked_next.push(task);
            } else {
                self.parked.push(task);
                self.request_manifests(&mut out);
            }
            return out;
        }
        self.enqueue(task);
        self.dispatch(now, &mut out);
        out
    }

    /// A worker of `host` is waiting for work.
    pub fn worker_idle(&mut self, host: HostId, now: Instant) -> Vec<Decision<T>> {
        let h = &mut self.hosts[host.0];
        debug_assert!(
            h.active + h.idle_workers < h.slots,
            "more workers than slots"
        );
        h.idle_workers += 1;
        let mut out = Vec::new();
        self.dispatch(now, &mut out);
        out
    }

    /// A slot of `host` was given back (exactly once per `Start`, by the lease's `Drop`).
    pub fn released(&mut self, host: HostId, outcome: Outcome, now: Instant) -> Vec<Decision<T>> {
        let h = &mut self.hosts[host.0];
        debug_assert!(
            h.active > 0,
            "release without a matching start on {}",
            h.name
        );
        h.active = h.active.saturating_sub(1);
        if h.active == 0 {
            h.current_model = None;
        }
        match outcome {
            Outcome::Completed => self.counters.completed += 1,
            Outcome::Failed => self.counters.failed += 1,
            Outcome::Cancelled => self.counters.cancelled += 1,
        }
        let mut out = Vec::new();
        // Draining a model can open this host's other idle slots to other models.
        self.dispatch(now, &mut out);
        out
    }

    /// The client gave up. A waiting task is removed and returned; a running one is stopped
    /// by its worker (through the task's cancellation token), not here.
    pub fn cancel(&mut self, id: TaskId) -> Option<T> {
        let task = if let Some((model, seq)) = self.index.remove(&id) {
            let task = self.remove_queued(&model, seq);
            if let Some(deadline) = task.queue_deadline() {
                self.deadlines.remove(&(deadline, id));
            }
            task
        } else {
            let parked = [&mut self.parked, &mut self.parked_next]
                .into_iter()
                .find(|p| p.iter().any(|t| t.id() == id))?;
            let at = parked.iter().position(|t| t.id() == id)?;
            parked.swap_remove(at)
        };
        self.counters.cancelled += 1;
        Some(task)
    }

    pub fn manifests_read(
        &mut self,
        reports: Vec<ManifestReport>,
        now: Instant,
    ) -> Vec<Decision<T>> {
        for report in reports {
            let host = &mut self.hosts[report.host.0];
            match report.models {
                Ok(models) => {
                    host.models = models.into_iter().collect();
                    host.last_error = None;
                }
                Err(why) => {
                    host.models.clear();
                    host.last_error = Some(why);
                }
            }
            host.loaded = report.loaded;
        }
        self.coverage.clear();
        for host in &self.hosts {
            for model in &host.models {
                *self.coverage.entry(model.clone()).or_default() += 1;
            }
        }
        self.reading_manifests = false;
        self.manifests_known = true;

        let mut out = Vec::new();
        for task in std::mem::take(&mut self.parked) {
            if self.coverage.contains_key(task.model()) {
                self.enqueue(task);
            } else {
                let error = self.unavailable_error(task.model());
                self.counters.failed += 1;
                out.push(Decision::Fail { task, error });
            }
        }
        for task in std::mem::take(&mut self.parked_next) {
            if self.coverage.contains_key(task.model()) {
                self.enqueue(task);
            } else {
                self.parked.push(task);
                self.request_manifests(&mut out);
            }
        }
        // Waiting tasks whose model no host lists any more would wait forever.
        let orphaned: Vec<String> = self
            .queues
            .keys()
            .filter(|m| !self.coverage.contains_key(*m))
            .cloned()
            .collect();
        for model in orphaned {
            let error = self.unavailable_error(&model);
            for (_, task) in self.queues.remove(&model).unwrap_or_default() {
                self.forget(&task);
                self.counters.failed += 1;
                out.push(Decision::Fail {
                    task,
                    error: error.clone(),
                });
            }
        }
        self.dispatch(now, &mut out);
        out
    }

    /// Fails the tasks whose queue deadline has passed.
    pub fn tick(&mut self, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some((model, seq)) = self.index.remove(&id) else {
                continue;
            };
            let task = self.remove_queued(&model, seq);
            let waited = now
                .saturating_duration_since(task.enqueued_at())
                .as_secs_f64();
            let error = DispatchError::new(
                ErrorKind::QueueTimeout,
                format!(
                    "queue timeout: waited {waited:.1}s for a free slot for model '{model}' \
                     (queue_timeout_seconds); every host that lists it stayed busy"
                ),
            );
            self.counters.failed += 1;
            out.push(Decision::Fail { task, error });
        }
        out
    }

    /// The earliest queue deadline, for the actor's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Removes every waiting task (shutdown, crash), oldest first per model.
    pub fn drain_waiting(&mut self) -> Vec<T> {
        let mut all: Vec<T> = std::mem::take(&mut self.parked);
        all.append(&mut self.parked_next);
        for (_, queue) in self.queues.drain() {
            all.extend(queue.into_values());
        }
        self.index.clear();
        self.deadlines.clear();
        self.waiting = 0;
        all
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            hosts: self
                .hosts
                .iter()
                .map(|h| HostSnapshot {
                    name: h.name.clone(),
                    slots: h.slots,
                    active: h.active,
                    current_model: h.current_model.clone(),
                    models: h.models.iter().cloned().collect(),
                    loaded_models: h.loaded.clone(),
                    last_error: h.last_error.clone(),
                    tasks_started: h.started,
                })
                .collect(),
            queue: self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(m, q)| (m.clone(), q.len()))
                .collect(),
            awaiting_manifest: self.parked.len() + self.parked_next.len(),
            counters: self.counters,
        }
    }

    fn enqueue(&mut self, task: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = task.id();
        let model = task.model().to_string();
        if let Some(deadline) = task.queue_deadline() {
            self.deadlines.insert((deadline, id));
        }
        let queue = self.queues.entry(model.clone()).or_default();
        task.notify_position(queue.len() + 1);
        queue.insert(seq, task);
        self.index.insert(id, (model, seq));
        self.waiting += 1;
    }

    fn remove_queued(&mut self, model: &str, seq: u64) -> T {
        let queue = self
            .queues
            .get_mut(model)
            .expect("indexed model has a queue");
        let task = queue.remove(&seq).expect("indexed task is queued");
        if queue.is_empty() {
            self.queues.remove(model);
        }
        self.waiting -= 1;
        task
    }

    fn forget(&mut self, task: &T) {
        self.index.remove(&task.id());
        if let Some(deadline) = task.queue_deadline() {
            self.deadlines.remove(&(deadline, task.id()));
        }
        self.waiting -= 1;
    }

    /// Matches waiting tasks to idle slots until no pair is left (work conservation).
    ///
    /// The next task is the oldest one past `max_bypass`, else the one whose model the fewest
    /// hosts list (oldest first among equals); it goes to the least versatile idle host that
    /// can take it, then the least active, then one that ran that model last, then
    /// configuration order. Only models with an eligible slot compete, so a model whose hosts
    /// are all busy never blocks another (no head-of-line blocking).
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Decision<T>>) {
        loop {
            let held = self.held_for_drain(now);
            let mut best: Option<((u8, usize, u64), &str)> = None;
            for (model, queue) in &self.queues {
                let Some((&seq, head)) = queue.first_key_value() else {
                    continue;
                };
                if self.pick_host(model, &held).is_none() {
                    continue;
                }
                let overdue =
                    now.saturating_duration_since(head.enqueued_at()) >= self.limits.max_bypass;
                let key = if overdue {
                    (0, 0, seq)
                } else {
                    (1, self.coverage.get(model).copied().unwrap_or(0), seq)
                };
                if best.is_none_or(|(k, _)| key < k) {
                    best = Some((key, model));
                }
            }
            let Some((_, model)) = best else { return };
            let model = model.to_string();
            let host = self
                .pick_host(&model, &held)
                .expect("a model competes only with an eligible host");
            let (&seq, _) = self.queues[&model].first_key_value().expect("non-empty");
            let task = self.remove_queued(&model, seq);
            self.forget_index_only(&task);

            let h = &mut self.hosts[host.0];
            h.idle_workers -= 1;
            h.active += 1;
            h.started += 1;
            h.current_model = Some(model.clone());
            h.last_model = Some(model.clone());
            self.counters.started += 1;
            out.push(Decision::Start { task, host });

            if let Some(queue) = self.queues.get(&model) {
                for (i, t) in queue.values().take(POSITION_UPDATES).enumerate() {
                    t.notify_position(i + 1);
                }
            }
        }
    }

    fn forget_index_only(&mut self, task: &T) {
        self.index.remove(&task.id());
        if let Some(deadline) = task.queue_deadline() {
            self.deadlines.remove(&(deadline, task.id()));
        }
    }

    /// Hosts that take no new work so that they drain for an overdue task that only the drain
    /// guard keeps out (slots > 1 and a steady stream of another model would starve it).
    /// This is the one place an idle slot stays idle while work waits: it bounds the wait.
    fn held_for_drain(&self, now: Instant) -> Vec<bool> {
        let mut held = vec![false; self.hosts.len()];
        for (model, queue) in &self.queues {
            let Some(head) = queue.values().next() else {
                continue;
            };
            let overdue =
                now.saturating_duration_since(head.enqueued_at()) >= self.limits.max_bypass;
            if !overdue || self.hosts.iter().any(|h| h.can_take(model)) {
                continue;
            }
            let blocked_by_guard = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| {
                    h.idle_workers > 0
                        && h.active > 0
                        && h.models.contains(model.as_str())
                        && h.current_model.as_deref() != Some(model.as_str())
                })
                .min_by_key(|(i, h)| (h.active, *i));
            if let Some((i, _)) = blocked_by_guard {
                held[i] = true;
            }
        }
        held
    }

    fn pick_host(&self, model: &str, held: &[bool]) -> Option<HostId> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| !held[*i] && h.can_take(model))
            .min_by_key(|(i, h)| {
                (
                    h.models.len(),
                    h.active,
                    h.last_model.as_deref() != Some(model),
                    *i,
                )
            })
            .map(|(i, _)| HostId(i))
    }

    fn unavailable_error(&self, model: &str) -> DispatchError {
        let errors: Vec<String> = self
            .hosts
            .iter()
            .filter_map(|h| h.last_error.as_ref().map(|e| format!("{}: {e}", h.name)))
            .collect();
        if self.coverage.is_empty() {
            let reasons = if errors.is_empty() {
                "every host answered with an empty model list".to_string()
            } else {
                errors.join("; ")
            };
            return DispatchError::new(
                ErrorKind::NoModelsAvailable,
                format!(
                    "No models available from any server ({reasons}); check that the servers \
                     are running, have models, and accept the configured api_key"
                ),
            );
        }
        let detail = if errors.is_empty() {
            let listed: Vec<String> = self
                .hosts
                .iter()
                .map(|h| format!("{} lists {}", h.name, h.models.len()))
                .collect();
            format!(
                "no server had errors ({}); call list_models for the ids",
                listed.join(", ")
            )
        } else {
            format!("servers with errors: {}", errors.join("; "))
        };
        DispatchError::new(
            ErrorKind::ModelNotAvailable,
            format!("Model '{model}' not available on any server; {detail}"),
        )
    }
}

#[cfg(test)]
mod tests;
