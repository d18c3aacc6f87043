//! The record format and record-file I/O: [`Record`] is the protobuf of one file in
//! `records/`, written whole to a temporary file and synced before it is linked in, and read
//! back (with room in front for the WAV header) as a [`Spooled`].

use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use prost::Message;

use super::fs::{WriteFile, is_disk_full};
use super::{Spool, SpoolError};
use crate::disk::Room;
pub use spillway_proto::uploader::Layout;

/// `Record.pcm`'s field number: the last, so the PCM ends every record file.
const PCM_FIELD: u32 = 8;

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
    /// The object's `spillway.uploader.v1.Layout` (0 WAV, 1 Omi); absent, so WAV, in records
    /// spooled before the Omi front end. Written before the PCM like every other field.
    #[prost(int32, tag = "9")]
    pub layout: i32,
    /// Omi layout: Unix seconds of the first sample (`seq` is it in key milliseconds).
    #[prost(double, tag = "10")]
    pub start_time: f64,
}

impl Record {
    /// The chunk id: uid, session, seq and first sample (a piece resumed mid-chunk has its own).
    pub(super) fn index_key(&self) -> Vec<u8> {
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

    /// True when this piece ends before its chunk does (a session's last piece, or one flushed
    /// on idle or shutdown): a longer piece of the same chunk may exist.
    pub fn stops_short(&self) -> bool {
        let samples = self.pcm.len() as u64 / 2;
        self.offset().saturating_add(samples) < self.chunk_samples
    }

    /// True when the PCM still matches the checksum it was committed with.
    pub fn intact(&self) -> bool {
        spillway_proto::checksum::crc32c(&self.pcm) == self.crc32c
    }

    /// True when the record is intact and its fields obey the rules `PutChunk` enforced when it
    /// was committed (valid ids and sample rate, whole samples inside its chunk). A record file
    /// read back from disk is trusted only then: damage outside the PCM (which the CRC32C does
    /// not cover) or a stray file must be quarantined, never uploaded or panicked on.
    pub fn sound(&self) -> bool {
        let samples = (self.pcm.len() / spillway_proto::BYTES_PER_SAMPLE) as u64;
        let inside = spillway_proto::validate::inside_chunk(
            self.seq,
            self.chunk_samples,
            self.first_sample,
            samples,
        );
        spillway_proto::validate::id(&self.uid).is_ok()
            && spillway_proto::validate::id(&self.session).is_ok()
            && spillway_proto::validate::sample_rate(self.sample_rate).is_ok()
            && self.chunk_samples > 0
            && !self.pcm.is_empty()
            && self
                .pcm
                .len()
                .is_multiple_of(spillway_proto::BYTES_PER_SAMPLE)
            && inside
            && match Layout::try_from(self.layout) {
                Ok(Layout::Wav) => true,
                Ok(Layout::Omi) => {
                    spillway_proto::validate::omi_start(self.seq, self.start_time).is_ok()
                }
                Err(_) => false,
            }
            && self.intact()
    }

    /// The record's object layout; WAV for a value no uploader writes (`sound` refuses those).
    pub fn layout(&self) -> Layout {
        Layout::try_from(self.layout).unwrap_or(Layout::Wav)
    }

    /// The record file's bytes before the PCM: every other field, then the PCM's tag and
    /// length, so the PCM ends every record file and the audio is written from the request's
    /// own buffer without a copy. Fields numbered after the PCM's (9, 10) come before it here;
    /// protobuf decodes fields in any order, and a WAV record (where they are absent) is byte
    /// for byte `self.encode_to_vec()`.
    pub(super) fn file_head(&self) -> Vec<u8> {
        self.file_head_for(self.pcm.len())
    }

    /// [`Record::file_head`] for a PCM of `pcm_len` bytes that is not in `self` (it is being
    /// received: `crate::put`).
    pub(super) fn file_head_for(&self, pcm_len: usize) -> Vec<u8> {
        let head = Record {
            pcm: Bytes::new(),
            ..self.clone()
        };
        let mut fields = Vec::with_capacity(head.encoded_len() + 16);
        spillway_proto::split::encode_head(&head, PCM_FIELD, pcm_len, &mut fields);
        fields
    }
}

/// A record read back from its file for upload.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub record: Record,
    /// The record's object: the WAV header written in place in front of the PCM, in the
    /// buffer the file was read into, so the body is not a second copy of the audio. `None`
    /// when the record's parameters make no WAV (the upload then reports why).
    pub wav: Option<Bytes>,
}

impl Spooled {
    /// Decodes `buf`: [`crate::object::WAV_HEADROOM`] spare bytes, then an encoded record.
    fn decode(buf: Vec<u8>) -> Option<Self> {
        let headroom = crate::object::WAV_HEADROOM;
        let all = Bytes::from(buf);
        let mut record = Record::decode(all.slice(headroom..)).ok()?;
        let len = record.pcm.len();
        // Where the PCM lies in the buffer (prost decodes a `Bytes` field as a view of it).
        let at = (record.pcm.as_ptr() as usize).wrapping_sub(all.as_ptr() as usize);
        let Ok(header) = crate::object::wav_header(len, record.sample_rate) else {
            return Some(Self { record, wav: None });
        };
        let h = header.len();
        if len == 0 || at < h || at.saturating_add(len) > all.len() {
            // Not laid out as expected (an empty PCM is not a view): build the body by copy.
            let wav = crate::object::wav(&record.pcm, record.sample_rate).ok();
            return Some(Self {
                record,
                wav: wav.map(Bytes::from),
            });
        }
        record.pcm = Bytes::new();
        // The record held the only other view, so the buffer is ours again to write in.
        let wav = match all.try_into_mut() {
            Ok(mut buf) => {
                buf[at - h..at].copy_from_slice(&header);
                let body = buf.freeze().slice(at - h..at + len);
                record.pcm = body.slice(h..);
                body
            }
            Err(all) => {
                record.pcm = all.slice(at..at + len);
                let mut body = header;
                body.extend_from_slice(&record.pcm);
                Bytes::from(body)
            }
        };
        Some(Self {
            record,
            wav: Some(wav),
        })
    }
}

/// True when `a` and `b` are pieces of one chunk id.
fn same_id(a: &Record, b: &Record) -> bool {
    (&a.uid, &a.session, a.seq, a.first_sample) == (&b.uid, &b.session, b.seq, b.first_sample)
}

impl Spool {
    /// Writes `head` then `tail` to a new temporary file in `records/` (one vectored write
    /// where the kernel takes both) and syncs it. A write that runs out of space is
    /// [`SpoolError::DiskFull`].
    pub(super) fn write_tmp(&self, head: &[u8], tail: &[u8]) -> Result<PathBuf, SpoolError> {
        let mut tmp = self.create_tmp()?;
        match tmp.write_all(&[head, tail]).and_then(|()| tmp.sync()) {
            Ok(()) => Ok(tmp.path),
            Err(e) => {
                // A failed write (a full disk, an I/O error) leaves nothing behind.
                let _ = self.fs.remove_file(&tmp.path);
                Err(self.write_error(e))
            }
        }
    }

    /// A new temporary file in `records/`, `tmp-<pid>-<n>`.
    pub(super) fn create_tmp(&self) -> Result<TmpFile, SpoolError> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.records.join(format!("tmp-{}-{n}", std::process::id()));
        match self.fs.create(&path) {
            Ok(file) => Ok(TmpFile { path, file }),
            Err(e) => {
                let _ = self.fs.remove_file(&path);
                Err(self.write_error(e))
            }
        }
    }

    /// The record in the temporary file `path`, decoded (a streamed put's PCM, for the rare
    /// comparison with a different piece of its id).
    pub(super) fn read_tmp(&self, path: &Path) -> Result<Record, SpoolError> {
        let buf = self.fs.read(path, 0)?;
        Record::decode(Bytes::from(buf)).map_err(|e| {
            SpoolError::Io(std::io::Error::other(format!(
                "the temporary record {} does not decode: {e}",
                path.display()
            )))
        })
    }

    /// The error for a failed write of a record file: [`SpoolError::DiskFull`] when the disk
    /// ran out of space (ENOSPC), with the room left as read now; else [`SpoolError::Io`].
    pub(super) fn write_error(&self, e: std::io::Error) -> SpoolError {
        if !is_disk_full(&e) {
            return e.into();
        }
        let room = self.fs.room(&self.records).unwrap_or(Room {
            free_bytes: 0,
            free_inodes: None,
        });
        SpoolError::DiskFull {
            free_bytes: room.free_bytes,
            free_inodes: room.free_inodes,
        }
    }

    /// Reads and checks the record file at `pos` against its metadata. `None` when the file
    /// is gone, does not decode, is not sound or does not match `meta`.
    pub(super) fn read_record(
        &self,
        pos: u64,
        meta: &Record,
    ) -> Result<Option<Spooled>, SpoolError> {
        // One read into a buffer with room in front for the WAV header: the PCM is decoded as
        // a view of it and the object's body is laid out around it, with no copy of the audio.
        let buf = match self
            .fs
            .read(&self.record_path(pos), crate::object::WAV_HEADROOM)
        {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Spooled::decode(buf).filter(|s| {
            let r = &s.record;
            r.sound()
                && same_id(r, meta)
                && r.crc32c == meta.crc32c
                && (r.sample_rate, r.chunk_samples) == (meta.sample_rate, meta.chunk_samples)
        }))
    }
}

/// A temporary record file being written ([`Spool::create_tmp`]).
pub(super) struct TmpFile {
    pub(super) path: PathBuf,
    file: Box<dyn WriteFile>,
}

impl TmpFile {
    /// Writes every byte of `parts`, in order, in as few vectored writes as the kernel allows,
    /// retrying short writes and interrupted calls.
    pub(super) fn write_all<B: AsRef<[u8]>>(&mut self, parts: &[B]) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p.as_ref())).collect();
        let mut left = &mut slices[..];
        IoSlice::advance_slices(&mut left, 0);
        while !left.is_empty() {
            match self.file.write_vectored(left) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes the file's data durable (`fdatasync`).
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
