//! The model listings: OpenAI's `/v1/models` (with llama-server router's
//! per-model `status` when imitating it), LM Studio's `/api/v0/models` and
//! `/api/v1/models`, and Ollama's `/api/ps`. Which of them a host serves is
//! its `residency_api`; the others are answered as the imitated server
//! answers a path it lacks.

use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::config::ResidencyApi;
use super::record::Outcome;
use super::reply::{error_body, error_kind, finish_json, status_code};
use super::residency::ResidentModel;
use super::server::{Inbound, unexpected};

/// The context length every simulated model reports.
const MAX_CONTEXT_LENGTH: u32 = 4096;

/// The resident entry for `id`, if it is held.
fn resident<'a>(resident: &'a [ResidentModel], id: &str) -> Option<&'a ResidentModel> {
    resident.iter().find(|r| r.model == id)
}

/// What a host that is not LM Studio answers on an `/api/*` path it lacks.
fn lacking(inbound: Inbound, api: ResidencyApi) -> Response {
    let mut guard = inbound.guard;
    if api == ResidencyApi::Ollama {
        // Ollama's Go router: plain text.
        guard.first_byte();
        guard.finish(Outcome::FailedStatus(404));
        return (
            StatusCode::NOT_FOUND,
            [(CONTENT_TYPE, "text/plain")],
            "404 page not found",
        )
            .into_response();
    }
    // llama-server (reference/real-backend.md §5.1).
    let body =
        json!({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}});
    finish_json(guard, StatusCode::NOT_FOUND, body)
}

pub(crate) async fn openai(inbound: Inbound) -> Response {
    let guard = inbound.guard;
    let router = guard.shared().residency_api() == ResidencyApi::LlamaRouter;
    let listed = guard.shared().manifest_call();
    if let Some(body) = guard.shared().config().manifest_body {
        return finish_json(guard, StatusCode::OK, body);
    }
    match listed {
        Ok(models) => {
            let held = if router {
                guard.shared().listing().1
            } else {
                Vec::new()
            };
            let data: Vec<Value> = models
                .iter()
                .map(|id| {
                    let mut entry =
                        json!({"id": id, "object": "model", "owned_by": "organization_owner"});
                    if router {
                        entry["status"] = router_status(resident(&held, id));
                    }
                    entry
                })
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

/// llama-server router's per-model status; `args` (the child's command
/// line on a real router) is left empty.
fn router_status(held: Option<&ResidentModel>) -> Value {
    let value = match held {
        Some(r) if r.is_loaded() => "loaded",
        Some(_) => "loading",
        None => "unloaded",
    };
    json!({"value": value, "args": []})
}

pub(crate) async fn api_v0(inbound: Inbound) -> Response {
    let api = inbound.guard.shared().residency_api();
    if !matches!(api, ResidencyApi::LmStudio | ResidencyApi::LmStudioV0) {
        return lacking(inbound, api);
    }
    let guard = inbound.guard;
    let (models, held) = guard.shared().listing();
    let data: Vec<Value> = models
        .iter()
        .map(|id| {
            // A model still loading is not loaded yet.
            let state = if resident(&held, id).is_some_and(ResidentModel::is_loaded) {
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
    match inbound.guard.shared().residency_api() {
        ResidencyApi::LmStudio => {}
        // LM Studio 0.3.x: an unknown path.
        ResidencyApi::LmStudioV0 => return unexpected(inbound).await,
        api => return lacking(inbound, api),
    }
    let guard = inbound.guard;
    let (models, held) = guard.shared().listing();
    let entries: Vec<Value> = models
        .iter()
        .map(|key| {
            let loaded = resident(&held, key).map_or(0, |r| r.loaded_instances);
            // Instances of one model need distinct ids; the simulator names
            // the second `key:2` (LM Studio's own naming of the duplicates of
            // #1751 is not checked).
            let instances: Vec<Value> = (1..=loaded)
                .map(|n| match n {
                    1 => json!({"id": key}),
                    n => json!({"id": format!("{key}:{n}")}),
                })
                .collect();
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

/// Ollama's `GET /api/ps`: the loaded models (docs.ollama.com/api/ps). Sizes
/// are 0 and `expires_at` is left out: the simulator has neither memory nor
/// keep-alive.
pub(crate) async fn ollama_ps(inbound: Inbound) -> Response {
    match inbound.guard.shared().residency_api() {
        ResidencyApi::Ollama => {}
        ResidencyApi::LmStudio | ResidencyApi::LmStudioV0 => return unexpected(inbound).await,
        api => return lacking(inbound, api),
    }
    let guard = inbound.guard;
    let (_, held) = guard.shared().listing();
    let models: Vec<Value> = held
        .iter()
        .filter(|r| r.is_loaded())
        .map(|r| {
            json!({
                "name": r.model,
                "model": r.model,
                "size": 0,
                "digest": "",
                "details": {"format": "gguf", "family": "sim"},
                "size_vram": 0,
                "context_length": MAX_CONTEXT_LENGTH,
            })
        })
        .collect();
    finish_json(guard, StatusCode::OK, json!({"models": models}))
}
