//! Where each recent capture's accepted audio ended, by (uid, conversation): a listen that
//! reconnects to this ingest and resends what it is unsure of (timeline version 2, the same
//! timestamps) has that audio trimmed as a replay instead of stored twice.
//!
//! Bounded: at most `cap` entries (four per `--max-sessions`), each forgotten `ttl` after its
//! last update (listen's reconnects back off for at most 15 s). When full, the entry updated
//! longest ago goes. Only this ingest remembers: a reconnect that lands on another ingest
//! stores the resent audio again (at other keys), as Omi's pusher would without its database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub(crate) struct Timelines {
    ends: Mutex<HashMap<(String, String), (f64, Instant)>>,
    cap: usize,
    ttl: Duration,
}

impl Timelines {
    pub(crate) fn new(cap: usize, ttl: Duration) -> Self {
        Self {
            ends: Mutex::new(HashMap::new()),
            cap: cap.max(1),
            ttl,
        }
    }

    /// The end of the audio accepted for (`uid`, `conversation`), if remembered.
    pub(crate) fn get(&self, uid: &str, conversation: &str, now: Instant) -> Option<f64> {
        let ends = self.ends.lock();
        let (end, at) = ends.get(&(uid.to_owned(), conversation.to_owned()))?;
        (now.saturating_duration_since(*at) < self.ttl).then_some(*end)
    }

    /// Remembers that audio for (`uid`, `conversation`) was accepted up to `end`.
    pub(crate) fn put(&self, uid: &str, conversation: &str, end: f64, now: Instant) {
        let mut ends = self.ends.lock();
        let key = (uid.to_owned(), conversation.to_owned());
        if !ends.contains_key(&key) && ends.len() >= self.cap {
            let ttl = self.ttl;
            ends.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            if ends.len() >= self.cap
                && let Some(oldest) = ends
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                ends.remove(&oldest);
            }
        }
        ends.insert(key, (end, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_remembered_for_the_ttl_and_the_oldest_goes_when_full() {
        let t0 = Instant::now();
        let t = Timelines::new(2, Duration::from_secs(60));
        t.put("u", "a", 10.0, t0);
        t.put("u", "b", 20.0, t0 + Duration::from_secs(1));
        assert_eq!(t.get("u", "a", t0), Some(10.0));
        t.put("u", "c", 30.0, t0 + Duration::from_secs(2));
        assert_eq!(t.get("u", "a", t0), None, "the oldest went");
        assert_eq!(t.get("u", "c", t0 + Duration::from_secs(2)), Some(30.0));
        assert_eq!(
            t.get("u", "b", t0 + Duration::from_secs(61)),
            None,
            "expired"
        );
        assert_eq!(t.get("v", "c", t0), None, "per uid");
    }
}
