//! Ingest's global memory budget (`--max-buffered-bytes`) for audio not yet acknowledged by the
//! uploader.
//!
//! A session reserves one whole chunk (`chunk_seconds × sample_rate × 2` bytes, which is exactly
//! what the chunker allocates) before it feeds audio into a new chunk; the reservation travels
//! with the chunk to the forwarder and is released only when the uploader has committed it (or
//! the session gave up on it). When the budget is spent, sessions wait for a reservation and so
//! stop reading their streams: QUIC flow control slows the devices. Nothing is buffered beyond the
//! budget and nothing is dropped.
//!
//! No deadlock: a reservation is only ever waited for by a session that holds none, and every
//! reservation held is either a chunk being filled by a device or a chunk on its way to the
//! uploader, both of which finish (the idle timeout flushes a silent device's chunk).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

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
