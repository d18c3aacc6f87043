//! Ingest's global memory budget (`--max-buffered-bytes`) for audio not yet acknowledged by the
//! uploader.
//!
//! Memory is reserved as audio arrives, in two steps per chunk ([`next_reservation`]): a
//! session reserves [`FIRST_STEP`] bytes before it feeds the first byte of a new chunk, and the
//! rest of the chunk (`chunk_seconds × sample_rate × 2` bytes in all) once it has sent that much.
//! The chunker's buffer grows to exactly what is reserved, so the budget counts what is held. A
//! stranger who opens a session and trickles holds one first step, not a chunk, and only until
//! `--chunk-fill-timeout`. The reservation travels with the chunk to the forwarder and is released
//! only when the uploader has committed it (or the session gave up on it). When the budget is
//! spent, sessions wait for a reservation and so stop reading their streams: QUIC flow control
//! slows the devices. Nothing is buffered beyond the budget and nothing is dropped.
//!
//! No deadlock, by configuration ([`min_budget`], checked at start): the only sessions that wait
//! while holding memory are those waiting to grow a first step into a whole chunk. They hold at
//! most `max_sessions × FIRST_STEP`, so at least one largest chunk's worth is always free for the
//! first of them in the (fair, first-come) queue. Every other reservation is a chunk being filled
//! by a reading session or one on its way to the uploader, and both finish (the idle timeout and
//! the chunk fill timeout flush a silent or trickling device's chunk).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub use spillway_core::reserve::{FIRST_STEP, min_budget, next_reservation};

/// The shared budget.
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
    metrics: Metrics,
}

/// Bytes reserved from the budget; returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.permit.num_permits()
    }

    /// Adds `more` to this reservation (a chunk's second step joining its first).
    pub fn merge(&mut self, mut more: Reservation) {
        // Every permit moves; `more` drops holding none and so returns nothing.
        if let Some(moved) = more.permit.split(more.bytes()) {
            self.permit.merge(moved);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics
            .buffered_bytes
            .dec_by(i64::try_from(self.permit.num_permits()).unwrap_or(i64::MAX));
    }
}

impl Budget {
    pub fn new(total: usize, metrics: Metrics) -> Self {
        metrics
            .budget_bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        Self {
            sem: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            metrics,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Reserves `bytes`, waiting while the budget is spent. `None` if `cancel` fired first (or
    /// `bytes` can never fit, which configuration validation rules out).
    pub async fn reserve(&self, bytes: usize, cancel: &CancellationToken) -> Option<Reservation> {
        let n = u32::try_from(bytes).ok()?;
        let permit = match Arc::clone(&self.sem).try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.metrics.budget_waits.inc();
                tracing::debug!(
                    bytes,
                    "memory budget spent: session stops reading until chunks are committed"
                );
                tokio::select! {
                    p = Arc::clone(&self.sem).acquire_many_owned(n) => p.ok()?,
                    () = cancel.cancelled() => return None,
                }
            }
        };
        self.metrics
            .buffered_bytes
            .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        Some(Reservation {
            permit,
            metrics: self.metrics.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_merged_step_is_returned_whole() {
        let metrics = Metrics::default();
        let budget = Budget::new(100, metrics.clone());
        let never = CancellationToken::new();
        let mut first = budget.reserve(10, &never).await.expect("fits");
        first.merge(budget.reserve(60, &never).await.expect("fits"));
        assert_eq!(first.bytes(), 70);
        assert_eq!(metrics.buffered_bytes.get(), 70);
        drop(first);
        assert_eq!(metrics.buffered_bytes.get(), 0);
        let _all = budget
            .reserve(100, &never)
            .await
            .expect("all of it is free again");
    }

    #[tokio::test]
    async fn waits_when_spent_and_resumes_when_a_reservation_is_returned() {
        let metrics = Metrics::default();
        let budget = Budget::new(100, metrics.clone());
        let never = CancellationToken::new();
        let a = budget.reserve(60, &never).await.expect("fits");
        assert_eq!(metrics.buffered_bytes.get(), 60);
        let waiting = {
            let (budget, never) = (budget.clone(), never.clone());
            tokio::spawn(async move { budget.reserve(60, &never).await.is_some() })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the budget is spent: it must wait");
        assert_eq!(metrics.budget_waits.get(), 1);
        drop(a);
        assert!(
            waiting.await.expect("task"),
            "returned bytes let it through"
        );
        assert_eq!(
            metrics.buffered_bytes.get(),
            0,
            "every reservation was returned"
        );
        let _held = budget.reserve(1, &never).await.expect("fits");
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(
            budget.reserve(100, &cancel).await.is_none(),
            "a cancelled wait gives up"
        );
    }
}
