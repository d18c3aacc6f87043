//! The Omi front end's flags (`--omi-*`) and their validated form.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use spillway_core::omi::bearer::BearerToken;

/// `--omi-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OmiAuthMode {
    /// No authentication, as Omi's pusher: anyone who reaches --omi-listen writes as any uid.
    /// For a private network only (a NetworkPolicy that admits only listen's pods).
    None,
    /// `Authorization: Bearer <token>` with the token of --omi-token-file (one shared by every
    /// listen pod: it proves "our service", not a device).
    Bearer,
}

/// The Omi pusher's WebSocket front end.
#[derive(Debug, Clone, clap::Args)]
pub struct OmiArgs {
    /// TCP address of the Omi pusher WebSocket (`GET /v1/trigger/listen`); off when absent.
    /// Its sessions share --max-sessions, --max-sessions-per-uid, --max-buffered-bytes and the
    /// uploaders with QUIC's; their chunks are stored in Omi's layout.
    #[arg(long, env = "SPILLWAY_OMI_LISTEN")]
    pub omi_listen: Option<SocketAddr>,
    /// How Omi's listen service proves itself: `bearer` or `none` (the default only when
    /// --omi-listen is a loopback address).
    #[arg(long, env = "SPILLWAY_OMI_AUTH", value_enum)]
    pub omi_auth: Option<OmiAuthMode>,
    /// File holding the bearer token (at least 32 bytes; a Kubernetes Secret mounted as a file).
    #[arg(long, env = "SPILLWAY_OMI_TOKEN_FILE")]
    pub omi_token_file: Option<PathBuf>,
    /// A connection that sends no frame for this long is flushed and closed 1011, as the pusher
    /// does after 300 s (listen sends a heartbeat every 20 s).
    #[arg(long, env = "SPILLWAY_OMI_RECEIVE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub omi_receive_timeout: Duration,
    /// Omi's protocol has no acknowledgements: audio ingest holds when it dies is lost. A
    /// session's open chunk is committed (as a shorter chunk in Omi's layout) once its first
    /// byte is this old, which bounds that loss; smaller means more objects (3,600 / this per
    /// hour per session) and spool writes. The default, 60s, makes the pusher's 60 s objects.
    #[arg(long, env = "SPILLWAY_OMI_COMMIT_EVERY", default_value = "60s", value_parser = humantime::parse_duration)]
    pub omi_commit_every: Duration,
}

/// How a listen connection is authenticated.
#[derive(Debug)]
pub enum OmiAuth {
    None,
    Bearer(BearerToken),
}

/// The Omi front end's validated configuration.
#[derive(Debug)]
pub struct OmiConfig {
    pub auth: OmiAuth,
    pub receive_timeout: Duration,
    /// The longest an open chunk holds audio before it is committed (`--omi-commit-every`).
    pub commit_every: Duration,
}

impl OmiConfig {
    /// Local defaults: no authentication, the pusher's 300 s receive timeout.
    pub fn local() -> Self {
        Self {
            auth: OmiAuth::None,
            receive_timeout: Duration::from_secs(300),
            commit_every: Duration::from_secs(60),
        }
    }
}

impl OmiArgs {
    /// The front end's configuration; errors say which flag to fix.
    pub fn into_config(self) -> anyhow::Result<OmiConfig> {
        anyhow::ensure!(
            self.omi_receive_timeout >= Duration::from_secs(1),
            "--omi-receive-timeout must be at least 1s"
        );
        anyhow::ensure!(
            self.omi_commit_every >= Duration::from_secs(1),
            "--omi-commit-every must be at least 1s"
        );
        let auth = match (self.omi_auth, &self.omi_token_file) {
            (Some(OmiAuthMode::Bearer), Some(path)) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading --omi-token-file {}", path.display()))?;
                OmiAuth::Bearer(
                    BearerToken::from_file_contents(&bytes)
                        .with_context(|| format!("--omi-token-file {}", path.display()))?,
                )
            }
            (Some(OmiAuthMode::Bearer), None) => {
                anyhow::bail!("--omi-auth bearer needs --omi-token-file FILE")
            }
            (Some(OmiAuthMode::None), None) => OmiAuth::None,
            (_, Some(_)) => {
                anyhow::bail!("--omi-token-file is given but --omi-auth is not bearer")
            }
            (None, None) => match self.omi_listen {
                Some(addr) if !addr.ip().is_loopback() => anyhow::bail!(
                    "--omi-listen {addr} has no authentication: pass --omi-auth bearer \
                     --omi-token-file FILE, or --omi-auth none for a private network \
                     (anyone who reaches it may write as any uid)"
                ),
                _ => OmiAuth::None,
            },
        };
        Ok(OmiConfig {
            auth,
            receive_timeout: self.omi_receive_timeout,
            commit_every: self.omi_commit_every,
        })
    }
}
