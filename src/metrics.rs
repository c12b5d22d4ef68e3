//! Prometheus metrics.
//!
//! Distributions (queue wait, duration, time to first token) and token counts are recorded by
//! the workers as tasks end. Everything the scheduler already counts — queue depth, host
//! slots and health, task outcomes — is read from its snapshot at scrape time, so there is
//! one source of truth and nothing to keep in step.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::dispatcher::DispatchStatus;
use crate::scheduler::state::Health;
use crate::task::CompletionResult;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostModel {
    host: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The metrics of one daemon (no global registry: tests run several daemons in one process).
pub struct Metrics {
    queue_wait: Histogram,
    task_duration: Histogram,
    ttft: Histogram,
    completion_tokens: Family<HostModel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        // 1 ms to ~9 min: a cached answer to a cold model load behind a long queue.
        let buckets = || exponential_buckets(0.001, 2.0, 20);
        Self {
            queue_wait: Histogram::new(buckets()),
            task_duration: Histogram::new(buckets()),
            ttft: Histogram::new(buckets()),
            completion_tokens: Family::default(),
        }
    }
}

impl Metrics {
    /// A task that ran on a host and completed.
    pub fn completed(&self, result: &CompletionResult) {
        self.queue_wait.observe(result.queue_wait_ms / 1e3);
        self.task_duration.observe(result.latency_ms / 1e3);
        if let Some(ttft) = result.ttft_ms {
            self.ttft.observe(ttft / 1e3);
        }
        if let Some(usage) = result.usage {
            self.completion_tokens
                .get_or_create(&HostModel {
                    host: result.host.clone(),
                    model: result.model.clone(),
                })
                .inc_by(usage.completion_tokens);
        }
    }

    /// A task that ran on a host and did not complete.
    pub fn ended_early(&self, queue_wait_seconds: f64, duration_seconds: f64) {
        self.queue_wait.observe(queue_wait_seconds);
        self.task_duration.observe(duration_seconds);
    }

    /// The exposition text (OpenMetrics, which Prometheus scrapes natively).
    pub fn render(&self, status: &DispatchStatus) -> String {
        let mut registry = Registry::default();
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        for (model, depth) in &status.queue {
            queue_depth
                .get_or_create(&ModelLabel {
                    model: model.clone(),
                })
                .set(*depth as i64);
        }
        registry.register(
            "prix_queue_depth",
            "Tasks waiting for a slot, per model",
            queue_depth,
        );

        let active = Family::<HostLabel, Gauge>::default();
        let slots = Family::<HostLabel, Gauge>::default();
        let up = Family::<HostLabel, Gauge>::default();
        for host in &status.hosts {
            let label = HostLabel {
                host: host.state.name.clone(),
            };
            active.get_or_create(&label).set(host.state.active as i64);
            slots.get_or_create(&label).set(host.state.slots as i64);
            up.get_or_create(&label)
                .set(i64::from(host.state.health == Health::Up));
        }
        let resident = Family::<HostModel, Gauge>::default();
        let loads = Family::<HostModel, Counter>::default();
        let elsewhere = Family::<HostLabel, Gauge>::default();
        for host in &status.hosts {
            for model in &host.state.resident_models {
                resident
                    .get_or_create(&HostModel {
                        host: host.state.name.clone(),
                        model: model.clone(),
                    })
                    .set(1);
            }
            for (model, n) in &host.state.loads {
                loads
                    .get_or_create(&HostModel {
                        host: host.state.name.clone(),
                        model: model.clone(),
                    })
                    .inc_by(*n);
            }
            elsewhere
                .get_or_create(&HostLabel {
                    host: host.state.name.clone(),
                })
                .set(host.state.busy_elsewhere as i64);
        }
        registry.register(
            "prix_host_model_resident",
            "1 for each model the host is believed to hold in memory",
            resident,
        );
        registry.register(
            "prix_host_model_loads",
            "Starts that needed the host to load the model",
            loads,
        );
        registry.register(
            "prix_host_busy_elsewhere",
            "Slots busy with requests this daemon did not send (llama.cpp /slots)",
            elsewhere,
        );
        registry.register("prix_host_active", "Requests in flight on the host", active);
        registry.register(
            "prix_host_slots",
            "Requests the host may run at once",
            slots,
        );
        registry.register(
            "prix_host_up",
            "1 when the host takes work, 0 when down or cooling",
            up,
        );

        let tasks = Family::<OutcomeLabel, Counter>::default();
        let c = status.counters;
        for (outcome, value) in [
            ("completed", c.completed),
            ("failed", c.failed),
            ("cancelled", c.cancelled),
            ("rejected", c.rejected),
            ("retried", c.retried),
        ] {
            tasks.get_or_create(&OutcomeLabel { outcome }).inc_by(value);
        }
        registry.register(
            "prix_tasks",
            "Tasks by outcome (rejected is part of failed)",
            tasks,
        );

        registry.register_with_unit(
            "prix_queue_wait",
            "Time from submission to a slot taking the task",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        registry.register_with_unit(
            "prix_task_duration",
            "Time from sending to the host to the end of the answer",
            Unit::Seconds,
            self.task_duration.clone(),
        );
        registry.register_with_unit(
            "prix_time_to_first_token",
            "Time from sending to the host to the first output",
            Unit::Seconds,
            self.ttft.clone(),
        );
        registry.register(
            "prix_completion_tokens",
            "Completion tokens the hosts reported",
            self.completion_tokens.clone(),
        );
        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}
