//! Adaptive upload concurrency (`--workers auto`): an AIMD controller fed by the latency and the
//! outcome of every `PutObject` attempt, in the spirit of Vector's adaptive request concurrency.
//!
//! Sans-IO: the caller passes the time in with each sample; nothing here reads a clock or
//! touches tokio, so the tests drive it through simulated stores, deterministically.
//!
//! The controller keeps a *limit* (the concurrent uploads allowed) between [`Bounds`] and a
//! *baseline*, its estimate of the store's round-trip time (RTT) when Spillway is not queueing
//! on it. Samples are gathered into windows of at least one mean RTT and at least
//! [`Tuning::min_samples`] attempts. A sample of an attempt that began before the last change of
//! the limit is ignored, so every decision sees the effect of the one before it (this also keeps
//! slow start from doubling twice before the first doubling shows). At the end of a window:
//!
//! - a failure in it, or a mean RTT above `baseline × slow_ratio + slack`: the limit is multiplied
//!   by [`Tuning::decrease`] (rounded down, at least one less, never below the minimum);
//! - otherwise, if the limit was reached (the pool, not the spool or the store, was what held
//!   uploads back): the limit doubles while in slow start, else grows by one, up to the maximum;
//!   when it was not reached the limit stays: unused concurrency is not evidence the store can
//!   take more. Slow start also ends, without a decrease, at a window whose RTT is halfway to
//!   the slow threshold: queueing has begun, and doubling again would overshoot.
//!
//! The baseline is an exponentially weighted mean of the RTT of windows without failures whose
//! RTT is within `learn_ratio` of it (plus a quarter of the slack): congested windows never move
//! it, nor do windows whose latency Spillway's own queueing has raised, so it cannot creep up
//! with the load and a store that slows down is noticed. Two events reset what was learned:
//! a window at the minimum limit that is still slow means the latency is the store's own, not
//! Spillway's, so its RTT becomes the baseline (otherwise a store that stays slower would pin the
//! limit at the minimum forever); and a window in which every attempt failed (an outage) turns
//! slow start back on, so a backlog drains at full speed once the store answers again (the
//! window in which it comes back, part failures, does not end it). Otherwise slow start ends at
//! the first decrease.

use std::fmt;
use std::time::{Duration, Instant};

/// Where the adaptive limit may go: `1 <= min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: usize,
    pub max: usize,
}

/// How many uploads the drain runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// Always this many (`--workers N`).
    Fixed(usize),
    /// Adjusted by a [`Controller`] between these bounds (`--workers auto`).
    Auto(Bounds),
}

impl Workers {
    /// The limit the pool starts with: `N`, or for `auto` four (a few uploads at once are
    /// always safe) kept within the bounds.
    pub fn initial(&self) -> usize {
        match *self {
            Self::Fixed(n) => n,
            Self::Auto(b) => b.min.max(4).min(b.max),
        }
    }

    /// The most uploads that can ever be under way (and chunks in memory).
    pub fn most(&self) -> usize {
        match *self {
            Self::Fixed(n) => n,
            Self::Auto(b) => b.max,
        }
    }
}

impl fmt::Display for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Auto(b) => write!(f, "auto ({}..={})", b.min, b.max),
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The store answered with success.
    Ok,
    /// An error, a timeout or a refused connection.
    Failed,
}

/// The controller's constants; [`Tuning::default`] is what the drain uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Factor a congested window multiplies the limit by (0.9).
    pub decrease: f64,
    /// A window is slow when its mean RTT exceeds `baseline × slow_ratio + slack` (1.5).
    pub slow_ratio: f64,
    /// A window refines the baseline when its mean RTT is at most
    /// `baseline × learn_ratio + slack / 4` (1.1).
    pub learn_ratio: f64,
    /// Absolute tolerance, so that jitter of a fast (loopback) store does not count (2 ms).
    pub slack: Duration,
    /// Fewest samples a window takes (5).
    pub min_samples: u32,
    /// Weight of a window's RTT in the baseline's moving average (0.2).
    pub baseline_weight: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            decrease: 0.9,
            slow_ratio: 1.5,
            learn_ratio: 1.1,
            slack: Duration::from_millis(2),
            min_samples: 5,
            baseline_weight: 0.2,
        }
    }
}

/// What the controller made of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An attempt failed: decrease.
    Failed,
    /// The mean RTT was above the slow threshold: decrease.
    Slow,
    /// Neither: increase if the limit was reached.
    Fine,
}

/// The last window the controller closed (for logs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub samples: u32,
    pub failures: u32,
    /// Mean RTT of the window's successful attempts.
    pub mean_rtt: Option<Duration>,
    /// The baseline after the window.
    pub baseline: Option<Duration>,
    /// Whether the in-flight count reached the limit during the window.
    pub reached: bool,
    pub verdict: Verdict,
    /// The limit before and after the window.
    pub from: usize,
    pub to: usize,
}

/// Samples of the window being gathered; times in seconds.
#[derive(Debug, Default)]
struct Gathering {
    start: Option<Instant>,
    samples: u32,
    failures: u32,
    rtt_sum: f64,
    ok_rtt_sum: f64,
    reached: bool,
}

/// The AIMD controller (see the module documentation).
#[derive(Debug)]
pub struct Controller {
    bounds: Bounds,
    tuning: Tuning,
    limit: usize,
    slow_start: bool,
    /// The last window was an outage: every attempt in it failed.
    after_outage: bool,
    /// Seconds.
    baseline: Option<f64>,
    /// When the limit last changed: attempts that began earlier are not sampled.
    epoch: Option<Instant>,
    window: Gathering,
    windows: u64,
    last: Option<Window>,
}

impl Controller {
    /// A controller starting at `initial` (kept within `bounds`) in slow start, with the default
    /// [`Tuning`]. Bounds with `min` 0 or above `max` are corrected to `1 <= min <= max`.
    pub fn new(bounds: Bounds, initial: usize) -> Self {
        Self::with_tuning(bounds, initial, Tuning::default())
    }

    pub fn with_tuning(bounds: Bounds, initial: usize, tuning: Tuning) -> Self {
        let min = bounds.min.max(1);
        let bounds = Bounds {
            min,
            max: bounds.max.max(min),
        };
        Self {
            bounds,
            tuning,
            limit: initial.clamp(bounds.min, bounds.max),
            slow_start: true,
            after_outage: false,
            baseline: None,
            epoch: None,
            window: Gathering::default(),
            windows: 0,
            last: None,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// The store's uncongested RTT as learned so far.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.and_then(secs)
    }

    /// Windows closed so far.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// The last window closed.
    pub fn last_window(&self) -> Option<&Window> {
        self.last.as_ref()
    }

    /// Whether the limit still doubles on each window (see the module documentation).
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// One attempt ended at `now` after `rtt`, with `in_flight` attempts under way counting this
    /// one (or, in the drain, slots in use). Returns the limit, changed if this closed a window.
    pub fn on_sample(
        &mut self,
        now: Instant,
        rtt: Duration,
        outcome: Outcome,
        in_flight: usize,
    ) -> usize {
        let began = now.checked_sub(rtt);
        if let Some(epoch) = self.epoch
            && began.is_none_or(|b| b < epoch)
        {
            // Started under an older limit: it says nothing about the current one.
            return self.limit;
        }
        let w = &mut self.window;
        let start = *w.start.get_or_insert(began.unwrap_or(now));
        let rtt = rtt.as_secs_f64();
        w.samples += 1;
        w.rtt_sum += rtt;
        match outcome {
            Outcome::Ok => w.ok_rtt_sum += rtt,
            Outcome::Failed => w.failures += 1,
        }
        w.reached |= in_flight >= self.limit;
        let mean = w.rtt_sum / f64::from(w.samples);
        let long_enough = now.saturating_duration_since(start).as_secs_f64() >= mean;
        if w.samples >= self.tuning.min_samples.max(1) && long_enough {
            self.close_window(now);
        }
        self.limit
    }

    fn close_window(&mut self, now: Instant) {
        let w = std::mem::take(&mut self.window);
        self.window.start = Some(now);
        self.windows += 1;
        let t = self.tuning;
        let slack = t.slack.as_secs_f64();
        let successes = w.samples - w.failures;
        let mean = (successes > 0).then(|| w.ok_rtt_sum / f64::from(successes));
        let verdict = match (mean, self.baseline) {
            _ if w.failures > 0 => Verdict::Failed,
            (Some(m), Some(b)) if m > b * t.slow_ratio + slack => Verdict::Slow,
            _ => Verdict::Fine,
        };
        let from = self.limit;
        match verdict {
            Verdict::Fine => {
                self.after_outage = false;
                if let Some(m) = mean {
                    self.baseline = match self.baseline {
                        None => Some(m),
                        Some(b) if m <= b * t.learn_ratio + slack / 4.0 => {
                            Some(b + t.baseline_weight * (m - b))
                        }
                        keep => keep,
                    };
                }
                if let (Some(m), Some(b)) = (mean, self.baseline)
                    && m > b * (1.0 + t.slow_ratio) / 2.0 + slack / 2.0
                {
                    // Halfway to slow: queueing has begun; no more doubling.
                    self.slow_start = false;
                }
                if w.reached {
                    let grown = if self.slow_start {
                        self.limit.saturating_mul(2)
                    } else {
                        self.limit.saturating_add(1)
                    };
                    self.limit = grown.min(self.bounds.max);
                }
            }
            Verdict::Failed | Verdict::Slow => {
                // An outage (nothing succeeded) restarts slow start for when the store is back,
                // and the window in which it comes back (failures, then successes) keeps it.
                let outage = verdict == Verdict::Failed && successes == 0;
                self.slow_start = outage || (self.after_outage && verdict == Verdict::Failed);
                self.after_outage = outage;
                if self.limit > self.bounds.min {
                    let cut = (self.limit as f64 * t.decrease).floor() as usize;
                    self.limit = cut.min(self.limit - 1).max(self.bounds.min);
                } else if verdict == Verdict::Slow {
                    // Slow even at the minimum: the latency is the store's, not ours.
                    self.baseline = mean;
                }
            }
        }
        if self.limit != from {
            self.epoch = Some(now);
        }
        self.last = Some(Window {
            samples: w.samples,
            failures: w.failures,
            mean_rtt: mean.and_then(secs),
            baseline: self.baseline(),
            reached: w.reached,
            verdict,
            from,
            to: self.limit,
        });
    }
}

fn secs(s: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(s).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A closed-loop simulation: `demand` uploads want to run (usize::MAX: a backlog), at most
    /// the controller's limit start, each takes what `store(time since start, in flight
    /// counting itself)` says. Returns (time since start, limit) after every sample.
    struct Sim {
        t0: Instant,
        now: Instant,
        seq: u64,
        /// (ends at, seq, rtt, failed)
        flying: BinaryHeap<Reverse<(Instant, u64, Duration, bool)>>,
        trace: Vec<(Duration, usize)>,
    }

    impl Sim {
        fn new() -> Self {
            let t0 = Instant::now();
            Self {
                t0,
                now: t0,
                seq: 0,
                flying: BinaryHeap::new(),
                trace: Vec::new(),
            }
        }

        fn run(
            &mut self,
            c: &mut Controller,
            until: Duration,
            demand: usize,
            mut store: impl FnMut(Duration, usize) -> (Duration, Outcome),
        ) {
            loop {
                while self.flying.len() < c.limit().min(demand) {
                    let n = self.flying.len() + 1;
                    let (rtt, outcome) = store(self.now - self.t0, n);
                    self.seq += 1;
                    self.flying.push(Reverse((
                        self.now + rtt,
                        self.seq,
                        rtt,
                        outcome == Outcome::Failed,
                    )));
                }
                let Reverse((end, _, rtt, failed)) = self.flying.pop().unwrap();
                if end - self.t0 > until {
                    self.flying.push(Reverse((end, 0, rtt, failed)));
                    return;
                }
                self.now = end;
                let outcome = if failed { Outcome::Failed } else { Outcome::Ok };
                let in_flight = self.flying.len() + 1;
                let limit = c.on_sample(end, rtt, outcome, in_flight);
                self.trace.push((end - self.t0, limit));
            }
        }

        fn limits_after(&self, from: Duration) -> impl Iterator<Item = usize> + '_ {
            self.trace
                .iter()
                .filter(move |(t, _)| *t >= from)
                .map(|(_, l)| *l)
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn constant_latency_with_a_backlog_grows_to_the_maximum_in_a_few_windows() {
        let mut c = Controller::new(Bounds { min: 1, max: 256 }, 4);
        let mut sim = Sim::new();
        let mut reached_at = None;
        for step in 1..=500u32 {
            sim.run(&mut c, step * 10 * MS, usize::MAX, |_, _| {
                (30 * MS, Outcome::Ok)
            });
            if c.limit() == 256 && reached_at.is_none() {
                reached_at = Some((c.windows(), step * 10 * MS));
            }
        }
        let (windows, after) = reached_at.expect("the limit never reached the maximum");
        // 4 → 8 → … → 256 is six doublings.
        assert!(windows <= 7, "{windows} windows");
        assert!(after <= Duration::from_millis(400), "{after:?}");
        assert_eq!(c.limit(), 256, "and it stays there");
        assert!(sim.limits_after(after + MS).all(|l| l == 256));
        let baseline = c.baseline().unwrap();
        assert!(baseline.abs_diff(30 * MS) < MS, "{baseline:?}");
    }

    #[test]
    fn a_store_with_capacity_c_holds_the_limit_around_c_without_drift() {
        // RTT = 30 ms × max(1, in_flight / C): beyond C, more concurrency only queues.
        for capacity in [10usize, 40, 100] {
            let mut c = Controller::new(Bounds { min: 1, max: 1024 }, 4);
            let mut sim = Sim::new();
            let base = 30.0e-3;
            sim.run(&mut c, secs(120), usize::MAX, |_, n| {
                let rtt = base * (n as f64 / capacity as f64).max(1.0);
                (Duration::from_secs_f64(rtt), Outcome::Ok)
            });
            // It may overshoot while it finds C; after that the limit stays in a band above C
            // (the throughput is the store's best from C on) and below 1.5 C (the slow
            // threshold; 2 ms of slack moves it a little).
            let settled: Vec<usize> = sim.limits_after(secs(10)).collect();
            let (lo, hi) = (
                *settled.iter().min().unwrap(),
                *settled.iter().max().unwrap(),
            );
            let band = capacity..=(capacity * 3 / 2 + capacity / 10 + 2);
            assert!(
                band.contains(&lo) && band.contains(&hi),
                "C={capacity}: limit {lo}..={hi}, want within {band:?}"
            );
            // The baseline did not creep up with the queueing the limit causes.
            let baseline = c.baseline().unwrap();
            assert!(
                baseline.abs_diff(30 * MS) < MS,
                "C={capacity}: {baseline:?}"
            );
            assert!(!c.in_slow_start());
        }
    }

    #[test]
    fn failures_cut_the_limit_by_a_tenth_per_window_down_to_the_minimum_and_no_further() {
        let mut c = Controller::new(Bounds { min: 3, max: 100 }, 64);
        let mut sim = Sim::new();
        sim.run(&mut c, secs(20), usize::MAX, |_, _| {
            (10 * MS, Outcome::Failed)
        });
        let mut changes: Vec<usize> = sim.trace.iter().map(|(_, l)| *l).collect();
        changes.dedup();
        assert_eq!(changes[..2], [64, 57], "64 × 0.9 rounded down");
        for pair in changes.windows(2) {
            assert_eq!(
                pair[1],
                ((pair[0] as f64 * 0.9) as usize).min(pair[0] - 1).max(3)
            );
        }
        assert_eq!(c.limit(), 3);
        assert!(sim.trace.iter().all(|(_, l)| *l >= 3));
        assert_eq!(c.last_window().unwrap().verdict, Verdict::Failed);
    }

    #[test]
    fn some_failures_end_slow_start_and_an_outage_restarts_it() {
        let mut c = Controller::new(Bounds { min: 1, max: 1024 }, 8);
        let mut sim = Sim::new();
        let mut i = 0u64;
        // One attempt in ten fails: every window holds a failure.
        sim.run(&mut c, secs(2), usize::MAX, |_, _| {
            i += 1;
            let outcome = if i.is_multiple_of(10) {
                Outcome::Failed
            } else {
                Outcome::Ok
            };
            (10 * MS, outcome)
        });
        assert!(!c.in_slow_start());
        // It doubled to 16 before the first failure, and has been cut back and forth since.
        assert!(sim.limits_after(secs(1)).all(|l| (8..=16).contains(&l)));
        // A full outage: every attempt fails, then the store is back.
        sim.run(&mut c, secs(4), usize::MAX, |_, _| {
            (10 * MS, Outcome::Failed)
        });
        assert!(c.in_slow_start(), "an outage restarts slow start");
        let (low, windows) = (c.limit(), c.windows());
        let mut back = None;
        for step in 401..=500u32 {
            sim.run(&mut c, step * 10 * MS, usize::MAX, |_, _| {
                (10 * MS, Outcome::Ok)
            });
            if c.limit() == 1024 && back.is_none() {
                back = Some((c.windows() - windows, step * 10 * MS - secs(4)));
            }
        }
        let (windows, after) = back.expect("the limit never got back up");
        // From 1: ten doublings, after the window in which the store came back.
        assert!(windows <= 13, "from {low} to 1024 in {windows} windows");
        assert!(after <= Duration::from_millis(300), "{after:?}");
    }

    #[test]
    fn a_store_that_slows_down_makes_the_limit_fall_then_its_new_latency_is_learned() {
        let mut c = Controller::new(Bounds { min: 1, max: 64 }, 4);
        let mut sim = Sim::new();
        // 30 ms for 5 s, then 60 ms for good, whatever the concurrency.
        let store = |t: Duration, _| {
            let rtt = if t < secs(5) { 30 * MS } else { 60 * MS };
            (rtt, Outcome::Ok)
        };
        sim.run(&mut c, secs(5), usize::MAX, store);
        assert_eq!(c.limit(), 64);
        sim.run(&mut c, secs(8), usize::MAX, store);
        let lowest = sim.limits_after(secs(5)).min().unwrap();
        assert!(lowest <= 8, "the limit fell only to {lowest}");
        let fell = c.last_window().unwrap();
        assert!(fell.to < 64, "{fell:?}");
        // The new latency is the store's, not ours (it stays at the minimum): learned, and the
        // limit grows back, one per window.
        sim.run(&mut c, secs(20), usize::MAX, store);
        assert_eq!(c.limit(), 64);
        let baseline = c.baseline().unwrap();
        assert!(baseline.abs_diff(60 * MS) < 2 * MS, "{baseline:?}");
    }

    #[test]
    fn a_store_that_slows_down_under_load_keeps_the_limit_down() {
        // Capacity 50 at 30 ms; after 5 s others load it, and it serves us at half the rate.
        let mut c = Controller::new(Bounds { min: 1, max: 256 }, 4);
        let mut sim = Sim::new();
        let store = |t: Duration, n: usize| {
            let capacity = if t < secs(5) { 50.0 } else { 25.0 };
            let rtt = 30.0e-3 * (n as f64 / capacity).max(1.0);
            (Duration::from_secs_f64(rtt), Outcome::Ok)
        };
        sim.run(&mut c, secs(5), usize::MAX, store);
        let before = c.limit();
        assert!((50..=80).contains(&before), "{before}");
        sim.run(&mut c, secs(30), usize::MAX, store);
        let after: Vec<usize> = sim.limits_after(secs(10)).collect();
        let hi = *after.iter().max().unwrap();
        let lo = *after.iter().min().unwrap();
        assert!(hi <= 42 && lo >= 25, "{lo}..={hi}");
    }

    #[test]
    fn slow_start_stops_doubling_once_queueing_shows() {
        // Beyond 16 uploads the store answers in 40 ms instead of 30: not slow (47 ms), but
        // more than halfway there (38.5 ms).
        let mut c = Controller::new(Bounds { min: 1, max: 1024 }, 4);
        let mut sim = Sim::new();
        sim.run(&mut c, secs(1), usize::MAX, |_, n| {
            let rtt = if n <= 16 { 30 * MS } else { 40 * MS };
            (rtt, Outcome::Ok)
        });
        assert!(!c.in_slow_start());
        let limit = c.limit();
        assert!(
            (65..=100).contains(&limit),
            "{limit}: 64, then one per window"
        );
        assert!(sim.trace.iter().all(|(_, l)| *l <= 100));
        let baseline = c.baseline().unwrap();
        assert!(baseline.abs_diff(30 * MS) < MS, "{baseline:?}");
    }

    #[test]
    fn without_demand_the_limit_does_not_grow() {
        let mut c = Controller::new(Bounds { min: 1, max: 256 }, 8);
        let mut sim = Sim::new();
        // Never more than 5 uploads want to run: the pool is not what holds them back.
        sim.run(&mut c, secs(10), 5, |_, _| (30 * MS, Outcome::Ok));
        assert!(c.windows() > 50, "{}", c.windows());
        assert_eq!(c.limit(), 8);
        assert!(!c.last_window().unwrap().reached);
        // The same from a limit the demand just reaches: growth, then none past it.
        let mut c = Controller::new(Bounds { min: 1, max: 256 }, 4);
        let mut sim = Sim::new();
        sim.run(&mut c, secs(10), 5, |_, _| (30 * MS, Outcome::Ok));
        assert_eq!(
            c.limit(),
            8,
            "4 was reached, so it doubled once; 8 never is"
        );
    }

    #[test]
    fn a_window_needs_enough_samples_and_one_mean_rtt_and_ignores_attempts_begun_before_a_change() {
        let mut c = Controller::new(Bounds { min: 1, max: 100 }, 4);
        let t0 = Instant::now();
        // Four samples, though seconds apart: not a window yet.
        for i in 1..=4 {
            c.on_sample(t0 + secs(i), 30 * MS, Outcome::Ok, 4);
        }
        assert_eq!(c.windows(), 0);
        assert_eq!(c.on_sample(t0 + secs(5), 30 * MS, Outcome::Ok, 4), 8);
        assert_eq!(c.windows(), 1);
        let changed = t0 + secs(5);
        // Attempts that began before the doubling are not counted, failed or not.
        for i in 1..=10 {
            c.on_sample(changed + i * MS, 20 * MS, Outcome::Failed, 8);
        }
        assert_eq!((c.windows(), c.limit()), (1, 8));
        // Five that began after it close a window; 2 in flight of 8 allowed: no growth.
        for i in 20..25 {
            c.on_sample(changed + i * MS, 19 * MS, Outcome::Ok, 2);
        }
        assert_eq!((c.windows(), c.limit()), (2, 8));
        // The limit did not change, so attempts that began before that window closed count;
        // but five samples within less than their mean RTT are not a window yet.
        let closed = changed + 24 * MS;
        for i in 1..=5 {
            c.on_sample(closed + i * MS, 20 * MS, Outcome::Ok, 8);
        }
        assert_eq!(c.windows(), 2);
        c.on_sample(closed + 25 * MS, 20 * MS, Outcome::Ok, 8);
        assert_eq!((c.windows(), c.limit()), (3, 16));
    }

    #[test]
    fn bounds_are_kept() {
        let c = Controller::new(Bounds { min: 0, max: 0 }, 10);
        assert_eq!(c.bounds(), Bounds { min: 1, max: 1 });
        assert_eq!(c.limit(), 1);
        let c = Controller::new(Bounds { min: 20, max: 30 }, 4);
        assert_eq!(c.limit(), 20);
        assert_eq!(Workers::Auto(Bounds { min: 1, max: 256 }).initial(), 4);
        assert_eq!(Workers::Auto(Bounds { min: 1, max: 2 }).initial(), 2);
        assert_eq!(Workers::Auto(Bounds { min: 9, max: 20 }).initial(), 9);
        assert_eq!(Workers::Fixed(16).initial(), 16);
        assert_eq!(
            Workers::Auto(Bounds { min: 1, max: 256 }).to_string(),
            "auto (1..=256)"
        );
    }
}
