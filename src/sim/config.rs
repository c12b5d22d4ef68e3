//! Behaviour knobs of a simulated host.
//!
//! Everything is `#[serde(default)]` so a test or a JSON config file only
//! names what it cares about, and `deny_unknown_fields` so a misspelt knob
//! fails loudly instead of silently testing the default behaviour.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The text a test puts at the start of the last message to override the
/// behaviour of that one request.
pub const DIRECTIVE_PREFIX: &str = "#sim ";

/// Configuration of one simulated host. Replaceable at runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Models the host lists (unless `manifest_sequence` is set).
    pub models: Vec<String>,
    /// The Nth `GET /v1/models` returns the Nth list; the last one repeats.
    /// Chat requests are checked against the list most recently returned
    /// (the first one before any manifest call).
    pub manifest_sequence: Option<Vec<Vec<String>>>,
    /// Answer `GET /v1/models` with this status and an error body.
    pub manifest_status: Option<u16>,
    /// Answer `GET /v1/models` with 200 and exactly this JSON body (e.g. Ollama's
    /// `{"object":"list","data":null}` when no model is pulled).
    pub manifest_body: Option<Value>,
    /// When set, `/v1/*` and `/api/*` need `Authorization: Bearer <key>`.
    pub required_key: Option<String>,
    /// Model reported as loaded before any chat request arrives.
    pub initially_loaded: Option<String>,
    /// Like LM Studio's JIT loader with auto-evict: a chat request for a model
    /// that is not resident aborts the in-flight streams of the model it
    /// evicts (LM Studio docs, ttl-and-auto-evict; lmstudio-bug-tracker #671,
    /// #1796). With `max_loaded_models: None` that is every other model's
    /// streams, as before. Without it, and with `max_loaded_models` set, a
    /// request that needs a busy model's room waits for it to go idle
    /// instead, as llama-server's router does (reference/real-backend.md §4).
    pub auto_evict: bool,
    /// How many models the host holds at once, least recently used evicted
    /// first (idle models before busy ones). `None` keeps the original
    /// behaviour: the most recently requested model is the one resident, and
    /// a request never waits for room (streams of the model it displaced go
    /// on unless `auto_evict`). `Some(0)` counts as `Some(1)`.
    pub max_loaded_models: Option<usize>,
    /// Which server's loaded-state listings the host imitates (see
    /// [`ResidencyApi`]).
    pub residency_api: ResidencyApi,
    /// Accept every connection and close it at once, before reading a byte: a host that
    /// crashes as requests arrive ("connection reset" / "closed before message completed").
    pub reset_connections: bool,
    /// Behaviour of models without an entry in `per_model`.
    pub default: Behaviour,
    pub per_model: HashMap<String, Behaviour>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec!["sim-model".to_owned()],
            manifest_sequence: None,
            manifest_status: None,
            manifest_body: None,
            required_key: None,
            initially_loaded: None,
            auto_evict: false,
            max_loaded_models: None,
            residency_api: ResidencyApi::default(),
            reset_connections: false,
            default: Behaviour::default(),
            per_model: HashMap::new(),
        }
    }
}

impl SimConfig {
    /// A default configuration listing exactly `models`.
    pub fn with_models<I, S>(models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            models: models.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Reads a JSON-encoded `SimConfig` (as the binary's `--config` does).
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The behaviour configured for `model`, before any per-request directive.
    pub fn behaviour_for(&self, model: &str) -> &Behaviour {
        self.per_model.get(model).unwrap_or(&self.default)
    }

    /// The model list served by the `call`-th manifest request (1-based);
    /// call 0 means "no manifest request yet" and yields the first list.
    pub fn models_for_manifest_call(&self, call: u64) -> &[String] {
        match self.manifest_sequence.as_deref() {
            Some(sequence) if !sequence.is_empty() => {
                let index = usize::try_from(call.saturating_sub(1)).unwrap_or(usize::MAX);
                &sequence[index.min(sequence.len() - 1)]
            }
            _ => &self.models,
        }
    }
}

/// The listings through which a simulated host tells which models are
/// resident. Every variant serves `GET /v1/models`; the others answer as the
/// imitated server answers a path it does not have. It also decides what a
/// request for a model still loading does: LM Studio loads another instance
/// (#1751), the router and Ollama make it wait for the load under way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidencyApi {
    /// LM Studio ≥ 0.4: `GET /api/v1/models` (`models[].loaded_instances[]`)
    /// and `GET /api/v0/models` (`data[].state` = `loaded` | `not-loaded`);
    /// other paths get LM Studio's 200 with an `error` string.
    #[default]
    LmStudio,
    /// LM Studio 0.3.x: only `/api/v0/models`; `/api/v1/models` gets the
    /// 200-with-`error` answer of an unknown path (lmstudio-bug-tracker #1323).
    LmStudioV0,
    /// llama-server in router mode (`--models-dir`): every `/v1/models` entry
    /// carries `status: {"value": "loaded" | "loading" | "unloaded", "args": []}`
    /// (llama.cpp tools/server README, router mode; reference/real-backend.md
    /// §5.1); `/api/*` gets llama-server's 404 `File Not Found`.
    LlamaRouter,
    /// Ollama: `GET /api/ps` lists the loaded models as
    /// `{"models": [{"name", "model", "size", "size_vram", "context_length", ...}]}`
    /// (docs.ollama.com/api/ps); other `/api/*` paths get a plain-text 404.
    Ollama,
    /// No loaded-state listing at all (vLLM, single-model llama-server):
    /// `/api/*` gets a 404.
    None,
}

impl std::str::FromStr for ResidencyApi {
    type Err = String;

    /// The JSON names: `lm_studio`, `lm_studio_v0`, `llama_router`, `ollama`, `none`.
    fn from_str(name: &str) -> Result<Self, String> {
        serde_json::from_value(Value::String(name.to_owned())).map_err(|_| {
            format!(
                "unknown residency API {name:?}: expected lm_studio, lm_studio_v0, llama_router, ollama or none"
            )
        })
    }
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid simulator config in {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How the host answers a chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Delay before the status line and headers are sent.
    pub ttft_ms: u64,
    /// Milliseconds a request for a model that is not resident waits for the
    /// model to load, before its `ttft_ms`; once loaded the model is resident
    /// (most recently used) and later requests do not pay it. A request for a
    /// model whose load is still under way starts another load of its own (a
    /// second instance) when the host imitates LM Studio, whose JIT loader
    /// does that (lmstudio-bug-tracker #1751); with the router or Ollama
    /// `residency_api` it waits for the load under way instead. A `fail_status` request never waits
    /// for a load: it answers at once, having started the load only if its
    /// model's room was free on arrival.
    pub load_ms: u64,
    /// Content tokens; token i reads `"{token_text}{i} "`.
    pub tokens: usize,
    /// Delay before every generated piece (reasoning, content, tool-call
    /// fragment), so a request lasts `ttft_ms + pieces * token_interval_ms`.
    pub token_interval_ms: u64,
    pub token_text: String,
    /// Reasoning tokens (`"think{i} "`), streamed before the content.
    pub reasoning_tokens: usize,
    /// A tool call streamed after the content.
    pub tool_call: Option<ToolCallSpec>,
    /// Answer this status at once, before `ttft_ms`.
    pub fail_status: Option<u16>,
    pub fail_message: String,
    /// After N content tokens abort the body (the client sees a broken
    /// connection). If several cut-offs are set, drop wins over end, end over
    /// hang; a cut-off beyond the generated content applies after it.
    pub drop_after_tokens: Option<usize>,
    /// After N content tokens end the body cleanly, without finish or `[DONE]`.
    pub end_after_tokens: Option<usize>,
    /// Never send the status line.
    pub hang_before_first_byte: bool,
    /// After N content tokens go silent, keeping the connection open.
    pub hang_after_tokens: Option<usize>,
    pub send_done: bool,
    pub send_finish_reason: bool,
    /// Interleave the junk real servers emit (broken JSON, `choices: null`,
    /// comments, other SSE fields) with the real chunks.
    pub malformed: bool,
    /// Send one `data:` line of this many bytes before the first token (a runaway host;
    /// over 8 MiB it exceeds what a client should buffer for one line).
    pub garbage_line_bytes: usize,
    /// Stream all `tokens` even past the request's `max_tokens` (a broken host).
    pub ignore_max_tokens: bool,
    /// After the generated pieces, send an error event instead of finishing.
    pub in_stream_error: Option<String>,
    /// Answer with exactly these bytes instead of a generated answer: replays what a real
    /// server sent, byte for byte (after `ttft_ms`).
    pub raw: Option<RawReply>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            ttft_ms: 0,
            load_ms: 0,
            tokens: 5,
            token_interval_ms: 0,
            token_text: "tok".to_owned(),
            reasoning_tokens: 0,
            tool_call: None,
            fail_status: None,
            fail_message: "simulated failure".to_owned(),
            drop_after_tokens: None,
            end_after_tokens: None,
            hang_before_first_byte: false,
            hang_after_tokens: None,
            send_done: true,
            send_finish_reason: true,
            malformed: false,
            garbage_line_bytes: 0,
            ignore_max_tokens: false,
            in_stream_error: None,
            raw: None,
        }
    }
}

impl Behaviour {
    /// This behaviour with the given top-level fields replaced. Going through
    /// JSON keeps the override format identical to the config format.
    pub fn with_overrides(&self, overrides: &Map<String, Value>) -> serde_json::Result<Self> {
        let mut merged = serde_json::to_value(self)?;
        if let Value::Object(fields) = &mut merged {
            for (key, value) in overrides {
                fields.insert(key.clone(), value.clone());
            }
        }
        serde_json::from_value(merged)
    }
}

/// A recorded answer of a real server, replayed as it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawReply {
    /// The response status.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The body, written piece by piece (each piece its own write, `interval_ms` apart), so
    /// a test can put a read boundary anywhere.
    pub chunks: Vec<String>,
    /// Wait before each piece after the first.
    pub interval_ms: u64,
    /// After the last piece, break the connection off instead of ending the body cleanly.
    pub abort: bool,
}

impl Default for RawReply {
    fn default() -> Self {
        Self {
            status: 200,
            content_type: "text/event-stream".to_owned(),
            chunks: Vec::new(),
            interval_ms: 0,
            abort: false,
        }
    }
}

/// A tool call the simulated model makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolCallSpec {
    pub name: String,
    /// The complete arguments string (normally JSON).
    pub arguments: String,
    /// How many deltas the arguments are split over (at least one).
    pub fragments: usize,
}

impl Default for ToolCallSpec {
    fn default() -> Self {
        Self {
            name: "sim_tool".to_owned(),
            arguments: "{}".to_owned(),
            fragments: 1,
        }
    }
}

/// Message content that makes the simulator apply `overrides` (a JSON object
/// of `Behaviour` fields) to the request whose last message carries it.
pub fn sim_directive(overrides: Value) -> String {
    format!("{DIRECTIVE_PREFIX}{overrides}")
}

/// The overrides carried by a message's content: `Ok(None)` when it is not a
/// directive. Text after the JSON object is ignored, so a directive can
/// precede an ordinary prompt.
pub(crate) fn parse_directive(content: &str) -> Result<Option<Map<String, Value>>, String> {
    let Some(rest) = content.strip_prefix(DIRECTIVE_PREFIX) else {
        return Ok(None);
    };
    let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
    match values.next() {
        Some(Ok(Value::Object(fields))) => Ok(Some(fields)),
        Some(Ok(other)) => Err(format!("#sim directive must be a JSON object, got {other}")),
        Some(Err(err)) => Err(format!("invalid #sim directive: {err}")),
        None => Err("empty #sim directive".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overrides_replace_only_the_given_fields() {
        let base = Behaviour {
            tokens: 9,
            ttft_ms: 7,
            ..Behaviour::default()
        };
        let Some(fields) = parse_directive(&sim_directive(json!({"tokens": 2}))).unwrap() else {
            panic!("directive not recognised");
        };
        let merged = base.with_overrides(&fields).unwrap();
        assert_eq!(merged.tokens, 2);
        assert_eq!(merged.ttft_ms, 7);
    }

    #[test]
    fn directive_may_precede_a_prompt_and_typos_are_rejected() {
        let parsed = parse_directive("#sim {\"tokens\": 1}\nHello there").unwrap();
        assert_eq!(parsed.unwrap()["tokens"], 1);
        assert_eq!(parse_directive("Hello").unwrap(), None);
        assert!(parse_directive("#sim [1]").is_err());
        assert!(parse_directive("#sim {oops").is_err());
        let typo = parse_directive("#sim {\"tokenz\": 1}").unwrap().unwrap();
        assert!(Behaviour::default().with_overrides(&typo).is_err());
    }

    #[test]
    fn manifest_sequence_repeats_its_last_entry() {
        let config = SimConfig {
            manifest_sequence: Some(vec![vec![], vec!["m".to_owned()]]),
            ..SimConfig::default()
        };
        assert!(config.models_for_manifest_call(0).is_empty());
        assert!(config.models_for_manifest_call(1).is_empty());
        assert_eq!(config.models_for_manifest_call(2), ["m"]);
        assert_eq!(config.models_for_manifest_call(99), ["m"]);
        let plain = SimConfig::with_models(["a"]);
        assert_eq!(plain.models_for_manifest_call(5), ["a"]);
    }

    #[test]
    fn residency_api_names_parse_like_the_json() {
        assert_eq!("llama_router".parse(), Ok(ResidencyApi::LlamaRouter));
        assert_eq!("lm_studio_v0".parse(), Ok(ResidencyApi::LmStudioV0));
        assert!("router".parse::<ResidencyApi>().is_err());
        let config: SimConfig = serde_json::from_value(
            json!({"residency_api": "ollama", "max_loaded_models": 2, "default": {"load_ms": 7}}),
        )
        .unwrap();
        assert_eq!(config.residency_api, ResidencyApi::Ollama);
        assert_eq!(config.max_loaded_models, Some(2));
        assert_eq!(config.default.load_ms, 7);
    }

    #[test]
    fn partial_json_config_uses_defaults() {
        let config: SimConfig =
            serde_json::from_value(json!({"models": ["x"], "default": {"tokens": 1}})).unwrap();
        assert_eq!(config.models, ["x"]);
        assert_eq!(config.default.tokens, 1);
        assert!(config.default.send_done);
    }
}
