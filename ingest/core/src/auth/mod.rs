//! Who a device is: every hello is checked against a credential before a session starts.
//!
//! - `--auth token`: the hello carries a token signed with one of ingest's keys
//!   ([`token::Keyring`]); it names the uid (or uid prefix) the device may write as.
//! - `--auth mtls`: the device's QUIC client certificate chains to `--device-ca` and names its
//!   uid (or uid prefix) in a SAN URI ([`cert::scope_of`]).
//! - `--auth none`: anyone may write as any uid. For local runs on loopback only; ingest logs a
//!   warning at start, and refuses it on a non-loopback address unless it is asked for by name.
//!
//! Sans-IO: the caller passes the time.

pub mod cert;
pub mod token;

use std::time::SystemTime;

pub use token::{Grant, Keyring, Scope, TokenError};

/// How hellos are authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No check: every uid is open to anyone who reaches ingest.
    None,
    /// Signed tokens, verified with these keys.
    Tokens(Keyring),
    /// Client certificates: the QUIC handshake verified the device's certificate against
    /// `--device-ca`, and the connection carries the scope it names ([`cert::scope_of`]).
    Certificates,
}

/// Why a hello was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No valid credential: answered `UNAUTHENTICATED`.
    #[error(transparent)]
    Unauthenticated(#[from] TokenError),
    /// A valid credential for someone else: answered `PERMISSION_DENIED`.
    #[error("the credential lets this device write as {scope}, not as uid {uid:?}")]
    OtherUid { scope: Scope, uid: String },
    /// `--auth mtls`, but the connection's certificate names no uid.
    #[error(
        "the client certificate names no uid (a SAN URI spillway:uid:<uid> or spillway:uid-prefix:<p>)"
    )]
    NoCertificateScope,
}

impl Auth {
    /// Lets `uid` in if `token` (or, with certificates, the connection's `certified` scope)
    /// allows it as of `now`.
    pub fn authorize(
        &self,
        uid: &str,
        token: &str,
        certified: Option<&Scope>,
        now: SystemTime,
    ) -> Result<(), Denied> {
        let scope = match self {
            Auth::None => return Ok(()),
            Auth::Tokens(keys) => keys.verify(token, now)?.scope,
            Auth::Certificates => certified.cloned().ok_or(Denied::NoCertificateScope)?,
        };
        if scope.allows(uid) {
            Ok(())
        } else {
            Err(Denied::OtherUid {
                scope,
                uid: uid.to_owned(),
            })
        }
    }

    /// The name `--auth` gives this mode.
    pub fn name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Tokens(_) => "token",
            Auth::Certificates => "mtls",
        }
    }
}
