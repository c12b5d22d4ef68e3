//! Routes, the recording/auth extractor, and the `/sim` control endpoints.

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::chat;
use super::config::SimConfig;
use super::models;
use super::reply::{error_body, finish_json};
use super::state::{RecordGuard, Shared};

/// Chat requests carry whole conversations; leave room for long ones.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/models", get(models::openai))
        .route("/api/v0/models", get(models::api_v0))
        .route("/api/v1/models", get(models::api_v1))
        .route("/api/ps", get(models::ollama_ps))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/sim/records", get(records))
        .route("/sim/config", get(config).post(set_config))
        .route("/sim/residency", get(residency))
        .route("/sim/reset", post(reset))
        .fallback(unexpected)
        .method_not_allowed_fallback(unexpected)
        .with_state(shared)
}

/// A request to a simulated endpoint: already recorded, body read, and
/// authorised. Extracting it is what records every such request.
pub(crate) struct Inbound {
    pub guard: RecordGuard,
    pub method: Method,
    pub path: String,
    /// The JSON body of a POST (`Null` for other methods or an empty body),
    /// or why it could not be read.
    pub body: Result<Value, String>,
}

impl FromRequest<Arc<Shared>> for Inbound {
    /// The 401 for a missing or wrong key.
    type Rejection = Response;

    async fn from_request(request: Request, shared: &Arc<Shared>) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let auth = parts
            .headers
            .get(AUTHORIZATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let guard = shared.begin(parts.method.to_string(), path.clone(), auth.clone());
        let body = if parts.method == Method::POST {
            read_json(body).await
        } else {
            Ok(Value::Null)
        };
        if let Ok(value) = &body {
            guard.update(|record| record.body = value.clone());
        }
        if needs_key(&path) && !key_matches(shared.required_key().as_deref(), auth.as_deref()) {
            let body = error_body(
                "Invalid or missing API token",
                "invalid_request_error",
                Some("invalid_api_key"),
            );
            return Err(finish_json(guard, StatusCode::UNAUTHORIZED, body));
        }
        Ok(Self {
            guard,
            method: parts.method,
            path,
            body,
        })
    }
}

async fn read_json(body: Body) -> Result<Value, String> {
    let bytes = to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|err| format!("cannot read request body: {err}"))?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|err| format!("request body is not valid JSON: {err}"))
}

fn needs_key(path: &str) -> bool {
    ["/v1", "/api"].iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

fn key_matches(required: Option<&str>, auth: Option<&str>) -> bool {
    match required {
        None => true,
        Some(key) => auth.and_then(|value| value.strip_prefix("Bearer ")) == Some(key),
    }
}

/// Real LM Studio answers unknown endpoints with 200 and an error string;
/// clients must not take that for success.
pub(crate) async fn unexpected(inbound: Inbound) -> Response {
    let Inbound {
        guard,
        method,
        path,
        ..
    } = inbound;
    let body = json!({"error": format!("Unexpected endpoint or method. ({method} {path})")});
    finish_json(guard, StatusCode::OK, body)
}

async fn records(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({"records": shared.records(), "stats": shared.stats()})).into_response()
}

/// `{"resident": [ResidentModel...], "events": [ResidencyEvent...], "stats": SimStats}`.
async fn residency(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "resident": shared.resident_models(),
        "events": shared.residency_events(),
        "stats": shared.stats(),
    }))
    .into_response()
}

async fn config(State(shared): State<Arc<Shared>>) -> Json<SimConfig> {
    Json(shared.config())
}

async fn set_config(
    State(shared): State<Arc<Shared>>,
    Json(config): Json<SimConfig>,
) -> StatusCode {
    shared.update_config(|current| *current = config);
    StatusCode::NO_CONTENT
}

async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.reset();
    StatusCode::NO_CONTENT
}
