//! MCP sessions over Streamable HTTP that are never dropped while a call is in flight.
//!
//! rmcp's [`LocalSessionManager`] ends a session after `keep_alive` (default 300 s) with no
//! event on it, whatever is in flight (`SessionConfig::keep_alive`, rmcp 3.11
//! `session/local.rs`: the timer restarts only on an event). A call waiting in the queue, or
//! on a model load inside the 600 s first-token timeout, sends no event, so its stream closed
//! with no response, the task was cancelled, and the session's next request got HTTP 500
//! `Session service terminated`, which clients do not recover from (the spec has them
//! re-initialise only on 404).
//!
//! [`Sessions`] wraps it: rmcp's own timer is off; a session expires only when no call has
//! been in flight on it for the idle limit (`[server] session_idle_seconds`), and an expired
//! or unknown session answers 404 (rmcp does that when `has_session` says no), so clients
//! start a new one. Idle sessions are swept on a timer ([`Sessions::sweep`]) as well as
//! on each new request.
//!
//! Each session also keeps its 2025-11-25 task state ([`SessionTasks`], registered by the
//! `/mcp` task layer at `initialize`); when the session ends its working tasks are cancelled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    ServerSseMessage, SessionId, SessionManager,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::tasks::SessionTasks;

/// Default of `[server] session_idle_seconds`: longer than any wait of the daemon's own (the
/// 600 s first-token timeout, the 300 s inactivity timeout), though those no longer matter:
/// a session with a call in flight never expires.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(3600);

/// When each session was last used, and how many of its calls are running.
#[derive(Debug)]
struct Activity {
    last: Instant,
    in_flight: usize,
    /// Its 2025-11-25 tasks, once the task layer has registered them.
    tasks: Option<SessionTasks>,
}

impl Activity {
    /// The session is over: its tasks stop (no other session can reach them).
    fn end(self) {
        if let Some(tasks) = self.tasks {
            tasks.wire.end();
        }
    }
}

/// rmcp's in-memory sessions, expired by the daemon's rule instead of rmcp's keep-alive.
#[derive(Debug)]
pub struct Sessions {
    inner: LocalSessionManager,
    activity: Arc<Mutex<HashMap<SessionId, Activity>>>,
    idle: Duration,
}

impl Sessions {
    /// Sessions that expire after `idle` with no call in flight.
    pub fn new(idle: Duration) -> Self {
        let mut inner = LocalSessionManager::default();
        // Our rule replaces it: rmcp's timer would end a session with a call in flight.
        inner.session_config.keep_alive = None;
        Self {
            inner,
            activity: Arc::default(),
            idle,
        }
    }

    fn activity(&self) -> MutexGuard<'_, HashMap<SessionId, Activity>> {
        self.activity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn touch(&self, id: &SessionId) {
        if let Some(a) = self.activity().get_mut(id) {
            a.last = Instant::now();
        }
    }

    /// Keeps `tasks` with session `id` (no-op if it has ended meanwhile).
    pub fn attach_tasks(&self, id: &SessionId, tasks: SessionTasks) {
        if let Some(a) = self.activity().get_mut(id) {
            a.tasks = Some(tasks);
        }
    }

    /// Session `id`'s task state, if it is live and registered. Looking does not count as a
    /// use (a request rmcp answers is counted by rmcp's path; one the task layer answers by
    /// [`Sessions::used`]); a session idle past the limit has none, so the request goes on to
    /// rmcp, which ends the session and answers 404.
    pub fn tasks(&self, id: &SessionId) -> Option<SessionTasks> {
        let activity = self.activity();
        let a = activity.get(id)?;
        let expired = a.in_flight == 0 && a.last.elapsed() > self.idle;
        if expired { None } else { a.tasks.clone() }
    }

    /// A request the task layer answered itself used session `id`.
    pub fn used(&self, id: &SessionId) {
        self.touch(id);
    }

    /// A request the task layer answers itself is in flight on session `id` until the guard
    /// drops: a `tasks/result` that waits for a long call keeps the session alive, as a call
    /// rmcp serves does.
    pub fn in_flight(&self, id: &SessionId) -> impl Drop + use<> {
        InFlight::start(id, &self.activity)
    }

    /// Expires idle sessions every quarter of the idle limit (at most every 30 s, at least
    /// every 50 ms) until `stop`, or until the sessions are dropped: a session whose client
    /// went away without a word must not wait for another client's request to end (its
    /// working tasks would run on, and its state stay). Needs a Tokio runtime.
    pub fn sweep(self: &Arc<Self>, stop: CancellationToken) {
        let period = (self.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let sessions = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match sessions.upgrade() {
                    Some(sessions) => sessions.expire().await,
                    None => return,
                }
            }
        });
    }

    /// Closes every session idle for longer than the limit with no call in flight.
    async fn expire(&self) {
        let expired: Vec<SessionId> = {
            let mut activity = self.activity();
            let now = Instant::now();
            let expired: Vec<SessionId> = activity
                .iter()
                .filter(|(_, a)| a.in_flight == 0 && now.duration_since(a.last) > self.idle)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                if let Some(ended) = activity.remove(id) {
                    ended.end();
                }
            }
            expired
        };
        for id in expired {
            tracing::info!(session = %id, idle_seconds = self.idle.as_secs_f64(), "MCP session expired: idle with no call in flight");
            if let Err(e) = self.inner.close_session(&id).await {
                tracing::debug!(session = %id, error = %e, "closing an expired session");
            }
        }
    }
}

/// Counts one call as in flight for as long as its response stream lives.
struct InFlight {
    id: SessionId,
    activity: Arc<Mutex<HashMap<SessionId, Activity>>>,
}

impl InFlight {
    fn start(id: &SessionId, activity: &Arc<Mutex<HashMap<SessionId, Activity>>>) -> Self {
        if let Some(a) = activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(id)
        {
            a.in_flight += 1;
            a.last = Instant::now();
        }
        Self {
            id: id.clone(),
            activity: Arc::clone(activity),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(a) = self
            .activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.id)
        {
            a.in_flight = a.in_flight.saturating_sub(1);
            a.last = Instant::now();
        }
    }
}

impl SessionManager for Sessions {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.expire().await;
        let (id, transport) = self.inner.create_session().await?;
        self.activity().insert(
            id.clone(),
            Activity {
                last: Instant::now(),
                in_flight: 0,
                tasks: None,
            },
        );
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.touch(id);
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.expire().await;
        if !self.activity().contains_key(id) {
            return Ok(false);
        }
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let ended = self.activity().remove(id);
        if let Some(ended) = ended {
            ended.end();
        }
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let guard = InFlight::start(id, &self.activity);
        let stream = self.inner.create_stream(id, message).await?;
        Ok(Guarded {
            inner: Box::pin(stream),
            _guard: guard,
        })
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.touch(id);
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id);
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let guard = InFlight::start(id, &self.activity);
        let stream = self.inner.resume(id, last_event_id).await?;
        Ok(Guarded {
            inner: Box::pin(stream),
            _guard: guard,
        })
    }
}

/// A response stream that keeps its call counted as in flight until it ends or is dropped.
struct Guarded<S> {
    inner: std::pin::Pin<Box<S>>,
    _guard: InFlight,
}

impl<S: Stream> Stream for Guarded<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
