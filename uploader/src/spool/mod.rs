//! The disk spool: every chunk is committed here, and made durable, before the uploader
//! acknowledges it; the drain deletes it only after the object store confirmed the upload.
//!
//! Layout under `--spool-dir`:
//! - `records/<position>.rec`: one file per chunk, the protobuf [`Record`] (id, audio
//!   parameters, CRC32C, PCM). Positions are monotonic (sled's id generator), so position order
//!   is age order. Each file stands alone: damage to one costs that chunk and no other.
//! - `index/`: a sled database of small entries only, never audio:
//!   - tree `chunks`: position → record size and the record's metadata (no PCM); iterating it
//!     yields chunks oldest first.
//!   - tree `index`: `uid/session/seq/first_sample` → position, CRC32C, record size. It makes a
//!     repeated put of the same id store nothing new, lets a longer piece supersede a shorter
//!     one, and is what [`Spool::open`] reads to size the backlog: start-up never reads audio.
//!   - tree `quarantine`: metadata of records found damaged or missing.
//! - `quarantine/`: record files that failed their checks, kept for an operator.
//!
//! A commit writes the record to a temporary file and syncs it, then (under the writer lock)
//! renames it to its position, syncs the directory and inserts the index entries, then flushes
//! sled. A crash at any point leaves either nothing acknowledged or a record file the index may
//! not name yet (an orphan); [`Spool::reconcile`] adopts valid orphans, so damage to sled's own
//! files (which makes sled recover only a prefix of its log) loses no audio either.
//!
//! Invariants:
//! - **Acknowledged ⇒ durable**: [`Spool::commit`] returns only after the record file, its
//!   directory entry and the index entries are all on disk.
//! - **Bounded**: the sum of record sizes never exceeds `max_bytes`, nor the records
//!   `max_chunks`. A put that would exceed either is refused with [`SpoolError::Full`] or
//!   [`SpoolError::TooManyChunks`] before anything is written ([`WhenFull::Reject`]; checked
//!   again when it is linked in, in case a concurrent put took the room), or
//!   the oldest records are evicted first to make room ([`WhenFull::DropOldest`]); every
//!   eviction is logged with its chunk id and reported to the `on_drop` hook.
//! - A record leaves the spool only through [`Spool::remove`] (after upload), quarantine (it
//!   failed its checksum, or its file is gone: both logged and counted), or a `DropOldest`
//!   eviction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

mod commit;
mod common;
mod fs;
mod index;
mod open;
mod read;
mod reconcile;
mod record;
mod removal;
#[cfg(test)]
mod tests;

use commit::Pending;
pub use common::{
    Committed, Dropped, Limits, OnDrop, Reconciled, SpoolError, WhenFull, default_max_chunks,
};
use fs::Filesystem;
use index::position_of;
pub use read::{Loaded, Queued};
pub use record::{Record, Spooled};

/// The spool. Index operations are synchronous; file writes and the flush run off the
/// async threads.
#[derive(Debug)]
pub struct Spool {
    db: sled::Db,
    chunks: sled::Tree,
    index: sled::Tree,
    quarantine: sled::Tree,
    records: PathBuf,
    quarantine_dir: PathBuf,
    limits: Limits,
    used: AtomicU64,
    count: AtomicU64,
    writer: std::sync::Mutex<()>,
    /// Commits waiting for a leader to write them (group commit, see [`Spool::commit`]).
    queue: std::sync::Mutex<Vec<Pending>>,
    committed: Notify,
    tmp_seq: AtomicU64,
    /// No position below this is handed out (changed only under the writer lock).
    next_pos: AtomicU64,
    /// Every operation on record files and their directories (sled's files excepted).
    fs: Arc<dyn Filesystem>,
    /// The exclusive lock on `dir/lock`, held for the spool's life (declared last: released
    /// after sled has closed).
    _owner: std::fs::File,
}

/// Locks `m` even if a thread panicked while holding it: every state the spool and the drain
/// guard with a mutex stays consistent across a panic (counters and maps updated in one step).
pub(crate) fn lock_ignoring_poison<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Subtracts without wrapping: a counter that would go below zero stops at zero.
fn sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

impl Spool {
    /// The directory of the record files (on the spool's filesystem).
    pub fn dir(&self) -> &Path {
        &self.records
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_bytes(&self) -> u64 {
        self.limits.max_bytes
    }

    /// How long the oldest spooled chunk has waited for the store: since its record file was
    /// written (so the age survives restarts). `None` when the spool is empty.
    pub fn oldest_age(&self, now: std::time::SystemTime) -> Result<Option<Duration>, SpoolError> {
        let Some(pos) = self.chunks.first()?.and_then(|(k, _)| position_of(&k)) else {
            return Ok(None);
        };
        match self.fs.modified(&self.record_path(pos)) {
            Ok(written) => Ok(Some(now.duration_since(written).unwrap_or_default())),
            // Uploaded (or quarantined) meanwhile: the next reading sees the next oldest.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The record file at `pos`: `records/<pos, 20 digits>.rec`.
    fn record_path(&self, pos: u64) -> PathBuf {
        self.records.join(format!("{pos:020}.rec"))
    }

    /// Where the record file at `pos` goes when it fails its checks.
    fn quarantine_path(&self, pos: u64) -> PathBuf {
        self.quarantine_dir.join(format!("{pos:020}.rec"))
    }

    /// The writer lock: linking and installing a batch, evictions, quarantines and
    /// `reconcile`'s repairs take it, one at a time.
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        lock_ignoring_poison(&self.writer)
    }

    /// Completes after the next commit that stored something new (or at once if one happened
    /// since the last wait).
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Fraction of the bound in use, 0.0 to 1.0.
    pub fn fill_ratio(&self) -> f64 {
        self.used_bytes() as f64 / self.limits.max_bytes.max(1) as f64
    }

    /// Flushes everything (deletions included); used at shutdown.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush_async().await?;
        Ok(())
    }
}
