//! What each host holds in memory, as the scheduler believes it: kept from what runs (a task
//! for a model makes it the most recently used; beyond `max_loaded_models` the least recently
//! used leaves) and corrected by every read of a host that tells (someone else may load or
//! unload models).

use std::time::Duration;

use super::{Decision, DispatchState, Host, HostId, Queueable};
use crate::task::TaskId;
use tokio::time::Instant;

impl Host {
    /// `model` starts here: it is (or becomes) resident, most recently used.
    pub(super) fn touch(&mut self, model: &str) {
        self.resident.retain(|m| m != model);
        self.resident.push(model.to_string());
        while self.resident.len() > self.max_loaded {
            self.resident.remove(0);
        }
    }

    /// The host said what it holds: that is the truth, in our recency order where we have
    /// one (models it loaded for someone else count as least recent). A model running here
    /// stays, whatever a read taken mid-load said.
    pub(super) fn correct_residency(&mut self, loaded: &[String]) {
        let mut next: Vec<String> = loaded
            .iter()
            .filter(|m| !self.resident.contains(m))
            .cloned()
            .collect();
        next.extend(self.resident.iter().filter(|m| loaded.contains(m)).cloned());
        if self.active > 0
            && let Some(current) = &self.current_model
            && !next.contains(current)
        {
            next.push(current.clone());
        }
        self.max_loaded = self.max_loaded.max(next.len());
        self.resident = next;
    }
}

impl<T: Queueable> DispatchState<T> {
    /// Per-host switching settings: how many models it holds at once and the load time to
    /// assume until one is learned.
    pub fn set_switching(&mut self, host: HostId, max_loaded: usize, load: Duration) {
        let h = &mut self.hosts[host.0];
        h.max_loaded = max_loaded.max(1);
        while h.resident.len() > h.max_loaded {
            h.resident.remove(0);
        }
        self.costs.set_configured_load(host.0, load);
    }

    /// The cold request `task` sent its first byte: its model is loaded, the host's other
    /// slots open.
    pub fn first_byte(&mut self, host: HostId, task: TaskId, now: Instant) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        let h = &mut self.hosts[host.0];
        if h.loading == Some(task) {
            h.loading = None;
            self.dispatch(now, &mut out);
        }
        out
    }
}
