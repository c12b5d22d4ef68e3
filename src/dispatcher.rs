//! The dispatcher as front ends see it: a fleet, one queue, and a way to submit work.

use std::collections::BTreeMap;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;
use tokio::sync::watch;

use crate::backend::{self, HostClient};
use crate::clients::{ClientStatus, Clients};
use crate::config::Config;
use crate::error::DispatchError;
use crate::metrics::Metrics;
use crate::scheduler::state::{Counters, Health, HostId, HostSnapshot, Limits};
use crate::scheduler::{FleetChange, HostSetup, Scheduler, TaskHandle};
use crate::scheduler::{SchedulerSettings, TaskDefaults};
use crate::task::{CompletionResult, TaskEvent, TaskSpec, Timeouts};
use crate::worker;

/// Cheap to clone; the fleet stops when the last clone is dropped or `shutdown` is called.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    scheduler: Scheduler,
    /// The connection pool every host client shares (reloads included).
    http: reqwest::Client,
    max_request_bytes: usize,
    progress_interval: std::time::Duration,
    /// MCP tasks of every session (a stateless HTTP request is a session of its own).
    mcp_tasks: Arc<crate::mcp_tasks::TaskStore>,
    metrics: Arc<Metrics>,
    clients: Clients,
    /// Becomes true if the scheduler actor panicked.
    crashed: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.scheduler.shutdown();
    }
}

/// Per-host state for `list_models`, `dispatch_status` and `/status`. Never holds a key.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HostStatus {
    #[serde(flatten)]
    pub state: HostSnapshot,
    pub url: String,
    /// False while the host is out of rotation (down, being probed).
    pub reachable: bool,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DispatchStatus {
    pub hosts: Vec<HostStatus>,
    /// Waiting tasks per model.
    pub queue: BTreeMap<String, usize>,
    pub queued_total: usize,
    /// Tasks waiting for a manifest read to learn whether any host has their model.
    pub awaiting_manifest: usize,
    /// True once a graceful shutdown began: new tasks are refused.
    pub closing: bool,
    /// Connected MCP clients and the tasks each has queued and running.
    pub clients: Vec<ClientStatus>,
    /// Every client fair share tells apart (MCP sessions, OpenAI users, headers, keys): its
    /// queued, running and served (completed) tasks.
    pub fair_share: Vec<crate::scheduler::state::ShareStatus>,
    pub counters: Counters,
    /// What placement knows of switching costs: per host and model, learned load, warm
    /// first-token and service times in seconds.
    pub costs: Vec<crate::scheduler::costs::LearnedCost>,
    /// Recent history for the status page (`/status` only; absent from `dispatch_status`,
    /// which an LLM reads): per host its task spans of the last `window_seconds` (at most
    /// `max_spans_per_host`) and utilisation, and the queue depth sampled every
    /// `sample_every_seconds`. See [`crate::scheduler::timeline`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<crate::scheduler::timeline::Timeline>,
}

impl Dispatcher {
    /// Starts the scheduler, one worker per host slot, and the first manifest read.
    /// Must be called inside a Tokio runtime.
    pub fn start(config: &Config) -> Dispatcher {
        let http = backend::http_client();
        let hosts: Vec<HostSetup> = config
            .hosts
            .iter()
            .map(|h| HostSetup {
                client: HostClient::new(h, http.clone()),
                slots: h.slots,
                max_loaded_models: h.max_loaded_models,
                load: h.load,
            })
            .collect();
        let slots: Vec<usize> = config.hosts.iter().map(|h| h.slots).collect();
        let settings = SchedulerSettings {
            limits: Limits {
                max_pending: config.queue.max_pending,
                max_bypass: config.queue.max_bypass,
                max_attempts: config.queue.max_attempts,
                host_wait: config.queue.host_wait,
                probe_interval: config.health.probe_interval,
                breaker_threshold: config.health.failure_threshold,
                breaker_cooldown: config.health.cooldown,
                swap_aware: config.queue.swap_aware,
            },
            defaults: TaskDefaults {
                timeouts: Timeouts {
                    first_token: config.timeouts.first_token,
                    inactivity: config.timeouts.inactivity,
                },
                queue_timeout: config.queue.wait_timeout,
            },
            manifest_refresh: config.health.manifest_refresh,
        };
        let (scheduler, actor) = Scheduler::spawn(hosts, settings);
        let (crash_tx, crashed) = watch::channel(false);
        tokio::spawn(async move {
            if let Err(e) = actor.await
                && e.is_panic()
            {
                tracing::error!("the scheduler panicked; every waiting task has failed");
                let _ = crash_tx.send(true);
            }
        });
        let metrics = Arc::new(Metrics::default());
        for (i, n) in slots.into_iter().enumerate() {
            spawn_workers(&scheduler, &metrics, HostId(i), n);
        }
        Dispatcher {
            inner: Arc::new(Inner {
                scheduler,
                http,
                max_request_bytes: config.server.max_request_bytes,
                progress_interval: config.server.progress_interval,
                mcp_tasks: Arc::default(),
                metrics,
                clients: Clients::default(),
                crashed,
            }),
        }
    }

    /// Applies a reloaded fleet without losing work: hosts are matched by identity (normalised
    /// URL); added ones start taking work once their manifest is read, removed ones take no
    /// new work while their running tasks finish, changed slots apply as slots free. Only the
    /// hosts change; queue, health and timeout settings stay as the daemon started.
    pub async fn reconfigure(
        &self,
        hosts: &[crate::config::HostConfig],
    ) -> Result<FleetChange, DispatchError> {
        let change = self
            .inner
            .scheduler
            .reconfigure(hosts.to_vec(), self.inner.http.clone())
            .await?;
        for &(host, n) in &change.spawn {
            spawn_workers(&self.inner.scheduler, &self.inner.metrics, host, n);
        }
        Ok(change)
    }

    /// The Prometheus exposition of this daemon's metrics.
    pub async fn metrics_text(&self) -> Result<String, DispatchError> {
        let status = self.status().await?;
        Ok(self.inner.metrics.render(&status))
    }

    /// The registry of connected clients.
    pub fn clients(&self) -> &Clients {
        &self.inner.clients
    }

    /// Largest request a front end should accept, in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.inner.max_request_bytes
    }

    /// Longest silence a front end allows itself towards a client waiting on a task, if the
    /// client asked for progress (`[server] progress_interval_seconds`).
    pub fn progress_interval(&self) -> std::time::Duration {
        self.inner.progress_interval
    }

    /// The MCP tasks (task-augmented tool calls) of every client.
    pub fn mcp_tasks(&self) -> &Arc<crate::mcp_tasks::TaskStore> {
        &self.inner.mcp_tasks
    }

    /// Resolves if the scheduler panics (the process should then exit non-zero so that a
    /// supervisor restarts it); never resolves otherwise.
    pub async fn crashed(&self) {
        let mut crashed = self.inner.crashed.clone();
        if crashed.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Graceful stop: no new work, waiting tasks fail with a retryable "shutting down",
    /// running ones get up to `grace` to finish; then everything stops. Returns true when
    /// every running task finished in time.
    pub async fn drain(&self, grace: std::time::Duration) -> bool {
        let finished = tokio::time::timeout(grace, self.inner.scheduler.close()).await;
        self.shutdown();
        matches!(finished, Ok(Ok(())))
    }

    #[doc(hidden)]
    pub fn inject_scheduler_panic(&self) {
        self.inner.scheduler.inject_panic();
    }

    pub fn submit(&self, spec: TaskSpec) -> Result<TaskHandle, DispatchError> {
        self.inner.scheduler.submit(spec)
    }

    /// Submits and waits for the end, passing every non-terminal event to `on_event`.
    pub async fn run(
        &self,
        spec: TaskSpec,
        mut on_event: impl FnMut(&TaskEvent),
    ) -> Result<CompletionResult, DispatchError> {
        let mut handle = self.submit(spec)?;
        finish(&mut handle, &mut on_event).await
    }

    pub async fn status(&self) -> Result<DispatchStatus, DispatchError> {
        let snapshot = self.inner.scheduler.snapshot().await?;
        Ok(self.status_of(snapshot))
    }

    /// [`Self::status`] with the timeline the status page draws.
    pub async fn status_with_timeline(&self) -> Result<DispatchStatus, DispatchError> {
        let snapshot = self.inner.scheduler.snapshot_with_timeline().await?;
        Ok(self.status_of(snapshot))
    }

    fn status_of(&self, snapshot: crate::scheduler::state::Snapshot) -> DispatchStatus {
        let hosts = snapshot
            .hosts
            .into_iter()
            // A retired host leaves the status once its last task is done.
            .filter(|state| !state.retired || state.active > 0)
            .map(|state| HostStatus {
                reachable: state.health != Health::Down,
                url: state.url.clone(),
                state,
            })
            .collect();
        DispatchStatus {
            hosts,
            queued_total: snapshot.queue.values().sum(),
            queue: snapshot.queue,
            awaiting_manifest: snapshot.awaiting_manifest,
            closing: snapshot.closing,
            clients: self.inner.clients.list(&snapshot.tasks_by_client),
            fair_share: snapshot.fair_share,
            counters: snapshot.counters,
            costs: snapshot.costs,
            timeline: snapshot.timeline,
        }
    }

    /// Re-reads every host's manifest (single-flight) and waits for the result.
    pub async fn refresh_manifests(&self) -> Result<(), DispatchError> {
        self.inner.scheduler.refresh_manifests().await
    }

    pub fn shutdown(&self) {
        self.inner.scheduler.shutdown();
    }
}

fn spawn_workers(scheduler: &Scheduler, metrics: &Arc<Metrics>, host: HostId, n: usize) {
    for _ in 0..n {
        tokio::spawn(worker::run(scheduler.clone(), host, metrics.clone()));
    }
}

/// Reads a task's events to its end.
pub async fn finish(
    handle: &mut TaskHandle,
    mut on_event: impl FnMut(&TaskEvent),
) -> Result<CompletionResult, DispatchError> {
    while let Some(event) = handle.next().await {
        match event {
            TaskEvent::Finished(result) => return Ok(result),
            TaskEvent::Failed(error) => return Err(error),
            other => on_event(&other),
        }
    }
    Err(DispatchError::scheduler_stopped())
}
