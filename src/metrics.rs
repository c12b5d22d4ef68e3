//! Prometheus metrics.
//!
//! Distributions (queue wait, duration, time to first token) and token counts are recorded by
//! the workers as tasks end. Everything the scheduler already counts — queue depth, host
//! slots and health, task outcomes — is read from its snapshot at scrape time, so there is
//! one source of truth and nothing to keep in step. Host busy time is the scheduler's too:
//! its busy clocks advance at every start and end and are read at the scrape, so a long task
//! shows as busy while it runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use std::sync::atomic::AtomicU64;

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

/// The kind of client a task came from: the `class` label of queue wait. A bounded set (never
/// the client's own id, which would make a series per session).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ClientClass {
    /// An MCP session (`mcp:<session>`).
    Mcp,
    /// An OpenAI request naming its `user` (`user:<id>`).
    OpenaiUser,
    /// An OpenAI request with an `X-Prix-Client` header (`header:<name>`).
    OpenaiHeader,
    /// An OpenAI request told apart by its bearer token (`key:<hash>`).
    OpenaiKey,
    /// Anything else ([`crate::task::ANONYMOUS`]).
    Anonymous,
}

impl ClientClass {
    pub const ALL: [ClientClass; 5] = [
        ClientClass::Mcp,
        ClientClass::OpenaiUser,
        ClientClass::OpenaiHeader,
        ClientClass::OpenaiKey,
        ClientClass::Anonymous,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientClass::Mcp => "mcp",
            ClientClass::OpenaiUser => "openai-user",
            ClientClass::OpenaiHeader => "openai-header",
            ClientClass::OpenaiKey => "openai-key",
            ClientClass::Anonymous => "anonymous",
        }
    }

    /// The class of a [`crate::task::TaskSpec::client_id`].
    pub fn of(client_id: &str) -> ClientClass {
        let prefix = client_id.split_once(':').map(|(p, _)| p);
        match prefix {
            Some("mcp") => ClientClass::Mcp,
            Some("user") => ClientClass::OpenaiUser,
            Some("header") => ClientClass::OpenaiHeader,
            Some("key") => ClientClass::OpenaiKey,
            _ => ClientClass::Anonymous,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

impl From<ClientClass> for ClassLabel {
    fn from(class: ClientClass) -> Self {
        ClassLabel {
            class: class.as_str(),
        }
    }
}

/// Seconds, as a float counter.
type Seconds = Counter<f64, AtomicU64>;

/// 1 ms to ~9 min: a cached answer to a cold model load behind a long queue.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The metrics of one daemon (no global registry: tests run several daemons in one process).
pub struct Metrics {
    /// Queue wait by client class; every class is present from the start (count 0).
    queue_wait: Family<ClassLabel, Histogram>,
    task_duration: Histogram,
    ttft: Histogram,
    completion_tokens: Family<HostModel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let queue_wait = Family::new_with_constructor(seconds_buckets as fn() -> Histogram);
        for class in ClientClass::ALL {
            let _ = queue_wait.get_or_create(&class.into());
        }
        Self {
            queue_wait,
            task_duration: seconds_buckets(),
            ttft: seconds_buckets(),
            completion_tokens: Family::default(),
        }
    }
}

impl Metrics {
    /// A task of a `class` client that ran on a host and completed.
    pub fn completed(&self, class: ClientClass, result: &CompletionResult) {
        self.queue_wait
            .get_or_create(&class.into())
            .observe(result.queue_wait_ms / 1e3);
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

    /// A task of a `class` client that ran on a host and did not complete.
    pub fn ended_early(&self, class: ClientClass, queue_wait_seconds: f64, duration_seconds: f64) {
        self.queue_wait
            .get_or_create(&class.into())
            .observe(queue_wait_seconds);
        self.task_duration.observe(duration_seconds);
    }

    /// The exposition text (OpenMetrics, which Prometheus scrapes natively).
    pub fn render(&self, status: &DispatchStatus) -> String {
        let mut registry = Registry::default();
        // Every model a host lists has a series, 0 when nothing waits: an empty family would
        // make `sum(prix_queue_depth)` read "no data" instead of 0.
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        let listed = status.hosts.iter().flat_map(|h| &h.state.models);
        for model in listed.chain(status.queue.keys()) {
            let depth = status.queue.get(model).copied().unwrap_or(0);
            queue_depth
                .get_or_create(&ModelLabel {
                    model: model.clone(),
                })
                .set(depth as i64);
        }
        registry.register(
            "prix_queue_depth",
            "Tasks waiting for a slot, per model (every listed model, 0 when none wait)",
            queue_depth,
        );

        let active = Family::<HostLabel, Gauge>::default();
        let slots = Family::<HostLabel, Gauge>::default();
        let up = Family::<HostLabel, Gauge>::default();
        let busy = Family::<HostLabel, Seconds>::default();
        let slot_busy = Family::<HostLabel, Seconds>::default();
        for host in &status.hosts {
            let label = HostLabel {
                host: host.state.name.clone(),
            };
            busy.get_or_create(&label).inc_by(host.state.busy_seconds);
            slot_busy
                .get_or_create(&label)
                .inc_by(host.state.slot_busy_seconds);
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
        registry.register_with_unit(
            "prix_host_busy",
            "Time the host had at least one request in flight (rate = utilisation, 0 to 1)",
            Unit::Seconds,
            busy,
        );
        registry.register_with_unit(
            "prix_host_slot_busy",
            "Request-time on the host: each request in flight counts (rate / slots = slot occupancy)",
            Unit::Seconds,
            slot_busy,
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
            "Time from submission to a slot taking the task, by client class",
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

#[cfg(test)]
mod tests {
    use super::ClientClass;

    #[test]
    fn client_ids_map_to_five_classes_and_never_to_the_id() {
        for (id, class) in [
            ("mcp:3f2a", "mcp"),
            ("user:alice", "openai-user"),
            ("header:battery", "openai-header"),
            ("key:0badf00d", "openai-key"),
            ("anonymous", "anonymous"),
            ("something:else", "anonymous"),
            ("", "anonymous"),
        ] {
            assert_eq!(ClientClass::of(id).as_str(), class, "{id}");
        }
    }
}
