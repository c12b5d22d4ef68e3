//! Which models a simulated host holds in memory, in least-recently-used
//! order, and the log of every load and eviction.
//!
//! This is bookkeeping only: which model to evict, and whether a request may
//! take room now, is decided in `state.rs`, which knows the requests in
//! flight. A load is a ready time, not a timer: an instance is loading until
//! the wall clock passes its `ready_at_us`, so the listings can tell
//! `loading` from `loaded` without anything waking up.

use serde::{Deserialize, Serialize};

/// Whether a [`ResidencyEvent`] put a model into memory or took it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidencyEventKind {
    Load,
    Evict,
}

/// One load or eviction on a simulated host.
///
/// JSON (in `GET /sim/residency`):
/// `{"at_us": 1795752858123456, "model": "a", "kind": "load", "duration_ms": 500, "seq": 3, "while_busy": false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidencyEvent {
    /// When it started, microseconds since the UNIX epoch (as request records).
    pub at_us: u64,
    pub model: String,
    pub kind: ResidencyEventKind,
    /// A load: the milliseconds it takes (the requesting model's `load_ms`).
    /// An eviction: 0, the simulator unloads at once.
    pub duration_ms: u64,
    /// The chat request that caused it (`RequestRecord::seq`). The model
    /// resident at start (`initially_loaded`) has no load event.
    pub seq: u64,
    /// An eviction only: the model still had requests in flight, whose
    /// streams were aborted (`auto_evict`) or, with `max_loaded_models:
    /// None`, were left running on a model no longer listed as loaded.
    pub while_busy: bool,
}

/// A model held by a simulated host now, as `SimHost::resident_models`
/// returns them (least recently used first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidentModel {
    pub model: String,
    /// Instances whose load has finished.
    pub loaded_instances: usize,
    /// Instances still loading. More than one instance in all only after
    /// requests arrived for the model while it was loading (#1751).
    pub loading_instances: usize,
}

impl ResidentModel {
    /// Whether a request could use the model without waiting for a load.
    pub fn is_loaded(&self) -> bool {
        self.loaded_instances > 0
    }
}

struct Entry {
    model: String,
    /// One per instance: when its load finishes (µs since the epoch).
    ready_at_us: Vec<u64>,
}

pub(crate) struct Residency {
    /// Least recently used first.
    entries: Vec<Entry>,
    events: Vec<ResidencyEvent>,
}

impl Residency {
    /// A host holding `initial`, already loaded.
    pub(crate) fn new(initial: Option<&str>) -> Self {
        Self {
            entries: initial
                .map(|model| Entry {
                    model: model.to_owned(),
                    ready_at_us: vec![0],
                })
                .into_iter()
                .collect(),
            events: Vec::new(),
        }
    }

    /// How many models are held (loading ones included).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Held models, least recently used first.
    pub(crate) fn models(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.model.as_str())
    }

    /// Marks `model` most recently used and returns when its first instance
    /// is (or was) ready, µs since the epoch; `None` if it is not held.
    pub(crate) fn touch(&mut self, model: &str) -> Option<u64> {
        let index = self.entries.iter().position(|e| e.model == model)?;
        let entry = self.entries.remove(index);
        let ready = entry.ready_at_us.iter().copied().min();
        self.entries.push(entry);
        ready
    }

    /// Starts loading an instance of `model` for request `seq` (a new most
    /// recently used entry, or another instance of a held one); returns when
    /// it is ready.
    pub(crate) fn load(&mut self, model: &str, seq: u64, load_ms: u64, now_us: u64) -> u64 {
        let ready = now_us.saturating_add(load_ms.saturating_mul(1_000));
        match self.entries.iter().position(|e| e.model == model) {
            Some(index) => {
                let mut entry = self.entries.remove(index);
                entry.ready_at_us.push(ready);
                self.entries.push(entry);
            }
            None => self.entries.push(Entry {
                model: model.to_owned(),
                ready_at_us: vec![ready],
            }),
        }
        self.events.push(ResidencyEvent {
            at_us: now_us,
            model: model.to_owned(),
            kind: ResidencyEventKind::Load,
            duration_ms: load_ms,
            seq,
            while_busy: false,
        });
        ready
    }

    /// Drops `model` with all its instances (nothing if it is not held).
    pub(crate) fn evict(&mut self, model: &str, seq: u64, busy: bool, now_us: u64) {
        let before = self.entries.len();
        self.entries.retain(|e| e.model != model);
        if self.entries.len() < before {
            self.events.push(ResidencyEvent {
                at_us: now_us,
                model: model.to_owned(),
                kind: ResidencyEventKind::Evict,
                duration_ms: 0,
                seq,
                while_busy: busy,
            });
        }
    }

    /// What is held at `now_us`, least recently used first.
    pub(crate) fn snapshot(&self, now_us: u64) -> Vec<ResidentModel> {
        self.entries
            .iter()
            .map(|e| {
                let loaded = e.ready_at_us.iter().filter(|&&r| r <= now_us).count();
                ResidentModel {
                    model: e.model.clone(),
                    loaded_instances: loaded,
                    loading_instances: e.ready_at_us.len() - loaded,
                }
            })
            .collect()
    }

    pub(crate) fn events(&self) -> &[ResidencyEvent] {
        &self.events
    }

    pub(crate) fn count(&self, kind: ResidencyEventKind) -> u64 {
        let count = self.events.iter().filter(|e| e.kind == kind).count();
        u64::try_from(count).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_touch_and_evict_keep_lru_order_and_log() {
        let mut held = Residency::new(Some("a"));
        assert_eq!(held.touch("a"), Some(0), "initially loaded is ready");
        let ready = held.load("b", 1, 5, 1_000);
        assert_eq!(ready, 6_000);
        assert_eq!(held.models().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(held.touch("b"), Some(6_000));
        assert_eq!(held.touch("a"), Some(0));
        assert_eq!(held.touch("c"), None);
        assert_eq!(held.models().collect::<Vec<_>>(), ["b", "a"]);
        // A second load of a loading model is another instance, not another entry.
        held.load("b", 2, 5, 2_000);
        let snapshot = held.snapshot(6_500);
        assert_eq!(snapshot[1].model, "b");
        assert_eq!(
            (snapshot[1].loaded_instances, snapshot[1].loading_instances),
            (1, 1)
        );
        held.evict("b", 3, true, 7_000);
        held.evict("nope", 3, false, 7_000);
        assert_eq!(held.models().collect::<Vec<_>>(), ["a"]);
        assert_eq!(held.count(ResidencyEventKind::Load), 2);
        assert_eq!(held.count(ResidencyEventKind::Evict), 1);
        let evict = &held.events()[2];
        assert_eq!(
            (
                evict.kind,
                evict.model.as_str(),
                evict.seq,
                evict.while_busy
            ),
            (ResidencyEventKind::Evict, "b", 3, true)
        );
    }
}
