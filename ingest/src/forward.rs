//! Hands chunks to the uploader over gRPC, retrying transient failures with jittered backoff
//! until the uploader commits the chunk or the session gives up (shutdown grace ran out).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use spillway_proto::uploader::uploader_client::UploaderClient;
use spillway_proto::uploader::{ChunkId, PutChunkRequest, PutChunkResponse};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::chunker::Chunk;
use crate::metrics::Metrics;
use crate::session::Params;

/// Why a chunk could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The uploader refused the chunk for good (a bug or a version mismatch, never load).
    #[error("uploader refused the chunk: {0}")]
    Refused(tonic::Status),
    /// The session stopped waiting (shutdown grace ran out).
    #[error("gave up waiting for the uploader")]
    Abandoned,
}

/// A cheap-to-clone handle on the uploader.
#[derive(Clone, Debug)]
pub struct Forwarder {
    client: UploaderClient<Channel>,
    attempt_timeout: Duration,
    metrics: Metrics,
}

/// Codes worth retrying: the uploader is away, full or slow. Anything else is a refusal.
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        status.code(),
        Unavailable
            | ResourceExhausted
            | DeadlineExceeded
            | Aborted
            | Unknown
            | Internal
            | Cancelled
    )
}

impl Forwarder {
    /// Connects lazily: ingest starts even when the uploader is not up yet.
    pub fn new(
        url: &str,
        chunk_seconds: u32,
        attempt_timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        // The largest chunk is chunk_seconds at the highest sample rate; leave room for the
        // envelope.
        let limit = spillway_proto::validate::max_chunk_bytes(chunk_seconds) + 64 * 1024;
        let client = UploaderClient::new(channel)
            .max_encoding_message_size(limit)
            .max_decoding_message_size(limit);
        Ok(Self {
            client,
            attempt_timeout,
            metrics,
        })
    }

    /// Puts one chunk, retrying until it is committed, refused, or `give_up` fires.
    pub async fn put(
        &self,
        params: &Params,
        chunk: &Chunk,
        give_up: &CancellationToken,
    ) -> Result<PutChunkResponse, ForwardError> {
        let request = PutChunkRequest {
            id: Some(ChunkId {
                uid: params.uid.clone(),
                session: params.session.clone(),
                seq: chunk.seq,
            }),
            sample_rate: params.sample_rate,
            chunk_samples: params.chunk_samples,
            first_sample: chunk.first_sample,
            crc32c: crc32c::crc32c(&chunk.pcm),
            pcm: chunk.pcm.clone(),
        };
        let attempt = || {
            let mut client = self.client.clone();
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(self.attempt_timeout);
            async move { client.put_chunk(req).await.map(tonic::Response::into_inner) }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let retrying = attempt
            .retry(backoff)
            .when(transient)
            .notify(|status, delay| {
                self.metrics.forward_retries.inc();
                tracing::warn!(uid = %params.uid, session = %params.session, seq = chunk.seq,
                code = ?status.code(), message = status.message(), retry_in = ?delay,
                "PutChunk failed; retrying");
            });
        tokio::select! {
            r = retrying => r.map_err(ForwardError::Refused),
            () = give_up.cancelled() => Err(ForwardError::Abandoned),
        }
    }
}
