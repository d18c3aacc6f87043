//! The disk spool: every chunk is committed here, and flushed, before the uploader acknowledges
//! it; the drain deletes it only after the object store confirmed the upload.
//!
//! Layout (one sled database under `--spool-dir`):
//! - tree `chunks`: key = 8-byte big-endian spool position (monotonic, from sled's id
//!   generator), value = a protobuf [`Record`] (id, audio parameters, CRC32C, PCM). Iterating it
//!   in key order yields chunks oldest first.
//! - tree `index`: key = `uid/session/seq` (20 digits), value = position + CRC32C. It makes a
//!   repeated put of the same chunk id store nothing new.
//! - tree `quarantine`: records that failed to decode or whose PCM no longer matches its CRC32C;
//!   kept for an operator, never uploaded, never retried.
//!
//! Invariants:
//! - **Acknowledged ⇒ durable**: [`Spool::commit`] returns only after `flush_async` completed for
//!   a batch containing the record, whether this put stored it or an earlier one did.
//! - **Bounded**: the sum of record sizes never exceeds `max_bytes`; a put that would exceed it
//!   is refused with [`SpoolError::Full`] before anything is written.
//! - A record leaves `chunks` only through [`Spool::remove`] (after upload) or quarantine.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

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
    fn index_key(&self) -> Vec<u8> {
        format!("{}/{}/{:020}", self.uid, self.session, self.seq).into_bytes()
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
    /// The chunk id was already spooled with the same checksum; nothing new was stored.
    Duplicate,
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
    max_bytes: u64,
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

fn index_value(pos: u64, crc: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&pos.to_be_bytes());
    v[8..].copy_from_slice(&crc.to_be_bytes());
    v
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and counts what it already holds.
    pub fn open(dir: &std::path::Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(500))
            .open()?;
        let chunks = db.open_tree("chunks")?;
        let index = db.open_tree("index")?;
        let quarantine = db.open_tree("quarantine")?;
        let (mut used, mut count) = (0u64, 0u64);
        for entry in chunks.iter() {
            let (_, value) = entry?;
            used += value.len() as u64;
            count += 1;
        }
        Ok(Self {
            db,
            chunks,
            index,
            quarantine,
            max_bytes,
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
        self.max_bytes
    }

    /// Stores `record` and makes it durable. Returns once it is flushed to disk.
    pub async fn commit(&self, record: &Record) -> Result<Committed, SpoolError> {
        let outcome = self.insert(record)?;
        self.db.flush_async().await?;
        if outcome == Committed::Stored {
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
        if let Some(existing) = self.index.get(&id)? {
            return Self::same_content(&existing, record.crc32c);
        }
        let used = self.used.load(Ordering::Acquire);
        if used + need > self.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.max_bytes,
                need,
            });
        }
        let pos = self.db.generate_id()?;
        (&self.chunks, &self.index)
            .transaction(|(chunks, index)| {
                chunks.insert(&position_key(pos), value.as_slice())?;
                index.insert(id.as_slice(), &index_value(pos, record.crc32c))?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => SpoolError::Storage(e),
                TransactionError::Abort(never) => match never {},
            })?;
        self.used.fetch_add(need, Ordering::AcqRel);
        self.count.fetch_add(1, Ordering::AcqRel);
        Ok(Committed::Stored)
    }

    fn same_content(index_value: &[u8], crc: u32) -> Result<Committed, SpoolError> {
        let existing = index_value
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        if existing == crc {
            Ok(Committed::Duplicate)
        } else {
            Err(SpoolError::Conflict { existing, new: crc })
        }
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
                    let _ = self.index.remove(record.index_key())?;
                    quarantined += 1;
                }
                Err(e) => {
                    tracing::error!(pos, error = %e, "spooled record does not decode; quarantined");
                    self.quarantine(&key, &value)?;
                    quarantined += 1;
                }
            }
        }
        Ok((None, quarantined))
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
            index.remove(id.as_slice())?;
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
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            for seq in [0, 1, 2] {
                assert_eq!(
                    spool.commit(&record(seq, &[seq as u8; 100])).await.unwrap(),
                    Committed::Stored
                );
            }
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
    }

    #[tokio::test]
    async fn the_bound_is_never_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1000).unwrap();
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
    async fn a_damaged_record_is_quarantined_not_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
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
