//! MCP Tasks: long tool calls answered at once with a task id, run detached, polled by the
//! client (issue 13 item 5). This is the store, without any protocol: what each task is doing,
//! its result once done, expiry after its time-to-live, and a bound on how many are kept.
//!
//! Two wire forms are served from this one store: the `io.modelcontextprotocol/tasks`
//! extension (SEP-2663; the types are rmcp 3.11's `rmcp::model::task`; handlers in `mcp.rs`),
//! and the 2025-11-25 experimental form (`params.task` on `tools/call`, `tasks/get`,
//! `tasks/result`, `tasks/list`, `tasks/cancel`; served in front of rmcp by `mcp_tasks_wire.rs`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rmcp::model::CallToolResult;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mcp_progress::Phase;

/// How long a task and its result are kept from its creation (the spec's `ttlMs`), 1 hour.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The shortest time a task is kept, whatever the client asks: a result kept for less than
/// the task's own run could never be fetched, and the GPU time would be spent for nothing
/// (the task's `ttl` field says what was granted, as the 2025-11-25 spec lets a server).
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Most tasks kept at once, finished ones included.
pub const DEFAULT_MAX_TASKS: usize = 1000;
/// How often clients are asked to poll `tasks/get` (the spec's `pollIntervalMs`), 1 s.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a task operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error(
        "no task {0}: it never existed, belongs to another client, or expired after its \
         time-to-live; start the call again"
    )]
    NotFound(String),
    #[error("task {id} has already ended ({status}); there is nothing to cancel")]
    Ended { id: String, status: &'static str },
    #[error(
        "{0} tasks are running or waiting to be fetched, the most this daemon keeps; fetch or \
         cancel some, or call without a task"
    )]
    Full(usize),
}

/// Where a task is.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Queued or running; the phase says where.
    Active(Phase),
    /// Ended with a result: the call's result exactly as a plain call returns it.
    Completed(CallToolResult),
    /// Ended with a tool error (`isError: true`, same result as a plain call).
    Failed(CallToolResult),
    Cancelled,
}

impl State {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, State::Active(_))
    }

    /// The spec's status name.
    pub fn status(&self) -> &'static str {
        match self {
            State::Active(_) => "working",
            State::Completed(_) => "completed",
            State::Failed(_) => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

/// One task as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub model: String,
    pub state: State,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub ttl: Duration,
}

struct Entry {
    owner: Option<u64>,
    model: String,
    state: State,
    created: SystemTime,
    updated: SystemTime,
    born: Instant,
    /// This task's time-to-live: the store's, or less if the client asked for less.
    ttl: Duration,
    cancel: CancellationToken,
}

impl Entry {
    fn snapshot(&self, id: &str) -> Snapshot {
        Snapshot {
            id: id.to_string(),
            model: self.model.clone(),
            state: self.state.clone(),
            created: self.created,
            updated: self.updated,
            ttl: self.ttl,
        }
    }
}

/// Every MCP task of the daemon. Tasks are bound to the client that made them when it is
/// known (`owner`); a task of an anonymous client (stateless HTTP) is found by its id alone,
/// an unguessable random one.
pub struct TaskStore {
    tasks: Mutex<HashMap<String, Entry>>,
    ttl: Duration,
    max: usize,
    /// Woken at every change of state, for [`TaskStore::wait_end`].
    changed: Notify,
}

impl Default for TaskStore {
    fn default() -> Self {
        Self::new(DEFAULT_TTL, DEFAULT_MAX_TASKS)
    }
}

impl TaskStore {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            tasks: Mutex::new(HashMap::new()),
            ttl,
            max,
            changed: Notify::new(),
        }
    }

    /// The longest time-to-live of a task, from its creation (the default one).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops finished tasks past their time-to-live. A task still working is never dropped.
    fn purge(&self, tasks: &mut HashMap<String, Entry>) {
        tasks.retain(|_, e| !(e.state.is_terminal() && e.born.elapsed() >= e.ttl));
    }

    /// A new working task for `model`: its id, and the token that cancels it. `ttl` is the
    /// client's wish (the 2025-11-25 form's `task.ttl`); it may shorten the store's
    /// time-to-live, never lengthen it (the spec lets a server pick its own).
    pub fn create(
        &self,
        owner: Option<u64>,
        model: &str,
        ttl: Option<Duration>,
    ) -> Result<(Snapshot, CancellationToken), TaskError> {
        let mut tasks = self.lock();
        self.purge(&mut tasks);
        if tasks.len() >= self.max {
            // Room is made from finished tasks only, oldest first: a waiting client's work is
            // never thrown away for a new one.
            let oldest = tasks
                .iter()
                .filter(|(_, e)| e.state.is_terminal())
                .min_by_key(|(_, e)| e.born)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    tasks.remove(&id);
                }
                None => return Err(TaskError::Full(self.max)),
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = SystemTime::now();
        let cancel = CancellationToken::new();
        let entry = Entry {
            owner,
            model: model.to_string(),
            state: State::Active(Phase::Submitted),
            created: now,
            updated: now,
            born: Instant::now(),
            ttl: ttl.map_or(self.ttl, |asked| {
                asked.clamp(MIN_TTL.min(self.ttl), self.ttl)
            }),
            cancel: cancel.clone(),
        };
        let snapshot = entry.snapshot(&id);
        tasks.insert(id, entry);
        Ok((snapshot, cancel))
    }

    /// Records a new state; a task that has ended keeps its end (a late result does not
    /// undo a cancel).
    pub fn update(&self, id: &str, state: State) {
        let mut tasks = self.lock();
        if let Some(entry) = tasks.get_mut(id)
            && !entry.state.is_terminal()
        {
            entry.state = state;
            entry.updated = SystemTime::now();
            self.changed.notify_waiters();
        }
    }

    /// The task `id` as `owner` may see it.
    pub fn get(&self, id: &str, owner: Option<u64>) -> Result<Snapshot, TaskError> {
        let mut tasks = self.lock();
        self.purge(&mut tasks);
        match tasks.get(id) {
            Some(entry) if visible(entry, owner) => Ok(entry.snapshot(id)),
            _ => Err(TaskError::NotFound(id.to_string())),
        }
    }

    /// Every task `owner` may see, oldest first.
    pub fn list(&self, owner: Option<u64>) -> Vec<Snapshot> {
        let mut tasks = self.lock();
        self.purge(&mut tasks);
        let mut seen: Vec<(&String, &Entry)> =
            tasks.iter().filter(|(_, e)| visible(e, owner)).collect();
        seen.sort_by_key(|(_, e)| e.born);
        seen.into_iter().map(|(id, e)| e.snapshot(id)).collect()
    }

    /// Cancels a working task: it is marked cancelled at once and its token fired, which
    /// takes it out of the queue or off its host.
    pub fn cancel(&self, id: &str, owner: Option<u64>) -> Result<Snapshot, TaskError> {
        let mut tasks = self.lock();
        self.purge(&mut tasks);
        let entry = match tasks.get_mut(id) {
            Some(entry) if visible(entry, owner) => entry,
            _ => return Err(TaskError::NotFound(id.to_string())),
        };
        if entry.state.is_terminal() {
            return Err(TaskError::Ended {
                id: id.to_string(),
                status: entry.state.status(),
            });
        }
        entry.state = State::Cancelled;
        entry.updated = SystemTime::now();
        entry.cancel.cancel();
        let snapshot = entry.snapshot(id);
        self.changed.notify_waiters();
        Ok(snapshot)
    }

    /// The task `id` once it has ended (the 2025-11-25 form's `tasks/result` blocks so).
    /// A task that expires or disappears meanwhile is `NotFound`.
    pub async fn wait_end(&self, id: &str, owner: Option<u64>) -> Result<Snapshot, TaskError> {
        loop {
            // Registered before the look, so a change between the look and the wait wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let task = self.get(id, owner)?;
            if task.state.is_terminal() {
                return Ok(task);
            }
            changed.await;
        }
    }

    /// Cancels every working task of `owner` (its client went away).
    pub fn cancel_all_of(&self, owner: u64) {
        let mut tasks = self.lock();
        for entry in tasks.values_mut() {
            if entry.owner == Some(owner) && !entry.state.is_terminal() {
                entry.state = State::Cancelled;
                entry.updated = SystemTime::now();
                entry.cancel.cancel();
            }
        }
        self.changed.notify_waiters();
    }
}

fn visible(entry: &Entry, owner: Option<u64>) -> bool {
    entry.owner.is_none() || entry.owner == owner
}

/// `time` as an ISO 8601 UTC timestamp with milliseconds, e.g. `2026-11-27T10:30:00.123Z`
/// (the spec's `createdAt` / `lastUpdatedAt`).
pub fn iso8601(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date, counting in 400-year eras of 146097 days that
    // start on a 1 March, so the leap day falls at the end of each year.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::ContentBlock;

    fn done() -> State {
        State::Completed(CallToolResult::success(vec![ContentBlock::text("hi")]))
    }

    #[tokio::test]
    async fn a_shorter_ttl_is_kept_and_waiting_ends_with_the_task() {
        let store = std::sync::Arc::new(TaskStore::default());
        let (task, _) = store
            .create(None, "m", Some(Duration::from_secs(300)))
            .unwrap();
        assert_eq!(task.ttl, Duration::from_secs(300));
        let (long, _) = store.create(None, "m", Some(DEFAULT_TTL * 2)).unwrap();
        assert_eq!(long.ttl, DEFAULT_TTL, "never longer than the store's");
        let (short, _) = store.create(None, "m", Some(Duration::ZERO)).unwrap();
        assert_eq!(short.ttl, MIN_TTL, "never shorter than a minute");
        let waiter = {
            let store = store.clone();
            let id = task.id.clone();
            tokio::spawn(async move { store.wait_end(&id, None).await })
        };
        tokio::task::yield_now().await;
        store.update(&task.id, done());
        let ended = waiter.await.unwrap().unwrap();
        assert_eq!(ended.state, done());
    }

    #[test]
    fn timestamps_are_iso_8601_utc() {
        let at = |s: u64| iso8601(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_752_858), "2026-11-27T04:14:18.000Z");
    }

    #[test]
    fn a_task_is_seen_by_its_owner_only_and_ends_once() {
        let store = TaskStore::default();
        let (task, cancel) = store.create(Some(1), "m", None).unwrap();
        assert_eq!(
            store.get(&task.id, Some(1)).unwrap().state.status(),
            "working"
        );
        assert!(matches!(
            store.get(&task.id, Some(2)),
            Err(TaskError::NotFound(_))
        ));
        assert_eq!(store.list(Some(2)), []);
        store.cancel(&task.id, Some(1)).unwrap();
        assert!(cancel.is_cancelled());
        // The result that arrives after the cancel does not undo it.
        store.update(&task.id, done());
        assert_eq!(
            store.get(&task.id, Some(1)).unwrap().state,
            State::Cancelled
        );
        assert!(matches!(
            store.cancel(&task.id, Some(1)),
            Err(TaskError::Ended {
                status: "cancelled",
                ..
            })
        ));
    }

    #[test]
    fn finished_tasks_make_room_and_expire_working_ones_never() {
        let store = TaskStore::new(DEFAULT_TTL, 2);
        let (a, _) = store.create(None, "m", None).unwrap();
        let (b, _) = store.create(None, "m", None).unwrap();
        assert!(matches!(
            store.create(None, "m", None),
            Err(TaskError::Full(2))
        ));
        store.update(&a.id, done());
        store.create(None, "m", None).unwrap();
        assert!(
            store.get(&a.id, None).is_err(),
            "the oldest finished task made room"
        );
        assert!(store.get(&b.id, None).is_ok());

        // With no time-to-live a finished task is gone at once; a working one stays.
        let store = TaskStore::new(Duration::ZERO, 10);
        let (done_task, _) = store.create(None, "m", None).unwrap();
        let (working, _) = store.create(None, "m", None).unwrap();
        store.update(&done_task.id, done());
        assert!(store.get(&done_task.id, None).is_err(), "expired");
        assert!(store.get(&working.id, None).is_ok(), "still working, kept");
    }
}
