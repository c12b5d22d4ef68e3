//! State shared by the handlers of one simulated host: configuration,
//! records, counters, the chat requests in flight and the resident models.
//!
//! One `std::sync::Mutex` guards it all; it is only held for short,
//! non-async sections so that every snapshot is consistent.
//!
//! Residency: a chat request takes its model's room when it is admitted if
//! it can (see [`State::try_acquire`]), otherwise it waits, woken whenever a
//! request settles, the configuration changes or the host is reset. It holds the model until it settles or the model is
//! evicted; a held model is busy, and busy models are evicted last.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::config::{Behaviour, ResidencyApi, SimConfig};
use super::record::{Outcome, RequestRecord, SimStats, now_us};
use super::residency::{Residency, ResidencyEvent, ResidencyEventKind, ResidentModel};

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Woken when room may have freed up for a request waiting to load.
    room: Notify,
}

struct State {
    config: SimConfig,
    /// Ordered by `seq`, which is handed out under the same lock.
    records: Vec<RequestRecord>,
    next_seq: u64,
    in_flight: BTreeMap<u64, InFlight>,
    peak_in_flight: usize,
    manifest_calls: u64,
    model_overlaps: u64,
    connections_reset: u64,
    residency: Residency,
}

struct InFlight {
    model: String,
    /// Whether the request has its model's room (loading or loaded) and so
    /// keeps the model busy.
    holds: bool,
    /// Flipped to `true` to make the request abort (auto-evict).
    evict: watch::Sender<bool>,
}

impl State {
    fn record_mut(&mut self, seq: u64) -> Option<&mut RequestRecord> {
        let index = self.records.binary_search_by_key(&seq, |r| r.seq).ok()?;
        self.records.get_mut(index)
    }

    fn current_models(&self) -> &[String] {
        self.config.models_for_manifest_call(self.manifest_calls)
    }

    fn in_flight_models(&self) -> BTreeSet<String> {
        self.in_flight.values().map(|f| f.model.clone()).collect()
    }

    /// Whether a request in flight holds `model`.
    fn is_busy(&self, model: &str) -> bool {
        self.in_flight.values().any(|f| f.holds && f.model == model)
    }

    /// Gives request `seq` its model's room if it can be had now, evicting
    /// as `max_loaded_models` requires, and returns when the model is ready
    /// for it (µs since the epoch: now if loaded, later while loading).
    /// `None`: every held model is busy and neither `auto_evict` nor the
    /// original unbounded behaviour allows evicting one, so the request must
    /// wait, as llama-server's router queues it.
    fn try_acquire(&mut self, seq: u64, model: &str, load_ms: u64) -> Option<u64> {
        let now = now_us();
        let ready = if let Some(first_ready) = self.residency.touch(model) {
            let lm_studio = matches!(
                self.config.residency_api,
                ResidencyApi::LmStudio | ResidencyApi::LmStudioV0
            );
            if first_ready <= now {
                now
            } else if lm_studio {
                // Its load is still under way: LM Studio's JIT loader starts
                // another instance rather than waiting for it (#1751).
                self.residency.load(model, seq, load_ms, now)
            } else {
                // llama-server's router has one child process per model and
                // Ollama one runner: a request joins the load under way.
                first_ready
            }
        } else {
            let room = self.config.max_loaded_models.map_or(1, |max| max.max(1));
            let may_evict_busy = self.config.max_loaded_models.is_none() || self.config.auto_evict;
            while self.residency.len() >= room {
                // llama-server's router evicts the least recently used idle
                // model ("evicting idle LRU", reference/real-backend.md §4);
                // Ollama too prefers idle runners (reference/field.md §1.5).
                let idle = self.residency.models().find(|m| !self.is_busy(m));
                let victim = match idle.or_else(|| self.residency.models().next()) {
                    Some(victim) if idle.is_some() || may_evict_busy => victim.to_owned(),
                    _ => return None,
                };
                self.evict(&victim, seq, now);
            }
            self.residency.load(model, seq, load_ms, now)
        };
        if let Some(entry) = self.in_flight.get_mut(&seq) {
            entry.holds = true;
        }
        Some(ready)
    }

    /// Unloads `victim` for request `seq`; with `auto_evict` the requests
    /// holding it are aborted (as LM Studio does), otherwise they go on.
    fn evict(&mut self, victim: &str, seq: u64, now: u64) {
        let busy = self.is_busy(victim);
        let holders: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.holds && f.model == victim)
            .map(|(&holder, _)| holder)
            .collect();
        for holder in holders {
            if self.config.auto_evict {
                self.conclude(holder, Outcome::Evicted);
            }
            if let Some(entry) = self.in_flight.get_mut(&holder) {
                entry.holds = false;
                if self.config.auto_evict {
                    // The holder stays in flight until its stream has ended.
                    entry.evict.send_replace(true);
                }
            }
        }
        self.residency.evict(victim, seq, busy, now);
    }

    /// Sets the outcome unless one was already set.
    fn conclude(&mut self, seq: u64, outcome: Outcome) {
        if let Some(record) = self.record_mut(seq)
            && record.outcome == Outcome::InProgress
        {
            record.outcome = outcome;
            record.end_us = Some(now_us());
            tracing::debug!(seq, ?outcome, "request finished");
        }
    }
}

impl Shared {
    pub(crate) fn new(config: SimConfig) -> Self {
        let residency = Residency::new(config.initially_loaded.as_deref());
        Self {
            state: Mutex::new(State {
                config,
                records: Vec::new(),
                next_seq: 1,
                in_flight: BTreeMap::new(),
                peak_in_flight: 0,
                manifest_calls: 0,
                model_overlaps: 0,
                connections_reset: 0,
                residency,
            }),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take every later request down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> SimConfig {
        self.lock().config.clone()
    }

    pub(crate) fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        f(&mut self.lock().config);
        // A larger `max_loaded_models` or `auto_evict` may let a waiting
        // request in.
        self.room.notify_waiters();
    }

    pub(crate) fn records(&self) -> Vec<RequestRecord> {
        self.lock().records.clone()
    }

    pub(crate) fn stats(&self) -> SimStats {
        let state = self.lock();
        SimStats {
            peak_in_flight: state.peak_in_flight,
            in_flight: state.in_flight.len(),
            manifest_calls: state.manifest_calls,
            model_overlaps: state.model_overlaps,
            connections_reset: state.connections_reset,
            loads: state.residency.count(ResidencyEventKind::Load),
            evictions: state.residency.count(ResidencyEventKind::Evict),
        }
    }

    pub(crate) fn residency_events(&self) -> Vec<ResidencyEvent> {
        self.lock().residency.events().to_vec()
    }

    pub(crate) fn resident_models(&self) -> Vec<ResidentModel> {
        self.lock().residency.snapshot(now_us())
    }

    pub(crate) fn residency_api(&self) -> ResidencyApi {
        self.lock().config.residency_api
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// Forgets records, counters and residency events, and holds only
    /// `initially_loaded` again; requests still in flight keep running
    /// (unrecorded) and keep counting as in flight, but hold no model.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.records.clear();
        state.peak_in_flight = state.in_flight.len();
        state.manifest_calls = 0;
        state.model_overlaps = 0;
        state.connections_reset = 0;
        state.residency = Residency::new(state.config.initially_loaded.as_deref());
        for entry in state.in_flight.values_mut() {
            entry.holds = false;
        }
        drop(state);
        self.room.notify_waiters();
    }

    /// Whether a new connection must be reset at once; counts it if so.
    pub(crate) fn reset_new_connection(&self) -> bool {
        let mut state = self.lock();
        if state.config.reset_connections {
            state.connections_reset += 1;
        }
        state.config.reset_connections
    }

    pub(crate) fn required_key(&self) -> Option<String> {
        self.lock().config.required_key.clone()
    }

    /// Records the arrival of a request.
    pub(crate) fn begin(
        self: &Arc<Self>,
        method: String,
        path: String,
        auth: Option<String>,
    ) -> RecordGuard {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        tracing::debug!(seq, %method, %path, "request");
        let record = RequestRecord {
            seq,
            method,
            path,
            model: None,
            auth,
            stream: false,
            start_us: now_us(),
            first_byte_us: None,
            end_us: None,
            outcome: Outcome::InProgress,
            tokens_sent: 0,
            in_flight_at_start: state.in_flight.len(),
            other_models_in_flight_at_start: state.in_flight_models().into_iter().collect(),
            body: Value::Null,
        };
        state.records.push(record);
        RecordGuard {
            shared: Arc::clone(self),
            seq,
            done: false,
        }
    }

    /// Counts a `GET /v1/models` and returns what it answers: the model list,
    /// or the configured failure status.
    pub(crate) fn manifest_call(&self) -> Result<Vec<String>, u16> {
        let mut state = self.lock();
        state.manifest_calls += 1;
        match state.config.manifest_status {
            Some(status) => Err(status),
            None => Ok(state.current_models().to_vec()),
        }
    }

    /// The models listed now and those resident, without counting a
    /// manifest call (for the loaded-state listings).
    pub(crate) fn listing(&self) -> (Vec<String>, Vec<ResidentModel>) {
        let state = self.lock();
        (
            state.current_models().to_vec(),
            state.residency.snapshot(now_us()),
        )
    }

    pub(crate) fn behaviour_for(&self, model: &str) -> Behaviour {
        self.lock().config.behaviour_for(model).clone()
    }

    /// Accepts chat request `seq` for `model` if the host lists that model:
    /// counts it in flight and takes the model's room if it can (see
    /// [`State::try_acquire`]); with auto-evict and `max_loaded_models: None`
    /// it aborts the streams of every other model first. `None` means the
    /// model is not listed.
    pub(crate) fn admit_chat(&self, seq: u64, model: &str, load_ms: u64) -> Option<Admission> {
        let mut state = self.lock();
        if !state.current_models().iter().any(|m| m == model) {
            return None;
        }
        // Taken before evicting: the record should show what the request
        // arrived into, which is what a dispatcher is judged on.
        let others = state.in_flight_models();
        if others.iter().any(|m| m != model) {
            state.model_overlaps += 1;
        }
        if state.config.auto_evict && state.config.max_loaded_models.is_none() {
            let victims: Vec<u64> = state
                .in_flight
                .iter()
                .filter(|(_, f)| f.model != model)
                .map(|(&victim, _)| victim)
                .collect();
            for victim in victims {
                state.conclude(victim, Outcome::Evicted);
                if let Some(entry) = state.in_flight.get(&victim) {
                    // The victim stays in flight until its stream has ended.
                    entry.evict.send_replace(true);
                }
            }
        }
        let (evict, evicted) = watch::channel(false);
        state.in_flight.insert(
            seq,
            InFlight {
                model: model.to_owned(),
                holds: false,
                evict,
            },
        );
        let in_flight = state.in_flight.len();
        state.peak_in_flight = state.peak_in_flight.max(in_flight);
        if let Some(record) = state.record_mut(seq) {
            record.in_flight_at_start = in_flight;
            record.other_models_in_flight_at_start = others.into_iter().collect();
        }
        let ready_at_us = state.try_acquire(seq, model, load_ms);
        Some(Admission {
            evicted,
            ready_at_us,
        })
    }

    /// Waits until request `seq` has its model's room and returns when the
    /// model is ready for it (µs since the epoch).
    pub(crate) async fn acquire(&self, seq: u64, model: &str, load_ms: u64) -> u64 {
        loop {
            // Registered before looking, so a settle in between is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(ready) = self.lock().try_acquire(seq, model, load_ms) {
                return ready;
            }
            room.await;
        }
    }

    fn update_record(&self, seq: u64, f: impl FnOnce(&mut RequestRecord)) {
        if let Some(record) = self.lock().record_mut(seq) {
            f(record);
        }
    }

    fn settle(&self, seq: u64, outcome: Outcome) {
        let mut state = self.lock();
        state.in_flight.remove(&seq);
        state.conclude(seq, outcome);
        drop(state);
        self.room.notify_waiters();
    }
}

/// A chat request let in by [`Shared::admit_chat`].
pub(crate) struct Admission {
    /// Turns `true` when the request is evicted (aborted).
    pub evicted: watch::Receiver<bool>,
    /// When its model is ready for it (µs since the epoch); `None` until it
    /// has the model's room, see [`Shared::acquire`].
    pub ready_at_us: Option<u64>,
}

/// Owns one request's record until it is finished. Dropping it unfinished
/// means hyper dropped the handler future or the response body, i.e. the
/// client went away, so that is what gets recorded.
pub(crate) struct RecordGuard {
    shared: Arc<Shared>,
    seq: u64,
    done: bool,
}

impl RecordGuard {
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut RequestRecord)) {
        self.shared.update_record(self.seq, f);
    }

    /// Notes that the status line is going out now (first call wins).
    pub(crate) fn first_byte(&self) {
        self.update(|record| {
            record.first_byte_us.get_or_insert_with(now_us);
        });
    }

    /// Records the outcome (unless one was set already, e.g. by an eviction)
    /// and stops counting the request as in flight. Later calls do nothing.
    pub(crate) fn finish(&mut self, outcome: Outcome) {
        if !self.done {
            self.done = true;
            self.shared.settle(self.seq, outcome);
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        self.finish(Outcome::ClientDisconnected);
    }
}

/// Resolves once `evicted` turns `true`; never if the request is not evicted.
pub(crate) async fn wait_evicted(evicted: &mut watch::Receiver<bool>) {
    if evicted.wait_for(|&e| e).await.is_err() {
        // The sender is gone only once the request has settled.
        std::future::pending::<()>().await;
    }
}
