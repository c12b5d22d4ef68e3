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
    let fd = io::stdin();
    match kind(fd.as_fd()) {
        Some(Kind::Pipe) => {
            if let Ok(pipe) = duplicate(fd.as_fd()).and_then(pipe::Receiver::from_file) {
                return Box::pin(pipe);
            }
        }
        Some(Kind::Socket) => {
            if let Ok(socket) = duplicate(fd.as_fd()).and_then(socket) {
                return Box::pin(socket);
            }
        }
        None => {}
    }
    Box::pin(tokio::io::stdin())
}

/// Standard output, registered with the reactor when it is a pipe or a socket.
pub fn stdout() -> Writer {
    let fd = io::stdout();
    match kind(fd.as_fd()) {
        Some(Kind::Pipe) => {
            if let Ok(pipe) = duplicate(fd.as_fd()).and_then(pipe::Sender::from_file) {
                return Box::pin(pipe);
            }
        }
        Some(Kind::Socket) => {
            if let Ok(socket) = duplicate(fd.as_fd()).and_then(socket) {
                return Box::pin(socket);
            }
        }
        None => {}
    }
    Box::pin(tokio::io::stdout())
}

enum Kind {
    Pipe,
    Socket,
}

fn kind(fd: BorrowedFd<'_>) -> Option<Kind> {
    let file = File::from(fd.try_clone_to_owned().ok()?);
    let kind = file.metadata().ok()?.file_type();
    if kind.is_fifo() {
        Some(Kind::Pipe)
    } else if kind.is_socket() {
        Some(Kind::Socket)
    } else {
        None
    }
}

fn duplicate(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

fn socket(file: File) -> io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}
