//! The disk spool: every chunk is committed here, and flushed, before the uploader acknowledges
//! it; the drain deletes it only after the object store confirmed the upload.
//!
//! Layout (one sled database under `--spool-dir`):
//! - tree `chunks`: key = 8-byte big-endian spool position (monotonic, from sled's id
//!   generator), value = a protobuf [`Record`] (id, audio parameters, CRC32C, PCM). Iterating it
//!   in key order yields chunks oldest first.
//! - tree `index`: key = `uid/session/seq` (20 digits), value = position, CRC32C and record
//!   size. It makes a repeated put of the same chunk id store nothing new, and it is what
//!   [`Spool::open`] reads to size the backlog: start-up never reads the audio itself, so it takes
//!   milliseconds whether the spool holds one chunk or gigabytes.
//! - tree `quarantine`: records that failed to decode or whose PCM no longer matches its CRC32C;
//!   kept for an operator, never uploaded, never retried.
//!
//! Invariants:
//! - **Acknowledged ⇒ durable**: [`Spool::commit`] returns only after `flush_async` completed for
//!   a batch containing the record, whether this put stored it or an earlier one did.
//! - **Bounded**: the sum of record sizes never exceeds `max_bytes`. A put that would exceed it
//!   is refused with [`SpoolError::Full`] before anything is written ([`WhenFull::Reject`]), or
//!   the oldest records are evicted first to make room ([`WhenFull::DropOldest`]); every
//!   eviction is logged with its chunk id and reported to the `on_drop` hook.
//! - A record leaves `chunks` only through [`Spool::remove`] (after upload), quarantine, or a
//!   `DropOldest` eviction.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::Notify;

/// One spooled chunk as stored on disk.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, tag = "2")]
    pub session: String,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(uint32, tag = "4")]
    pub sample_rate: u32,
    #[prost(uint64, tag = "5")]
    pub chunk_samples: u64,
    #[prost(uint64, tag = "6")]
    pub first_sample: u64,
    #[prost(uint32, tag = "7")]
    pub crc32c: u32,
    #[prost(bytes = "bytes", tag = "8")]
    pub pcm: Bytes,
}

impl Record {
    /// The chunk id: uid, session, seq and first sample (a piece resumed mid-chunk has its own).
    fn index_key(&self) -> Vec<u8> {
        format!(
            "{}/{}/{:020}/{:020}",
            self.uid, self.session, self.seq, self.first_sample
        )
        .into_bytes()
    }

    /// Samples between the chunk's boundary and this record's first sample: 0 unless a device
    /// resumed in the middle of the chunk.
    pub fn offset(&self) -> u64 {
        self.first_sample
            .saturating_sub(self.seq.saturating_mul(self.chunk_samples))
    }

    /// True when the PCM still matches the checksum it was committed with.
    pub fn intact(&self) -> bool {
        crc32c::crc32c(&self.pcm) == self.crc32c
    }
}

/// Outcome of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This put stored the chunk.
    Stored,
    /// The chunk id was already spooled with the same content, or with content this put's
    /// PCM is a prefix of; nothing new was stored.
    Duplicate,
    /// The chunk id was spooled with PCM that this put's PCM extends (a device resumed after
    /// the ack of a partial chunk was lost): this record replaced it.
    Extended,
}

/// How a put relates to what is already spooled under its id.
enum Existing {
    Same,
    Covers,
    ExtendedBy,
    Gone,
    Differs(u32),
}

/// What a put does when the spool has no room for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Refuse the put (`RESOURCE_EXHAUSTED`); ingest holds the chunk and retries, which pushes
    /// back on the devices. Nothing acknowledged is ever lost.
    #[default]
    Reject,
    /// Evict the oldest spooled chunks until the new one fits. Acknowledged audio is lost, but
    /// every eviction is logged and counted.
    DropOldest,
}

/// A chunk evicted by [`WhenFull::DropOldest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub uid: String,
    pub session: String,
    pub seq: u64,
    /// Size of the evicted record.
    pub bytes: u64,
}

/// Called for every evicted chunk (the uploader counts them in a metric).
pub type OnDrop = std::sync::Arc<dyn Fn(&Dropped) + Send + Sync>;

/// How a spool is bounded.
#[derive(Clone)]
pub struct Limits {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub on_drop: OnDrop,
}

impl Limits {
    /// Refuses puts beyond `max_bytes`.
    pub fn reject(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            when_full: WhenFull::Reject,
            on_drop: std::sync::Arc::new(|_| {}),
        }
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_bytes", &self.max_bytes)
            .field("when_full", &self.when_full)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool full: {used} of {max} bytes used, {need} more needed")]
    Full { used: u64, max: u64, need: u64 },
    #[error(
        "chunk id already spooled with different content (crc32c {existing:08x}, new {new:08x})"
    )]
    Conflict { existing: u32, new: u32 },
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
}

/// The spool. Cheap operations are synchronous; only the flush is awaited.
#[derive(Debug)]
pub struct Spool {
    db: sled::Db,
    chunks: sled::Tree,
    index: sled::Tree,
    quarantine: sled::Tree,
    limits: Limits,
    used: AtomicU64,
    count: AtomicU64,
    writer: std::sync::Mutex<()>,
    committed: Notify,
}

fn position_key(pos: u64) -> [u8; 8] {
    pos.to_be_bytes()
}

fn position_of(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// Index value: position (8 bytes), CRC32C (4), record size (8), all big-endian.
fn index_value(pos: u64, crc: u32, size: u64) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..8].copy_from_slice(&pos.to_be_bytes());
    v[8..12].copy_from_slice(&crc.to_be_bytes());
    v[12..].copy_from_slice(&size.to_be_bytes());
    v
}

/// Decodes an index value; `None` when it is damaged.
fn parse_index(v: &[u8]) -> Option<(u64, u32, u64)> {
    let pos = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let crc = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    let size = u64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
    Some((pos, crc, size))
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and sizes what it already holds from the index
    /// alone, never reading the audio: start-up time does not grow with the backlog's bytes.
    pub fn open(dir: &std::path::Path, limits: Limits) -> Result<Self, SpoolError> {
        let started = Instant::now();
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(500))
            .open()?;
        let chunks = db.open_tree("chunks")?;
        let index = db.open_tree("index")?;
        let quarantine = db.open_tree("quarantine")?;
        let (mut used, mut count) = (0u64, 0u64);
        for entry in index.iter() {
            let (key, value) = entry?;
            match parse_index(&value) {
                Some((_, _, size)) => {
                    used += size;
                    count += 1;
                }
                None => {
                    // The record it pointed at is still drained; only deduplication of that
                    // one id is lost.
                    tracing::error!(id = %String::from_utf8_lossy(&key), "damaged spool index entry dropped");
                    index.remove(key)?;
                }
            }
        }
        tracing::debug!(count, used, elapsed = ?started.elapsed(), "spool sized from its index");
        Ok(Self {
            db,
            chunks,
            index,
            quarantine,
            limits,
            used: AtomicU64::new(used),
            count: AtomicU64::new(count),
            writer: std::sync::Mutex::new(()),
            committed: Notify::new(),
        })
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

    /// Stores `record` and makes it durable. Returns once it is flushed to disk.
    pub async fn commit(&self, record: &Record) -> Result<Committed, SpoolError> {
        let outcome = self.insert(record)?;
        self.db.flush_async().await?;
        if outcome != Committed::Duplicate {
            self.committed.notify_one();
        }
        Ok(outcome)
    }

    fn insert(&self, record: &Record) -> Result<Committed, SpoolError> {
        let id = record.index_key();
        let value = record.encode_to_vec();
        let need = value.len() as u64;
        // One writer at a time, for two reasons: the bound is checked and reserved atomically,
        // so concurrent puts cannot overshoot it; and positions become visible in the order
        // they were generated, so the drain's forward-only cursor can never pass a position
        // whose record appears later. Only in-memory work happens here; the flush is outside.
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut supersedes = None;
        if let Some(existing) = self.index.get(&id)? {
            let (old_pos, _, old_size) = parse_index(&existing).unwrap_or((u64::MAX, 0, 0));
            match self.compare(&existing, record)? {
                Existing::Same | Existing::Covers => return Ok(Committed::Duplicate),
                Existing::Differs(existing) => {
                    return Err(SpoolError::Conflict {
                        existing,
                        new: record.crc32c,
                    });
                }
                Existing::ExtendedBy => supersedes = Some((old_pos, old_size)),
                Existing::Gone => {}
            }
        }
        let max = self.limits.max_bytes;
        loop {
            let used = self.used.load(Ordering::Acquire);
            // A superseded record's bytes are freed by this same write.
            let credit = supersedes.map_or(0, |(_, size)| size);
            if used.saturating_sub(credit) + need <= max {
                break;
            }
            let full = SpoolError::Full { used, max, need };
            if self.limits.when_full == WhenFull::Reject || need > max || !self.drop_oldest()? {
                return Err(full);
            }
        }
        let pos = self.db.generate_id()?;
        let replaced = (&self.chunks, &self.index)
            .transaction(|(chunks, index)| {
                chunks.insert(&position_key(pos), value.as_slice())?;
                index.insert(id.as_slice(), &index_value(pos, record.crc32c, need))?;
                let replaced = match supersedes {
                    Some((old, _)) => chunks.remove(&position_key(old))?,
                    None => None,
                };
                Ok::<_, ConflictableTransactionError<Infallible>>(replaced)
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => SpoolError::Storage(e),
                TransactionError::Abort(never) => match never {},
            })?;
        self.used.fetch_add(need, Ordering::AcqRel);
        self.count.fetch_add(1, Ordering::AcqRel);
        if let Some(old) = replaced {
            self.used.fetch_sub(old.len() as u64, Ordering::AcqRel);
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(if supersedes.is_some() {
            Committed::Extended
        } else {
            Committed::Stored
        })
    }

    /// Compares a put with the record its id already names (one read, only on this rare path).
    fn compare(&self, existing: &[u8], record: &Record) -> Result<Existing, SpoolError> {
        let Some((pos, crc, _)) = parse_index(existing) else {
            return Ok(Existing::Gone);
        };
        if crc == record.crc32c {
            return Ok(Existing::Same);
        }
        let Some(old) = self
            .chunks
            .get(position_key(pos))?
            .and_then(|v| Record::decode(v.as_ref()).ok())
        else {
            return Ok(Existing::Gone);
        };
        Ok(if record.pcm.starts_with(&old.pcm) {
            Existing::ExtendedBy
        } else if old.pcm.starts_with(&record.pcm) {
            Existing::Covers
        } else {
            Existing::Differs(crc)
        })
    }

    /// True while the index still names the record at `pos` for its id: false once a longer
    /// piece superseded it (then only the newer one may be uploaded).
    pub fn is_current(&self, pos: u64, record: &Record) -> Result<bool, SpoolError> {
        Ok(self
            .index
            .get(record.index_key())?
            .and_then(|v| parse_index(&v))
            .is_some_and(|(p, _, _)| p == pos))
    }

    /// Evicts the oldest record (called with the writer lock held). False when there is none.
    fn drop_oldest(&self) -> Result<bool, SpoolError> {
        let Some((key, value)) = self.chunks.first()? else {
            return Ok(false);
        };
        let bytes = value.len() as u64;
        let dropped = match Record::decode(value.as_ref()) {
            Ok(r) => {
                self.remove_index_if_at(&r.index_key(), &key)?;
                Dropped {
                    uid: r.uid,
                    session: r.session,
                    seq: r.seq,
                    bytes,
                }
            }
            Err(_) => Dropped {
                uid: String::new(),
                session: String::new(),
                seq: 0,
                bytes,
            },
        };
        if self.chunks.remove(&key)?.is_some() {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        tracing::warn!(uid = %dropped.uid, session = %dropped.session, seq = dropped.seq, bytes,
            "spool full: dropped the oldest chunk (--when-full drop-oldest)");
        (self.limits.on_drop)(&dropped);
        Ok(true)
    }

    /// Removes the index entry `id` only if it still points at position `key`.
    fn remove_index_if_at(&self, id: &[u8], key: &[u8]) -> Result<(), SpoolError> {
        let pos = position_of(key);
        if let Some(v) = self.index.get(id)?
            && parse_index(&v).map(|(p, _, _)| p) == pos
        {
            self.index.remove(id)?;
        }
        Ok(())
    }

    /// The oldest record at a position `>= from`, decoded. Records that do not decode or whose
    /// PCM no longer matches its checksum are moved to quarantine and skipped; the count of
    /// those is returned alongside.
    pub fn next_from(&self, from: u64) -> Result<(Option<(u64, Record)>, u64), SpoolError> {
        let mut quarantined = 0;
        for entry in self.chunks.range(position_key(from)..) {
            let (key, value) = entry?;
            let Some(pos) = position_of(&key) else {
                self.quarantine(&key, &value)?;
                quarantined += 1;
                continue;
            };
            match Record::decode(value.as_ref()) {
                Ok(record) if record.intact() => return Ok((Some((pos, record)), quarantined)),
                Ok(record) => {
                    tracing::error!(pos, uid = %record.uid, session = %record.session, seq = record.seq,
                        "spooled chunk fails its checksum; quarantined");
                    self.quarantine(&key, &value)?;
                    self.remove_index_if_at(&record.index_key(), &key)?;
                    quarantined += 1;
                }
                Err(e) => {
                    tracing::error!(pos, error = %e, "spooled record does not decode; quarantined");
                    self.quarantine(&key, &value)?;
                    self.forget_position(pos)?;
                    quarantined += 1;
                }
            }
        }
        Ok((None, quarantined))
    }

    /// Removes whatever index entry points at `pos` (a scan: only for records too damaged to
    /// name their own id, which are rare).
    fn forget_position(&self, pos: u64) -> Result<(), SpoolError> {
        for entry in self.index.iter() {
            let (id, v) = entry?;
            if parse_index(&v).map(|(p, _, _)| p) == Some(pos) {
                self.index.remove(id)?;
            }
        }
        Ok(())
    }

    fn quarantine(&self, key: &[u8], value: &[u8]) -> Result<(), SpoolError> {
        self.quarantine.insert(key, value)?;
        if self.chunks.remove(key)?.is_some() {
            self.used.fetch_sub(value.len() as u64, Ordering::AcqRel);
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Deletes a record after its upload was confirmed. Not flushed at once: if the deletion is
    /// lost in a crash the chunk is uploaded again to the same key, which is harmless.
    pub fn remove(&self, pos: u64, record: &Record) -> Result<(), SpoolError> {
        let id = record.index_key();
        let removed = (&self.chunks, &self.index).transaction(|(chunks, index)| {
            let old = chunks.remove(&position_key(pos))?;
            // The id may since have been spooled again at another position (after a
            // drop-oldest eviction, say); only this position's entry goes.
            if let Some(v) = index.get(id.as_slice())?
                && parse_index(&v).map(|(p, _, _)| p) == Some(pos)
            {
                index.remove(id.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<Infallible>>(old)
        });
        match removed {
            Ok(Some(old)) => {
                self.used.fetch_sub(old.len() as u64, Ordering::AcqRel);
                self.count.fetch_sub(1, Ordering::AcqRel);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(never)) => match never {},
        }
    }

    /// Completes after the next commit that stored something new (or at once if one happened
    /// since the last wait).
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Finds records the index names but the disk no longer holds (a blob file lost or damaged
    /// outside Spillway), drops their index entries and returns their ids, so the loss is logged
    /// and counted rather than silent. Runs in the background after start-up: it touches every
    /// record, and start-up must not wait for that.
    pub fn reconcile(&self) -> Result<Vec<String>, SpoolError> {
        let mut lost = Vec::new();
        for entry in self.index.iter() {
            let (id, v) = entry?;
            let Some((pos, _, size)) = parse_index(&v) else {
                continue;
            };
            if self.chunks.contains_key(position_key(pos))? {
                continue;
            }
            // Re-check and remove atomically: the drain may be deleting this record right now.
            let removed = (&self.chunks, &self.index).transaction(|(chunks, index)| {
                let still = index
                    .get(&id)?
                    .and_then(|v| parse_index(&v))
                    .is_some_and(|(p, _, _)| p == pos);
                if still && chunks.get(position_key(pos))?.is_none() {
                    index.remove(&id)?;
                    return Ok::<_, ConflictableTransactionError<Infallible>>(true);
                }
                Ok(false)
            });
            match removed {
                Ok(true) => {
                    self.used.fetch_sub(size, Ordering::AcqRel);
                    self.count.fetch_sub(1, Ordering::AcqRel);
                    let id = String::from_utf8_lossy(&id).into_owned();
                    tracing::error!(%id, pos, "spooled chunk lost to disk damage");
                    lost.push(id);
                }
                Ok(false) => {}
                Err(TransactionError::Storage(e)) => return Err(e.into()),
                Err(TransactionError::Abort(never)) => match never {},
            }
        }
        Ok(lost)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, pcm: &[u8]) -> Record {
        Record {
            uid: "u".into(),
            session: "s".into(),
            seq,
            sample_rate: 8000,
            chunk_samples: 8000,
            first_sample: seq * 8000,
            crc32c: crc32c::crc32c(pcm),
            pcm: Bytes::copy_from_slice(pcm),
        }
    }

    #[tokio::test]
    async fn commits_survive_reopen_and_drain_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
            for seq in [0, 1, 2] {
                assert_eq!(
                    spool.commit(&record(seq, &[seq as u8; 100])).await.unwrap(),
                    Committed::Stored
                );
            }
        }
        let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
        assert_eq!(spool.len(), 3);
        let mut from = 0;
        let mut seqs = Vec::new();
        while let (Some((pos, r)), 0) = spool.next_from(from).unwrap() {
            seqs.push(r.seq);
            spool.remove(pos, &r).unwrap();
            from = pos + 1;
        }
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!((spool.len(), spool.used_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn same_id_is_stored_once_and_conflicting_content_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
        assert_eq!(
            spool.commit(&record(0, b"ab")).await.unwrap(),
            Committed::Stored
        );
        assert_eq!(
            spool.commit(&record(0, b"ab")).await.unwrap(),
            Committed::Duplicate
        );
        assert!(matches!(
            spool.commit(&record(0, b"cd")).await,
            Err(SpoolError::Conflict { .. })
        ));
        assert_eq!(spool.len(), 1);
        // A device that resumed after losing the ack of a partial chunk resends it longer.
        assert_eq!(
            spool.commit(&record(0, b"abcdef")).await.unwrap(),
            Committed::Extended
        );
        assert_eq!(
            spool.commit(&record(0, b"abcd")).await.unwrap(),
            Committed::Duplicate,
            "a shorter resend of what is spooled stores nothing"
        );
        assert_eq!(spool.len(), 1);
        let (Some((pos, r)), _) = spool.next_from(0).unwrap() else {
            panic!("empty")
        };
        assert_eq!(&r.pcm[..], b"abcdef");
        assert!(spool.is_current(pos, &r).unwrap());
        assert_eq!(spool.used_bytes(), r.encode_to_vec().len() as u64);
    }

    #[tokio::test]
    async fn the_bound_is_never_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), Limits::reject(1000)).unwrap();
        let mut stored = 0;
        for seq in 0..10 {
            match spool.commit(&record(seq, &[0; 200])).await {
                Ok(Committed::Stored) => stored += 1,
                Err(SpoolError::Full { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
            assert!(spool.used_bytes() <= 1000);
        }
        assert_eq!(stored, 4);
        let (Some((pos, r)), _) = spool.next_from(0).unwrap() else {
            panic!("empty")
        };
        spool.remove(pos, &r).unwrap();
        assert!(matches!(
            spool.commit(&record(99, &[0; 200])).await,
            Ok(Committed::Stored)
        ));
    }

    #[tokio::test]
    async fn reopening_sizes_the_backlog_from_the_index_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (used, len) = {
            let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
            for seq in 0..5 {
                spool
                    .commit(&record(seq, &vec![7; 100 + seq as usize * 10]))
                    .await
                    .unwrap();
            }
            let (Some((pos, r)), _) = spool.next_from(0).unwrap() else {
                panic!("empty")
            };
            spool.remove(pos, &r).unwrap();
            spool.flush().await.unwrap();
            (spool.used_bytes(), spool.len())
        };
        let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
        assert_eq!((spool.used_bytes(), spool.len()), (used, len));
        assert_eq!(len, 4);
    }

    #[tokio::test]
    async fn drop_oldest_evicts_oldest_first_reports_each_and_keeps_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&dropped);
        let spool = Spool::open(
            dir.path(),
            Limits {
                max_bytes: 1000,
                when_full: WhenFull::DropOldest,
                on_drop: std::sync::Arc::new(move |d| sink.lock().unwrap().push(d.seq)),
            },
        )
        .unwrap();
        for seq in 0..10 {
            assert_eq!(
                spool.commit(&record(seq, &[seq as u8; 200])).await.unwrap(),
                Committed::Stored
            );
            assert!(spool.used_bytes() <= 1000, "bound exceeded at seq {seq}");
        }
        assert_eq!(*dropped.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
        let mut left = Vec::new();
        let mut from = 0;
        while let (Some((pos, r)), _) = spool.next_from(from).unwrap() {
            left.push(r.seq);
            from = pos + 1;
        }
        assert_eq!(left, [6, 7, 8, 9]);
        // An evicted id can be spooled again; it is not mistaken for a duplicate.
        assert_eq!(
            spool.commit(&record(0, &[0; 200])).await.unwrap(),
            Committed::Stored
        );
        assert!(spool.used_bytes() <= 1000);
    }

    /// Six records, the odd ones large enough that sled keeps them in blob files.
    async fn six_records(dir: &std::path::Path) {
        let spool = Spool::open(dir, Limits::reject(1 << 30)).unwrap();
        for seq in 0..6 {
            let n = if seq % 2 == 0 { 100 } else { 200_000 };
            spool
                .commit(&record(seq, &vec![seq as u8; n]))
                .await
                .unwrap();
        }
    }

    fn drained(spool: &Spool) -> Vec<u64> {
        let (mut from, mut seqs) = (0, Vec::new());
        while let (Some((pos, r)), _) = spool.next_from(from).unwrap() {
            seqs.push(r.seq);
            from = pos + 1;
        }
        seqs
    }

    #[tokio::test]
    async fn a_lost_blob_is_found_counted_and_the_rest_drains() {
        let dir = tempfile::tempdir().unwrap();
        six_records(dir.path()).await;
        let blob = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::remove_file(blob).unwrap();
        let spool = Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap();
        let lost = spool.reconcile().unwrap();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(spool.len(), 5);
        assert_eq!(drained(&spool).len(), 5);
        assert!(spool.reconcile().unwrap().is_empty(), "reported once");
    }

    #[tokio::test]
    async fn a_truncated_or_bit_flipped_spool_opens_and_drains_a_consistent_prefix() {
        for damage in ["truncate", "flip"] {
            let dir = tempfile::tempdir().unwrap();
            six_records(dir.path()).await;
            let db = dir.path().join("db");
            let mut bytes = std::fs::read(&db).unwrap();
            let half = bytes.len() / 2;
            match damage {
                "truncate" => bytes.truncate(half),
                _ => bytes[half] ^= 0xff,
            }
            std::fs::write(&db, bytes).unwrap();
            // sled's recovery stops at the first damaged log entry: what is before it opens,
            // consistently (the index and the records agree), with no panic.
            let spool = Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap();
            assert!(spool.reconcile().unwrap().is_empty(), "{damage}");
            let seqs = drained(&spool);
            assert_eq!(seqs.len() as u64, spool.len(), "{damage}");
            assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{damage}");
        }
    }

    #[tokio::test]
    async fn a_damaged_record_is_quarantined_not_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
        spool.commit(&record(0, b"good")).await.unwrap();
        let mut bad = record(1, b"data");
        bad.crc32c ^= 1;
        spool.commit(&bad).await.unwrap();
        spool.chunks.insert(b"junk-key", b"\xff\xff").unwrap();
        let (Some((pos, r)), 0) = spool.next_from(0).unwrap() else {
            panic!("first")
        };
        assert_eq!(r.seq, 0);
        let (next, quarantined) = spool.next_from(pos + 1).unwrap();
        assert!(next.is_none());
        assert_eq!(quarantined, 2);
        assert_eq!(spool.quarantine.len(), 2);
    }
}
