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
//! Users: the uploader's store breaker (one, shared by every upload), and ingest's balancer (one
//! per uploader endpoint, as many as the endpoint set: bounded by it, so no registry is needed).
//!
//! Invariant: an open breaker admits no call before its `until`; a half-open one admits exactly
//! one probe.

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

    /// Until when an open breaker refuses calls; `None` while closed or half-open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until, .. } => Some(until),
            Inner::Closed { .. } | Inner::HalfOpen { .. } => None,
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

    proptest! {
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
