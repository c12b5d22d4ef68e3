//! Shared test support: simulated hosts on loopback and a dispatcher pointed at them.
#![allow(dead_code)]

pub mod clients;
pub mod real;
pub mod tasks;

use std::path::PathBuf;
use std::time::Duration;

use prix_dispatch::config::{Config, ConfigSource, HostConfig, QueueSettings};
use prix_dispatch::sim::{Behaviour, RequestRecord, SimConfig, SimHost};
use prix_dispatch::task::{ApiKey, TaskSpec};
use prix_dispatch::{CompletionRequest, DispatchStatus, Dispatcher};
use serde_json::{Value, json};

pub struct Killed {
    pub addr: std::net::SocketAddr,
    pub config: SimConfig,
}

pub struct Fleet {
    pub sims: Vec<SimHost>,
    pub dispatcher: Dispatcher,
}

/// One simulated host: its models, slots, behaviour and optional key.
pub struct HostPlan {
    pub models: Vec<&'static str>,
    pub slots: usize,
    pub sim: SimConfig,
    pub api_key: Option<&'static str>,
}

pub fn host(models: &[&'static str]) -> HostPlan {
    HostPlan {
        models: models.to_vec(),
        slots: 1,
        sim: SimConfig::default(),
        api_key: None,
    }
}

impl HostPlan {
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n;
        self
    }
    pub fn behaviour(mut self, b: Behaviour) -> Self {
        self.sim.default = b;
        self
    }
    pub fn sim(mut self, f: impl FnOnce(&mut SimConfig)) -> Self {
        f(&mut self.sim);
        self
    }
    pub fn key(mut self, key: &'static str) -> Self {
        self.api_key = Some(key);
        self
    }
}

/// Default behaviour for tests: a few fast tokens.
pub fn quick(tokens: usize, interval_ms: u64) -> Behaviour {
    Behaviour {
        tokens,
        token_interval_ms: interval_ms,
        ..Behaviour::default()
    }
}

impl Fleet {
    pub async fn start(plans: Vec<HostPlan>) -> Fleet {
        Self::start_with(plans, QueueSettings::default()).await
    }

    pub async fn start_with(plans: Vec<HostPlan>, queue: QueueSettings) -> Fleet {
        Self::start_tuned(plans, |config| config.queue = queue).await
    }

    /// Starts the hosts, then the dispatcher with `tune` applied to its configuration.
    pub async fn start_tuned(plans: Vec<HostPlan>, tune: impl FnOnce(&mut Config)) -> Fleet {
        let mut sims = Vec::new();
        let mut hosts = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            let mut sim_config = plan.sim;
            sim_config.models = plan.models.iter().map(|m| m.to_string()).collect();
            let sim = SimHost::start(sim_config).await.expect("sim starts");
            hosts.push(HostConfig {
                name: format!("gpu{i}"),
                base_url: sim.url(),
                slots: plan.slots,
                api_key: plan.api_key.map(ApiKey::new),
                ..HostConfig::default()
            });
            sims.push(sim);
        }
        let mut config = Config::with_hosts(ConfigSource::Environment, hosts);
        tune(&mut config);
        let dispatcher = Dispatcher::start(&config);
        Fleet { sims, dispatcher }
    }

    /// Kills host `i` (port closed, connections cut), as a rebooting workstation.
    pub async fn kill(&mut self, i: usize) -> Killed {
        let placeholder = SimHost::start(SimConfig::with_models(Vec::<String>::new()))
            .await
            .expect("sim starts");
        let host = std::mem::replace(&mut self.sims[i], placeholder);
        let killed = Killed {
            addr: host.addr(),
            config: host.config(),
        };
        host.shutdown().await;
        killed
    }

    /// Starts host `i` again on the same address, fresh (no records).
    pub async fn revive(&mut self, i: usize, killed: Killed) {
        let host = SimHost::start_on(killed.addr, killed.config)
            .await
            .expect("the port is free again");
        let placeholder = std::mem::replace(&mut self.sims[i], host);
        placeholder.shutdown().await;
    }

    /// Polls the status until `check` holds, or panics with the last status after `limit`.
    pub async fn wait_status(
        &self,
        limit: Duration,
        check: impl Fn(&DispatchStatus) -> bool,
    ) -> DispatchStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.status().await;
            if check(&status) {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("status never reached the expected state: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn status(&self) -> DispatchStatus {
        self.dispatcher.status().await.expect("scheduler alive")
    }

    /// Waits until every slot is free again, or panics with the state after `limit`.
    pub async fn assert_all_slots_return(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.status().await;
            if status
                .hosts
                .iter()
                .all(|h| h.state.active == 0 && h.state.current_model.is_none())
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("slots did not return: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn chat_records(&self, host: usize) -> Vec<RequestRecord> {
        self.sims[host].chat_records()
    }

    pub async fn shutdown(self) {
        self.dispatcher.shutdown();
        for sim in self.sims {
            sim.shutdown().await;
        }
    }
}

/// A request with one user message; `extra` fields are merged into the tool parameters.
pub fn spec(model: &str, content: &str, extra: Value) -> TaskSpec {
    let mut body = json!({
        "model_id": model,
        "messages": [{"role": "user", "content": content}],
        "timeout_seconds": 10,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value::<CompletionRequest>(body)
        .expect("valid request")
        .into_spec()
        .expect("valid spec")
}

/// Checks from the hosts' own records that no host ever ran more than `slots` requests, or
/// two models, at once.
pub fn assert_host_invariants(records: &[RequestRecord], slots: usize) {
    for r in records {
        assert!(
            r.in_flight_at_start <= slots,
            "host had {} requests in flight (slots {slots}): {r:?}",
            r.in_flight_at_start
        );
        assert!(
            r.other_models_in_flight_at_start
                .iter()
                .all(|m| Some(m) == r.model.as_ref()),
            "host ran two models at once: {r:?}"
        );
    }
}

/// `serve` on 127.0.0.1:0 in this process, in front of `dispatcher`; stops when dropped.
pub struct HttpFront {
    pub base: String,
    stop: tokio_util::sync::CancellationToken,
}

impl HttpFront {
    pub async fn start(
        dispatcher: &Dispatcher,
        token: Option<&str>,
        max_request_bytes: usize,
    ) -> HttpFront {
        let options = prix_dispatch::http::HttpOptions {
            auth_token: token.map(str::to_string),
            max_request_bytes,
            ..Default::default()
        };
        Self::start_with(dispatcher, options).await
    }

    /// `serve` with the given options.
    pub async fn start_with(
        dispatcher: &Dispatcher,
        options: prix_dispatch::http::HttpOptions,
    ) -> HttpFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(prix_dispatch::http::serve(
            listener,
            dispatcher.clone(),
            options,
            stop.clone().cancelled_owned(),
        ));
        HttpFront { base, stop }
    }
}

impl Drop for HttpFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A port nothing listens on now (bound and released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where `.ci/run` caches what it installs: `$PRIX_CACHE`, else `~/.cache/prix-dispatch` —
/// the one rule `.ci/run`, `scripts/real-backend.sh` and the tests all follow, so a custom
/// cache given to `.ci/run` is the one a later `cargo test` reads.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("PRIX_CACHE"), std::env::var_os("HOME"))
}

/// [`cache_dir`] from the values of `PRIX_CACHE` and `HOME` (an empty one counts as unset,
/// as `${PRIX_CACHE:-...}` does in the scripts).
pub fn cache_dir_from(
    prix_cache: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    match prix_cache.filter(|p| !p.is_empty()) {
        Some(cache) => PathBuf::from(cache),
        None => home
            .filter(|h| !h.is_empty())
            .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
            .join(".cache/prix-dispatch"),
    }
}

/// A program or file `.ci/run` installs: `$var` when set, else its place `in_cache` under
/// [`cache_dir`]. Fails with what to run when it is missing.
pub fn installed(var: &str, in_cache: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(in_cache));
    assert!(
        path.exists(),
        "no {what} at {}: run `bash .ci/run` once (it installs it into $PRIX_CACHE, default \
         ~/.cache/prix-dispatch; run the tests with the same PRIX_CACHE), or set {var}",
        path.display()
    );
    path
}

/// Fetches `{base}/metrics` and returns its samples, parsed by [`samples`] (which asserts
/// every line is well formed).
pub async fn scrape(base: &str) -> Vec<(String, f64)> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    samples(&text)
}

/// Parses Prometheus text: every sample line is `name{labels} value`.
pub fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            let metric = name.split('{').next().unwrap();
            assert!(
                metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name in {l:?}"
            );
            (name.to_string(), value)
        })
        .collect()
}

/// The value of the sample named exactly `name` (labels included), 0 when absent.
pub fn sample(all: &[(String, f64)], name: &str) -> f64 {
    value(all, name).unwrap_or(0.0)
}

/// The value of the sample named exactly `name` (labels included), if it is there.
pub fn value(all: &[(String, f64)], name: &str) -> Option<f64> {
    all.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}
