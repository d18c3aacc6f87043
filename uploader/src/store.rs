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
use crate::transport::BodySigning;
pub use crate::upload::Upload;

/// A bucket on an S3-compatible store.
#[derive(Debug, Clone)]
pub struct Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// What each `PutObject`'s signature covers of its body (see [`crate::transport`]).
    signing: BodySigning,
}

/// Start-up problems with the bucket.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket {bucket:?} does not exist at {endpoint}; create it or pass --create-bucket")]
    Missing { bucket: String, endpoint: String },
    #[error("creating bucket {bucket:?} failed: {message}")]
    Create { bucket: String, message: String },
}

/// Tells the SigV4 signer what to sign for the body, in place of its own SHA-256 pass over it:
/// the hash [`Upload::new`] computed (`Precomputed`; the store checks it against the bytes it
/// receives, so a wrong one fails the upload, retried, and never gets a body stored that is
/// not the one hashed), or `UNSIGNED-PAYLOAD` over HTTPS.
#[derive(Debug)]
struct SignBodyAs(PayloadSigningOverride);

impl Intercept for SignBodyAs {
    fn name(&self) -> &'static str {
        "SignBodyAs"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        cfg.interceptor_state().store_put(self.0.clone());
        Ok(())
    }
}

/// A failed upload attempt (always retried; the chunk stays spooled).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UploadError(pub String);

impl Store {
    /// Builds a client: path-style addressing, credentials from the standard AWS chain unless
    /// the config carries static ones, HTTPS checked against `--s3-ca-file` when given (the
    /// system's roots otherwise). The SDK makes one attempt per call; Spillway's drain owns
    /// retries, backoff and the breaker.
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
        // On the S3 client alone: credential providers (STS, instance metadata) keep the
        // system's roots.
        if let Some(ca) = &config.s3_ca {
            s3 = s3.http_client(ca.http_client());
        }
        let signing = config
            .s3_payload_signing
            .for_endpoint(config.s3_endpoint.as_deref());
        tracing::info!(endpoint = config.s3_endpoint.as_deref().unwrap_or("AWS S3"),
            body_signing = ?signing, private_ca = config.s3_ca.is_some(), "object store client");
        Self {
            client: aws_sdk_s3::Client::from_conf(s3.build()),
            bucket: config.bucket.clone(),
            signing,
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// What each upload's signature covers of its body; [`Upload::new`] hashes accordingly.
    pub fn body_signing(&self) -> BodySigning {
        self.signing
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
    /// store verifies, and metadata describing the audio. It never replaces stored audio:
    ///
    /// - the object is created only if `key` holds nothing (`If-None-Match: *`);
    /// - when `key` already holds an object, it is read back and compared byte for byte:
    ///   - the same PCM: nothing to do ([`Put::Identical`], a retry whose answer was lost);
    ///   - a longer piece that begins with this one: nothing to do ([`Put::AlreadyLonger`]);
    ///   - a shorter piece that this one extends (a device resumed after its ack was lost):
    ///     replaced only if it is still that object (`If-Match: <etag>`, [`Put::Superseded`]);
    ///   - anything else: this PCM goes to [`conflict_key`], the original stays byte for byte
    ///     ([`Put::Conflict`]).
    ///
    /// Conditional writes make the decision atomic at the store, so two uploaders racing with
    /// two pieces of one chunk can never leave the shorter one.
    pub async fn put(&self, key: &str, upload: &Upload) -> Result<Put, UploadError> {
        let record = &upload.spooled.record;
        let body = upload
            .body()
            .map_err(|why| UploadError(format!("building the object: {why}")))?
            .clone();
        // A few rounds: each ends in a decision unless the object changed between reading and
        // writing it (another uploader's piece), which is then read again.
        for _ in 0..4 {
            if self.put_if(key, upload, &body, If::Absent).await? == Written::Yes {
                return Ok(Put::Stored);
            }
            let Some(stored) = self.get(key).await? else {
                continue; // deleted meanwhile: create it again
            };
            // The audio the stored object holds; an object this form cannot read (another
            // secret's, say) is different audio.
            let Some(theirs) = upload.pcm_of(&stored.body) else {
                return self.put_conflict(key, upload, &body, &stored.body).await;
            };
            let theirs = &theirs[..];
            let ours = &record.pcm[..];
            let outcome = if theirs == ours {
                Put::Identical
            } else if theirs.len() > ours.len() && theirs.starts_with(ours) {
                Put::AlreadyLonger
            } else if ours.len() > theirs.len() && ours.starts_with(theirs) {
                let Some(etag) = stored.etag else {
                    return Err(UploadError(format!("the store gave no ETag for {key}")));
                };
                match self.put_if(key, upload, &body, If::Etag(etag)).await? {
                    Written::Yes => Put::Superseded,
                    Written::No => continue,
                }
            } else {
                return self.put_conflict(key, upload, &body, theirs).await;
            };
            return Ok(outcome);
        }
        Err(UploadError(format!(
            "{key} changed under every conditional write; trying again later"
        )))
    }

    /// Stores `upload`'s bytes beside the object they differ from, at [`conflict_key`].
    async fn put_conflict(
        &self,
        key: &str,
        upload: &Upload,
        body: &bytes::Bytes,
        theirs: &[u8],
    ) -> Result<Put, UploadError> {
        let record = &upload.spooled.record;
        let stored_crc = spillway_proto::checksum::crc32c(theirs);
        let aside = conflict_key(key, record.crc32c);
        if self.put_if(&aside, upload, body, If::Absent).await? == Written::No {
            // Already set aside by an earlier attempt, or a copy with the same CRC32C.
            match self.get(&aside).await? {
                Some(o)
                    if upload
                        .pcm_of(&o.body)
                        .is_some_and(|p| p.ends_with(&record.pcm)) => {}
                _ => {
                    tracing::error!(%key, %aside, "a different copy with the same CRC32C is already set aside; this one is not stored")
                }
            }
        }
        Ok(Put::Conflict {
            aside,
            stored_crc,
            new_crc: record.crc32c,
        })
    }

    /// One `PutObject` of `body` at `key` under a precondition; `Written::No` when the store
    /// refused it for the precondition (412, or 409 for a conditional write racing another).
    async fn put_if(
        &self,
        key: &str,
        upload: &Upload,
        body: &bytes::Bytes,
        condition: If,
    ) -> Result<Written, UploadError> {
        let Some(crc) = upload.body_crc32c() else {
            return Err(UploadError("no body to upload".to_owned()));
        };
        let sign_body_as = match (self.signing, upload.body_sha256()) {
            (BodySigning::Unsigned, _) => PayloadSigningOverride::UnsignedPayload,
            (BodySigning::Sha256, Some(sha256)) => {
                PayloadSigningOverride::Precomputed(sha256.to_owned())
            }
            (BodySigning::Sha256, None) => {
                return Err(UploadError("no body hash to sign".to_owned()));
            }
        };
        // The body's CRC32C, which the store verifies: for a WAV or raw body made from the
        // header's and the PCM's as ingest computed it (checked when the record was read), with
        // no second pass over the audio.
        let checksum = base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes());
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(upload.content_type())
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .checksum_crc32_c(checksum);
        for (name, value) in upload.metadata() {
            request = request.metadata(name, value);
        }
        let request = request.body(ByteStream::from(body.clone()));
        let request = match condition {
            If::Absent => request.if_none_match("*"),
            If::Etag(etag) => request.if_match(etag),
        };
        match request
            .customize()
            .interceptor(SignBodyAs(sign_body_as))
            .send()
            .await
        {
            Ok(_) => Ok(Written::Yes),
            Err(SdkError::ServiceError(e)) if matches!(e.raw().status().as_u16(), 409 | 412) => {
                Ok(Written::No)
            }
            Err(e) => Err(UploadError(DisplayErrorContext(&e).to_string())),
        }
    }

    /// The object at `key` with its ETag, `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Stored>, UploadError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => return Ok(None),
            Err(e) => return Err(UploadError(DisplayErrorContext(&e).to_string())),
        };
        let etag = out.e_tag().map(str::to_owned);
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| UploadError(format!("reading {key} back: {e}")))?
            .into_bytes();
        Ok(Some(Stored { body, etag }))
    }
}

/// Where a chunk's PCM goes when its key already holds different audio: beside the original,
/// named by the new PCM's CRC32C, e.g. `alice/walk-1/000002.wav.conflict-1a2b3c4d`.
pub fn conflict_key(key: &str, crc32c: u32) -> String {
    format!("{key}.conflict-{crc32c:08x}")
}

/// The precondition of a write.
#[derive(Debug)]
enum If {
    /// `If-None-Match: *`: only if the key holds nothing.
    Absent,
    /// `If-Match`: only if the key still holds the object with this ETag.
    Etag(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    No,
}

/// An object read back.
#[derive(Debug)]
struct Stored {
    body: bytes::Bytes,
    etag: Option<String>,
}

/// What an upload did (see [`Store::put`]). Every variant leaves the chunk's audio in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// The object was created.
    Stored,
    /// The store already held exactly these bytes (an earlier attempt's answer was lost).
    Identical,
    /// The store already held a longer piece of this chunk that begins with these bytes.
    AlreadyLonger,
    /// The store held a shorter piece that these bytes extend; it was replaced.
    Superseded,
    /// The store held different audio at the key; it was kept, and these bytes went to `aside`.
    Conflict {
        aside: String,
        stored_crc: u32,
        new_crc: u32,
    },
}
