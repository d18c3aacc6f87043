//! Circuit breakers that stop retry storms, with no I/O and no clock of their own.
//!
//! A [`Breaker`] is a pure state machine: callers pass `now` into every call, so tests drive it
//! through hours of outage in microseconds, deterministically (the quinn-proto habit).
//!
//! ```text
//!   Closed --(failure_threshold consecutive failures)--> Open(until = now + open_for)
//!   Open   --(now >= until: one caller gets a probe)---> HalfOpen
//!   HalfOpen --(probe succeeds)--> Closed
//!   HalfOpen --(probe fails, or is not reported within open_for)--> Open(open_for doubled, capped)
//! ```
//!
//! A [`Registry`] keeps one breaker per key with a hard bound on how many it holds: a full
//! registry evicts the least recently used *closed* breaker first (forgetting a closed breaker
//! loses nothing), and only when every breaker is open the least recently used open one. The seed
//! system's registry had a soft cap that open breakers could exceed; this one cannot.
//!
//! Invariants:
//! - `Registry::len() <= capacity` after every call.
//! - An open breaker admits no call before its `until`; a half-open one admits exactly one probe.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Tuning of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Consecutive failures that open a closed breaker. At least 1.
    pub failure_threshold: u32,
    /// How long a breaker stays open after it first trips.
    pub open_for: Duration,
    /// Ceiling for the open period, which doubles each time a probe fails.
    pub max_open_for: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(1),
            max_open_for: Duration::from_secs(30),
        }
    }
}

/// What a breaker is doing, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// Numeric value for a gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// Answer to [`Breaker::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead, then report the outcome with `on_success` or `on_failure`.
    Allow,
    /// Do not call; ask again at `retry_at`.
    Reject { retry_at: Instant },
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        open_for: Duration,
    },
    HalfOpen {
        probe_started: Instant,
        open_for: Duration,
    },
}

/// One circuit breaker. See the crate docs for the state diagram.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: Config,
    inner: Inner,
}

impl Breaker {
    pub fn new(mut config: Config) -> Self {
        config.failure_threshold = config.failure_threshold.max(1);
        config.max_open_for = config.max_open_for.max(config.open_for);
        Self {
            config,
            inner: Inner::Closed { failures: 0 },
        }
    }

    /// Consecutive failures counted while closed (0 otherwise).
    pub fn failures(&self) -> u32 {
        match self.inner {
            Inner::Closed { failures } => failures,
            _ => 0,
        }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// May a call go ahead at `now`? An open breaker whose time is up lets exactly one probe
    /// through and turns half-open.
    pub fn check(&mut self, now: Instant) -> Decision {
        match self.inner {
            Inner::Closed { .. } => Decision::Allow,
            Inner::Open { until, open_for } => {
                if now >= until {
                    self.inner = Inner::HalfOpen {
                        probe_started: now,
                        open_for,
                    };
                    Decision::Allow
                } else {
                    Decision::Reject { retry_at: until }
                }
            }
            Inner::HalfOpen {
                probe_started,
                open_for,
            } => {
                // A probe whose outcome never came back counts as failed, so a lost permit
                // cannot wedge the breaker half-open forever.
                let deadline = probe_started + open_for;
                if now >= deadline {
                    self.trip(now, self.next_open_for(open_for));
                    self.check(now)
                } else {
                    Decision::Reject { retry_at: deadline }
                }
            }
        }
    }

    /// Reports a successful call: the breaker closes.
    pub fn on_success(&mut self, _now: Instant) {
        self.inner = Inner::Closed { failures: 0 };
    }

    /// Reports a failed call.
    pub fn on_failure(&mut self, now: Instant) {
        match self.inner {
            Inner::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    self.trip(now, self.config.open_for);
                } else {
                    self.inner = Inner::Closed { failures };
                }
            }
            // A late failure from a call admitted before the breaker opened changes nothing.
            Inner::Open { .. } => {}
            Inner::HalfOpen { open_for, .. } => self.trip(now, self.next_open_for(open_for)),
        }
    }

    fn next_open_for(&self, open_for: Duration) -> Duration {
        open_for.saturating_mul(2).min(self.config.max_open_for)
    }

    fn trip(&mut self, now: Instant, open_for: Duration) {
        self.inner = Inner::Open {
            until: now + open_for,
            open_for,
        };
    }
}

#[derive(Debug)]
struct Entry {
    breaker: Breaker,
    last_used: Instant,
}

/// A bounded map of breakers, one per key (an endpoint, a bucket, a user).
#[derive(Debug)]
pub struct Registry<K> {
    config: Config,
    capacity: usize,
    entries: HashMap<K, Entry>,
    evictions: u64,
}

impl<K: Hash + Eq + Clone> Registry<K> {
    /// A registry that never holds more than `capacity` breakers (at least 1).
    pub fn new(config: Config, capacity: usize) -> Self {
        Self {
            config,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Breakers evicted to keep the bound, since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The breaker for `key`, created closed if absent (evicting one if the registry is full).
    pub fn breaker(&mut self, key: &K, now: Instant) -> &mut Breaker {
        if !self.entries.contains_key(key) && self.entries.len() >= self.capacity {
            self.evict_one();
        }
        let config = self.config;
        let entry = self.entries.entry(key.clone()).or_insert_with(|| Entry {
            breaker: Breaker::new(config),
            last_used: now,
        });
        entry.last_used = now;
        &mut entry.breaker
    }

    /// Forgets closed breakers unused for `idle` or longer. Open ones are kept: forgetting them
    /// would reopen the flood they hold back.
    pub fn sweep(&mut self, now: Instant, idle: Duration) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            e.breaker.state() != State::Closed || now.saturating_duration_since(e.last_used) < idle
        });
        let removed = before - self.entries.len();
        self.evictions += removed as u64;
        removed
    }

    fn evict_one(&mut self) {
        let victim = self
            .entries
            .iter()
            .min_by_key(|(_, e)| (e.breaker.state() != State::Closed, e.last_used))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.entries.remove(&k);
            self.evictions += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> Config {
        Config {
            failure_threshold: 3,
            open_for: 100 * MS,
            max_open_for: 400 * MS,
        }
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success(t0);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), State::Closed, "success resets the count");
        b.on_failure(t0);
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.check(t0 + 50 * MS),
            Decision::Reject {
                retry_at: t0 + 100 * MS
            }
        );
    }

    #[test]
    fn half_open_admits_exactly_one_probe_and_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let t1 = t0 + 100 * MS;
        assert_eq!(b.check(t1), Decision::Allow);
        assert_eq!(b.state(), State::HalfOpen);
        assert!(matches!(b.check(t1), Decision::Reject { .. }));
        b.on_success(t1);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.check(t1), Decision::Allow);
    }

    #[test]
    fn failed_probes_double_the_open_period_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let mut now = t0;
        let mut periods = Vec::new();
        for _ in 0..5 {
            let Decision::Reject { retry_at } = b.check(now) else {
                panic!("open breaker admitted a call")
            };
            periods.push(retry_at - now);
            now = retry_at;
            assert_eq!(b.check(now), Decision::Allow);
            b.on_failure(now);
        }
        assert_eq!(
            periods,
            vec![100 * MS, 200 * MS, 400 * MS, 400 * MS, 400 * MS]
        );
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t0);
        }
        assert_eq!(b.check(t0 + 100 * MS), Decision::Allow);
        // The probe's outcome is never reported. After open_for, it counts as failed and the
        // breaker opens again for twice as long.
        assert_eq!(
            b.check(t0 + 200 * MS),
            Decision::Reject {
                retry_at: t0 + 400 * MS
            }
        );
        assert_eq!(b.check(t0 + 400 * MS), Decision::Allow);
    }

    #[test]
    fn registry_evicts_closed_before_open() {
        let t0 = Instant::now();
        let mut r = Registry::new(cfg(), 2);
        for _ in 0..3 {
            r.breaker(&"open", t0).on_failure(t0);
        }
        r.breaker(&"closed", t0 + MS);
        r.breaker(&"new", t0 + 2 * MS);
        assert_eq!(r.len(), 2);
        assert_eq!(r.evictions(), 1);
        assert_eq!(r.breaker(&"open", t0 + 3 * MS).state(), State::Open);
    }

    #[test]
    fn sweep_forgets_idle_closed_breakers_but_keeps_open_ones() {
        let t0 = Instant::now();
        let mut r = Registry::new(cfg(), 10);
        r.breaker(&1, t0);
        for _ in 0..3 {
            r.breaker(&2, t0).on_failure(t0);
        }
        assert_eq!(r.sweep(t0 + 10 * MS, 5 * MS), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.breaker(&2, t0 + 10 * MS).state(), State::Open);
    }

    proptest! {
        #[test]
        fn registry_never_exceeds_its_capacity(
            capacity in 1usize..8,
            ops in proptest::collection::vec((0u8..32, any::<bool>()), 0..300),
        ) {
            let t0 = Instant::now();
            let mut r = Registry::new(cfg(), capacity);
            for (i, (key, fail)) in ops.into_iter().enumerate() {
                let now = t0 + MS * i as u32;
                let b = r.breaker(&key, now);
                if b.check(now) == Decision::Allow {
                    if fail { b.on_failure(now) } else { b.on_success(now) }
                }
                prop_assert!(r.len() <= capacity);
            }
        }

        #[test]
        fn open_breaker_never_admits_before_its_time(
            fails in 3u32..10,
            probe_at_ms in 0u64..1000,
        ) {
            let t0 = Instant::now();
            let mut b = Breaker::new(cfg());
            for _ in 0..fails { b.on_failure(t0); }
            let now = t0 + Duration::from_millis(probe_at_ms);
            let allowed = b.check(now) == Decision::Allow;
            prop_assert_eq!(allowed, probe_at_ms >= 100);
        }
    }
}
