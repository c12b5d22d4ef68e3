//! `prix-dispatch serve`: one axum listener for MCP over Streamable HTTP (`/mcp`), the
//! OpenAI-compatible API (`/v1`), `/healthz`, `/status`, `/metrics` and the live status page,
//! all feeding the same queue as stdio.

mod auth;
mod openai;
mod page;
pub mod sessions;
pub mod tasks;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;
use crate::mcp::PrixServer;

/// What the HTTP front end needs beyond the dispatcher.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Bearer token every route but `/healthz` requires; `None` = open (loopback default).
    pub auth_token: Option<String>,
    pub max_request_bytes: usize,
    /// `Host` values `/mcp` accepts besides the loopback names.
    pub allowed_hosts: Vec<String>,
    /// An MCP session with no call in flight for this long is closed (`[server]
    /// session_idle_seconds`); its next request gets 404 and the client starts a new one.
    pub session_idle: std::time::Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            auth_token: None,
            max_request_bytes: 0,
            allowed_hosts: Vec::new(),
            session_idle: sessions::DEFAULT_SESSION_IDLE,
        }
    }
}

#[derive(Clone)]
struct App {
    dispatcher: Dispatcher,
    token: Option<Arc<str>>,
}

/// The whole HTTP surface. `stop` ends MCP sessions when the server shuts down. Call it
/// within a Tokio runtime: it starts the timer that expires idle MCP sessions.
pub fn router(dispatcher: Dispatcher, options: HttpOptions, stop: CancellationToken) -> Router {
    let app = App {
        dispatcher: dispatcher.clone(),
        token: options.auth_token.as_deref().map(Arc::from),
    };
    let mut allowed = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    allowed.extend(options.allowed_hosts.iter().cloned());
    let sessions = Arc::new(sessions::Sessions::new(options.session_idle));
    sessions.sweep(stop.clone());
    let mcp = StreamableHttpService::new(
        move || Ok(tasks::built(PrixServer::for_http(dispatcher.clone()))),
        sessions.clone(),
        StreamableHttpServerConfig::default()
            .with_cancellation_token(stop)
            .with_allowed_hosts(allowed)
            .with_max_request_body_bytes(options.max_request_bytes),
    );
    let protected = Router::new()
        .route("/", get(page::status_page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route(
            "/v1/chat/completions",
            axum::routing::post(openai::chat_completions),
        )
        // The 2025-11-25 task form rmcp does not serve, answered in front of it.
        .nest_service(
            "/mcp",
            Router::new()
                .fallback_service(mcp)
                .layer(axum::middleware::from_fn_with_state(
                    tasks::TaskLayer {
                        sessions,
                        max_request_bytes: options.max_request_bytes,
                    },
                    tasks::layer,
                )),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::require_token,
        ));
    Router::new()
        // The pid header lets a second `serve` that finds the port taken name the daemon there.
        .route(
            "/healthz",
            get(|| async {
                (
                    [(HEALTHZ_PID_HEADER, std::process::id().to_string())],
                    "ok\n",
                )
            }),
        )
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(options.max_request_bytes))
        .with_state(app)
}

/// Header on `/healthz` answers: the daemon's pid.
pub const HEALTHZ_PID_HEADER: &str = "x-prix-dispatch-pid";

/// Serves until `shutdown` resolves, then stops accepting and ends MCP sessions.
pub async fn serve(
    listener: TcpListener,
    dispatcher: Dispatcher,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let app = router(dispatcher, options, stop.clone());
    // Without TCP_NODELAY each small SSE write after the headers waits for the client's
    // delayed ACK: ~40 ms added to every streamed answer (measured in bench/RESULTS.md).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
}

async fn status(State(app): State<App>) -> Response {
    match app.dispatcher.status_with_timeline().await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => openai::error_response(&e),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match app.dispatcher.metrics_text().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => openai::error_response(&e),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    openai::error_body(
        StatusCode::NOT_FOUND,
        "not_found",
        "invalid_request_error",
        &format!(
            "no route {}: see /v1/chat/completions, /v1/models, /mcp, /status, /metrics, /healthz",
            uri.path()
        ),
    )
}
