//! The chunk fill timeout (`--chunk-fill-timeout`): a wall-clock limit on how long the chunk a
//! session is filling may stay open, which is a minimum data rate. A real-time device fills a
//! chunk in `chunk_seconds`; one that sends slower than `chunk_seconds / fill_timeout` of real
//! time (half, by default) has its audio so far flushed and its session ended with `TOO_SLOW`,
//! so that a trickling stranger cannot hold a session slot and a budget reservation for ever.
//!
//! Time that ingest itself makes the session wait (for the memory budget, or for the uploader to
//! commit the previous chunk) does not count against the device: the deadline moves by it.
//! Sans-IO: the caller passes the time.

use std::time::Duration;

use std::time::Instant;

/// The deadline of one session's open chunk.
#[derive(Debug, Clone)]
pub struct FillTimer {
    limit: Duration,
    deadline: Option<Instant>,
}

impl FillTimer {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            deadline: None,
        }
    }

    /// After audio was fed at `now`: a chunk completed (`completed`) or not, and `pending` bytes
    /// are now in the chunk being filled. A new chunk's clock starts with its first byte.
    pub fn fed(&mut self, now: Instant, completed: bool, pending: usize) {
        if completed {
            self.deadline = None;
        }
        if pending == 0 {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(now + self.limit);
        }
    }

    /// Ingest kept the session waiting for `waited`: the device is not to blame for it.
    pub fn excuse(&mut self, waited: Duration) {
        if let Some(d) = &mut self.deadline {
            *d += waited;
        }
    }

    /// When the open chunk expires; `None` while no chunk is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_clock_starts_with_a_chunks_first_byte_and_stops_when_it_completes() {
        let t0 = Instant::now();
        let mut t = FillTimer::new(120 * S);
        assert_eq!(t.deadline(), None, "nothing open yet");
        t.fed(t0, false, 0);
        assert_eq!(t.deadline(), None, "no bytes, no open chunk");
        t.fed(t0 + S, false, 100);
        assert_eq!(t.deadline(), Some(t0 + 121 * S));
        t.fed(t0 + 50 * S, false, 900);
        assert_eq!(
            t.deadline(),
            Some(t0 + 121 * S),
            "more bytes do not move an open chunk's deadline"
        );
        t.fed(t0 + 60 * S, true, 40);
        assert_eq!(
            t.deadline(),
            Some(t0 + 180 * S),
            "the next chunk's clock starts with the bytes that spilled into it"
        );
        t.fed(t0 + 70 * S, true, 0);
        assert_eq!(
            t.deadline(),
            None,
            "a frame ending on the boundary opens nothing"
        );
    }

    #[test]
    fn time_ingest_made_the_device_wait_is_excused() {
        let t0 = Instant::now();
        let mut t = FillTimer::new(10 * S);
        t.excuse(5 * S);
        assert_eq!(
            t.deadline(),
            None,
            "nothing to excuse while no chunk is open"
        );
        t.fed(t0, false, 2);
        t.excuse(5 * S);
        assert_eq!(t.deadline(), Some(t0 + 15 * S));
    }
}
