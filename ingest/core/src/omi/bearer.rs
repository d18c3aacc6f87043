//! `--omi-auth bearer`: the one shared token a cluster's `listen` pods present as
//! `Authorization: Bearer <token>`. Omi's pusher has no authentication and `listen` sends only the
//! uid, so this proves "a service of ours", not a device: every uid is open to whoever holds the
//! token. The token is compared in constant time (SHA-256 of both sides, then aws-lc's
//! constant-time equality), and never logged.

use zeroize::Zeroizing;

/// Shortest token accepted: 32 bytes, as Omi asks of its own secrets.
pub const MIN_TOKEN_BYTES: usize = 32;

/// The shared token.
pub struct BearerToken {
    digest: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Why a token was refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is {0} bytes; at least {MIN_TOKEN_BYTES} are needed")]
    TooShort(usize),
    #[error("the token holds whitespace or a control character inside it")]
    BadChar,
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

impl BearerToken {
    /// A token from a file's contents: one trailing newline (`\n` or `\r\n`) is dropped.
    pub fn from_file_contents(contents: &[u8]) -> Result<Self, TokenError> {
        let token = contents
            .strip_suffix(b"\r\n")
            .or_else(|| contents.strip_suffix(b"\n"))
            .unwrap_or(contents);
        if token
            .iter()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(TokenError::BadChar);
        }
        if token.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort(token.len()));
        }
        Ok(Self {
            digest: Zeroizing::new(digest(token)),
        })
    }

    /// True when `authorization` (the header's value) is `Bearer <this token>`.
    pub fn verify(&self, authorization: Option<&[u8]>) -> bool {
        let Some(presented) = authorization.and_then(|h| {
            h.strip_prefix(b"Bearer ")
                .or_else(|| h.strip_prefix(b"bearer "))
        }) else {
            return false;
        };
        aws_lc_rs::constant_time::verify_slices_are_equal(&digest(presented), &self.digest).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn only_the_exact_token_as_a_bearer_passes() {
        let t = BearerToken::from_file_contents(b"0123456789abcdef0123456789abcdef\n").unwrap();
        assert!(t.verify(Some(b"Bearer 0123456789abcdef0123456789abcdef")));
        assert!(!t.verify(Some(TOKEN)));
        assert!(!t.verify(Some(b"Bearer 0123456789abcdef0123456789abcdeF")));
        assert!(!t.verify(Some(b"Bearer 0123456789abcdef0123456789abcdef ")));
        assert!(!t.verify(Some(b"Basic 0123456789abcdef0123456789abcdef")));
        assert!(!t.verify(None));
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
    }

    #[test]
    fn short_or_spaced_tokens_are_refused_at_start() {
        assert_eq!(
            BearerToken::from_file_contents(b"short\n").unwrap_err(),
            TokenError::TooShort(5)
        );
        assert_eq!(
            BearerToken::from_file_contents(b"0123456789abcdef 123456789abcdef0").unwrap_err(),
            TokenError::BadChar
        );
    }
}
