//! Fleet changes from a configuration reload: hosts join, leave and change their slot count
//! while tasks run. A host that leaves keeps its index (its running tasks still release their
//! slots there) and is only marked retired; one that comes back under the same identity takes
//! its old index again.

use std::time::Duration;

use super::{Decision, DispatchState, Host, HostId, Queueable};
use tokio::time::Instant;

impl<T: Queueable> DispatchState<T> {
    /// Adds a host that takes work as soon as its manifest is read (a probe is asked for at
    /// once). Returns its id: the next index, in configuration order after the existing ones.
    pub fn add_host(&mut self, name: String, slots: usize) -> (HostId, Vec<Decision<T>>) {
        let id = HostId(self.hosts.len());
        self.costs.add_host(super::DEFAULT_LOAD);
        let mut host = Host::new(name, slots.max(1));
        host.probing = true;
        self.hosts.push(host);
        let out = vec![Decision::Probe {
            host: id,
            after: Duration::ZERO,
        }];
        (id, out)
    }

    /// Takes a host out of the fleet: no new work; the tasks running there finish and release
    /// their slots as usual. Tasks that only it could serve wait `host_wait` for another host,
    /// as when a host goes down.
    pub fn retire_host(&mut self, id: HostId, now: Instant) -> Vec<Decision<T>> {
        let h = &mut self.hosts[id.0];
        h.retired = true;
        h.models.clear();
        h.models_known = false;
        h.loaded = None;
        let mut out = Vec::new();
        if h.idle_workers > 0 {
            out.push(Decision::DismissWorkers {
                host: id,
                count: std::mem::take(&mut h.idle_workers),
            });
        }
        self.refresh_coverage(now);
        self.dispatch(now, &mut out);
        out
    }

    /// Brings a retired host back (it was listed again): it takes work again once a fresh
    /// manifest read says what it serves.
    pub fn revive_host(&mut self, id: HostId, name: String, slots: usize) -> Vec<Decision<T>> {
        let h = &mut self.hosts[id.0];
        h.retired = false;
        h.name = name;
        h.slots = slots.max(1);
        h.probing = true;
        vec![Decision::Probe {
            host: id,
            after: Duration::ZERO,
        }]
    }

    /// Changes a host's slot count (and display name). More slots take work at once (the
    /// caller starts the workers); fewer apply as running tasks release theirs, since a slot
    /// in use is never taken away.
    pub fn set_slots(&mut self, id: HostId, slots: usize, now: Instant) -> Vec<Decision<T>> {
        let h = &mut self.hosts[id.0];
        h.slots = slots.max(1);
        let mut out = Vec::new();
        let excess = (h.active + h.idle_workers)
            .saturating_sub(h.slots)
            .min(h.idle_workers);
        if excess > 0 {
            h.idle_workers -= excess;
            out.push(Decision::DismissWorkers {
                host: id,
                count: excess,
            });
        }
        self.dispatch(now, &mut out);
        out
    }

    /// Renames a host (a reload may give the same server another name).
    pub fn rename_host(&mut self, id: HostId, name: String) {
        self.hosts[id.0].name = name;
    }

    /// Whether one more worker of `host` has a slot to wait on: false for a retired host and
    /// for a host whose slots were reduced below its workers. A worker told no stops.
    pub fn wants_worker(&self, id: HostId) -> bool {
        let h = &self.hosts[id.0];
        !h.retired && h.active + h.idle_workers < h.slots
    }

    /// The host's slot count as configured now.
    pub fn slots(&self, id: HostId) -> usize {
        self.hosts[id.0].slots
    }

    /// Whether the host was removed by a reload.
    pub fn is_retired(&self, id: HostId) -> bool {
        self.hosts[id.0].retired
    }

    /// Number of hosts ever configured, retired ones included (the range of [`HostId`]s).
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }
}
