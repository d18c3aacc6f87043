//! The object store: S3 or any S3-compatible server, through aws-sdk-s3.

use std::time::Duration;

use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use base64::Engine as _;

use crate::config::Config;
use crate::spool::Spooled;

/// A bucket on an S3-compatible store.
#[derive(Debug, Clone)]
pub struct Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// Start-up problems with the bucket.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket {bucket:?} does not exist at {endpoint}; create it or pass --create-bucket")]
    Missing { bucket: String, endpoint: String },
    #[error("creating bucket {bucket:?} failed: {message}")]
    Create { bucket: String, message: String },
}

/// A spooled chunk made ready to upload: the SHA-256 of its WAV body, which SigV4 signs, is
/// computed once here rather than by the SDK's signer on every attempt.
///
/// Why: the signer hashes with the pure-Rust `sha2`, on the async runtime, once per attempt.
/// On a CPU without SHA extensions that is about 177 MB/s (11 ms of a runtime thread per
/// 1.92 MB chunk); aws-lc's assembly, already linked for TLS, does about 331 MB/s. `new`
/// hashes the whole body: call it on the blocking pool.
#[derive(Debug)]
pub struct Upload {
    pub spooled: Spooled,
    /// Lowercase hex SHA-256 of `spooled.wav`, as `x-amz-content-sha256` carries it.
    body_sha256: Option<String>,
}

impl Upload {
    pub fn new(spooled: Spooled) -> Self {
        let body_sha256 = spooled
            .wav
            .as_ref()
            .map(|body| hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body)));
        Self {
            spooled,
            body_sha256,
        }
    }
}

/// Hands the SigV4 signer the body hash [`Upload::new`] computed, in place of its own pass
/// over the body. The store checks the hash against the bytes it receives, so a wrong one
/// fails the upload (retried); it can never get a body stored that is not the one hashed.
#[derive(Debug)]
struct PrecomputedBodySha256(String);

impl Intercept for PrecomputedBodySha256 {
    fn name(&self) -> &'static str {
        "PrecomputedBodySha256"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// A failed upload attempt (always retried; the chunk stays spooled).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UploadError(pub String);

impl Store {
    /// Builds a client: path-style addressing, credentials from the standard AWS chain unless
    /// the config carries static ones. The SDK makes one attempt per call; Spillway's drain
    /// owns retries, backoff and the breaker.
    pub async fn new(config: &Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(config.upload_timeout)
                    .build(),
            );
        if let Some(c) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                None,
                None,
                "spillway-static",
            ));
        }
        let shared = loader.load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared).force_path_style(true);
        if let Some(endpoint) = &config.s3_endpoint {
            s3 = s3.endpoint_url(endpoint.clone());
        }
        Self {
            client: aws_sdk_s3::Client::from_conf(s3.build()),
            bucket: config.bucket.clone(),
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Checks the bucket at start. A bucket that is certainly missing is an error (or is
    /// created); a store that cannot be reached is only a warning: its failures must not stop
    /// the pipeline, which spools meanwhile.
    pub async fn check_bucket(&self, create: bool, endpoint: &str) -> Result<(), BucketError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => {
                if !create {
                    return Err(BucketError::Missing {
                        bucket: self.bucket.clone(),
                        endpoint: endpoint.to_owned(),
                    });
                }
                self.client
                    .create_bucket()
                    .bucket(&self.bucket)
                    .send()
                    .await
                    .map_err(|e| BucketError::Create {
                        bucket: self.bucket.clone(),
                        message: DisplayErrorContext(&e).to_string(),
                    })?;
                tracing::info!(bucket = %self.bucket, "created bucket");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(bucket = %self.bucket, error = %DisplayErrorContext(&e),
                    "object store not reachable at start; chunks will be spooled until it is");
                Ok(())
            }
        }
    }

    /// Uploads one chunk as a WAV object at `key`, with a CRC32C of the whole body that the
    /// store verifies, and metadata describing the audio.
    ///
    /// A piece that stops short of its chunk's end (a session's last, or one flushed on idle or
    /// shutdown) may meet a longer piece of the same chunk that another uploader took (ingest
    /// retried it elsewhere after a lost ack, then the device resent the whole chunk). The
    /// longer piece holds every sample of the shorter one, so the shorter is uploaded only when
    /// the store holds no object at `key` at least as long: it never overwrites audio.
    pub async fn put(&self, key: &str, upload: &Upload) -> Result<Put, UploadError> {
        let record = &upload.spooled.record;
        let (Some(body), Some(sha256)) = (upload.spooled.wav.clone(), &upload.body_sha256) else {
            let why = crate::object::wav_header(record.pcm.len(), record.sample_rate)
                .err()
                .map_or_else(|| "no body".to_owned(), |e| e.to_string());
            return Err(UploadError(format!("building WAV: {why}")));
        };
        if record.stops_short() {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(head) => {
                    let stored = head.content_length().unwrap_or(0);
                    if u64::try_from(stored).is_ok_and(|n| n >= body.len() as u64) {
                        return Ok(Put::AlreadyLonger);
                    }
                }
                Err(SdkError::ServiceError(e)) if e.err().is_not_found() => {}
                Err(e) => return Err(UploadError(DisplayErrorContext(&e).to_string())),
            }
        }
        // The body's CRC32C from the header's and the PCM's as ingest computed it (checked when
        // the record was read): no second pass over the audio, and the store verifies the bytes
        // against the checksum made where they entered the pipeline.
        let header = body.len().saturating_sub(record.pcm.len());
        let crc = spillway_proto::checksum::combine(
            spillway_proto::checksum::crc32c(&body[..header]),
            record.crc32c,
            record.pcm.len(),
        );
        let checksum = base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes());
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("audio/wav")
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .checksum_crc32_c(checksum)
            .metadata("sample-rate", record.sample_rate.to_string())
            .metadata("first-sample", record.first_sample.to_string())
            .metadata("pcm-crc32c", format!("{:08x}", record.crc32c))
            .body(ByteStream::from(body))
            .customize()
            .interceptor(PrecomputedBodySha256(sha256.clone()))
            .send()
            .await
            .map_err(|e| UploadError(DisplayErrorContext(&e).to_string()))?;
        Ok(Put::Stored)
    }
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The object was written.
    Stored,
    /// The store already held a piece of this chunk at least as long (see [`Store::put`]).
    AlreadyLonger,
}
