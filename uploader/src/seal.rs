//! Omi's "enhanced" encryption at rest: seals PCM the way Omi's backend stores it, and opens
//! what Omi stored.
//!
//! The contract (Omi's `backend/utils/encryption.py`; these bytes must stay readable by it and
//! its objects by this module, so none of it is a choice made here):
//!
//! - **Key**: per user, HKDF-SHA256 with the server secret `ENCRYPTION_SECRET` as input keying
//!   material, the uid's UTF-8 bytes as salt, `b"user-data-encryption"` as info, 32 bytes out.
//!   One secret serves every user while no two users share a key, and none is stored.
//! - **Secret**: UTF-8 text of at least 32 bytes (Omi reads it from the environment and refuses
//!   a shorter one at start). A secret that is not UTF-8 could never be Omi's, so it is refused.
//! - **Cipher**: AES-256-GCM, a fresh random 12-byte nonce per message, no associated data. A
//!   random nonce needs no counter kept anywhere; GCM's 96-bit nonce is its native size.
//! - **Frames**: stored bytes are frames, each a 4-byte big-endian length of what follows, then
//!   nonce (12) ‖ ciphertext ‖ tag (16). The length prefix lets Omi merge chunks by
//!   concatenating their bytes, with no decryption; a reader loops over the frames and
//!   concatenates their plaintexts. An empty input is no frames and opens to nothing.
//! - **Objects**: named `….batch.enc`, holding raw PCM16LE mono with no header.
//!
//! [`Sealer::open`] parses untrusted bytes: it never panics, every malformation has its own
//! [`SealError`], and it returns all the plaintext or none (one frame that fails to
//! authenticate fails the whole object). The secret lives in [`Zeroizing`] memory and each
//! derived key is wiped once aws-lc holds it.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use zeroize::Zeroizing;

/// The fewest bytes of secret Omi accepts.
pub const MIN_SECRET_LEN: usize = 32;
/// HKDF's info for every user's key.
pub const HKDF_INFO: &[u8] = b"user-data-encryption";
/// Bytes of a frame's big-endian length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of AES-GCM's authentication tag.
pub const TAG_LEN: usize = 16;
/// Fewest bytes a frame's length may declare: a nonce and a tag around an empty ciphertext.
pub const MIN_FRAME: usize = NONCE_LEN + TAG_LEN;
/// Most plaintext one frame can hold: its length prefix is a `u32`.
pub const MAX_PLAINTEXT: usize = u32::MAX as usize - MIN_FRAME;

/// Why a secret was refused, a plaintext not sealed, or stored bytes not opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the secret is {len} bytes; Omi's ENCRYPTION_SECRET must be at least {MIN_SECRET_LEN}")]
    SecretTooShort { len: usize },
    #[error("the secret is not UTF-8 text, so it cannot be Omi's ENCRYPTION_SECRET")]
    SecretNotUtf8,
    #[error("reading the secret file {}: {error}", path.display())]
    SecretRead {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the secret file {}: {error}", path.display())]
    SecretFile {
        path: PathBuf,
        error: Box<SealError>,
    },
    #[error("a plaintext of {len} bytes does not fit one frame (at most {MAX_PLAINTEXT} bytes)")]
    TooLarge { len: usize },
    #[error(
        "truncated: {left} bytes at offset {offset} where a frame's {LEN_PREFIX}-byte length should be"
    )]
    TruncatedLength { offset: usize, left: usize },
    #[error(
        "frame {index} at offset {offset} declares {len} bytes, fewer than a nonce and a tag ({MIN_FRAME})"
    )]
    FrameTooShort {
        index: usize,
        offset: usize,
        len: u32,
    },
    #[error(
        "frame {index} at offset {offset} declares {len} bytes but only {left} follow its length"
    )]
    FramePastEnd {
        index: usize,
        offset: usize,
        len: u32,
        left: usize,
    },
    #[error(
        "frame {index} at offset {offset} does not authenticate: wrong uid or secret, or the bytes were altered"
    )]
    Authentication { index: usize, offset: usize },
    #[error("the system random generator failed to make a nonce")]
    Random,
    #[error("aws-lc could not {0}")]
    Crypto(&'static str),
}

/// Seals and opens Omi's encrypted audio with one server secret, for any uid.
pub struct Sealer {
    secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Sealer {
    /// A sealer with Omi's `ENCRYPTION_SECRET`, as its bytes: UTF-8, at least 32 of them.
    pub fn from_secret(secret: Zeroizing<Vec<u8>>) -> Result<Self, SealError> {
        if std::str::from_utf8(&secret).is_err() {
            return Err(SealError::SecretNotUtf8);
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(SealError::SecretTooShort { len: secret.len() });
        }
        Ok(Self { secret })
    }

    /// A sealer with the secret in the file at `path`, less one trailing `\n` or `\r\n` (as
    /// `echo` or an editor leaves; a Kubernetes Secret mounted as a file holds exactly what
    /// was put in it). Errors name the path, never the content.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let read = |error| SealError::SecretRead {
            path: path.to_owned(),
            error,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        // Sized up front so that reading does not grow the buffer, leaving copies behind.
        let size = file.metadata().map_or(0, |m| m.len());
        let capacity = usize::try_from(size).unwrap_or(0).saturating_add(1);
        let mut secret = Zeroizing::new(Vec::with_capacity(capacity));
        file.read_to_end(&mut secret).map_err(read)?;
        let ending = if secret.ends_with(b"\r\n") {
            2
        } else {
            usize::from(secret.ends_with(b"\n"))
        };
        let len = secret.len() - ending;
        secret.truncate(len);
        Self::from_secret(secret).map_err(|e| SealError::SecretFile {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    /// `plaintext` sealed for `uid` as one frame, under a fresh random nonce.
    pub fn seal(&self, uid: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
        self.seal_with_nonce(uid, plaintext, nonce)
    }

    fn seal_with_nonce(
        &self,
        uid: &str,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        let len = frame_len(plaintext.len())?;
        let key = self.key(uid)?;
        let mut out = Vec::with_capacity(LEN_PREFIX + MIN_FRAME + plaintext.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[LEN_PREFIX + NONCE_LEN..],
            )
            .map_err(|_| SealError::Crypto("encrypt"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext of every frame in `stored`, concatenated: all of it, or an error.
    pub fn open(&self, uid: &str, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = self.key(uid)?;
        let mut out = Vec::with_capacity(stored.len());
        let (mut offset, mut index) = (0, 0);
        while offset < stored.len() {
            let rest = &stored[offset..];
            let Some((prefix, rest)) = rest.split_first_chunk::<LEN_PREFIX>() else {
                return Err(SealError::TruncatedLength {
                    offset,
                    left: rest.len(),
                });
            };
            let len = u32::from_be_bytes(*prefix);
            let frame_len = usize::try_from(len).unwrap_or(usize::MAX);
            if frame_len < MIN_FRAME {
                return Err(SealError::FrameTooShort { index, offset, len });
            }
            let Some(frame) = rest.get(..frame_len) else {
                let left = rest.len();
                return Err(SealError::FramePastEnd {
                    index,
                    offset,
                    len,
                    left,
                });
            };
            let Some((nonce, sealed)) = frame.split_first_chunk::<NONCE_LEN>() else {
                return Err(SealError::FrameTooShort { index, offset, len });
            };
            let nonce = Nonce::assume_unique_for_key(*nonce);
            let start = out.len();
            out.extend_from_slice(sealed);
            let opened = key
                .open_in_place(nonce, Aad::empty(), &mut out[start..])
                .map_err(|_| SealError::Authentication { index, offset })?
                .len();
            out.truncate(start + opened);
            offset += LEN_PREFIX + frame_len;
            index += 1;
        }
        Ok(out)
    }

    /// `uid`'s AES-256-GCM key; the derived bytes are wiped once aws-lc holds the key.
    fn key(&self, uid: &str) -> Result<LessSafeKey, SealError> {
        let prk = Salt::new(HKDF_SHA256, uid.as_bytes()).extract(&self.secret);
        let info = [HKDF_INFO];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| SealError::Crypto("derive a key"))?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        okm.fill(&mut bytes[..])
            .map_err(|_| SealError::Crypto("derive a key"))?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes[..])
            .map_err(|_| SealError::Crypto("build a key"))?;
        Ok(LessSafeKey::new(key))
    }
}

/// The length prefix of a frame around `plaintext_len` bytes, if it fits a `u32`.
fn frame_len(plaintext_len: usize) -> Result<u32, SealError> {
    if plaintext_len > MAX_PLAINTEXT {
        return Err(SealError::TooLarge { len: plaintext_len });
    }
    u32::try_from(plaintext_len + MIN_FRAME).map_err(|_| SealError::TooLarge { len: plaintext_len })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECRET: &[u8] = b"spillway known-answer secret, 0123456789";

    fn sealer() -> Sealer {
        Sealer::from_secret(Zeroizing::new(SECRET.to_vec())).unwrap()
    }

    #[test]
    fn a_frame_is_byte_for_byte_what_pythons_cryptography_writes() {
        // HKDF-SHA256 + AESGCM from Python's `cryptography` 48.0.0, for this secret, uid
        // "user-42", nonce 00..0b and these 8 bytes of PCM.
        let known = "00000024000102030405060708090a0b\
                     2ee7b2c578ac6c1ee85d4dbbd08143b4c2b04329c8aca668";
        let pcm = [1, 0, 2, 0, 0xff, 0x7f, 0, 0x80];
        let nonce = std::array::from_fn(|i| i as u8);
        let frame = sealer().seal_with_nonce("user-42", &pcm, nonce).unwrap();
        assert_eq!(hex::encode(&frame), known);
        assert_eq!(sealer().open("user-42", &frame).unwrap(), pcm);
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let short = Sealer::from_secret(Zeroizing::new(vec![b'a'; 31])).unwrap_err();
        assert_eq!(
            short.to_string(),
            "the secret is 31 bytes; Omi's ENCRYPTION_SECRET must be at least 32"
        );
        let binary = Sealer::from_secret(Zeroizing::new(vec![0xff; 32])).unwrap_err();
        assert!(matches!(binary, SealError::SecretNotUtf8), "{binary}");
        assert!(!format!("{:?}", sealer()).contains("known-answer"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let frame = sealer().seal("u", b"pcm").unwrap();
        for ending in ["", "\n", "\r\n"] {
            std::fs::write(&path, [SECRET, ending.as_bytes()].concat()).unwrap();
            let from_file = Sealer::from_file(&path).unwrap();
            assert_eq!(from_file.open("u", &frame).unwrap(), b"pcm", "{ending:?}");
        }
        // Only one line ending goes: a second is part of the secret, which then differs.
        std::fs::write(&path, [SECRET, b"\n\n"].concat()).unwrap();
        assert!(Sealer::from_file(&path).unwrap().open("u", &frame).is_err());
        std::fs::write(&path, b"too short but secret\n").unwrap();
        let err = Sealer::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("20 bytes"));
        assert!(!err.contains("too short but secret"), "{err}");
        let missing = Sealer::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }

    #[test]
    fn each_malformation_has_its_own_error() {
        let s = sealer();
        let frame = s.seal("u", b"abcd").unwrap();
        let two = [frame.clone(), frame.clone()].concat();
        let err = |bytes: &[u8]| s.open("u", bytes).unwrap_err();

        assert!(matches!(
            err(&two[..frame.len() + 3]),
            SealError::TruncatedLength {
                offset: 36,
                left: 3
            }
        ));
        let mut short = frame.clone();
        short[..4].copy_from_slice(&27u32.to_be_bytes());
        assert!(matches!(
            err(&short),
            SealError::FrameTooShort { len: 27, .. }
        ));
        assert!(matches!(
            err(&two[..two.len() - 1]),
            SealError::FramePastEnd {
                index: 1,
                offset: 36,
                len: 32,
                left: 31
            }
        ));
        let mut flipped = two.clone();
        flipped[frame.len() + 20] ^= 1;
        assert!(matches!(
            err(&flipped),
            SealError::Authentication {
                index: 1,
                offset: 36
            }
        ));
        assert!(matches!(
            s.open("v", &frame).unwrap_err(),
            SealError::Authentication { index: 0, .. }
        ));
        let other = Sealer::from_secret(Zeroizing::new(vec![b'x'; 32])).unwrap();
        assert!(matches!(
            other.open("u", &frame).unwrap_err(),
            SealError::Authentication { .. }
        ));
        assert_eq!(s.open("u", b"").unwrap(), b"");
    }

    #[test]
    fn a_frame_length_must_fit_u32() {
        assert_eq!(frame_len(0).unwrap(), 28);
        assert_eq!(frame_len(MAX_PLAINTEXT).unwrap(), u32::MAX);
        let err = frame_len(MAX_PLAINTEXT + 1).unwrap_err();
        assert!(matches!(err, SealError::TooLarge { .. }), "{err}");
    }

    proptest! {
        #[test]
        fn open_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            uid in ".{0,8}",
        ) {
            let _ = sealer().open(&uid, &bytes);
        }

        #[test]
        fn open_never_panics_on_frames_of_arbitrary_content(
            frames in proptest::collection::vec(
                (0u32..64, proptest::collection::vec(any::<u8>(), 0..64)), 0..4),
        ) {
            let mut bytes = Vec::new();
            for (len, body) in &frames {
                bytes.extend_from_slice(&len.to_be_bytes());
                bytes.extend_from_slice(body);
            }
            prop_assert!(sealer().open("u", &bytes).is_err() || bytes.is_empty());
        }

        #[test]
        fn seal_then_open_round_trips(
            uid in any::<String>(),
            chunks in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..512), 1..4),
        ) {
            let s = sealer();
            // Omi merges chunks by concatenating their frames.
            let stored: Vec<u8> = chunks
                .iter()
                .flat_map(|c| s.seal(&uid, c).unwrap())
                .collect();
            prop_assert_eq!(s.open(&uid, &stored).unwrap(), chunks.concat());
        }

        #[test]
        fn any_one_changed_byte_is_refused(
            pcm in proptest::collection::vec(any::<u8>(), 0..64),
            at in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let s = sealer();
            let mut stored = s.seal("u", &pcm).unwrap();
            let i = at.index(stored.len());
            stored[i] ^= xor;
            prop_assert!(s.open("u", &stored).is_err());
        }
    }
}
