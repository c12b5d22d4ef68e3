//! Which hosts a daemon schedules, from which configuration sources, and what it answers a
//! launch that brings its own. Pure: no I/O, so every join, reload and refusal is a unit test.
//!
//! A daemon's fleet is the union of its sources: the configuration it started with, plus
//! (for a daemon a launch started) every other source a later launch brought. The thing that
//! must have exactly one owner is the host, identified by [`crate::config::host_identity`],
//! not the configuration text: two sources that list the same server share it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigSource, EnvLookup, HostConfig, host_identity};
use crate::task::ApiKey;

/// One host as a source lists it; sent by a launch over the daemon's private socket.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceHost {
    pub name: String,
    pub base_url: String,
    pub slots: usize,
    pub api_key: Option<String>,
    #[serde(default = "one")]
    pub max_loaded_models: usize,
    /// Configured load time, in seconds.
    #[serde(default = "default_load_seconds")]
    pub load_seconds: f64,
}

fn one() -> usize {
    1
}

fn default_load_seconds() -> f64 {
    crate::scheduler::state::DEFAULT_LOAD.as_secs_f64()
}

impl fmt::Debug for SourceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHost")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("slots", &self.slots)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl SourceHost {
    pub fn identity(&self) -> String {
        host_identity(&self.base_url)
    }
}

/// The hosts of one configuration source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFleet {
    /// What makes two launches the same source: `file:<absolute path>`, or `environment:`
    /// and the identities its variables list (two prompt-prix launches with the same servers
    /// are one source; with other servers, two).
    pub key: String,
    /// For people: the file's path, or "environment (LOCAL_INFERENCE_SERVER_N)".
    pub source: String,
    /// The file to watch and re-read, for a file source.
    pub file: Option<PathBuf>,
    pub hosts: Vec<SourceHost>,
    /// The environment variables the launch's configuration looked up and found (an
    /// `api_key_env` that exists only in that launch's environment): the daemon falls back
    /// on them, after its own environment, when it re-reads the file.
    #[serde(default)]
    pub env: LaunchEnv,
}

/// Environment variables (name → value) a launch's configuration read. Values are keys:
/// Debug shows the names only.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LaunchEnv(pub BTreeMap<String, String>);

impl fmt::Debug for LaunchEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl LaunchEnv {
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// Wraps an [`EnvLookup`] to record what it finds, so a launch can send the variables its
/// configuration used along with it (see [`SourceFleet::env`]).
pub struct RecordingEnv<'a> {
    inner: EnvLookup<'a>,
    found: RefCell<BTreeMap<String, String>>,
}

impl<'a> RecordingEnv<'a> {
    pub fn new(inner: EnvLookup<'a>) -> Self {
        RecordingEnv {
            inner,
            found: RefCell::default(),
        }
    }

    /// Looks `name` up, remembering its value when it is set.
    pub fn lookup(&self, name: &str) -> Option<String> {
        let value = (self.inner)(name);
        if let Some(v) = &value {
            self.found.borrow_mut().insert(name.to_string(), v.clone());
        }
        value
    }

    pub fn into_env(self) -> LaunchEnv {
        LaunchEnv(self.found.into_inner())
    }
}

impl SourceFleet {
    /// The hosts of a loaded configuration. A relative file path is made absolute against
    /// the working directory now, so that the key means the same file in every process.
    pub fn from_config(config: &Config) -> SourceFleet {
        let hosts: Vec<SourceHost> = config
            .hosts
            .iter()
            .map(|h| SourceHost {
                name: h.name.clone(),
                base_url: h.base_url.clone(),
                slots: h.slots,
                api_key: h.api_key.as_ref().map(|k| k.expose().to_string()),
                max_loaded_models: h.max_loaded_models,
                load_seconds: h.load.as_secs_f64(),
            })
            .collect();
        match &config.source {
            ConfigSource::File(path) => {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                SourceFleet {
                    key: format!("file:{}", path.display()),
                    source: path.display().to_string(),
                    file: Some(path),
                    hosts,
                    env: LaunchEnv::default(),
                }
            }
            ConfigSource::Environment => {
                let ids: BTreeSet<String> = hosts.iter().map(SourceHost::identity).collect();
                SourceFleet {
                    key: format!(
                        "environment:{}",
                        ids.into_iter().collect::<Vec<_>>().join(",")
                    ),
                    source: ConfigSource::Environment.to_string(),
                    file: None,
                    hosts,
                    env: LaunchEnv::default(),
                }
            }
        }
    }

    /// The same source, re-read with the environment `env` its launch recorded.
    pub fn with_env(self, env: LaunchEnv) -> SourceFleet {
        SourceFleet { env, ..self }
    }

    fn identities(&self) -> BTreeSet<String> {
        self.hosts.iter().map(SourceHost::identity).collect()
    }
}

/// A daemon's sources, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    sources: Vec<SourceFleet>,
}

/// What a daemon does with a launch that brings `incoming`.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every host is already scheduled here: serve the launch. `warnings` name settings that
    /// differ between the sources (the daemon's apply).
    Join { warnings: Vec<Warning> },
    /// Switch to `next` (take the new hosts, or the newer version of the same source), then
    /// serve the launch.
    Reload { next: Fleet, warnings: Vec<Warning> },
    /// Hosts are missing here and this daemon does not extend its fleet (started by hand).
    Refuse {
        /// Hosts of the launch this daemon schedules.
        shared: Vec<String>,
        /// Hosts of the launch it does not.
        missing: Vec<String>,
    },
}

/// A setting two sources disagree on, for one host; logged once per (source, host).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Warning {
    pub source_key: String,
    pub identity: String,
    pub message: String,
}

impl Fleet {
    pub fn new(first: SourceFleet) -> Fleet {
        Fleet {
            sources: vec![first],
        }
    }

    pub fn sources(&self) -> &[SourceFleet] {
        &self.sources
    }

    /// The hosts scheduled: each identity once, as its oldest source lists it, in source
    /// order. Names are made unique (a later duplicate gets `-2`, `-3`, …).
    pub fn hosts(&self) -> Vec<HostConfig> {
        self.effective()
            .into_iter()
            .map(|h| HostConfig {
                name: h.name,
                base_url: h.base_url,
                slots: h.slots,
                api_key: h.api_key.map(ApiKey::new),
                max_loaded_models: h.max_loaded_models,
                load: std::time::Duration::from_secs_f64(h.load_seconds.clamp(0.0, 1e9)),
            })
            .collect()
    }

    fn effective(&self) -> Vec<SourceHost> {
        let mut seen = HashSet::new();
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for host in self.sources.iter().flat_map(|s| &s.hosts) {
            if !seen.insert(host.identity()) {
                continue;
            }
            let mut name = host.name.clone();
            let mut n = 2;
            while !names.insert(name.clone()) {
                name = format!("{}-{n}", host.name);
                n += 1;
            }
            out.push(SourceHost {
                name,
                ..host.clone()
            });
        }
        out
    }

    /// Every host identity scheduled.
    pub fn identities(&self) -> BTreeSet<String> {
        self.sources
            .iter()
            .flat_map(SourceFleet::identities)
            .collect()
    }

    /// The files to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        self.sources.iter().filter_map(|s| s.file.clone()).collect()
    }

    /// The same fleet with `incoming` in place of the source with its key (kept in its
    /// place), or added last.
    pub fn with_source(&self, incoming: SourceFleet) -> Fleet {
        let mut next = self.clone();
        match next.sources.iter_mut().find(|s| s.key == incoming.key) {
            Some(existing) => *existing = incoming,
            None => next.sources.push(incoming),
        }
        next
    }

    /// What to do with a launch. `extends`: this daemon was started by a launch, so it takes
    /// new hosts and newer versions of its sources; a daemon started by hand keeps the fleet
    /// its own file says.
    pub fn admit(&self, incoming: &SourceFleet, extends: bool) -> Verdict {
        let known = self.identities();
        let same_source = self.sources.iter().any(|s| s.key == incoming.key);
        if extends && (same_source || !incoming.identities().is_subset(&known)) {
            let next = self.with_source(incoming.clone());
            if next.effective() == self.effective() {
                return Verdict::Join {
                    warnings: self.differences(incoming),
                };
            }
            let warnings = next.differences(incoming);
            return Verdict::Reload { next, warnings };
        }
        let (shared, missing): (Vec<String>, Vec<String>) = incoming
            .hosts
            .iter()
            .map(|h| h.base_url.clone())
            .partition(|url| known.contains(&host_identity(url)));
        if missing.is_empty() {
            Verdict::Join {
                warnings: self.differences(incoming),
            }
        } else {
            Verdict::Refuse { shared, missing }
        }
    }

    /// Settings of `incoming` that differ from what this fleet schedules for the same host.
    fn differences(&self, incoming: &SourceFleet) -> Vec<Warning> {
        let mut out = Vec::new();
        for host in &incoming.hosts {
            let identity = host.identity();
            let Some((source, ours)) = self.sources.iter().find_map(|s| {
                s.hosts
                    .iter()
                    .find(|h| h.identity() == identity)
                    .map(|h| (s, h))
            }) else {
                continue;
            };
            if source.key == incoming.key {
                continue;
            }
            let mut differs = Vec::new();
            if ours.slots != host.slots {
                differs.push(format!("slots {} there, {} here", host.slots, ours.slots));
            }
            if ours.api_key != host.api_key {
                differs.push("another api key there".to_string());
            }
            if differs.is_empty() {
                continue;
            }
            out.push(Warning {
                source_key: incoming.key.clone(),
                identity: identity.clone(),
                message: format!(
                    "{} is listed by {} and by {} with different settings ({}); the daemon \
                     schedules it as {} says. Make the two agree to silence this",
                    host.base_url,
                    incoming.source,
                    source.source,
                    differs.join("; "),
                    source.source
                ),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(url: &str, slots: usize, key: Option<&str>) -> SourceHost {
        SourceHost {
            name: format!("h{}", url.len() + slots),
            base_url: url.into(),
            slots,
            api_key: key.map(String::from),
            max_loaded_models: 1,
            load_seconds: 30.0,
        }
    }

    fn file(path: &str, hosts: Vec<SourceHost>) -> SourceFleet {
        SourceFleet {
            key: format!("file:{path}"),
            source: path.into(),
            file: Some(path.into()),
            hosts,
            env: LaunchEnv::default(),
        }
    }

    fn env(hosts: Vec<SourceHost>) -> SourceFleet {
        SourceFleet {
            key: "environment:x".into(),
            source: "environment".into(),
            file: None,
            hosts,
            env: LaunchEnv::default(),
        }
    }

    #[test]
    fn the_same_hosts_from_another_source_join_whatever_the_url_spelling() {
        let fleet = Fleet::new(file(
            "/a.toml",
            vec![host("http://127.0.0.1:1234", 1, None)],
        ));
        let launch = env(vec![host("http://localhost:1234", 1, None)]);
        for extends in [true, false] {
            assert_eq!(
                fleet.admit(&launch, extends),
                Verdict::Join { warnings: vec![] }
            );
        }
    }

    #[test]
    fn differing_slots_or_keys_join_with_a_warning_naming_both_sources() {
        let fleet = Fleet::new(file("/a.toml", vec![host("http://gpu:1234", 1, Some("k"))]));
        let launch = env(vec![host("http://gpu:1234/v1", 2, None)]);
        let Verdict::Join { warnings } = fleet.admit(&launch, true) else {
            panic!("expected a join");
        };
        assert_eq!(warnings.len(), 1);
        let m = &warnings[0].message;
        assert!(m.contains("/a.toml") && m.contains("environment"), "{m}");
        assert!(
            m.contains("slots 2 there, 1 here") && m.contains("api key"),
            "{m}"
        );
        assert_eq!(fleet.hosts()[0].slots, 1, "the daemon's setting applies");
    }

    #[test]
    fn a_launched_daemon_takes_new_hosts_and_keeps_its_old_ones() {
        let fleet = Fleet::new(file("/a.toml", vec![host("http://gpu:1", 1, None)]));
        let launch = env(vec![
            host("http://gpu:1", 1, None),
            host("http://gpu:2", 1, None),
        ]);
        let Verdict::Reload { next, .. } = fleet.admit(&launch, true) else {
            panic!("expected a reload");
        };
        let urls: Vec<String> = next.hosts().into_iter().map(|h| h.base_url).collect();
        assert_eq!(urls, ["http://gpu:1", "http://gpu:2"]);
    }

    #[test]
    fn a_newer_version_of_the_same_source_replaces_it() {
        let fleet = Fleet::new(file("/a.toml", vec![host("http://gpu:1", 1, None)]));
        let edited = file(
            "/a.toml",
            vec![host("http://gpu:1", 2, None), host("http://gpu:3", 1, None)],
        );
        let Verdict::Reload { next, warnings } = fleet.admit(&edited, true) else {
            panic!("expected a reload");
        };
        assert!(warnings.is_empty());
        let hosts = next.hosts();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].slots, 2, "the edit applies");
        // A host removed from the file leaves.
        let shrunk = file("/a.toml", vec![host("http://gpu:3", 1, None)]);
        let Verdict::Reload { next, .. } = next.admit(&shrunk, true) else {
            panic!("expected a reload");
        };
        assert_eq!(next.hosts().len(), 1);
    }

    #[test]
    fn a_daemon_started_by_hand_refuses_hosts_it_does_not_have() {
        let fleet = Fleet::new(file("/serve.toml", vec![host("http://gpu:1", 1, None)]));
        let launch = file(
            "/other.toml",
            vec![host("http://gpu:1", 1, None), host("http://gpu:2", 1, None)],
        );
        assert_eq!(
            fleet.admit(&launch, false),
            Verdict::Refuse {
                shared: vec!["http://gpu:1".into()],
                missing: vec!["http://gpu:2".into()],
            }
        );
    }

    #[test]
    fn the_union_keeps_names_unique() {
        let a = file(
            "/a.toml",
            vec![SourceHost {
                name: "gpu".into(),
                ..host("http://x:1", 1, None)
            }],
        );
        let b = env(vec![SourceHost {
            name: "gpu".into(),
            ..host("http://x:2", 1, None)
        }]);
        let names: Vec<String> = Fleet::new(a)
            .with_source(b)
            .hosts()
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["gpu", "gpu-2"]);
    }

    #[test]
    fn keys_never_show_in_debug() {
        let s = format!("{:?}", host("http://x:1", 1, Some("s3cret")));
        assert!(!s.contains("s3cret"));
        let mut source = file("/a.toml", vec![]);
        source.env.0.insert("GPU_KEY".into(), "s3cret".into());
        let s = format!("{source:?}");
        assert!(s.contains("GPU_KEY") && !s.contains("s3cret"), "{s}");
    }

    #[test]
    fn a_launch_records_the_variables_its_configuration_found() {
        let lookup = |name: &str| (name == "GPU_KEY").then(|| "k".to_string());
        let recording = RecordingEnv::new(&lookup);
        assert_eq!(recording.lookup("GPU_KEY").as_deref(), Some("k"));
        assert_eq!(recording.lookup("UNSET"), None);
        let env = recording.into_env();
        assert_eq!(env.0.len(), 1, "only what was found: {env:?}");
        assert_eq!(env.get("GPU_KEY").as_deref(), Some("k"));
        // An older launch (no env field) still parses.
        let old = r#"{"key":"file:/a.toml","source":"/a.toml","file":"/a.toml","hosts":[]}"#;
        let parsed: SourceFleet = serde_json::from_str(old).unwrap();
        assert!(parsed.env.0.is_empty());
    }
}
