//! Drains the spool to the object store, oldest first, through a pool of `workers` uploads.
//!
//! A dispatcher walks the spool forward from a cursor (positions only grow, so new chunks are
//! always ahead of it) and hands each record to an upload task once a worker slot is free; at
//! most `workers` records are in memory. With `--workers auto` the number of slots follows an
//! [`adaptive::Controller`] fed with every `PutObject` attempt (at most `--workers-max`). An
//! upload retries its chunk until the store confirms it (jittered exponential backoff, behind
//! one circuit breaker for the store) and only then deletes it from the spool. Nothing is ever
//! dropped for failing: acknowledged audio leaves the spool only by reaching the store.
//!
//! On shutdown the dispatcher keeps going until the spool is empty or the drain timeout has
//! passed, whichever is first; uploads still in flight then are abandoned, and their chunks
//! stay spooled for the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::{Mutex, MutexGuard};
use spillway_breaker::{Breaker, Decision};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adaptive::{Outcome, Workers};
use crate::metrics::{Metrics, ResultLabel};
use crate::object::KeyTemplate;

mod pool;
use crate::spool::{Loaded, Queued, Spool};
use crate::store::{Put, Store, Upload};
use pool::{Pool, Slot};

/// Everything an upload needs.
pub struct Drain {
    pub spool: Arc<Spool>,
    pub store: Store,
    /// How many uploads at once: fixed, or adjusted between bounds.
    pub workers: Workers,
    pub template: KeyTemplate,
    pub prefix: String,
    /// Seals Omi-layout chunks (`--omi-secret-file`).
    pub sealer: Option<Arc<crate::seal::Sealer>>,
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
        let pool = Arc::new(Pool::new(this.workers, this.metrics.clone()));
        let uploads = TaskTracker::new();
        // Uploads not yet finished, and a wake-up as each finishes: a stopping drain ends the
        // moment the last one is done (a task still counts in the tracker while it returns).
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let finished = Arc::new(tokio::sync::Notify::new());
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
            let slot = tokio::select! {
                p = Arc::clone(&pool.slots).acquire_owned() => match p {
                    Ok(p) => Slot::new(p, &pool),
                    Err(_) => break,
                },
                () = abort.cancelled() => break,
            };
            // An index lookup only: the upload task reads the record file, so several reads
            // run at once and none of them blocks this loop or a runtime thread.
            let next = match this.spool.queued_from(cursor) {
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
            let Some(queued) = next else {
                drop(slot);
                if stop.is_cancelled() {
                    // Nothing new can arrive (the service stopped first): wait for the uploads
                    // in flight, then look again; a failed upload keeps its record spooled.
                    let idle = in_flight.load(std::sync::atomic::Ordering::Acquire) == 0;
                    if idle && this.spool.is_empty() {
                        tracing::info!("spool drained");
                        break;
                    }
                    tokio::select! {
                        () = finished.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = abort.cancelled() => break,
                    }
                    if in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 {
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
            cursor = queued.pos + 1;
            let (this, pool, abort) = (Arc::clone(&this), Arc::clone(&pool), abort.clone());
            let (finished, in_flight) = (Arc::clone(&finished), Arc::clone(&in_flight));
            in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            uploads.spawn(async move {
                let pos = queued.pos;
                if let Some(record) = this.load(queued, &abort).await {
                    this.upload(pos, record, &pool, &abort).await;
                }
                drop(slot);
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                finished.notify_one();
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

    /// Reads the record `queued` names, off the runtime. `None` when there is nothing to
    /// upload: it was quarantined (and counted), superseded or removed, or the drain is being
    /// abandoned. A read that fails is retried with backoff in this upload's slot, so a bad
    /// sector holds up its own chunk and no other.
    async fn load(&self, queued: Queued, abort: &CancellationToken) -> Option<Upload> {
        let pos = queued.pos;
        let mut backoff = retry_backoff();
        let mut changed = false;
        let mut next = Some(queued);
        loop {
            // The entry as the index has it now: after a change or a failure, looked up again.
            let queued = match next.take() {
                Some(q) => q,
                None => match self.spool.queued_at(pos) {
                    Ok(Some(q)) => q,
                    // Uploaded and removed, or superseded: nothing left to do here.
                    Ok(None) => return None,
                    Err(e) => {
                        read_failed(pos, &e.to_string(), &mut backoff, abort).await?;
                        continue;
                    }
                },
            };
            let spool = Arc::clone(&self.spool);
            // Read, checked and (when intact, and the body is signed) hashed for signing, all
            // on the blocking pool.
            let (sealer, signing) = (self.sealer.clone(), self.store.body_signing());
            let read = move || {
                spool
                    .load(&queued)
                    .map(|loaded| loaded.map(|s| Upload::new(s, sealer.as_ref(), signing)))
            };
            let error = match tokio::task::spawn_blocking(read).await {
                Ok(Ok(Loaded::Ready(upload))) => return Some(upload),
                Ok(Ok(Loaded::Quarantined)) => {
                    self.metrics.spool_quarantined.inc();
                    self.metrics.spool(&self.spool);
                    return None;
                }
                // Changed twice under us: left to the next pass, as `Spool::next_from` does.
                Ok(Ok(Loaded::Changed)) if changed => return None,
                Ok(Ok(Loaded::Changed)) => {
                    changed = true;
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            read_failed(pos, &error, &mut backoff, abort).await?;
        }
    }

    async fn upload(&self, pos: u64, upload: Upload, pool: &Pool, abort: &CancellationToken) {
        let key =
            self.template
                .key_for(&self.prefix, &upload.spooled.record, self.sealer.is_some());
        let key_lock = self.key_lock(&key);
        let guard = key_lock.lock().await;
        self.upload_locked(pos, &upload, &key, pool, abort).await;
        drop(guard);
        drop(key_lock);
        let mut keys = self.keys.lock();
        if keys.get(&key).is_some_and(|l| Arc::strong_count(l) == 1) {
            keys.remove(&key);
        }
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut keys = self.keys.lock();
        Arc::clone(keys.entry(key.to_owned()).or_default())
    }

    async fn upload_locked(
        &self,
        pos: u64,
        upload: &Upload,
        key: &str,
        pool: &Pool,
        abort: &CancellationToken,
    ) {
        let record = &upload.spooled.record;
        let mut backoff = retry_backoff();
        let mut attempt = 0u64;
        loop {
            if !self.spool.is_current(pos, record).unwrap_or(true) {
                // A longer piece of the same chunk replaced this record; it uploads instead.
                tracing::debug!(%key, pos, "superseded before upload; skipped");
                let _ = self.remove(pos, record).await;
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
                r = self.store.put(key, upload) => Some(r),
                () = abort.cancelled() => None,
            };
            self.metrics.uploads_in_flight.dec();
            let Some(result) = result else {
                self.note_attempt(pos, None);
                return;
            };
            // Every attempt the store answered (or failed) is a sample for `--workers auto`;
            // the waits for the breaker before it are not.
            let outcome = if result.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Failed
            };
            let ended = Instant::now();
            pool.sample(ended, ended.saturating_duration_since(started), outcome);
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
                        Put::Stored | Put::Superseded => {
                            self.metrics
                                .upload_bytes
                                .inc_by(record.pcm.len() as u64 + 44);
                            if put == Put::Superseded {
                                tracing::info!(%key, "a longer piece of this chunk replaced the shorter one stored");
                                "superseded"
                            } else {
                                "ok"
                            }
                        }
                        Put::Identical => "identical",
                        Put::AlreadyLonger => {
                            tracing::info!(%key, "the store already holds a longer piece of this chunk; not overwriting it");
                            "already_longer"
                        }
                        Put::Conflict {
                            aside,
                            stored_crc,
                            new_crc,
                        } => {
                            self.metrics.upload_conflicts.inc();
                            tracing::warn!(%key, %aside, stored_crc32c = format!("{stored_crc:08x}"),
                                new_crc32c = format!("{new_crc:08x}"),
                                "the store holds different audio at this key: kept it, and stored these bytes beside it");
                            "conflict"
                        }
                    };
                    self.metrics
                        .uploads
                        .get_or_create(&ResultLabel { result })
                        .inc();
                    if let Err(e) = self.remove(pos, record).await {
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

    /// Takes the uploaded record at `pos` out of the spool, on the blocking pool (its index
    /// entries and its file: `Spool::remove_now`), off the runtime's few threads.
    async fn remove(&self, pos: u64, record: &crate::spool::Record) -> Result<(), String> {
        let (spool, record) = (Arc::clone(&self.spool), record.clone());
        match tokio::task::spawn_blocking(move || spool.remove_now(pos, &record)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Records the attempt number of the upload at `pos` (`None` when it ended) and publishes
    /// the largest one under way.
    fn note_attempt(&self, pos: u64, attempt: Option<u64>) {
        let mut all = self.attempts.lock();
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

    fn breaker_lock(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock()
    }

    fn publish_breaker(&self) {
        let state = self.breaker_lock().state();
        self.metrics.breaker_state.set(state.as_gauge());
    }
}

/// Logs a failed read of the record at `pos` and waits out the next backoff delay; `None` when
/// the drain is abandoned meanwhile.
async fn read_failed(
    pos: u64,
    error: &str,
    backoff: &mut impl Iterator<Item = Duration>,
    abort: &CancellationToken,
) -> Option<()> {
    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
    tracing::error!(pos, error, retry_in = ?delay, "reading a spooled chunk failed; retrying");
    tokio::select! {
        () = tokio::time::sleep(delay) => Some(()),
        () = abort.cancelled() => None,
    }
}

/// Between attempts at one chunk: from 200 ms doubling to 30 s, each delay plus a random jitter of
/// up to itself (so up to 60 s), never giving up.
fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
