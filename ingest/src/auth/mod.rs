//! Who a device is: every hello is checked against a credential before a session starts.
//!
//! - `--auth token`: the hello carries a token signed with one of ingest's keys
//!   ([`token::Keyring`]); it names the uid (or uid prefix) the device may write as.
//! - `--auth none`: anyone may write as any uid. For local runs on loopback only; ingest logs a
//!   warning at start, and refuses it on a non-loopback address unless it is asked for by name.
//!
//! Sans-IO: the caller passes the time.

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
}

/// Why a hello was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No valid credential: answered `UNAUTHENTICATED`.
    #[error(transparent)]
    Unauthenticated(#[from] TokenError),
    /// A valid credential for someone else: answered `PERMISSION_DENIED`.
    #[error("the token lets this device write as {scope}, not as uid {uid:?}")]
    OtherUid { scope: Scope, uid: String },
}

impl Auth {
    /// Lets `uid` in if `token` allows it as of `now`.
    pub fn authorize(&self, uid: &str, token: &str, now: SystemTime) -> Result<(), Denied> {
        match self {
            Auth::None => Ok(()),
            Auth::Tokens(keys) => {
                let grant = keys.verify(token, now)?;
                if grant.scope.allows(uid) {
                    Ok(())
                } else {
                    Err(Denied::OtherUid {
                        scope: grant.scope,
                        uid: uid.to_owned(),
                    })
                }
            }
        }
    }

    /// The name `--auth` gives this mode.
    pub fn name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Tokens(_) => "token",
        }
    }
}
