//! Committing a put: the bound checked before anything is written, the record file written
//! and synced outside any lock, then group commit under the writer lock (link each file at its
//! position, one directory sync, the index entries in position order, one sled flush).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;

use super::fs::ignore_missing;
use super::index::{parse_index, position_key};
use super::read::Existing;
use super::{Committed, Record, Spool, SpoolError, WhenFull, sub};

/// A put waiting in the group-commit queue.
#[derive(Debug)]
pub(super) struct Pending {
    record: Record,
    id: Vec<u8>,
    tmp: PathBuf,
    need: u64,
    /// The PCM is only in the file (`record.pcm` is empty): a put received by
    /// [`Spool::incoming`].
    streamed: bool,
    done: SyncSender<Result<Committed, SpoolError>>,
}

/// The first half of a commit: decided already, or linked at a position awaiting its index
/// entries.
enum Linked {
    Done(Committed),
    At {
        pos: u64,
        supersedes: Option<(u64, u64)>,
    },
}

/// A put's outcome, and where to send it.
type Answer = (
    SyncSender<Result<Committed, SpoolError>>,
    Result<Committed, SpoolError>,
);

impl Spool {
    /// Stores `record` and makes it durable. Returns once the record file, its directory entry
    /// and the index are on disk.
    pub async fn commit(self: &Arc<Self>, record: &Record) -> Result<Committed, SpoolError> {
        let (this, rec) = (Arc::clone(self), record.clone());
        let outcome = tokio::task::spawn_blocking(move || this.insert(&rec))
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))??;
        if outcome == Committed::Duplicate {
            // The original's index entry may still be in sled's memory only.
            self.db.flush_async().await?;
        }
        if outcome != Committed::Duplicate {
            self.committed.notify_one();
        }
        Ok(outcome)
    }

    /// Refuses, before anything is written, a put that cannot fit: beyond the disk's reserves
    /// always; beyond the spool's bounds when full puts are refused (with drop-oldest the
    /// commit evicts instead). A put of an id already spooled may supersede its record, whose
    /// bytes it frees: left to the commit.
    pub(super) fn precheck(&self, id: &[u8], need: u64) -> Result<(), SpoolError> {
        let room = self.fs.room(&self.records)?;
        if !room.fits(need) {
            return Err(SpoolError::DiskFull {
                free_bytes: room.free_bytes,
                free_inodes: room.free_inodes,
            });
        }
        if self.limits.when_full != WhenFull::Reject || self.index.get(id)?.is_some() {
            return Ok(());
        }
        let (used, max) = (self.used.load(Ordering::Acquire), self.limits.max_bytes);
        if used.saturating_add(need) > max {
            return Err(SpoolError::Full { used, max, need });
        }
        if self.count.load(Ordering::Acquire) >= self.limits.max_chunks {
            return Err(SpoolError::TooManyChunks {
                max: self.limits.max_chunks,
            });
        }
        Ok(())
    }

    /// Makes the directory entries of `records/` durable (links and deletions alike).
    fn sync_records_dir(&self) -> Result<(), SpoolError> {
        self.fs.sync_dir(&self.records)?;
        Ok(())
    }

    /// A commit, on a blocking thread: the duplicate check, the precheck, the record file, then
    /// group commit (this put waits for a leader, or leads a batch itself).
    fn insert(&self, record: &Record) -> Result<Committed, SpoolError> {
        let id = record.index_key();
        // A plain repeat needs no file at all.
        if self.is_repeat(&id, record.crc32c)? {
            return Ok(Committed::Duplicate);
        }
        // The record's fields, then its PCM written from the request's own buffer: the file is
        // byte for byte `record.encode_to_vec()`, without that copy of the audio.
        let fields = record.file_head();
        let need = (fields.len() + record.pcm.len()) as u64;
        self.precheck(&id, need)?;
        // The slow part, the file and its sync, happens before any lock: concurrent puts
        // write their files in parallel.
        let tmp = self.write_tmp(&fields, &record.pcm)?;
        self.group_commit(record.clone(), id, tmp, need, false)
    }

    /// True when the index names `id` with this CRC32C: the put is a plain repeat.
    pub(super) fn is_repeat(&self, id: &[u8], crc32c: u32) -> Result<bool, SpoolError> {
        Ok(self.index.get(id)?.is_some_and(|existing| {
            parse_index(&existing).is_some_and(|(_, crc, _)| crc == crc32c)
        }))
    }

    /// Commits the synced temporary file `tmp` holding `record` (its PCM only in the file when
    /// `streamed`): steps 4 to 8 of the module doc.
    pub(super) fn group_commit(
        &self,
        record: Record,
        id: Vec<u8>,
        tmp: PathBuf,
        need: u64,
        streamed: bool,
    ) -> Result<Committed, SpoolError> {
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        self.queue.lock().push(Pending {
            record,
            id,
            tmp,
            need,
            streamed,
            done,
        });
        // Group commit: whoever takes the writer lock commits every put queued so far, with
        // one directory sync and one index flush for all of them. A put whose leader already
        // took it finds its outcome waiting.
        loop {
            if let Ok(outcome) = outcome.try_recv() {
                return outcome;
            }
            let writer = self.lock();
            if let Ok(outcome) = outcome.try_recv() {
                return outcome;
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                // Another leader took this put and is flushing the index: wait for its answer
                // rather than spin on the lock.
                drop(writer);
                return outcome
                    .recv()
                    .map_err(|_| SpoolError::Task("the commit's leader went away".into()))?;
            }
            let answers = self.commit_batch(batch);
            drop(writer);
            // Durable only once the index is flushed; the next batch proceeds meanwhile.
            let flushed = if answers.iter().any(|(_, r)| r.is_ok()) {
                self.db.flush().map(drop).map_err(SpoolError::from)
            } else {
                Ok(())
            };
            for (done, result) in answers {
                let result = match (&flushed, result) {
                    (Err(e), Ok(_)) => Err(SpoolError::Io(std::io::Error::other(format!(
                        "flushing the spool index: {e}"
                    )))),
                    (_, r) => r,
                };
                let _ = done.send(result);
            }
        }
    }

    /// The queued puts, but never two with one id: a later one waits for the next batch, so it
    /// sees the first one's index entry.
    fn take_batch(&self) -> Vec<Pending> {
        let mut queue = self.queue.lock();
        let mut batch: Vec<Pending> = Vec::with_capacity(queue.len());
        let mut later = Vec::new();
        for p in queue.drain(..) {
            if batch.iter().any(|b| b.id == p.id) {
                later.push(p);
            } else {
                batch.push(p);
            }
        }
        *queue = later;
        batch
    }

    /// Commits a batch under the writer lock: each put is checked, bounded, given its position
    /// and linked; then one directory sync makes every link durable; then the index entries go
    /// in, in position order. Returns each put's outcome (the caller flushes the index).
    fn commit_batch(&self, batch: Vec<Pending>) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(batch.len());
        let mut linked = Vec::new();
        for p in batch {
            match self.link(&p.record, &p.id, &p.tmp, p.need, p.streamed) {
                Ok(Linked::Done(c)) => {
                    let _ = self.fs.remove_file(&p.tmp);
                    answers.push((p.done, Ok(c)));
                }
                Ok(Linked::At { pos, supersedes }) => linked.push((p, pos, supersedes)),
                Err(e) => {
                    let _ = self.fs.remove_file(&p.tmp);
                    answers.push((p.done, Err(e)));
                }
            }
        }
        if linked.is_empty() {
            return answers;
        }
        // The directory entries are durable before the index names them: an index entry never
        // points at a file a crash could take back.
        if let Err(e) = self.sync_records_dir() {
            for (p, _, _) in linked {
                // Their bytes were reserved by `link`; the files stay as orphans for reconcile.
                sub(&self.used, p.need);
                sub(&self.count, 1);
                answers.push((
                    p.done,
                    Err(SpoolError::Io(std::io::Error::other(e.to_string()))),
                ));
            }
            return answers;
        }
        let mut superseded_any = false;
        for (p, pos, supersedes) in linked {
            let result = self
                .install(
                    pos,
                    &p.id,
                    &p.record,
                    p.need,
                    supersedes.map(|(old, _)| old),
                    true,
                )
                .and_then(|()| match supersedes {
                    Some((old, _)) => {
                        // Only now, with the index naming the longer piece, does the shorter
                        // one's file go (durably, below): it can never come back to be uploaded
                        // over the longer one. (A crash before this leaves it an orphan, which
                        // reconcile compares and discards.)
                        superseded_any = true;
                        ignore_missing(self.fs.remove_file(&self.record_path(old)))?;
                        Ok(Committed::Extended)
                    }
                    None => Ok(Committed::Stored),
                });
            answers.push((p.done, result));
        }
        if superseded_any && let Err(e) = self.sync_records_dir() {
            tracing::warn!(error = %e, "syncing the spool directory after removing superseded pieces failed; reconcile discards any that come back");
        }
        answers
    }

    /// The first half of a commit, under the writer lock (held by [`Spool::commit_batch`]'s
    /// caller). One writer at a time, for two reasons: the bound is checked and reserved
    /// atomically, so concurrent puts cannot overshoot it; and positions become visible in the
    /// order they were generated, so the drain's forward-only cursor can never pass a position
    /// whose record appears later. Reserves the record's bytes and links its file at its
    /// position.
    fn link(
        &self,
        record: &Record,
        id: &[u8],
        tmp: &Path,
        need: u64,
        streamed: bool,
    ) -> Result<Linked, SpoolError> {
        let mut supersedes = None;
        if let Some(existing) = self.index.get(id)? {
            let (old_pos, old_crc, old_size) = parse_index(&existing).unwrap_or((u64::MAX, 0, 0));
            // Other content under this id: the comparison needs the PCM, which a streamed put
            // has only in its file (read back on this rare path).
            let loaded;
            let record = if streamed && old_crc != record.crc32c {
                loaded = self.read_tmp(tmp)?;
                &loaded
            } else {
                record
            };
            match self.compare(&existing, record)? {
                Existing::Same | Existing::Covers => return Ok(Linked::Done(Committed::Duplicate)),
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
            // A superseded record's bytes are freed by this same write (unless an eviction
            // just took it).
            let credit = match supersedes {
                Some((old, size)) if self.chunks.contains_key(position_key(old))? => size,
                _ => 0,
            };
            let count = self.count.load(Ordering::Acquire);
            let replaces = u64::from(supersedes.is_some() && credit > 0);
            let room_for_one = count.saturating_sub(replaces) < self.limits.max_chunks;
            if used.saturating_sub(credit).saturating_add(need) <= max && room_for_one {
                break;
            }
            let full = if room_for_one {
                SpoolError::Full { used, max, need }
            } else {
                SpoolError::TooManyChunks {
                    max: self.limits.max_chunks,
                }
            };
            if self.limits.when_full == WhenFull::Reject || need > max || !self.drop_oldest()? {
                return Err(full);
            }
        }
        let pos = self
            .db
            .generate_id()?
            .max(self.next_pos.load(Ordering::Acquire));
        self.next_pos.store(pos + 1, Ordering::Release);
        // A hard link cannot replace an existing file: a position clash fails loudly instead
        // of overwriting a spooled chunk.
        self.fs
            .hard_link(tmp, &self.record_path(pos))
            .map_err(|e| self.write_error(e))?;
        let _ = self.fs.remove_file(tmp);
        // Reserved now, so the next put of the batch sees these bytes taken.
        self.used.fetch_add(need, Ordering::AcqRel);
        self.count.fetch_add(1, Ordering::AcqRel);
        Ok(Linked::At { pos, supersedes })
    }
}
