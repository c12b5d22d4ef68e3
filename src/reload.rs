//! The running daemon's fleet: which hosts it owns, and how the fleet changes while it runs —
//! a launch that brings hosts, an edited configuration file, `SIGHUP` — without losing work.
//!
//! The manager holds the host locks ([`crate::ownership`]) for exactly the hosts the
//! dispatcher schedules, plus those of removed hosts until their running tasks finish, so no
//! other daemon can take a host while a request of ours may still be on it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::{self, Config, host_identity};
use crate::daemon_dir::DaemonDir;
use crate::dispatcher::{DispatchStatus, Dispatcher};
use crate::fleet::{Fleet, SourceFleet, Verdict};
use crate::ownership::{self, HostLock, Owner, OwnershipError};

/// The daemon's fleet and its host locks.
pub struct FleetManager {
    state: Mutex<State>,
    /// Apart from `state`, under a lock never held across an await: the process exits with
    /// `std::process::exit` (no destructor runs), so [`FleetManager::release_all`] must be
    /// able to take them at any moment, even while a reload awaits the dispatcher.
    held: std::sync::Mutex<Held>,
    /// How many times the files were re-read (for the log, and to see that nothing but a
    /// change re-reads them).
    rereads: std::sync::atomic::AtomicU64,
    dispatcher: Dispatcher,
    dir: DaemonDir,
    owner: Owner,
}

struct State {
    fleet: Fleet,
    /// (source key, host identity) pairs already warned about.
    warned: HashSet<(String, String)>,
    /// Reload refusals already logged.
    refused: Refusals,
}

/// The last refusal logged for each thing that can refuse a reload (a file, the switch
/// itself): each editor save and `SIGHUP` re-reads, and an error that did not change must
/// not fill the log on every one of them.
#[derive(Debug, Default)]
struct Refusals(HashMap<String, String>);

impl Refusals {
    /// Records `error` for `what`; true when it differs from the last one (log it).
    fn note(&mut self, what: &str, error: &str) -> bool {
        if self.0.get(what).is_some_and(|last| last == error) {
            return false;
        }
        self.0.insert(what.to_string(), error.to_string());
        true
    }

    /// `what` succeeded: its next refusal is news again.
    fn clear(&mut self, what: &str) {
        self.0.remove(what);
    }
}

#[derive(Default)]
struct Held {
    locks: HashMap<String, HostLock>,
    /// Locks of removed hosts, kept until their last running task is done.
    releasing: Vec<HostLock>,
}

/// What `prix-dispatch status` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub socket: PathBuf,
    /// "a stdio launch" or "by hand (serve)".
    pub started_by: String,
    /// The configuration sources, oldest first.
    pub sources: Vec<String>,
    pub status: serde_json::Value,
}

/// Takes every host of `fleet` for `owner`, or none: on the first host another daemon holds,
/// the locks taken so far are released and the error names that daemon.
pub fn acquire_all(
    dir: &DaemonDir,
    fleet: &Fleet,
    owner: &Owner,
) -> Result<HashMap<String, HostLock>, OwnershipError> {
    let mut locks = HashMap::new();
    for identity in fleet.identities() {
        let lock = ownership::acquire(dir, &identity, owner)?;
        locks.insert(identity, lock);
    }
    Ok(locks)
}

impl FleetManager {
    /// `locks` must hold every host of `fleet` (see [`acquire_all`]).
    pub fn new(
        fleet: Fleet,
        locks: HashMap<String, HostLock>,
        dispatcher: Dispatcher,
        dir: DaemonDir,
        owner: Owner,
    ) -> Arc<FleetManager> {
        Arc::new(FleetManager {
            state: Mutex::new(State {
                fleet,
                warned: HashSet::new(),
                refused: Refusals::default(),
            }),
            held: std::sync::Mutex::new(Held {
                locks,
                releasing: Vec::new(),
            }),
            rereads: Default::default(),
            dispatcher,
            dir,
            owner,
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Releases every host lock now (removing the lock files), without awaiting: for the
    /// exit path, which ends the process with `std::process::exit` so no destructor runs.
    /// The kernel would drop the locks anyway; this also removes the files, which would
    /// otherwise stay behind naming a dead pid.
    pub fn release_all(&self) {
        let mut held = self.held();
        let released = held.locks.len() + held.releasing.len();
        held.locks.clear();
        held.releasing.clear();
        if released > 0 {
            tracing::debug!(released, "host locks released");
        }
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// A launch brought `incoming`: `Ok` to serve it (after a reload if the verdict says so),
    /// `Err` with the message the launch shows its user.
    pub async fn admit(&self, incoming: &SourceFleet) -> Result<(), String> {
        let mut state = self.state.lock().await;
        match state.fleet.admit(incoming, self.owner.launched) {
            Verdict::Join { warnings } => {
                warn_once(&mut state, warnings);
                Ok(())
            }
            Verdict::Reload { next, warnings } => {
                warn_once(&mut state, warnings);
                self.apply(
                    &mut state,
                    next,
                    &format!("a launch from {}", incoming.source),
                )
                .await
            }
            Verdict::Refuse { shared, missing } => {
                Err(refusal(&self.owner, incoming, &shared, &missing))
            }
        }
    }

    /// Re-reads every file source (an edit was seen, or `SIGHUP`), each on its own: a file
    /// that no longer reads or parses is refused with the usual message (once per distinct
    /// error) and keeps the hosts it had, while the others apply. A file is read with the
    /// daemon's environment, then the variables its launch recorded.
    pub async fn reload_files(&self, why: &str) {
        let mut state = self.state.lock().await;
        let rereads = 1 + self
            .rereads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut next = state.fleet.clone();
        let sources: Vec<SourceFleet> = state.fleet.sources().to_vec();
        for source in sources {
            let Some(path) = &source.file else { continue };
            let what = path.display().to_string();
            let env = |name: &str| config::process_env(name).or_else(|| source.env.get(name));
            match Config::from_file(path, &env) {
                Ok(config) => {
                    state.refused.clear(&what);
                    next = next.with_source(
                        SourceFleet::from_config(&config).with_env(source.env.clone()),
                    );
                }
                Err(e) => {
                    if state.refused.note(&what, &e.to_string()) {
                        tracing::error!(error = %e, file = %what, "configuration reload refused for this file; it keeps its current hosts, the other sources apply. Fix the file (it is re-read when saved)");
                    }
                }
            }
        }
        if next == state.fleet {
            tracing::debug!(why, rereads, "configuration re-read: no change");
            return;
        }
        match self.apply(&mut state, next, why).await {
            Ok(()) => state.refused.clear(SWITCH),
            Err(e) => {
                if state.refused.note(SWITCH, &e) {
                    tracing::error!(error = %e, "configuration reload refused; the daemon keeps its current fleet");
                }
            }
        }
    }

    /// Switches to `next`: locks its new hosts first (all or none), then tells the dispatcher.
    /// New locks go into `held` at once (so an exit meanwhile releases them too) and are
    /// dropped again if the dispatcher refuses the change.
    async fn apply(&self, state: &mut State, next: Fleet, why: &str) -> Result<(), String> {
        let wanted = next.identities();
        let mut added = Vec::new();
        {
            let mut held = self.held();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|i| !held.locks.contains_key(*i))
                .cloned()
                .collect();
            for identity in missing {
                // A host removed a moment ago and listed again: its lock is still ours.
                let reused = held.releasing.iter().position(|l| l.identity() == identity);
                let lock = match reused {
                    Some(at) => held.releasing.swap_remove(at),
                    None => match ownership::acquire(&self.dir, &identity, &self.owner) {
                        Ok(lock) => lock,
                        Err(e) => {
                            undo(&mut held, &added);
                            return Err(format!(
                                "{e}; one host has one scheduler. Stop that daemon ({}) or remove \
                                 the host from one of the configurations",
                                e.stop_hint()
                            ));
                        }
                    },
                };
                held.locks.insert(identity.clone(), lock);
                added.push((identity, reused.is_some()));
            }
        }
        let change = match self.dispatcher.reconfigure(&next.hosts()).await {
            Ok(change) => change,
            Err(e) => {
                undo(&mut self.held(), &added);
                return Err(e.to_string());
            }
        };
        {
            let mut held = self.held();
            let gone: Vec<String> = held
                .locks
                .keys()
                .filter(|i| !wanted.contains(*i))
                .cloned()
                .collect();
            for identity in gone {
                if let Some(lock) = held.locks.remove(&identity) {
                    held.releasing.push(lock);
                }
            }
        }
        state.fleet = next;
        tracing::info!(
            why,
            added = ?change.added,
            removed = ?change.removed,
            changed = ?change.changed,
            "fleet reloaded"
        );
        Ok(())
    }

    /// Releases the locks of removed hosts whose running tasks are done. Call it now and
    /// then (the daemon does, every second).
    pub async fn release_finished(&self) {
        if self.held().releasing.is_empty() {
            return;
        }
        let Ok(status) = self.dispatcher.status().await else {
            return;
        };
        // A removed host stays in the status until its last task is done (and a host retired
        // after this snapshot is still listed in it): keep the lock of every listed host.
        let listed: HashSet<String> = status.hosts.iter().map(|h| host_identity(&h.url)).collect();
        self.held()
            .releasing
            .retain(|l| listed.contains(l.identity()));
    }

    /// The files this daemon's fleet comes from.
    pub async fn files(&self) -> Vec<PathBuf> {
        self.state.lock().await.fleet.files()
    }

    /// What `prix-dispatch status` prints.
    pub async fn info(&self) -> DaemonInfo {
        let sources = {
            let state = self.state.lock().await;
            state
                .fleet
                .sources()
                .iter()
                .map(|s| s.source.clone())
                .collect()
        };
        let status: Option<DispatchStatus> = self.dispatcher.status().await.ok();
        DaemonInfo {
            pid: self.owner.pid,
            socket: self.owner.socket.clone(),
            started_by: if self.owner.launched {
                "a stdio launch".into()
            } else {
                "by hand (serve)".into()
            },
            sources,
            status: serde_json::to_value(status).unwrap_or_default(),
        }
    }
}

/// Gives back the locks `apply` took for `added` (a failed switch takes no host): a fresh
/// lock is released, one taken back from `releasing` returns there (its host may still run
/// a task of ours).
fn undo(held: &mut Held, added: &[(String, bool)]) {
    for (identity, from_releasing) in added {
        if let Some(lock) = held.locks.remove(identity)
            && *from_releasing
        {
            held.releasing.push(lock);
        }
    }
}

/// What a launch is told when this daemon, started by hand, lacks some of its hosts.
fn refusal(owner: &Owner, incoming: &SourceFleet, shared: &[String], missing: &[String]) -> String {
    let stop = ownership::stop_command(&owner.socket);
    if shared.is_empty() {
        // The launch came to this daemon's socket without sharing a host with it.
        format!(
            "the prix-dispatch daemon (pid {}, configuration {}) at this launch's socket was \
             started by hand and schedules none of the hosts of {} ({}); it takes no hosts from \
             launches. Add them to {} (it reloads by itself), give {} another [server] socket so \
             that it gets a daemon of its own, or stop that daemon with {stop} and launch again",
            owner.pid,
            owner.source,
            incoming.source,
            missing.join(", "),
            owner.source,
            incoming.source,
        )
    } else {
        format!(
            "the prix-dispatch daemon (pid {}, configuration {}) already schedules {} and was \
             started by hand, so it does not take the other hosts of {} ({}). Add them to {} \
             (it reloads by itself), or stop it with {stop} and launch again",
            owner.pid,
            owner.source,
            shared.join(", "),
            incoming.source,
            missing.join(", "),
            owner.source,
        )
    }
}

/// The key in [`Refusals`] of a switch the files asked for but that could not be made.
const SWITCH: &str = "(switch)";

/// Whether a file event can mean new content: created, written, renamed, removed. Not an
/// open, a read or a close after reading — the daemon's own reads cause those, and reacting
/// to them re-read the files forever — nor a change of metadata only (`touch`, `chmod`).
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

impl DaemonInfo {
    /// What `prix-dispatch status` prints (without `--json`).
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let info = self;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "daemon: pid {} (started {})",
            info.pid, info.started_by
        );
        let _ = writeln!(out, "socket: {}", info.socket.display());
        let _ = writeln!(out, "configuration: {}", info.sources.join(" + "));
        let status = &info.status;
        if let Some(hosts) = status["hosts"].as_array() {
            let _ = writeln!(out, "hosts ({}):", hosts.len());
            for h in hosts {
                // Slots busy with requests sent by others (another dispatcher, a person) are
                // taken too: without them a full host would look idle.
                let elsewhere = match h["busy_elsewhere"].as_u64().unwrap_or(0) {
                    0 => String::new(),
                    n => format!(" (+{n} from elsewhere)"),
                };
                let resident: Vec<&str> = h["resident_models"]
                    .as_array()
                    .map(|m| m.iter().filter_map(serde_json::Value::as_str).collect())
                    .unwrap_or_default();
                let resident = if resident.is_empty() {
                    String::new()
                } else {
                    format!("  in memory: {}", resident.join(", "))
                };
                let _ = writeln!(
                    out,
                    "  {:<12} {}  {}  {}/{} slots busy{elsewhere}{resident}{}",
                    h["name"].as_str().unwrap_or("?"),
                    h["url"].as_str().unwrap_or("?"),
                    h["health"].as_str().unwrap_or("?"),
                    h["active"].as_u64().unwrap_or(0),
                    h["slots"].as_u64().unwrap_or(0),
                    if h["retired"].as_bool() == Some(true) {
                        "  (removed: finishing its running tasks)"
                    } else {
                        ""
                    }
                );
            }
        }
        let _ = writeln!(
            out,
            "queue: {} waiting {}",
            status["queued_total"].as_u64().unwrap_or(0),
            status["queue"]
        );
        if let Some(clients) = status["clients"].as_array() {
            let _ = writeln!(out, "clients ({}):", clients.len());
            for c in clients {
                // An HTTP client has no process the daemon knows of: no pid is shown.
                let pid = c["pid"]
                    .as_u64()
                    .map_or_else(String::new, |pid| format!(" pid {pid}"));
                let _ = writeln!(
                    out,
                    "  {} {}{pid}: {} queued, {} running",
                    c["transport"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("(unnamed)"),
                    c["queued"],
                    c["running"]
                );
            }
        }
        out
    }
}

fn warn_once(state: &mut State, warnings: Vec<crate::fleet::Warning>) {
    for w in warnings {
        if state
            .warned
            .insert((w.source_key.clone(), w.identity.clone()))
        {
            tracing::warn!("{}", w.message);
        }
    }
}

/// Watches the fleet's files and reloads on every change (editors often replace the file, so
/// the directory is watched, not the file), and on `SIGHUP`. Runs until the process ends.
pub async fn watch(manager: Arc<FleetManager>) {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watched_names: Arc<std::sync::Mutex<HashSet<PathBuf>>> = Arc::default();
    let names = watched_names.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !changes_content(&event.kind) {
            return;
        }
        let names = names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if event.paths.iter().any(|p| names.contains(p)) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP (kill -HUP <pid>)");
            None
        }
    };
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Watch the directory of every file the fleet comes from (the set grows with launches).
        let files = manager.files().await;
        if let Some(w) = watcher.as_mut() {
            let mut names = watched_names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            names.extend(files.iter().cloned());
            for dir in files
                .iter()
                .filter_map(|f| f.parent().map(Path::to_path_buf))
            {
                if dirs.insert(dir.clone())
                    && let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive)
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; reload with SIGHUP");
                }
            }
        }
        tokio::select! {
            Some(()) = rx.recv() => {
                // An editor's save is several events: wait for them to settle, then read once.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while rx.try_recv().is_ok() {}
                manager.reload_files("the configuration file changed").await;
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("SIGHUP: re-reading the configuration");
                manager.reload_files("SIGHUP").await;
            }
            _ = tick.tick() => manager.release_finished().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, HostConfig};

    #[test]
    fn status_shows_a_pid_only_for_clients_that_have_one() {
        let info = DaemonInfo {
            pid: 7,
            socket: PathBuf::from("/tmp/d.sock"),
            started_by: "by hand (serve)".into(),
            sources: vec!["f.toml".into()],
            status: serde_json::json!({"queued_total": 1, "queue": {"m": 1}, "clients": [
                {"transport": "bridge", "name": "claude-code", "pid": 42, "queued": 1, "running": 0},
                {"transport": "http", "name": null, "pid": null, "queued": 0, "running": 2},
            ]}),
        };
        let text = info.describe();
        assert!(
            text.contains("  bridge claude-code pid 42: 1 queued, 0 running"),
            "{text}"
        );
        assert!(
            text.contains("  http (unnamed): 0 queued, 2 running"),
            "{text}"
        );
        assert!(!text.contains("null"), "{text}");
    }

    pub(super) fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("prix-reload-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A manager for `fleet`, holding its locks in a daemon directory under `at`.
    pub(super) fn manager(at: &Path, fleet: Fleet) -> Arc<FleetManager> {
        let config = Config::with_hosts(ConfigSource::Environment, fleet.hosts());
        let dir = DaemonDir::at(at.join("dir")).unwrap();
        let owner = Owner {
            pid: std::process::id(),
            socket: at.join("daemon.sock"),
            source: "test".into(),
            launched: true,
        };
        let locks = acquire_all(&dir, &fleet, &owner).unwrap();
        FleetManager::new(fleet, locks, Dispatcher::start(&config), dir, owner)
    }

    pub(super) fn env_fleet(port: u16) -> Fleet {
        Fleet::new(SourceFleet::from_config(&Config::with_hosts(
            ConfigSource::Environment,
            vec![HostConfig {
                name: "gpu".into(),
                // Nothing listens: the host is merely down.
                base_url: format!("http://127.0.0.1:{port}"),
                slots: 1,
                ..HostConfig::default()
            }],
        )))
    }

    #[test]
    fn only_events_that_can_change_content_trigger_a_reload() {
        use notify::event::*;
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Content)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(changes_content(&kind), "{kind:?}");
        }
        // What the daemon's own read of the file causes, and `touch`.
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::WriteTime)),
        ] {
            assert!(!changes_content(&kind), "{kind:?}");
        }
    }

    pub(super) fn file_fleet(path: &Path, port: u16) -> Fleet {
        std::fs::write(path, host_toml(port)).unwrap();
        let config = Config::from_file(path, &config::process_env).unwrap();
        Fleet::new(SourceFleet::from_config(&config))
    }

    pub(super) fn host_toml(port: u16) -> String {
        format!("[[host]]\nname = \"gpu{port}\"\nurl = \"http://127.0.0.1:{port}\"\n")
    }

    #[tokio::test]
    async fn one_change_re_reads_the_file_once_not_forever() {
        let at = scratch("watch");
        let file = at.join("fleet.toml");
        let m = manager(&at, file_fleet(&file, 9));
        let watcher = tokio::spawn(watch(m.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(&file, host_toml(9)).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rereads = m.rereads.load(std::sync::atomic::Ordering::Relaxed);
        // Each re-read opens, reads and closes the file; reacting to that re-read every
        // 150 ms (about ten times here).
        assert!(
            (1..=2).contains(&rereads),
            "re-read {rereads} times after one write"
        );
        watcher.abort();
        m.release_all();
        std::fs::remove_dir_all(at).unwrap();
    }

    /// The hosts the manager schedules now, by URL.
    async fn urls(m: &FleetManager) -> Vec<String> {
        let state = m.state.lock().await;
        state
            .fleet
            .hosts()
            .into_iter()
            .map(|h| h.base_url)
            .collect()
    }

    #[tokio::test]
    async fn a_broken_file_keeps_its_hosts_and_the_others_reload() {
        let at = scratch("sources");
        let (broken, edited) = (at.join("broken.toml"), at.join("edited.toml"));
        let first = file_fleet(&broken, 9);
        let second = file_fleet(&edited, 10).sources()[0].clone();
        let m = manager(&at, first.with_source(second));
        std::fs::write(
            &broken,
            "[[host]]\nname = \"x\"\nurl = \"http://127.0.0.1:9\"\nslots = 0\n",
        )
        .unwrap();
        std::fs::write(&edited, host_toml(11)).unwrap();
        m.reload_files("test").await;
        assert_eq!(
            urls(&m).await,
            ["http://127.0.0.1:9", "http://127.0.0.1:11"],
            "the broken file keeps its host; the edited one applies"
        );
        m.release_all();
        std::fs::remove_dir_all(at).unwrap();
    }

    #[tokio::test]
    async fn a_file_re_reads_with_the_variables_its_launch_brought() {
        let at = scratch("env");
        let path = at.join("launch.toml");
        let var = format!("PRIX_RELOAD_TEST_KEY_{}", std::process::id());
        let text = |port: u16| {
            format!(
                "[[host]]\nname = \"g\"\nurl = \"http://127.0.0.1:{port}\"\napi_key_env = \"{var}\"\n"
            )
        };
        std::fs::write(&path, text(12)).unwrap();
        // The launch's environment has the key; the daemon's does not.
        let launch_env = |name: &str| (name == var).then(|| "k".to_string());
        let recording = crate::fleet::RecordingEnv::new(&launch_env);
        let config = Config::from_file(&path, &|n| recording.lookup(n)).unwrap();
        let source = SourceFleet::from_config(&config).with_env(recording.into_env());
        let m = manager(&at, Fleet::new(source));
        std::fs::write(&path, text(13)).unwrap();
        m.reload_files("test").await;
        assert_eq!(urls(&m).await, ["http://127.0.0.1:13"]);
        let state = m.state.lock().await;
        let host = &state.fleet.hosts()[0];
        assert_eq!(
            host.api_key
                .as_ref()
                .map(|k| k.expose().to_string())
                .as_deref(),
            Some("k")
        );
        assert_eq!(
            state.fleet.sources()[0].env.get(&var).as_deref(),
            Some("k"),
            "kept for the next re-read"
        );
        drop(state);
        m.release_all();
        std::fs::remove_dir_all(at).unwrap();
    }

    #[test]
    fn a_launch_that_shares_no_host_with_a_hand_started_daemon_is_told_so() {
        let owner = Owner {
            pid: 42,
            socket: "/tmp/d.sock".into(),
            source: "/etc/serve.toml".into(),
            launched: false,
        };
        let incoming = env_fleet(9).sources()[0].clone();
        let missing = ["http://127.0.0.1:9".to_string()];
        let none = refusal(&owner, &incoming, &[], &missing);
        assert!(!none.contains("schedules  "), "{none}");
        assert!(
            none.contains("pid 42")
                && none.contains("none of the hosts")
                && none.contains("http://127.0.0.1:9")
                && none.contains("another [server] socket"),
            "{none}"
        );
        assert!(
            none.contains("`prix-dispatch stop --socket /tmp/d.sock`"),
            "{none}"
        );
        let some = refusal(&owner, &incoming, &["http://gpu:1".into()], &missing);
        assert!(
            some.contains("already schedules http://gpu:1 and"),
            "{some}"
        );
    }

    #[test]
    fn status_shows_slots_busy_from_elsewhere_and_the_models_in_memory() {
        let info = |busy_elsewhere: u64, resident: serde_json::Value| DaemonInfo {
            pid: 1,
            socket: "/tmp/d.sock".into(),
            started_by: "by hand (serve)".into(),
            sources: vec!["/a.toml".into()],
            status: serde_json::json!({"hosts": [{"name": "gpu0", "url": "http://g:1",
                "health": "healthy", "active": 1, "slots": 1, "busy_elsewhere": busy_elsewhere,
                "resident_models": resident, "retired": false}], "queued_total": 0, "queue": {},
                "clients": []}),
        };
        let shown = info(1, serde_json::json!(["qwen", "llama"])).describe();
        assert!(
            shown.contains("1/1 slots busy (+1 from elsewhere)  in memory: qwen, llama"),
            "{shown}"
        );
        let shown = info(0, serde_json::json!([])).describe();
        assert!(
            shown.contains("1/1 slots busy\n") && !shown.contains("in memory"),
            "{shown}"
        );
    }

    #[test]
    fn a_refusal_is_news_once_per_distinct_error() {
        let mut r = Refusals::default();
        assert!(r.note("/a.toml", "bad slots"));
        assert!(!r.note("/a.toml", "bad slots"), "the same error again");
        assert!(r.note("/b.toml", "bad slots"), "another file");
        assert!(r.note("/a.toml", "bad url"), "another error");
        r.clear("/a.toml");
        assert!(r.note("/a.toml", "bad url"), "fixed, then broken again");
    }

    #[tokio::test]
    async fn release_all_removes_the_lock_files_without_awaiting() {
        let at = scratch("release");
        let m = manager(&at, env_fleet(9));
        let lock = m.dir.host_lock(&host_identity("http://127.0.0.1:9"));
        assert!(lock.exists());
        // Even while a reload holds the fleet's state.
        let state = m.state.lock().await;
        m.release_all();
        assert!(
            !lock.exists(),
            "the lock file is gone before the process exits"
        );
        drop(state);
        std::fs::remove_dir_all(at).unwrap();
    }
}
