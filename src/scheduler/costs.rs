//! The cost model placement decides with: how long a host takes to load a model, and how
//! long a model's task runs on a host. Pure and explicit-time: fed by what finished tasks
//! show, read by [`crate::scheduler::placement`].
//!
//! A load is learned from the first-token time of a task that needed one, against the warm
//! first-token time of that model on that host (LM Studio, llama-server's router and Ollama
//! all load inside the first request, so the difference is the load). Until a host has shown
//! one, the fleet's median learned load stands in for it, and until any host has, the
//! configured `load_seconds` (default 30 s, the middle of the 5–60 s real GPUs pay for 7–30B
//! models: shared/reference/placement.md).

use std::collections::HashMap;
use std::time::Duration;

/// Weight of a new sample in the running averages: recent tasks count most, and one odd
/// task does not swing a decision.
const ALPHA: f64 = 0.3;

/// A task's service time before any task of its model finished anywhere: long enough that a
/// backlog of unknown tasks is not thought cheap to spread over cold hosts.
pub const DEFAULT_SERVICE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Ewma(f64);

impl Ewma {
    fn add(slot: &mut Option<Ewma>, sample: f64) {
        *slot = Some(match *slot {
            None => Ewma(sample),
            Some(Ewma(v)) => Ewma(v + ALPHA * (sample - v)),
        });
    }
}

/// Per host and model: load time, warm first-token time, service time (all seconds).
#[derive(Debug, Default, Clone)]
struct Learned {
    load: Option<Ewma>,
    warm_ttft: Option<Ewma>,
    service: Option<Ewma>,
    /// A cold task's whole time, seen without a first token (a non-streamed answer) before
    /// any warm one: its load is learned once a warm task shows the service time.
    cold_total: Option<f64>,
}

/// What a finished task showed: needed a load or not, its first-token time, its whole time
/// on the host (from sending to the last byte).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub cold: bool,
    pub ttft: Option<Duration>,
    pub service: Duration,
}

/// Per-host settings and everything learned so far.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// Per host (by index), the configured load time.
    configured_load: Vec<Duration>,
    /// Per host, per model. Looked up on every placement decision, so by `&str` (no key built).
    learned: HashMap<usize, HashMap<String, Learned>>,
    /// The fallbacks, recomputed when something is learned (not on every decision).
    fallback: Fallback,
    /// Per model, every host's service times pooled: what a backlog is priced with.
    pooled: HashMap<String, Pooled>,
}

/// A running mean over the first [`POOL_WINDOW`] samples, then an average that forgets slowly:
/// a backlog of fifty tasks must not be priced by the one short task a host happened to run.
#[derive(Debug, Default, Clone, Copy)]
struct Pooled {
    n: u32,
    mean: f64,
}

/// Samples after which the pooled mean weighs each new one at 1/POOL_WINDOW.
const POOL_WINDOW: u32 = 50;

impl Pooled {
    fn add(&mut self, sample: f64) {
        self.n = (self.n + 1).min(POOL_WINDOW);
        self.mean += (sample - self.mean) / f64::from(self.n);
    }
}

/// Medians of what was learned, for pairs with nothing of their own (seconds).
#[derive(Debug, Default, Clone)]
struct Fallback {
    host_load: HashMap<usize, f64>,
    fleet_load: Option<f64>,
    model_service: HashMap<String, f64>,
    fleet_service: Option<f64>,
    model_warm_ttft: HashMap<String, f64>,
}

impl CostModel {
    pub fn new(configured_load: Vec<Duration>) -> Self {
        Self {
            configured_load,
            learned: HashMap::new(),
            fallback: Fallback::default(),
            pooled: HashMap::new(),
        }
    }

    /// A host joined (reload): its configured load time.
    pub fn add_host(&mut self, load: Duration) {
        self.configured_load.push(load);
    }

    pub fn set_configured_load(&mut self, host: usize, load: Duration) {
        if let Some(l) = self.configured_load.get_mut(host) {
            *l = load;
        }
    }

    fn pair(&self, host: usize, model: &str) -> Option<&Learned> {
        self.learned.get(&host)?.get(model)
    }

    /// Learns from a finished task of `model` on `host`.
    pub fn observe(&mut self, host: usize, model: &str, seen: Observed) {
        let warm_fleet = self.fallback.model_warm_ttft.get(model).copied();
        let entry = self
            .learned
            .entry(host)
            .or_default()
            .entry(model.to_string())
            .or_default();
        let total = seen.service.as_secs_f64();
        let service = match seen.ttft.map(|t| t.as_secs_f64()) {
            Some(ttft) if seen.cold => {
                // What the first token took beyond a warm one is the load; the rest of the
                // task is its service, as it would be warm.
                let warm = entry.warm_ttft.map(|w| w.0).or(warm_fleet).unwrap_or(0.0);
                let load = (ttft - warm).max(0.0);
                Ewma::add(&mut entry.load, load);
                Some((total - load).max(0.0))
            }
            Some(ttft) => {
                Ewma::add(&mut entry.warm_ttft, ttft);
                Some(total)
            }
            // No first token seen (an empty or non-streamed answer): a warm task's time is its
            // service; a cold one's is its load plus a service, so its load is what it took
            // beyond a warm task's (learned now, or when the first warm task shows it).
            None if !seen.cold => {
                if let Some(cold) = entry.cold_total.take() {
                    Ewma::add(&mut entry.load, (cold - total).max(0.0));
                }
                Some(total)
            }
            None => {
                let warm = entry.service.map(|e| e.0);
                match warm.or_else(|| self.pooled.get(model).map(|p| p.mean)) {
                    Some(warm) => Ewma::add(&mut entry.load, (total - warm).max(0.0)),
                    None => entry.cold_total = Some(total),
                }
                None
            }
        };
        if let Some(service) = service {
            Ewma::add(&mut entry.service, service);
            match self.pooled.get_mut(model) {
                Some(p) => p.add(service),
                None => {
                    let mut p = Pooled::default();
                    p.add(service);
                    self.pooled.insert(model.to_string(), p);
                }
            }
        }
        self.fallback = self.medians();
    }

    fn medians(&self) -> Fallback {
        let pairs = || {
            self.learned
                .iter()
                .flat_map(|(h, models)| models.iter().map(move |(m, l)| (*h, m, l)))
        };
        let mut by_host: HashMap<usize, Vec<f64>> = HashMap::new();
        let mut by_model: HashMap<&String, Vec<f64>> = HashMap::new();
        let mut warm_by_model: HashMap<&String, Vec<f64>> = HashMap::new();
        let (mut loads, mut services) = (Vec::new(), Vec::new());
        for (h, m, l) in pairs() {
            if let Some(load) = l.load {
                by_host.entry(h).or_default().push(load.0);
                loads.push(load.0);
            }
            if let Some(service) = l.service {
                by_model.entry(m).or_default().push(service.0);
                services.push(service.0);
            }
            if let Some(warm) = l.warm_ttft {
                warm_by_model.entry(m).or_default().push(warm.0);
            }
        }
        let medians = |map: HashMap<&String, Vec<f64>>| {
            map.into_iter()
                .filter_map(|(k, v)| Some((k.clone(), median(v)?)))
                .collect()
        };
        Fallback {
            host_load: by_host
                .into_iter()
                .filter_map(|(k, v)| Some((k, median(v)?)))
                .collect(),
            fleet_load: median(loads),
            model_service: medians(by_model),
            fleet_service: median(services),
            model_warm_ttft: medians(warm_by_model),
        }
    }

    /// Expected time for `host` to load `model` (seconds): learned for the pair, else the
    /// median of this host's learned loads, else the fleet's, else configured.
    pub fn load(&self, host: usize, model: &str) -> Duration {
        self.pair(host, model)
            .and_then(|l| l.load.map(|e| e.0))
            .or_else(|| self.fallback.host_load.get(&host).copied())
            .or(self.fallback.fleet_load)
            .map(secs)
            .unwrap_or_else(|| self.configured(host))
    }

    /// Whether a first token of `model` on `host` this slow (believed warm) was really a load:
    /// beyond the warm first token by more than half the load learned there (or anywhere),
    /// and that load is large against the warm first token. Such a task tells that the host
    /// had evicted the model behind the scheduler's back (it holds fewer models than thought).
    pub fn looks_like_a_load(&self, host: usize, model: &str, ttft: Duration) -> bool {
        if !self.measured_any() {
            return false;
        }
        let load = self.load(host, model).as_secs_f64();
        let warm = self
            .pair(host, model)
            .and_then(|l| l.warm_ttft)
            .map(|w| w.0)
            .or_else(|| self.fallback.model_warm_ttft.get(model).copied())
            .unwrap_or(0.0);
        load > 4.0 * warm.max(0.01) && ttft.as_secs_f64() > warm + load / 2.0
    }

    /// Whether a load time was measured on any host.
    pub fn measured_any(&self) -> bool {
        self.fallback.fleet_load.is_some()
    }

    /// The configured load time of `host` (`[[host]] load_seconds`).
    pub fn configured(&self, host: usize) -> Duration {
        self.configured_load
            .get(host)
            .copied()
            .unwrap_or(Duration::from_secs(30))
    }

    /// Expected time of one task of `model` on `host`: learned for the pair, else for the
    /// model on any host, else the fleet's median, else [`DEFAULT_SERVICE`].
    pub fn service(&self, host: usize, model: &str) -> Duration {
        self.pair(host, model)
            .and_then(|l| l.service.map(|e| e.0))
            .or_else(|| self.fallback.model_service.get(model).copied())
            .or(self.fallback.fleet_service)
            .map(secs)
            .unwrap_or(DEFAULT_SERVICE)
    }

    /// Expected time of one task of `model` anywhere in the fleet: the mean of every host's
    /// recent tasks of it, else the fleet's median, else [`DEFAULT_SERVICE`]. Backlogs are
    /// priced with this, the same figure for every host that weighs them: priced per host, a
    /// host whose one task of a model happened to be short saw that model's backlog as small
    /// and left it (measured: 16 hosts, 8 models, 66 loads for a minimum of 16).
    pub fn model_service(&self, model: &str) -> Duration {
        self.pooled
            .get(model)
            .map(|p| p.mean)
            .or(self.fallback.fleet_service)
            .map(secs)
            .unwrap_or(DEFAULT_SERVICE)
    }

    /// Everything learned, for status pages, by host then model; `name` names a host index.
    pub fn learned(&self, name: impl Fn(usize) -> String) -> Vec<LearnedCost> {
        let mut rows: Vec<LearnedCost> = self
            .learned
            .iter()
            .flat_map(|(h, models)| models.iter().map(move |(m, l)| (*h, m, l)))
            .map(|(h, m, l)| LearnedCost {
                host: name(h),
                model: m.clone(),
                load_seconds: l.load.map(|e| e.0),
                warm_ttft_seconds: l.warm_ttft.map(|e| e.0),
                service_seconds: l.service.map(|e| e.0),
            })
            .collect();
        rows.sort_by(|a, b| (&a.host, &a.model).cmp(&(&b.host, &b.model)));
        rows
    }
}

/// What the cost model learned for one model on one host (seconds; `None`: not seen yet).
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct LearnedCost {
    /// The host's name.
    pub host: String,
    pub model: String,
    /// Time to load the model here: a cold first token beyond a warm one.
    pub load_seconds: Option<f64>,
    /// First-token time when the model was already loaded.
    pub warm_ttft_seconds: Option<f64>,
    /// One task's time on the host, from sending to the last byte.
    pub service_seconds: Option<f64>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e7))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_load_is_the_cold_first_token_beyond_the_warm_one() {
        let mut c = CostModel::new(vec![Duration::from_secs(30); 2]);
        assert_eq!(
            c.load(0, "a"),
            Duration::from_secs(30),
            "configured at first"
        );
        c.observe(
            0,
            "a",
            Observed {
                cold: false,
                ttft: Some(ms(200)),
                service: ms(2000),
            },
        );
        c.observe(
            0,
            "a",
            Observed {
                cold: true,
                ttft: Some(ms(5200)),
                service: ms(7000),
            },
        );
        assert_eq!(c.load(0, "a"), ms(5000));
        // Another model on that host, and another host: the learned figure stands in.
        assert_eq!(c.load(0, "b"), ms(5000));
        assert_eq!(c.load(1, "b"), ms(5000));
        // The cold task's 7 s were 5 s of load and 2 s of service.
        assert_eq!(c.service(0, "a"), Duration::from_secs(2));
        assert_eq!(
            c.service(1, "a"),
            c.service(0, "a"),
            "the model's figure elsewhere"
        );
    }

    #[test]
    fn a_backlog_is_priced_with_every_hosts_tasks_of_the_model() {
        let mut c = CostModel::new(vec![Duration::from_secs(30); 3]);
        let warm = |ms_: u64| Observed {
            cold: false,
            ttft: Some(ms(10)),
            service: ms(ms_),
        };
        // Host 0 happened to run one short task; hosts 1 and 2 ran the usual ones.
        c.observe(0, "a", warm(2_000));
        for _ in 0..4 {
            c.observe(1, "a", warm(10_000));
            c.observe(2, "a", warm(12_000));
        }
        assert_eq!(c.service(0, "a"), Duration::from_secs(2), "the pair's own");
        let pooled = c.model_service("a").as_secs_f64();
        assert!((pooled - 10.0).abs() < 0.01, "mean of all nine: {pooled}");
        // A model never run: the median of the pairs' figures (2, 10, 12 s).
        let other = c.model_service("b").as_secs_f64();
        assert!((other - 10.0).abs() < 0.01, "the fleet's median: {other}");
    }

    #[test]
    fn a_load_is_learned_from_answers_without_a_first_token() {
        // Non-streamed answers: the cold task took 7 s, warm ones take 2 s.
        let mut c = CostModel::new(vec![Duration::from_secs(30); 2]);
        let whole = |cold, ms_| Observed {
            cold,
            ttft: None,
            service: ms(ms_),
        };
        c.observe(0, "a", whole(true, 7000));
        assert_eq!(
            c.load(0, "a"),
            Duration::from_secs(30),
            "nothing to compare yet"
        );
        c.observe(0, "a", whole(false, 2000));
        assert_eq!(c.load(0, "a"), Duration::from_secs(5));
        // Once a service time is known, a cold task teaches its load at once.
        c.observe(1, "a", whole(true, 3000));
        assert_eq!(c.load(1, "a"), Duration::from_secs(1));
    }

    #[test]
    fn service_defaults_until_something_finished() {
        let c = CostModel::new(vec![Duration::from_secs(30)]);
        assert_eq!(c.service(0, "a"), DEFAULT_SERVICE);
    }
}
