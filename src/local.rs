//! The daemon's Unix socket, where `prix-dispatch stdio` launches join it and where
//! `prix-dispatch status` and `stop` reach it.
//!
//! A client opens the socket, sends one hello line (what it wants, its pid, and for a launch
//! the hosts its configuration lists) and gets one answer line. For a launch, the daemon joins
//! it (same hosts), reloads to take its hosts (a daemon a launch started), or refuses it with
//! a message naming the daemon (a daemon started by hand that lacks some hosts); after a
//! welcome the stream is plain MCP (newline-delimited JSON-RPC, as on stdio), served like any
//! stdio client.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;
use crate::fleet::SourceFleet;
use crate::mcp;
use crate::reload::{DaemonInfo, FleetManager};

/// The protocol version of [`Hello`]; version 1 sent a configuration fingerprint.
pub const PROTOCOL: u32 = 2;

/// The first line a client sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub prix_dispatch_bridge: u32,
    pub pid: u32,
    #[serde(default)]
    pub op: Op,
    /// The launch's hosts (for [`Op::Join`]).
    #[serde(default)]
    pub fleet: Option<SourceFleet>,
}

/// What a client of the socket wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Be served MCP (a `stdio` launch).
    #[default]
    Join,
    /// One line of [`DaemonInfo`] (`prix-dispatch status`).
    Status,
    /// Drain and exit, as on SIGTERM (`prix-dispatch stop`).
    Stop,
}

/// The daemon's answer: `ok`, or why not; `info` for [`Op::Status`] and [`Op::Stop`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<DaemonInfo>,
}

/// A launch lists its hosts (with keys) in its hello: room for a large fleet.
const HELLO_LIMIT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another prix-dispatch daemon already serves {0}; see it with `prix-dispatch status`, \
         stop it with {stop}, or give this one another [server] socket",
        stop = crate::ownership::stop_command(.0)
    )]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {error}")]
    Bind { path: PathBuf, error: io::Error },
}

/// The daemon's listening socket and the file that names it.
pub struct LocalSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file this daemon created.
    identity: Option<(u64, u64)>,
}

impl Drop for LocalSocket {
    /// However the daemon stops (a failed start included), its socket file goes with it.
    fn drop(&mut self) {
        self.unlink();
    }
}

impl LocalSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file, but only while it is still this daemon's: once it stops
    /// listening, a new daemon may already have bound the same path, and removing that one's
    /// file would hide it from every later launch (which would start yet another daemon).
    fn unlink(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .is_some_and(|m| Some((m.dev(), m.ino())) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path`, replacing a stale socket file left by a daemon that died, but never one a
/// live daemon answers on. The bind itself is atomic: of two daemons, one wins.
pub async fn bind(path: &Path) -> Result<LocalSocket, SocketError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| SocketError::Bind {
            path: path.to_path_buf(),
            error,
        })?;
        restrict(dir);
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|error| match error.kind() {
        io::ErrorKind::AddrInUse => SocketError::InUse(path.to_path_buf()),
        _ => SocketError::Bind {
            path: path.to_path_buf(),
            error,
        },
    })?;
    let identity = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok(LocalSocket {
        listener,
        path: path.to_path_buf(),
        identity,
    })
}

/// Only this user may talk to the daemon through its socket directory.
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("prix-dispatch"))
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `stop` fired.
    Stopped,
    /// No bridge, no other client and no task for the whole `idle_exit`.
    Idle,
}

/// How often an idle-exit daemon looks at whether it is idle.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// Accepts bridges until `stop` fires or, with `idle_exit`, until the daemon has had no
/// client and no task for that long. Either way the socket file is removed (if it is still
/// ours) before the listener closes, so a launch arriving at that moment never finds a socket
/// nobody will answer: it either was accepted before (and counts as a client, so the daemon
/// stays) or finds no socket and starts a new daemon.
pub async fn serve(
    socket: LocalSocket,
    manager: Arc<FleetManager>,
    stop: CancellationToken,
    stop_requested: CancellationToken,
    idle_exit: Option<Duration>,
) -> Ended {
    let dispatcher = manager.dispatcher().clone();
    // Connections accepted and not yet finished, including those still saying hello (not yet
    // in `dispatcher.clients()`).
    let sessions = Arc::new(AtomicUsize::new(0));
    let mut idle_since: Option<tokio::time::Instant> = None;
    let ended = loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break Ended::Stopped,
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a bridge failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep(IDLE_CHECK), if idle_exit.is_some() => {
                // Decided in this task, between two accepts: no bridge slips in after it.
                if !is_idle(&dispatcher, &sessions).await {
                    idle_since = None;
                    continue;
                }
                let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                if idle_exit.is_some_and(|after| since.elapsed() >= after) {
                    break Ended::Idle;
                }
                continue;
            }
        };
        idle_since = None;
        let manager = manager.clone();
        let stop_requested = stop_requested.clone();
        let session = SessionCount::enter(&sessions);
        tokio::spawn(async move {
            let _session = session;
            if let Err(e) = serve_bridge(stream, &manager, &stop_requested).await {
                tracing::info!(error = %e, "bridge session ended with an error");
            }
        });
    };
    // Unlink first (the drop does), then close: connections queued meanwhile are reset, and
    // their launches start a new daemon instead of waiting on this one.
    drop(socket);
    ended
}

/// No bridge session, no other client, nothing queued or running.
async fn is_idle(dispatcher: &Dispatcher, sessions: &AtomicUsize) -> bool {
    if sessions.load(Ordering::SeqCst) > 0 || !dispatcher.clients().is_empty() {
        return false;
    }
    let Ok(status) = dispatcher.status().await else {
        return false;
    };
    status.queued_total == 0
        && status.awaiting_manifest == 0
        && status.hosts.iter().all(|h| h.state.active == 0)
}

/// One accepted connection, counted until its session ends (however it ends).
struct SessionCount(Arc<AtomicUsize>);

impl SessionCount {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_bridge(
    stream: UnixStream,
    manager: &FleetManager,
    stop_requested: &CancellationToken,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let read_hello = async {
        let mut limited = (&mut reader).take(HELLO_LIMIT as u64);
        limited.read_line(&mut line).await
    };
    tokio::time::timeout(Duration::from_secs(5), read_hello)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello from the bridge"))??;
    let hello: Hello = serde_json::from_str(line.trim()).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("bad bridge hello: {e}"))
    })?;
    let refuse = |error: String| Welcome {
        ok: false,
        error: Some(error),
        info: None,
    };
    match hello.op {
        Op::Status => {
            let welcome = Welcome {
                ok: true,
                error: None,
                info: Some(manager.info().await),
            };
            return write_line(&mut write, &welcome).await;
        }
        Op::Stop => {
            let welcome = Welcome {
                ok: true,
                error: None,
                info: Some(manager.info().await),
            };
            tracing::info!(
                pid = hello.pid,
                "`prix-dispatch stop` asked this daemon to stop"
            );
            write_line(&mut write, &welcome).await?;
            stop_requested.cancel();
            return Ok(());
        }
        Op::Join => {}
    }
    let admitted = match (&hello.fleet, hello.prix_dispatch_bridge) {
        (Some(fleet), PROTOCOL) => manager.admit(fleet).await,
        _ => Err(format!(
            "this prix-dispatch daemon (pid {}) speaks launch protocol {PROTOCOL}, the launch \
             (pid {}) another: the binary was updated while the daemon ran. Stop the daemon \
             with {} and launch again",
            std::process::id(),
            hello.pid,
            crate::ownership::stop_command(&manager.owner().socket)
        )),
    };
    if let Err(message) = admitted {
        tracing::warn!(pid = hello.pid, %message, "refused a stdio launch");
        return write_line(&mut write, &refuse(message)).await;
    }
    write_line(
        &mut write,
        &Welcome {
            ok: true,
            error: None,
            info: None,
        },
    )
    .await?;
    let dispatcher = manager.dispatcher().clone();
    let client = dispatcher.clients().connect("bridge", Some(hello.pid));
    tracing::info!(pid = hello.pid, "a stdio launch joined");
    mcp::serve_client(dispatcher, client, reader, write)
        .await
        .map_err(|e| io::Error::other(e.to_string()))
}

async fn write_line(
    write: &mut (impl AsyncWriteExt + Unpin),
    value: &impl Serialize,
) -> io::Result<()> {
    let mut text = serde_json::to_string(value).map_err(io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigSource, HostConfig};

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prix-local-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("daemon.sock")
    }

    fn manager(path: &Path) -> Arc<FleetManager> {
        let config = Config::with_hosts(
            ConfigSource::Environment,
            vec![HostConfig {
                name: "gpu0".into(),
                // Nothing listens here: the daemon is idle, its host merely down.
                base_url: "http://127.0.0.1:9".into(),
                slots: 1,
                api_key: None,
                ..HostConfig::default()
            }],
        );
        let dir = crate::daemon_dir::DaemonDir::at(path.parent().unwrap().join("dir")).unwrap();
        let owner = crate::ownership::Owner {
            pid: std::process::id(),
            socket: path.to_path_buf(),
            source: config.source.to_string(),
            launched: true,
        };
        FleetManager::new(
            crate::fleet::Fleet::new(SourceFleet::from_config(&config)),
            Default::default(),
            Dispatcher::start(&config),
            dir,
            owner,
        )
    }

    #[tokio::test]
    async fn a_daemon_never_removes_the_socket_file_of_the_daemon_after_it() {
        let path = temp_socket("unlink");
        let old = bind(&path).await.unwrap();
        // The old daemon stopped listening; a new one took the path.
        std::fs::remove_file(&path).unwrap();
        let new = bind(&path).await.unwrap();
        drop(old);
        assert!(path.exists(), "the new daemon's socket file is still there");
        UnixStream::connect(&path).await.expect("and answers");
        drop(new);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn an_idle_daemon_waits_for_a_connection_still_saying_hello_then_exits_without_its_socket()
     {
        let path = temp_socket("idle");
        let socket = bind(&path).await.unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(
            socket,
            manager(&path),
            stop.clone(),
            CancellationToken::new(),
            Some(Duration::from_millis(200)),
        ));
        // Connected, but no hello yet: not a client of the dispatcher, still a session.
        let silent = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!served.is_finished(), "exited under a connecting launch");
        drop(silent);
        let ended = tokio::time::timeout(Duration::from_secs(3), served)
            .await
            .expect("exits once idle")
            .unwrap();
        assert_eq!(ended, Ended::Idle);
        assert!(!path.exists(), "socket file removed");
        assert!(UnixStream::connect(&path).await.is_err(), "nobody listens");
    }
}
