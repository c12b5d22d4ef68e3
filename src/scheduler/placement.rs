//! Swap-aware placement: which waiting task a free slot takes, when switching models costs a
//! load. Pure functions of the facts the state machine gathers; the state machine calls them
//! for every (model, free host) pair, in one step.
//!
//! The rules (README "How it schedules"):
//! - a task of a model the host holds (warm) is always allowed: no slot idles while a task it
//!   can run without a load waits;
//! - a load (cold) is allowed when the task is overdue (`max_bypass_seconds`: starvation stays
//!   bounded; a host keeps a model it loaded for [`QUANTUM_LOADS`] load times of work first,
//!   so that overdue batteries do not rotate every host on every task), or when the switch
//!   finishes the waiting work sooner by more than a load ([`switch_gain`]: a model no host
//!   holds is loaded unless that strands another's backlog; another copy only while the
//!   backlog per host is worth it);
//! - another copy of a model waits for a burst of submissions to settle
//!   ([`collation_window`]), so that a battery sent model by model is seen whole;
//! - overdue models first, oldest first; then models no host runs (each backlog gets a host
//!   before any gets a second, so a needed load overlaps other work); then, where loads are
//!   [`costly`], the switch that gains most before warm work; then the scarcest, the oldest;
//! - for a model, a warm host before a cold one, then the cheapest load, then the least
//!   versatile host, the least busy, the one that ran it last, configuration order.

use std::cmp::Reverse;
use std::time::Duration;

/// What is known about running `model`'s next task on one free host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairFacts {
    /// The model's next task has waited past `max_bypass`.
    pub overdue: bool,
    /// The host holds the model in memory (as far as the daemon knows).
    pub warm: bool,
    /// Other healthy hosts that hold the model or are loading it.
    pub warm_elsewhere: usize,
    /// How long until the first of those can run the model's tasks: zero when one holds it
    /// ready, else the shortest remaining load.
    pub warm_ready_in: Duration,
    /// The model's waiting work: waiting tasks × expected service time.
    pub backlog: Duration,
    /// The load takes the place of a resident model (the host has no room beside it).
    pub evicts: bool,
    /// The waiting work of the model a load here evicts (zero when it evicts none, or one
    /// with nothing waiting), and the hosts holding that model, this one included.
    pub evicted_backlog: Duration,
    pub evicted_holders: usize,
    /// Other hosts free now that list the evicted model without holding it, and the shortest
    /// load of it among them: when this host is its only holder, its backlog is not stranded
    /// while one of them can load it.
    pub evicted_takers: usize,
    pub evicted_load: Duration,
    /// No other host that is up lists the model: this host is the only one that can run it.
    pub sole_lister: bool,
    /// When this host is the evicted model's only holder and no host is free to take it: how
    /// soon another host that lists it is expected to be free (its running task and the
    /// backlog it holds); `None` when no other host lists it.
    pub evicted_free_in: Option<Duration>,
    /// Expected load time of the model on this host.
    pub load: Duration,
    /// The host loaded the model it holds less than [`QUANTUM_LOADS`] loads ago, and that
    /// model still has waiting tasks: being overdue is no reason to take it (the other rules
    /// still apply).
    pub protected: bool,
}

/// A host that loaded a model keeps it for at least this many load times of work (while that
/// model has waiting tasks), even when another model's backlog becomes overdue (a single
/// overdue call is not held: it takes the next host that can switch). Without it, a
/// battery of more models than hosts rotates every `max_bypass_seconds` and pays a load each
/// time (measured: 200 loads for 200 tasks on two hosts); with it a load is at most about
/// 1/(1 + QUANTUM_LOADS) of a host's time. The price: a backlog may wait up to this many load
/// times for a host (interactive calls are single and not held). Measured on two hosts with
/// four models of 50 tasks (bench `swap`): 8 gave 0.88–0.90 of the bound and 8–17 loads at
/// loads of 2–6 tasks; 20 gave 0.95–0.98 and 8 loads at 2× (each host left a backlog 400 s
/// in to load an overdue one, and came back); 30 gives 0.98 and 4 loads. Larger batteries
/// still rotate, at most once per quantum.
pub const QUANTUM_LOADS: u32 = 30;

/// The longest a burst of submissions is waited for before a model is loaded on one more
/// host (a first copy never waits). A battery arrives a task at a time over milliseconds;
/// deciding extra copies on the first tasks of the first model gives that model every free
/// host before the other models are seen (measured: 4 hosts, 4 models sent model by model,
/// 20× loads: 0.75 of the bound with 6 loads; waiting for the burst: one model per host).
pub const COLLATION_MAX: Duration = Duration::from_millis(250);

/// How long after the last submission an extra copy of a model waits, on a host that lists
/// other models too (a host that serves only this model has nothing to keep for others): [`COLLATION_MAX`], or
/// a twentieth of the load when that is shorter (a wait must stay small against the load it
/// is meant to save).
pub fn collation_window(load: Duration) -> Duration {
    COLLATION_MAX.min(load / 20)
}

/// Whether a load is worth ordering work by: at least a quarter of the model's task. Below
/// that, ordering by how much sooner a switch finishes the work is ordering by backlog per
/// host, which loses to scarcity first on load-free fleets (bench `efficiency`: 16 hosts,
/// 1,000 tasks, 0.883 -> 0.840).
pub fn costly(load: Duration, service: Duration) -> bool {
    load * 4 >= service
}

/// Whether a free slot may start the model here now; `false` means the slot stays idle
/// rather than load a model a warm host will serve sooner.
pub fn allowed(f: &PairFacts) -> bool {
    // A switch that costs nothing evicts nothing of value: the load-blind rules decide.
    f.warm || f.load.is_zero() || (f.overdue && !f.protected) || switch_gain(f).is_some()
}

/// How much sooner the waiting work finishes if this host loads the model now (the later of
/// the two backlogs' finishing times, less one load of margin); `None` when it does not.
///
/// A switch moves this host from the model it evicts (`r`, backlog `Wr` over `kr` hosts) to
/// the new one (`m`, `Wm` over `km` hosts holding or loading it, the first ready in `d`).
/// Each model's time to clear its backlog is about `W / k`; the switch is worth it when it
/// lowers the later of the two by more than one load (no margin on a host with room: it
/// evicts nothing), its own load included:
/// `max(Wr / (kr - 1), L + Wm / (km + 1)) + L < max(Wr / kr, d + Wm / km)`. With nothing of
/// `r` waiting this is `d + Wm / km - Wm / (km + 1) > 2 L`: another copy only while the
/// backlog per warm host is well worth the load. A model no host holds (`km = 0`) is loaded
/// unless that strands `r`. When this host is `r`'s only holder, `r` is stranded only if no
/// free host can load it: with `t` free hosts that list it (load `Lr`), `Wr / (kr - 1)`
/// becomes `Lr + Wr / t`. Without that, a host holding a model that another, idle, host also
/// lists worked through all of its backlog before it turned to a model only it lists, while
/// the other host stood idle (measured: interleaved a/b/c on a host listing all three and one
/// listing a and b: 19.0 s; see `swap_tests`).
///
/// A model only this host lists, which no host holds, is not "better now than later" at any
/// price when the switch leaves `r`'s backlog: this host would otherwise run it after `r`, so
/// `d + Wm / km` is `Wr + L + Wm`, and with no free host `r` waits for the soonest busy host
/// that lists it (`F`, see [`PairFacts::evicted_free_in`]): `Wr / (kr - 1)` is
/// `F + Lr + Wr`. The big GPU that alone fits a model then turns to it while a smaller GPU
/// finishes its own work and takes the shared backlog next (measured: 16.1 s → 12 s; see
/// `swap_tests`).
pub fn switch_gain(f: &PairFacts) -> Option<Duration> {
    let (wm, l) = (f.backlog.as_secs_f64(), f.load.as_secs_f64());
    let km = f.warm_elsewhere as f64;
    let wr = f.evicted_backlog.as_secs_f64();
    let kr = f.evicted_holders as f64;
    let lr = f.evicted_load.as_secs_f64();
    // This host is the only one that can ever run m, and the only holder of r, which has
    // work waiting: compare running m now against running it after r.
    let after_r = (f.sole_lister && km == 0.0 && wr > 0.0 && kr <= 1.0)
        .then_some(f.evicted_free_in)
        .flatten()
        .filter(|_| f.evicted_takers == 0);
    let m_now = if after_r.is_some() {
        wr + l + wm
    } else if km == 0.0 {
        f64::INFINITY
    } else {
        f.warm_ready_in.as_secs_f64() + wm / km
    };
    let m_after = l + wm / (km + 1.0);
    let (r_now, r_after) = if wr == 0.0 || kr == 0.0 {
        (0.0, 0.0)
    } else if kr <= 1.0 && f.evicted_takers > 0 {
        (wr, lr + wr / f.evicted_takers as f64)
    } else if let Some(free_in) = after_r {
        (wr, free_in.as_secs_f64() + lr + wr)
    } else if kr <= 1.0 {
        (wr, f64::INFINITY)
    } else {
        (wr / kr, wr / (kr - 1.0))
    };
    // A margin of one more load when the load evicts a model: estimates are rough, and a
    // move that only breaks even invites the move back (measured: 16 hosts, 8 models, 95
    // loads for a minimum of 16). A host with room evicts nothing there is to come back for.
    let margin = if f.evicts { l } else { 0.0 };
    let gain = r_now.max(m_now) - (r_after.max(m_after) + margin);
    (gain > 0.0).then(|| Duration::from_secs_f64(gain.min(1e9)))
}

/// Order of models among those with an allowed pair: lower first.
/// Overdue models first, oldest first among them (DESIGN invariant 5: with `max_bypass` 0 this
/// is plain FIFO); then models no host runs; then a switch that finishes the waiting work
/// sooner (`gain`, from [`switch_gain`]; the largest first) before work a host holds warm,
/// else a battery sent model by model keeps every early model's hosts and the later models
/// wait behind it (measured: 16 hosts, 8 models, 20× loads, 0.65 of the bound); then fewest
/// hosts listing it, then `order`: for overdue models the oldest task's arrival, else the
/// aged fair-share rank of the model's next task ([`super::fair`]).
pub fn model_key(
    overdue: bool,
    running_hosts: usize,
    gain: Option<Duration>,
    coverage: usize,
    order: super::fair::Order,
) -> ModelKey {
    if overdue {
        (false, false, Reverse(Duration::ZERO), 0, order)
    } else {
        (
            true,
            running_hosts > 0,
            Reverse(gain.unwrap_or_default()),
            coverage,
            order,
        )
    }
}

/// See [`model_key`].
pub type ModelKey = (bool, bool, Reverse<Duration>, usize, super::fair::Order);

/// See [`host_key`].
pub type HostKey = (bool, Duration, Evicts, usize, usize, bool, usize);

/// What a load on a host takes out of its memory, in the order hosts are preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Evicts {
    /// Nothing: the host has room.
    Nothing,
    /// A model with no task waiting.
    Idle,
    /// A model with tasks waiting, which must then be loaded again somewhere.
    Waiting,
}

/// Order of hosts for one model: lower first. A cold host with room for the model comes before
/// one that must evict a model for it (a client alternating two models one call at a time
/// would otherwise evict on every call while another host stands empty), and one that evicts
/// an idle model before one that evicts a model with work waiting (that work would need a
/// second load).
pub fn host_key(
    warm: bool,
    load: Duration,
    evicts: Evicts,
    models_listed: usize,
    active: usize,
    ran_it_last: bool,
    index: usize,
) -> HostKey {
    let load = if warm { Duration::ZERO } else { load };
    (
        !warm,
        load,
        if warm { Evicts::Nothing } else { evicts },
        models_listed,
        active,
        !ran_it_last,
        index,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> PairFacts {
        PairFacts {
            overdue: false,
            warm: false,
            warm_elsewhere: 1,
            warm_ready_in: Duration::ZERO,
            backlog: Duration::from_secs(10),
            load: Duration::from_secs(30),
            protected: false,
            evicts: true,
            evicted_backlog: Duration::ZERO,
            evicted_holders: 0,
            evicted_takers: 0,
            evicted_load: Duration::from_secs(30),
            sole_lister: false,
            evicted_free_in: None,
        }
    }

    #[test]
    fn warm_and_overdue_are_always_allowed() {
        // Even when the load would strand another model's backlog.
        let strands = PairFacts {
            evicted_backlog: Duration::from_secs(100),
            evicted_holders: 1,
            ..facts()
        };
        assert!(allowed(&PairFacts {
            warm: true,
            ..strands
        }));
        assert!(allowed(&PairFacts {
            overdue: true,
            ..strands
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
            evicted_backlog: Duration::from_secs(100),
            evicted_holders: 1,
            ..cold
        }));
    }

    #[test]
    fn a_backlog_a_free_host_can_load_is_not_stranded() {
        // m: 300 s that no host holds; this host is r's only holder, 40 s of r waiting.
        let sole = PairFacts {
            warm_elsewhere: 0,
            backlog: Duration::from_secs(300),
            evicted_backlog: Duration::from_secs(40),
            evicted_holders: 1,
            ..facts()
        };
        assert!(!allowed(&sole), "no one else can take r");
        // A free host lists r: r finishes after its load there, 30 + 40 s; m after 30 + 300 s
        // instead of never.
        assert!(allowed(&PairFacts {
            evicted_takers: 1,
            ..sole
        }));
        // m held elsewhere with 60 s waiting, r's 40 s: moving r to a free host (30 + 40 s)
        // and loading m here (30 + 30 s), plus a load of margin, does not finish sooner than
        // leaving both (60 s).
        assert!(!allowed(&PairFacts {
            warm_elsewhere: 1,
            backlog: Duration::from_secs(60),
            evicted_takers: 1,
            ..sole
        }));
    }

    #[test]
    fn a_model_only_this_host_lists_is_run_now_if_its_backlog_can_wait_for_a_busy_host() {
        // m: 80 s that only this host lists and no host holds; r: 70 s that only this host
        // holds, no free host lists it, another busy one will be free in 20 s. 30 s loads.
        let sole = PairFacts {
            warm_elsewhere: 0,
            backlog: Duration::from_secs(80),
            evicted_backlog: Duration::from_secs(70),
            evicted_holders: 1,
            sole_lister: true,
            evicted_free_in: Some(Duration::from_secs(20)),
            ..facts()
        };
        // Stay: r at 70 s, m at 70 + 30 + 80 = 180 s. Switch: m at 110 s, r at
        // 20 + 30 + 70 = 120 s, plus a load of margin: 150 < 180.
        assert!(allowed(&sole));
        // The busy host is free only in 70 s: r at 170 s, + 30 > 180.
        assert!(!allowed(&PairFacts {
            evicted_free_in: Some(Duration::from_secs(70)),
            ..sole
        }));
        // No other host lists r: r would be stranded.
        assert!(!allowed(&PairFacts {
            evicted_free_in: None,
            ..sole
        }));
        // Another host lists m too: the estimate is not used (m is loaded there instead).
        assert!(!allowed(&PairFacts {
            sole_lister: false,
            ..sole
        }));
    }

    #[test]
    fn another_copy_only_while_the_backlog_is_worth_the_load() {
        // One warm host, 30 s load: L + W/2 + L < W, so worth it above 120 s of backlog.
        assert!(!allowed(&PairFacts {
            backlog: Duration::from_secs(119),
            ..facts()
        }));
        assert!(allowed(&PairFacts {
            backlog: Duration::from_secs(121),
            ..facts()
        }));
        // Two warm hosts: L + W/3 + L < W/2, above 360 s.
        assert!(!allowed(&PairFacts {
            warm_elsewhere: 2,
            backlog: Duration::from_secs(359),
            ..facts()
        }));
        assert!(allowed(&PairFacts {
            warm_elsewhere: 2,
            backlog: Duration::from_secs(361),
            ..facts()
        }));
    }

    #[test]
    fn a_host_leaves_a_shared_backlog_only_when_that_lowers_the_later_finish() {
        // This host and one other serve r (100 s waiting); m has 400 s waiting on one host.
        let switch = PairFacts {
            evicted_backlog: Duration::from_secs(100),
            evicted_holders: 2,
            backlog: Duration::from_secs(400),
            load: Duration::from_secs(30),
            ..facts()
        };
        // r: 50 s -> 100 s; m: 400 s -> 30 + 200 s. The later finish drops from 400 to 230.
        assert!(allowed(&switch));
        // m with only 100 s: m 100 -> 80, r 50 -> 100; the later finish stays 100.
        assert!(!allowed(&PairFacts {
            backlog: Duration::from_secs(100),
            ..switch
        }));
    }

    #[test]
    fn a_warm_host_comes_before_a_cheaper_or_less_versatile_cold_one() {
        let thirty = Duration::from_secs(30);
        let warm = host_key(true, thirty, Evicts::Waiting, 4, 0, false, 3);
        let cold = host_key(
            false,
            Duration::from_secs(1),
            Evicts::Nothing,
            1,
            0,
            true,
            0,
        );
        assert!(warm < cold);
        let room = host_key(false, thirty, Evicts::Nothing, 4, 0, false, 1);
        let evicting = host_key(false, thirty, Evicts::Idle, 1, 0, true, 0);
        assert!(room < evicting, "an empty host before evicting a model");
        let stranding = host_key(false, thirty, Evicts::Waiting, 1, 0, true, 0);
        assert!(
            evicting < stranding,
            "an idle model evicted before one with work waiting"
        );
    }

    #[test]
    fn a_holder_still_loading_counts_with_its_remaining_load() {
        // 490 s of work, one other host loading it with 200 s to go; this host would evict a
        // model with 460 s waiting over 4 hosts. Without the remaining load the backlog looks
        // like 490 s and the move (445 s + a 200 s margin) is refused.
        let f = PairFacts {
            warm_elsewhere: 1,
            warm_ready_in: Duration::from_secs(200),
            backlog: Duration::from_secs(490),
            load: Duration::from_secs(200),
            evicted_backlog: Duration::from_secs(460),
            evicted_holders: 4,
            ..facts()
        };
        assert!(switch_gain(&f).is_some());
        assert!(
            switch_gain(&PairFacts {
                warm_ready_in: Duration::ZERO,
                ..f
            })
            .is_none()
        );
    }

    #[test]
    fn a_switch_that_finishes_sooner_goes_before_older_warm_work() {
        let head_old = (0, 1);
        let head_new = (0, 500);
        let warm = model_key(false, 3, None, 16, head_old);
        let switch = model_key(false, 1, Some(Duration::from_secs(40)), 16, head_new);
        assert!(switch < warm);
        // Overdue work still goes first, oldest first, whatever a switch would gain.
        let overdue = model_key(true, 3, None, 16, head_new);
        assert!(overdue < switch);
        assert!(model_key(true, 0, None, 1, head_old) < overdue);
    }

    #[test]
    fn a_host_with_room_needs_no_margin_for_another_copy() {
        // One other host loading the model (30 s to go), one more task waiting: a second
        // empty host finishes it sooner (30 + 5 < 30 + 10) and evicts nothing.
        let f = PairFacts {
            warm_ready_in: Duration::from_secs(30),
            backlog: Duration::from_secs(10),
            evicts: false,
            ..facts()
        };
        assert!(switch_gain(&f).is_some());
        assert!(switch_gain(&PairFacts { evicts: true, ..f }).is_none());
    }

    #[test]
    fn a_cheap_load_is_not_worth_ordering_by() {
        assert!(costly(Duration::from_secs(5), Duration::from_secs(10)));
        assert!(!costly(Duration::from_millis(1), Duration::from_secs(10)));
    }

    #[test]
    fn extra_copies_wait_a_small_part_of_a_load() {
        assert_eq!(collation_window(Duration::from_secs(30)), COLLATION_MAX);
        assert_eq!(
            collation_window(Duration::from_millis(400)),
            Duration::from_millis(20)
        );
    }
}
