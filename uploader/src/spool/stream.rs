//! A put whose PCM is written to its temporary record file as it arrives ([`Spool::incoming`]),
//! for the `PutChunk` service's streaming path (`crate::put`): the commit of
//! [`Spool::commit`], steps 1 to 8 alike, except that step 3 writes the file piece by piece from
//! the request's frames instead of from one buffer holding the chunk. A put in flight holds at
//! most [`QUEUED_FRAMES`] frames, not a chunk.
//!
//! The receiving runs on a blocking thread: the async side hands it the PCM's frames through a
//! bounded channel ([`Incoming::pcm`], which waits while the writer is behind, and so holds back
//! the HTTP/2 window and the sender), and at the end says whether the request was whole and its
//! CRC32C right ([`Incoming::finish`]). Anything else (an error, the call dropped) deletes the
//! temporary file; nothing is committed that the caller did not confirm.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::record::TmpFile;
use super::{Committed, Record, Spool, SpoolError};

/// Frames a put may have queued for its writer: with HTTP/2's 16 KiB frames, 256 KiB.
pub const QUEUED_FRAMES: usize = 16;

/// What the async side sends the writer.
#[derive(Debug)]
enum Piece {
    Pcm(Bytes),
    /// The request ended: commit when `true` (the PCM is whole and its CRC32C right), else
    /// delete the file.
    End(bool),
}

/// A put being received (see the module doc).
#[derive(Debug)]
pub struct Incoming {
    tx: mpsc::Sender<Piece>,
    task: tokio::task::JoinHandle<Result<Option<Committed>, SpoolError>>,
    spool: Arc<Spool>,
}

impl Spool {
    /// Starts receiving a put: `head` is the record with its PCM left empty (checked by the
    /// caller as `PutChunk` checks every put), `pcm_len` the PCM's length in bytes.
    pub fn incoming(self: &Arc<Self>, head: Record, pcm_len: usize) -> Incoming {
        let (tx, rx) = mpsc::channel(QUEUED_FRAMES);
        let this = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || this.receive(head, pcm_len, rx));
        Incoming {
            tx,
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

/// Writes `fields`, then the PCM's frames as they come, to `tmp`, and syncs it once the caller
/// confirms. `Ok(false)` when the caller gave up.
fn fill(
    tmp: &mut TmpFile,
    fields: Bytes,
    pcm_len: usize,
    rx: &mut mpsc::Receiver<Piece>,
) -> std::io::Result<bool> {
    let mut batch: Vec<Bytes> = Vec::with_capacity(QUEUED_FRAMES + 1);
    batch.push(fields);
    let mut written = 0usize;
    loop {
        // Whatever is queued goes in one vectored write.
        let mut end = None;
        let mut next = rx.blocking_recv();
        loop {
            match next {
                Some(Piece::Pcm(b)) => {
                    written = written.saturating_add(b.len());
                    batch.push(b);
                }
                Some(Piece::End(ok)) => end = Some(ok),
                None => end = Some(false),
            }
            if end.is_some() || batch.len() > QUEUED_FRAMES {
                break;
            }
            match rx.try_recv() {
                Ok(piece) => next = Some(piece),
                Err(_) => break,
            }
        }
        if end == Some(false) {
            return Ok(false);
        }
        if written > pcm_len {
            return Err(std::io::Error::other(format!(
                "received {written} bytes of PCM for a field of {pcm_len}"
            )));
        }
        tmp.write_all(&batch)?;
        batch.clear();
        if end == Some(true) {
            if written != pcm_len {
                return Err(std::io::Error::other(format!(
                    "confirmed after {written} bytes of PCM for a field of {pcm_len}"
                )));
            }
            tmp.sync()?;
            return Ok(true);
        }
    }
}

impl Incoming {
    /// Hands the writer the PCM's next bytes, waiting while it is [`QUEUED_FRAMES`] behind.
    /// `false` once the writer has stopped early (a full spool or disk, an I/O error): its
    /// error waits in [`Incoming::finish`].
    pub async fn pcm(&self, bytes: Bytes) -> bool {
        self.tx.send(Piece::Pcm(bytes)).await.is_ok()
    }

    /// Ends the put: commits it when `whole` (every byte of the PCM was handed over and its
    /// CRC32C checked), else deletes its file. Returns once the record is durable, as
    /// [`Spool::commit`] does; `Ok(None)` when nothing was committed.
    pub async fn finish(self, whole: bool) -> Result<Option<Committed>, SpoolError> {
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
