//! The daemon's Unix socket, where `prix-dispatch stdio` launches join it.
//!
//! A bridge opens the socket, sends one hello line naming its configuration's fingerprint and
//! its pid, and gets one answer line; after that the stream is plain MCP (newline-delimited
//! JSON-RPC, as on stdio), served like any stdio client. A bridge whose configuration differs
//! is refused with a message that says so, instead of being served the wrong fleet.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;
use crate::mcp;

/// The first line a bridge sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub prix_dispatch_bridge: u32,
    pub config: String,
    pub pid: u32,
}

/// The daemon's answer: `ok`, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const HELLO_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another prix-dispatch daemon already serves {0}; stop it first, or give this one another [server] socket"
    )]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {error}")]
    Bind { path: PathBuf, error: io::Error },
}

/// Binds `path`, replacing a stale socket file left by a daemon that died, but never one a
/// live daemon answers on. The bind itself is atomic: of two daemons, one wins.
pub async fn bind(path: &Path) -> Result<UnixListener, SocketError> {
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
    UnixListener::bind(path).map_err(|error| match error.kind() {
        io::ErrorKind::AddrInUse => SocketError::InUse(path.to_path_buf()),
        _ => SocketError::Bind {
            path: path.to_path_buf(),
            error,
        },
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

/// Accepts bridges until `stop` fires.
pub async fn serve(
    listener: UnixListener,
    dispatcher: Dispatcher,
    fingerprint: String,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a bridge failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let dispatcher = dispatcher.clone();
        let fingerprint = fingerprint.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_bridge(stream, dispatcher, &fingerprint).await {
                tracing::info!(error = %e, "bridge session ended with an error");
            }
        });
    }
}

async fn serve_bridge(
    stream: UnixStream,
    dispatcher: Dispatcher,
    fingerprint: &str,
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
    if hello.config != fingerprint {
        let welcome = Welcome {
            ok: false,
            error: Some(format!(
                "this prix-dispatch daemon (pid {}) serves a different configuration (fingerprint \
                 {fingerprint}, yours {}); refusing to serve the wrong fleet. Give each \
                 configuration its own [server] socket, or stop the daemon",
                std::process::id(),
                hello.config
            )),
        };
        write_line(&mut write, &welcome).await?;
        return Ok(());
    }
    write_line(
        &mut write,
        &Welcome {
            ok: true,
            error: None,
        },
    )
    .await?;
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
