//! Configuration: the TOML file, the prompt-prix environment fallback, and validation.
//!
//! Every problem is reported at start with the file, the key and what is wrong, so a typo never
//! turns into a fleet that silently routes nowhere.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::task::ApiKey;

/// Where a configuration came from, for messages and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// prompt-prix's `LOCAL_INFERENCE_SERVER_N` / `LM_STUDIO_SERVER_N` variables.
    Environment,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Environment => f.write_str("environment (LOCAL_INFERENCE_SERVER_N)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "no configuration found: {tried} does not exist and no LOCAL_INFERENCE_SERVER_1 / \
         LM_STUDIO_SERVER_1 is set. Create a config file (see config/prix-dispatch.toml), pass \
         --config FILE, or set LOCAL_INFERENCE_SERVER_1=http://HOST:1234"
    )]
    Missing { tried: PathBuf },
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    pub server: ServerSettings,
    pub queue: QueueSettings,
    pub health: HealthSettings,
    pub timeouts: TimeoutSettings,
    pub hosts: Vec<HostConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub auth_token_env: Option<String>,
    pub max_request_bytes: usize,
    /// How long running tasks may finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// `Host` header values `/mcp` accepts besides loopback (required to listen beyond it).
    pub allowed_hosts: Vec<String>,
    /// The daemon's Unix socket, where `stdio` launches join it; `None` = this user's daemon
    /// socket (see [`crate::daemon_dir::DaemonDir::socket`]).
    pub socket: Option<PathBuf>,
    /// A daemon started by a `stdio` launch exits after this long with no clients and no tasks.
    pub idle_exit: Duration,
    /// `stdio` joins the daemon at this URL (on another machine) instead of one of its own,
    /// like `--connect`; such a configuration needs no hosts.
    pub connect: Option<String>,
    /// An MCP-over-HTTP session with no call in flight for this long is closed.
    pub session_idle: Duration,
    /// Longest gap between two progress notifications of an MCP call that carries a
    /// progress token, from submission to its result (`progress_interval_seconds`, default
    /// 10 s): clients that reset their timeout on progress then never time out while the
    /// task waits in the queue, its model loads, or the model thinks.
    pub progress_interval: Duration,
}

/// Default of `[server] progress_interval_seconds`: well under the shortest per-call timeouts
/// of MCP clients (Claude Desktop's is about 60 s; the TypeScript SDK's default is 60 s,
/// `DEFAULT_REQUEST_TIMEOUT_MSEC` in `@modelcontextprotocol/sdk` `shared/protocol.js`).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_pending: usize,
    /// Default bound on a task's wait in the queue; `None` waits as long as needed.
    pub wait_timeout: Option<Duration>,
    pub max_bypass: Duration,
    /// Most times one task is sent to a host; retries only before any response byte.
    pub max_attempts: u32,
    /// How long a task waits for a host of its model to come back.
    pub host_wait: Duration,
    /// Placement counts model loads (default). `false` (`[queue] swap_aware = false`) is the
    /// placement before it, for comparisons (the demo, benchmarks).
    pub swap_aware: bool,
}

#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// How often a host that is out of rotation is probed.
    pub probe_interval: Duration,
    /// How often every manifest is re-read.
    pub manifest_refresh: Duration,
    /// Consecutive 5xx answers that cool a host down (circuit breaker).
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

/// Defaults for the per-task timeouts of the same names.
#[derive(Debug, Clone)]
pub struct TimeoutSettings {
    /// From sending a request to the host's first byte (covers a cold model load).
    pub first_token: Duration,
    /// Longest silence between bytes after the first.
    pub inactivity: Duration,
}

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub name: String,
    /// Base URL without a trailing `/v1` or slash; endpoints are `{base_url}/v1/...`.
    pub base_url: String,
    pub slots: usize,
    pub api_key: Option<ApiKey>,
    /// Models the host holds in memory at once (`max_loaded_models`, default 1: LM Studio's
    /// JIT auto-evict keeps one); learned upward when the host reports more resident.
    pub max_loaded_models: usize,
    /// Time to load a model here until one is learned (`load_seconds`, default 30 s).
    pub load: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            base_url: String::new(),
            slots: 1,
            api_key: None,
            max_loaded_models: 1,
            load: crate::scheduler::state::DEFAULT_LOAD,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8765)),
            auth_token_env: None,
            max_request_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            allowed_hosts: Vec::new(),
            socket: None,
            idle_exit: Duration::from_secs(600),
            connect: None,
            session_idle: crate::http::sessions::DEFAULT_SESSION_IDLE,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(5),
            manifest_refresh: Duration::from_secs(60),
            failure_threshold: 3,
            cooldown: Duration::from_secs(10),
        }
    }
}

impl Default for TimeoutSettings {
    fn default() -> Self {
        Self {
            first_token: Duration::from_secs(600),
            inactivity: Duration::from_secs(300),
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_pending: 10_000,
            wait_timeout: None,
            max_bypass: Duration::from_secs(30),
            max_attempts: 2,
            host_wait: Duration::from_secs(30),
            swap_aware: true,
        }
    }
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    queue: FileQueue,
    #[serde(default)]
    health: FileHealth,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    host: Vec<FileHost>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<String>,
    auth_token_env: Option<String>,
    max_request_bytes: Option<u64>,
    shutdown_grace_seconds: Option<f64>,
    allowed_hosts: Option<Vec<String>>,
    socket: Option<PathBuf>,
    idle_exit_seconds: Option<f64>,
    connect: Option<String>,
    session_idle_seconds: Option<f64>,
    progress_interval_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueue {
    max_pending: Option<i64>,
    wait_timeout_seconds: Option<f64>,
    max_bypass_seconds: Option<f64>,
    max_attempts: Option<i64>,
    host_wait_seconds: Option<f64>,
    swap_aware: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    probe_interval_seconds: Option<f64>,
    manifest_refresh_seconds: Option<f64>,
    failure_threshold: Option<i64>,
    cooldown_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    first_token_timeout_seconds: Option<f64>,
    timeout_seconds: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHost {
    name: String,
    url: String,
    slots: Option<i64>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    max_loaded_models: Option<i64>,
    load_seconds: Option<f64>,
}

/// Reads the environment; injected so tests need not touch the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The path used when none is given: `$PRIX_DISPATCH_CONFIG`, else `config/prix-dispatch.toml`.
pub fn default_path(env: EnvLookup) -> PathBuf {
    env("PRIX_DISPATCH_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config/prix-dispatch.toml"))
}

impl Config {
    /// Loads `explicit` if given (it must exist); otherwise the default path if it exists;
    /// otherwise the prompt-prix environment variables.
    pub fn load(explicit: Option<&Path>, env: EnvLookup) -> Result<Config, ConfigError> {
        if let Some(path) = explicit {
            return Self::from_file(path, env);
        }
        let path = default_path(env);
        if path.exists() {
            return Self::from_file(&path, env);
        }
        match Self::from_prompt_prix_env(env)? {
            Some(config) => Ok(config),
            None => Err(ConfigError::Missing { tried: path }),
        }
    }

    pub fn from_file(path: &Path, env: EnvLookup) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text, ConfigSource::File(path.to_path_buf()), env)
    }

    pub fn from_toml(
        text: &str,
        source: ConfigSource,
        env: EnvLookup,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            source_name: source.to_string(),
            message,
        };
        let file: FileConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;

        let mut server = ServerSettings::default();
        if let Some(listen) = file.server.listen {
            server.listen = listen.parse().map_err(|_| {
                invalid(format!(
                    "[server] listen = {listen:?} is not an address like \"127.0.0.1:8765\""
                ))
            })?;
        }
        server.auth_token_env = file.server.auth_token_env.filter(|s| !s.is_empty());
        if let Some(var) = &server.auth_token_env
            && env(var).is_none_or(|t| t.is_empty())
        {
            return Err(invalid(format!(
                "[server] auth_token_env = {var:?} but that environment variable is not set (or empty)"
            )));
        }
        server.allowed_hosts = file.server.allowed_hosts.unwrap_or_default();
        // A relative socket means the same place for every launch: beside the file, not in
        // whatever directory an agent host happens to start the launch.
        server.socket = match (file.server.socket, &source) {
            (Some(socket), ConfigSource::File(path)) if socket.is_relative() => {
                let beside = path.parent().unwrap_or(Path::new("")).join(socket);
                Some(std::path::absolute(&beside).unwrap_or(beside))
            }
            (socket, _) => socket,
        };
        if let Some(s) = file.server.idle_exit_seconds {
            server.idle_exit = seconds(s, "[server] idle_exit_seconds", false).map_err(&invalid)?;
        }
        if let Some(s) = file.server.session_idle_seconds {
            server.session_idle =
                seconds(s, "[server] session_idle_seconds", false).map_err(&invalid)?;
        }
        if let Some(s) = file.server.progress_interval_seconds {
            server.progress_interval =
                seconds(s, "[server] progress_interval_seconds", false).map_err(&invalid)?;
        }
        if !server.listen.ip().is_loopback() && server.allowed_hosts.is_empty() {
            return Err(invalid(format!(
                "[server] listen = \"{}\" is reachable from other machines: list the names \
                 clients use to reach it in [server] allowed_hosts (e.g. [\"gpu-box.lan\", \"192.168.1.20\"]) \
                 and set auth_token_env",
                server.listen
            )));
        }
        if let Some(bytes) = file.server.max_request_bytes {
            if bytes == 0 {
                return Err(invalid(
                    "[server] max_request_bytes must be at least 1".into(),
                ));
            }
            server.max_request_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        }

        let mut queue = QueueSettings::default();
        if let Some(n) = file.queue.max_pending {
            queue.max_pending = at_least_one(n, "[queue] max_pending").map_err(&invalid)?;
        }
        if let Some(s) = file.queue.wait_timeout_seconds {
            queue.wait_timeout = non_negative_seconds(s)
                .ok_or_else(|| {
                    invalid(format!(
                        "[queue] wait_timeout_seconds must be 0 (no limit) or a positive number, got {s}"
                    ))
                })?
                .filter(|d| !d.is_zero());
        }
        if let Some(s) = file.queue.max_bypass_seconds {
            queue.max_bypass = non_negative_seconds(s).flatten().ok_or_else(|| {
                invalid(format!(
                    "[queue] max_bypass_seconds must be a number of seconds >= 0, got {s}"
                ))
            })?;
        }

        if let Some(s) = file.server.shutdown_grace_seconds {
            server.shutdown_grace =
                seconds(s, "[server] shutdown_grace_seconds", true).map_err(&invalid)?;
        }
        if let Some(n) = file.queue.max_attempts {
            queue.max_attempts = at_least_one(n, "[queue] max_attempts").map_err(&invalid)?;
        }
        if let Some(b) = file.queue.swap_aware {
            queue.swap_aware = b;
        }
        if let Some(s) = file.queue.host_wait_seconds {
            queue.host_wait = seconds(s, "[queue] host_wait_seconds", true).map_err(&invalid)?;
        }
        let mut health = HealthSettings::default();
        if let Some(s) = file.health.probe_interval_seconds {
            health.probe_interval =
                seconds(s, "[health] probe_interval_seconds", false).map_err(&invalid)?;
        }
        if let Some(s) = file.health.manifest_refresh_seconds {
            health.manifest_refresh =
                seconds(s, "[health] manifest_refresh_seconds", false).map_err(&invalid)?;
        }
        if let Some(n) = file.health.failure_threshold {
            health.failure_threshold =
                at_least_one(n, "[health] failure_threshold").map_err(&invalid)?;
        }
        if let Some(s) = file.health.cooldown_seconds {
            health.cooldown = seconds(s, "[health] cooldown_seconds", true).map_err(&invalid)?;
        }
        let mut timeouts = TimeoutSettings::default();
        if let Some(s) = file.timeouts.first_token_timeout_seconds {
            timeouts.first_token =
                seconds(s, "[timeouts] first_token_timeout_seconds", false).map_err(&invalid)?;
        }
        if let Some(s) = file.timeouts.timeout_seconds {
            timeouts.inactivity =
                seconds(s, "[timeouts] timeout_seconds", false).map_err(&invalid)?;
        }

        if let Some(url) = file.server.connect {
            // The same checks as a host URL; `remote` adds the `/mcp` when it connects.
            normalise_base_url(&url).map_err(|why| invalid(format!("[server] connect: {why}")))?;
            server.connect = Some(url.trim().to_string());
        }
        if file.host.is_empty() && server.connect.is_none() {
            return Err(invalid(
                "no [[host]] entries: add at least one, e.g. [[host]] name = \"gpu0\" url = \"http://127.0.0.1:1234\", \
                 or join a daemon on another machine with [server] connect = \"http://HOST:8765\""
                    .into(),
            ));
        }
        let mut names = HashSet::new();
        let mut hosts = Vec::with_capacity(file.host.len());
        for (i, h) in file.host.into_iter().enumerate() {
            let at = format!("[[host]] #{} ({:?})", i + 1, h.name);
            if h.name.trim().is_empty() {
                return Err(invalid(format!(
                    "[[host]] #{}: name must not be empty",
                    i + 1
                )));
            }
            if !names.insert(h.name.clone()) {
                return Err(invalid(format!(
                    "{at}: duplicate host name {:?}; each host needs its own name",
                    h.name
                )));
            }
            let base_url =
                normalise_base_url(&h.url).map_err(|why| invalid(format!("{at}: url: {why}")))?;
            let slots = match h.slots {
                None => 1,
                Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
                Some(n) => return Err(invalid(format!("{at}: slots must be at least 1, got {n}"))),
            };
            let api_key = match (h.api_key, h.api_key_env) {
                (Some(_), Some(_)) => {
                    return Err(invalid(format!(
                        "{at}: set either api_key or api_key_env, not both"
                    )));
                }
                (Some(key), None) => Some(ApiKey::new(key)).filter(|k| !k.expose().is_empty()),
                (None, Some(var)) => match env(&var) {
                    Some(key) if !key.is_empty() => Some(ApiKey::new(key)),
                    _ => {
                        return Err(invalid(format!(
                            "{at}: api_key_env = {var:?} but that environment variable is not set (or empty)"
                        )));
                    }
                },
                (None, None) => None,
            };
            let max_loaded_models = match h.max_loaded_models {
                None => 1,
                Some(n) => {
                    at_least_one(n, &format!("{at}: max_loaded_models")).map_err(&invalid)?
                }
            };
            let load = match h.load_seconds {
                None => crate::scheduler::state::DEFAULT_LOAD,
                Some(s) => seconds(s, &format!("{at}: load_seconds"), true).map_err(&invalid)?,
            };
            hosts.push(HostConfig {
                name: h.name,
                base_url,
                slots,
                api_key,
                max_loaded_models,
                load,
            });
        }
        Ok(Config {
            source,
            server,
            queue,
            health,
            timeouts,
            hosts,
        })
    }

    /// prompt-prix's variables: `LOCAL_INFERENCE_SERVER_1..N` (or the legacy `LM_STUDIO_SERVER_N`),
    /// each with an optional `_KEY`, and `LMSTUDIO_API_KEY` as the key for hosts without one.
    /// Reading stops at the first missing index, as prompt-prix does. `None` when none is set.
    pub fn from_prompt_prix_env(env: EnvLookup) -> Result<Option<Config>, ConfigError> {
        let prefix = if env("LOCAL_INFERENCE_SERVER_1").is_some() {
            "LOCAL_INFERENCE_SERVER_"
        } else if env("LM_STUDIO_SERVER_1").is_some() {
            "LM_STUDIO_SERVER_"
        } else {
            return Ok(None);
        };
        let global_key = env("LMSTUDIO_API_KEY").filter(|k| !k.is_empty());
        let mut hosts = Vec::new();
        for n in 1.. {
            let var = format!("{prefix}{n}");
            let Some(url) = env(&var) else { break };
            if url.trim().is_empty() {
                continue;
            }
            let base_url = normalise_base_url(&url).map_err(|why| ConfigError::Invalid {
                source_name: ConfigSource::Environment.to_string(),
                message: format!("{var}: {why}"),
            })?;
            let key = env(&format!("{var}_KEY"))
                .filter(|k| !k.is_empty())
                .or_else(|| global_key.clone());
            hosts.push(HostConfig {
                name: format!("server{n}"),
                base_url,
                slots: 1,
                api_key: key.map(ApiKey::new),
                ..HostConfig::default()
            });
        }
        if hosts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Config::with_hosts(ConfigSource::Environment, hosts)))
    }
}

impl Config {
    /// All defaults around these hosts (tests, the demo, the environment fallback).
    pub fn with_hosts(source: ConfigSource, hosts: Vec<HostConfig>) -> Config {
        Config {
            source,
            server: ServerSettings::default(),
            queue: QueueSettings::default(),
            health: HealthSettings::default(),
            timeouts: TimeoutSettings::default(),
            hosts,
        }
    }
}

/// A count setting of at least 1, in the type the setting uses.
fn at_least_one<N: TryFrom<i64>>(n: i64, key: &str) -> Result<N, String> {
    if n >= 1 {
        N::try_from(n).map_err(|_| format!("{key} = {n} is too large"))
    } else {
        Err(format!("{key} must be at least 1, got {n}"))
    }
}

/// A duration setting: positive, or also zero when `zero_ok`.
fn seconds(s: f64, key: &str, zero_ok: bool) -> Result<Duration, String> {
    let ok = (0.0..1e9).contains(&s) && (zero_ok || s > 0.0);
    if ok {
        Ok(Duration::from_secs_f64(s))
    } else {
        let range = if zero_ok { ">= 0" } else { "> 0" };
        Err(format!(
            "{key} must be a number of seconds {range}, got {s}"
        ))
    }
}

fn non_negative_seconds(s: f64) -> Option<Option<Duration>> {
    (0.0..1e9)
        .contains(&s)
        .then(|| Some(Duration::from_secs_f64(s)))
}

/// Accepts `http://host:port`, `http://host:port/`, `http://host:port/v1` and `.../v1/`; the
/// `/v1` suffix is added back in exactly one place, the host client.
pub fn normalise_base_url(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    let parsed = url::Url::parse(trimmed).map_err(|e| {
        format!("{trimmed:?} is not a URL ({e}); expected e.g. \"http://127.0.0.1:1234\"")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{trimmed:?} must start with http:// or https://"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{trimmed:?} has no host name"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{trimmed:?} must not have a query or fragment"));
    }
    let mut base = trimmed.trim_end_matches('/').to_string();
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped.trim_end_matches('/').to_string();
    }
    Ok(base)
}

/// The identity of the server behind a base URL: what must have exactly one scheduler.
///
/// Shape: `scheme://address:port/path`, the port always written (80/443 when the URL has
/// none), no trailing `/` or `/v1`. The host part is the server's address, so every name of
/// one server is one identity: a host name is resolved (once per process, cached), and an
/// address of this machine — loopback, `0.0.0.0`, `localhost`, `[::1]`, the machine's own LAN
/// address or a name for it (`gpu-box.lan` on gpu-box itself) — is written `127.0.0.1`. Of
/// several addresses the lowest is used. A name that does not resolve is its own identity
/// (lower-cased). Input is an already normalised base URL ([`normalise_base_url`]); one that
/// does not parse is its own identity.
pub fn host_identity(base_url: &str) -> String {
    let Ok(url) = url::Url::parse(base_url) else {
        return base_url.to_string();
    };
    let port = url.port_or_known_default().unwrap_or(0);
    let host = match url.host() {
        Some(url::Host::Ipv4(ip)) => address_identity(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => address_identity(std::net::IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => resolved_identity(&name.to_ascii_lowercase(), port),
        None => String::new(),
    };
    let mut path = url.path().trim_end_matches('/').to_string();
    if let Some(stripped) = path.strip_suffix("/v1") {
        path = stripped.trim_end_matches('/').to_string();
    }
    format!("{}://{host}:{port}{path}", url.scheme())
}

/// An address as identity: this machine's addresses are all `127.0.0.1`.
fn address_identity(ip: std::net::IpAddr) -> String {
    let local = ip.is_loopback()
        || ip.is_unspecified()
        // Binding succeeds only for an address of one of this machine's interfaces.
        || std::net::UdpSocket::bind(std::net::SocketAddr::new(ip, 0)).is_ok();
    match (local, ip) {
        (true, _) => "127.0.0.1".to_string(),
        (false, std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        (false, v4) => v4.to_string(),
    }
}

/// A host name's identity: its lowest address's identity, or the name if it does not resolve.
/// Cached, so that every use in a process agrees and only the first pays for the lookup.
fn resolved_identity(name: &str, port: u16) -> String {
    use std::collections::HashMap;
    use std::net::ToSocketAddrs;
    use std::sync::{Mutex, OnceLock, PoisonError};
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(hit) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
    {
        return hit.clone();
    }
    let identity = if name == "localhost" {
        "127.0.0.1".to_string()
    } else {
        let mut addresses: Vec<String> = (name, port)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| address_identity(a.ip())).collect())
            .unwrap_or_default();
        addresses.sort();
        addresses.dedup();
        addresses
            .into_iter()
            .next()
            .unwrap_or_else(|| name.to_string())
    };
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.to_string(), identity.clone());
    identity
}

impl HostConfig {
    /// See [`host_identity`].
    pub fn identity(&self) -> String {
        host_identity(&self.base_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_has_one_identity_however_its_url_is_written() {
        let same = [
            "http://localhost:1234",
            "http://127.0.0.1:1234/",
            "http://LOCALHOST:1234/v1",
            "http://[::1]:1234/v1/",
        ];
        for raw in same {
            let base = normalise_base_url(raw).unwrap();
            assert_eq!(host_identity(&base), "http://127.0.0.1:1234", "{raw}");
        }
        assert_eq!(
            host_identity("http://GPU-Box.invalid"),
            "http://gpu-box.invalid:80",
            "default port written out; a name that does not resolve is itself, lower-cased"
        );
        assert_eq!(
            host_identity("http://0.0.0.0:1234"),
            "http://127.0.0.1:1234",
            "0.0.0.0 reaches this machine"
        );
        // This machine's own name (and its LAN address) is this machine.
        if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
            let name = name.trim();
            let resolves = std::net::ToSocketAddrs::to_socket_addrs(&(name, 1234))
                .is_ok_and(|mut a| a.next().is_some());
            if !name.is_empty() && resolves {
                assert_eq!(
                    host_identity(&format!("http://{name}:1234")),
                    "http://127.0.0.1:1234",
                    "{name} is this machine"
                );
            }
        }
        assert_eq!(
            host_identity("https://gpu:443/proxy/v1"),
            "https://gpu:443/proxy"
        );
        assert_ne!(
            host_identity("http://127.0.0.1:1234"),
            host_identity("http://127.0.0.1:1235")
        );
        assert_ne!(
            host_identity("http://127.0.0.1:1234"),
            host_identity("https://127.0.0.1:1234")
        );
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, ConfigSource::File("test.toml".into()), &no_env)
    }

    #[test]
    fn a_relative_socket_is_beside_the_configuration_file() {
        let text = |socket: &str| {
            format!("[server]\nsocket = \"{socket}\"\n[[host]]\nname=\"a\"\nurl=\"http://x:1\"\n")
        };
        let at = |file: &str, socket: &str| {
            Config::from_toml(&text(socket), ConfigSource::File(file.into()), &no_env)
                .unwrap()
                .server
                .socket
                .unwrap()
        };
        assert_eq!(
            at("/etc/prix/fleet.toml", "d.sock"),
            Path::new("/etc/prix/d.sock")
        );
        assert_eq!(
            at("/etc/prix/fleet.toml", "run/d.sock"),
            Path::new("/etc/prix/run/d.sock")
        );
        assert_eq!(
            at("/etc/prix/fleet.toml", "/run/d.sock"),
            Path::new("/run/d.sock")
        );
        // A relative file path: beside it, made absolute now (the working directory of
        // this load, which is what the file's own path is relative to).
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(at("conf/fleet.toml", "d.sock"), cwd.join("conf/d.sock"));
        assert_eq!(at("fleet.toml", "d.sock"), cwd.join("d.sock"));
        let env = Config::from_toml(&text("d.sock"), ConfigSource::Environment, &no_env).unwrap();
        assert_eq!(env.server.socket.as_deref(), Some(Path::new("d.sock")));
    }

    #[test]
    fn url_with_or_without_v1_is_the_same_base() {
        for raw in [
            "http://h:1234",
            "http://h:1234/",
            "http://h:1234/v1",
            "http://h:1234/v1/",
        ] {
            assert_eq!(normalise_base_url(raw).unwrap(), "http://h:1234", "{raw}");
        }
        assert!(normalise_base_url("h:1234").is_err());
        assert!(normalise_base_url("ftp://h").is_err());
    }

    #[test]
    fn defaults_apply() {
        let c = parse("[[host]]\nname = \"gpu0\"\nurl = \"http://127.0.0.1:1234/v1\"\n").unwrap();
        assert_eq!(c.hosts[0].slots, 1);
        assert_eq!(c.hosts[0].base_url, "http://127.0.0.1:1234");
        assert_eq!(c.queue.max_pending, 10_000);
        assert_eq!(c.queue.wait_timeout, None);
        assert_eq!(c.queue.max_bypass, Duration::from_secs(30));
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8765");
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            (
                "[[host]]\nname=\"a\"\nurl=\"http://x:1\"\n[[host]]\nname=\"a\"\nurl=\"http://y:1\"\n",
                "duplicate host name",
            ),
            (
                "[[host]]\nname=\"a\"\nurl=\"http://x:1\"\nslots=0\n",
                "slots must be at least 1",
            ),
            ("[[host]]\nname=\"a\"\nurl=\"nope\"\n", "url"),
            (
                "[[host]]\nname=\"a\"\nurl=\"http://x:1\"\nslot=2\n",
                "unknown field `slot`",
            ),
            (
                "[queue]\nmax_pendin=3\n[[host]]\nname=\"a\"\nurl=\"http://x:1\"\n",
                "unknown field `max_pendin`",
            ),
            (
                "[[host]]\nname=\"a\"\nurl=\"http://x:1\"\napi_key_env=\"NOPE_KEY\"\n",
                "NOPE_KEY",
            ),
            ("", "no [[host]] entries"),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml: "), "{err}");
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    #[test]
    fn listening_beyond_loopback_needs_allowed_hosts() {
        let lan = "[server]\nlisten = \"0.0.0.0:8765\"\n[[host]]\nname=\"a\"\nurl=\"http://x:1\"\n";
        let err = parse(lan).unwrap_err().to_string();
        assert!(err.contains("allowed_hosts"), "{err}");
        let ok = lan.replace("[[host]]", "allowed_hosts = [\"gpu-box.lan\"]\n[[host]]");
        assert_eq!(parse(&ok).unwrap().server.allowed_hosts, ["gpu-box.lan"]);
        let token =
            "[server]\nauth_token_env = \"NOPE_TOKEN\"\n[[host]]\nname=\"a\"\nurl=\"http://x:1\"\n";
        assert!(parse(token).unwrap_err().to_string().contains("NOPE_TOKEN"));
    }

    #[test]
    fn a_config_that_connects_needs_no_hosts_but_a_valid_url() {
        let c = parse("[server]\nconnect = \"http://gpu-box.lan:8765/mcp\"\n").unwrap();
        assert_eq!(
            c.server.connect.as_deref(),
            Some("http://gpu-box.lan:8765/mcp")
        );
        assert!(c.hosts.is_empty());
        for (url, needle) in [
            ("gpu-box:8765", "[server] connect"),
            ("ftp://gpu-box/", "http:// or https://"),
            ("http://", "not a URL"),
        ] {
            let err = parse(&format!("[server]\nconnect = \"{url}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn api_key_env_is_resolved() {
        let env = |k: &str| (k == "GPU0_KEY").then(|| "s3cret".to_string());
        let c = Config::from_toml(
            "[[host]]\nname=\"a\"\nurl=\"http://x:1\"\napi_key_env=\"GPU0_KEY\"\n",
            ConfigSource::File("t.toml".into()),
            &env,
        )
        .unwrap();
        assert_eq!(c.hosts[0].api_key.as_ref().unwrap().expose(), "s3cret");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "keys never show in Debug"
        );
    }

    #[test]
    fn shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = Config::from_file(&root.join("config/prix-dispatch.toml"), &no_env).unwrap();
        assert_eq!(c.hosts[0].base_url, "http://127.0.0.1:1234");
        let env = |k: &str| (k == "WS_B_LMSTUDIO_TOKEN").then(|| "token".to_string());
        let c = Config::from_file(&root.join("config/example-fleet.toml"), &env).unwrap();
        let slots: Vec<usize> = c.hosts.iter().map(|h| h.slots).collect();
        assert_eq!(slots, [1, 2, 1]);
        assert_eq!(c.hosts[1].max_loaded_models, 2);
        assert_eq!(c.hosts[1].load, Duration::from_secs(60));
        assert_eq!(c.hosts[0].load, Duration::from_secs(30), "the default");
        assert!(c.hosts[2].api_key.is_some() && c.hosts[0].api_key.is_none());
    }

    #[test]
    fn prompt_prix_environment_fallback() {
        let vars = [
            ("LOCAL_INFERENCE_SERVER_1", "http://10.0.0.1:1234/v1"),
            ("LOCAL_INFERENCE_SERVER_1_KEY", "k1"),
            ("LOCAL_INFERENCE_SERVER_2", "http://10.0.0.2:1234"),
            ("LOCAL_INFERENCE_SERVER_4", "http://ignored:1"),
            ("LMSTUDIO_API_KEY", "global"),
        ];
        let env = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let c = Config::load(Some(Path::new("/nonexistent/x.toml")), &env);
        assert!(
            matches!(c, Err(ConfigError::Read { .. })),
            "an explicit path must exist"
        );
        let c = Config::from_prompt_prix_env(&env).unwrap().unwrap();
        assert_eq!(c.source, ConfigSource::Environment);
        assert_eq!(c.hosts.len(), 2, "reading stops at the first missing index");
        assert_eq!(c.hosts[0].base_url, "http://10.0.0.1:1234");
        assert_eq!(c.hosts[0].api_key.as_ref().unwrap().expose(), "k1");
        assert_eq!(c.hosts[1].api_key.as_ref().unwrap().expose(), "global");

        let legacy = |k: &str| (k == "LM_STUDIO_SERVER_1").then(|| "http://old:1234".to_string());
        let c = Config::from_prompt_prix_env(&legacy).unwrap().unwrap();
        assert_eq!(c.hosts[0].base_url, "http://old:1234");
        assert!(c.hosts[0].api_key.is_none());
        assert!(Config::from_prompt_prix_env(&no_env).unwrap().is_none());
    }
}
