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

/// A spooled chunk made ready to upload: its body, and the body's SHA-256 (which SigV4 signs)
/// and CRC32C (which the store verifies), computed once here rather than by the SDK's signer
/// on every attempt.
///
/// Why: the signer hashes with the pure-Rust `sha2`, on the async runtime, once per attempt.
/// On a CPU without SHA extensions that is about 177 MB/s (11 ms of a runtime thread per
/// 1.92 MB chunk); aws-lc's assembly, already linked for TLS, does about 331 MB/s. `new`
/// hashes (and seals) the whole body: call it on the blocking pool.
#[derive(Debug)]
pub struct Upload {
    pub spooled: Spooled,
    form: Form,
    /// The object's body, or why none could be made.
    body: Result<Bytes, String>,
    /// Lowercase hex SHA-256 of the body, as `x-amz-content-sha256` carries it, and its CRC32C.
    digests: Option<(String, u32)>,
}

impl Upload {
    /// `sealer`: the uploader's `--omi-secret-file`, for Omi-layout chunks.
    pub fn new(spooled: Spooled, sealer: Option<&Arc<Sealer>>) -> Self {
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
        let digests = body.as_ref().ok().map(|body| {
            let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
            // WAV and raw bodies: the CRC32C ingest computed as the audio arrived (checked
            // when the record was read), not a second pass over it.
            let crc = match &form {
                Form::Wav { header } => combine(
                    crc32c(body.get(..*header).unwrap_or_default()),
                    record.crc32c,
                    record.pcm.len(),
                ),
                Form::Raw => record.crc32c,
                Form::Sealed(_) => crc32c(body),
            };
            (hex::encode(sha), crc)
        });
        Self {
            spooled,
            form,
            body,
            digests,
        }
    }

    /// The object's body, or why there is none.
    pub fn body(&self) -> Result<&Bytes, &str> {
        self.body.as_ref().map_err(String::as_str)
    }

    /// The body's SHA-256 (hex) and CRC32C.
    pub fn body_digests(&self) -> Option<(&str, u32)> {
        self.digests.as_ref().map(|(sha, crc)| (sha.as_str(), *crc))
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
        let up = Upload::new(omi_record(), None);
        assert_eq!(up.body().unwrap().as_ref(), &[1, 0, 2, 0, 3, 0]);
        assert_eq!(up.content_type(), "application/octet-stream");
        let (_, crc) = up.body_digests().unwrap();
        assert_eq!(crc, crc32c(&[1, 0, 2, 0, 3, 0]));
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
        let up = Upload::new(omi_record(), Some(&sealer));
        let body = up.body().unwrap().clone();
        assert_ne!(body.as_ref(), &[1, 0, 2, 0, 3, 0]);
        assert_eq!(sealer.open("alice", &body).unwrap(), [1, 0, 2, 0, 3, 0]);
        // Sealed again (a retry): other bytes, the same audio.
        let again = Upload::new(omi_record(), Some(&sealer));
        assert_ne!(again.body().unwrap(), &body);
        assert_eq!(
            up.pcm_of(again.body().unwrap()).unwrap().as_ref(),
            &[1, 0, 2, 0, 3, 0]
        );
        let (_, crc) = up.body_digests().unwrap();
        assert_eq!(crc, crc32c(&body));
        let mut bob = omi_record();
        bob.record.uid = "bob".into();
        assert_eq!(Upload::new(bob, Some(&sealer)).pcm_of(&body), None);
    }
}
