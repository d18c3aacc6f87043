//! Uploader's Prometheus metrics, registered into a registry passed in (no global state).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub puts: Family<ResultLabel, Counter>,
    pub put_rejections: Family<ReasonLabel, Counter>,
    pub spool_bytes: Gauge,
    pub spool_chunks: Gauge,
    pub spool_max_bytes: Gauge,
    pub spool_quarantined: Counter,
    pub spool_dropped_chunks: Counter,
    pub spool_lost_chunks: Counter,
    pub spool_adopted_chunks: Counter,
    pub spool_set_aside: Counter,
    pub spool_dropped_bytes: Counter,
    pub spool_fill_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub spool_oldest_chunk_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub spool_disk_free_bytes: Gauge,
    pub spool_disk_free_inodes: Gauge,
    pub upload_retries: Counter,
    pub upload_max_attempts: Gauge,
    pub uploads: Family<ResultLabel, Counter>,
    pub upload_bytes: Counter,
    pub upload_conflicts: Counter,
    pub upload_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub uploads_in_flight: Gauge,
    pub upload_concurrency_limit: Gauge,
    pub breaker_state: Gauge,
    pub spool_format: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            puts: Family::default(),
            put_rejections: Family::default(),
            spool_bytes: Gauge::default(),
            spool_chunks: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_quarantined: Counter::default(),
            spool_dropped_chunks: Counter::default(),
            spool_lost_chunks: Counter::default(),
            spool_adopted_chunks: Counter::default(),
            spool_set_aside: Counter::default(),
            spool_dropped_bytes: Counter::default(),
            spool_fill_ratio: Gauge::default(),
            spool_oldest_chunk_age: Gauge::default(),
            spool_disk_free_bytes: Gauge::default(),
            spool_disk_free_inodes: Gauge::default(),
            upload_retries: Counter::default(),
            upload_max_attempts: Gauge::default(),
            uploads: Family::default(),
            upload_bytes: Counter::default(),
            upload_conflicts: Counter::default(),
            upload_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            // 1 ms to 8 s: a sync on a fast disk up to one queued behind a slow volume's limit.
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            uploads_in_flight: Gauge::default(),
            upload_concurrency_limit: Gauge::default(),
            breaker_state: Gauge::default(),
            spool_format: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("spillway_uploader");
        r.register(
            "puts",
            "PutChunk calls committed (stored, or duplicate of a spooled chunk)",
            m.puts.clone(),
        );
        r.register(
            "put_rejections",
            "PutChunk calls refused, by reason",
            m.put_rejections.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes held in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_chunks",
            "Chunks held in the spool",
            m.spool_chunks.clone(),
        );
        r.register(
            "spool_max_bytes",
            "Configured spool bound",
            m.spool_max_bytes.clone(),
        );
        r.register(
            "spool_quarantined",
            "Spooled records quarantined as damaged",
            m.spool_quarantined.clone(),
        );
        r.register(
            "spool_dropped_chunks",
            "Acknowledged chunks evicted from a full spool (--when-full drop-oldest); one already being uploaded may still arrive",
            m.spool_dropped_chunks.clone(),
        );
        r.register(
            "spool_lost_chunks",
            "Spooled chunks whose record file was gone at start-up (damage outside Spillway)",
            m.spool_lost_chunks.clone(),
        );
        r.register(
            "spool_adopted_chunks",
            "Record files the index had lost (a crash, or damage to its files) taken back at start-up",
            m.spool_adopted_chunks.clone(),
        );
        r.register(
            "spool_set_aside",
            "Spools that could not be opened at all and were moved aside",
            m.spool_set_aside.clone(),
        );
        r.register(
            "spool_dropped_bytes",
            "Bytes of the chunks evicted from a full spool",
            m.spool_dropped_bytes.clone(),
        );
        r.register(
            "spool_fill_ratio",
            "Spool bytes as a fraction of --spool-max-bytes",
            m.spool_fill_ratio.clone(),
        );
        r.register(
            "spool_oldest_chunk_age_seconds",
            "Seconds the oldest spooled chunk has waited for the store (0 when the spool is empty)",
            m.spool_oldest_chunk_age.clone(),
        );
        r.register(
            "upload_retries",
            "Failed PutObject attempts that will be retried (always: nothing is dropped for failing)",
            m.upload_retries.clone(),
        );
        r.register(
            "upload_max_attempts",
            "Most attempts any chunk now uploading has taken so far (1 when the store is healthy)",
            m.upload_max_attempts.clone(),
        );
        r.register(
            "uploads",
            "PutObject attempts, by result",
            m.uploads.clone(),
        );
        r.register(
            "upload_bytes",
            "Object bytes uploaded",
            m.upload_bytes.clone(),
        );
        r.register(
            "spool_disk_free_bytes",
            "Bytes free on the spool's filesystem (statvfs); below 64 MiB plus a chunk, puts are refused and /readyz answers 503",
            m.spool_disk_free_bytes.clone(),
        );
        r.register(
            "spool_disk_free_inodes",
            "Inodes free on the spool's filesystem (-1 where it does not count them); at 1024 or fewer, puts are refused and /readyz answers 503",
            m.spool_disk_free_inodes.clone(),
        );
        r.register(
            "upload_conflicts",
            "Chunks whose key already held different audio: the original kept, the new bytes stored beside it at {key}.conflict-{crc32c}",
            m.upload_conflicts.clone(),
        );
        r.register(
            "upload_seconds",
            "PutObject latency",
            m.upload_seconds.clone(),
        );
        r.register(
            "commit_seconds",
            "Time a PutChunk takes to be durable in the spool (record file, directory entry, index), the disk's share of an ack's latency",
            m.commit_seconds.clone(),
        );
        r.register(
            "uploads_in_flight",
            "Uploads under way",
            m.uploads_in_flight.clone(),
        );
        r.register(
            "upload_concurrency_limit",
            "Uploads allowed at once: --workers N, or the limit --workers auto has reached",
            m.upload_concurrency_limit.clone(),
        );
        r.register(
            "breaker_state",
            "Object-store circuit breaker: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        r.register(
            "spool_format",
            "The spool's format (its FORMAT file) since this uploader opened it: during a rolling upgrade, which spools the release before can no longer open (above its own format)",
            m.spool_format.clone(),
        );
        m
    }

    pub fn rejected(&self, reason: &'static str) {
        self.put_rejections
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn spool(&self, spool: &crate::spool::Spool) {
        self.spool_bytes
            .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
        self.spool_chunks
            .set(i64::try_from(spool.len()).unwrap_or(i64::MAX));
        self.spool_fill_ratio.set(spool.fill_ratio());
    }

    /// The oldest spooled chunk's age: a `stat` and an index read, so refreshed on a timer
    /// (every 200 ms, with readiness), not on every commit and upload as [`Metrics::spool`] is.
    pub fn spool_age(&self, spool: &crate::spool::Spool) {
        match spool.oldest_age(std::time::SystemTime::now()) {
            Ok(age) => {
                self.spool_oldest_chunk_age
                    .set(age.unwrap_or_default().as_secs_f64());
            }
            Err(e) => tracing::warn!(error = %e, "reading the oldest spooled chunk's age failed"),
        }
    }
}
