//! Swap-aware placement: which waiting task a free slot takes, when switching models costs a
//! load. Pure functions of the facts the state machine gathers; the state machine calls them
//! for every (model, free host) pair, in one step.
//!
//! The rules (README "How it schedules"):
//! - a task of a model the host holds (warm) is always allowed: no slot idles while a task it
//!   can run without a load waits;
//! - a load (cold) is allowed when the task is overdue (`max_bypass_seconds`: starvation stays
//!   bounded), or when no host holds the model (it must be loaded somewhere; better now, beside
//!   other work, than after it), or when the model's backlog per warm host is worth one more
//!   load; never when it would evict a model whose waiting tasks no other host holds, unless
//!   overdue;
//! - models with no host running them go first (each backlog gets a host before any gets a
//!   second, so a needed load overlaps other work), then the scarcest, then the oldest;
//! - for a model, a warm host before a cold one, then the cheapest load, then the least
//!   versatile host, the least busy, the one that ran it last, configuration order.

use std::time::Duration;

use crate::task::TaskId;

/// What is known about running `model`'s next task on one free host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairFacts {
    /// The model's next task has waited past `max_bypass`.
    pub overdue: bool,
    /// The host holds the model in memory (as far as the daemon knows).
    pub warm: bool,
    /// Other healthy hosts that hold the model.
    pub warm_elsewhere: usize,
    /// The model's waiting work: waiting tasks × expected service time.
    pub backlog: Duration,
    /// Expected load time of the model on this host.
    pub load: Duration,
    /// Loading here evicts a model whose waiting tasks no other host holds.
    pub strands: bool,
}

/// Whether a free slot may start the model here now; `false` means the slot stays idle
/// rather than load a model a warm host will serve sooner.
///
/// One more host is worth loading while the backlog spread over the warm hosts `k` exceeds
/// what it would be over `k + 1` by more than the load: `backlog / k - backlog / (k + 1) >
/// load`, i.e. `backlog / (k (k + 1)) > load`.
pub fn allowed(f: &PairFacts) -> bool {
    if f.warm || f.overdue {
        return true;
    }
    if f.strands {
        return false;
    }
    if f.warm_elsewhere == 0 {
        return true;
    }
    let k = f.warm_elsewhere as f64;
    f.backlog.as_secs_f64() / (k * (k + 1.0)) > f.load.as_secs_f64()
}

/// Order of models among those with an allowed pair: lower first.
/// (overdue first, then models no host runs, then fewest hosts listing it, then oldest head).
pub fn model_key(
    overdue: bool,
    running_hosts: usize,
    coverage: usize,
    head: TaskId,
) -> (bool, bool, usize, TaskId) {
    (!overdue, running_hosts > 0, coverage, head)
}

/// Order of hosts for one model: lower first.
pub fn host_key(
    warm: bool,
    load: Duration,
    models_listed: usize,
    active: usize,
    ran_it_last: bool,
    index: usize,
) -> (bool, Duration, usize, usize, bool, usize) {
    let load = if warm { Duration::ZERO } else { load };
    (!warm, load, models_listed, active, !ran_it_last, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> PairFacts {
        PairFacts {
            overdue: false,
            warm: false,
            warm_elsewhere: 1,
            backlog: Duration::from_secs(10),
            load: Duration::from_secs(30),
            strands: false,
        }
    }

    #[test]
    fn warm_and_overdue_are_always_allowed() {
        assert!(allowed(&PairFacts {
            warm: true,
            strands: true,
            ..facts()
        }));
        assert!(allowed(&PairFacts {
            overdue: true,
            strands: true,
            ..facts()
        }));
    }

    #[test]
    fn a_model_no_host_holds_is_loaded_unless_that_strands_another() {
        let cold = PairFacts {
            warm_elsewhere: 0,
            ..facts()
        };
        assert!(allowed(&cold));
        assert!(!allowed(&PairFacts {
            strands: true,
            ..cold
        }));
    }

    #[test]
    fn another_copy_only_while_the_backlog_is_worth_the_load() {
        // One warm host, 30 s load: worth it above 60 s of backlog.
        assert!(!allowed(&PairFacts {
            backlog: Duration::from_secs(59),
            ..facts()
        }));
        assert!(allowed(&PairFacts {
            backlog: Duration::from_secs(61),
            ..facts()
        }));
        // Two warm hosts: above 180 s.
        assert!(!allowed(&PairFacts {
            warm_elsewhere: 2,
            backlog: Duration::from_secs(179),
            ..facts()
        }));
    }

    #[test]
    fn a_warm_host_comes_before_a_cheaper_or_less_versatile_cold_one() {
        let warm = host_key(true, Duration::from_secs(30), 4, 0, false, 3);
        let cold = host_key(false, Duration::from_secs(1), 1, 0, true, 0);
        assert!(warm < cold);
    }
}
