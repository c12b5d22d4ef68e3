//! `SimHost`: one simulated inference host serving on a local port.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::config::SimConfig;
use super::conn::{Connections, TrackedListener};
use super::record::{RequestRecord, SimStats};
use super::residency::{ResidencyEvent, ResidentModel};
use super::server;
use super::state::Shared;

/// A running simulated host. Dropping it stops it too, like `shutdown`
/// except that it does not wait for the listener to close.
pub struct SimHost {
    addr: SocketAddr,
    shared: Arc<Shared>,
    connections: Arc<Connections>,
    serve: Option<JoinHandle<()>>,
}

impl SimHost {
    /// Starts a host on an ephemeral port of 127.0.0.1.
    pub async fn start(config: SimConfig) -> io::Result<SimHost> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: SimConfig) -> io::Result<SimHost> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let connections = Arc::new(Connections::default());
        let listener =
            TrackedListener::new(listener, Arc::clone(&connections), Arc::clone(&shared));
        let app = server::router(Arc::clone(&shared));
        let serve = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!("simulated host stopped: {err}");
            }
        });
        tracing::debug!(%addr, "simulated host listening");
        Ok(SimHost {
            addr,
            shared,
            connections,
            serve: Some(serve),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// All recorded requests, in arrival order.
    pub fn records(&self) -> Vec<RequestRecord> {
        self.shared.records()
    }

    /// Records of `POST /v1/chat/completions` only.
    pub fn chat_records(&self) -> Vec<RequestRecord> {
        let mut records = self.records();
        records.retain(|r| r.method == "POST" && r.path == "/v1/chat/completions");
        records
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Every model load and eviction since start (or the last reset), in
    /// order.
    pub fn residency_events(&self) -> Vec<ResidencyEvent> {
        self.shared.residency_events()
    }

    /// The models held now, least recently used first, with how many
    /// instances of each are loaded and still loading.
    pub fn resident_models(&self) -> Vec<ResidentModel> {
        self.shared.resident_models()
    }

    /// The configuration in force.
    pub fn config(&self) -> SimConfig {
        self.shared.config()
    }

    /// Replaces the configuration; requests already admitted keep the
    /// behaviour they started with.
    pub fn set_config(&self, config: SimConfig) {
        self.shared.update_config(|current| *current = config);
    }

    pub fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        self.shared.update_config(f);
    }

    /// Cuts every open connection (kept-alive ones included) while staying up, as a server
    /// process that crashed and was restarted behind the same port.
    pub fn cut_connections(&self) {
        self.connections.cut_open();
    }

    /// Forgets records, counters and residency events, and holds only
    /// `initially_loaded` again.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Waits until no chat request is in flight; false if `timeout` passes first.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.shared.in_flight() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops listening and cuts every open connection, as a host that dies
    /// would. Returns once the port is closed.
    pub async fn shutdown(mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
            // Only the cancellation itself can come back here.
            let _ = serve.await;
        }
        self.connections.sever_all();
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
        self.connections.sever_all();
    }
}
