//! `prix-dispatch serve`: one daemon per user, owning its hosts.
//!
//! Start-up takes, in order, what makes it the only scheduler of its hosts: the daemon
//! directory, the host locks (another daemon holding one is named and the start refused),
//! the TCP listener, then the launch socket. Every one of these is released by its guard, so
//! a start that fails half-way leaves no socket file and no lock behind.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon_dir::{DaemonDir, DaemonDirError};
use crate::dispatcher::Dispatcher;
use crate::fleet::{Fleet, SourceFleet};
use crate::local::{self, Op};
use crate::ownership::{Owner, OwnershipError};
use crate::reload::{self, FleetManager};
use crate::{bridge, http};

/// Why `serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Dir(#[from] DaemonDirError),
    #[error(
        "a prix-dispatch daemon already runs at {socket}{who}; see it with `prix-dispatch status`, \
         stop it with {stop}, or give this one another [server] socket"
    )]
    AlreadyRunning {
        socket: PathBuf,
        who: String,
        stop: String,
    },
    #[error(
        "{0}; one host has one scheduler. Stop that daemon ({stop}), or remove the host from one \
         configuration",
        stop = .0.stop_hint()
    )]
    // Not `#[from]`/source: the message already shows it, and anyhow would print it again
    // as "Caused by:".
    HostOwned(OwnershipError),
    #[error(transparent)]
    Socket(#[from] local::SocketError),
    #[error(
        "cannot listen on {addr} ([server] listen): {error}{holder}. Stop what holds it, or set \
         another [server] listen"
    )]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
        holder: String,
    },
    #[error("[server] auth_token_env names {0}, which is not set")]
    Token(String),
    #[error("the daemon stopped unexpectedly: {0}")]
    Stopped(String),
}

impl From<OwnershipError> for DaemonError {
    fn from(error: OwnershipError) -> Self {
        DaemonError::HostOwned(error)
    }
}

/// How `serve` was started.
pub struct ServeOptions {
    pub config: Config,
    /// Started by a `stdio` launch: exits when idle, extends its fleet for later launches,
    /// and serves launches even without its HTTP port.
    pub launched: bool,
    /// The launch socket (default: `[server] socket`, else this user's daemon socket).
    pub socket: Option<PathBuf>,
}

/// Where launches find the daemon of `config`: `[server] socket`, else this user's one.
pub fn socket_for(config: &Config, dir: &DaemonDir) -> PathBuf {
    config.server.socket.clone().unwrap_or_else(|| dir.socket())
}

/// Runs the daemon until a signal, `prix-dispatch stop`, or (launched) idleness.
pub async fn serve(options: ServeOptions) -> Result<(), DaemonError> {
    let ServeOptions {
        config,
        launched,
        socket,
    } = options;
    let auth_token = match &config.server.auth_token_env {
        Some(var) => Some(std::env::var(var).map_err(|_| DaemonError::Token(var.clone()))?),
        None => None,
    };
    let dir = DaemonDir::for_this_user()?;
    let socket = socket.unwrap_or_else(|| socket_for(&config, &dir));
    if let Ok(Some(info)) = bridge::ask(&socket, Op::Status).await {
        return Err(DaemonError::AlreadyRunning {
            stop: crate::ownership::stop_command(&socket),
            socket,
            who: format!(
                " (pid {}, started {}, configuration {})",
                info.pid,
                info.started_by,
                info.sources.join(" + ")
            ),
        });
    }
    let source = SourceFleet::from_config(&config);
    let owner = Owner {
        pid: std::process::id(),
        socket: socket.clone(),
        source: source.source.clone(),
        launched,
    };
    let fleet = Fleet::new(source);
    let locks = reload::acquire_all(&dir, &fleet, &owner)?;
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            let holder = listen_holder(config.server.listen).await;
            if launched {
                // Launches reach a launched daemon through its socket; HTTP is a bonus.
                tracing::warn!(%error, listen = %config.server.listen, "no HTTP listener{holder}; serving stdio launches only");
                None
            } else {
                return Err(DaemonError::Listen {
                    addr: config.server.listen,
                    error,
                    holder,
                });
            }
        }
    };
    let unix = local::bind(&socket).await?;
    if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(source = %config.source, hosts = config.hosts.len(), "serving on http://{addr} (MCP at /mcp, OpenAI API at /v1, status page at /)");
    }
    tracing::info!(socket = %socket.display(), dir = %dir.path().display(), "stdio launches join at this socket");
    let dispatcher = Dispatcher::start(&config);
    let manager = FleetManager::new(fleet, locks, dispatcher.clone(), dir, owner);
    let watcher = tokio::spawn(reload::watch(manager.clone()));
    let options = http::HttpOptions {
        auth_token,
        max_request_bytes: config.server.max_request_bytes,
        allowed_hosts: config.server.allowed_hosts.clone(),
        session_idle: config.server.session_idle,
    };
    let stop = CancellationToken::new();
    let stop_requested = CancellationToken::new();
    let idle = launched.then_some(config.server.idle_exit);
    let mut local = tokio::spawn(local::serve(
        unix,
        manager.clone(),
        stop.clone(),
        stop_requested.clone(),
        idle,
    ));
    let http = listener.map(|l| {
        tokio::spawn(http::serve(
            l,
            dispatcher.clone(),
            options,
            stop.clone().cancelled_owned(),
        ))
    });
    let service = tokio::spawn(async move {
        tokio::select! {
            served = async {
                match http {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => match served {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            ended = &mut local => {
                if matches!(ended, Ok(local::Ended::Idle)) {
                    tracing::info!("no clients and no tasks: exiting (started by a stdio launch)");
                }
                ended.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    });
    // On a signal the listeners keep serving the requests in flight while they drain.
    let releasing = manager.clone();
    let served = supervise(
        &dispatcher,
        config.server.shutdown_grace,
        service,
        stop.clone(),
        stop_requested,
        move || releasing.release_all(),
    )
    .await;
    // Stops the socket's accept loop, which removes the socket file if it is ours.
    stop.cancel();
    watcher.abort();
    // The watcher task may still hold a reference for a moment: release explicitly.
    manager.release_all();
    drop(manager);
    served
        .map_err(|e| DaemonError::Stopped(e.to_string()))?
        .map_err(DaemonError::Stopped)
}

/// Who holds `addr`, when it is a prix-dispatch daemon (its `/healthz` names its pid).
async fn listen_holder(addr: std::net::SocketAddr) -> String {
    let client = crate::backend::http_client();
    let answer = client
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    match answer
        .ok()
        .and_then(|r| r.headers().get(http::HEALTHZ_PID_HEADER).cloned())
    {
        Some(pid) => format!(
            " (held by the prix-dispatch daemon pid {}; `prix-dispatch status` shows it)",
            pid.to_str().unwrap_or("?")
        ),
        None => String::new(),
    }
}

/// Runs `service` until it ends by itself, or until SIGINT/SIGTERM or `stop_requested`
/// (`prix-dispatch stop`): then no new work, waiting tasks fail with "shutting down", running
/// ones get `grace` to finish, and the process exits 0 (130 on a second signal). A scheduler
/// panic exits 70 so that a supervisor restarts us. `listeners` is cancelled once the running
/// tasks are done, before the process exits: the listeners stop accepting (the daemon's socket
/// file goes with them). `release` runs just before every explicit exit: `std::process::exit`
/// runs no destructor, so whatever must not outlive the process (the host lock files) is
/// released there.
pub async fn supervise<T>(
    dispatcher: &Dispatcher,
    grace: Duration,
    mut service: tokio::task::JoinHandle<T>,
    listeners: CancellationToken,
    stop_requested: CancellationToken,
    release: impl Fn(),
) -> Result<T, tokio::task::JoinError> {
    tokio::select! {
        served = &mut service => served,
        _ = async {
            tokio::select! {
                _ = next_signal() => {}
                _ = stop_requested.cancelled() => {}
            }
        } => {
            tracing::info!(grace_seconds = grace.as_secs_f64(), "stopping: finishing running tasks (a signal exits at once)");
            // The front end keeps running meanwhile, so finished tasks reach their clients.
            tokio::select! {
                in_time = dispatcher.drain(grace) => {
                    if !in_time {
                        tracing::warn!("grace period over: stopping the tasks still running");
                    }
                }
                _ = next_signal() => {
                    tracing::warn!("second signal: exiting now");
                    release();
                    std::process::exit(130);
                }
            }
            // Let the last results and errors reach the clients, and the listeners close
            // (removing the socket file). Exit explicitly: the runtime would wait on stdin's
            // blocking reader.
            listeners.cancel();
            tokio::time::sleep(Duration::from_millis(50)).await;
            release();
            std::process::exit(0);
        }
        _ = dispatcher.crashed() => {
            // Every waiting client already got an error.
            tracing::error!("scheduler crashed: exiting so that a supervisor restarts prix-dispatch");
            release();
            std::process::exit(70);
        }
    }
}

/// SIGINT or SIGTERM.
async fn next_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The launch's view: where its daemon is, and what it brings.
pub fn launch_spec(
    config: &Config,
    config_path: Option<PathBuf>,
) -> Result<bridge::DaemonSpec, DaemonDirError> {
    let dir = DaemonDir::for_this_user()?;
    Ok(bridge::DaemonSpec {
        socket: socket_for(config, &dir),
        dir,
        fleet: SourceFleet::from_config(config),
        config: config_path,
        program: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_owned_error_is_shown_once() {
        let error = DaemonError::from(OwnershipError::Held {
            host: "http://gpu:1234".into(),
            owner: Some(Owner {
                pid: 42,
                socket: "/tmp/x.sock".into(),
                source: "/etc/fleet.toml".into(),
                launched: false,
            }),
        });
        // What `serve` prints: anyhow's Debug, with a "Caused by:" list of sources.
        let shown = format!("{:?}", anyhow::Error::from(error));
        assert_eq!(shown.matches("already scheduled").count(), 1, "{shown}");
        assert!(!shown.contains("Caused by"), "{shown}");
        assert!(shown.contains("pid 42"), "{shown}");
        assert!(
            shown.contains("`prix-dispatch stop --socket /tmp/x.sock`"),
            "names the owner's socket: {shown}"
        );
    }
}
