//! The process's stdin and stdout as async streams, without tokio's blocking pool when they are
//! pipes or sockets (as when an MCP client launches us: Python's `subprocess` gives pipes,
//! Node's `child_process` gives Unix socket pairs).
//!
//! `tokio::io::stdin()`/`stdout()` run every read and write on a blocking-pool thread: a thread
//! hand-off and two context switches per MCP message. Measured with 64 concurrent calls over
//! `stdio --standalone`, that was most of the process's time (`finish_task_switch`, the
//! blocking pool's condvar). A pipe or a socket can instead be registered with the reactor.
//! Anything else (a terminal, a file, /dev/null) keeps tokio's portable path.
//!
//! Registering sets O_NONBLOCK on the open file description, which the launching client shares
//! only through its own end's description (a separate one), so it is not affected.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::net::unix::pipe;

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Standard input, registered with the reactor when it is a pipe or a socket.
pub fn stdin() -> Reader {
    match register(io::stdin().as_fd(), pipe::Receiver::from_file) {
        Some(Registered::Pipe(pipe)) => Box::pin(pipe),
        Some(Registered::Socket(socket)) => Box::pin(socket),
        None => Box::pin(tokio::io::stdin()),
    }
}

/// Standard output, registered with the reactor when it is a pipe or a socket.
pub fn stdout() -> Writer {
    match register(io::stdout().as_fd(), pipe::Sender::from_file) {
        Some(Registered::Pipe(pipe)) => Box::pin(pipe),
        Some(Registered::Socket(socket)) => Box::pin(socket),
        None => Box::pin(tokio::io::stdout()),
    }
}

enum Registered<P> {
    Pipe(P),
    Socket(UnixStream),
}

/// A duplicate of `fd` registered with the reactor, if it is a pipe or a socket (and that works).
fn register<P>(fd: BorrowedFd<'_>, pipe: fn(File) -> io::Result<P>) -> Option<Registered<P>> {
    let file = File::from(fd.try_clone_to_owned().ok()?);
    let kind = file.metadata().ok()?.file_type();
    if kind.is_fifo() {
        pipe(file).ok().map(Registered::Pipe)
    } else if kind.is_socket() {
        socket(file).ok().map(Registered::Socket)
    } else {
        None
    }
}

fn socket(file: File) -> io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

/// Answers the client's first request with a JSON-RPC error carrying `message` (a launch that
/// cannot start). Waits at most 5 s for that request, and not at all when stdin is a terminal.
pub async fn refuse_first_request(message: &str) {
    use std::io::IsTerminal;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    if io::stdin().is_terminal() {
        return;
    }
    let mut lines = BufReader::new(stdin()).lines();
    let first_request = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if value.get("method").is_some()
                && let Some(id) = value.get("id")
            {
                return Some(id.clone());
            }
        }
        None
    };
    let Ok(Some(id)) = tokio::time::timeout(std::time::Duration::from_secs(5), first_request).await
    else {
        return;
    };
    let reply = crate::mcp_tasks_wire::error(&id, -32603, message);
    let mut out = stdout();
    let _ = out.write_all(format!("{reply}\n").as_bytes()).await;
    let _ = out.flush().await;
}
