//! The scheduler actor: the single owner of dispatch state.
//!
//! It feeds events into the pure [`state::DispatchState`] and carries out its decisions:
//! handing tasks to waiting slot workers, failing tasks, reading manifests, probing hosts that
//! went down. Everything else talks to it through the cloneable [`Scheduler`] handle; no lock
//! is shared and none is held across I/O.

pub mod costs;
pub mod fair;
pub mod placement;
pub mod state;
pub mod timeline;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::HostClient;
use crate::config::HostConfig;
use crate::error::{DispatchError, ErrorKind, HostSignal};
use crate::task::{InferenceTask, TaskEvent, TaskId, TaskSpec, Timeouts};
use costs::Observed;
use state::{
    Decision, DispatchState, HealthChange, HostId, Limits, ManifestReport, Outcome, Queueable,
    Release, RunningTask, Snapshot,
};

impl Queueable for InferenceTask {
    fn id(&self) -> TaskId {
        self.id
    }
    fn model(&self) -> &str {
        &self.spec.model
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
    fn queue_deadline(&self) -> Option<Instant> {
        self.queue_timeout.map(|t| self.enqueued_at + t)
    }
    fn attempts(&self) -> u32 {
        self.attempts
    }
    fn abandoned(&self) -> bool {
        InferenceTask::abandoned(self)
    }
    fn client_id(&self) -> &str {
        &self.spec.client_id
    }
    fn priority(&self) -> i32 {
        self.spec.priority
    }
    fn queue_key(&self) -> Option<fair::QueueKey> {
        self.queue_key
    }
    fn set_queue_key(&mut self, key: fair::QueueKey) {
        self.queue_key = Some(key);
    }
    fn notify_position(&self, position: usize, starts_in: Option<Duration>) {
        self.emit(TaskEvent::Queued {
            position,
            starts_in,
        });
    }
    fn notify_no_host(&self, position: usize, why: &str) {
        self.emit(TaskEvent::NoHost {
            position,
            why: why.to_string(),
        });
    }
}

enum Command {
    Submit(Box<InferenceTask>),
    NextTask {
        host: HostId,
        reply: oneshot::Sender<Assignment>,
    },
    Released {
        host: HostId,
        task: TaskId,
        release: Box<Release<InferenceTask>>,
    },
    Cancel(TaskId),
    ManifestsRead(Vec<ManifestReport>),
    ProbeResult(ManifestReport),
    /// A cold request sent its first byte: its model is loaded.
    FirstByte {
        host: HostId,
        task: TaskId,
    },
    /// A `/slots` read of a host busy from elsewhere: slots processing, if it could tell.
    SlotsRead {
        host: HostId,
        processing: Option<usize>,
    },
    Refresh(oneshot::Sender<()>),
    Status {
        /// Include the timeline (recent spans and samples): the status page wants it.
        timeline: bool,
        reply: oneshot::Sender<Snapshot>,
    },
    /// A configuration reload: the new fleet, in configuration order.
    Reconfigure {
        hosts: Vec<HostConfig>,
        http: reqwest::Client,
        reply: oneshot::Sender<FleetChange>,
    },
    /// Stop taking work; answers once no task runs any more.
    Close(oneshot::Sender<()>),
    Shutdown,
    /// Fault injection for the crash-safety test: the actor panics.
    #[doc(hidden)]
    Panic,
}

/// A task handed to a slot worker, with the slot it holds and the host's current client
/// (a reload may have changed its key).
pub struct Assignment {
    pub task: InferenceTask,
    pub lease: SlotLease,
    pub client: Arc<HostClient>,
    /// The host's tasks in flight from this daemon when this one started, itself included,
    /// and its slots: what a `/slots` read before sending is compared against.
    pub running_here: usize,
    /// Of the other tasks in flight here, those the host has not answered yet: a `/slots`
    /// read may or may not count them as processing.
    pub silent_others: usize,
    pub slots: usize,
    /// The host does not hold the model: the request loads it.
    pub cold: bool,
    /// The request runs alone on its host until its first byte: the worker tells the
    /// scheduler of that byte ([`Scheduler::first_byte`]), which opens the other slots.
    pub gated: bool,
}

/// A host as the scheduler starts with it.
pub struct HostSetup {
    pub client: HostClient,
    pub slots: usize,
    pub max_loaded_models: usize,
    /// Load time until one is learned.
    pub load: Duration,
}

/// What a reload changed, by host name, and the slot workers the caller must start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetChange {
    pub added: Vec<String>,
    /// Retired: no new work; running tasks finish.
    pub removed: Vec<String>,
    /// Same server, other slots, name or key.
    pub changed: Vec<String>,
    /// Per host, how many more workers it needs.
    pub spawn: Vec<(HostId, usize)>,
}

impl FleetChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// A taken slot. It goes back exactly once: through [`SlotLease::release`] or
/// [`SlotLease::retry`], or, on any other path (a panic, an assignment that never reached its
/// worker), when it is dropped, counted as cancelled.
pub struct SlotLease {
    host: HostId,
    task: TaskId,
    scheduler: Option<mpsc::UnboundedSender<Command>>,
}

impl SlotLease {
    /// Gives the slot back with how the task ended and what it says about the host.
    pub fn release(mut self, outcome: Outcome, signal: HostSignal) {
        self.send(Release {
            outcome,
            signal,
            retry: None,
            observed: None,
        });
    }

    /// Gives the slot back after a completed task, with its timings for the cost model.
    pub fn completed(mut self, model: String, observed: Observed) {
        self.send(Release {
            outcome: Outcome::Completed,
            signal: HostSignal::Healthy,
            retry: None,
            observed: Some((model, observed)),
        });
    }

    /// Gives the slot back and the task with it: it failed before the host sent a byte and
    /// may run elsewhere (the scheduler decides, within `max_attempts`).
    pub fn retry(mut self, task: InferenceTask, error: DispatchError, signal: HostSignal) {
        self.send(Release {
            outcome: Outcome::Failed,
            signal,
            retry: Some((task, error)),
            observed: None,
        });
    }

    fn send(&mut self, release: Release<InferenceTask>) {
        if let Some(scheduler) = self.scheduler.take() {
            let _ = scheduler.send(Command::Released {
                host: self.host,
                task: self.task,
                release: Box::new(release),
            });
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.send(Release {
            outcome: Outcome::Cancelled,
            signal: HostSignal::Neutral,
            retry: None,
            observed: None,
        });
    }
}

/// The client's end of a submitted task. Dropping it before the end cancels the task wherever
/// it is: removed from the queue, or its host connection dropped by its worker.
pub struct TaskHandle {
    id: TaskId,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    cancel: CancellationToken,
    scheduler: mpsc::UnboundedSender<Command>,
    ended: bool,
}

impl TaskHandle {
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The next event; after `Finished` or `Failed`, `None`.
    pub async fn next(&mut self) -> Option<TaskEvent> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().await.unwrap_or_else(|| {
            TaskEvent::Failed(DispatchError::new(
                ErrorKind::SchedulerStopped,
                "Dispatcher loop stopped: the dispatcher dropped this task without an answer \
                 (its scheduler or worker stopped); retry, and restart prix-dispatch if it repeats",
            ))
        });
        self.ended = matches!(event, TaskEvent::Finished(_) | TaskEvent::Failed(_));
        Some(event)
    }

    /// Stops the task; a waiting task leaves the queue, a running one loses its host connection.
    pub fn cancel(&mut self) {
        if !self.ended {
            self.ended = true;
            self.cancel.cancel();
            let _ = self.scheduler.send(Command::Cancel(self.id));
        }
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The daemon-wide defaults a task's own settings fall back to.
#[derive(Debug, Clone)]
pub struct TaskDefaults {
    pub timeouts: Timeouts,
    pub queue_timeout: Option<Duration>,
}

/// Everything the actor needs besides its hosts.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub limits: Limits,
    pub defaults: TaskDefaults,
    pub manifest_refresh: Duration,
}

/// The cloneable handle to the scheduler actor.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    /// Parent of every task's token: cancelling it stops all work (shutdown).
    root: CancellationToken,
    defaults: TaskDefaults,
}

impl Scheduler {
    /// Starts the actor. `hosts` are in configuration order, with their slot counts; their
    /// clients read manifests. The caller starts `slots` workers per host ([`crate::worker`]).
    /// The join handle tells whether the actor ended by itself or by a panic.
    pub fn spawn(
        hosts: Vec<HostSetup>,
        settings: SchedulerSettings,
    ) -> (Scheduler, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let mut state = DispatchState::new(
            hosts.iter().map(|h| (h.client.name.clone(), h.slots)),
            settings.limits,
        );
        for (i, h) in hosts.iter().enumerate() {
            state.set_switching(HostId(i), h.max_loaded_models, h.load);
        }
        let actor = Actor {
            state,
            waiting: hosts.iter().map(|_| VecDeque::new()).collect(),
            workers: hosts.iter().map(|h| h.slots).collect(),
            running: hosts.iter().map(|_| Vec::new()).collect(),
            history: timeline::History::new(started),
            host_history: hosts
                .iter()
                .map(|_| timeline::HostHistory::new(started))
                .collect(),
            hosts: hosts.into_iter().map(|h| Arc::new(h.client)).collect(),
            refresh_waiters: Vec::new(),
            served: fair::Served::default(),
            close_waiters: Vec::new(),
            tx: tx.clone(),
        };
        let root = CancellationToken::new();
        let join = tokio::spawn(actor.run(rx, root.clone(), settings.manifest_refresh));
        let scheduler = Scheduler {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            root,
            defaults: settings.defaults,
        };
        (scheduler, join)
    }

    /// Queues a task. Errors only when the scheduler is gone; every other failure arrives as
    /// a `Failed` event.
    pub fn submit(&self, spec: TaskSpec) -> Result<TaskHandle, DispatchError> {
        let id = TaskId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (events_tx, events) = mpsc::unbounded_channel();
        let cancel = self.root.child_token();
        let timeouts = Timeouts {
            first_token: spec
                .first_token_timeout
                .unwrap_or(self.defaults.timeouts.first_token),
            inactivity: spec.timeout.unwrap_or(self.defaults.timeouts.inactivity),
        };
        let queue_timeout = match spec.queue_timeout {
            Some(limit) if limit.is_zero() => None,
            Some(limit) => Some(limit),
            None => self.defaults.queue_timeout,
        };
        let task = InferenceTask {
            id,
            spec,
            timeouts,
            queue_timeout,
            attempts: 0,
            enqueued_at: Instant::now(),
            cancel: cancel.clone(),
            events: events_tx,
            first_output: None,
            queue_key: None,
            first_fired: Default::default(),
        };
        self.tx
            .send(Command::Submit(Box::new(task)))
            .map_err(|_| DispatchError::scheduler_stopped())?;
        Ok(TaskHandle {
            id,
            events,
            cancel,
            scheduler: self.tx.clone(),
            ended: false,
        })
    }

    /// The request `task` on `host` sent its first byte (a cold load is done: the gate
    /// opens; and the host surely counts it as processing).
    pub fn first_byte(&self, host: HostId, task: TaskId) {
        let _ = self.tx.send(Command::FirstByte { host, task });
    }

    /// Says at once that a slot of `host` is free for its next task, and returns the wait for
    /// it (`None` once the scheduler stops or dismisses the worker). The request is sent before
    /// the returned future is first polled: a worker asks before it tells its client the
    /// previous task ended, so a call the client sends on hearing it finds this slot free (else
    /// it went to another host, warm but more versatile, and a model only that host lists
    /// waited behind it: the real-server test, once in CI).
    pub fn next_task(&self, host: HostId) -> impl Future<Output = Option<Assignment>> + use<> {
        let (reply, assignment) = oneshot::channel();
        let sent = self.tx.send(Command::NextTask { host, reply }).is_ok();
        async move { if sent { assignment.await.ok() } else { None } }
    }

    /// Re-reads every manifest (joining a read already in flight) and waits for it.
    pub async fn refresh_manifests(&self) -> Result<(), DispatchError> {
        self.ask(Command::Refresh).await
    }

    /// The state now, without the timeline.
    pub async fn snapshot(&self) -> Result<Snapshot, DispatchError> {
        self.ask(|reply| Command::Status {
            timeline: false,
            reply,
        })
        .await
    }

    /// The state now with its timeline ([`timeline::Timeline`]): recent spans per host and
    /// the queue series.
    pub async fn snapshot_with_timeline(&self) -> Result<Snapshot, DispatchError> {
        self.ask(|reply| Command::Status {
            timeline: true,
            reply,
        })
        .await
    }

    /// Applies a new fleet (a configuration reload): hosts are matched by identity
    /// ([`HostConfig::identity`]); new ones join, missing ones retire (their running tasks
    /// finish), changed slots apply as slots free. The caller starts the workers listed in
    /// the answer's `spawn`.
    pub async fn reconfigure(
        &self,
        hosts: Vec<HostConfig>,
        http: reqwest::Client,
    ) -> Result<FleetChange, DispatchError> {
        self.ask(|reply| Command::Reconfigure { hosts, http, reply })
            .await
    }

    /// Stops taking work: waiting tasks fail with a retryable "shutting down", so do new
    /// ones; resolves when no task runs any more.
    pub async fn close(&self) -> Result<(), DispatchError> {
        self.ask(Command::Close).await
    }

    async fn ask<R>(
        &self,
        command: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, DispatchError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .map_err(|_| DispatchError::scheduler_stopped())?;
        answer.await.map_err(|_| DispatchError::scheduler_stopped())
    }

    /// Stops running tasks, fails waiting ones with a retryable "shutting down", and stops
    /// the actor and its workers.
    pub fn shutdown(&self) {
        self.root.cancel();
        let _ = self.tx.send(Command::Shutdown);
    }

    #[doc(hidden)]
    pub fn inject_panic(&self) {
        let _ = self.tx.send(Command::Panic);
    }
}

/// A task running on a host, as the actor handed it out.
struct RunningEntry {
    id: TaskId,
    model: String,
    client: Option<u64>,
    /// Who asked, for fair share.
    client_id: String,
    since: Instant,
    /// The host sent its first byte: it is surely processing it (for `/slots` counts).
    answering: bool,
    /// When the host sent its first byte, if the worker said (cold starts, llama.cpp hosts).
    first_byte: Option<Instant>,
    /// Its slot row on the timeline.
    slot: usize,
    /// It needed a model load.
    cold: bool,
}

struct Actor {
    state: DispatchState<InferenceTask>,
    /// Per host (by `HostId`, retired ones included), its current client.
    hosts: Vec<Arc<HostClient>>,
    /// Per host, the workers waiting for a task (their count mirrors the state's idle workers).
    waiting: Vec<VecDeque<oneshot::Sender<Assignment>>>,
    /// Per host, the workers alive (waiting, running, or on their way back).
    workers: Vec<usize>,
    refresh_waiters: Vec<oneshot::Sender<()>>,
    close_waiters: Vec<oneshot::Sender<()>>,
    /// Per host, what runs there and since when: for status pages, not for decisions.
    running: Vec<Vec<RunningEntry>>,
    /// Tasks completed per client, for status pages.
    served: fair::Served,
    /// The queue series and the clock origin of the timeline.
    history: timeline::History,
    /// Per host (by `HostId`), its busy clock and recent spans.
    host_history: Vec<timeline::HostHistory>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        root: CancellationToken,
        manifest_refresh: Duration,
    ) {
        let decisions = self.state.start();
        self.carry_out(decisions);
        let mut refresh =
            tokio::time::interval_at(Instant::now() + manifest_refresh, manifest_refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sample = tokio::time::interval(timeline::SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.state.next_deadline();
            let command = tokio::select! {
                command = rx.recv() => command,
                _ = sleep_until(deadline) => {
                    let decisions = self.state.tick(Instant::now());
                    self.carry_out(decisions);
                    continue;
                }
                _ = sample.tick() => {
                    let now = Instant::now();
                    let queued = self.state.waiting().count();
                    let running = self.running.iter().map(Vec::len).sum();
                    self.history.sample(now, queued, running, self.host_history.iter_mut());
                    continue;
                }
                _ = refresh.tick() => {
                    let mut decisions = Vec::new();
                    self.state.request_manifests(&mut decisions);
                    self.carry_out(decisions);
                    continue;
                }
            };
            let now = Instant::now();
            let decisions = match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::Panic) => panic!("injected scheduler panic (fault-injection test)"),
                Some(Command::Submit(task)) => {
                    if task.abandoned() {
                        self.state.submitted_abandoned();
                        continue;
                    }
                    self.state.submit(*task, now)
                }
                Some(Command::NextTask { host, reply }) => {
                    if !self.state.wants_worker(host) {
                        // Its host left the fleet or has fewer slots: dropping the reply stops it.
                        self.workers[host.0] -= 1;
                        continue;
                    }
                    self.waiting[host.0].push_back(reply);
                    self.state.worker_idle(host, now)
                }
                Some(Command::Reconfigure { hosts, http, reply }) => {
                    let (change, decisions) = self.reconfigure(hosts, &http, now);
                    let _ = reply.send(change);
                    decisions
                }
                Some(Command::Released {
                    host,
                    task,
                    release,
                }) => {
                    if release.retry.is_none()
                        && matches!(release.outcome, state::Outcome::Completed)
                        && let Some(r) = self.running[host.0].iter().find(|r| r.id == task)
                    {
                        self.served.record(&r.client_id);
                    }
                    self.ended(host, task, &release, now);
                    self.state.released(host, *release, now)
                }
                Some(Command::Cancel(id)) => self.state.cancel(id, now).1,
                Some(Command::ManifestsRead(reports)) => {
                    for waiter in self.refresh_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                    self.state.manifests_read(reports, now)
                }
                Some(Command::ProbeResult(report)) => self.state.probe_result(report, now),
                Some(Command::FirstByte { host, task }) => {
                    if let Some(r) = self.running[host.0].iter_mut().find(|r| r.id == task) {
                        r.answering = true;
                        r.first_byte.get_or_insert(now);
                    }
                    self.state.first_byte(host, task, now)
                }
                Some(Command::SlotsRead { host, processing }) => {
                    self.state.slots_read(host, processing, now)
                }
                Some(Command::Refresh(reply)) => {
                    self.refresh_waiters.push(reply);
                    let mut decisions = Vec::new();
                    self.state.request_manifests(&mut decisions);
                    decisions
                }
                Some(Command::Status { timeline, reply }) => {
                    let _ = reply.send(self.snapshot(now, timeline));
                    continue;
                }
                Some(Command::Close(reply)) => {
                    self.close_waiters.push(reply);
                    self.state.close()
                }
            };
            self.carry_out(decisions);
            if self.state.running() == 0 {
                for waiter in self.close_waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
        root.cancel();
        for task in self.state.drain_waiting() {
            task.emit(TaskEvent::Failed(DispatchError::new(
                ErrorKind::ShuttingDown,
                "prix-dispatch is shutting down; retry against the next instance",
            )));
        }
        tracing::debug!("scheduler stopped");
    }

    fn carry_out(&mut self, decisions: Vec<Decision<InferenceTask>>) {
        for decision in decisions {
            match decision {
                Decision::Start {
                    task,
                    host,
                    cold,
                    gated,
                } => {
                    let lease = SlotLease {
                        host,
                        task: task.id,
                        scheduler: Some(self.tx.clone()),
                    };
                    let now = Instant::now();
                    let running = &mut self.running[host.0];
                    let slot = (0..)
                        .find(|i| running.iter().all(|r| r.slot != *i))
                        .unwrap_or_default();
                    running.push(RunningEntry {
                        id: task.id,
                        model: task.spec.model.clone(),
                        client: task.spec.client,
                        client_id: task.spec.client_id.clone(),
                        since: now,
                        answering: false,
                        first_byte: None,
                        slot,
                        cold,
                    });
                    self.host_history[host.0].busy.set(now, running.len());
                    let silent_others =
                        self.running[host.0].iter().filter(|r| !r.answering).count() - 1;
                    let assignment = Assignment {
                        task,
                        lease,
                        client: self.hosts[host.0].clone(),
                        running_here: self.running[host.0].len(),
                        silent_others,
                        slots: self.state.slots(host),
                        cold,
                        gated,
                    };
                    let undelivered = match self.waiting[host.0].pop_front() {
                        Some(worker) => worker.send(assignment).err(),
                        None => Some(assignment),
                    };
                    // A worker that vanished: the lease's drop gives the slot back.
                    if let Some(Assignment { task, .. }) = undelivered {
                        tracing::error!(host = %self.hosts[host.0].name, task = %task.id, "no worker took the task");
                        task.emit(TaskEvent::Failed(DispatchError::new(
                            ErrorKind::ShuttingDown,
                            "the slot worker for this host stopped; prix-dispatch is shutting down",
                        )));
                    }
                }
                Decision::Fail { task, error } => {
                    tracing::debug!(task = %task.id, model = %task.spec.model, %error, "task failed in the queue");
                    task.emit(TaskEvent::Failed(error));
                }
                Decision::ReadManifests => self.read_manifests(),
                Decision::ReadSlots { host, after } => {
                    let client = self.hosts[host.0].clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let processing = client.read_slots().await.map(|b| b.processing);
                        let _ = tx.send(Command::SlotsRead { host, processing });
                    });
                }
                Decision::DismissWorkers { host, count } => {
                    for _ in 0..count {
                        if self.waiting[host.0].pop_front().is_some() {
                            self.workers[host.0] -= 1;
                        }
                    }
                }
                Decision::Probe { host, after } => self.probe(host, after),
                Decision::Health { host, change } => {
                    let host = &self.hosts[host.0];
                    match change {
                        HealthChange::Down { reason } => {
                            tracing::warn!(host = %host.name, url = %host.base_url, %reason, "host out of rotation; probing until it answers");
                        }
                        HealthChange::Cooling { seconds, reason } => {
                            tracing::warn!(host = %host.name, %reason, seconds, "host answers with server errors; cooling down");
                        }
                        HealthChange::Up => {
                            tracing::info!(host = %host.name, "host back in rotation")
                        }
                        HealthChange::BusyElsewhere { busy: 0 } => {
                            tracing::info!(host = %host.name, "no longer busy with requests from elsewhere")
                        }
                        HealthChange::BusyElsewhere { busy } => {
                            tracing::warn!(host = %host.name, busy, "busy with requests from elsewhere (its /slots); holding work for it until they end")
                        }
                    }
                }
            }
        }
    }

    /// A task left its host: its span goes to the host's history, its time to the busy clock.
    fn ended(
        &mut self,
        host: HostId,
        task: TaskId,
        release: &Release<InferenceTask>,
        now: Instant,
    ) {
        let running = &mut self.running[host.0];
        let Some(i) = running.iter().position(|r| r.id == task) else {
            return;
        };
        let entry = running.remove(i);
        self.host_history[host.0].busy.set(now, running.len());
        let outcome = match (&release.retry, release.outcome) {
            (Some(_), _) => timeline::SpanEnd::Retried,
            (None, state::Outcome::Completed) => timeline::SpanEnd::Completed,
            (None, state::Outcome::Failed) => timeline::SpanEnd::Failed,
            (None, state::Outcome::Cancelled) => timeline::SpanEnd::Cancelled,
        };
        // A completed task's first byte is in its timings even when the worker did not say.
        let first_byte = entry.first_byte.or_else(|| {
            release
                .observed
                .as_ref()
                .and_then(|(_, o)| o.ttft)
                .map(|ttft| entry.since + ttft)
        });
        let mut span = self.span(&entry);
        span.first_byte_ms = first_byte.map(|at| self.history.ms(at));
        span.end_ms = Some(self.history.ms(now));
        span.outcome = Some(outcome);
        self.host_history[host.0].ended(span);
    }

    /// A running task as a timeline span (open: no end yet).
    fn span(&self, r: &RunningEntry) -> timeline::TaskSpan {
        timeline::TaskSpan {
            task: r.id.0,
            model: r.model.clone(),
            slot: r.slot,
            cold: r.cold,
            start_ms: self.history.ms(r.since),
            first_byte_ms: r.first_byte.map(|at| self.history.ms(at)),
            end_ms: None,
            outcome: None,
        }
    }

    fn snapshot(&self, now: Instant, with_timeline: bool) -> Snapshot {
        let mut snapshot = self.state.snapshot();
        for (host, client) in snapshot.hosts.iter_mut().zip(&self.hosts) {
            host.url = client.base_url.clone();
        }
        for ((host, running), history) in snapshot
            .hosts
            .iter_mut()
            .zip(&self.running)
            .zip(&self.host_history)
        {
            host.running = running
                .iter()
                .map(|r| RunningTask {
                    id: r.id.0,
                    model: r.model.clone(),
                    running_ms: now.saturating_duration_since(r.since).as_secs_f64() * 1e3,
                    slot: r.slot,
                    loading: r.cold && r.first_byte.is_none(),
                })
                .collect();
            let (busy, slot_busy) = history.busy.read(now);
            host.busy_seconds = busy.as_secs_f64();
            host.slot_busy_seconds = slot_busy.as_secs_f64();
        }
        if with_timeline {
            snapshot.timeline = Some(self.timeline(&snapshot, now));
        }
        let by_client = &mut snapshot.tasks_by_client;
        for client in self.state.waiting().filter_map(|t| t.spec.client) {
            by_client.entry(client).or_default().0 += 1;
        }
        for client in self.running.iter().flatten().filter_map(|r| r.client) {
            by_client.entry(client).or_default().1 += 1;
        }
        let mut share: BTreeMap<String, state::ShareStatus> = BTreeMap::new();
        fn entry<'a>(
            share: &'a mut BTreeMap<String, state::ShareStatus>,
            id: &str,
        ) -> &'a mut state::ShareStatus {
            share
                .entry(id.to_string())
                .or_insert_with(|| state::ShareStatus {
                    client: id.to_string(),
                    queued: 0,
                    running: 0,
                    served: 0,
                })
        }
        for task in self.state.waiting() {
            entry(&mut share, &task.spec.client_id).queued += 1;
        }
        for r in self.running.iter().flatten() {
            entry(&mut share, &r.client_id).running += 1;
        }
        for (id, n) in self.served.iter() {
            entry(&mut share, id).served = n;
        }
        snapshot.fair_share = share.into_values().collect();
        snapshot
    }

    /// The timeline of every host in `snapshot` (retired ones with tasks included).
    fn timeline(&self, snapshot: &Snapshot, now: Instant) -> timeline::Timeline {
        let hosts = snapshot
            .hosts
            .iter()
            .zip(&self.running)
            .zip(&self.host_history)
            .filter(|((h, _), _)| !h.retired || h.active > 0)
            .map(|((h, running), history)| timeline::HostTimeline {
                host: h.name.clone(),
                slots: h.slots,
                utilisation: history.utilisation(now),
                spans: history
                    .spans()
                    .cloned()
                    .chain(running.iter().map(|r| self.span(r)))
                    .collect(),
            })
            .collect();
        timeline::Timeline {
            now_ms: self.history.ms(now),
            window_seconds: timeline::WINDOW.as_secs_f64(),
            max_spans_per_host: timeline::MAX_SPANS_PER_HOST,
            sample_every_seconds: timeline::SAMPLE_EVERY.as_secs_f64(),
            hosts,
            queue: self.history.queue(),
        }
    }

    fn read_manifests(&self) {
        let hosts = self.hosts.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let reads = (0..hosts.len()).map(|i| read_host(&hosts, HostId(i)));
            let reports = futures::future::join_all(reads).await;
            let _ = tx.send(Command::ManifestsRead(reports));
        });
    }

    /// Matches the new fleet to the hosts by identity and tells the state what changed.
    fn reconfigure(
        &mut self,
        hosts: Vec<HostConfig>,
        http: &reqwest::Client,
        now: Instant,
    ) -> (FleetChange, Vec<Decision<InferenceTask>>) {
        let mut change = FleetChange::default();
        let mut decisions = Vec::new();
        let mut listed = vec![false; self.hosts.len()];
        for config in hosts {
            let identity = config.identity();
            let existing = self
                .hosts
                .iter()
                .position(|h| crate::config::host_identity(&h.base_url) == identity);
            let client = Arc::new(HostClient::new(&config, http.clone()));
            let id = match existing {
                Some(i) => {
                    listed[i] = true;
                    let id = HostId(i);
                    let old = &self.hosts[i];
                    if self.state.is_retired(id) {
                        change.added.push(config.name.clone());
                        decisions.extend(self.state.revive_host(
                            id,
                            config.name.clone(),
                            config.slots,
                        ));
                    } else {
                        if old.name != config.name
                            || old.base_url != config.base_url
                            || !old.same_key(&client)
                            || self.state.slots(id) != config.slots
                        {
                            change.changed.push(config.name.clone());
                        }
                        self.state.rename_host(id, config.name.clone());
                        decisions.extend(self.state.set_slots(id, config.slots, now));
                    }
                    self.hosts[i] = client;
                    self.state
                        .set_switching(id, config.max_loaded_models, config.load);
                    id
                }
                None => {
                    let (id, added) = self.state.add_host(config.name.clone(), config.slots);
                    self.state
                        .set_switching(id, config.max_loaded_models, config.load);
                    decisions.extend(added);
                    self.hosts.push(client);
                    self.waiting.push(VecDeque::new());
                    self.running.push(Vec::new());
                    self.host_history.push(timeline::HostHistory::new(now));
                    self.workers.push(0);
                    listed.push(true);
                    change.added.push(config.name.clone());
                    id
                }
            };
            let needed = config.slots.saturating_sub(self.workers[id.0]);
            if needed > 0 {
                self.workers[id.0] += needed;
                change.spawn.push((id, needed));
            }
        }
        for (i, listed) in listed.into_iter().enumerate() {
            let id = HostId(i);
            if !listed && !self.state.is_retired(id) {
                change.removed.push(self.hosts[i].name.clone());
                decisions.extend(self.state.retire_host(id, now));
            }
        }
        (change, decisions)
    }

    fn probe(&self, host: HostId, after: Duration) {
        let hosts = self.hosts.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let report = read_host(&hosts, host).await;
            let _ = tx.send(Command::ProbeResult(report));
        });
    }
}

async fn read_host(hosts: &[Arc<HostClient>], id: HostId) -> ManifestReport {
    let host = &hosts[id.0];
    let (models, loaded) = tokio::join!(host.read_manifest(), host.read_loaded_models());
    if let Err(why) = &models {
        tracing::debug!(host = %host.name, url = %host.base_url, %why, "manifest read failed");
    }
    ManifestReport {
        host: id,
        models,
        loaded,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
