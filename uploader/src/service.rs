//! The gRPC `Uploader` service: validates each chunk, commits it to the spool, and answers only
//! once it is flushed to disk.

use std::sync::Arc;

use spillway_proto::uploader::uploader_server::Uploader;
use spillway_proto::uploader::{Layout, PutChunkRequest, PutChunkResponse};
use spillway_proto::{BYTES_PER_SAMPLE, validate};
use tonic::{Request, Response, Status};

use crate::metrics::{Metrics, ResultLabel};
use crate::object::KeyTemplate;
use crate::spool::{Committed, Record, Spool, SpoolError};

pub struct Service {
    pub spool: Arc<Spool>,
    pub template: KeyTemplate,
    pub prefix: String,
    pub max_chunk_seconds: u32,
    pub metrics: Metrics,
    /// Omi-layout chunks are stored encrypted (`--omi-secret-file`): their keys end `.batch.enc`.
    pub omi_sealed: bool,
}

/// A refused put: the metric label and the status returned.
fn refuse(reason: &'static str, status: Status) -> (&'static str, Status) {
    (reason, status)
}

impl Service {
    fn check(&self, req: PutChunkRequest) -> Result<Record, (&'static str, Status)> {
        let id = req.id.ok_or_else(|| {
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
        if req.pcm.is_empty() || !req.pcm.len().is_multiple_of(BYTES_PER_SAMPLE) {
            return Err(refuse(
                "odd_byte_count",
                Status::invalid_argument(format!(
                    "pcm holds {} bytes; it must be a non-zero whole number of 2-byte samples",
                    req.pcm.len()
                )),
            ));
        }
        let samples = (req.pcm.len() / BYTES_PER_SAMPLE) as u64;
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
        let actual = spillway_proto::checksum::crc32c(&req.pcm);
        if actual != req.crc32c {
            return Err(refuse(
                "checksum_mismatch",
                Status::data_loss(format!(
                    "crc32c of pcm is {actual:08x}, request says {:08x}",
                    req.crc32c
                )),
            ));
        }
        Ok(Record {
            uid: id.uid,
            session: id.session,
            seq: id.seq,
            sample_rate: req.sample_rate,
            chunk_samples: req.chunk_samples,
            first_sample: req.first_sample,
            crc32c: req.crc32c,
            pcm: req.pcm,
            layout: req.layout,
            start_time: if layout == Layout::Omi {
                req.start_time
            } else {
                0.0
            },
        })
    }
}

#[tonic::async_trait]
impl Uploader for Service {
    async fn put_chunk(
        &self,
        request: Request<PutChunkRequest>,
    ) -> Result<Response<PutChunkResponse>, Status> {
        let record = self
            .check(request.into_inner())
            .map_err(|(reason, status)| {
                self.metrics.rejected(reason);
                tracing::warn!(reason, message = status.message(), "PutChunk refused");
                status
            })?;
        let key = self
            .template
            .key_for(&self.prefix, &record, self.omi_sealed);
        // Checked against the PCM above; every outcome below commits exactly these samples.
        let crc32c = record.crc32c;
        let started = std::time::Instant::now();
        let outcome = self.spool.commit(&record).await.map_err(|e| {
            let (reason, status) = match &e {
                SpoolError::Full { .. } | SpoolError::TooManyChunks { .. } => {
                    ("spool_full", Status::resource_exhausted(e.to_string()))
                }
                SpoolError::DiskFull { .. } => {
                    ("disk_full", Status::resource_exhausted(e.to_string()))
                }
                SpoolError::Conflict { .. } => ("conflict", Status::already_exists(e.to_string())),
                SpoolError::Storage(_)
                | SpoolError::Io(_)
                | SpoolError::Task(_)
                | SpoolError::InUse(_)
                | SpoolError::NewerFormat { .. }
                | SpoolError::UnknownFormat { .. } => {
                    ("storage", Status::unavailable(e.to_string()))
                }
            };
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
        Ok(Response::new(PutChunkResponse {
            key,
            newly_stored: outcome != Committed::Duplicate,
            crc32c,
        }))
    }
}

/// Counts and logs the refusals tonic makes before [`Service`] sees a request: a message over
/// the size limit is answered `OUT_OF_RANGE` by tonic's decoder, which the service itself never
/// returns. Without this layer those refusals would be invisible.
pub fn count_transport_refusals<B>(
    metrics: Metrics,
) -> impl Fn(tonic::codegen::http::Response<B>) -> tonic::codegen::http::Response<B> + Clone {
    move |response| {
        let out_of_range = response
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"11");
        if out_of_range {
            metrics.rejected("message_too_large");
            let message = response
                .headers()
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::warn!(reason = "message_too_large", message, "PutChunk refused");
        }
        response
    }
}
