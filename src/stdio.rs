//! The process's stdin and stdout as async streams, without tokio's blocking pool when they are
//! pipes (as when an MCP client launches us).
//!
//! `tokio::io::stdin()`/`stdout()` run every read and write on a blocking-pool thread: a thread
//! hand-off and two context switches per MCP message. Measured with 64 concurrent calls over
//! `stdio --standalone`, that was most of the process's time (`finish_task_switch`, the
//! blocking pool's condvar). A pipe can instead be registered with the reactor like a socket.
//! Anything else (a terminal, a file) keeps tokio's portable path.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Standard input: a non-blocking pipe reader when it is a pipe.
pub fn stdin() -> Reader {
    match duplicate(io::stdin().as_fd()).and_then(pipe::Receiver::from_file) {
        Ok(pipe) => Box::pin(pipe),
        Err(_) => Box::pin(tokio::io::stdin()),
    }
}

/// Standard output: a non-blocking pipe writer when it is a pipe.
pub fn stdout() -> Writer {
    match duplicate(io::stdout().as_fd()).and_then(pipe::Sender::from_file) {
        Ok(pipe) => Box::pin(pipe),
        Err(_) => Box::pin(tokio::io::stdout()),
    }
}

fn duplicate(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}
