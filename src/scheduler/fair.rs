//! Fair share between clients, priorities and aging: the order of one model's waiting tasks.
//!
//! Clients are served in turn, weighted by each task's estimated service time, with
//! start-time fair queuing (Goyal, Vin & Cheng, 1996: the virtual-time form of weighted
//! deficit round-robin that needs no rounds): a task's *start tag* is the later of the fleet's
//! virtual time and its client's last finish tag, and its finish tag is that plus its
//! estimated service time. Tasks go in start-tag order, so a client of long tasks gets no more
//! GPU time than one of short tasks, a client that sends 500 tasks at once does not push a
//! later client's one task behind all of them, and a client's own tasks stay first come,
//! first served.
//!
//! Priority (lower runs earlier, vLLM's convention) comes before the turn: a priority -1 call
//! goes ahead of every waiting priority-0 task, its own client's included. Aging: a waiting
//! task's priority improves by one for every [`PRIORITY_STEP`] it has waited, so it overtakes
//! newer tasks of a better priority in time and nothing starves. Fairness is a term of placement, not a second queue: placement orders
//! models by their next task's aged rank (after overdue work and scarcity), so a client with
//! nothing running goes before a battery's next task of another model too.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::task::TaskId;

/// How long a task waits to gain one step of priority (aging).
pub const PRIORITY_STEP: Duration = Duration::from_secs(60);

/// Clients whose last finish tag is behind the virtual time carry no information; the table
/// is pruned of them when it grows past this.
const MAX_CLIENTS: usize = 4096;

/// A waiting task's place in its model's line: lower goes first. `priority` as asked (aging
/// is applied when the line is read), then `rank`, the start tag in microseconds of virtual
/// service, then arrival. `cost`: the virtual service its client was charged for it
/// (microseconds; never decides the order, `id` is unique).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    pub priority: i32,
    pub rank: i64,
    pub id: TaskId,
    pub cost: i64,
}

/// A task's place among all waiting tasks once aging is applied: (priority, rank).
pub type Order = (i32, i64);

/// The fleet's virtual clock and each client's tags (microseconds of virtual service).
#[derive(Debug, Default)]
pub struct FairShare {
    virtual_now: i64,
    clients: HashMap<String, ClientTags>,
}

/// One client's finish tags: its next task starts after the latest of them.
#[derive(Debug)]
struct ClientTags {
    /// Finish tag of the latest of its tasks that started.
    started: i64,
    /// Finish tags of its keyed tasks that have not started, with their ids: one that leaves
    /// without running takes its tag with it.
    waiting: BTreeSet<(i64, TaskId)>,
}

impl Default for ClientTags {
    fn default() -> Self {
        Self {
            started: i64::MIN,
            waiting: BTreeSet::new(),
        }
    }
}

impl ClientTags {
    fn finish(&self) -> i64 {
        self.waiting
            .last()
            .map_or(self.started, |&(f, _)| f.max(self.started))
    }
}

impl FairShare {
    /// The key of a task that joins the line now: client `client`, priority `priority`,
    /// estimated service `cost`.
    pub fn key(&mut self, client: &str, priority: i32, cost: Duration, id: TaskId) -> QueueKey {
        if self.clients.len() > MAX_CLIENTS {
            let now = self.virtual_now;
            self.clients
                .retain(|_, c| !c.waiting.is_empty() || c.started > now);
        }
        let cost = micros(cost).max(1);
        let tags = self.clients.entry(client.to_string()).or_default();
        let start = tags.finish().max(self.virtual_now);
        tags.waiting.insert((start.saturating_add(cost), id));
        QueueKey {
            priority,
            rank: start,
            id,
            cost,
        }
    }

    /// A task keyed for `client` left before it ever ran (cancelled, timed out in the queue,
    /// its model gone): its tag goes, so the client's next task is not placed behind it.
    /// Without this, a client that withdrew a queued battery found its next one behind every
    /// other client's work for as long as the withdrawn battery would have run. The client's
    /// tasks still waiting keep their places (first come, first served within a client).
    pub fn withdrawn(&mut self, client: &str, key: QueueKey) {
        if let Some(tags) = self.clients.get_mut(client) {
            tags.waiting
                .remove(&(key.rank.saturating_add(key.cost), key.id));
        }
    }

    /// A task of `client` with this key started: the virtual time moves to its start tag.
    pub fn started(&mut self, client: &str, key: QueueKey) {
        self.virtual_now = self.virtual_now.max(key.rank);
        let finish = key.rank.saturating_add(key.cost);
        if let Some(tags) = self.clients.get_mut(client)
            && tags.waiting.remove(&(finish, key.id))
        {
            tags.started = tags.started.max(finish);
        }
    }

    /// A key for a task that joins the line without one (not submitted through the state
    /// machine's `submit`): at the current virtual time.
    pub fn requeue_key(&self, priority: i32, id: TaskId) -> QueueKey {
        QueueKey {
            priority,
            rank: self.virtual_now,
            id,
            cost: 0,
        }
    }
}

/// One model's waiting tasks, in rank order and in arrival order (ids grow with arrival; a
/// retried task keeps its id).
#[derive(Debug)]
pub struct ModelQueue<T> {
    by_rank: BTreeMap<QueueKey, T>,
    by_id: BTreeMap<TaskId, (QueueKey, Instant)>,
    /// When a task of each priority last started from this line: aging counts the time a
    /// priority has been passed over, not the time its tasks have waited.
    served: BTreeMap<i32, Instant>,
}

impl<T> Default for ModelQueue<T> {
    fn default() -> Self {
        Self {
            by_rank: BTreeMap::new(),
            by_id: BTreeMap::new(),
            served: BTreeMap::new(),
        }
    }
}

impl<T> ModelQueue<T> {
    /// Adds a task that arrived (or was enqueued) at `at`; returns its 1-based place in rank
    /// order when that is at most `told` (only the first few places are told to clients, and
    /// counting further would walk a long line on every submit).
    pub fn insert(&mut self, key: QueueKey, at: Instant, task: T, told: usize) -> Option<usize> {
        self.by_id.insert(key.id, (key, at));
        self.by_rank.insert(key, task);
        let ahead = self.by_rank.range(..key).take(told).count();
        (ahead < told).then_some(ahead + 1)
    }

    pub fn remove(&mut self, id: TaskId) -> Option<(QueueKey, T)> {
        let (key, _) = self.by_id.remove(&id)?;
        self.by_rank.remove(&key).map(|t| (key, t))
    }

    pub fn key(&self, id: TaskId) -> Option<QueueKey> {
        self.by_id.get(&id).map(|(k, _)| *k)
    }

    pub fn get(&self, id: TaskId) -> Option<&T> {
        self.by_id.get(&id).and_then(|(k, _)| self.by_rank.get(k))
    }

    pub fn len(&self) -> usize {
        self.by_rank.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_rank.is_empty()
    }

    /// The tasks in rank order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.by_rank.values()
    }

    /// Ids in arrival order.
    pub fn ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.by_id.keys().copied()
    }

    /// Every task, in arrival order.
    pub fn into_tasks(mut self) -> Vec<T> {
        let order: Vec<QueueKey> = self.by_id.values().map(|(k, _)| *k).collect();
        order
            .into_iter()
            .filter_map(|k| self.by_rank.remove(&k))
            .collect()
    }

    /// The task that has waited longest.
    pub fn oldest(&self) -> Option<(TaskId, &T)> {
        let (&id, (key, _)) = self.by_id.first_key_value()?;
        Some((id, &self.by_rank[key]))
    }

    /// A task of `priority` started from this line at `now`.
    pub fn started(&mut self, priority: i32, now: Instant) {
        self.served.insert(priority, now);
    }

    /// The task to run next and its place among models' next tasks: the first in key order,
    /// unless the task that has waited longest is of a worse priority that has been passed
    /// over long enough to reach the first one's (one step per [`PRIORITY_STEP`] without a
    /// start of its priority); then it goes first. Age alone does not count: a battery's
    /// tasks are always the oldest, and would otherwise put every urgent call, or within a
    /// priority every newcomer's call, behind all of them again.
    pub fn next(&self, now: Instant) -> Option<(TaskId, &T, Order)> {
        let (head_key, head) = self.by_rank.first_key_value()?;
        let (&oldest_id, (oldest_key, at)) = self.by_id.first_key_value()?;
        let since = self
            .served
            .get(&oldest_key.priority)
            .map_or(*at, |s| (*s).max(*at));
        let waited = now.saturating_duration_since(since);
        let steps = (waited.as_secs() / PRIORITY_STEP.as_secs()).min(i32::MAX as u64) as i32;
        if oldest_key.priority > head_key.priority
            && oldest_key.priority.saturating_sub(steps) <= head_key.priority
        {
            let order = (head_key.priority, oldest_key.rank.min(head_key.rank));
            return Some((oldest_id, &self.by_rank[oldest_key], order));
        }
        Some((head_key.id, head, (head_key.priority, head_key.rank)))
    }
}

/// Tasks completed per client, for status pages; at most [`MAX_CLIENTS`] clients are kept
/// (the ones served least are forgotten first).
#[derive(Debug, Default)]
pub struct Served(HashMap<String, u64>);

impl Served {
    pub fn record(&mut self, client: &str) {
        if let Some(n) = self.0.get_mut(client) {
            *n += 1;
            return;
        }
        if self.0.len() >= MAX_CLIENTS
            && let Some(least) = self
                .0
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone())
        {
            self.0.remove(&least);
        }
        self.0.insert(client.to_string(), 1);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, n)| (k.as_str(), *n))
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Duration = Duration::from_secs(10);

    /// The order in which tasks leave a line that `FairShare` keyed, serving them one at a
    /// time with no waiting (aging off).
    fn drain(fair: &mut FairShare, q: &mut ModelQueue<(String, i32)>, now: Instant) -> Vec<String> {
        let mut order = Vec::new();
        while let Some((id, _, _)) = q.next(now) {
            let (key, (client, _)) = q.remove(id).unwrap();
            fair.started(&client, key);
            order.push(client);
        }
        order
    }

    #[test]
    fn two_clients_that_queue_at_once_are_served_in_turn() {
        let now = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        let mut id = 0;
        for client in ["a", "b"] {
            for _ in 0..3 {
                id += 1;
                let key = fair.key(client, 0, TEN, TaskId(id));
                q.insert(key, now, (client.to_string(), 0), 8);
            }
        }
        assert_eq!(
            drain(&mut fair, &mut q, now),
            ["a", "b", "a", "b", "a", "b"]
        );
    }

    #[test]
    fn a_late_client_does_not_wait_behind_a_whole_battery() {
        let now = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        for i in 0..100 {
            let key = fair.key("battery", 0, TEN, TaskId(i));
            q.insert(key, now, ("battery".to_string(), 0), 8);
        }
        // Ten tasks of the battery start, then an agent's one call arrives.
        for _ in 0..10 {
            let (id, _, _) = q.next(now).unwrap();
            let (key, (client, _)) = q.remove(id).unwrap();
            fair.started(&client, key);
        }
        let key = fair.key("agent", 0, TEN, TaskId(1000));
        let place = q.insert(key, now, ("agent".to_string(), 0), 8);
        assert!(
            place.is_some_and(|p| p <= 2),
            "the agent's call is at place {place:?}"
        );
    }

    #[test]
    fn long_tasks_weigh_more_than_short_ones() {
        let now = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        let mut id = 0;
        for _ in 0..4 {
            id += 1;
            let key = fair.key("long", 0, 4 * TEN, TaskId(id));
            q.insert(key, now, ("long".to_string(), 0), 8);
        }
        for _ in 0..8 {
            id += 1;
            let key = fair.key("short", 0, TEN, TaskId(id));
            q.insert(key, now, ("short".to_string(), 0), 8);
        }
        let order = drain(&mut fair, &mut q, now);
        // In the first 80 s of service: long gets 2 tasks (80 s), short gets 4 (40 s)... at
        // most one long task ahead of its share at any point.
        let first_six: Vec<&str> = order.iter().take(6).map(String::as_str).collect();
        let longs = first_six.iter().filter(|c| **c == "long").count();
        assert!(longs <= 2, "{first_six:?}");
    }

    #[test]
    fn priority_goes_first_and_aging_catches_up() {
        let t0 = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        let batch = fair.key("batch", 0, TEN, TaskId(1));
        q.insert(batch, t0, ("batch".to_string(), 0), 8);
        let urgent = fair.key("judge", -1, TEN, TaskId(2));
        q.insert(urgent, t0, ("judge".to_string(), -1), 8);
        assert_eq!(q.next(t0).unwrap().0, TaskId(2), "priority -1 first");
        // Same line, but the batch task has waited more than a step longer than the urgent
        // one: it has aged past it.
        let mut q2 = ModelQueue::default();
        q2.insert(batch, t0, ("batch".to_string(), 0), 8);
        let late = t0 + PRIORITY_STEP + Duration::from_secs(1);
        q2.insert(urgent, late, ("judge".to_string(), -1), 8);
        let later = late + Duration::from_secs(1);
        assert_eq!(q2.next(later).unwrap().0, TaskId(1), "aged past");
    }

    #[test]
    fn a_withdrawn_battery_gives_its_client_the_turn_back() {
        let now = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        let mut id = 0;
        for client in ["quitter", "other"] {
            for _ in 0..20 {
                id += 1;
                let key = fair.key(client, 0, TEN, TaskId(id));
                q.insert(key, now, (client.to_string(), 0), 8);
            }
        }
        // The quitter cancels its whole battery before any of it ran.
        for i in 1..=20 {
            let (key, (client, _)) = q.remove(TaskId(i)).unwrap();
            fair.withdrawn(&client, key);
        }
        // Two of the other client's tasks run, then the quitter sends one call.
        for _ in 0..2 {
            let (next, _, _) = q.next(now).unwrap();
            let (key, (client, _)) = q.remove(next).unwrap();
            fair.started(&client, key);
        }
        let key = fair.key("quitter", 0, TEN, TaskId(100));
        let place = q.insert(key, now, ("quitter".to_string(), 0), 8);
        assert_eq!(
            place,
            Some(1),
            "the call waits behind the other client's battery"
        );
    }

    #[test]
    fn a_clients_own_tasks_stay_in_order() {
        let now = Instant::now();
        let (mut fair, mut q) = (FairShare::default(), ModelQueue::default());
        let ids: Vec<TaskId> = (1..=5).map(TaskId).collect();
        for &id in &ids {
            let key = fair.key("c", 0, TEN, id);
            q.insert(key, now, ("c".to_string(), 0), 8);
        }
        let mut seen = Vec::new();
        while let Some((id, _, _)) = q.next(now) {
            seen.push(id);
            q.remove(id);
        }
        assert_eq!(seen, ids);
    }
}
