//! The scheduler actor: the single owner of dispatch state.
//!
//! It feeds events into the pure [`state::DispatchState`] and carries out its decisions:
//! handing tasks to waiting slot workers, failing tasks, reading manifests. Everything else
//! talks to it through the cloneable [`Scheduler`] handle; no lock is shared and none is held
//! across I/O.

pub mod state;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::HostClient;
use crate::error::{DispatchError, ErrorKind};
use crate::task::{InferenceTask, TaskEvent, TaskId, TaskSpec};
use state::{
    Decision, DispatchState, HostId, Limits, ManifestReport, Outcome, Queueable, Snapshot,
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
        self.spec.queue_timeout.map(|t| self.enqueued_at + t)
    }
    fn notify_position(&self, position: usize) {
        self.emit(TaskEvent::Queued { position });
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
        outcome: Outcome,
    },
    Cancel(TaskId),
    ManifestsRead(Vec<ManifestReport>),
    Refresh(oneshot::Sender<()>),
    Status(oneshot::Sender<Snapshot>),
    Shutdown,
}

/// A task handed to a slot worker, with the slot it holds.
pub struct Assignment {
    pub task: InferenceTask,
    pub lease: SlotLease,
}

/// A taken slot. Dropping it gives the slot back, exactly once, on every path: success,
/// error, cancellation, panic, or an assignment that never reached its worker.
pub struct SlotLease {
    host: HostId,
    outcome: Outcome,
    scheduler: mpsc::UnboundedSender<Command>,
}

impl SlotLease {
    /// Records how the task ended; a lease dropped without one counts as cancelled.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let _ = self.scheduler.send(Command::Released {
            host: self.host,
            outcome: self.outcome,
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
                "the dispatcher dropped this task without an answer (its scheduler or worker \
                 stopped); retry, and restart prix-dispatch if it repeats",
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

/// The cloneable handle to the scheduler actor.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    /// Parent of every task's token: cancelling it stops all work (shutdown).
    root: CancellationToken,
    default_queue_timeout: Option<Duration>,
}

impl Scheduler {
    /// Starts the actor. `hosts` are in configuration order; their clients read manifests.
    pub fn spawn(
        hosts: Arc<[HostClient]>,
        slots: &[usize],
        limits: Limits,
        default_queue_timeout: Option<Duration>,
    ) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = DispatchState::new(
            hosts.iter().zip(slots).map(|(h, s)| (h.name.clone(), *s)),
            limits,
        );
        let actor = Actor {
            state,
            hosts,
            waiting: slots.iter().map(|_| VecDeque::new()).collect(),
            refresh_waiters: Vec::new(),
            tx: tx.clone(),
        };
        let root = CancellationToken::new();
        tokio::spawn(actor.run(rx, root.clone()));
        Scheduler {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            root,
            default_queue_timeout,
        }
    }

    /// Queues a task. Errors only when the scheduler is gone; every other failure arrives as
    /// a `Failed` event.
    pub fn submit(&self, mut spec: TaskSpec) -> Result<TaskHandle, DispatchError> {
        if spec.queue_timeout.is_none() {
            spec.queue_timeout = self.default_queue_timeout;
        }
        let id = TaskId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (events_tx, events) = mpsc::unbounded_channel();
        let cancel = self.root.child_token();
        let task = InferenceTask {
            id,
            spec,
            enqueued_at: Instant::now(),
            cancel: cancel.clone(),
            events: events_tx,
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

    /// Waits until a slot of `host` has a task; `None` once the scheduler stops.
    pub async fn next_task(&self, host: HostId) -> Option<Assignment> {
        let (reply, assignment) = oneshot::channel();
        self.tx.send(Command::NextTask { host, reply }).ok()?;
        assignment.await.ok()
    }

    /// Re-reads every manifest (joining a read already in flight) and waits for it.
    pub async fn refresh_manifests(&self) -> Result<(), DispatchError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Refresh(reply))
            .map_err(|_| DispatchError::scheduler_stopped())?;
        done.await.map_err(|_| DispatchError::scheduler_stopped())
    }

    pub async fn snapshot(&self) -> Result<Snapshot, DispatchError> {
        let (reply, snapshot) = oneshot::channel();
        self.tx
            .send(Command::Status(reply))
            .map_err(|_| DispatchError::scheduler_stopped())?;
        snapshot
            .await
            .map_err(|_| DispatchError::scheduler_stopped())
    }

    /// Fails waiting tasks with a retryable "shutting down", stops running ones, and stops
    /// the actor and its workers.
    pub fn shutdown(&self) {
        self.root.cancel();
        let _ = self.tx.send(Command::Shutdown);
    }
}

struct Actor {
    state: DispatchState<InferenceTask>,
    hosts: Arc<[HostClient]>,
    /// Per host, the workers waiting for a task (their count mirrors the state's idle workers).
    waiting: Vec<VecDeque<oneshot::Sender<Assignment>>>,
    refresh_waiters: Vec<oneshot::Sender<()>>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>, root: CancellationToken) {
        let decisions = self.state.start();
        self.carry_out(decisions);
        loop {
            let deadline = self.state.next_deadline();
            let command = tokio::select! {
                command = rx.recv() => command,
                _ = sleep_until(deadline) => {
                    let decisions = self.state.tick(Instant::now());
                    self.carry_out(decisions);
                    continue;
                }
            };
            let now = Instant::now();
            let decisions = match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::Submit(task)) => {
                    if task.abandoned() {
                        continue;
                    }
                    self.state.submit(*task, now)
                }
                Some(Command::NextTask { host, reply }) => {
                    self.waiting[host.0].push_back(reply);
                    self.state.worker_idle(host, now)
                }
                Some(Command::Released { host, outcome }) => {
                    self.state.released(host, outcome, now)
                }
                Some(Command::Cancel(id)) => {
                    self.state.cancel(id);
                    continue;
                }
                Some(Command::ManifestsRead(reports)) => {
                    for waiter in self.refresh_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                    self.state.manifests_read(reports, now)
                }
                Some(Command::Refresh(reply)) => {
                    self.refresh_waiters.push(reply);
                    let mut decisions = Vec::new();
                    self.state.request_manifests(&mut decisions);
                    decisions
                }
                Some(Command::Status(reply)) => {
                    let _ = reply.send(self.state.snapshot());
                    continue;
                }
            };
            self.carry_out(decisions);
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
                Decision::Start { task, host } => {
                    let lease = SlotLease {
                        host,
                        outcome: Outcome::Cancelled,
                        scheduler: self.tx.clone(),
                    };
                    let assignment = Assignment { task, lease };
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
            }
        }
    }

    fn read_manifests(&self) {
        let hosts = self.hosts.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let reads = hosts.iter().enumerate().map(|(i, host)| async move {
                let (models, loaded) = tokio::join!(host.read_manifest(), host.read_loaded_models());
                if let Err(why) = &models {
                    tracing::warn!(host = %host.name, url = %host.base_url, %why, "manifest read failed");
                }
                ManifestReport {
                    host: HostId(i),
                    models,
                    loaded,
                }
            });
            let reports = futures::future::join_all(reads).await;
            let _ = tx.send(Command::ManifestsRead(reports));
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
