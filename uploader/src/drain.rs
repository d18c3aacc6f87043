//! Drains the spool to the object store, oldest first, through a pool of `workers` uploads.
//!
//! A dispatcher walks the spool forward from a cursor (positions only grow, so new chunks are
//! always ahead of it) and hands each record to an upload task once a worker slot is free; at
//! most `workers` records are in memory. An upload retries its chunk until the store confirms
//! it (jittered exponential backoff, behind one circuit breaker for the store) and only then
//! deletes it from the spool. Nothing is ever dropped for failing: acknowledged audio leaves the
//! spool only by reaching the store.
//!
//! On shutdown the dispatcher keeps going until the spool is empty or the drain timeout has
//! passed, whichever is first; uploads still in flight then are abandoned, and their chunks
//! stay spooled for the next start.

use std::collections::HashMap;
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
use crate::store::{Put, Store};

/// Everything an upload needs.
pub struct Drain {
    pub spool: Arc<Spool>,
    pub store: Store,
    pub workers: usize,
    pub template: KeyTemplate,
    pub prefix: String,
    pub breaker: Arc<Mutex<Breaker>>,
    pub metrics: Metrics,
    /// Attempts so far of each upload under way, by spool position (for the max-attempts gauge).
    pub attempts: Mutex<HashMap<u64, u64>>,
    /// One lock per object key being uploaded: two records for one key (a piece and the longer
    /// piece that superseded it) never race, so the older can never overwrite the newer.
    pub keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Fired when the store answers again after failing: every upload waiting out its backoff
    /// retries at once, so the backlog drains at full speed the moment the store is back.
    pub recovered: tokio::sync::Notify,
}

impl Drain {
    /// Runs until `stop` fires, then keeps draining until the spool is empty or `drain_timeout`
    /// has passed.
    pub async fn run(self, stop: CancellationToken, drain_timeout: Duration) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.workers));
        let uploads = TaskTracker::new();
        let abort = CancellationToken::new();
        {
            // Once stopping, the deadline for everything, in-flight uploads included.
            let (stop, abort) = (stop.clone(), abort.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                tokio::time::sleep(drain_timeout).await;
                abort.cancel();
            });
        }
        let mut cursor = 0u64;
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                () = abort.cancelled() => break,
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
                if stop.is_cancelled() {
                    // Nothing new can arrive (the service stopped first): wait for the uploads
                    // in flight, then look again; a failed upload keeps its record spooled.
                    if uploads.is_empty() && this.spool.is_empty() {
                        tracing::info!("spool drained");
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = abort.cancelled() => break,
                    }
                    if uploads.is_empty() {
                        // Every upload finished: anything left is behind the cursor (an
                        // upload that gave up at shutdown never happens here) or new; rescan.
                        cursor = 0;
                    }
                    continue;
                }
                tokio::select! {
                    () = this.spool.committed() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => {}
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
        if !uploads.is_empty() {
            tracing::warn!(
                in_flight = uploads.len(),
                spooled = this.spool.len(),
                "drain timeout: abandoning uploads in flight; their chunks stay spooled"
            );
        }
        uploads.wait().await;
        if let Err(e) = this.spool.flush().await {
            tracing::error!(error = %e, "flushing the spool at shutdown failed");
        }
    }

    async fn upload(&self, pos: u64, record: Record, abort: &CancellationToken) {
        let key = self.template.key_of(&self.prefix, &record);
        let key_lock = self.key_lock(&key);
        let guard = key_lock.lock().await;
        self.upload_locked(pos, &record, &key, abort).await;
        drop(guard);
        drop(key_lock);
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.get(&key).is_some_and(|l| Arc::strong_count(l) == 1) {
            keys.remove(&key);
        }
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(keys.entry(key.to_owned()).or_default())
    }

    async fn upload_locked(&self, pos: u64, record: &Record, key: &str, abort: &CancellationToken) {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u64;
        loop {
            if !self.spool.is_current(pos, record).unwrap_or(true) {
                // A longer piece of the same chunk replaced this record; it uploads instead.
                tracing::debug!(%key, pos, "superseded before upload; skipped");
                let _ = self.spool.remove(pos, record).await;
                self.note_attempt(pos, None);
                return;
            }
            // Wait for the breaker to admit a call.
            loop {
                let decision = self.breaker_lock().check(Instant::now());
                self.publish_breaker();
                match decision {
                    Decision::Allow => break,
                    Decision::Reject { retry_at } => tokio::select! {
                        () = tokio::time::sleep_until(retry_at.into()) => {}
                        () = self.recovered.notified() => {}
                        () = abort.cancelled() => return,
                    },
                }
            }
            attempt += 1;
            self.note_attempt(pos, Some(attempt));
            self.metrics.uploads_in_flight.inc();
            let started = Instant::now();
            let result = tokio::select! {
                r = self.store.put(key, record) => Some(r),
                () = abort.cancelled() => None,
            };
            self.metrics.uploads_in_flight.dec();
            let Some(result) = result else {
                self.note_attempt(pos, None);
                return;
            };
            match result {
                Ok(put) => {
                    let was_failing = {
                        let mut breaker = self.breaker_lock();
                        let was = breaker.state() != spillway_breaker::State::Closed
                            || breaker.failures() > 0;
                        breaker.on_success(Instant::now());
                        was
                    };
                    if was_failing {
                        tracing::info!(%key, "object store answering again: retrying every waiting upload now");
                        self.recovered.notify_waiters();
                    }
                    self.publish_breaker();
                    self.metrics
                        .upload_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let result = match put {
                        Put::Stored => {
                            self.metrics
                                .upload_bytes
                                .inc_by(record.pcm.len() as u64 + 44);
                            "ok"
                        }
                        Put::AlreadyLonger => {
                            tracing::info!(%key, "the store already holds a longer piece of this chunk; not overwriting it");
                            "already_longer"
                        }
                    };
                    self.metrics
                        .uploads
                        .get_or_create(&ResultLabel { result })
                        .inc();
                    if let Err(e) = self.spool.remove(pos, record).await {
                        // The object is stored; a leftover record is only uploaded again.
                        tracing::error!(%key, error = %e, "deleting an uploaded chunk from the spool failed");
                    }
                    self.metrics.spool(&self.spool);
                    self.note_attempt(pos, None);
                    tracing::debug!(%key, attempt, "uploaded");
                    return;
                }
                Err(e) => {
                    self.breaker_lock().on_failure(Instant::now());
                    self.publish_breaker();
                    self.metrics
                        .uploads
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                    self.metrics.upload_retries.inc();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(%key, attempt, error = %e, retry_in = ?delay, "upload failed; chunk stays spooled");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.recovered.notified() => {}
                        () = abort.cancelled() => {
                            self.note_attempt(pos, None);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Records the attempt number of the upload at `pos` (`None` when it ended) and publishes
    /// the largest one under way.
    fn note_attempt(&self, pos: u64, attempt: Option<u64>) {
        let mut all = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match attempt {
            Some(n) => {
                all.insert(pos, n);
            }
            None => {
                all.remove(&pos);
            }
        }
        let max = all.values().copied().max().unwrap_or(0);
        self.metrics
            .upload_max_attempts
            .set(i64::try_from(max).unwrap_or(i64::MAX));
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
