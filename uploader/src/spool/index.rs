//! The sled side of the spool: the keys and values of its three trees, opening the database,
//! and installing a committed record's entries. sled does its own file I/O (its `conf`, `db`
//! and `blobs/` under `index/`, a flusher thread every 500 ms, a flush on drop): none of it
//! goes through [`super::fs::Filesystem`].

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Record, Spool, SpoolError, sub};

/// `chunks` key: the position, 8 bytes big-endian, so key order is position (age) order.
pub(super) fn position_key(pos: u64) -> [u8; 8] {
    pos.to_be_bytes()
}

/// The position a `chunks` key names; `None` when the key is damaged.
pub(super) fn position_of(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// `index` value: position (8 bytes), CRC32C (4), record size (8), all big-endian.
pub(super) fn index_value(pos: u64, crc: u32, size: u64) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..8].copy_from_slice(&pos.to_be_bytes());
    v[8..12].copy_from_slice(&crc.to_be_bytes());
    v[12..].copy_from_slice(&size.to_be_bytes());
    v
}

/// Decodes an index value; `None` when it is damaged.
pub(super) fn parse_index(v: &[u8]) -> Option<(u64, u32, u64)> {
    let pos = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let crc = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    let size = u64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
    Some((pos, crc, size))
}

/// `chunks` value: record size (8 bytes, big-endian), then the record without its PCM.
pub(super) fn meta_value(record: &Record, size: u64) -> Vec<u8> {
    let mut meta = record.clone();
    meta.pcm = Bytes::new();
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&meta.encode_to_vec());
    v
}

/// Decodes a `chunks` value into the record size and the metadata; `None` when it is damaged.
pub(super) fn parse_meta(v: &[u8]) -> Option<(u64, Record)> {
    let size = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let meta = Record::decode(v.get(8..)?).ok()?;
    Some((size, meta))
}

/// Opens the sled index. Called holding the spool's own lock, so no other owner can be using
/// it; yet sled's lock may still be held for a moment by the background threads of an owner in
/// this process that was just dropped (a daemon restarted in-process, a test reopening its
/// spool). That lock is retried for up to 2 s; any other error, or a lock held longer, is
/// returned.
pub(super) fn open_index(path: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl Spool {
    /// Names the record at `pos` in the index (in one sled transaction: a commit's metadata and
    /// index entries appear together), dropping the metadata entry of the piece it supersedes,
    /// and updates the counters. Called with the writer lock held.
    pub(super) fn install(
        &self,
        pos: u64,
        id: &[u8],
        record: &Record,
        size: u64,
        supersedes: Option<u64>,
        reserved: bool,
    ) -> Result<(), SpoolError> {
        let meta = meta_value(record, size);
        let replaced = (&self.chunks, &self.index)
            .transaction(|(chunks, index)| {
                chunks.insert(&position_key(pos), meta.as_slice())?;
                index.insert(id, &index_value(pos, record.crc32c, size))?;
                let replaced = match supersedes {
                    Some(old) => chunks.remove(&position_key(old))?,
                    None => None,
                };
                Ok::<_, ConflictableTransactionError<Infallible>>(replaced)
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => SpoolError::Storage(e),
                TransactionError::Abort(never) => match never {},
            });
        let replaced = match replaced {
            Ok(r) => r,
            Err(e) => {
                if reserved {
                    sub(&self.used, size);
                    sub(&self.count, 1);
                }
                return Err(e);
            }
        };
        if !reserved {
            self.used.fetch_add(size, Ordering::AcqRel);
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(old) = replaced {
            sub(&self.used, parse_meta(&old).map_or(0, |(size, _)| size));
            sub(&self.count, 1);
        }
        Ok(())
    }
}
