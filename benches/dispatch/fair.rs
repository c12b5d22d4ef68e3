//! Section `fair`: many clients on one fleet (issue 13). The discrete-event harness of the
//! `swap` section, in virtual time, with tasks from several clients:
//! - **two batteries at once**: two clients queue 100 tasks each of one model at t = 0 on
//!   two hosts that hold it; each client's last completion. "Before" is the same batteries
//!   with no client told apart (one line, first come first served: today's order when every
//!   task comes from one client);
//! - **an interactive call beside a battery**: a 500-task battery of one model on two hosts
//!   that hold it; at t = 60 s another client's call of that model, at t = 120 s a priority
//!   -1 call from the battery's own client (prompt-prix's judge), at t = 180 s another
//!   client's priority -1 call of a model no host holds (a load of 30 s); how long each
//!   waited to start, against the longest task running when it arrived.

use std::time::Duration;

use tokio::time::Instant;

use super::Rng;
use super::swap::Sim;

/// Log-normal (sigma 0.5) task lengths with mean `mean`.
fn lengths(n: usize, mean: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let f = (0.5 * rng.normal() - 0.125).exp();
            Duration::from_secs_f64((mean.as_secs_f64() * f).clamp(0.05, 600.0))
        })
        .collect()
}

/// Each client's last completion (s) for two 100-task batteries queued at once, with the
/// clients told apart (`fair`) or not.
fn two_batteries(seed: u64, fair: bool) -> (f64, f64) {
    let t0 = Instant::now();
    let mut sim = Sim::holding(2, 1, Duration::from_secs(30), true, t0, Some(0));
    let work = lengths(200, Duration::from_secs(10), seed);
    for (i, w) in work.iter().enumerate() {
        let client = match (fair, i < 100) {
            (false, _) => "one line",
            (true, true) => "a",
            (true, false) => "b",
        };
        sim.submit_from(i as u64 + 1, 0, *w, client, 0);
    }
    sim.run();
    let last = |range: std::ops::Range<u64>| {
        range
            .map(|id| sim.ended[&id].duration_since(t0).as_secs_f64())
            .fold(0.0, f64::max)
    };
    (last(1..101), last(101..201))
}

/// Waits (s) of the three calls beside a battery, and the longest task of the battery.
fn beside_a_battery(seed: u64) -> ([f64; 3], f64) {
    let t0 = Instant::now();
    // Two models listed, the hosts hold model 0; the battery is of model 0.
    let mut sim = Sim::holding(2, 2, Duration::from_secs(30), true, t0, Some(0));
    let work = lengths(503, Duration::from_secs(10), seed);
    for (i, w) in work.iter().take(500).enumerate() {
        sim.submit_from(i as u64 + 1, 0, *w, "battery", 0);
    }
    let calls = [
        (60, 501, 0, "agent", 0),
        (120, 502, 0, "battery", -1),
        (180, 503, 1, "other agent", -1),
    ];
    for &(at, id, kind, client, priority) in &calls {
        sim.run_until(Some(t0 + Duration::from_secs(at)));
        sim.submit_from(id, kind, work[id as usize - 1], client, priority);
    }
    sim.run();
    let waits = calls.map(|(at, id, ..)| {
        sim.started[&id]
            .duration_since(t0 + Duration::from_secs(at))
            .as_secs_f64()
    });
    let longest = work.iter().max().copied().unwrap_or_default().as_secs_f64();
    (waits, longest)
}

/// Prints the section; returns false when a target was missed.
pub fn fair(seeds: u64) -> bool {
    let mut ok = true;
    println!(
        "two warm one-slot hosts; tasks log-normal (sigma 0.5), mean 10 s; {seeds} seeds \
         (median [min, max])\n"
    );
    println!("| battery | client a's last task (s) | client b's last task (s) | b / a |");
    println!("|---|---|---|---|");
    for fair in [false, true] {
        let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for seed in 0..seeds {
            let (x, y) = two_batteries(0xfa12 ^ (seed << 8), fair);
            a.push(x);
            b.push(y);
            ratio.push(y / x);
        }
        println!(
            "| two clients, 100 tasks each, queued at once ({}) | {} | {} | {} |",
            if fair {
                "fair share"
            } else {
                "one line, before"
            },
            super::fmt_spread(&a, 0),
            super::fmt_spread(&b, 0),
            super::fmt_spread(&ratio, 2),
        );
        if fair && ratio.iter().any(|r| (r - 1.0).abs() > 0.10) {
            println!("MISSED: the two clients' last tasks are more than 10% apart");
            ok = false;
        }
    }
    println!();
    println!(
        "| call beside a 500-task battery | waited to start (s) | longest battery task (s) | target |"
    );
    println!("|---|---|---|---|");
    let mut waits = [Vec::new(), Vec::new(), Vec::new()];
    let mut longest = Vec::new();
    for seed in 0..seeds {
        let (w, l) = beside_a_battery(0xbe51 ^ (seed << 8));
        for k in 0..3 {
            waits[k].push(w[k]);
        }
        longest.push(l);
    }
    let labels = [
        (
            "another client, model resident, t = 60 s",
            "one running task",
        ),
        (
            "the battery's client, priority -1, t = 120 s",
            "one running task",
        ),
        (
            "another client, priority -1, model not resident, t = 180 s",
            "one running task (then its 30 s load)",
        ),
    ];
    for (k, (label, target)) in labels.iter().enumerate() {
        println!(
            "| {label} | {} | {} | {target} |",
            super::fmt_spread(&waits[k], 1),
            super::fmt_spread(&longest, 0),
        );
        if waits[k].iter().zip(&longest).any(|(w, l)| *w > *l + 0.001) {
            println!("MISSED: a call waited longer than the longest running task");
            ok = false;
        }
    }
    ok
}
