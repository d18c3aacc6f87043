//! `ingest token ...`: makes keys and mints device tokens, so an operator needs no other tool.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use spillway_proto::validate;

use crate::auth::token::{Scope, new_key_line};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Token {
    /// Prints a new random key as a keys-file line (`<kid> <base64 secret>`): append it to the
    /// keys file; keep the old keys until the tokens they signed have expired.
    NewKey {
        /// The key's id, 1-32 characters of [A-Za-z0-9_-].
        #[arg(long)]
        kid: String,
    },
    /// Prints a token that lets a device (or a gateway) write as one uid (or every uid under a
    /// prefix) until it expires.
    Issue {
        /// The keys file ingest verifies with.
        #[arg(long, env = "SPILLWAY_TOKEN_KEYS")]
        token_keys: PathBuf,
        /// The key to sign with (default: the file's first).
        #[arg(long)]
        kid: Option<String>,
        /// The uid the token lets a device write as.
        #[arg(
            long,
            required_unless_present = "uid_prefix",
            conflicts_with = "uid_prefix"
        )]
        uid: Option<String>,
        /// Every uid starting with this prefix (a gateway serving many users).
        #[arg(long)]
        uid_prefix: Option<String>,
        /// How long the token is valid, e.g. `30d`, `12h`.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

impl Token {
    /// Runs the subcommand; its output goes to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Token::NewKey { kid } => println!("{}", new_key_line(&kid)?),
            Token::Issue {
                token_keys,
                kid,
                uid,
                uid_prefix,
                ttl,
            } => {
                let scope = match (uid, uid_prefix) {
                    (Some(uid), _) => {
                        validate::id(&uid).map_err(|e| anyhow::anyhow!("--uid {e}"))?;
                        Scope::Uid(uid)
                    }
                    (None, Some(p)) => {
                        // A prefix is the start of a uid: the same characters, never empty.
                        validate::id(&p).map_err(|e| anyhow::anyhow!("--uid-prefix {e}"))?;
                        Scope::Prefix(p)
                    }
                    (None, None) => anyhow::bail!("--uid or --uid-prefix is needed"),
                };
                anyhow::ensure!(!ttl.is_zero(), "--ttl must be longer than 0s");
                let keys = crate::config::load_keys(&token_keys)?;
                let expires = (SystemTime::now() + ttl)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .context("the clock is before 1970")?
                    .as_secs();
                println!("{}", keys.issue(kid.as_deref(), &scope, expires)?);
            }
        }
        Ok(())
    }
}
