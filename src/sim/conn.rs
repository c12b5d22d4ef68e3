//! Connection tracking, so that shutting a host down also cuts the
//! connections it is still serving.
//!
//! axum runs each connection in a task of its own, which aborting the serve
//! task does not reach. Instead each accepted socket is registered through a
//! duplicate of its descriptor, and `sever_all` shuts those sockets down:
//! hyper then sees the connection end and drops the handlers and bodies.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::state::Shared;

#[derive(Default)]
pub(crate) struct Connections {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Duplicates of the open sockets, only ever used to shut them down.
    open: HashMap<u64, std::net::TcpStream>,
    severed: bool,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn track(self: &Arc<Self>, stream: TcpStream) -> io::Result<TrackedStream> {
        // Tokens are small writes that must go out at once, not wait for an ACK.
        stream.set_nodelay(true)?;
        let std_stream = stream.into_std()?;
        let handle = std_stream.try_clone()?;
        let stream = TcpStream::from_std(std_stream)?;
        let mut registry = self.lock();
        if registry.severed {
            // Accepted while shutting down: end it straight away.
            let _ = handle.shutdown(Shutdown::Both);
        }
        let id = registry.next_id;
        registry.next_id += 1;
        registry.open.insert(id, handle);
        Ok(TrackedStream {
            inner: stream,
            id,
            connections: Arc::clone(self),
        })
    }

    /// Shuts down every open connection, and any accepted from now on.
    pub(crate) fn sever_all(&self) {
        let mut registry = self.lock();
        registry.severed = true;
        for socket in registry.open.values() {
            // Already closed by the peer is fine: it is going away either way.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Shuts down the connections open now; new ones are served as usual.
    pub(crate) fn cut_open(&self) {
        for socket in self.lock().open.values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    fn forget(&self, id: u64) {
        self.lock().open.remove(&id);
    }
}

/// A listener whose connections are registered in `Connections`.
pub(crate) struct TrackedListener {
    inner: TcpListener,
    connections: Arc<Connections>,
    shared: Arc<Shared>,
}

impl TrackedListener {
    pub(crate) fn new(
        inner: TcpListener,
        connections: Arc<Connections>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            inner,
            connections,
            shared,
        }
    }
}

impl Listener for TrackedListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TrackedStream, SocketAddr) {
        loop {
            // Accept errors are logged and retried by tokio's listener impl.
            let (stream, addr) = Listener::accept(&mut self.inner).await;
            if self.shared.reset_new_connection() {
                // Linger 0 turns the close into a TCP reset, as from a crashing process.
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }
            match self.connections.track(stream) {
                Ok(tracked) => return (tracked, addr),
                Err(err) => {
                    tracing::warn!(%addr, "dropping connection that cannot be tracked: {err}")
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that unregisters itself when the connection is dropped.
pub(crate) struct TrackedStream {
    inner: TcpStream,
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.connections.forget(self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
