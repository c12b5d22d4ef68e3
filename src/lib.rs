//! prix-dispatch: one queue for a fleet of local GPU inference servers.
//!
//! Two requests never pile onto one GPU, and no GPU idles while a task it could serve waits.
//! See `DESIGN.md` in the shared docs and the README for the architecture.

pub mod backend;
pub mod bridge;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod daemon_dir;
pub mod demo;
pub mod dispatcher;
pub mod error;
pub mod fleet;
pub mod http;
pub mod local;
pub mod mcp;
pub mod mcp_progress;
pub mod mcp_tasks;
pub mod mcp_tasks_wire;
pub mod metrics;
pub mod ownership;
pub mod params;
pub mod reload;
pub mod remote;
pub mod scheduler;
pub mod sim;
pub mod stdio;
pub mod task;
pub mod worker;

pub use config::Config;
pub use dispatcher::{DispatchStatus, Dispatcher};
pub use error::{DispatchError, ErrorKind};
pub use task::{CompletionRequest, CompletionResult, TaskEvent};

/// `n` and the noun in its number: "1 model", "2 models", "0 models".
pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
