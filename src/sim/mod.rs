//! A simulated LM Studio / OpenAI-compatible inference host.
//!
//! The test double for everything that talks to inference hosts: it serves
//! the model listings and streaming chat completions the way LM Studio does
//! (quirks included), takes its timing and failure modes from [`SimConfig`]
//! (or per request from a [`sim_directive`] in the last message), and
//! records every request for tests to assert on.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use prix_dispatch::sim::{SimConfig, SimHost};
//! let host = SimHost::start(SimConfig::with_models(["qwen3-8b"])).await?;
//! // ... point the code under test at host.url() ...
//! assert_eq!(host.stats().peak_in_flight, 1);
//! host.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Besides the LM Studio endpoints the host answers `GET /sim/records`,
//! `GET /sim/residency`, `GET|POST /sim/config` and `POST /sim/reset` (not
//! recorded), so the `lmstudio-sim` binary can be driven and inspected over
//! HTTP.
//!
//! Model switches: with `max_loaded_models` and `load_ms` a host holds a
//! bounded set of models, charges a load to the first request for a model
//! that is not resident, evicts the least recently used one, and logs every
//! load and eviction ([`SimHost::residency_events`], `GET /sim/residency`).
//! `residency_api` picks whose listing tells what is resident: LM Studio's
//! `/api/v1|v0/models`, llama-server router's `/v1/models` `status`, or
//! Ollama's `/api/ps`.

mod chat;
mod completion;
mod config;
mod conn;
mod host;
mod models;
mod record;
mod reply;
mod request;
mod residency;
mod script;
mod server;
mod sse;
mod state;

#[cfg(test)]
mod swap_tests;
#[cfg(test)]
mod tests;

pub use config::{
    Behaviour, ConfigError, DIRECTIVE_PREFIX, RawReply, ResidencyApi, SimConfig, ToolCallSpec,
    sim_directive,
};
pub use host::SimHost;
pub use record::{Outcome, RequestRecord, SimStats};
pub use residency::{ResidencyEvent, ResidencyEventKind, ResidentModel};
