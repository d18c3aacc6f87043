//! A put whose PCM is written to its temporary record file as it arrives ([`Spool::incoming`]),
//! for the `PutChunk` service's streaming path (`crate::put`): the commit of
//! [`Spool::commit`], steps 1 to 8 alike, except that step 3 writes the file piece by piece from
//! the request's frames instead of from one buffer holding the chunk. A put in flight holds at
//! most [`HELD_BYTES`], not a chunk.
//!
//! The receiving runs on a blocking thread: the async side hands it the PCM's frames, gathered
//! into batches of [`BATCH_BYTES`] (one wake-up of the writer and one vectored write per batch,
//! not per 16 KiB frame), through a channel of [`QUEUED_BATCHES`] ([`Incoming::pcm`] waits while
//! the writer is behind, and so holds back the HTTP/2 window and the sender), and at the end says
//! whether the request was whole and its CRC32C right ([`Incoming::finish`]). Anything else (an
//! error, the call dropped) deletes the temporary file; nothing is committed that the caller did
//! not confirm.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::record::TmpFile;
use super::{Committed, Record, Spool, SpoolError};

/// The PCM handed to the writer at a time: frames are gathered (as views, not copied) until
/// they reach this many bytes.
pub const BATCH_BYTES: usize = 128 * 1024;

/// Batches a put may have queued for its writer.
pub const QUEUED_BATCHES: usize = 2;

/// The most PCM a put in flight holds outside its HTTP/2 window, for frames of at most
/// `max_frame` bytes: the batch being gathered, the queued ones and the one being written, each
/// at most a frame past [`BATCH_BYTES`].
pub const fn held_bytes(max_frame: usize) -> usize {
    (QUEUED_BATCHES + 2) * (BATCH_BYTES + max_frame)
}

/// [`held_bytes`] for the frames the uploader accepts (`crate::put::MAX_FRAME`).
pub const HELD_BYTES: usize = held_bytes(crate::put::MAX_FRAME as usize);

/// What the async side sends the writer.
#[derive(Debug)]
enum Piece {
    Pcm(Vec<Bytes>),
    /// The request ended: commit when `true` (the PCM is whole and its CRC32C right), else
    /// delete the file.
    End(bool),
}

/// A put being received (see the module doc).
#[derive(Debug)]
pub struct Incoming {
    tx: mpsc::Sender<Piece>,
    /// Frames gathered for the next batch, and their bytes.
    batch: Vec<Bytes>,
    batched: usize,
    task: tokio::task::JoinHandle<Result<Option<Committed>, SpoolError>>,
    spool: Arc<Spool>,
}

impl Spool {
    /// Starts receiving a put: `head` is the record with its PCM left empty (checked by the
    /// caller as `PutChunk` checks every put), `pcm_len` the PCM's length in bytes.
    pub fn incoming(self: &Arc<Self>, head: Record, pcm_len: usize) -> Incoming {
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        let this = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || this.receive(head, pcm_len, rx));
        Incoming {
            tx,
            batch: Vec::new(),
            batched: 0,
            task,
            spool: Arc::clone(self),
        }
    }

    /// The writer, on a blocking thread. `Ok(None)`: the caller gave up (nothing committed).
    fn receive(
        &self,
        head: Record,
        pcm_len: usize,
        mut rx: mpsc::Receiver<Piece>,
    ) -> Result<Option<Committed>, SpoolError> {
        let id = head.index_key();
        if self.is_repeat(&id, head.crc32c)? {
            // A plain repeat: nothing to write; the caller still checks the PCM it receives.
            let confirmed = loop {
                match rx.blocking_recv() {
                    Some(Piece::Pcm(_)) => {}
                    Some(Piece::End(ok)) => break ok,
                    None => break false,
                }
            };
            return Ok(confirmed.then_some(Committed::Duplicate));
        }
        let fields = head.file_head_for(pcm_len);
        let need = (fields.len() + pcm_len) as u64;
        self.precheck(&id, need)?;
        let mut tmp = self.create_tmp()?;
        match fill(&mut tmp, Bytes::from(fields), pcm_len, &mut rx) {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.fs.remove_file(&tmp.path);
                return Ok(None);
            }
            Err(e) => {
                let _ = self.fs.remove_file(&tmp.path);
                return Err(self.write_error(e));
            }
        }
        self.group_commit(head, id, tmp.path, need, true).map(Some)
    }
}

/// Writes `fields`, then the PCM's batches as they come, to `tmp`, and syncs it once the caller
/// confirms. `Ok(false)` when the caller gave up.
fn fill(
    tmp: &mut TmpFile,
    fields: Bytes,
    pcm_len: usize,
    rx: &mut mpsc::Receiver<Piece>,
) -> std::io::Result<bool> {
    let mut head = Some(fields);
    let mut written = 0usize;
    loop {
        match rx.blocking_recv() {
            Some(Piece::Pcm(mut batch)) => {
                written = written.saturating_add(batch.iter().map(Bytes::len).sum::<usize>());
                if written > pcm_len {
                    return Err(std::io::Error::other(format!(
                        "received {written} bytes of PCM for a field of {pcm_len}"
                    )));
                }
                if let Some(fields) = head.take() {
                    batch.insert(0, fields);
                }
                tmp.write_all(&batch)?;
            }
            Some(Piece::End(true)) => {
                if written != pcm_len {
                    return Err(std::io::Error::other(format!(
                        "confirmed after {written} bytes of PCM for a field of {pcm_len}"
                    )));
                }
                if let Some(fields) = head.take() {
                    tmp.write_all(&[fields])?;
                }
                tmp.sync()?;
                return Ok(true);
            }
            Some(Piece::End(false)) | None => return Ok(false),
        }
    }
}

impl Incoming {
    /// Hands the writer the PCM's next bytes (in a batch once [`BATCH_BYTES`] are gathered),
    /// waiting while it is [`QUEUED_BATCHES`] behind. `false` once the writer has stopped early
    /// (a full spool or disk, an I/O error): its error waits in [`Incoming::finish`].
    pub async fn pcm(&mut self, bytes: Bytes) -> bool {
        self.batched += bytes.len();
        self.batch.push(bytes);
        if self.batched < BATCH_BYTES {
            return true;
        }
        self.batched = 0;
        let batch = std::mem::take(&mut self.batch);
        self.tx.send(Piece::Pcm(batch)).await.is_ok()
    }

    /// Commits the put, every byte of its PCM handed over and its CRC32C checked. Returns once
    /// the record is durable, as [`Spool::commit`] does.
    pub async fn commit(self) -> Result<Committed, SpoolError> {
        self.finish(true).await?.ok_or_else(|| {
            SpoolError::Task("the spool's writer stopped without committing the put".into())
        })
    }

    /// Gives the put up: its file is deleted. The writer's error, if it stopped on one (a full
    /// spool or disk, an I/O error).
    pub async fn abort(self) -> Result<(), SpoolError> {
        self.finish(false).await.map(drop)
    }

    /// Ends the put: commits it when `whole`, else deletes its file. `Ok(None)` when nothing
    /// was committed.
    async fn finish(mut self, whole: bool) -> Result<Option<Committed>, SpoolError> {
        if whole && !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let _ = self.tx.send(Piece::Pcm(batch)).await;
        }
        let _ = self.tx.send(Piece::End(whole)).await;
        drop(self.tx);
        let outcome = self
            .task
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))??;
        match outcome {
            // The original's index entry may still be in sled's memory only.
            Some(Committed::Duplicate) => {
                self.spool.db.flush_async().await?;
            }
            Some(_) => self.spool.committed.notify_one(),
            None => {}
        }
        Ok(outcome)
    }
}
