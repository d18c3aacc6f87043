//! The disk spool: every chunk is committed here, and made durable, before the uploader
//! acknowledges it; the drain deletes it only after the object store confirmed the upload.
//!
//! # On-disk model
//!
//! Under `--spool-dir`:
//! - `FORMAT`: the spool's format version (`format.rs`): read before anything is written, so a
//!   spool of a newer format is refused and left as it is; written once the spool opened.
//! - `lock`: an exclusive file lock, held by the one process that owns the spool
//!   ([`SpoolError::InUse`] for a second one).
//! - `records/<position>.rec` (the position in 20 digits): one file per chunk, the record.
//!   Positions are monotonic, so position order is age order. Each file stands alone: damage
//!   to one costs that chunk and no other.
//! - `records/tmp-<pid>-<n>`: a record being written. None survives an open.
//! - `index/`: a sled database of small entries only, never audio (below).
//! - `quarantine/<position>.rec`: record files that failed their checks, kept for an operator.
//! - `index.damaged-<unix seconds>/`: an index sled could not open, set aside by the uploader
//!   at start (`lib.rs`); the record files are adopted into a new one.
//!
//! **A record file** is the protobuf [`Record`]: uid (1), session (2), seq (3), sample rate
//! (4), chunk samples (5), first sample (6), CRC32C of the PCM (7), PCM (8), and for an Omi
//! chunk its layout (9) and first-sample Unix time (10), absent from WAV records (so a record
//! spooled before the Omi front end is a WAV record). The PCM comes last in the file, so a
//! file is the other fields and the PCM's tag and length, then the PCM itself,
//! written from the request's buffer; the file's length is the record's size, the unit of the
//! byte bound. The CRC32C covers the PCM only: a record read back must also be
//! [`Record::sound`] (the rules `PutChunk` enforced) and match its metadata entry, or it is
//! quarantined.
//!
//! **The sled trees** (integers big-endian):
//! - `chunks`: position (8 bytes) → record size (8 bytes), then the record without its PCM
//!   (the metadata). Iterating it yields chunks oldest first: the drain's queue, and what
//!   [`Spool::open`] sums to size the backlog (start-up never reads audio).
//! - `index`: chunk id `uid/session/<seq, 20 digits>/<first sample, 20 digits>` → position
//!   (8), CRC32C (4), record size (8). One entry per id: a repeated put stores nothing new,
//!   and a longer piece supersedes a shorter one.
//! - `quarantine`: position → the `chunks` value of a record found damaged or missing.
//!
//! # Committing a put, and what a crash leaves after each step
//!
//! [`Spool::commit`] runs on a blocking thread (`commit.rs`):
//! 1. **Duplicate check.** The index names the id with this CRC32C: [`Committed::Duplicate`],
//!    answered after a sled flush (the original's entries may still be in memory only). A
//!    crash: nothing written, nothing answered.
//! 2. **Precheck**, before anything is written: the disk keeps its reserves (statvfs,
//!    [`crate::disk`]), else [`SpoolError::DiskFull`]; with [`WhenFull::Reject`], a put of an
//!    id not spooled yet must fit the byte and record bounds ([`SpoolError::Full`],
//!    [`SpoolError::TooManyChunks`]). A refused put has written nothing.
//! 3. **The temporary file**: `tmp-<pid>-<n>` created, written (head and PCM in one vectored
//!    write, short writes continued), `fdatasync`ed, outside any lock so concurrent puts write
//!    in parallel. A failed write deletes it (out of space: [`SpoolError::DiskFull`]). A crash:
//!    a temporary file, deleted at the next open; nothing answered. A put received as a stream
//!    ([`Spool::incoming`], `stream.rs`) writes the same bytes in pieces as its frames arrive,
//!    and is synced only once the caller confirmed the whole PCM and its CRC32C; a put given up
//!    deletes it.
//! 4. **Group commit.** The put joins a queue; whoever takes the writer lock commits the whole
//!    queue as one batch, never two puts of one id (the later waits for the next batch).
//! 5. **Link**, per put, under the writer lock: compared with what its id names (the same or a
//!    longer piece: `Duplicate`; other audio: [`SpoolError::Conflict`]; a shorter piece: this
//!    put supersedes it); checked against the bounds again (with [`WhenFull::DropOldest`], the
//!    oldest chunks are evicted until it fits, each logged and reported to `on_drop`); given a
//!    position (sled's id generator, never below the floor found at open); **hard-linked** from
//!    the temporary name to `<position>.rec`, which cannot replace an existing file (a clash
//!    fails loudly), then the temporary name deleted; and its bytes reserved. A crash: a record
//!    file the index does not name (an orphan), perhaps its temporary name too; the open
//!    deletes the temporary, [`Spool::reconcile`] adopts the orphan (a put never answered but
//!    kept: its retry is a `Duplicate`). Evictions are not flushed yet: one a crash undoes
//!    brings its chunk back if its file is still there, else `reconcile` counts it lost.
//! 6. **One fsync of `records/`** makes every link of the batch durable. If it fails, each
//!    linked put is answered [`SpoolError::Io`] and its reservation returned; its file stays,
//!    an orphan for `reconcile`. A crash: as after 5.
//! 7. **Install**, in position order: one sled transaction per put inserts its `chunks` and
//!    `index` entries and removes the superseded piece's `chunks` entry; only then is the
//!    superseded piece's file deleted (and, after the batch, `records/` synced again; if that
//!    deletion fails, the put is answered an error although it is installed). A crash:
//!    sled may hold the entries or not (nothing is flushed yet); if not, the file is an orphan
//!    as after 5. A superseded piece whose file survives is compared by `reconcile` with the
//!    indexed one and discarded.
//! 8. **One sled flush** for the batch, after the writer lock is released (the next batch
//!    links meanwhile); then every put of the batch is answered. A failed flush turns the
//!    batch's successes into errors. A crash before the answer: not acknowledged, maybe
//!    durable (the retry is a `Duplicate`). After the answer the record file, its directory
//!    entry and its index entries are all on disk.
//!
//! [`Spool::remove`] takes a record out after its upload: the index entry (compare-and-swap),
//! the `chunks` entry, then the file; neither flushed nor synced (sled flushes every 500 ms).
//! A crash in that window can bring back an index entry whose file is gone (`reconcile`
//! reports it lost although the store has it: an over-count), or an orphan file that is
//! adopted and uploaded again (the store finds it identical).
//!
//! # Invariants
//!
//! - **Acknowledged ⇒ durable**: [`Spool::commit`] returns `Ok` only after steps 6 and 8 (for
//!   a duplicate, after a flush that covers the original's entries).
//! - **Bounded, checked before any write**: the sum of record sizes never exceeds
//!   `max_bytes`, nor the records `max_chunks`. With `Reject` a put that cannot fit is refused
//!   before its temporary file exists; every put is checked again and reserved under the writer
//!   lock when linked (a concurrent put may have taken the room: its temporary file is then
//!   deleted). The disk's reserves are checked before every write. One exception: `reconcile`
//!   adopts every valid orphan even past the bounds (acknowledged audio is never dropped to
//!   keep them); puts are then refused, or evict, until the spool is back under.
//! - **A chunk leaves only by** [`Spool::remove`] (after upload), quarantine (its file is gone
//!   or fails its checks: logged and counted) or a `DropOldest` eviction (logged and reported
//!   to `on_drop`): `removal.rs`. An eviction whose file deletion fails has already taken the
//!   entries out, unreported: the put fails, and the next start adopts the file back.
//! - **Positions are never reused**: the id generator is floored at open above every position
//!   a record file or the `chunks` tree uses, and a link never replaces a file.
//! - **One entry per id**: `index` maps an id to one position; a superseding piece replaces its
//!   predecessor's entries in the transaction that installs it; an orphan of an indexed id is
//!   adopted only if it extends the indexed piece, else deleted.
//!
//! # Concurrency
//!
//! - The writer lock serializes linking and installing (steps 5 to 7), evictions, quarantines,
//!   and `reconcile`'s repairs and adoptions, so the bound is reserved atomically and positions
//!   become visible in the order they were generated (the drain's forward-only cursor never
//!   passes a position whose record appears later). [`Spool::remove`] does not take it: its
//!   compare-and-swap leaves alone an index entry a concurrent put re-pointed. Lock order: the
//!   writer lock, then the commit queue's; the queue's is never held while waiting for the
//!   writer lock.
//! - No sled iterator is alive while other sled calls run: an iterator holds a read guard that
//!   a transaction (a commit's, concurrently) waits for. Entries are collected first.
//! - sled transactions only in a commit's install: removals are a compare-and-swap on the
//!   index entry, then the `chunks` entry (transactions there, racing flushes, deadlocked sled
//!   0.34 under `cargo xtask chaos`); `reconcile` repairs whatever a crash between them leaves.
//! - Everything here blocks (files, fsync, sled). `commit` moves its work to a blocking thread
//!   itself; `remove` does its index removals and unlink inline (short, no fsync); callers run
//!   `open`, `next_from`, `queued_from`, `load` and `reconcile` off the async threads.
//!
//! # The filesystem seam
//!
//! Every operation on record files and their directories (create, vectored write and
//! `fdatasync` of a temporary, hard link, rename, remove, read, directory listing and fsync,
//! modification time, the statvfs room) goes through the `Filesystem` trait (`fs.rs`), held by
//! the spool as `Arc<dyn Filesystem>`: the real one for [`Spool::open`], a fault-injecting one
//! in the tests (`tests/fault_fs.rs`: short writes, EIO, ENOSPC, a crash after the n-th
//! operation, a nearly full disk). Outside it: the owner lock and creating the directories at
//! open, and sled, which does its own I/O on `index/` (a flusher thread every 500 ms, and a
//! flush when the spool is dropped, so a dropped spool is a clean close of the index).
//!
//! # Files
//!
//! - `mod.rs`: this design, [`Spool`] and its accessors.
//! - `common.rs`: the public leaf types ([`Limits`], [`WhenFull`], [`SpoolError`], ...).
//! - `fs.rs`: the filesystem seam and the real filesystem.
//! - `format.rs`: the format version and its check.
//! - `record.rs`: [`Record`], [`Spooled`], writing and reading record files.
//! - `index.rs`: the sled trees' encodings, opening sled, installing a commit's entries.
//! - `open.rs`: [`Spool::open`]. `commit.rs`: steps 1 to 8. `read.rs`: the drain's reads.
//! - `removal.rs`: the three exits. `reconcile.rs`: the index made to agree with the files.
//! - `tests/`: examples (`basic`, `bounds`, `damage`), the fault-injecting filesystem
//!   (`fault_fs`) and its tests (`faults`: every fault, and a crash at every operation), and
//!   the model-based test (`model/`: random steps against a model, checked after each).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

mod commit;
mod common;
mod format;
mod fs;
mod index;
mod open;
mod read;
mod reconcile;
mod record;
mod removal;
mod stream;
#[cfg(test)]
mod tests;

use commit::Pending;
pub use common::{
    Committed, Dropped, Limits, OnDrop, Reconciled, SpoolError, WhenFull, default_max_chunks,
};
pub use format::{FORMAT, OLDEST_PIN, writable};
use fs::Filesystem;
use index::position_of;
pub use read::{Loaded, Queued};
pub use record::{Record, Spooled};
pub use stream::{BATCH_BYTES, HELD_BYTES, Incoming, QUEUED_BATCHES, held_bytes};

/// The spool (the design is in the module doc). Index operations are synchronous; file writes
/// and the flush run off the async threads.
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
    writer: parking_lot::Mutex<()>,
    /// Commits waiting for a leader to write them (group commit, see [`Spool::commit`]).
    queue: parking_lot::Mutex<Vec<Pending>>,
    committed: Notify,
    tmp_seq: AtomicU64,
    /// No position below this is handed out (changed only under the writer lock).
    next_pos: AtomicU64,
    /// Every operation on record files and their directories (sled's files excepted).
    fs: Arc<dyn Filesystem>,
    /// The spool's format (its `FORMAT` file) since it was opened.
    format: u32,
    /// The exclusive lock on `dir/lock`, held for the spool's life (declared last: released
    /// after sled has closed).
    _owner: std::fs::File,
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

    /// The spool's format since it was opened (what its `FORMAT` file says).
    pub fn format(&self) -> u32 {
        self.format
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
    fn lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writer.lock()
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
