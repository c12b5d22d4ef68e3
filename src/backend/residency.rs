//! Which models a host holds in memory now, from whichever listing the host
//! has. A swap-aware scheduler sends work for a resident model to the host
//! that holds it, because switching models costs a GPU 5–60 s
//! (reference/placement.md).
//!
//! The listings, read in this order until one answers in its shape:
//!
//! | source | request | resident when | where it is documented |
//! |---|---|---|---|
//! | LM Studio ≥ 0.4 | `GET /api/v1/models` → `{"models": [{"key", "loaded_instances": [...]}]}` | `loaded_instances` non-empty | LM Studio docs, REST API v1 (reference/field.md §1.6) |
//! | LM Studio 0.3.x | `GET /api/v0/models` → `{"data": [{"id", "state"}]}` | `state == "loaded"` | LM Studio docs, REST API v0 (reference/field.md §1.6) |
//! | llama-server router (`--models-dir`) | `GET /v1/models` → `{"data": [{"id", "status": {"value"}}]}` | `status.value == "loaded"` (`"loading"` reported apart; `"unloaded"`, `"sleeping"` are not resident) | llama.cpp `tools/server/README.md`, router mode; reference/real-backend.md §5.1 |
//! | Ollama | `GET /api/ps` → `{"models": [{"name", "model", ...}]}` | listed | docs.ollama.com/api/ps |
//!
//! A host that answers none of them in shape (vLLM, single-model
//! llama-server, any other OpenAI server) has unknown residency: `Ok(None)`.
//!
//! Reads are cheap: each has [`RESIDENCY_TIMEOUT`], and a [`ResidencyProbe`]
//! kept per host remembers which listing worked (read first next time) and
//! which ones the host has shown it lacks (never read again).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{HostClient, describe};

/// How long one listing read may take (connect, answer and body).
pub const RESIDENCY_TIMEOUT: Duration = Duration::from_secs(2);

/// A listing that tells which models are resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResidencySource {
    /// LM Studio ≥ 0.4, `GET /api/v1/models`.
    LmStudioV1,
    /// LM Studio 0.3.x (and later), `GET /api/v0/models`.
    LmStudioV0,
    /// llama-server in router mode, `GET /v1/models` with a `status` per model.
    LlamaRouter,
    /// Ollama, `GET /api/ps`.
    Ollama,
}

impl ResidencySource {
    /// In the order they are tried.
    pub const ALL: [ResidencySource; 4] = [
        Self::LmStudioV1,
        Self::LmStudioV0,
        Self::LlamaRouter,
        Self::Ollama,
    ];

    /// The path read, relative to the host's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Self::LmStudioV1 => "/api/v1/models",
            Self::LmStudioV0 => "/api/v0/models",
            Self::LlamaRouter => "/v1/models",
            Self::Ollama => "/api/ps",
        }
    }

    /// Reads a body of this listing; `None` if it is not in its shape.
    pub fn parse(self, body: &Value) -> Option<Residency> {
        let (loaded, loading) = match self {
            Self::LmStudioV1 => (parse_lmstudio_v1(body)?, Vec::new()),
            Self::LmStudioV0 => (parse_lmstudio_v0(body)?, Vec::new()),
            Self::LlamaRouter => parse_router(body)?,
            Self::Ollama => (parse_ollama_ps(body)?, Vec::new()),
        };
        Some(Residency {
            source: self,
            loaded,
            loading,
        })
    }

    fn bit(self) -> u8 {
        match self {
            Self::LmStudioV1 => 1,
            Self::LmStudioV0 => 2,
            Self::LlamaRouter => 4,
            Self::Ollama => 8,
        }
    }

    fn from_bit(bit: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.bit() == bit)
    }
}

/// What a host holds, as one of its listings says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    pub source: ResidencySource,
    /// Model ids (as in the host's `/v1/models`) loaded and ready, in the
    /// listing's order, each once however many instances it has.
    pub loaded: Vec<String>,
    /// Models being loaded now; only llama-server's router tells this.
    pub loading: Vec<String>,
}

impl Residency {
    pub fn is_loaded(&self, model: &str) -> bool {
        self.loaded.iter().any(|m| m == model)
    }
}

/// What one host has shown about its listings, kept between reads. Keep one
/// per host (it is `Sync`; share it with an `Arc`) and make a new one when
/// the host's URL changes.
#[derive(Debug, Default)]
pub struct ResidencyProbe {
    /// Bits of [`ResidencySource::bit`]: listings the host answered without.
    lacking: AtomicU8,
    /// [`ResidencySource::bit`] of the listing that last answered; 0 for none.
    found: AtomicU8,
}

impl ResidencyProbe {
    pub fn new() -> Self {
        Self::default()
    }

    /// The listing that answered last, read first next time.
    pub fn source(&self) -> Option<ResidencySource> {
        ResidencySource::from_bit(self.found.load(Ordering::Relaxed))
    }

    /// Whether the host has shown it lacks `source` (it is not read again).
    pub fn lacks(&self, source: ResidencySource) -> bool {
        self.lacking.load(Ordering::Relaxed) & source.bit() != 0
    }

    /// Whether any listing may still tell something.
    pub fn may_tell(&self) -> bool {
        ResidencySource::ALL.into_iter().any(|s| !self.lacks(s))
    }

    /// Forgets what the host showed (e.g. after it was restarted as another server).
    pub fn forget(&self) {
        self.lacking.store(0, Ordering::Relaxed);
        self.found.store(0, Ordering::Relaxed);
    }

    fn mark_lacking(&self, source: ResidencySource) {
        self.lacking.fetch_or(source.bit(), Ordering::Relaxed);
        // Only clears `found` if it still names this source.
        let _ = self
            .found
            .compare_exchange(source.bit(), 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn mark_found(&self, source: ResidencySource) {
        self.found.store(source.bit(), Ordering::Relaxed);
    }

    /// The listings to try now: the one that answered last, then the others
    /// in [`ResidencySource::ALL`] order, without those the host lacks.
    fn order(&self) -> Vec<ResidencySource> {
        let first = self.source();
        first
            .into_iter()
            .chain(
                ResidencySource::ALL
                    .into_iter()
                    .filter(|&s| Some(s) != first),
            )
            .filter(|&s| !self.lacks(s))
            .collect()
    }
}

/// Why a host's residency could not be read. Nothing is remembered about a
/// listing that failed this way; the next read tries it again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResidencyError {
    /// No answer: connection refused, reset, or nothing within
    /// [`RESIDENCY_TIMEOUT`]. The other listings are not tried.
    #[error("cannot read {path} on {host}: {cause}")]
    Unreachable {
        host: String,
        path: &'static str,
        cause: String,
    },
    /// HTTP 401 or 403: the host wants another key.
    #[error("{host} refused the key on {path} (HTTP {status})")]
    Unauthorized {
        host: String,
        path: &'static str,
        status: u16,
    },
    /// A server error or 429 on every listing not known to be lacking (the
    /// last one is named).
    #[error("{host} answered {path} with HTTP {status}")]
    Status {
        host: String,
        path: &'static str,
        status: u16,
    },
}

/// How one listing read went.
enum Read {
    Shown(Residency),
    /// The host answered without this listing: 404/405/501 or another 4xx,
    /// LM Studio's 200 with an `error` string, or a body not in the shape.
    Lacking,
    Failed(ResidencyError),
}

impl HostClient {
    /// The models this host holds in memory, from the first listing it has
    /// (see the [module docs](self)); `Ok(None)` when it has none of them.
    /// `probe` is this host's memory of its listings: the listing that
    /// answered is read first next time, and one the host has shown it
    /// lacks is never read again, so a host without any costs nothing after
    /// the first call.
    pub async fn read_residency(
        &self,
        probe: &ResidencyProbe,
    ) -> Result<Option<Residency>, ResidencyError> {
        let mut failure = None;
        for source in probe.order() {
            match self.read_listing(source).await {
                Read::Shown(residency) => {
                    probe.mark_found(source);
                    return Ok(Some(residency));
                }
                Read::Lacking => probe.mark_lacking(source),
                // A server error says nothing about whether the listing
                // exists: try the others, remember nothing.
                Read::Failed(error @ ResidencyError::Status { .. }) => failure = Some(error),
                Read::Failed(error) => return Err(error),
            }
        }
        failure.map_or(Ok(None), Err)
    }

    async fn read_listing(&self, source: ResidencySource) -> Read {
        let path = source.path();
        let unreachable = |e: &reqwest::Error| {
            Read::Failed(ResidencyError::Unreachable {
                host: self.name.clone(),
                path,
                cause: describe(e),
            })
        };
        let response = match self.get(path).timeout(RESIDENCY_TIMEOUT).send().await {
            Ok(response) => response,
            Err(e) => return unreachable(&e),
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            401 | 403 => {
                return Read::Failed(ResidencyError::Unauthorized {
                    host: self.name.clone(),
                    path,
                    status,
                });
            }
            // Busy, timed out or broken: not an answer about the listing.
            408 | 429 | 500..=599 if status != 501 => {
                return Read::Failed(ResidencyError::Status {
                    host: self.name.clone(),
                    path,
                    status,
                });
            }
            _ => return Read::Lacking,
        }
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return unreachable(&e),
        };
        let parsed = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|body| source.parse(&body));
        match parsed {
            Some(residency) => Read::Shown(residency),
            None => Read::Lacking,
        }
    }
}

/// LM Studio's `GET /api/v1/models`:
/// `{"models": [{"type": "llm", "key": "qwen3-8b", "loaded_instances": [{"id": "qwen3-8b", "config": {...}}], ...}]}`.
/// The keys with at least one loaded instance; `None` unless every entry has
/// a `key` and a `loaded_instances` list.
pub fn parse_lmstudio_v1(body: &Value) -> Option<Vec<String>> {
    let mut loaded = Vec::new();
    for model in body.get("models")?.as_array()? {
        let key = model.get("key")?.as_str()?;
        if !model.get("loaded_instances")?.as_array()?.is_empty() {
            loaded.push(key.to_owned());
        }
    }
    Some(loaded)
}

/// LM Studio's `GET /api/v0/models`:
/// `{"object": "list", "data": [{"id": "qwen3-8b", "state": "loaded" | "not-loaded", ...}]}`.
/// The ids in state `loaded`; `None` unless every entry has an `id` and a `state`.
pub fn parse_lmstudio_v0(body: &Value) -> Option<Vec<String>> {
    let mut loaded = Vec::new();
    for model in body.get("data")?.as_array()? {
        let id = model.get("id")?.as_str()?;
        if model.get("state")?.as_str()? == "loaded" {
            loaded.push(id.to_owned());
        }
    }
    Some(loaded)
}

/// llama-server router's `GET /v1/models`:
/// `{"object": "list", "data": [{"id": "m", "status": {"value": "loaded", "args": [...]}, ...}]}`,
/// `value` one of `unloaded`, `loading`, `loaded`, `sleeping`. The ids
/// `(loaded, loading)`; `None` unless the list is non-empty and every entry
/// carries a status (a single-model llama-server, LM Studio, Ollama and vLLM
/// list models without one).
pub fn parse_router(body: &Value) -> Option<(Vec<String>, Vec<String>)> {
    let models = body.get("data")?.as_array().filter(|d| !d.is_empty())?;
    let (mut loaded, mut loading) = (Vec::new(), Vec::new());
    for model in models {
        let id = model.get("id")?.as_str()?.to_owned();
        match model.get("status")?.get("value")?.as_str()? {
            "loaded" => loaded.push(id),
            "loading" => loading.push(id),
            _ => {}
        }
    }
    Some((loaded, loading))
}

/// Ollama's `GET /api/ps`:
/// `{"models": [{"name": "gemma3", "model": "gemma3", "size": 6591830464, "size_vram": 5333539264, "expires_at": "...", "context_length": 4096, ...}]}`.
/// The names (which Ollama's `/v1/models` uses as ids), `model` when there is
/// no `name`; `None` unless every entry has one of them.
pub fn parse_ollama_ps(body: &Value) -> Option<Vec<String>> {
    body.get("models")?
        .as_array()?
        .iter()
        .map(|m| {
            m.get("name")
                .or_else(|| m.get("model"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostConfig;
    use crate::sim::{ResidencyApi, SimConfig, SimHost};
    use crate::task::ApiKey;
    use serde_json::json;

    #[test]
    fn lm_studio_v1_counts_models_with_loaded_instances() {
        // LM Studio REST v1 fields as reference/field.md §1.6 lists them.
        let body = json!({"models": [
            {"type": "llm", "publisher": "qwen", "key": "qwen/qwen3-8b", "display_name": "Qwen3 8B",
             "loaded_instances": [{"id": "qwen/qwen3-8b", "config": {"context_length": 4096,
                "eval_batch_size": 512, "parallel": 4, "flash_attention": true,
                "offload_kv_cache_to_gpu": true}}],
             "max_context_length": 40960},
            {"type": "llm", "key": "google/gemma-3-4b", "loaded_instances": []},
            {"type": "embedding", "key": "nomic-embed", "loaded_instances": [{"id": "nomic-embed"}]}
        ]});
        assert_eq!(
            parse_lmstudio_v1(&body),
            Some(vec!["qwen/qwen3-8b".to_owned(), "nomic-embed".to_owned()])
        );
        assert_eq!(parse_lmstudio_v1(&json!({"models": []})), Some(vec![]));
        // LM Studio's answer on a path it does not have, and entries without the field.
        let unknown = json!({"error": "Unexpected endpoint or method. (GET /api/v1/models)"});
        assert_eq!(parse_lmstudio_v1(&unknown), None);
        assert_eq!(parse_lmstudio_v1(&json!({"models": [{"key": "a"}]})), None);
    }

    #[test]
    fn lm_studio_v0_reads_state() {
        let body = json!({"object": "list", "data": [
            {"id": "qwen2-vl-7b-instruct", "object": "model", "type": "vlm", "publisher": "mlx-community",
             "arch": "qwen2_vl", "compatibility_type": "mlx", "quantization": "4bit",
             "state": "not-loaded", "max_context_length": 32768},
            {"id": "meta-llama-3.1-8b-instruct", "object": "model", "type": "llm",
             "state": "loaded", "max_context_length": 131072}
        ]});
        assert_eq!(
            parse_lmstudio_v0(&body),
            Some(vec!["meta-llama-3.1-8b-instruct".to_owned()])
        );
        // An OpenAI /v1/models list has no state.
        let openai = json!({"object": "list", "data": [{"id": "a", "object": "model"}]});
        assert_eq!(parse_lmstudio_v0(&openai), None);
    }

    #[test]
    fn router_status_tells_loaded_from_loading_and_needs_a_status() {
        // As captured from llama-server --models-dir (reference/real-backend.md §5.1).
        let body = json!({"object": "list", "data": [
            {"id": "smollm2-135m-instruct-q4_1", "object": "model", "owned_by": "llamacpp",
             "source": "models_dir", "status": {"value": "loaded", "args": ["llama-server", "-m", "x.gguf"]}},
            {"id": "qwen2.5-coder-0.5b-instruct-q4_k_m", "object": "model", "owned_by": "llamacpp",
             "source": "models_dir", "status": {"value": "loading", "args": []}},
            {"id": "c", "status": {"value": "unloaded"}},
            {"id": "d", "status": {"value": "sleeping"}}
        ]});
        assert_eq!(
            parse_router(&body),
            Some((
                vec!["smollm2-135m-instruct-q4_1".to_owned()],
                vec!["qwen2.5-coder-0.5b-instruct-q4_k_m".to_owned()]
            ))
        );
        // Single-model llama-server: no status.
        let single = json!({"object": "list", "data": [{"id": "smollm2", "owned_by": "llamacpp"}],
                            "models": [{"name": "smollm2", "model": "smollm2"}]});
        assert_eq!(parse_router(&single), None);
        assert_eq!(parse_router(&json!({"object": "list", "data": []})), None);
    }

    #[test]
    fn ollama_ps_lists_running_models() {
        // docs.ollama.com/api/ps example.
        let body = json!({"models": [{
            "name": "gemma3", "model": "gemma3", "size": 6_591_830_464_u64,
            "digest": "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
            "details": {"parent_model": "", "format": "gguf", "family": "gemma3",
                        "families": ["gemma3"], "parameter_size": "4.3B", "quantization_level": "Q4_K_M"},
            "expires_at": "2025-10-17T16:47:07.93355-07:00",
            "size_vram": 5_333_539_264_u64, "context_length": 4096
        }]});
        assert_eq!(parse_ollama_ps(&body), Some(vec!["gemma3".to_owned()]));
        assert_eq!(parse_ollama_ps(&json!({"models": []})), Some(vec![]));
        assert_eq!(parse_ollama_ps(&json!({"models": [{"size": 1}]})), None);
        assert_eq!(parse_ollama_ps(&json!({"error": "x"})), None);
    }

    #[test]
    fn probe_remembers_lacking_listings_and_the_one_that_answered() {
        let probe = ResidencyProbe::new();
        assert_eq!(probe.order(), ResidencySource::ALL);
        probe.mark_lacking(ResidencySource::LmStudioV1);
        probe.mark_found(ResidencySource::Ollama);
        assert_eq!(
            probe.order(),
            [
                ResidencySource::Ollama,
                ResidencySource::LmStudioV0,
                ResidencySource::LlamaRouter
            ]
        );
        probe.mark_lacking(ResidencySource::Ollama);
        assert_eq!(probe.source(), None);
        assert!(probe.may_tell());
        probe.mark_lacking(ResidencySource::LmStudioV0);
        probe.mark_lacking(ResidencySource::LlamaRouter);
        assert!(!probe.may_tell());
        probe.forget();
        assert_eq!(probe.order(), ResidencySource::ALL);
    }

    fn client(host: &SimHost, key: Option<&str>) -> HostClient {
        let config = HostConfig {
            name: "sim".to_owned(),
            base_url: host.url(),
            slots: 1,
            api_key: key.map(ApiKey::new),
            ..HostConfig::default()
        };
        HostClient::new(&config, super::super::http_client())
    }

    async fn warm(host: &SimHost, model: &str) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", host.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    /// Paths the host was asked, chat requests left out.
    fn asked(host: &SimHost) -> Vec<String> {
        let mut paths: Vec<String> = host.records().into_iter().map(|r| r.path).collect();
        paths.retain(|p| p != "/v1/chat/completions");
        paths
    }

    /// A host imitating `api`, holding `b` (loaded by a request, so the
    /// listings show what happened, not only the initial state).
    async fn host_holding_b(api: ResidencyApi) -> SimHost {
        let config = SimConfig {
            residency_api: api,
            max_loaded_models: Some(1),
            initially_loaded: Some("a".to_owned()),
            ..SimConfig::with_models(["a", "b"])
        };
        let host = SimHost::start(config).await.unwrap();
        warm(&host, "b").await;
        host
    }

    async fn read(host: &SimHost, probe: &ResidencyProbe) -> Option<Residency> {
        client(host, None).read_residency(probe).await.unwrap()
    }

    #[tokio::test]
    async fn reads_lm_studio_v1_first() {
        let host = host_holding_b(ResidencyApi::LmStudio).await;
        let probe = ResidencyProbe::new();
        let residency = read(&host, &probe).await.unwrap();
        assert_eq!(residency.source, ResidencySource::LmStudioV1);
        assert_eq!(residency.loaded, ["b"]);
        assert_eq!(asked(&host), ["/api/v1/models"]);
    }

    #[tokio::test]
    async fn falls_back_to_lm_studio_v0_and_then_reads_it_alone() {
        let host = host_holding_b(ResidencyApi::LmStudioV0).await;
        let probe = ResidencyProbe::new();
        let residency = read(&host, &probe).await.unwrap();
        assert_eq!(residency.source, ResidencySource::LmStudioV0);
        assert_eq!(residency.loaded, ["b"]);
        read(&host, &probe).await.unwrap();
        assert_eq!(
            asked(&host),
            ["/api/v1/models", "/api/v0/models", "/api/v0/models"]
        );
    }

    #[tokio::test]
    async fn reads_the_router_status_including_a_load_under_way() {
        let host = host_holding_b(ResidencyApi::LlamaRouter).await;
        let probe = ResidencyProbe::new();
        let residency = read(&host, &probe).await.unwrap();
        assert_eq!(residency.source, ResidencySource::LlamaRouter);
        assert_eq!(
            (residency.loaded, residency.loading),
            (vec!["b".to_owned()], vec![])
        );

        // A slow load of a: b is evicted at once, a shows as loading.
        let body = json!({"model": "a", "messages": [{"role": "user",
            "content": crate::sim::sim_directive(json!({"load_ms": 1_000}))}]});
        let pending = tokio::spawn(
            reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", host.url()))
                .json(&body)
                .send(),
        );
        while host.resident_models().iter().all(|r| r.model != "a") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let residency = read(&host, &probe).await.unwrap();
        assert_eq!(
            (residency.loaded, residency.loading),
            (vec![], vec!["a".to_owned()])
        );
        pending.await.unwrap().unwrap();
        assert_eq!(read(&host, &probe).await.unwrap().loaded, ["a"]);
    }

    #[tokio::test]
    async fn reads_ollama_ps_and_then_nothing_else() {
        let host = host_holding_b(ResidencyApi::Ollama).await;
        let probe = ResidencyProbe::new();
        let residency = read(&host, &probe).await.unwrap();
        assert_eq!(residency.source, ResidencySource::Ollama);
        assert_eq!(residency.loaded, ["b"]);
        read(&host, &probe).await.unwrap();
        assert_eq!(
            asked(&host),
            [
                "/api/v1/models",
                "/api/v0/models",
                "/v1/models",
                "/api/ps",
                "/api/ps"
            ]
        );
    }

    #[tokio::test]
    async fn a_host_without_listings_is_unknown_and_not_asked_again() {
        let host = host_holding_b(ResidencyApi::None).await;
        let probe = ResidencyProbe::new();
        assert_eq!(read(&host, &probe).await, None);
        assert_eq!(asked(&host).len(), 4);
        assert!(!probe.may_tell());
        assert_eq!(read(&host, &probe).await, None);
        assert_eq!(asked(&host).len(), 4, "no listing is read twice");
    }

    #[tokio::test]
    async fn refusals_and_dead_hosts_are_errors_that_teach_nothing() {
        let config = SimConfig {
            required_key: Some("right".to_owned()),
            ..SimConfig::default()
        };
        let host = SimHost::start(config).await.unwrap();
        let probe = ResidencyProbe::new();
        let refused = client(&host, Some("wrong")).read_residency(&probe).await;
        assert!(
            matches!(
                refused,
                Err(ResidencyError::Unauthorized { status: 401, .. })
            ),
            "{refused:?}"
        );
        assert_eq!(probe.order(), ResidencySource::ALL, "nothing learnt");
        let allowed = client(&host, Some("right")).read_residency(&probe).await;
        assert_eq!(
            allowed.unwrap().unwrap().source,
            ResidencySource::LmStudioV1
        );

        let dead = client(&host, None);
        host.shutdown().await;
        let probe = ResidencyProbe::new();
        let error = dead.read_residency(&probe).await.unwrap_err();
        assert!(
            matches!(error, ResidencyError::Unreachable { .. }),
            "{error}"
        );
        assert_eq!(probe.order(), ResidencySource::ALL);
    }

    #[tokio::test]
    async fn a_server_error_leaves_the_listing_to_be_tried_again() {
        // The sim's manifest failure answers /v1/models with 503: the router
        // listing is neither lacking nor shown, and the next listing is read.
        let config = SimConfig {
            residency_api: ResidencyApi::None,
            manifest_status: Some(503),
            ..SimConfig::default()
        };
        let host = SimHost::start(config).await.unwrap();
        let probe = ResidencyProbe::new();
        let error = client(&host, None)
            .read_residency(&probe)
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                ResidencyError::Status {
                    status: 503,
                    path: "/v1/models",
                    ..
                }
            ),
            "{error}"
        );
        assert!(!probe.lacks(ResidencySource::LlamaRouter));
        assert!(probe.lacks(ResidencySource::Ollama));
    }
}
