//! The model listings: OpenAI's `/v1/models` and LM Studio's own
//! `/api/v0/models` and `/api/v1/models`.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::reply::{error_body, error_kind, finish_json, status_code};
use super::server::Inbound;

/// The context length every simulated model reports.
const MAX_CONTEXT_LENGTH: u32 = 4096;

pub(crate) async fn openai(inbound: Inbound) -> Response {
    let guard = inbound.guard;
    let listed = guard.shared().manifest_call();
    if let Some(body) = guard.shared().config().manifest_body {
        return finish_json(guard, StatusCode::OK, body);
    }
    match listed {
        Ok(models) => {
            let data: Vec<Value> = models
                .iter()
                .map(|id| json!({"id": id, "object": "model", "owned_by": "organization_owner"}))
                .collect();
            finish_json(
                guard,
                StatusCode::OK,
                json!({"object": "list", "data": data}),
            )
        }
        Err(code) => {
            let status = status_code(code);
            let body = error_body("simulated model listing failure", error_kind(status), None);
            finish_json(guard, status, body)
        }
    }
}

pub(crate) async fn api_v0(inbound: Inbound) -> Response {
    let guard = inbound.guard;
    let (models, loaded) = guard.shared().listing();
    let data: Vec<Value> = models
        .iter()
        .map(|id| {
            let state = if loaded.as_ref() == Some(id) {
                "loaded"
            } else {
                "not-loaded"
            };
            json!({
                "id": id,
                "object": "model",
                "type": "llm",
                "publisher": "sim",
                "arch": "sim",
                "state": state,
                "max_context_length": MAX_CONTEXT_LENGTH,
            })
        })
        .collect();
    finish_json(
        guard,
        StatusCode::OK,
        json!({"object": "list", "data": data}),
    )
}

pub(crate) async fn api_v1(inbound: Inbound) -> Response {
    let guard = inbound.guard;
    let (models, loaded) = guard.shared().listing();
    let entries: Vec<Value> = models
        .iter()
        .map(|key| {
            let instances = if loaded.as_ref() == Some(key) {
                json!([{"id": key}])
            } else {
                json!([])
            };
            json!({
                "type": "llm",
                "key": key,
                "display_name": key,
                "loaded_instances": instances,
                "max_context_length": MAX_CONTEXT_LENGTH,
            })
        })
        .collect();
    finish_json(guard, StatusCode::OK, json!({"models": entries}))
}
