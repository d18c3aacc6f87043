//! The drain's upload slots: how many uploads may run at once, fixed or moved by the adaptive
//! controller, resized without ever waiting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::adaptive::{self, Outcome, Workers};
use crate::metrics::Metrics;

/// The upload slots: a semaphore holding the concurrency limit's permits. With `--workers auto`
/// a [`adaptive::Controller`] moves the limit; a rise adds permits, a fall takes back the idle
/// ones at once and the rest as uploads finish (a debt), so it never waits.
pub(super) struct Pool {
    pub(super) slots: Arc<Semaphore>,
    state: Mutex<PoolState>,
    metrics: Metrics,
}

#[derive(Debug)]
struct PoolState {
    /// `None`: a fixed number of slots.
    controller: Option<adaptive::Controller>,
    limit: usize,
    /// Slots held: by uploads, and by the dispatcher while it looks for the next record.
    in_use: usize,
    /// Permits still to take back from uploads as they finish (the limit fell while they ran).
    debt: usize,
    /// The limit last logged, and when.
    logged: (usize, Option<Instant>),
}

impl Pool {
    pub(super) fn new(workers: Workers, metrics: Metrics) -> Self {
        let limit = workers.initial();
        let controller = match workers {
            Workers::Fixed(_) => None,
            Workers::Auto(bounds) => Some(adaptive::Controller::new(bounds, limit)),
        };
        metrics
            .upload_concurrency_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        if let Workers::Auto(bounds) = workers {
            tracing::info!(
                limit,
                min = bounds.min,
                max = bounds.max,
                "upload concurrency adapts to the object store (--workers auto)"
            );
        }
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            state: Mutex::new(PoolState {
                controller,
                limit,
                in_use: 0,
                debt: 0,
                logged: (limit, None),
            }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock()
    }

    /// Feeds one `PutObject` attempt to the controller (if any) and applies the limit it gives.
    pub(super) fn sample(&self, now: Instant, rtt: Duration, outcome: Outcome) {
        let mut state = self.lock();
        let in_use = state.in_use;
        let Some(controller) = state.controller.as_mut() else {
            return;
        };
        let windows = controller.windows();
        let limit = controller.on_sample(now, rtt, outcome, in_use);
        let closed = controller.windows() != windows;
        let window = controller.last_window().copied();
        let previous = state.limit;
        if limit != previous {
            self.resize(&mut state, limit);
        }
        // Falls are logged as they happen; rises at most once a second (slow start would
        // otherwise log every round trip).
        let (logged, at) = state.logged;
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        if limit < previous {
            let reason = match window.map(|w| w.verdict) {
                Some(adaptive::Verdict::Failed) => "failures",
                _ => "latency",
            };
            tracing::info!(
                limit,
                previous,
                reason,
                window_rtt_ms = ms(window.and_then(|w| w.mean_rtt)),
                baseline_rtt_ms = ms(window.and_then(|w| w.baseline)),
                failures = window.map_or(0, |w| w.failures),
                "upload concurrency lowered"
            );
            state.logged = (limit, Some(now));
        } else if closed
            && limit == previous
            && window.is_some_and(|w| w.verdict == adaptive::Verdict::Slow)
        {
            tracing::info!(
                limit,
                window_rtt_ms = ms(window.and_then(|w| w.mean_rtt)),
                "the object store is slow even at --workers-min: its latency is the new baseline"
            );
        } else if limit != logged
            && at.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
        {
            tracing::info!(
                limit,
                previous = logged,
                baseline_rtt_ms = ms(window.and_then(|w| w.baseline)),
                "upload concurrency raised"
            );
            state.logged = (limit, Some(now));
        }
    }

    /// Moves the number of slots to `limit` without waiting: a rise first cancels debt, then
    /// adds permits; a fall takes the idle permits now and owes the rest.
    fn resize(&self, state: &mut PoolState, limit: usize) {
        if limit > state.limit {
            let more = limit - state.limit;
            let cancelled = more.min(state.debt);
            state.debt -= cancelled;
            self.slots.add_permits(more - cancelled);
        } else {
            let fewer = state.limit - limit;
            let taken = self.slots.forget_permits(fewer);
            state.debt += fewer - taken;
        }
        state.limit = limit;
        self.metrics
            .upload_concurrency_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

/// One held slot; giving it back pays the pool's debt first.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
}

impl Slot {
    pub(super) fn new(permit: OwnedSemaphorePermit, pool: &Arc<Pool>) -> Self {
        pool.lock().in_use += 1;
        Self {
            permit: Some(permit),
            pool: Arc::clone(pool),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        state.in_use = state.in_use.saturating_sub(1);
        if let Some(permit) = self.permit.take()
            && state.debt > 0
        {
            state.debt -= 1;
            permit.forget();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::adaptive::Bounds;

    fn pool(workers: Workers) -> (Arc<Pool>, Metrics) {
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        (Arc::new(Pool::new(workers, metrics.clone())), metrics)
    }

    fn take(pool: &Arc<Pool>) -> Option<Slot> {
        let permit = Arc::clone(&pool.slots).try_acquire_owned().ok()?;
        Some(Slot::new(permit, pool))
    }

    #[test]
    fn a_fixed_pool_has_its_slots_and_ignores_samples() {
        let (pool, metrics) = pool(Workers::Fixed(3));
        assert_eq!(metrics.upload_concurrency_limit.get(), 3);
        let held: Vec<Slot> = (0..3).map(|_| take(&pool).unwrap()).collect();
        assert!(take(&pool).is_none());
        let t0 = Instant::now();
        for i in 0..100 {
            pool.sample(
                t0 + Duration::from_millis(i),
                Duration::from_millis(1),
                Outcome::Failed,
            );
        }
        assert_eq!(pool.lock().limit, 3);
        drop(held);
        assert_eq!(pool.slots.available_permits(), 3);
    }

    #[test]
    fn shrinking_takes_idle_permits_at_once_and_the_rest_as_slots_come_back() {
        let (pool, metrics) = pool(Workers::Auto(Bounds { min: 1, max: 64 }));
        assert_eq!(pool.lock().limit, 4, "auto starts at 4");
        assert_eq!(metrics.upload_concurrency_limit.get(), 4);
        let mut held: Vec<Slot> = (0..3).map(|_| take(&pool).unwrap()).collect();
        // From 4 to 1: the idle permit now, two owed.
        resize(&pool, 1);
        assert_eq!(pool.lock().debt, 2);
        assert_eq!(metrics.upload_concurrency_limit.get(), 1);
        assert!(take(&pool).is_none());
        held.pop();
        assert!(take(&pool).is_none(), "the first slot back paid debt");
        held.pop();
        assert!(take(&pool).is_none(), "so did the second");
        assert_eq!(pool.lock().debt, 0);
        held.pop();
        held.push(take(&pool).unwrap());
        assert!(take(&pool).is_none(), "one slot now");
        // A rise adds permits; with debt, it cancels the debt first.
        resize(&pool, 3);
        held.push(take(&pool).unwrap());
        held.push(take(&pool).unwrap());
        assert!(take(&pool).is_none());
        resize(&pool, 1);
        assert_eq!(pool.lock().debt, 2);
        resize(&pool, 2);
        assert_eq!(pool.lock().debt, 1);
        assert!(take(&pool).is_none());
        held.clear();
        assert_eq!(pool.slots.available_permits(), 2);
        assert_eq!(pool.lock().in_use, 0);
    }

    fn resize(pool: &Pool, limit: usize) {
        let mut state = pool.lock();
        pool.resize(&mut state, limit);
    }

    #[test]
    fn samples_move_the_limit_and_the_gauge() {
        let (pool, metrics) = pool(Workers::Auto(Bounds { min: 2, max: 16 }));
        let mut held: Vec<Slot> = Vec::new();
        let ms = Duration::from_millis;
        let mut now = Instant::now();
        // A backlog (every free slot is taken at once) and 10 ms answers: slow start doubles
        // to 16, the maximum.
        for _ in 0..40 {
            held.extend(std::iter::from_fn(|| take(&pool)));
            now += ms(3);
            pool.sample(now, ms(10), Outcome::Ok);
        }
        assert_eq!(pool.lock().limit, 16);
        assert_eq!(metrics.upload_concurrency_limit.get(), 16);
        assert_eq!(held.len(), 16);
        // Failures: the limit falls, and the permits held are owed back.
        for _ in 0..40 {
            now += ms(3);
            pool.sample(now, ms(1), Outcome::Failed);
        }
        let (limit, debt) = {
            let state = pool.lock();
            (state.limit, state.debt)
        };
        assert!((2..16).contains(&limit), "{limit}");
        assert_eq!(
            metrics.upload_concurrency_limit.get(),
            i64::try_from(limit).unwrap()
        );
        assert_eq!(held.len(), limit + debt, "held = limit + debt");
        held.clear();
        assert_eq!(pool.slots.available_permits(), limit);
        assert_eq!(pool.lock().debt, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn on_auto_the_real_concurrency_grows_against_a_store_that_only_adds_latency() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (pool, metrics) = pool(Workers::Auto(Bounds { min: 1, max: 128 }));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let t0 = Instant::now();
        // The dispatcher's loop, with uploads that take 30 ms: 4 → 128 is five doublings, about
        // 0.2 s; a loaded machine gets ten times that.
        while t0.elapsed() < Duration::from_secs(3) && most.load(Ordering::Relaxed) < 128 {
            let permit = Arc::clone(&pool.slots).acquire_owned().await.unwrap();
            let slot = Slot::new(permit, &pool);
            let (pool, running, most) =
                (Arc::clone(&pool), Arc::clone(&running), Arc::clone(&most));
            tokio::spawn(async move {
                let now = running.fetch_add(1, Ordering::Relaxed) + 1;
                most.fetch_max(now, Ordering::Relaxed);
                let started = Instant::now();
                tokio::time::sleep(Duration::from_millis(30)).await;
                running.fetch_sub(1, Ordering::Relaxed);
                let ended = Instant::now();
                pool.sample(ended, ended - started, Outcome::Ok);
                drop(slot);
            });
        }
        assert_eq!(
            most.load(Ordering::Relaxed),
            128,
            "after {:?}",
            t0.elapsed()
        );
        assert_eq!(metrics.upload_concurrency_limit.get(), 128);
    }
}
