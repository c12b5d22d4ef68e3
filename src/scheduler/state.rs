//! The scheduler's brain: a plain state machine with no I/O and no clock of its own.
//!
//! Events come in as method calls (`submit`, `worker_idle`, `released`, `cancel`,
//! `manifests_read`, `probe_result`, `tick`, `close`), each with the current time; decisions
//! come out ([`Decision`]). Matching a task to an idle slot happens only in
//! [`DispatchState::dispatch`], so "find" and "acquire" are one step by construction, and every
//! placement and health rule can be tested without sockets or sleeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use tokio::time::Instant;

use costs::{CostModel, Observed};
use fair::{FairShare, ModelQueue};

use crate::error::{DispatchError, ErrorKind};
pub use crate::error::{HostSignal, ManifestFailure};
use crate::task::TaskId;

/// What the state machine needs to know about a queued task.
pub trait Queueable {
    /// Ids grow in arrival order: the queue's order among equals.
    fn id(&self) -> TaskId;
    fn model(&self) -> &str;
    fn enqueued_at(&self) -> Instant;
    /// When the task gives up waiting for a slot, if ever.
    fn queue_deadline(&self) -> Option<Instant>;
    /// How many times a host has been sent this task.
    fn attempts(&self) -> u32;
    /// The client is gone: nothing to retry for.
    fn abandoned(&self) -> bool;
    /// Tells the client where it stands: 1 = next for its model, and when it is expected to
    /// start (`None` when nothing is known to estimate with).
    fn notify_position(&self, position: usize, starts_in: Option<Duration>);
    /// Tells the client that no host can run it now (`why`: which hosts list its model and
    /// what is wrong with them) while it waits at `position` for one to come back.
    fn notify_no_host(&self, _position: usize, _why: &str) {}
    /// Who asked, for fair share between clients (see [`super::fair`]).
    fn client_id(&self) -> &str;
    /// Lower runs earlier; 0 by default.
    fn priority(&self) -> i32;
    /// Its place in its model's line, given when it was submitted and kept when it comes back
    /// (a retry), so it goes back to that place.
    fn queue_key(&self) -> Option<fair::QueueKey>;
    fn set_queue_key(&mut self, key: fair::QueueKey);
}

/// Index of a host in configuration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostId(pub usize);

#[derive(Debug)]
pub enum Decision<T> {
    /// Hand `task` to an idle worker of `host`; its slot is already counted as taken.
    /// `cold`: the host does not hold the model, so the request will load it. `gated`: the
    /// request runs alone on its host until its first byte (a cold load, or the next request
    /// after one that failed before its first byte): the worker must report that byte.
    Start {
        task: T,
        host: HostId,
        cold: bool,
        gated: bool,
    },
    /// Tell the task's client it failed.
    Fail { task: T, error: DispatchError },
    /// Read every host's manifest and report with `manifests_read`.
    ReadManifests,
    /// After `after`, read this host's manifest and report with `probe_result`.
    Probe { host: HostId, after: Duration },
    /// A host changed health: log it (once per transition, not per request).
    Health { host: HostId, change: HealthChange },
    /// `count` idle workers of `host` have no slot any more (the host left the fleet, or
    /// has fewer slots): stop them.
    DismissWorkers { host: HostId, count: usize },
    /// After `after`, read this host's `/slots` and report with `slots_read`: it is busy
    /// with requests from elsewhere, and the slots they hold come back when they end.
    ReadSlots { host: HostId, after: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthChange {
    Down {
        reason: String,
    },
    Cooling {
        seconds: u64,
        reason: String,
    },
    Up,
    /// Slots busy with requests this daemon did not send, per the host's `/slots` (0: free
    /// of them again).
    BusyElsewhere {
        busy: usize,
    },
}

/// How a running task ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// A slot given back: how the task ended, what that says about the host, and the task itself
/// when it failed before the host sent a byte and may run elsewhere.
#[derive(Debug)]
pub struct Release<T> {
    pub outcome: Outcome,
    pub signal: HostSignal,
    pub retry: Option<(T, DispatchError)>,
    /// A completed task's model and timings, for the cost model.
    pub observed: Option<(String, Observed)>,
}

/// One host's manifest read.
#[derive(Debug, Clone)]
pub struct ManifestReport {
    pub host: HostId,
    /// The ids the host lists, or why it could not be read ("HTTP 401", "connection refused").
    pub models: Result<Vec<String>, ManifestFailure>,
    /// Models loaded in memory, where the host tells (LM Studio); `None` = unknown.
    pub loaded: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_pending: usize,
    pub max_bypass: Duration,
    /// Most times a task is sent to a host (retries happen only before any response byte).
    pub max_attempts: u32,
    /// How long a task waits for a host of its model to come back before failing.
    pub host_wait: Duration,
    pub probe_interval: Duration,
    /// Consecutive 5xx answers that cool a host down.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Placement counts model loads (see [`placement`]); `false` is the placement before
    /// swap-awareness, kept as a baseline for the benchmarks.
    pub swap_aware: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 10_000,
            max_bypass: Duration::from_secs(30),
            max_attempts: 2,
            host_wait: Duration::from_secs(30),
            probe_interval: Duration::from_secs(5),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(10),
            swap_aware: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Takes work.
    Up,
    /// Out of rotation until a probe or manifest read succeeds.
    Down,
    /// Answered 5xx repeatedly; takes no work until the cool-down ends.
    Cooling,
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
    /// The last models it listed; kept while it is down, so its tasks wait for it.
    models: BTreeSet<String>,
    /// Whether a manifest read ever succeeded: a host unreachable since start may have any
    /// model, so tasks for unknown models wait for it.
    models_known: bool,
    /// The last failure was the host answering badly (401, 500, not OpenAI), not silence.
    answered_badly: bool,
    loaded: Option<Vec<String>>,
    last_error: Option<String>,
    health: Health,
    cooling_until: Option<Instant>,
    probing: bool,
    consecutive_5xx: u32,
    started: u64,
    /// Removed from the configuration: takes no new work; its running tasks finish.
    retired: bool,
    /// Slots busy with requests from elsewhere (the host's `/slots`): taken, for placement.
    busy_elsewhere: usize,
    /// A `ReadSlots` is outstanding.
    reading_slots: bool,
    /// Models believed in memory, least recently used first: corrected by every manifest
    /// read where the host tells, kept from what runs here otherwise.
    resident: Vec<String>,
    /// Most models it holds at once (LM Studio's auto-evict: 1); learned upward from reports.
    max_loaded: usize,
    /// The host says what it has loaded (LM Studio, llama-server's router, Ollama). One that
    /// does not is assumed to switch for free until a load is measured (its switches may well
    /// be free: a plain OpenAI-compatible server).
    tells_residency: bool,
    /// Starts that loaded a model here, per model.
    loads: BTreeMap<String, u64>,
    /// The request that held the cold-load gate ended before its first byte (it failed or
    /// was cancelled): the host may still be loading this model, so its next request for it
    /// holds the gate again.
    gate_model: Option<String>,
    /// When it last loaded a model: it keeps that model for [`placement::QUANTUM_LOADS`]
    /// load times (as now estimated) even for overdue tasks of other models.
    loaded_at: Option<Instant>,
    /// A request loading a model here that has not sent its first byte: nothing else starts
    /// here until it does (the cold-load gate; LM Studio loads a copy per concurrent request,
    /// its bug tracker #1751).
    loading: Option<TaskId>,
}

impl Host {
    /// The model this host is loading: its cold-load gate is held, by a request of the model
    /// it runs.
    fn loading_model(&self) -> Option<&str> {
        self.loading.and(self.current_model.as_deref())
    }

    fn new(name: String, slots: usize) -> Self {
        Host {
            name,
            slots,
            active: 0,
            idle_workers: 0,
            current_model: None,
            last_model: None,
            models: BTreeSet::new(),
            models_known: false,
            answered_badly: false,
            loaded: None,
            last_error: None,
            health: Health::Up,
            cooling_until: None,
            probing: false,
            consecutive_5xx: 0,
            started: 0,
            retired: false,
            busy_elsewhere: 0,
            reading_slots: false,
            resident: Vec::new(),
            max_loaded: 1,
            tells_residency: false,
            loading: None,
            loaded_at: None,
            loads: BTreeMap::new(),
            gate_model: None,
        }
    }

    fn can_take(&self, model: &str) -> bool {
        self.health == Health::Up
            && !self.retired
            && self.idle_workers > 0
            && self.loading.is_none()
            && self.active + self.busy_elsewhere < self.slots
            && self.models.contains(model)
            && (self.active == 0 || self.current_model.as_deref() == Some(model))
    }

    /// Will (or may soon) serve `model`: up, or cooling down for a moment.
    fn serves(&self, model: &str) -> bool {
        self.health != Health::Down && !self.retired && self.models.contains(model)
    }
}

/// Tasks by what became of them since the daemon started.
/// At rest, `submitted == completed + failed + cancelled`.
#[derive(Debug, Default, Clone, Copy, Serialize, JsonSchema, PartialEq, Eq)]
pub struct Counters {
    pub submitted: u64,
    /// Attempts started on a host (a retried task counts once per attempt).
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Failed at once because the queue was full (included in `failed`).
    pub rejected: u64,
    /// Attempts that failed before the host answered and went back to the queue.
    pub retried: u64,
}

/// One client as fair share sees it (`mcp:<session>`, `user:<id>`, `header:<name>`,
/// `key:<hash>` or `anonymous`; see [`crate::task::TaskSpec::client_id`]).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ShareStatus {
    pub client: String,
    pub queued: usize,
    pub running: usize,
    /// Tasks of it this daemon completed since it started.
    pub served: u64,
}

/// A point-in-time view for `list_models`, `dispatch_status` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub hosts: Vec<HostSnapshot>,
    /// Waiting tasks per model (only models with waiting tasks).
    pub queue: BTreeMap<String, usize>,
    /// Tasks waiting for a manifest read before they can be queued or refused.
    pub awaiting_manifest: usize,
    pub closing: bool,
    pub counters: Counters,
    /// Per client id, (queued, running) tasks (filled in by the actor).
    pub tasks_by_client: BTreeMap<u64, (usize, usize)>,
    /// Every client fair share tells apart, with its tasks (filled in by the actor).
    pub fair_share: Vec<ShareStatus>,
    /// The cost model: load, warm first-token and service times learned per host and model.
    pub costs: Vec<costs::LearnedCost>,
    /// Recent task spans per host and the queue series (filled in by the actor when asked:
    /// only the status page needs it).
    pub timeline: Option<super::timeline::Timeline>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HostSnapshot {
    pub name: String,
    pub health: Health,
    pub slots: usize,
    /// Requests in flight now.
    pub active: usize,
    /// The model streaming now (the drain guard keeps other models out until it finishes).
    pub current_model: Option<String>,
    /// The models it listed at its last successful manifest read.
    pub models: Vec<String>,
    /// Models loaded in memory, when the host tells (LM Studio); null when unknown.
    pub loaded_models: Option<Vec<String>>,
    /// The last error seen from this host (manifest read, connection, 5xx), if any.
    pub last_error: Option<String>,
    /// Tasks started on this host since the daemon started.
    pub tasks_started: u64,
    /// The tasks running here now (filled in by the actor, which hands them out).
    pub running: Vec<RunningTask>,
    /// Removed from the configuration by a reload: takes no new work while its running
    /// tasks finish (then it leaves the status).
    pub retired: bool,
    /// Slots busy with requests this daemon did not send ("busy with requests from
    /// elsewhere": another dispatcher, a person using the server directly), from the host's
    /// llama.cpp `/slots`; counted as taken. Always 0 for hosts that do not show slots.
    pub busy_elsewhere: usize,
    /// Models the daemon believes in memory, least recently used first: what the host said
    /// at its last read, updated by what ran here since.
    pub resident_models: Vec<String>,
    /// Most models it holds at once (default 1, LM Studio's auto-evict; learned upward).
    pub max_loaded_models: usize,
    /// A request is loading a model here (until its first byte, nothing else starts).
    pub loading: bool,
    /// Expected seconds to load a model here (learned, else the fleet's, else configured).
    pub load_seconds: f64,
    /// Starts that needed a model load here (the model was not believed resident), per model.
    pub loads: BTreeMap<String, u64>,
    /// Seconds since the daemon started during which this host had at least one request of
    /// ours in flight (filled in by the actor; grows while a task runs).
    pub busy_seconds: f64,
    /// Request-seconds: each request in flight counts, so a full 2-slot host adds 2 a second.
    pub slot_busy_seconds: f64,
    /// The host's base URL (filled in by the actor, which holds the clients).
    #[serde(skip)]
    pub url: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunningTask {
    pub id: u64,
    pub model: String,
    /// Milliseconds since the host was sent the task.
    pub running_ms: f64,
    /// Its slot row (see [`super::timeline::TaskSpan::slot`]).
    pub slot: usize,
    /// It is loading its model (cold start) and the host has not answered yet.
    pub loading: bool,
}

pub struct DispatchState<T> {
    hosts: Vec<Host>,
    limits: Limits,
    /// Per model, waiting tasks in fair-share order and in arrival order ([`fair`]).
    queues: HashMap<String, ModelQueue<T>>,
    /// The virtual clock of fair share and each client's finish tag.
    fair: FairShare,
    /// The model of each waiting task, for O(log n) cancellation.
    index: HashMap<TaskId, String>,
    deadlines: BTreeSet<(Instant, TaskId)>,
    /// Models with waiting tasks and no host up to serve them, since when.
    unserved_since: HashMap<String, Instant>,
    /// Tasks whose model no host listed, waiting for the manifest read in flight, which
    /// started after they arrived: its answer settles them.
    parked: Vec<T>,
    /// Such tasks that arrived while a read was already running: that read may predate the
    /// model's appearance, so if it does not list the model they get one more read.
    parked_next: Vec<T>,
    manifests_known: bool,
    reading_manifests: bool,
    /// How many healthy hosts list each model: the scarcity used by the placement rule.
    coverage: HashMap<String, usize>,
    /// When a task of each model last started: a model's waiting head ages from its arrival
    /// or from then, whichever is later (see [`DispatchState::overdue`]).
    last_started: HashMap<String, Instant>,
    waiting: usize,
    closing: bool,
    counters: Counters,
    /// Load and service times, learned from finished tasks.
    costs: CostModel,
    /// The time of the last matching (every event ends with one).
    last_dispatch: Option<Instant>,
    /// When the last task was submitted: extra copies of a model wait for a burst of
    /// submissions to settle ([`placement::collation_window`]).
    last_arrival: Option<Instant>,
}

/// How many of the first waiting tasks of a model hear their new position when the line moves.
const POSITION_UPDATES: usize = 8;

impl<T: Queueable> DispatchState<T> {
    /// `hosts` as (name, slots) in configuration order. Manifests are unknown until the first
    /// `manifests_read`; tasks submitted before that wait for it.
    pub fn new(hosts: impl IntoIterator<Item = (String, usize)>, limits: Limits) -> Self {
        let hosts: Vec<Host> = hosts
            .into_iter()
            .map(|(name, slots)| Host::new(name, slots))
            .collect();
        Self {
            costs: CostModel::new(vec![DEFAULT_LOAD; hosts.len()]),
            last_dispatch: None,
            last_arrival: None,
            hosts,
            limits,
            queues: HashMap::new(),
            fair: FairShare::default(),
            index: HashMap::new(),
            deadlines: BTreeSet::new(),
            unserved_since: HashMap::new(),
            parked: Vec::new(),
            parked_next: Vec::new(),
            manifests_known: false,
            reading_manifests: false,
            coverage: HashMap::new(),
            last_started: HashMap::new(),
            waiting: 0,
            closing: false,
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

    /// A task whose client left before the scheduler saw it: counted, never queued.
    pub fn submitted_abandoned(&mut self) {
        self.counters.submitted += 1;
        self.counters.cancelled += 1;
    }

    pub fn submit(&mut self, mut task: T, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        self.counters.submitted += 1;
        if self.closing {
            self.fail(task, shutting_down(), &mut out);
            return out;
        }
        let pending = self.waiting + self.parked.len() + self.parked_next.len();
        if pending >= self.limits.max_pending {
            self.counters.rejected += 1;
            let error = DispatchError::new(
                ErrorKind::QueueFull,
                format!(
                    "queue full ({pending} pending): retry later, or raise [queue] max_pending"
                ),
            );
            self.fail(task, error, &mut out);
            return out;
        }
        // Its turn is taken on arrival (after the refusals: a refused task must not cost its
        // client a turn), even if it first waits for a manifest read: a client's tasks stay
        // first come, first served.
        let cost = self.costs.model_service(task.model());
        let key = self
            .fair
            .key(task.client_id(), task.priority(), cost, task.id());
        task.set_queue_key(key);
        if !self.manifests_known || !self.may_exist(task.model()) {
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
        self.last_arrival = Some(now);
        self.enqueue(task, now);
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

    /// A slot of `host` was given back (exactly once per `Start`, by the lease). What the
    /// attempt says about the host is accounted in the same step (never a second release).
    pub fn released(
        &mut self,
        host: HostId,
        release: Release<T>,
        now: Instant,
    ) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        if let Some((model, seen)) = &release.observed {
            let mut seen = *seen;
            if !seen.cold
                && self.limits.swap_aware
                && seen
                    .ttft
                    .is_some_and(|t| self.costs.looks_like_a_load(host.0, model, t))
            {
                // Believed warm, loaded all the same: the host holds fewer models than
                // believed (a `max_loaded_models` set too high, or someone else's load).
                seen.cold = true;
                let h = &mut self.hosts[host.0];
                *h.loads.entry(model.clone()).or_default() += 1;
                h.max_loaded = h.resident.len().saturating_sub(1).max(1).min(h.max_loaded);
                h.touch(model);
            }
            self.costs.observe(host.0, model, seen);
        }
        let h = &mut self.hosts[host.0];
        // A load in progress is the only task on its host: its end ends the gate. Without a
        // first byte the host may still be loading: the next request for that model keeps it.
        // A completed answer (one JSON document: its first byte was its end) shows the model
        // is loaded.
        if h.loading.take().is_some() && !matches!(release.outcome, Outcome::Completed) {
            h.gate_model = h.current_model.clone();
        }
        debug_assert!(
            h.active > 0,
            "release without a matching start on {}",
            h.name
        );
        h.active = h.active.saturating_sub(1);
        if h.active == 0 {
            h.current_model = None;
        }
        match release.signal {
            HostSignal::Healthy => h.consecutive_5xx = 0,
            HostSignal::Neutral => {}
            HostSignal::BusyElsewhere(busy) => self.busy_elsewhere(host, busy, &mut out),
            HostSignal::Unreachable(reason) => {
                self.host_down(host, reason, Duration::ZERO, &mut out);
                self.refresh_coverage(now);
            }
            HostSignal::ServerError(reason) => {
                h.consecutive_5xx += 1;
                h.last_error = Some(reason.clone());
                if h.consecutive_5xx >= self.limits.breaker_threshold && h.health == Health::Up {
                    h.health = Health::Cooling;
                    h.cooling_until = Some(now + self.limits.breaker_cooldown);
                    let seconds = self.limits.breaker_cooldown.as_secs();
                    out.push(Decision::Health {
                        host,
                        change: HealthChange::Cooling { seconds, reason },
                    });
                    self.refresh_coverage(now);
                }
            }
        }
        match (release.outcome, release.retry) {
            (_, Some((task, error))) => {
                if task.abandoned() {
                    self.counters.cancelled += 1;
                } else if task.attempts() < self.limits.max_attempts && !self.closing {
                    self.counters.retried += 1;
                    self.enqueue(task, now);
                } else {
                    let error = with_attempts(error, task.attempts());
                    self.fail(task, error, &mut out);
                }
            }
            (Outcome::Completed, None) => self.counters.completed += 1,
            (Outcome::Failed, None) => self.counters.failed += 1,
            (Outcome::Cancelled, None) => self.counters.cancelled += 1,
        }
        // Draining a model can open this host's other idle slots to other models.
        self.dispatch(now, &mut out);
        out
    }

    /// The client gave up. A waiting task is removed and returned; a running one is stopped
    /// by its worker (through the task's cancellation token), not here. Its leaving can end a
    /// hold for drain, so the slots are matched again.
    pub fn cancel(&mut self, id: TaskId, now: Instant) -> (Option<T>, Vec<Decision<T>>) {
        let task = self.remove_waiting(id);
        let mut out = Vec::new();
        if let Some(task) = &task {
            self.give_turn_back(task);
            self.counters.cancelled += 1;
            self.dispatch(now, &mut out);
        }
        (task, out)
    }

    fn remove_waiting(&mut self, id: TaskId) -> Option<T> {
        let task = if let Some(model) = self.index.get(&id).cloned() {
            self.remove_queued(&model, id)
        } else {
            let parked = [&mut self.parked, &mut self.parked_next]
                .into_iter()
                .find(|p| p.iter().any(|t| t.id() == id))?;
            let at = parked.iter().position(|t| t.id() == id)?;
            parked.swap_remove(at)
        };
        Some(task)
    }

    pub fn manifests_read(
        &mut self,
        reports: Vec<ManifestReport>,
        now: Instant,
    ) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        for report in reports {
            self.apply_report(report, &mut out);
        }
        self.reading_manifests = false;
        self.manifests_known = true;
        self.refresh_coverage(now);

        for task in std::mem::take(&mut self.parked) {
            if self.may_exist(task.model()) {
                self.enqueue(task, now);
            } else {
                let error = self.unavailable_error(task.model(), None);
                self.fail(task, error, &mut out);
            }
        }
        for task in std::mem::take(&mut self.parked_next) {
            if self.may_exist(task.model()) {
                self.enqueue(task, now);
            } else {
                self.parked.push(task);
                self.request_manifests(&mut out);
            }
        }
        // Waiting tasks whose model no host lists any more would wait forever.
        let orphaned: Vec<String> = self
            .queues
            .keys()
            .filter(|m| !self.may_exist(m))
            .cloned()
            .collect();
        for model in orphaned {
            let error = self.unavailable_error(&model, None);
            let ids: Vec<TaskId> = self.queues[&model].ids().collect();
            for id in ids {
                let task = self.remove_queued(&model, id);
                self.fail(task, error.clone(), &mut out);
            }
        }
        self.refresh_coverage(now);
        self.dispatch(now, &mut out);
        out
    }

    /// The answer to a `Probe`: a host that answers comes back with its fresh manifest.
    pub fn probe_result(&mut self, report: ManifestReport, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        self.hosts[report.host.0].probing = false;
        self.apply_report(report, &mut out);
        self.refresh_coverage(now);
        self.dispatch(now, &mut out);
        out
    }

    /// Expires queue deadlines, host waits and cool-downs.
    pub fn tick(&mut self, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let Some(model) = self.index.get(&id).cloned() else {
                self.deadlines.pop_first();
                continue;
            };
            let task = self.remove_queued(&model, id);
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
            self.fail(task, error, &mut out);
        }
        let unserved: Vec<(String, Instant)> = self
            .unserved_since
            .iter()
            .map(|(m, since)| (m.clone(), *since))
            .collect();
        for (model, since) in unserved {
            while let Some((_, task)) = self.queues.get(&model).and_then(|q| q.oldest()) {
                if self.host_wait_deadline(task, since) > now {
                    break;
                }
                let id = task.id();
                let task = self.remove_queued(&model, id);
                let waited = now.saturating_duration_since(since.max(task.enqueued_at()));
                let error = self.unavailable_error(&model, Some(waited));
                self.fail(task, error, &mut out);
            }
        }
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if h.health == Health::Cooling && h.cooling_until.is_some_and(|t| t <= now) {
                // Half-open: one more 5xx cools it again, a success clears the count.
                h.health = Health::Up;
                h.cooling_until = None;
                h.consecutive_5xx = self.limits.breaker_threshold.saturating_sub(1);
                out.push(Decision::Health {
                    host: HostId(i),
                    change: HealthChange::Up,
                });
            }
        }
        self.refresh_coverage(now);
        // Expired tasks may have held a host for drain; a thawed host takes work again.
        self.dispatch(now, &mut out);
        out
    }

    /// The earliest moment `tick` has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let queue = self.deadlines.first().map(|(d, _)| *d);
        let host_wait = self.unserved_since.iter().filter_map(|(model, since)| {
            let (_, head) = self.queues.get(model)?.oldest()?;
            Some(self.host_wait_deadline(head, *since))
        });
        let cooling = self.hosts.iter().filter_map(|h| h.cooling_until);
        // A protected host may take an overdue task once its quantum ends.
        let protection = (0..self.hosts.len())
            .filter_map(|i| self.protected_until(i))
            .filter(|t| self.waiting > 0 && self.last_dispatch.is_none_or(|seen| *t > seen));
        // Swap-aware placement may hold a task back rather than load its model; once it is
        // overdue, any host that can switch takes it: wake up then.
        let overdue = self
            .limits
            .swap_aware
            .then(|| {
                self.queues.iter().filter_map(|(model, queue)| {
                    let (_, head) = queue.oldest()?;
                    let at = self.overdue_at(model, head)?;
                    // Only a moment still to come: one already past changes nothing more.
                    self.last_dispatch
                        .is_none_or(|seen| at > seen)
                        .then_some(at)
                })
            })
            .into_iter()
            .flatten();
        // Extra copies wait for a burst of submissions to settle: wake up when it has.
        let settled = self
            .last_arrival
            .filter(|_| self.limits.swap_aware && self.waiting > 0)
            .map(|at| at + placement::COLLATION_MAX)
            .filter(|t| self.last_dispatch.is_none_or(|seen| *t > seen));
        queue
            .into_iter()
            .chain(host_wait)
            .chain(cooling)
            .chain(overdue)
            .chain(protection)
            .chain(settled)
            .min()
    }

    /// Stops taking work: every waiting task fails with a retryable "shutting down", and so
    /// does every task submitted from now on. Running tasks go on.
    pub fn close(&mut self) -> Vec<Decision<T>> {
        self.closing = true;
        let mut out = Vec::new();
        for task in self.drain_waiting() {
            self.fail(task, shutting_down(), &mut out);
        }
        out
    }

    /// Removes every waiting task (shutdown, crash), oldest first per model.
    pub fn drain_waiting(&mut self) -> Vec<T> {
        let mut all: Vec<T> = std::mem::take(&mut self.parked);
        all.append(&mut self.parked_next);
        for (_, queue) in self.queues.drain() {
            all.extend(queue.into_tasks());
        }
        self.index.clear();
        self.deadlines.clear();
        self.unserved_since.clear();
        self.waiting = 0;
        all
    }

    /// Every waiting task (queued or awaiting a manifest read), in no particular order.
    pub fn waiting(&self) -> impl Iterator<Item = &T> {
        self.queues
            .values()
            .flat_map(|q| q.values())
            .chain(&self.parked)
            .chain(&self.parked_next)
    }

    /// Tasks running on hosts now.
    pub fn running(&self) -> usize {
        self.hosts.iter().map(|h| h.active).sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            hosts: self
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| HostSnapshot {
                    name: h.name.clone(),
                    health: h.health,
                    slots: h.slots,
                    active: h.active,
                    current_model: h.current_model.clone(),
                    models: h.models.iter().cloned().collect(),
                    loaded_models: h.loaded.clone(),
                    last_error: h.last_error.clone(),
                    tasks_started: h.started,
                    running: Vec::new(),
                    retired: h.retired,
                    busy_elsewhere: h.busy_elsewhere,
                    resident_models: h.resident.clone(),
                    max_loaded_models: h.max_loaded,
                    loading: h.loading.is_some(),
                    loads: h.loads.clone(),
                    busy_seconds: 0.0,
                    slot_busy_seconds: 0.0,
                    load_seconds: self
                        .costs
                        .load(i, h.resident.last().map_or("", String::as_str))
                        .as_secs_f64(),
                    url: String::new(),
                })
                .collect(),
            queue: self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(m, q)| (m.clone(), q.len()))
                .collect(),
            awaiting_manifest: self.parked.len() + self.parked_next.len(),
            closing: self.closing,
            counters: self.counters,
            tasks_by_client: BTreeMap::new(),
            fair_share: Vec::new(),
            costs: self.costs.learned(|i| self.hosts[i].name.clone()),
            timeline: None,
        }
    }

    fn fail(&mut self, task: T, error: DispatchError, out: &mut Vec<Decision<T>>) {
        self.give_turn_back(&task);
        self.counters.failed += 1;
        out.push(Decision::Fail { task, error });
    }

    /// A task that ends without ever having run gives its client's fair-share turn back
    /// ([`fair::FairShare::withdrawn`]). One that ran and failed, or a refused one that never
    /// took a turn, gives nothing.
    fn give_turn_back(&mut self, task: &T) {
        if task.attempts() == 0
            && let Some(key) = task.queue_key()
        {
            self.fair.withdrawn(task.client_id(), key);
        }
    }

    fn apply_report(&mut self, report: ManifestReport, out: &mut Vec<Decision<T>>) {
        let id = report.host;
        if self.hosts[id.0].retired {
            // Read before it left the configuration: what it lists no longer matters.
            return;
        }
        match report.models {
            Ok(models) => {
                let h = &mut self.hosts[id.0];
                h.models = models.into_iter().collect();
                h.models_known = true;
                h.answered_badly = false;
                h.tells_residency = report.loaded.is_some();
                match &report.loaded {
                    Some(loaded) => h.correct_residency(loaded),
                    // A host that can hold everything it lists never switches (vLLM, a
                    // single-model llama-server).
                    None if h.models.len() <= h.max_loaded => {
                        h.resident = h.models.iter().cloned().collect();
                    }
                    None => {}
                }
                h.loaded = report.loaded;
                if h.health == Health::Down {
                    h.health = Health::Up;
                    h.consecutive_5xx = 0;
                    out.push(Decision::Health {
                        host: id,
                        change: HealthChange::Up,
                    });
                }
                if h.health == Health::Up {
                    h.last_error = None;
                }
            }
            Err(failure) => {
                self.hosts[id.0].answered_badly = failure.answered;
                self.host_down(id, failure.reason, self.limits.probe_interval, out);
            }
        }
    }

    /// Takes a host out of rotation and starts probing it, logging the transition once.
    fn host_down(
        &mut self,
        id: HostId,
        reason: String,
        first_probe: Duration,
        out: &mut Vec<Decision<T>>,
    ) {
        let h = &mut self.hosts[id.0];
        if h.retired {
            return;
        }
        h.last_error = Some(reason.clone());
        if h.health != Health::Down {
            h.health = Health::Down;
            h.cooling_until = None;
            out.push(Decision::Health {
                host: id,
                change: HealthChange::Down { reason },
            });
        }
        if !h.probing {
            h.probing = true;
            out.push(Decision::Probe {
                host: id,
                after: first_probe,
            });
        }
    }

    /// Whether some host lists `model`, or might: it has been unreachable since start. (A host
    /// that answers with errors, say 401, tells us it will not serve anything until fixed.)
    fn may_exist(&self, model: &str) -> bool {
        self.hosts.iter().filter(|h| !h.retired).any(|h| {
            h.models.contains(model)
                || (!h.models_known && h.health == Health::Down && !h.answered_badly)
        })
    }

    /// Recomputes scarcity and which waiting models have no host up to serve them.
    fn refresh_coverage(&mut self, now: Instant) {
        self.coverage.clear();
        for host in self
            .hosts
            .iter()
            .filter(|h| h.health == Health::Up && !h.retired)
        {
            for model in &host.models {
                *self.coverage.entry(model.clone()).or_default() += 1;
            }
        }
        let hosts = &self.hosts;
        self.unserved_since
            .retain(|model, _| !hosts.iter().any(|h| h.serves(model)));
        let mut newly = Vec::new();
        for model in self.queues.keys() {
            if !hosts.iter().any(|h| h.serves(model))
                && let std::collections::hash_map::Entry::Vacant(v) =
                    self.unserved_since.entry(model.clone())
            {
                v.insert(now);
                newly.push(model.clone());
            }
        }
        for model in newly {
            self.tell_no_host(&model);
        }
    }

    /// Tells the first waiting tasks of `model`, which no host that is up lists, why they
    /// wait (a client's progress otherwise said only "queued, position 1" until
    /// `host_wait_seconds` ran out).
    fn tell_no_host(&self, model: &str) {
        let Some(queue) = self.queues.get(model) else {
            return;
        };
        let why = self.no_host_reason(model);
        for (i, task) in queue.values().take(POSITION_UPDATES).enumerate() {
            task.notify_no_host(i + 1, &why);
        }
    }

    /// Which hosts list `model` and what is wrong with them, for [`Self::tell_no_host`].
    fn no_host_reason(&self, model: &str) -> String {
        let down: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| !h.retired && h.models.contains(model))
            .map(|h| match &h.last_error {
                Some(e) => format!("{} is down: {e}", h.name),
                None => format!("{} is down", h.name),
            })
            .collect();
        let why = if down.is_empty() {
            format!("no host lists {model} now")
        } else {
            down.join("; ")
        };
        format!(
            "{why}; waiting up to {} s (host_wait_seconds) for a host to come back",
            self.limits.host_wait.as_secs()
        )
    }

    fn host_wait_deadline(&self, task: &T, since: Instant) -> Instant {
        since.max(task.enqueued_at()) + self.limits.host_wait
    }

    fn enqueue(&mut self, task: T, now: Instant) {
        let id = task.id();
        let model = task.model().to_string();
        if let Some(deadline) = task.queue_deadline() {
            self.deadlines.insert((deadline, id));
        }
        let unserved = !self.hosts.iter().any(|h| h.serves(&model));
        if unserved {
            self.unserved_since.entry(model.clone()).or_insert(now);
        }
        // Given at submission; a task queued some other way goes in at the current virtual
        // time, near the front.
        let key = task
            .queue_key()
            .unwrap_or_else(|| self.fair.requeue_key(task.priority(), id));
        let queue = self.queues.entry(model.clone()).or_default();
        if let Some(position) = queue.insert(key, task.enqueued_at(), task, POSITION_UPDATES)
            && let Some(task) = self.queues.get(&model).and_then(|q| q.get(id))
        {
            // Only the new task is told: those ahead of it heard already.
            if unserved {
                task.notify_no_host(position, &self.no_host_reason(&model));
            } else {
                let starts_in = self
                    .start_estimate(&model, now)
                    .map(|(ready, each)| ready + each * (position as u32 - 1));
                task.notify_position(position, starts_in);
            }
        }
        self.index.insert(id, model);
        self.waiting += 1;
    }

    /// Takes a waiting task out of its queue and out of every index that points at it: the
    /// one way a task leaves the queue, so the index, deadlines and count cannot drift.
    fn remove_queued(&mut self, model: &str, id: TaskId) -> T {
        let queue = self
            .queues
            .get_mut(model)
            .expect("indexed model has a queue");
        let (_, task) = queue.remove(id).expect("indexed task is queued");
        if queue.is_empty() {
            self.queues.remove(model);
            self.unserved_since.remove(model);
        }
        self.index.remove(&id);
        if let Some(deadline) = task.queue_deadline() {
            self.deadlines.remove(&(deadline, id));
        }
        self.waiting -= 1;
        task
    }

    /// Matches waiting tasks to idle slots until no pair is left (work conservation).
    ///
    /// The next task is the oldest one past `max_bypass`, else the one whose model the fewest
    /// hosts list (oldest first among equals); it goes to the least versatile idle host that
    /// can take it, then the least active, then one that ran that model last, then
    /// configuration order. Only models with an eligible slot compete, so a model whose hosts
    /// are all busy never blocks another (no head-of-line blocking).
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Decision<T>>) {
        self.last_dispatch = Some(now);
        loop {
            let held = self.held_for_drain(now);
            let choice = if self.limits.swap_aware {
                self.choose_swap_aware(&held, now)
            } else {
                self.choose_load_blind(&held, now)
            };
            let Some((id, model, host)) = choice else {
                return;
            };
            if let Some(queue) = self.queues.get_mut(&model)
                && let Some(key) = queue.key(id)
            {
                if let Some(task) = queue.get(id) {
                    self.fair.started(task.client_id(), key);
                }
                queue.started(key.priority, now);
            }
            let task = self.remove_queued(&model, id);

            let h = &mut self.hosts[host.0];
            let cold = !h.resident.contains(&model);
            h.idle_workers -= 1;
            h.active += 1;
            h.started += 1;
            h.current_model = Some(model.clone());
            h.last_model = Some(model.clone());
            h.touch(&model);
            if cold {
                *h.loads.entry(model.clone()).or_default() += 1;
            }
            let regate = h.gate_model.take().is_some_and(|m| m == model);
            let gated = (cold || regate) && self.limits.swap_aware;
            if gated {
                h.loading = Some(id);
            }
            if cold && self.limits.swap_aware {
                h.loaded_at = Some(now);
            }
            match self.last_started.get_mut(&model) {
                Some(at) => *at = now,
                None => {
                    self.last_started.insert(model.clone(), now);
                }
            }
            self.counters.started += 1;
            out.push(Decision::Start {
                task,
                host,
                cold,
                gated,
            });

            if let Some(queue) = self.queues.get(&model) {
                let estimate = self.start_estimate(&model, now);
                for (i, t) in queue.values().take(POSITION_UPDATES).enumerate() {
                    let starts_in = estimate.map(|(ready, each)| ready + each * i as u32);
                    t.notify_position(i + 1, starts_in);
                }
            }
        }
    }

    /// Placement before swap-awareness (the benchmarks' baseline): the oldest overdue task,
    /// else the scarcest model's oldest, on the least versatile idle host.
    fn choose_load_blind(&self, held: &[bool], now: Instant) -> Option<(TaskId, String, HostId)> {
        type Key = (u8, usize, fair::Order);
        let mut best: Option<(Key, TaskId, &str, HostId)> = None;
        for (model, queue) in &self.queues {
            let Some((id, overdue, order, _)) = self.next_of(model, queue, now) else {
                continue;
            };
            let Some(host) = self.pick_host(model, held) else {
                continue;
            };
            let key = if overdue {
                (0, 0, order)
            } else {
                (1, self.coverage.get(model).copied().unwrap_or(0), order)
            };
            if best.is_none_or(|(k, _, _, _)| key < k) {
                best = Some((key, id, model, host));
            }
        }
        best.map(|(_, id, model, host)| (id, model.to_string(), host))
    }

    /// A model's next task, whether the model is overdue, its place among models (lower
    /// first), and whether it is urgent (priority below 0): overdue, the task that has waited
    /// longest, by arrival; else the task priority and fair share put first, by its aged
    /// order ([`fair`]).
    fn next_of(
        &self,
        model: &str,
        queue: &ModelQueue<T>,
        now: Instant,
    ) -> Option<(TaskId, bool, fair::Order, bool)> {
        let (oldest_id, oldest) = queue.oldest()?;
        if self.overdue(model, oldest, now) {
            return Some((
                oldest_id,
                true,
                (0, oldest_id.0 as i64),
                oldest.priority() < 0,
            ));
        }
        let (id, task, order) = queue.next(now)?;
        Some((id, false, order, task.priority() < 0))
    }

    /// Swap-aware placement: every (model, free host) pair is judged by [`placement`].
    fn choose_swap_aware<'s>(
        &'s self,
        held: &[bool],
        now: Instant,
    ) -> Option<(TaskId, String, HostId)> {
        use placement::{Evicts, HostKey, ModelKey};
        let mut best: Option<(ModelKey, HostKey, TaskId, &str, HostId)> = None;
        // Who holds each model, gathered once per model for this decision (a fleet scan). A
        // cold pair's host is never one of its model's holders, and the host that would evict
        // a model is always one of that model's: the counts need no exception.
        let mut holder_counts: HashMap<&str, (usize, Duration)> = HashMap::new();
        let mut holders = |m: &'s str| {
            *holder_counts
                .entry(m)
                .or_insert_with(|| self.holders(m, now))
        };
        // Who could take each model now without holding it (free, listing it), and its
        // shortest load among them: once per model for this decision.
        let mut taker_counts: HashMap<&str, (usize, Duration)> = HashMap::new();
        let mut takers = |m: &'s str| {
            *taker_counts
                .entry(m)
                .or_insert_with(|| self.takers(m, held))
        };
        // When a busy host could take each model (see `soonest_free`): once per model too.
        let mut soonest: HashMap<&str, Option<(Duration, Duration)>> = HashMap::new();
        for (model, queue) in &self.queues {
            let service = self.costs.model_service(model);
            let Some((id, overdue, order, urgent)) = self.next_of(model, queue, now) else {
                continue;
            };
            let mut host_best: Option<(HostKey, HostId, Option<Duration>)> = None;
            for (i, h) in self.hosts.iter().enumerate() {
                if held[i] || !h.can_take(model) {
                    continue;
                }
                let warm = h.resident.iter().any(|m| m == model);
                let load = self.load_estimate(i, model);
                let evicted = (!warm && h.resident.len() >= h.max_loaded)
                    .then(|| h.resident.first())
                    .flatten()
                    .map(String::as_str);
                // Only a costly switch needs the facts that take a scan of the fleet.
                let mut gain = None;
                let allowed = warm || load.is_zero() || {
                    let (warm_elsewhere, warm_ready_in) = holders(model);
                    let settling = self
                        .last_arrival
                        .is_some_and(|at| now < at + placement::collation_window(load));
                    let sole_lister = self.coverage.get(model).is_some_and(|&c| c <= 1);
                    let evicted_backlog = evicted
                        .and_then(|e| self.queues.get(e).map(|q| (e, q.len())))
                        .map_or(Duration::ZERO, |(e, n)| {
                            self.costs.model_service(e) * n as u32
                        });
                    let evicted_holders = evicted.map_or(0, |e| holders(e).0);
                    let (evicted_takers, taker_load) =
                        evicted.map_or((0, Duration::ZERO), &mut takers);
                    // Only for a model this host alone can run, leaving a backlog no free
                    // host can take: when could a busy one?
                    let soon = evicted
                        .filter(|_| {
                            sole_lister
                                && warm_elsewhere == 0
                                && !evicted_backlog.is_zero()
                                && evicted_holders <= 1
                                && evicted_takers == 0
                        })
                        .and_then(|e| match soonest.get(e) {
                            Some(known) => *known,
                            None => {
                                let found = self.soonest_free(e, &mut holders);
                                soonest.insert(e, found);
                                found
                            }
                        });
                    let facts = placement::PairFacts {
                        // An urgent call (priority < 0) takes the next host that can switch,
                        // as an overdue one does (it is single; a quantum holds only backlogs).
                        overdue: overdue || urgent,
                        warm,
                        warm_elsewhere,
                        warm_ready_in,
                        backlog: service * (queue.len() as u32),
                        load,
                        evicts: evicted.is_some(),
                        // A lone call always gets the next host that can switch; only a
                        // backlog waits for a host's quantum (a battery would otherwise rotate).
                        protected: queue.len() > 1 && self.protected(i, now),
                        evicted_backlog,
                        evicted_holders,
                        evicted_takers,
                        evicted_load: soon.map_or(taker_load, |(_, load)| load),
                        sole_lister,
                        evicted_free_in: soon.map(|(free_in, _)| free_in),
                    };
                    gain =
                        placement::switch_gain(&facts).filter(|_| placement::costly(load, service));
                    // Hold an extra copy for the burst to settle, on a host other models
                    // might need.
                    let hold = settling && !overdue && warm_elsewhere > 0 && h.models.len() > 1;
                    placement::allowed(&facts) && !hold
                };
                if !allowed {
                    continue;
                }
                let evicts = match evicted {
                    None => Evicts::Nothing,
                    Some(e) if self.queues.get(e).is_some_and(|q| !q.is_empty()) => Evicts::Waiting,
                    Some(_) => Evicts::Idle,
                };
                let key = placement::host_key(
                    warm,
                    load,
                    evicts,
                    h.models.len(),
                    h.active,
                    h.last_model.as_deref() == Some(model.as_str()),
                    i,
                );
                if host_best.is_none_or(|(k, _, _)| key < k) {
                    host_best = Some((key, HostId(i), gain));
                }
            }
            let Some((host_key, host, gain)) = host_best else {
                continue;
            };
            let running = self
                .hosts
                .iter()
                .filter(|h| h.active > 0 && h.current_model.as_deref() == Some(model.as_str()))
                .count();
            let key = placement::model_key(
                overdue,
                running,
                gain,
                self.coverage.get(model).copied().unwrap_or(0),
                order,
            );
            if best.is_none_or(|(k, hk, _, _, _)| (key, host_key) < (k, hk)) {
                best = Some((key, host_key, id, model, host));
            }
        }
        best.map(|(_, _, id, model, host)| (id, model.to_string(), host))
    }

    /// Expected load time of `model` on `host`: the cost model's, except that a host which does
    /// not say what it has loaded is taken to switch for free until a load was measured there
    /// or anywhere (`[[host]] load_seconds` is the prior for hosts that tell).
    fn load_estimate(&self, host: usize, model: &str) -> Duration {
        if self.hosts[host].tells_residency || self.costs.measured_any() {
            self.costs.load(host, model)
        } else {
            Duration::ZERO
        }
    }

    /// The soonest a host that is up, lists `model` and does not hold it is expected to be
    /// free, and its load of `model`: its running model's next task plus that model's backlog
    /// shared among the model's holders (`holders`, the decision's cache) and this host's
    /// slots. Rough, as the cost model is; `None` when no such host lists `model`.
    fn soonest_free<'s>(
        &'s self,
        model: &str,
        holders: &mut impl FnMut(&'s str) -> (usize, Duration),
    ) -> Option<(Duration, Duration)> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|&(_, h)| {
                h.health == Health::Up
                    && !h.retired
                    && h.models.contains(model)
                    && !h.resident.iter().any(|r| r == model)
            })
            .map(|(j, h)| {
                let busy = match h.current_model.as_deref().filter(|_| h.active > 0) {
                    None => Duration::ZERO,
                    Some(x) => {
                        let each = self.costs.model_service(x);
                        let waiting = self.queues.get(x).map_or(0, |q| q.len());
                        let sharing = (holders(x).0.max(1) * h.slots.max(1)) as u32;
                        each + each * waiting as u32 / sharing
                    }
                };
                (busy, self.load_estimate(j, model))
            })
            .min()
    }

    /// How many hosts could start `model` now without holding it (free, not held for a drain,
    /// listing it), and the shortest load of it among them (zero when none).
    fn takers(&self, model: &str, held: &[bool]) -> (usize, Duration) {
        let mut count = 0;
        let mut load: Option<Duration> = None;
        for (j, h) in self.hosts.iter().enumerate() {
            if !held[j] && h.can_take(model) && !h.resident.iter().any(|r| r == model) {
                count += 1;
                let l = self.load_estimate(j, model);
                load = Some(load.map_or(l, |x| x.min(l)));
            }
        }
        (count, load.unwrap_or_default())
    }

    /// How many healthy hosts hold `model` loaded or are loading it, and how long until the
    /// first of them can run its tasks (zero when one holds it ready, else the shortest
    /// remaining load). One still loading counts: it will serve the backlog soon, and a
    /// battery that arrives a task at a time would otherwise load its model on every free host
    /// before the first load ends (measured: 16 hosts, 8 models sent model by model, 81 loads
    /// for a minimum of 16). A scan of the fleet: placement gathers it once per model and
    /// decision.
    fn holders(&self, model: &str, now: Instant) -> (usize, Duration) {
        let mut count = 0;
        let mut ready: Option<Duration> = None;
        for (i, h) in self.hosts.iter().enumerate() {
            if h.health != Health::Up || h.retired || !h.resident.iter().any(|m| m == model) {
                continue;
            }
            count += 1;
            let remaining = match (h.loading_model() == Some(model), h.loaded_at) {
                (true, Some(at)) => {
                    (at + self.load_estimate(i, model)).saturating_duration_since(now)
                }
                _ => Duration::ZERO,
            };
            ready = Some(ready.map_or(remaining, |r| r.min(remaining)));
        }
        (count, ready.unwrap_or_default())
    }

    /// When `model`'s line starts moving and how long each place in it takes: the hosts that
    /// hold or load the model share the line (each task the model's pooled service time),
    /// after the first of them is ready; a model no host holds first pays a load. The task at
    /// position `p` is expected to start after `ready + (p - 1) × each`. A rough figure for
    /// progress messages; placement does not use it. Computed once per line update (it scans
    /// the fleet), not once per task told.
    fn start_estimate(&self, model: &str, now: Instant) -> Option<(Duration, Duration)> {
        let service = self.costs.model_service(model);
        let (holders, ready_in) = self.holders(model, now);
        let (k, ready_in) = if holders == 0 {
            let load = (0..self.hosts.len())
                .filter(|&i| self.hosts[i].can_take(model))
                .map(|i| self.load_estimate(i, model))
                .min()?;
            (1, load)
        } else {
            (holders, ready_in)
        };
        Some((ready_in, service / k as u32))
    }

    /// Whether `host` keeps the model it loaded last: within its quantum, with tasks of it
    /// still waiting.
    fn protected(&self, host: usize, now: Instant) -> bool {
        let h = &self.hosts[host];
        self.protected_until(host).is_some_and(|t| now < t)
            && h.resident
                .last()
                .is_some_and(|m| self.queues.get(m).is_some_and(|q| !q.is_empty()))
    }

    /// The end of `host`'s quantum for the model it loaded last, with today's load estimate
    /// (a host whose loads turn out cheap is not held to a guess).
    fn protected_until(&self, host: usize) -> Option<Instant> {
        let h = &self.hosts[host];
        let model = h.resident.last()?;
        h.loaded_at?
            .checked_add(self.load_estimate(host, model) * placement::QUANTUM_LOADS)
    }

    /// Hosts that take no new work so that they drain for an overdue task that only the drain
    /// guard keeps out (slots > 1 and a steady stream of another model would starve it).
    /// This is the one place an idle slot stays idle while work waits: it bounds the wait.
    fn held_for_drain(&self, now: Instant) -> Vec<bool> {
        let mut held = vec![false; self.hosts.len()];
        for (model, queue) in &self.queues {
            let Some((_, head)) = queue.oldest() else {
                continue;
            };
            if self.hosts.iter().any(|h| h.can_take(model)) {
                continue;
            }
            let overdue = self.overdue(model, head, now);
            let coverage = |m: Option<&str>| m.and_then(|m| self.coverage.get(m)).copied();
            let scarcity = coverage(Some(model.as_str())).unwrap_or(0);
            // Drain for an overdue task; and, invariant 5, for a model scarcer than the one the
            // host streams (that one can run elsewhere, this one cannot).
            let blocked_by_guard = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| {
                    h.health == Health::Up
                        && h.idle_workers > 0
                        && h.active > 0
                        && h.models.contains(model.as_str())
                        && h.current_model.as_deref() != Some(model.as_str())
                        && (overdue
                            || coverage(h.current_model.as_deref()).is_some_and(|c| scarcity < c))
                })
                .min_by_key(|(i, h)| (h.active, *i));
            if let Some((i, _)) = blocked_by_guard {
                held[i] = true;
            }
        }
        held
    }

    /// Whether `model`'s next task `head` has been passed over for `max_bypass`: counted from
    /// its arrival, or from the model's last start if that came later. A lone task that other
    /// models keep bypassing ages from its arrival, as DESIGN invariant 5 says; but the tasks
    /// of a backlog that is being served age only while their model gets no slot at all. If
    /// every task aged from its arrival, any batch longer than `max_bypass` would turn the
    /// whole queue overdue and placement into plain FIFO (measured: 0.83 of the ideal makespan
    /// instead of 0.97 on a 16-host fleet); this way the bound still holds per model — none
    /// waits longer than `max_bypass` without a start — and per task once it leads its model.
    fn overdue(&self, model: &str, head: &T, now: Instant) -> bool {
        self.overdue_at(model, head).is_some_and(|at| now >= at)
    }

    /// When `model`'s next task `head` becomes overdue (see [`Self::overdue`]); `None` with
    /// aging off (a `max_bypass` beyond any instant).
    fn overdue_at(&self, model: &str, head: &T) -> Option<Instant> {
        // A model a host is loading is being served, not passed over. Otherwise a 200 s load
        // makes its backlog overdue after 30 s and pulls a second host onto it, ahead of a
        // model no host serves (measured: 2 hosts, 4 models sent model by model, 20× loads,
        // 0.86 of the bound).
        if self.limits.swap_aware && self.hosts.iter().any(|h| h.loading_model() == Some(model)) {
            return None;
        }
        let since = self
            .last_started
            .get(model)
            .map_or(head.enqueued_at(), |&t| t.max(head.enqueued_at()));
        since.checked_add(self.limits.max_bypass)
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

    fn unavailable_error(&self, model: &str, waited: Option<Duration>) -> DispatchError {
        let errors: Vec<String> = self
            .hosts
            .iter()
            .filter_map(|h| h.last_error.as_ref().map(|e| format!("{}: {e}", h.name)))
            .collect();
        let listed_anywhere = self.hosts.iter().any(|h| !h.models.is_empty());
        if !listed_anywhere {
            let reasons = if errors.is_empty() {
                "every host answered with an empty model list".to_string()
            } else {
                errors.join("; ")
            };
            let waited = waited
                .map(|w| {
                    format!(
                        " after waiting {:.0}s (host_wait_seconds) for a host",
                        w.as_secs_f64()
                    )
                })
                .unwrap_or_default();
            let mut error = DispatchError::new(
                ErrorKind::NoModelsAvailable,
                format!(
                    "No models available from any server ({reasons}){waited}; check that the \
                     servers are running, have models, and accept the configured api_key"
                ),
            );
            error.retryable = !waited.is_empty();
            return error;
        }
        let detail = if errors.is_empty() {
            let listed: Vec<String> = self
                .hosts
                .iter()
                .map(|h| {
                    format!(
                        "{} lists {}",
                        h.name,
                        crate::plural(h.models.len(), "model", "models")
                    )
                })
                .collect();
            // Read by MCP and OpenAI clients alike: name the listing each of them has.
            format!(
                "no server had errors ({}); the model ids are listed by GET /v1/models (OpenAI \
                 API) or the list_models tool (MCP)",
                listed.join(", ")
            )
        } else {
            format!("servers with errors: {}", errors.join("; "))
        };
        let mut error = DispatchError::new(
            ErrorKind::ModelNotAvailable,
            match waited {
                None => format!("Model '{model}' not available on any server; {detail}"),
                Some(w) => format!(
                    "Model '{model}' not available on any server: no healthy host lists it and \
                     none came back within {:.0}s (host_wait_seconds); {detail}",
                    w.as_secs_f64()
                ),
            },
        );
        // A host that is down may come back: worth retrying later.
        error.retryable = waited.is_some();
        error
    }
}

fn shutting_down() -> DispatchError {
    DispatchError::new(
        ErrorKind::ShuttingDown,
        "prix-dispatch is shutting down; retry against the next instance",
    )
}

fn with_attempts(mut error: DispatchError, attempts: u32) -> DispatchError {
    if attempts > 1 {
        error.message = format!("{} (after {attempts} attempts)", error.message);
    }
    error
}

pub use super::costs;
use super::fair;
use super::placement;

/// A host's load time until one is learned (`[[host]] load_seconds`): the middle of the
/// 5–60 s real GPUs pay to switch 7–30B models (shared/reference/placement.md).
pub const DEFAULT_LOAD: Duration = Duration::from_secs(30);

mod busy_elsewhere;
#[cfg(test)]
mod fair_tests;
mod fleet;
#[cfg(test)]
mod fleet_tests;
mod residency;
#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod test_job;
#[cfg(test)]
mod tests;
