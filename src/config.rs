//! Configuration: the TOML file, the prompt-prix environment fallback, and validation.
//!
//! Every problem is reported at start with the file, the key and what is wrong, so a typo never
//! turns into a fleet that silently routes nowhere.

use std::collections::{HashMap, HashSet};
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

/// Why no configuration could be loaded. `main` exits with [`CONFIG_ERROR_EXIT`] on any of
/// these and prints the message alone (no backtrace): each one already says what to fix.
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
    /// A file named by `--config` or `$PRIX_DISPATCH_CONFIG` does not exist. Falling back to
    /// another source would run a fleet the user did not ask for.
    #[error(
        "config file {path} (named by {named_by}) does not exist; fix the path, or remove \
         {named_by} to use {default} or the LOCAL_INFERENCE_SERVER_N variables"
    )]
    NamedMissing {
        path: PathBuf,
        named_by: &'static str,
        default: String,
    },
    #[error(
        "no configuration: {default} does not exist and LOCAL_INFERENCE_SERVER_1 is not set{ignored}. \
         Configure prix-dispatch one of two ways: write a config file at {default} (a commented \
         template is config/prix-dispatch.toml in the repository; --config FILE or \
         PRIX_DISPATCH_CONFIG=FILE name another file), or set LOCAL_INFERENCE_SERVER_1=http://HOST:1234 \
         (and _2, _3, ... for more servers), as prompt-prix does"
    )]
    Missing { default: String, ignored: String },
}

/// Exit status of `prix-dispatch` when its configuration is unusable (`EX_CONFIG` of BSD's
/// sysexits.h), so a script can tell "fix the config" from a runtime failure (1).
pub const CONFIG_ERROR_EXIT: u8 = 78;

/// Environment variable naming the config file (second after `--config`).
pub const CONFIG_ENV: &str = "PRIX_DISPATCH_CONFIG";

/// Highest `LOCAL_INFERENCE_SERVER_N` looked at beyond a gap, to name what the gap ignores.
const LAST_NUMBERED: usize = 64;

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    /// How the source was chosen: `--config`, `PRIX_DISPATCH_CONFIG` or `the default location`
    /// for a file, the variables read for the environment (empty for configurations built in
    /// code).
    pub chosen_by: String,
    /// What the resolution saw and did not use, one phrase each (a lower-priority source that
    /// is also set, numbered variables past a gap): logged at every start so that nothing is
    /// dropped silently.
    pub ignored: Vec<String>,
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

/// The default config file inside a user's configuration directory.
pub fn default_file(config_dir: &Path) -> PathBuf {
    config_dir.join("prix-dispatch").join("config.toml")
}

/// The user's configuration directory where command-line tools keep theirs:
/// `$XDG_CONFIG_HOME`, else `~/.config` (also on macOS, as CLI tools do there; `%APPDATA%` on
/// Windows). Never the working directory: an agent host launches `stdio` from anywhere,
/// often `/`. `None` when no home directory is known.
pub fn user_config_dir() -> Option<PathBuf> {
    use etcetera::BaseStrategy;
    etcetera::choose_base_strategy()
        .ok()
        .map(|s| s.config_dir())
}

impl Config {
    /// Resolves and loads the configuration, in this order (the first that is given wins;
    /// whatever else is set is recorded in [`Config::ignored`]):
    ///
    /// 1. `explicit` (`--config`): it must exist;
    /// 2. `$PRIX_DISPATCH_CONFIG`: it must exist;
    /// 3. prompt-prix's `LOCAL_INFERENCE_SERVER_N` (or `LM_STUDIO_SERVER_N`) variables: set for
    ///    this launch, so they are more specific than a user-wide file;
    /// 4. the default file, [`default_file`] in [`user_config_dir`].
    ///
    /// A named file that is missing is an error, never a fallback.
    pub fn load(explicit: Option<&Path>, env: EnvLookup) -> Result<Config, ConfigError> {
        Self::resolve(explicit, env, user_config_dir().as_deref())
    }

    /// [`Config::load`] with the user's configuration directory given (tests).
    pub fn resolve(
        explicit: Option<&Path>,
        env: EnvLookup,
        config_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let default = config_dir.map(default_file);
        let default_shown = default.as_ref().map_or_else(
            || {
                "the default config file (unknown: neither XDG_CONFIG_HOME nor HOME is set)"
                    .to_string()
            },
            |p| p.display().to_string(),
        );
        let named = env(CONFIG_ENV).filter(|p| !p.trim().is_empty());
        let numbered = numbered_servers(env);
        let mut ignored = numbered.ignored.clone();
        let default_exists = default.as_ref().is_some_and(|p| p.is_file());
        let ignore_default = |ignored: &mut Vec<String>| {
            if default_exists {
                ignored.push(format!("the default file {default_shown}"));
            }
        };
        let ignore_numbered = |ignored: &mut Vec<String>| {
            if let Some(first) = numbered.urls.first() {
                ignored.push(format!(
                    "{} (and the rest of its numbered servers)",
                    first.0
                ));
            }
        };
        let named_file = |path: &Path, named_by: &'static str, ignored: Vec<String>| {
            if !path.exists() {
                return Err(ConfigError::NamedMissing {
                    path: path.to_path_buf(),
                    named_by,
                    default: default_shown.clone(),
                });
            }
            let mut config = Self::from_file(path, env)?;
            config.chosen_by = named_by.to_string();
            config.ignored = ignored;
            Ok(config)
        };
        if let Some(path) = explicit {
            if let Some(other) = &named {
                ignored.push(format!("{CONFIG_ENV}={other}"));
            }
            ignore_numbered(&mut ignored);
            ignore_default(&mut ignored);
            return named_file(path, "--config", ignored);
        }
        if let Some(path) = &named {
            ignore_numbered(&mut ignored);
            ignore_default(&mut ignored);
            return named_file(Path::new(path), CONFIG_ENV, ignored);
        }
        if let Some(mut config) = Self::from_numbered(env, &numbered)? {
            ignore_default(&mut ignored);
            config.ignored = ignored;
            return Ok(config);
        }
        match &default {
            Some(path) if default_exists => {
                let mut config = Self::from_file(path, env)?;
                config.chosen_by = "the default location".to_string();
                config.ignored = ignored;
                Ok(config)
            }
            _ => Err(ConfigError::Missing {
                default: default_shown,
                ignored: if ignored.is_empty() {
                    String::new()
                } else {
                    format!(" (ignored: {})", ignored.join("; "))
                },
            }),
        }
    }

    /// One line for the log and `check-config`: the source, how it was chosen, and what was
    /// set but not used.
    pub fn source_line(&self) -> String {
        let mut line = match (&self.source, self.chosen_by.is_empty()) {
            (ConfigSource::File(path), false) => {
                format!(
                    "configuration: {} (from {})",
                    path.display(),
                    self.chosen_by
                )
            }
            (ConfigSource::Environment, false) => {
                format!("configuration: environment variables {}", self.chosen_by)
            }
            (source, true) => format!("configuration: {source}"),
        };
        if self.ignored.is_empty() {
            line.push_str("; nothing else ignored");
        } else {
            line.push_str(&format!("; ignored: {}", self.ignored.join("; ")));
        }
        line
    }

    /// Logs [`Config::source_line`] once, as a warning when something set was ignored.
    pub fn log_source(&self) {
        if self.ignored.is_empty() {
            tracing::info!("{}", self.source_line());
        } else {
            tracing::warn!("{}", self.source_line());
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
        one_entry_per_server(
            &hosts,
            |i| format!("[[host]] #{} ({:?})", i + 1, hosts[i].name),
            "keep one entry, and set slots = N on it to run N requests there at once",
        )
        .map_err(&invalid)?;
        Ok(Config {
            source,
            chosen_by: String::new(),
            ignored: Vec::new(),
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
        let numbered = numbered_servers(env);
        let config = Self::from_numbered(env, &numbered)?;
        Ok(config.map(|mut c| {
            c.ignored = numbered.ignored;
            c
        }))
    }

    fn from_numbered(env: EnvLookup, numbered: &Numbered) -> Result<Option<Config>, ConfigError> {
        if numbered.urls.is_empty() {
            return Ok(None);
        }
        let global_key = env("LMSTUDIO_API_KEY").filter(|k| !k.is_empty());
        let mut hosts = Vec::with_capacity(numbered.urls.len());
        for (n, (var, url)) in numbered.urls.iter().enumerate() {
            let base_url = normalise_base_url(url).map_err(|why| ConfigError::Invalid {
                source_name: ConfigSource::Environment.to_string(),
                message: format!("{var}: {why}"),
            })?;
            let key = env(&format!("{var}_KEY"))
                .filter(|k| !k.is_empty())
                .or_else(|| global_key.clone());
            hosts.push(HostConfig {
                name: format!("server{}", n + 1),
                base_url,
                slots: 1,
                api_key: key.map(ApiKey::new),
                ..HostConfig::default()
            });
        }
        one_entry_per_server(
            &hosts,
            |i| numbered.urls[i].0.clone(),
            "set it once; to run N requests there at once, use a configuration file with one \
             [[host]] for it and slots = N (README, Configuration)",
        )
        .map_err(|message| ConfigError::Invalid {
            source_name: ConfigSource::Environment.to_string(),
            message,
        })?;
        let mut config = Config::with_hosts(ConfigSource::Environment, hosts);
        config.chosen_by = numbered
            .urls
            .iter()
            .map(|(var, _)| var.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Some(config))
    }
}

/// The numbered server variables as prompt-prix reads them, and what that reading skips.
#[derive(Debug, Clone, Default)]
struct Numbered {
    /// `(variable, url)` from `_1` up to the first gap.
    urls: Vec<(String, String)>,
    /// Variables that are set but not read, one phrase each.
    ignored: Vec<String>,
}

/// Reads `LOCAL_INFERENCE_SERVER_1..` (else the legacy `LM_STUDIO_SERVER_1..`) up to the first
/// unset or empty index, like prompt-prix, and names every variable that this leaves out (past
/// the gap, up to `_64`; the other prefix), so that a gap is warned about, not silent.
fn numbered_servers(env: EnvLookup) -> Numbered {
    const PREFIXES: [&str; 2] = ["LOCAL_INFERENCE_SERVER_", "LM_STUDIO_SERVER_"];
    let set = |var: &str| env(var).filter(|v| !v.trim().is_empty());
    let active = PREFIXES
        .iter()
        .copied()
        .find(|p| set(&format!("{p}1")).is_some());
    let mut numbered = Numbered::default();
    let set_from = |prefix: &str, first: usize| -> Vec<String> {
        (first..=LAST_NUMBERED)
            .map(|i| format!("{prefix}{i}"))
            .filter(|var| set(var).is_some())
            .collect()
    };
    for prefix in PREFIXES {
        let (vars, why) = match active {
            Some(a) if a == prefix => {
                let mut n = 1;
                while let Some(url) = set(&format!("{prefix}{n}")) {
                    numbered.urls.push((format!("{prefix}{n}"), url));
                    n += 1;
                }
                let why = format!(
                    "{prefix}{n} is not set, and the numbering stops at the first gap, as in prompt-prix"
                );
                (set_from(prefix, n + 1), why)
            }
            // The other prefix is left out as a whole, its `_1` included.
            Some(a) => (
                set_from(prefix, 1),
                format!("only one naming is read, and {a}1 is set"),
            ),
            None => (
                set_from(prefix, 2),
                format!("the numbering starts at {prefix}1, which is not set"),
            ),
        };
        if !vars.is_empty() {
            numbered
                .ignored
                .push(format!("{} ({why})", vars.join(", ")));
        }
    }
    numbered
}

impl Config {
    /// All defaults around these hosts (tests, the demo, the environment fallback).
    pub fn with_hosts(source: ConfigSource, hosts: Vec<HostConfig>) -> Config {
        Config {
            source,
            chosen_by: String::new(),
            ignored: Vec::new(),
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
    // An endpoint pasted in place of the server (what a client's docs show): refused with the
    // form that works, rather than calling `.../v1/chat/completions/v1/models` at every probe.
    let path = parsed.path().trim_end_matches('/');
    for endpoint in [
        "/chat/completions",
        "/completions",
        "/models",
        "/embeddings",
    ] {
        if let Some(base_path) = path.strip_suffix(endpoint) {
            let mut base = parsed.clone();
            base.set_path(base_path.strip_suffix("/v1").unwrap_or(base_path));
            return Err(format!(
                "{trimmed:?} is an endpoint ({endpoint}), not the server's base URL; write {:?}",
                base.as_str().trim_end_matches('/')
            ));
        }
    }
    let mut base = trimmed.trim_end_matches('/').to_string();
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped.trim_end_matches('/').to_string();
    }
    Ok(base)
}

/// Refuses two entries for one server ([`host_identity`]: the same address and port however
/// written, `/v1` or not): each entry gets its own slots, so the server would be sent two
/// requests at once while it has one slot. `label(i)` names entry `i` in the message; `fix`
/// says what to write instead in this kind of source.
fn one_entry_per_server(
    hosts: &[HostConfig],
    label: impl Fn(usize) -> String,
    fix: &str,
) -> Result<(), String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, host) in hosts.iter().enumerate() {
        let identity = host.identity();
        if let Some(&first) = seen.get(&identity) {
            return Err(format!(
                "{} and {} are one server ({identity}): each entry would get its own slots, so \
                 that server would be sent two requests at once; {fix}",
                label(first),
                label(i)
            ));
        }
        seen.insert(identity, i);
    }
    Ok(())
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

    /// A fresh directory for one test: a user configuration directory, files named by
    /// `--config` / `PRIX_DISPATCH_CONFIG`.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prix-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_host(path: &Path, url: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("[[host]]\nname = \"a\"\nurl = \"{url}\"\n")).unwrap();
    }

    fn vars(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> + use<> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    /// Each resolution case of issue 14: which source wins, what is an error, and what the
    /// one source line says was ignored.
    #[test]
    fn the_source_is_resolved_in_order_and_names_what_it_ignored() {
        let dir = scratch("resolve");
        let home = dir.join("xdg");
        let default = default_file(&home);
        let named = dir.join("named.toml");
        let explicit = dir.join("explicit.toml");
        write_host(&named, "http://named:1");
        write_host(&explicit, "http://explicit:1");
        let var = |k: &'static str, v: &str| (k, v.to_string());

        // Nothing at all: the error says where the file is expected and the two ways. The
        // working directory of this test holds config/prix-dispatch.toml: never read.
        assert!(Path::new("config/prix-dispatch.toml").exists());
        let err = Config::resolve(None, &no_env, Some(&home)).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { .. }), "{err}");
        let msg = err.to_string();
        for needle in [
            default.to_str().unwrap(),
            "LOCAL_INFERENCE_SERVER_1=http://HOST:1234",
            "--config FILE",
            "PRIX_DISPATCH_CONFIG",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        let msg = Config::resolve(None, &no_env, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("neither XDG_CONFIG_HOME nor HOME"), "{msg}");

        // The default file alone.
        write_host(&default, "http://default:1");
        let c = Config::resolve(None, &no_env, Some(&home)).unwrap();
        assert_eq!(c.source, ConfigSource::File(default.clone()));
        assert_eq!(
            c.source_line(),
            format!(
                "configuration: {} (from the default location); nothing else ignored",
                default.display()
            )
        );

        // The variables of this launch beat the user-wide default file, which is named.
        let env = vars(&[var("LOCAL_INFERENCE_SERVER_1", "http://127.0.0.1:31234")]);
        let c = Config::resolve(None, &env, Some(&home)).unwrap();
        assert_eq!(c.source, ConfigSource::Environment);
        assert_eq!(c.hosts[0].base_url, "http://127.0.0.1:31234");
        assert_eq!(
            c.source_line(),
            format!(
                "configuration: environment variables LOCAL_INFERENCE_SERVER_1; ignored: the \
                 default file {}",
                default.display()
            )
        );

        // A gap: _1 and _3 without _2 reads _1 and names _3 and the gap.
        let env = vars(&[
            var("LOCAL_INFERENCE_SERVER_1", "http://a:1"),
            var("LOCAL_INFERENCE_SERVER_3", "http://c:1"),
            var("LOCAL_INFERENCE_SERVER_5", "http://e:1"),
        ]);
        let c = Config::resolve(None, &env, Some(&dir.join("empty"))).unwrap();
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(
            c.ignored,
            [
                "LOCAL_INFERENCE_SERVER_3, LOCAL_INFERENCE_SERVER_5 (LOCAL_INFERENCE_SERVER_2 is \
              not set, and the numbering stops at the first gap, as in prompt-prix)"
            ]
        );
        assert!(
            c.source_line()
                .contains("ignored: LOCAL_INFERENCE_SERVER_3")
        );

        // No _1: nothing is read, and the error names what was set.
        let env = vars(&[var("LOCAL_INFERENCE_SERVER_2", "http://b:1")]);
        let msg = Config::resolve(None, &env, Some(&dir.join("empty")))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(
                "LOCAL_INFERENCE_SERVER_2 (the numbering starts at LOCAL_INFERENCE_SERVER_1"
            ),
            "{msg}"
        );

        // The legacy names are left out when the new ones are set.
        let env = vars(&[
            var("LOCAL_INFERENCE_SERVER_1", "http://a:1"),
            var("LM_STUDIO_SERVER_1", "http://old:1"),
        ]);
        let c = Config::resolve(None, &env, Some(&dir.join("empty"))).unwrap();
        assert_eq!(c.hosts.len(), 1);
        assert!(
            c.ignored[0].starts_with("LM_STUDIO_SERVER_1 (only one naming"),
            "{:?}",
            c.ignored
        );

        // PRIX_DISPATCH_CONFIG beats the variables and the default; missing, it is an error,
        // never a fallback.
        let env = vars(&[
            var("PRIX_DISPATCH_CONFIG", named.to_str().unwrap()),
            var("LOCAL_INFERENCE_SERVER_1", "http://a:1"),
        ]);
        let c = Config::resolve(None, &env, Some(&home)).unwrap();
        assert_eq!(c.hosts[0].base_url, "http://named:1");
        assert_eq!(c.chosen_by, "PRIX_DISPATCH_CONFIG");
        assert_eq!(c.ignored.len(), 2, "{:?}", c.ignored);
        assert!(
            c.ignored[0].starts_with("LOCAL_INFERENCE_SERVER_1"),
            "{:?}",
            c.ignored
        );
        assert!(
            c.ignored[1].starts_with("the default file"),
            "{:?}",
            c.ignored
        );
        let env = vars(&[
            var("PRIX_DISPATCH_CONFIG", "/tmp/prix-nope/nope.toml"),
            var("LOCAL_INFERENCE_SERVER_1", "http://a:1"),
        ]);
        let err = Config::resolve(None, &env, Some(&home)).unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::NamedMissing {
                    named_by: "PRIX_DISPATCH_CONFIG",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("/tmp/prix-nope/nope.toml"),
            "{err}"
        );

        // --config beats everything, and names the rest.
        let env = vars(&[
            var("PRIX_DISPATCH_CONFIG", named.to_str().unwrap()),
            var("LOCAL_INFERENCE_SERVER_1", "http://a:1"),
        ]);
        let c = Config::resolve(Some(&explicit), &env, Some(&home)).unwrap();
        assert_eq!(c.hosts[0].base_url, "http://explicit:1");
        assert_eq!(c.chosen_by, "--config");
        assert_eq!(c.ignored.len(), 3, "{:?}", c.ignored);
        assert!(
            c.source_line()
                .contains(&format!("PRIX_DISPATCH_CONFIG={}", named.display()))
        );
        let err = Config::resolve(Some(Path::new("/tmp/prix-nope/x.toml")), &env, Some(&home))
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::NamedMissing {
                    named_by: "--config",
                    ..
                }
            ),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
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
        let err = normalise_base_url("http://h:1234/v1/chat/completions").unwrap_err();
        assert!(
            err.contains("not the server's base URL; write \"http://h:1234\""),
            "{err}"
        );
        let err = normalise_base_url("https://gpu/proxy/v1/models/").unwrap_err();
        assert!(err.contains("write \"https://gpu/proxy\""), "{err}");
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
            matches!(c, Err(ConfigError::NamedMissing { .. })),
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
