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
    dispatcher: Dispatcher,
    dir: DaemonDir,
    owner: Owner,
}

struct State {
    fleet: Fleet,
    locks: HashMap<String, HostLock>,
    /// Locks of removed hosts, kept until their last running task is done.
    releasing: Vec<HostLock>,
    /// (source key, host identity) pairs already warned about.
    warned: HashSet<(String, String)>,
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
                locks,
                releasing: Vec::new(),
                warned: HashSet::new(),
            }),
            dispatcher,
            dir,
            owner,
        })
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
            Verdict::Refuse { shared, missing } => Err(format!(
                "the prix-dispatch daemon (pid {}, configuration {}) already schedules {} and was \
                 started by hand, so it does not take the other hosts of {} ({}). Add them to \
                 {} (it reloads by itself), or stop it with `prix-dispatch stop` and launch again",
                self.owner.pid,
                self.owner.source,
                shared.join(", "),
                incoming.source,
                missing.join(", "),
                self.owner.source,
            )),
        }
    }

    /// Re-reads every file source (an edit was seen, or `SIGHUP`). A file that no longer
    /// parses is refused with the usual message and the fleet stays as it was.
    pub async fn reload_files(&self, why: &str) {
        let mut state = self.state.lock().await;
        let mut next = state.fleet.clone();
        for path in state.fleet.files() {
            match Config::from_file(&path, &config::process_env) {
                Ok(config) => next = next.with_source(SourceFleet::from_config(&config)),
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload refused; the daemon keeps its current fleet. Fix the file (it is re-read when saved)");
                    return;
                }
            }
        }
        if next == state.fleet {
            tracing::debug!(why, "configuration re-read: no change");
            return;
        }
        if let Err(e) = self.apply(&mut state, next, why).await {
            tracing::error!(error = %e, "configuration reload refused; the daemon keeps its current fleet");
        }
    }

    /// Switches to `next`: locks its new hosts first (all or none), then tells the dispatcher.
    async fn apply(&self, state: &mut State, next: Fleet, why: &str) -> Result<(), String> {
        let wanted = next.identities();
        let mut taken = Vec::new();
        for identity in wanted.iter().filter(|i| !state.locks.contains_key(*i)) {
            // A host removed a moment ago and listed again: its lock is still ours.
            if let Some(at) = state
                .releasing
                .iter()
                .position(|l| l.identity() == identity)
            {
                taken.push(state.releasing.swap_remove(at));
                continue;
            }
            match ownership::acquire(&self.dir, identity, &self.owner) {
                Ok(lock) => taken.push(lock),
                Err(e) => {
                    return Err(format!(
                        "{e}; one host has one scheduler. Stop that daemon (`prix-dispatch stop`) \
                         or remove the host from one of the configurations"
                    ));
                }
            }
        }
        let change = self
            .dispatcher
            .reconfigure(&next.hosts())
            .await
            .map_err(|e| e.to_string())?;
        for lock in taken {
            state.locks.insert(lock.identity().to_string(), lock);
        }
        let gone: Vec<String> = state
            .locks
            .keys()
            .filter(|i| !wanted.contains(*i))
            .cloned()
            .collect();
        for identity in gone {
            if let Some(lock) = state.locks.remove(&identity) {
                state.releasing.push(lock);
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
        let mut state = self.state.lock().await;
        if state.releasing.is_empty() {
            return;
        }
        let Ok(status) = self.dispatcher.status().await else {
            return;
        };
        let busy: HashSet<String> = status
            .hosts
            .iter()
            .filter(|h| h.state.retired && h.state.active > 0)
            .map(|h| host_identity(&h.url))
            .collect();
        state.releasing.retain(|l| busy.contains(l.identity()));
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
