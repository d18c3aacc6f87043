//! Signed device tokens: a token names who may write (one uid, or every uid under a prefix for a
//! gateway that serves many users), until when, and which key signed it.
//!
//! ```text
//! spw1.<kid>.<payload>.<mac>
//!   kid      the signing key's id, [A-Za-z0-9_-]{1,32}
//!   payload  base64url (no padding) of JSON {"uid":"alice","exp":1767225600}
//!            or {"uid_prefix":"gw7-","exp":...}; exp in Unix seconds
//!   mac      base64url of HMAC-SHA256(key[kid], "spw1.<kid>.<payload>")
//! ```
//!
//! Verification is sans-IO (the time is passed in), checks the MAC in constant time before it
//! reads a byte of the payload, and gives every refusal its own [`TokenError`]. Several keys are
//! held at once ([`Keyring`]), so a new key can sign while tokens of the old one still verify.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// The version prefix of every token.
pub const PREFIX: &str = "spw1";
/// Longest token accepted; anything longer is refused before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Shortest secret a key may have.
pub const MIN_SECRET_BYTES: usize = 32;

/// Who a token (or a client certificate) lets write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Exactly this uid.
    Uid(String),
    /// Every uid that starts with this prefix (a gateway serving many users).
    Prefix(String),
}

impl Scope {
    /// True when this scope lets a device write as `uid`.
    pub fn allows(&self, uid: &str) -> bool {
        match self {
            Scope::Uid(u) => u == uid,
            Scope::Prefix(p) => uid.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Uid(u) => write!(f, "uid {u:?}"),
            Scope::Prefix(p) => write!(f, "uids starting with {p:?}"),
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    pub kid: String,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token: this ingest requires a signed device token in Hello.token")]
    Missing,
    #[error("token is {0} bytes, longer than the {MAX_TOKEN_BYTES}-byte limit")]
    TooLong(usize),
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is signed with key {0:?}, which this ingest does not hold")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {0}")]
    Expired(String),
}

/// Why a key or a keys file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("line {line}: expected `<kid> <base64 secret>`")]
    Syntax { line: usize },
    #[error("line {line}: key id {kid:?} must be 1-32 characters of [A-Za-z0-9_-]")]
    Kid { line: usize, kid: String },
    #[error("line {line}: key {kid:?} is not valid base64")]
    Base64 { line: usize, kid: String },
    #[error("line {line}: key {kid:?} has {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    Short {
        line: usize,
        kid: String,
        len: usize,
    },
    #[error("line {line}: key id {kid:?} appears twice")]
    Duplicate { line: usize, kid: String },
    #[error("the keys file holds no key")]
    Empty,
    #[error("no key {0:?} in the keys file")]
    NoSuchKey(String),
}

/// The keys tokens are signed with, by id. The first key of the file signs by default.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<String, hmac::Key>,
    first: String,
}

impl std::fmt::Debug for Keyring {
    // Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    (1..=32).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Keyring {
    /// Parses a keys file: one `<kid> <base64 secret>` per line; blank lines and lines starting
    /// with `#` are ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        let mut first = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            let mut words = raw.split_whitespace();
            let (Some(kid), Some(secret), None) = (words.next(), words.next(), words.next()) else {
                return Err(KeyError::Syntax { line });
            };
            let kid = kid.to_owned();
            if !valid_kid(&kid) {
                return Err(KeyError::Kid { line, kid });
            }
            let secret = base64::engine::general_purpose::STANDARD
                .decode(secret)
                .or_else(|_| B64.decode(secret))
                .map_err(|_| KeyError::Base64 {
                    line,
                    kid: kid.clone(),
                })?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(KeyError::Short {
                    line,
                    kid,
                    len: secret.len(),
                });
            }
            if keys.contains_key(&kid) {
                return Err(KeyError::Duplicate { line, kid });
            }
            first.get_or_insert_with(|| kid.clone());
            keys.insert(kid, hmac::Key::new(hmac::HMAC_SHA256, &secret));
        }
        let first = first.ok_or(KeyError::Empty)?;
        Ok(Self { keys, first })
    }

    /// The ids of the keys held, in order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Mints a token for `scope`, valid until `expires` (Unix seconds), signed with key `kid`
    /// (the file's first key when `None`).
    pub fn issue(
        &self,
        kid: Option<&str>,
        scope: &Scope,
        expires: u64,
    ) -> Result<String, KeyError> {
        let kid = kid.unwrap_or(&self.first);
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| KeyError::NoSuchKey(kid.to_owned()))?;
        let payload = match scope {
            Scope::Uid(uid) => serde_json::json!({ "uid": uid, "exp": expires }),
            Scope::Prefix(p) => serde_json::json!({ "uid_prefix": p, "exp": expires }),
        };
        let signed = format!("{PREFIX}.{kid}.{}", B64.encode(payload.to_string()));
        let mac = B64.encode(hmac::sign(key, signed.as_bytes()).as_ref());
        Ok(format!("{signed}.{mac}"))
    }

    /// Verifies `token` as of `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Grant, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong(token.len()));
        }
        let (signed, mac) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("expected spw1.<kid>.<payload>.<mac>"))?;
        let mut parts = signed.splitn(3, '.');
        let (Some(version), Some(kid), Some(payload)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected spw1.<kid>.<payload>.<mac>"));
        };
        if version != PREFIX {
            return Err(TokenError::Malformed("not a spw1 token"));
        }
        if !valid_kid(kid) {
            return Err(TokenError::Malformed("bad key id"));
        }
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| TokenError::UnknownKey(kid.to_owned()))?;
        let mac = B64
            .decode(mac)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        // Constant time; nothing of the payload is read before it passes.
        hmac::verify(key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let payload = B64
            .decode(payload)
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload is not the expected JSON"))?;
        let scope = match (claims.uid, claims.uid_prefix) {
            (Some(uid), None) => Scope::Uid(uid),
            (None, Some(prefix)) => Scope::Prefix(prefix),
            _ => {
                return Err(TokenError::Malformed(
                    "payload needs exactly one of uid, uid_prefix",
                ));
            }
        };
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now >= claims.exp {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp);
            return Err(TokenError::Expired(
                humantime::format_rfc3339_seconds(at).to_string(),
            ));
        }
        Ok(Grant {
            scope,
            kid: kid.to_owned(),
            expires: claims.exp,
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    uid: Option<String>,
    uid_prefix: Option<String>,
    exp: u64,
}

/// A new random secret, as a keys-file line for `kid`.
pub fn new_key_line(kid: &str) -> Result<String, KeyError> {
    if !valid_kid(kid) {
        return Err(KeyError::Kid {
            line: 0,
            kid: kid.to_owned(),
        });
    }
    let mut secret = [0u8; MIN_SECRET_BYTES];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| KeyError::Empty)?;
    Ok(format!(
        "{kid} {}",
        base64::engine::general_purpose::STANDARD.encode(secret)
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KEYS: &str = "# rotation: k2 signs, k1 still verifies\n\
        k2 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\
        k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=\n";

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ring() -> Keyring {
        Keyring::parse(KEYS).unwrap()
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_names_its_scope() {
        let t = ring()
            .issue(None, &Scope::Uid("alice".into()), 1_000)
            .unwrap();
        assert!(t.starts_with("spw1.k2."), "{t}");
        let g = ring().verify(&t, at(999)).unwrap();
        assert_eq!(g.scope, Scope::Uid("alice".into()));
        assert_eq!(g.kid, "k2");
        assert!(g.scope.allows("alice") && !g.scope.allows("alice2"));
        assert_eq!(
            ring().verify(&t, at(1_000)),
            Err(TokenError::Expired("1970-01-01T00:16:40Z".into()))
        );
        let gw = ring()
            .issue(Some("k1"), &Scope::Prefix("gw7-".into()), 1_000)
            .unwrap();
        let g = ring().verify(&gw, at(0)).unwrap();
        assert!(g.scope.allows("gw7-bob") && !g.scope.allows("gw8-bob"));
    }

    #[test]
    fn every_bad_token_gets_its_own_error() {
        let t = ring()
            .issue(None, &Scope::Uid("alice".into()), 1_000)
            .unwrap();
        let only_k1 = Keyring::parse("k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap();
        assert_eq!(
            only_k1.verify(&t, at(0)),
            Err(TokenError::UnknownKey("k2".into()))
        );
        // Another key under the same id: the signature fails.
        let impostor = Keyring::parse("k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap();
        assert_eq!(impostor.verify(&t, at(0)), Err(TokenError::BadSignature));
        // The payload changed to another uid: the signature fails.
        let (head, mac) = t.rsplit_once('.').unwrap();
        let forged_payload = B64.encode(r#"{"uid":"bob","exp":1000}"#);
        let forged = format!("spw1.k2.{forged_payload}.{mac}");
        assert_eq!(ring().verify(&forged, at(0)), Err(TokenError::BadSignature));
        let cut = &mac[..mac.len() - 3];
        assert_eq!(
            ring().verify(&format!("{head}.{cut}"), at(0)),
            Err(TokenError::BadSignature)
        );
        assert_eq!(ring().verify("", at(0)), Err(TokenError::Missing));
        assert!(matches!(
            ring().verify("sesame", at(0)),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            ring().verify("spw2.k2.e30.e30", at(0)),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            ring().verify("spw1.k 2.e30.e30", at(0)),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            ring().verify(&"x".repeat(MAX_TOKEN_BYTES + 1), at(0)),
            Err(TokenError::TooLong(MAX_TOKEN_BYTES + 1))
        );
        // Properly signed, but not the expected claims.
        let key = ring();
        let k2 = key.keys.get("k2").unwrap();
        for payload in [
            r#"{"exp":5}"#,
            r#"{"uid":"a","uid_prefix":"b","exp":5}"#,
            r#"{"uid":"a"}"#,
            r#"{"uid":"a","exp":5,"admin":true}"#,
        ] {
            let signed = format!("spw1.k2.{}", B64.encode(payload));
            let mac = B64.encode(hmac::sign(k2, signed.as_bytes()).as_ref());
            assert!(
                matches!(
                    key.verify(&format!("{signed}.{mac}"), at(0)),
                    Err(TokenError::Malformed(_))
                ),
                "{payload}"
            );
        }
    }

    #[test]
    fn keys_files_are_checked_line_by_line() {
        assert!(matches!(
            Keyring::parse("# nothing\n\n"),
            Err(KeyError::Empty)
        ));
        assert!(matches!(
            Keyring::parse("k1"),
            Err(KeyError::Syntax { line: 1 })
        ));
        assert!(matches!(
            Keyring::parse("k.1 AAAA"),
            Err(KeyError::Kid { .. })
        ));
        assert!(matches!(
            Keyring::parse("k1 !!!"),
            Err(KeyError::Base64 { .. })
        ));
        assert!(matches!(
            Keyring::parse("k1 AAAA"),
            Err(KeyError::Short { len: 3, .. })
        ));
        let dup = format!(
            "{}\n{}",
            KEYS.lines().nth(1).unwrap(),
            KEYS.lines().nth(1).unwrap()
        );
        assert!(matches!(
            Keyring::parse(&dup),
            Err(KeyError::Duplicate { line: 2, .. })
        ));
        let line = new_key_line("fresh").unwrap();
        let ring = Keyring::parse(&line).unwrap();
        assert_eq!(ring.kids().collect::<Vec<_>>(), ["fresh"]);
        assert!(format!("{ring:?}").contains("fresh") && !format!("{ring:?}").contains(&line[6..]));
        assert!(matches!(
            ring.issue(Some("nope"), &Scope::Uid("a".into()), 1),
            Err(KeyError::NoSuchKey(_))
        ));
    }
}
