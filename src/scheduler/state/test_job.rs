//! The task the state machine's unit tests queue: an id, a model, an arrival time.

use std::time::Duration;

use tokio::time::Instant;

use super::Queueable;
use crate::task::TaskId;

#[derive(Debug)]
pub(super) struct Job {
    pub id: u64,
    pub model: String,
    pub at: Instant,
}

impl Job {
    pub fn new(id: u64, model: &str, at: Instant) -> Job {
        Job {
            id,
            model: model.to_string(),
            at,
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
}
