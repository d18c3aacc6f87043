//! What a spooled chunk becomes as an object body, by its layout:
//!
//! - WAV (`Layout::Wav`, QUIC devices): the WAV header written in front of the PCM, in the
//!   buffer the record was read into (no copy of the audio);
//! - Omi (`Layout::Omi`, the WebSocket front end): the raw PCM, as Omi's pusher stores it, with
//!   its version-2 metadata (`v2_start`, `v2_samples`, `v2_sample_rate`); sealed with Omi's
//!   encryption at rest ([`crate::seal`]) when the uploader has `--omi-secret-file`.
//!
//! Each form also reads its own bodies back ([`Upload::pcm_of`]): the store compares the audio
//! an object holds, never its bytes, so a sealed body (a fresh nonce on every seal) that holds
//! the same PCM is the same chunk, and the no-overwrite rule holds for every layout.

use std::sync::Arc;

use bytes::Bytes;
use spillway_proto::checksum::{combine, crc32c};
use spillway_proto::uploader::Layout;

use crate::seal::Sealer;
use crate::spool::Spooled;
use crate::transport::BodySigning;

/// How the body is made from the PCM.
#[derive(Debug)]
enum Form {
    /// A header of this many bytes, then the PCM.
    Wav {
        header: usize,
    },
    Raw,
    Sealed(Arc<Sealer>),
}

/// A spooled chunk made ready to upload: its body, the body's CRC32C (which the store
/// verifies, on every transport) and, only when SigV4 signs the body
/// ([`BodySigning::Sha256`], plain HTTP), its SHA-256, computed once here rather than by the
/// SDK's signer on every attempt. Over HTTPS the body is sent `UNSIGNED-PAYLOAD` and never
/// hashed with SHA-256 (see [`crate::transport`]).
///
/// Why precompute: the signer hashes with the pure-Rust `sha2`, on the async runtime, once per
/// attempt. On a CPU without SHA extensions that is about 177 MB/s (11 ms of a runtime thread
/// per 1.92 MB chunk); aws-lc's assembly, already linked for TLS, does about 331 MB/s. `new`
/// seals and (when signing) hashes the whole body: call it on the blocking pool.
#[derive(Debug)]
pub struct Upload {
    pub spooled: Spooled,
    form: Form,
    /// The object's body, or why none could be made.
    body: Result<Bytes, String>,
    /// The body's CRC32C, when there is a body.
    crc32c: Option<u32>,
    /// Lowercase hex SHA-256 of the body, as `x-amz-content-sha256` carries it: only for
    /// [`BodySigning::Sha256`].
    sha256: Option<String>,
}

impl Upload {
    /// `sealer`: the uploader's `--omi-secret-file`, for Omi-layout chunks; `signing`: what the
    /// store's requests sign (the SHA-256 is computed for [`BodySigning::Sha256`] only).
    pub fn new(spooled: Spooled, sealer: Option<&Arc<Sealer>>, signing: BodySigning) -> Self {
        let record = &spooled.record;
        let (form, body) = match record.layout() {
            Layout::Wav => match &spooled.wav {
                Some(wav) => (
                    Form::Wav {
                        header: wav.len().saturating_sub(record.pcm.len()),
                    },
                    Ok(wav.clone()),
                ),
                None => {
                    let why = crate::object::wav_header(record.pcm.len(), record.sample_rate)
                        .err()
                        .map_or_else(|| "no WAV body".to_owned(), |e| e.to_string());
                    (Form::Wav { header: 0 }, Err(why))
                }
            },
            Layout::Omi => match sealer {
                None => (Form::Raw, Ok(record.pcm.clone())),
                Some(sealer) => (
                    Form::Sealed(Arc::clone(sealer)),
                    sealer
                        .seal(&record.uid, &record.pcm)
                        .map(Bytes::from)
                        .map_err(|e| e.to_string()),
                ),
            },
        };
        // WAV and raw bodies: the CRC32C ingest computed as the audio arrived (checked when
        // the record was read), not a second pass over it.
        let crc = body.as_ref().ok().map(|body| match &form {
            Form::Wav { header } => combine(
                crc32c(body.get(..*header).unwrap_or_default()),
                record.crc32c,
                record.pcm.len(),
            ),
            Form::Raw => record.crc32c,
            Form::Sealed(_) => crc32c(body),
        });
        let sha256 = match signing {
            BodySigning::Sha256 => body.as_ref().ok().map(|body| {
                hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body))
            }),
            BodySigning::Unsigned => None,
        };
        Self {
            spooled,
            form,
            body,
            crc32c: crc,
            sha256,
        }
    }

    /// The object's body, or why there is none.
    pub fn body(&self) -> Result<&Bytes, &str> {
        self.body.as_ref().map_err(String::as_str)
    }

    /// The body's CRC32C; `None` when there is no body.
    pub fn body_crc32c(&self) -> Option<u32> {
        self.crc32c
    }

    /// The body's SHA-256 (lowercase hex); `None` when there is no body, or when it was made
    /// for [`BodySigning::Unsigned`], which never hashes it.
    pub fn body_sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    pub fn content_type(&self) -> &'static str {
        match self.form {
            Form::Wav { .. } => "audio/wav",
            Form::Raw | Form::Sealed(_) => "application/octet-stream",
        }
    }

    /// The object's user metadata.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let r = &self.spooled.record;
        let crc = ("pcm-crc32c", format!("{:08x}", r.crc32c));
        match self.form {
            Form::Wav { .. } => vec![
                ("sample-rate", r.sample_rate.to_string()),
                ("first-sample", r.first_sample.to_string()),
                crc,
            ],
            // Omi's version-2 metadata, as its readers expect it.
            Form::Raw | Form::Sealed(_) => vec![
                ("v2_start", r.start_time.to_string()),
                (
                    "v2_samples",
                    (r.pcm.len() / spillway_proto::BYTES_PER_SAMPLE).to_string(),
                ),
                ("v2_sample_rate", r.sample_rate.to_string()),
                crc,
            ],
        }
    }

    /// The PCM a stored body of this form holds; `None` when it is not one this form can read
    /// (too short for its header, or sealed under another secret or uid).
    pub fn pcm_of(&self, stored: &Bytes) -> Option<Bytes> {
        match &self.form {
            Form::Wav { header } => (stored.len() >= *header).then(|| stored.slice(*header..)),
            Form::Raw => Some(stored.clone()),
            Form::Sealed(sealer) => sealer
                .open(&self.spooled.record.uid, stored)
                .ok()
                .map(Bytes::from),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::spool::Record;

    fn omi_record() -> Spooled {
        let pcm = Bytes::from_static(&[1, 0, 2, 0, 3, 0]);
        Spooled {
            record: Record {
                uid: "alice".into(),
                session: "conv-1".into(),
                seq: 1_786_961_845_727,
                sample_rate: 16_000,
                chunk_samples: 960_000,
                first_sample: 1_786_961_845_727 * 960_000,
                crc32c: crc32c(&pcm),
                pcm,
                layout: Layout::Omi.into(),
                start_time: 1_786_961_845.727_25,
            },
            wav: None,
        }
    }

    #[test]
    fn an_omi_chunk_is_raw_pcm_with_omis_v2_metadata() {
        let up = Upload::new(omi_record(), None, BodySigning::Unsigned);
        assert_eq!(up.body().unwrap().as_ref(), &[1, 0, 2, 0, 3, 0]);
        assert_eq!(up.content_type(), "application/octet-stream");
        assert_eq!(up.body_crc32c(), Some(crc32c(&[1, 0, 2, 0, 3, 0])));
        let meta = up.metadata();
        assert!(meta.contains(&("v2_start", "1786961845.72725".to_owned())));
        assert!(meta.contains(&("v2_samples", "3".to_owned())));
        assert!(meta.contains(&("v2_sample_rate", "16000".to_owned())));
    }

    #[test]
    fn a_sealed_omi_chunk_reads_back_as_its_pcm_and_not_under_another_uid() {
        let sealer = Arc::new(
            Sealer::from_secret(zeroize::Zeroizing::new(
                b"0123456789abcdef0123456789abcdef".to_vec(),
            ))
            .unwrap(),
        );
        let up = Upload::new(omi_record(), Some(&sealer), BodySigning::Sha256);
        let body = up.body().unwrap().clone();
        assert_ne!(body.as_ref(), &[1, 0, 2, 0, 3, 0]);
        assert_eq!(sealer.open("alice", &body).unwrap(), [1, 0, 2, 0, 3, 0]);
        // Sealed again (a retry): other bytes, the same audio.
        let again = Upload::new(omi_record(), Some(&sealer), BodySigning::Sha256);
        assert_ne!(again.body().unwrap(), &body);
        assert_eq!(
            up.pcm_of(again.body().unwrap()).unwrap().as_ref(),
            &[1, 0, 2, 0, 3, 0]
        );
        assert_eq!(up.body_crc32c(), Some(crc32c(&body)));
        let mut bob = omi_record();
        bob.record.uid = "bob".into();
        assert_eq!(
            Upload::new(bob, Some(&sealer), BodySigning::Sha256).pcm_of(&body),
            None
        );
    }

    fn wav_record() -> Spooled {
        let pcm = Bytes::from_static(&[9, 0, 8, 0, 7, 0, 6, 0]);
        let mut wav = crate::object::wav_header(pcm.len(), 16_000).unwrap();
        wav.extend_from_slice(&pcm);
        Spooled {
            record: Record {
                uid: "alice".into(),
                session: "walk-1".into(),
                seq: 0,
                sample_rate: 16_000,
                chunk_samples: 960_000,
                first_sample: 0,
                crc32c: crc32c(&pcm),
                pcm,
                ..Default::default()
            },
            wav: Some(Bytes::from(wav)),
        }
    }

    #[test]
    fn the_sha256_is_computed_only_when_the_body_is_signed() {
        let signed = Upload::new(wav_record(), None, BodySigning::Sha256);
        let body = signed.body().unwrap().clone();
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
        assert_eq!(signed.body_sha256(), Some(hex::encode(sha).as_str()));
        let unsigned = Upload::new(wav_record(), None, BodySigning::Unsigned);
        assert_eq!(unsigned.body_sha256(), None, "no SHA-256 over HTTPS");
        assert_eq!(unsigned.body().unwrap(), &body, "the same body either way");
        // Either way the CRC32C the store verifies is the whole body's, made without a pass
        // over the audio.
        assert_eq!(signed.body_crc32c(), Some(crc32c(&body)));
        assert_eq!(unsigned.body_crc32c(), Some(crc32c(&body)));
    }
}
