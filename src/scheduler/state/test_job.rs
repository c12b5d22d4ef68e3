//! The task the state machine's unit tests queue: an id, a model, an arrival time.

use std::time::Duration;

use tokio::time::Instant;

use super::Queueable;
use crate::scheduler::fair::QueueKey;
use crate::task::TaskId;

#[derive(Debug)]
pub(super) struct Job {
    pub id: u64,
    pub model: String,
    pub at: Instant,
    pub client: String,
    pub priority: i32,
    pub key: Option<QueueKey>,
}

impl Job {
    pub fn new(id: u64, model: &str, at: Instant) -> Job {
        Job {
            id,
            model: model.to_string(),
            at,
            client: "c".to_string(),
            priority: 0,
            key: None,
        }
    }

    /// The same, from `client` with `priority`.
    pub fn from(id: u64, model: &str, at: Instant, client: &str, priority: i32) -> Job {
        Job {
            client: client.to_string(),
            priority,
            ..Job::new(id, model, at)
        }
    }
}

impl Queueable for Job {
    fn id(&self) -> TaskId {
        TaskId(self.id)
    }
    fn model(&self) -> &str {
        &self.model
    }
    fn enqueued_at(&self) -> Instant {
        self.at
    }
    fn queue_deadline(&self) -> Option<Instant> {
        None
    }
    fn attempts(&self) -> u32 {
        0
    }
    fn abandoned(&self) -> bool {
        false
    }
    fn notify_position(&self, _: usize, _: Option<Duration>) {}
    fn client_id(&self) -> &str {
        &self.client
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn queue_key(&self) -> Option<QueueKey> {
        self.key
    }
    fn set_queue_key(&mut self, key: QueueKey) {
        self.key = Some(key);
    }
}
