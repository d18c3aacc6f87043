//! The gRPC `Uploader` service: validates each chunk, commits it to the spool, and answers only
//! once it is flushed to disk.
//!
//! `PutChunk` is served by hand (`http.rs`) rather than by tonic's generated server, whose
//! decoder gathers each 1.92–5.76 MB message into one buffer before anything sees it: the
//! request body is decoded as it arrives (`decode.rs`), and when the PCM is the message's last
//! field, as ingest sends it, its bytes go to the record's file frame by frame
//! ([`crate::spool::Incoming`]), checked against the CRC32C as they pass. A call in flight then
//! holds a few frames, not a chunk. A message in any other field order (tonic's generated
//! client puts the PCM before the CRC32C) is gathered and committed whole, as before. Both paths
//! apply the same checks in the same order and answer the same statuses.

use std::sync::Arc;

use bytes::Bytes;
use spillway_proto::uploader::{Layout, PutChunkRequest, PutChunkResponse};
use spillway_proto::{BYTES_PER_SAMPLE, validate};
use tonic::Status;

use crate::metrics::{Metrics, ResultLabel};
use crate::object::KeyTemplate;
use crate::spool::{Committed, Record, Spool, SpoolError};

pub mod decode;
mod http;

pub use http::Server;

/// The HTTP/2 receive window of each `PutChunk` stream: what a caller may send ahead of the
/// spool's writer. With the writer's batches ([`crate::spool::HELD_BYTES`]) it bounds a
/// streamed call's memory: [`STREAMED_CALL_BYTES`]. 1 MiB is a few round trips per chunk on a
/// LAN (the 8 MiB ingest's own windows keep were for the gathered message).
pub const PUT_STREAM_WINDOW: u32 = 1 << 20;

/// The largest HTTP/2 frame the uploader accepts (`SETTINGS_MAX_FRAME_SIZE`): a chunk arrives in
/// 128 KiB frames rather than HTTP/2's default 16 KiB, eight times fewer to parse and hand on.
pub const MAX_FRAME: u32 = 128 * 1024;

/// The most a streamed call in flight holds: its stream's window and the writer's batches.
pub const STREAMED_CALL_BYTES: u64 = PUT_STREAM_WINDOW as u64 + crate::spool::HELD_BYTES as u64;

pub struct Service {
    pub spool: Arc<Spool>,
    pub template: KeyTemplate,
    pub prefix: String,
    pub max_chunk_seconds: u32,
    pub metrics: Metrics,
    /// Omi-layout chunks are stored encrypted (`--omi-secret-file`): their keys end `.batch.enc`.
    pub omi_sealed: bool,
    /// Permits for puts gathered whole (see [`Gathered`]).
    pub gathered: Gathered,
}

/// Puts whose PCM is not their message's last field are gathered whole in memory: at most
/// [`Gathered::MAX`] at once, so such callers (not ingest, which sends the PCM last) cannot
/// hold a chunk per call in flight. One more is refused `RESOURCE_EXHAUSTED`, and counted.
#[derive(Debug)]
pub struct Gathered(Arc<tokio::sync::Semaphore>);

impl Gathered {
    pub const MAX: usize = 4;
}

impl Default for Gathered {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(Self::MAX)))
    }
}

/// A refused put: the metric label and the status returned.
type Refusal = (&'static str, Status);

fn refuse(reason: &'static str, status: Status) -> Refusal {
    (reason, status)
}

impl Service {
    /// The largest `PutChunk` message this uploader takes: its longest chunk, and room for the
    /// other fields.
    pub fn max_message(&self) -> usize {
        validate::max_chunk_bytes(self.max_chunk_seconds) + 64 * 1024
    }

    /// Every rule but the checksum, for a put of these fields and a PCM of `pcm_len` bytes:
    /// the record to commit, its PCM left empty.
    fn check_fields(&self, req: &PutChunkRequest, pcm_len: usize) -> Result<Record, Refusal> {
        let id = req.id.clone().ok_or_else(|| {
            refuse(
                "missing_id",
                Status::invalid_argument("chunk id is missing"),
            )
        })?;
        validate::id(&id.uid)
            .map_err(|e| refuse("invalid_uid", Status::invalid_argument(format!("uid {e}"))))?;
        validate::id(&id.session).map_err(|e| {
            refuse(
                "invalid_session",
                Status::invalid_argument(format!("session {e}")),
            )
        })?;
        validate::sample_rate(req.sample_rate).map_err(|e| {
            refuse(
                "invalid_sample_rate",
                Status::invalid_argument(e.to_string()),
            )
        })?;
        let max_chunk_samples = u64::from(self.max_chunk_seconds) * u64::from(req.sample_rate);
        if req.chunk_samples == 0 || req.chunk_samples > max_chunk_samples {
            return Err(refuse(
                "invalid_chunk_length",
                Status::invalid_argument(format!(
                    "chunk_samples {} is outside 1..={max_chunk_samples} ({} s at {} Hz)",
                    req.chunk_samples, self.max_chunk_seconds, req.sample_rate
                )),
            ));
        }
        if pcm_len == 0 || !pcm_len.is_multiple_of(BYTES_PER_SAMPLE) {
            return Err(refuse(
                "odd_byte_count",
                Status::invalid_argument(format!(
                    "pcm holds {pcm_len} bytes; it must be a non-zero whole number of 2-byte samples"
                )),
            ));
        }
        let samples = (pcm_len / BYTES_PER_SAMPLE) as u64;
        if samples > req.chunk_samples {
            return Err(refuse(
                "oversized",
                Status::invalid_argument(format!(
                    "pcm holds {samples} samples, more than chunk_samples {}",
                    req.chunk_samples
                )),
            ));
        }
        // The piece must lie inside chunk seq: [seq·N, (seq+1)·N).
        let inside = validate::inside_chunk(id.seq, req.chunk_samples, req.first_sample, samples);
        if !inside {
            return Err(refuse(
                "misaligned",
                Status::invalid_argument(format!(
                    "samples [{}, +{samples}) are not inside chunk {} of {} samples",
                    req.first_sample, id.seq, req.chunk_samples
                )),
            ));
        }
        let layout = Layout::try_from(req.layout).map_err(|_| {
            refuse(
                "invalid_layout",
                Status::invalid_argument(format!(
                    "layout {} is not one this uploader knows",
                    req.layout
                )),
            )
        })?;
        if layout == Layout::Omi {
            validate::omi_start(id.seq, req.start_time).map_err(|e| {
                refuse(
                    "invalid_start_time",
                    Status::invalid_argument(e.to_string()),
                )
            })?;
        }
        Ok(Record {
            uid: id.uid,
            session: id.session,
            seq: id.seq,
            sample_rate: req.sample_rate,
            chunk_samples: req.chunk_samples,
            first_sample: req.first_sample,
            crc32c: req.crc32c,
            pcm: Bytes::new(),
            layout: req.layout,
            start_time: if layout == Layout::Omi {
                req.start_time
            } else {
                0.0
            },
        })
    }

    /// The last rule: the PCM's checksum, `actual`, is the one the request carries.
    fn check_crc(expected: u32, actual: u32) -> Result<(), Refusal> {
        if actual == expected {
            return Ok(());
        }
        Err(refuse(
            "checksum_mismatch",
            Status::data_loss(format!(
                "crc32c of pcm is {actual:08x}, request says {expected:08x}"
            )),
        ))
    }

    /// Counts and logs a refused put; its status.
    fn refused(&self, (reason, status): Refusal) -> Status {
        self.metrics.rejected(reason);
        tracing::warn!(reason, message = status.message(), "PutChunk refused");
        status
    }

    /// A whole request (gathered in memory): checked, committed, answered.
    pub async fn put(&self, req: PutChunkRequest) -> Result<PutChunkResponse, Status> {
        let pcm = req.pcm.clone();
        let mut record = self
            .check_fields(&req, pcm.len())
            .and_then(|r| {
                Self::check_crc(req.crc32c, spillway_proto::checksum::crc32c(&pcm)).map(|()| r)
            })
            .map_err(|r| self.refused(r))?;
        record.pcm = pcm;
        let key = self
            .template
            .key_for(&self.prefix, &record, self.omi_sealed);
        let started = std::time::Instant::now();
        let outcome = self.spool.commit(&record).await;
        self.answer(key, record.crc32c, outcome, started)
    }

    /// The answer to a put whose commit of `key` ended with `outcome`. `crc32c` is the PCM's,
    /// checked: every outcome commits exactly these samples.
    fn answer(
        &self,
        key: String,
        crc32c: u32,
        outcome: Result<Committed, SpoolError>,
        started: std::time::Instant,
    ) -> Result<PutChunkResponse, Status> {
        let outcome = outcome.map_err(|e| {
            let (reason, status) = spool_refusal(&e);
            self.metrics.rejected(reason);
            tracing::warn!(reason, %key, error = %e, "PutChunk not committed");
            status
        })?;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.spool(&self.spool);
        let result = match outcome {
            Committed::Stored => "stored",
            Committed::Duplicate => "duplicate",
            Committed::Extended => "extended",
        };
        self.metrics
            .puts
            .get_or_create(&ResultLabel { result })
            .inc();
        tracing::debug!(%key, result, "chunk committed");
        Ok(PutChunkResponse {
            key,
            newly_stored: outcome != Committed::Duplicate,
            crc32c,
        })
    }
}

/// The metric label and status of a put the spool did not commit.
fn spool_refusal(e: &SpoolError) -> Refusal {
    match e {
        SpoolError::Full { .. } | SpoolError::TooManyChunks { .. } => {
            ("spool_full", Status::resource_exhausted(e.to_string()))
        }
        SpoolError::DiskFull { .. } => ("disk_full", Status::resource_exhausted(e.to_string())),
        SpoolError::Conflict { .. } => ("conflict", Status::already_exists(e.to_string())),
        SpoolError::Storage(_)
        | SpoolError::Io(_)
        | SpoolError::Task(_)
        | SpoolError::InUse(_)
        | SpoolError::NewerFormat { .. }
        | SpoolError::UnknownFormat { .. }
        | SpoolError::UnwritableFormat { .. } => ("storage", Status::unavailable(e.to_string())),
    }
}
