//! Drains the spool to the object store, oldest first, through a pool of `workers` uploads.
//!
//! A dispatcher walks the spool forward from a cursor (positions only grow, so new chunks are
//! always ahead of it) and hands each record to an upload task once a worker slot is free; at
//! most `workers` records are in memory. An upload retries its chunk until the store confirms
//! it (jittered exponential backoff, behind one circuit breaker for the store) and only then
//! deletes it from the spool. Nothing is ever dropped for failing: acknowledged audio leaves the
//! spool only by reaching the store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use spillway_breaker::{Breaker, Decision};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, ResultLabel};
use crate::object::KeyTemplate;
use crate::spool::{Record, Spool};
use crate::store::Store;

/// Everything an upload needs.
pub struct Drain {
    pub spool: Arc<Spool>,
    pub store: Store,
    pub workers: usize,
    pub template: KeyTemplate,
    pub prefix: String,
    pub breaker: Arc<Mutex<Breaker>>,
    pub metrics: Metrics,
}

impl Drain {
    /// Runs until `stop` fires, then waits for uploads in flight (bounded by `grace`).
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.workers));
        let uploads = TaskTracker::new();
        let abort = CancellationToken::new();
        let mut cursor = 0u64;
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                () = stop.cancelled() => break,
            };
            let next = match this.spool.next_from(cursor) {
                Ok((next, quarantined)) => {
                    this.metrics.spool_quarantined.inc_by(quarantined);
                    next
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the spool failed; retrying");
                    None
                }
            };
            this.metrics.spool(&this.spool);
            let Some((pos, record)) = next else {
                drop(permit);
                tokio::select! {
                    () = this.spool.committed() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            };
            cursor = pos + 1;
            let (this, abort) = (Arc::clone(&this), abort.clone());
            uploads.spawn(async move {
                this.upload(pos, record, &abort).await;
                drop(permit);
            });
        }
        uploads.close();
        if tokio::time::timeout(grace, uploads.wait()).await.is_err() {
            tracing::warn!("uploads still in flight at shutdown; their chunks stay spooled");
            abort.cancel();
            uploads.wait().await;
        }
        if let Err(e) = this.spool.flush().await {
            tracing::error!(error = %e, "flushing the spool at shutdown failed");
        }
    }

    async fn upload(&self, pos: u64, record: Record, abort: &CancellationToken) {
        let key = self
            .template
            .render(&self.prefix, &record.uid, &record.session, record.seq);
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            // Wait for the breaker to admit a call.
            loop {
                let decision = self.breaker_lock().check(Instant::now());
                self.publish_breaker();
                match decision {
                    Decision::Allow => break,
                    Decision::Reject { retry_at } => tokio::select! {
                        () = tokio::time::sleep_until(retry_at.into()) => {}
                        () = abort.cancelled() => return,
                    },
                }
            }
            self.metrics.uploads_in_flight.inc();
            let started = Instant::now();
            let result = tokio::select! {
                r = self.store.put(&key, &record) => Some(r),
                () = abort.cancelled() => None,
            };
            self.metrics.uploads_in_flight.dec();
            let Some(result) = result else { return };
            match result {
                Ok(()) => {
                    self.breaker_lock().on_success(Instant::now());
                    self.publish_breaker();
                    self.metrics
                        .upload_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .uploads
                        .get_or_create(&ResultLabel { result: "ok" })
                        .inc();
                    self.metrics
                        .upload_bytes
                        .inc_by(record.pcm.len() as u64 + 44);
                    if let Err(e) = self.spool.remove(pos, &record) {
                        // The object is stored; a leftover record is only uploaded again.
                        tracing::error!(%key, error = %e, "deleting an uploaded chunk from the spool failed");
                    }
                    self.metrics.spool(&self.spool);
                    tracing::debug!(%key, "uploaded");
                    return;
                }
                Err(e) => {
                    self.breaker_lock().on_failure(Instant::now());
                    self.publish_breaker();
                    self.metrics
                        .uploads
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(%key, error = %e, retry_in = ?delay, "upload failed; chunk stays spooled");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = abort.cancelled() => return,
                    }
                }
            }
        }
    }

    fn breaker_lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish_breaker(&self) {
        let state = self.breaker_lock().state();
        self.metrics.breaker_state.set(state.as_gauge());
    }
}
