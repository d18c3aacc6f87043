//! Which uploader takes a chunk: a sans-IO balancer over a changing set of endpoints.
//!
//! - **Affinity.** Endpoints are ranked per session by rendezvous hashing, so a session's chunks
//!   all go to one uploader while it is healthy, sessions spread evenly over the set, and adding
//!   or removing an endpoint moves only the sessions that ranked it first.
//! - **Health.** Each endpoint has a circuit breaker (`spillway_breaker::Breaker`, tripped by one
//!   refusal: unreachable, shutting down, full). While it is open the endpoint is ranked after
//!   every healthy one; once its time is up the endpoint is offered again, and a refusal then (a
//!   failed probe) doubles the open period up to a ceiling, while a success closes it. Refusals
//!   that arrive while it is already open (other sessions' calls in flight) change nothing, so a
//!   burst of them does not push the endpoint to the ceiling at once.
//! - **Never stuck.** When every endpoint is cooling down, all are still offered, soonest first:
//!   the caller decides how long to back off between rounds.
//!
//! Time is passed in, so every rule is tested deterministically.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use spillway_breaker::Breaker;

/// Cool-down bounds of a refusing endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Cooldown {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }
}

impl Cooldown {
    fn breaker(self) -> Breaker {
        Breaker::new(spillway_breaker::Config {
            failure_threshold: 1,
            open_for: self.first,
            max_open_for: self.max,
        })
    }
}

#[derive(Debug, Clone)]
struct Slot<K> {
    key: K,
    health: Breaker,
}

/// The endpoints and their health. `K` names an endpoint (a URL).
#[derive(Debug, Clone)]
pub struct Balancer<K> {
    slots: Vec<Slot<K>>,
    cooldown: Cooldown,
}

impl<K: Clone + Eq + Hash> Balancer<K> {
    pub fn new(cooldown: Cooldown) -> Self {
        Self {
            slots: Vec::new(),
            cooldown,
        }
    }

    /// Replaces the set of endpoints (a fresh DNS answer). Endpoints that stay keep their
    /// health; duplicates are ignored.
    pub fn set(&mut self, keys: impl IntoIterator<Item = K>) {
        let mut next: Vec<Slot<K>> = Vec::new();
        for key in keys {
            if next.iter().any(|s| s.key == key) {
                continue;
            }
            let slot = self
                .slots
                .iter()
                .find(|s| s.key == key)
                .cloned()
                .unwrap_or_else(|| Slot {
                    key,
                    health: self.cooldown.breaker(),
                });
            next.push(slot);
        }
        self.slots = next;
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Endpoints not cooling down at `now`.
    pub fn healthy(&self, now: Instant) -> usize {
        self.slots.iter().filter(|s| Self::up(s, now)).count()
    }

    fn up(slot: &Slot<K>, now: Instant) -> bool {
        slot.health.open_until().is_none_or(|t| t <= now)
    }

    /// Every endpoint, in the order to try them for the session named by `affinity`: healthy
    /// ones by rendezvous rank, then cooling ones, soonest back first.
    pub fn order(&self, affinity: &str, now: Instant) -> Vec<K> {
        let mut healthy: Vec<(u64, &K)> = Vec::new();
        let mut cooling: Vec<(Instant, u64, &K)> = Vec::new();
        for slot in &self.slots {
            let score = rank(&slot.key, affinity);
            match slot.health.open_until() {
                Some(until) if until > now => cooling.push((until, score, &slot.key)),
                _ => healthy.push((score, &slot.key)),
            }
        }
        healthy.sort_by_key(|h| std::cmp::Reverse(h.0));
        cooling.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        healthy
            .into_iter()
            .map(|(_, k)| k.clone())
            .chain(cooling.into_iter().map(|(_, _, k)| k.clone()))
            .collect()
    }

    /// `key` refused at `now`: it cools down. Returns how long (zero for an unknown key, e.g.
    /// one a DNS refresh removed meanwhile).
    pub fn refused(&mut self, key: &K, now: Instant) -> Duration {
        let Some(slot) = self.slots.iter_mut().find(|s| s.key == *key) else {
            return Duration::ZERO;
        };
        // An open breaker whose time is up turns half-open here: this refusal was its probe.
        let _ = slot.health.check(now);
        slot.health.on_failure(now);
        slot.health
            .open_until()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// `key` took a chunk at `now`: it is healthy again.
    pub fn succeeded(&mut self, key: &K, now: Instant) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.key == *key) {
            slot.health.on_success(now);
        }
    }
}

/// Rendezvous score of an endpoint for a session: stable within a build, spread uniformly.
fn rank<K: Hash>(key: &K, affinity: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    affinity.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(n: usize) -> Balancer<String> {
        let mut b = Balancer::new(Cooldown::default());
        b.set((0..n).map(|i| format!("http://10.0.0.{i}:50051")));
        b
    }

    #[test]
    fn a_session_sticks_to_one_endpoint_and_sessions_spread_over_all() {
        let b = balancer(3);
        let now = Instant::now();
        let mut per_endpoint = std::collections::HashMap::new();
        for s in 0..3000 {
            let session = format!("session-{s}");
            let first = b.order(&session, now)[0].clone();
            assert_eq!(b.order(&session, now)[0], first, "stable per session");
            *per_endpoint.entry(first).or_insert(0) += 1;
        }
        assert_eq!(per_endpoint.len(), 3);
        for (endpoint, n) in per_endpoint {
            assert!((800..=1200).contains(&n), "{endpoint} took {n} of 3000");
        }
    }

    #[test]
    fn a_refusing_endpoint_is_skipped_until_its_cooldown_ends_then_doubles() {
        let mut b = balancer(3);
        let t0 = Instant::now();
        let first = b.order("s", t0)[0].clone();
        assert_eq!(b.refused(&first, t0), Duration::from_millis(250));
        let order = b.order("s", t0);
        assert_ne!(order[0], first, "another endpoint takes the chunk");
        assert_eq!(order.last(), Some(&first), "the refusing one is tried last");
        assert_eq!(b.healthy(t0), 2);
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(b.order("s", t1)[0], first, "back after its cooldown");
        assert_eq!(b.refused(&first, t1), Duration::from_millis(500));
        assert_eq!(
            b.refused(&first, t1),
            Duration::from_millis(500),
            "refusals while it is open do not add up"
        );
        let mut t = t1;
        for _ in 0..10 {
            t += b.refused(&first, t);
        }
        assert_eq!(
            b.refused(&first, t),
            Duration::from_secs(5),
            "each failed probe doubles it, up to the cap"
        );
        b.succeeded(&first, t1);
        assert_eq!(b.healthy(t1), 3);
        assert_eq!(b.refused(&first, t1), Duration::from_millis(250), "reset");
    }

    #[test]
    fn when_all_refuse_every_endpoint_is_still_offered_soonest_first() {
        let mut b = balancer(3);
        let t0 = Instant::now();
        let keys = b.order("s", t0);
        b.refused(&keys[0], t0);
        b.refused(&keys[0], t0 + Duration::from_millis(250)); // a failed probe: until t0+750
        b.refused(&keys[1], t0 + Duration::from_millis(100)); // until t0+350
        b.refused(&keys[2], t0); // until t0+250
        assert_eq!(b.healthy(t0), 0);
        assert_eq!(
            b.order("s", t0),
            vec![keys[2].clone(), keys[1].clone(), keys[0].clone()]
        );
    }

    #[test]
    fn a_new_dns_answer_keeps_known_endpoints_health_and_moves_few_sessions() {
        let mut b = balancer(3);
        let t0 = Instant::now();
        let sessions: Vec<String> = (0..1000).map(|s| format!("s{s}")).collect();
        let before: Vec<String> = sessions.iter().map(|s| b.order(s, t0)[0].clone()).collect();
        let sick = "http://10.0.0.1:50051".to_owned();
        b.refused(&sick, t0);
        let mut keys: Vec<String> = (0..4).map(|i| format!("http://10.0.0.{i}:50051")).collect();
        keys.push(keys[0].clone());
        b.set(keys);
        assert_eq!(b.len(), 4, "duplicates ignored");
        assert_eq!(b.healthy(t0), 3, "the refusing endpoint is still cooling");
        b.succeeded(&sick, t0);
        let moved = sessions
            .iter()
            .zip(&before)
            .filter(|(s, was)| b.order(s, t0)[0] != **was)
            .count();
        assert!(
            (150..=350).contains(&moved),
            "about a quarter of sessions move to the new endpoint, {moved} did"
        );
        b.set(Vec::<String>::new());
        assert!(b.is_empty());
        assert_eq!(b.refused(&sick, t0), Duration::ZERO);
    }
}
