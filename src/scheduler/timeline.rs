//! What the hosts did recently, for the status page's timeline and the busy-time metrics.
//!
//! The actor keeps, per host, a busy clock (time with at least one request in flight, and
//! request-seconds) and a bounded ring of recent task spans; for the fleet, a queue-depth
//! series sampled every [`SAMPLE_EVERY`]. All of it is bounded: spans and samples older than
//! [`WINDOW`] are dropped, and a host keeps at most [`MAX_SPANS_PER_HOST`] spans, so `/status`
//! stays small (about 150 bytes a span, 40 a sample: under 100 KB for a host, whatever the
//! load). None of it feeds decisions.

use std::collections::VecDeque;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use tokio::time::Instant;

/// How far back the timeline reaches.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Most spans kept per host (a host running many short tasks keeps less than [`WINDOW`]).
pub const MAX_SPANS_PER_HOST: usize = 500;
/// How often the queue depth and the hosts' busy clocks are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: [`WINDOW`] at [`SAMPLE_EVERY`], and one to spare.
const MAX_SAMPLES: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 1;

/// Time a host had requests in flight, advanced at every change of its in-flight count and
/// read at any instant (so it grows while a long task runs, not only when it ends).
#[derive(Debug, Clone)]
pub struct BusyClock {
    last: Instant,
    in_flight: usize,
    /// Time with at least one request in flight, up to `last`.
    busy: Duration,
    /// Request-time: each in-flight request counts, so a full 2-slot host adds 2 s a second.
    slot_busy: Duration,
}

impl BusyClock {
    pub fn new(now: Instant) -> Self {
        Self {
            last: now,
            in_flight: 0,
            busy: Duration::ZERO,
            slot_busy: Duration::ZERO,
        }
    }

    /// The host has `in_flight` requests from `now` on.
    pub fn set(&mut self, now: Instant, in_flight: usize) {
        (self.busy, self.slot_busy) = self.read(now);
        self.last = now;
        self.in_flight = in_flight;
    }

    /// (busy, request-time) up to `now`.
    pub fn read(&self, now: Instant) -> (Duration, Duration) {
        let since = now.saturating_duration_since(self.last);
        let busy = if self.in_flight > 0 {
            since
        } else {
            Duration::ZERO
        };
        let in_flight = u32::try_from(self.in_flight).unwrap_or(u32::MAX);
        (self.busy + busy, self.slot_busy + since * in_flight)
    }
}

/// How a span ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpanEnd {
    Completed,
    Failed,
    Cancelled,
    /// Given back before the host answered; the task went back to the queue.
    Retried,
}

/// One task's stay on a host (one attempt). Times are milliseconds since the daemon started
/// (the same clock as [`Timeline::now_ms`]).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TaskSpan {
    pub task: u64,
    pub model: String,
    /// The slot row it ran in: the lowest row free on its host when it started (slots are
    /// interchangeable; rows only keep bars from overlapping).
    pub slot: usize,
    /// The host did not hold the model: the request loaded it (its load ends at the first
    /// byte).
    pub cold: bool,
    pub start_ms: f64,
    /// The host's first byte; known for completed tasks and for running cold starts.
    pub first_byte_ms: Option<f64>,
    /// `None` while it runs.
    pub end_ms: Option<f64>,
    pub outcome: Option<SpanEnd>,
}

/// One sample of the fleet.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
pub struct QueueSample {
    /// Milliseconds since the daemon started.
    pub t_ms: f64,
    /// Tasks waiting.
    pub queued: usize,
    /// Tasks running on hosts.
    pub running: usize,
}

/// One host's recent history, as `/status` shows it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HostTimeline {
    pub host: String,
    pub slots: usize,
    /// Share of the time, 0 to 1, the host had at least one request in flight over the last
    /// [`WINDOW`] (or since it joined, if later), measured to the last sample and the present.
    pub utilisation: f64,
    /// Ended spans, oldest first, then the running ones.
    pub spans: Vec<TaskSpan>,
}

/// `/status`'s `timeline`: recent history for the status page. Bounded: spans of the last
/// `window_seconds`, at most `max_spans_per_host` per host; samples every
/// `sample_every_seconds` over the same window.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct Timeline {
    /// Milliseconds since the daemon started, now.
    pub now_ms: f64,
    pub window_seconds: f64,
    pub max_spans_per_host: usize,
    pub sample_every_seconds: f64,
    pub hosts: Vec<HostTimeline>,
    /// Queue depth and running tasks over time, oldest first.
    pub queue: Vec<QueueSample>,
}

/// One host's history as the actor keeps it.
#[derive(Debug, Clone)]
pub struct HostHistory {
    pub busy: BusyClock,
    spans: VecDeque<TaskSpan>,
    /// (when, busy time then), every [`SAMPLE_EVERY`]: utilisation over the window is the
    /// busy time gained since the oldest one.
    marks: VecDeque<(Instant, Duration)>,
}

impl HostHistory {
    pub fn new(now: Instant) -> Self {
        Self {
            busy: BusyClock::new(now),
            spans: VecDeque::new(),
            marks: VecDeque::from([(now, Duration::ZERO)]),
        }
    }

    /// A span ended; the oldest is dropped beyond [`MAX_SPANS_PER_HOST`].
    pub fn ended(&mut self, span: TaskSpan) {
        if self.spans.len() == MAX_SPANS_PER_HOST {
            self.spans.pop_front();
        }
        self.spans.push_back(span);
    }

    /// Records the busy clock and forgets what is older than the window.
    fn sample(&mut self, now: Instant, window_start_ms: f64) {
        let (busy, _) = self.busy.read(now);
        if self.marks.len() == MAX_SAMPLES {
            self.marks.pop_front();
        }
        self.marks.push_back((now, busy));
        while self
            .spans
            .front()
            .is_some_and(|s| s.end_ms.is_some_and(|end| end < window_start_ms))
        {
            self.spans.pop_front();
        }
    }

    /// Busy share since the oldest mark (0 when no time passed).
    pub fn utilisation(&self, now: Instant) -> f64 {
        let Some(&(since, busy_then)) = self.marks.front() else {
            return 0.0;
        };
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        if elapsed <= 0.0 {
            return 0.0;
        }
        let gained = self.busy.read(now).0.saturating_sub(busy_then);
        (gained.as_secs_f64() / elapsed).clamp(0.0, 1.0)
    }

    /// The ended spans, oldest first.
    pub fn spans(&self) -> impl Iterator<Item = &TaskSpan> {
        self.spans.iter()
    }
}

/// The fleet's history: the clock origin and the queue series.
#[derive(Debug, Clone)]
pub struct History {
    pub started: Instant,
    queue: VecDeque<QueueSample>,
}

impl History {
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            queue: VecDeque::new(),
        }
    }

    /// Milliseconds since the daemon started.
    pub fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64() * 1e3
    }

    /// The periodic sample: queue depth, and every host's busy clock.
    pub fn sample<'a>(
        &mut self,
        now: Instant,
        queued: usize,
        running: usize,
        hosts: impl Iterator<Item = &'a mut HostHistory>,
    ) {
        let now_ms = self.ms(now);
        let window_start_ms = now_ms - WINDOW.as_secs_f64() * 1e3;
        if self.queue.len() == MAX_SAMPLES {
            self.queue.pop_front();
        }
        self.queue.push_back(QueueSample {
            t_ms: now_ms,
            queued,
            running,
        });
        for host in hosts {
            host.sample(now, window_start_ms);
        }
    }

    /// The queue series, oldest first.
    pub fn queue(&self) -> Vec<QueueSample> {
        self.queue.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn busy_time_grows_while_a_request_runs_and_stops_when_idle() {
        let t0 = Instant::now();
        let mut clock = BusyClock::new(t0);
        clock.set(t0 + secs(1), 1);
        assert_eq!(clock.read(t0 + secs(3)), (secs(2), secs(2)), "mid-task");
        clock.set(t0 + secs(4), 2);
        clock.set(t0 + secs(5), 0);
        // Busy 1..5 = 4 s; request-time 3 s with one and 1 s with two = 5 s.
        assert_eq!(clock.read(t0 + secs(9)), (secs(4), secs(5)));
    }

    #[test]
    fn utilisation_is_measured_over_the_kept_marks() {
        let t0 = Instant::now();
        let mut host = HostHistory::new(t0);
        host.busy.set(t0, 1);
        host.busy.set(t0 + secs(1), 0);
        assert!((host.utilisation(t0 + secs(4)) - 0.25).abs() < 1e-9);
        // Marks older than the window fall off: the busy second leaves the measure.
        let mut history = History::new(t0);
        for i in 1..=MAX_SAMPLES as u64 + 1 {
            history.sample(
                t0 + SAMPLE_EVERY * i as u32,
                0,
                0,
                std::iter::once(&mut host),
            );
        }
        let now = t0 + SAMPLE_EVERY * (MAX_SAMPLES as u32 + 1);
        assert_eq!(host.utilisation(now), 0.0);
        assert_eq!(history.queue().len(), MAX_SAMPLES, "the series is bounded");
    }

    #[test]
    fn spans_are_bounded_by_count_and_by_age() {
        let t0 = Instant::now();
        let mut host = HostHistory::new(t0);
        let span = |i: u64, end_ms: f64| TaskSpan {
            task: i,
            model: "m".into(),
            slot: 0,
            cold: false,
            start_ms: end_ms - 1.0,
            first_byte_ms: None,
            end_ms: Some(end_ms),
            outcome: Some(SpanEnd::Completed),
        };
        for i in 0..MAX_SPANS_PER_HOST as u64 + 10 {
            host.ended(span(i, i as f64));
        }
        assert_eq!(host.spans().count(), MAX_SPANS_PER_HOST);
        assert_eq!(
            host.spans().next().unwrap().task,
            10,
            "the oldest went first"
        );
        host.sample(t0, 100.0);
        assert_eq!(
            host.spans().next().unwrap().task,
            100,
            "older than the window"
        );
    }
}
