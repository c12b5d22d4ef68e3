//! Foreign load: slots of a host busy with requests this daemon did not send. The worker
//! reads a llama.cpp host's `/slots` before it sends a task; when the host is busy from
//! elsewhere, the task goes back to its place and those slots count as taken until a re-read
//! shows them free. Hosts that show no slots never get here.

use std::time::Duration;

use super::{Decision, DispatchState, HealthChange, HostId, Queueable};
use tokio::time::Instant;

/// How often a host busy from elsewhere is read again: short, since its slot is what the
/// waiting tasks wait for.
pub const SLOTS_RECHECK: Duration = Duration::from_millis(250);

impl<T: Queueable> DispatchState<T> {
    /// Records `busy` slots taken from elsewhere on `host` (logged once per change) and
    /// asks for a re-read while any are.
    pub(super) fn busy_elsewhere(&mut self, host: HostId, busy: usize, out: &mut Vec<Decision<T>>) {
        let h = &mut self.hosts[host.0];
        if h.busy_elsewhere != busy {
            h.busy_elsewhere = busy;
            out.push(Decision::Health {
                host,
                change: HealthChange::BusyElsewhere { busy },
            });
        }
        if busy > 0 && !h.reading_slots && !h.retired {
            h.reading_slots = true;
            out.push(Decision::ReadSlots {
                host,
                after: SLOTS_RECHECK,
            });
        }
    }

    /// The answer to a `ReadSlots`: `processing` slots of the host are busy (ours included),
    /// or `None` when it could not be read (then nothing is held back any more: without the
    /// host's word, the daemon schedules as for any host).
    pub fn slots_read(
        &mut self,
        host: HostId,
        processing: Option<usize>,
        now: Instant,
    ) -> Vec<Decision<T>> {
        let mut out = Vec::new();
        let h = &mut self.hosts[host.0];
        h.reading_slots = false;
        let busy = processing.map_or(0, |p| p.saturating_sub(h.active));
        self.busy_elsewhere(host, busy, &mut out);
        self.dispatch(now, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HostSignal;
    use crate::scheduler::state::{Limits, ManifestReport, Outcome, Release};

    use crate::scheduler::state::test_job::Job;

    fn started(d: &[Decision<Job>]) -> Vec<u64> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Start { task, .. } => Some(task.id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_host_busy_from_elsewhere_gets_nothing_until_its_slots_say_free() {
        let now = Instant::now();
        let mut s = DispatchState::new([("gpu".to_string(), 1)], Limits::default());
        s.start();
        s.manifests_read(
            vec![ManifestReport {
                host: HostId(0),
                models: Ok(vec!["m".into()]),
                loaded: None,
            }],
            now,
        );
        s.worker_idle(HostId(0), now);
        let d = s.submit(Job::new(1, "m", now), now);
        assert_eq!(started(&d), [1]);
        // The worker found the server busy with someone else's request: the task comes back.
        let d = s.released(
            HostId(0),
            Release {
                outcome: Outcome::Failed,
                signal: HostSignal::BusyElsewhere(1),
                retry: Some((
                    Job::new(1, "m", now),
                    crate::error::DispatchError::cancelled(),
                )),
                observed: None,
            },
            now,
        );
        assert!(d.iter().any(|d| matches!(
            d,
            Decision::Health {
                change: HealthChange::BusyElsewhere { busy: 1 },
                ..
            }
        )));
        assert!(d.iter().any(|d| matches!(d, Decision::ReadSlots { .. })));
        // The worker is back: still nothing starts, the slot is taken from elsewhere.
        assert!(started(&s.worker_idle(HostId(0), now)).is_empty());
        assert_eq!(s.snapshot().hosts[0].busy_elsewhere, 1);
        // Still busy at the re-read: another re-read, nothing starts.
        let d = s.slots_read(HostId(0), Some(1), now);
        assert!(started(&d).is_empty());
        assert!(d.iter().any(|d| matches!(d, Decision::ReadSlots { .. })));
        // Free: the task starts, and the change is logged once.
        let d = s.slots_read(HostId(0), Some(0), now);
        assert_eq!(started(&d), [1]);
        assert_eq!(s.snapshot().hosts[0].busy_elsewhere, 0);
        assert!(!d.iter().any(|d| matches!(d, Decision::ReadSlots { .. })));
    }
}
