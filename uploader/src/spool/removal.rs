//! The only ways a chunk leaves the spool: [`Spool::remove`] after its upload, a quarantine
//! (its file is gone or fails its checks; logged and counted) and a
//! [`super::WhenFull::DropOldest`] eviction (logged and reported to `on_drop`). All three take
//! the entries out with [`Spool::forget`]. Other deletions never take a chunk away: a commit
//! deletes the file of a shorter piece only once the index names the longer piece that
//! supersedes it, and `reconcile` deletes temporaries and leftover copies of ids the index
//! names.

use super::fs::ignore_missing;
use super::index::{parse_index, parse_meta, position_key, position_of};
use super::{Dropped, Record, Spool, SpoolError, sub};

impl Spool {
    /// Removes the index entry `id` if it still points at `key`'s position (a compare-and-swap,
    /// so a concurrent put that re-pointed it wins), then the `chunks` entry `key`. True when the
    /// `chunks` entry was there. Not a sled transaction: transactions here, concurrent with
    /// commits and flushes, deadlocked sled 0.34 under `cargo xtask chaos`. A crash between the
    /// two removals leaves a `chunks` entry without an index entry, which `reconcile` repairs.
    pub(super) fn forget(&self, key: &[u8], id: &[u8]) -> Result<bool, SpoolError> {
        let pos = position_of(key);
        if let Some(v) = self.index.get(id)?
            && parse_index(&v).map(|(p, _, _)| p) == pos
        {
            // Err means it changed meanwhile: then it is not ours to remove.
            let _ = self.index.compare_and_swap(id, Some(v), None::<&[u8]>)?;
        }
        Ok(self.chunks.remove(key)?.is_some())
    }

    /// Evicts the oldest record (called with the writer lock held). False when there is none.
    pub(super) fn drop_oldest(&self) -> Result<bool, SpoolError> {
        let Some((key, value)) = self.chunks.first()? else {
            return Ok(false);
        };
        let (bytes, meta) = parse_meta(&value).unwrap_or_default();
        if self.forget(&key, &meta.index_key())? {
            sub(&self.used, bytes);
            sub(&self.count, 1);
        }
        if let Some(pos) = position_of(&key) {
            ignore_missing(self.fs.remove_file(&self.record_path(pos)))?;
        }
        let dropped = Dropped {
            uid: meta.uid,
            session: meta.session,
            seq: meta.seq,
            bytes,
        };
        tracing::warn!(uid = %dropped.uid, session = %dropped.session, seq = dropped.seq, bytes,
            "spool full: dropped the oldest chunk (--when-full drop-oldest)");
        (self.limits.on_drop)(&dropped);
        Ok(true)
    }

    /// Deletes a record after its upload was confirmed: the index entries, then the file. The
    /// index is flushed every 500 ms, not here (a flush per upload, concurrent with commits,
    /// deadlocked sled 0.34): a crash within that window can bring back an index entry whose
    /// file is gone, which `reconcile` then reports as lost although the store has it.
    pub async fn remove(&self, pos: u64, record: &Record) -> Result<(), SpoolError> {
        self.remove_now(pos, record)
    }

    /// [`Spool::remove`], blocking: the unlink of a chunk's file can take milliseconds (the
    /// filesystem frees its blocks), so the drain runs it on the blocking pool, where it holds
    /// up no other upload's network I/O.
    pub fn remove_now(&self, pos: u64, record: &Record) -> Result<(), SpoolError> {
        let key = position_key(pos);
        let Some(old) = self.chunks.get(key)? else {
            return Ok(());
        };
        if self.forget(&key, &record.index_key())? {
            let size = parse_meta(&old).map_or(0, |(size, _)| size);
            sub(&self.used, size);
            sub(&self.count, 1);
        }
        ignore_missing(self.fs.remove_file(&self.record_path(pos)))?;
        Ok(())
    }

    /// Moves a record aside: its metadata to the `quarantine` tree, its file (if any) to
    /// `quarantine/`. Returns false, doing nothing, when the entry changed meanwhile
    /// (superseded, removed or evicted by a concurrent writer, or readable after all).
    pub(super) fn quarantine(
        &self,
        key: &[u8],
        value: &[u8],
        meta: Option<&Record>,
    ) -> Result<bool, SpoolError> {
        let _writer = self.lock();
        if self.chunks.get(key)?.as_deref() != Some(value) {
            return Ok(false);
        }
        if let (Some(pos), Some(meta)) = (position_of(key), meta)
            && self.read_record(pos, meta)?.is_some()
        {
            return Ok(false);
        }
        self.quarantine.insert(key, value)?;
        let id = meta.map(Record::index_key).unwrap_or_default();
        if self.forget(key, &id)? {
            let size = parse_meta(value).map_or(0, |(size, _)| size);
            sub(&self.used, size);
            sub(&self.count, 1);
        }
        if let Some(pos) = position_of(key) {
            ignore_missing(
                self.fs
                    .rename(&self.record_path(pos), &self.quarantine_path(pos)),
            )?;
        }
        Ok(true)
    }
}
