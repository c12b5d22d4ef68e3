//! The dispatcher as front ends see it: a fleet, one queue, and a way to submit work.

use std::collections::BTreeMap;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;

use crate::backend::{self, HostClient};
use crate::config::Config;
use crate::error::DispatchError;
use crate::scheduler::state::{Counters, HostId, HostSnapshot, Limits};
use crate::scheduler::{Scheduler, TaskHandle};
use crate::task::{CompletionResult, TaskEvent, TaskSpec};
use crate::worker;

/// Cheap to clone; the fleet stops when the last clone is dropped or `shutdown` is called.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    scheduler: Scheduler,
    hosts: Arc<[HostClient]>,
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
    /// True when the last manifest read succeeded.
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
    pub counters: Counters,
}

impl Dispatcher {
    /// Starts the scheduler, one worker per host slot, and the first manifest read.
    /// Must be called inside a Tokio runtime.
    pub fn start(config: &Config) -> Dispatcher {
        let http = backend::http_client();
        let hosts: Arc<[HostClient]> = config
            .hosts
            .iter()
            .map(|h| HostClient::new(h, http.clone()))
            .collect();
        let slots: Vec<usize> = config.hosts.iter().map(|h| h.slots).collect();
        let limits = Limits {
            max_pending: config.queue.max_pending,
            max_bypass: config.queue.max_bypass,
        };
        let scheduler = Scheduler::spawn(hosts.clone(), &slots, limits, config.queue.wait_timeout);
        for (i, host) in hosts.iter().enumerate() {
            let client = Arc::new(host.clone());
            for _ in 0..slots[i] {
                tokio::spawn(worker::run(scheduler.clone(), HostId(i), client.clone()));
            }
        }
        Dispatcher {
            inner: Arc::new(Inner { scheduler, hosts }),
        }
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
        let hosts = snapshot
            .hosts
            .into_iter()
            .zip(self.inner.hosts.iter())
            .map(|(state, client)| HostStatus {
                reachable: state.last_error.is_none(),
                url: client.base_url.clone(),
                state,
            })
            .collect();
        Ok(DispatchStatus {
            hosts,
            queued_total: snapshot.queue.values().sum(),
            queue: snapshot.queue,
            awaiting_manifest: snapshot.awaiting_manifest,
            counters: snapshot.counters,
        })
    }

    /// Re-reads every host's manifest (single-flight) and waits for the result.
    pub async fn refresh_manifests(&self) -> Result<(), DispatchError> {
        self.inner.scheduler.refresh_manifests().await
    }

    pub fn shutdown(&self) {
        self.inner.scheduler.shutdown();
    }
}

/// Reads a task's events to its end.
pub async fn finish(
    handle: &mut TaskHandle,
    on_event: &mut impl FnMut(&TaskEvent),
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
