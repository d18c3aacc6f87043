//! Ingest's configuration: flags with `SPILLWAY_*` environment fallbacks, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use spillway_ops::LogFormat;

use spillway_proto::link::Link;

use crate::auth::{Auth, Keyring};

use crate::forward::Target;
use crate::tls::TlsMaterial;

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse()
        .map_err(|e: crate::forward::BadTarget| e.to_string())
}

/// Command-line flags of the `ingest` daemon.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ingest",
    version,
    about = "Spillway ingest: device audio over QUIC, cut into chunks, forwarded to the uploader",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// A tool instead of the daemon.
    #[command(subcommand)]
    pub command: Option<crate::cli::Command>,
    /// UDP address the QUIC device endpoint listens on.
    #[arg(long, env = "SPILLWAY_INGEST_LISTEN", default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// TCP address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "SPILLWAY_INGEST_HTTP_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub http_listen: SocketAddr,
    /// Uploaders to forward chunks to, tried per session in a stable order, skipping any that
    /// refuse: repeat the flag (or separate with commas) for several. `http://HOST:PORT` is one
    /// uploader; `dns://NAME:PORT` is every address NAME resolves to (a Kubernetes headless
    /// Service), re-resolved every --uploader-refresh.
    #[arg(
        long,
        env = "SPILLWAY_UPLOADER_URL",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ',',
        value_parser = parse_target
    )]
    pub uploader: Vec<Target>,
    /// How often dns:// uploader names are resolved again.
    #[arg(long, env = "SPILLWAY_UPLOADER_REFRESH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub uploader_refresh: Duration,
    /// TLS certificate chain (PEM). Without --tls-cert/--tls-key a self-signed certificate is made.
    #[arg(long, env = "SPILLWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SPILLWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Where the self-signed certificate (DER) is written for local clients to trust.
    #[arg(
        long,
        env = "SPILLWAY_DEV_CERT_OUT",
        default_value = ".spillway/ingest-cert.der"
    )]
    pub dev_cert_out: PathBuf,
    /// Length of every chunk but a session's last, in seconds (1-600).
    #[arg(long, env = "SPILLWAY_CHUNK_SECONDS", default_value_t = 60)]
    pub chunk_seconds: u32,
    /// A session silent this long is flushed and ended (e.g. 30s, 2m).
    #[arg(long, env = "SPILLWAY_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Longest a session's chunk may stay open before it is flushed and the session ended with
    /// TOO_SLOW: a minimum data rate of chunk-seconds / this (default: twice --chunk-seconds,
    /// half real time). Time ingest itself makes a device wait does not count.
    #[arg(long, env = "SPILLWAY_CHUNK_FILL_TIMEOUT", value_parser = humantime::parse_duration)]
    pub chunk_fill_timeout: Option<Duration>,
    /// Largest device frame in bytes, length prefix excluded.
    #[arg(long, env = "SPILLWAY_MAX_FRAME_BYTES", default_value_t = spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Most sessions open at once.
    #[arg(long, env = "SPILLWAY_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// Sessions one uid may have open at once (a device needs one; a reconnect briefly two).
    #[arg(long, env = "SPILLWAY_MAX_SESSIONS_PER_UID", default_value_t = 4)]
    pub max_sessions_per_uid: usize,
    /// A new stream must send its hello within this long; until then it holds no session slot.
    #[arg(long, env = "SPILLWAY_HELLO_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub hello_timeout: Duration,
    /// QUIC connections at once; beyond it new ones are refused. From half of it on, a client
    /// must first prove its address (QUIC retry).
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// QUIC connections at once from one IP address (a NAT or a gateway shares one).
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,
    /// Memory budget for audio not yet committed by the uploader, in bytes. When it is spent,
    /// sessions stop reading (QUIC flow control slows the devices); nothing is dropped. Must
    /// hold a 16 KiB first step for every session plus one largest chunk (--chunk-seconds at
    /// 48 kHz), so that a session growing its chunk can always proceed.
    #[arg(long, env = "SPILLWAY_MAX_BUFFERED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// How devices prove their uid: `token` (every hello carries a token signed with a key of
    /// --token-keys, naming the uid it may write as), `mtls` (a client certificate of
    /// --device-ca naming the uid in a SAN URI spillway:uid:<uid>) or `none` (anyone may write as
    /// any uid; the default only when --listen is a loopback address).
    #[arg(long, env = "SPILLWAY_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// PEM CA certificate(s) devices' client certificates must chain to (--auth mtls).
    #[arg(long, env = "SPILLWAY_DEVICE_CA")]
    pub device_ca: Option<PathBuf>,
    /// The link to the uploaders (`--uploader https://...` or `dns://...` with TLS).
    #[command(flatten)]
    pub link: spillway_proto::link::LinkArgs,
    /// The name every uploader's certificate must carry (default: the host each --uploader
    /// names; for `dns://NAME:PORT`, NAME).
    #[arg(long, env = "SPILLWAY_INTERNAL_SERVER_NAME")]
    pub internal_server_name: Option<String>,
    /// File of token keys, one `<kid> <base64 secret>` per line (`ingest token new-key` makes
    /// one); every key verifies, the first signs. Required by --auth token.
    #[arg(long, env = "SPILLWAY_TOKEN_KEYS")]
    pub token_keys: Option<PathBuf>,
    /// How long shutdown waits for in-flight chunks to be acknowledged.
    #[arg(long, env = "SPILLWAY_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Timeout of one PutChunk attempt (retried with backoff).
    #[arg(long, env = "SPILLWAY_FORWARD_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub forward_timeout: Duration,
    /// Log format.
    #[arg(long, env = "SPILLWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The Omi pusher WebSocket front end.
    #[command(flatten)]
    pub omi: crate::omi::OmiArgs,
}

/// Validated configuration that [`crate::run`] takes.
#[derive(Debug)]
pub struct Config {
    /// Where the uploaders are (at least one).
    pub uploaders: Vec<Target>,
    pub uploader_refresh: Duration,
    pub tls: TlsMaterial,
    /// Roots devices' client certificates must chain to (`--auth mtls`).
    pub device_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    pub chunk_seconds: u32,
    pub idle_timeout: Duration,
    /// How long a chunk may stay open (the minimum data rate).
    pub chunk_fill_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_sessions: usize,
    pub max_sessions_per_uid: usize,
    pub hello_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_buffered_bytes: usize,
    pub auth: Arc<Auth>,
    /// The link to the uploaders: mutual TLS, or plaintext by name.
    pub link: Link,
    pub internal_server_name: Option<String>,
    pub shutdown_grace: Duration,
    pub forward_timeout: Duration,
    /// The Omi front end's rules (served when [`crate::Listeners::omi`] is given).
    pub omi: crate::omi::OmiConfig,
}

/// A configuration value out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--chunk-seconds must be 1..=600, got {0}")]
    ChunkSeconds(u32),
    #[error("--max-frame-bytes must be 64..=16777216, got {0}")]
    MaxFrameBytes(usize),
    #[error("--max-sessions must be at least 1")]
    MaxSessions,
    #[error("--max-sessions-per-uid must be at least 1")]
    MaxSessionsPerUid,
    #[error("--hello-timeout must be 100ms to 60s")]
    HelloTimeout,
    #[error("--max-connections and --max-connections-per-ip must be at least 1")]
    MaxConnections,
    #[error(
        "--max-buffered-bytes ({max}) must hold a 16 KiB first step for each of --max-sessions and one largest chunk (--chunk-seconds at 48 kHz): at least {need} bytes"
    )]
    MaxBufferedBytes { max: usize, need: usize },
    #[error(
        "--chunk-fill-timeout ({0:?}) must be longer than --chunk-seconds: a real-time device needs chunk-seconds to fill a chunk"
    )]
    ChunkFillTimeout(Duration),
    #[error("--idle-timeout must be at least 1s")]
    IdleTimeout,
    #[error("at least one --uploader is needed")]
    NoUploader,
    #[error("--uploader-refresh must be at least 100ms")]
    UploaderRefresh,
    #[error(
        "--uploader {0} is plaintext, but the link is TLS (--internal-*): use https:// or dns://"
    )]
    PlaintextTarget(String),
    #[error("--uploader {0} is TLS, but the link is plaintext (--insecure-internal): use http://")]
    TlsTarget(String),
}

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    None,
    Token,
    /// Client certificates of --device-ca.
    Mtls,
}

impl Config {
    /// A configuration with local defaults around the given TLS material; tests start from here.
    pub fn local(uploader: String, tls: TlsMaterial) -> Self {
        Self {
            uploaders: vec![Target::Url(uploader)],
            uploader_refresh: Duration::from_secs(5),
            tls,
            device_ca: None,
            chunk_seconds: 60,
            idle_timeout: Duration::from_secs(30),
            chunk_fill_timeout: Duration::from_secs(120),
            max_frame_bytes: spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES,
            max_sessions: 256,
            max_sessions_per_uid: 4,
            hello_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_ip: 64,
            max_buffered_bytes: 256 * 1024 * 1024,
            auth: Arc::new(Auth::None),
            link: Link::Insecure,
            internal_server_name: None,
            shutdown_grace: Duration::from_secs(30),
            forward_timeout: Duration::from_secs(30),
            omi: crate::omi::OmiConfig::local(),
        }
    }

    /// Checks every bound; the daemon refuses to start otherwise.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=600).contains(&self.chunk_seconds) {
            return Err(ConfigError::ChunkSeconds(self.chunk_seconds));
        }
        if !(64..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(ConfigError::MaxFrameBytes(self.max_frame_bytes));
        }
        if self.max_sessions == 0 {
            return Err(ConfigError::MaxSessions);
        }
        if self.max_sessions_per_uid == 0 {
            return Err(ConfigError::MaxSessionsPerUid);
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.hello_timeout) {
            return Err(ConfigError::HelloTimeout);
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return Err(ConfigError::MaxConnections);
        }
        if self.chunk_fill_timeout <= Duration::from_secs(self.chunk_seconds.into()) {
            return Err(ConfigError::ChunkFillTimeout(self.chunk_fill_timeout));
        }
        let need = crate::budget::min_budget(self.max_sessions, self.chunk_seconds);
        if self.max_buffered_bytes < need {
            return Err(ConfigError::MaxBufferedBytes {
                max: self.max_buffered_bytes,
                need,
            });
        }
        if self.idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError::IdleTimeout);
        }
        if self.uploaders.is_empty() {
            return Err(ConfigError::NoUploader);
        }
        if self.uploader_refresh < Duration::from_millis(100) {
            return Err(ConfigError::UploaderRefresh);
        }
        for target in &self.uploaders {
            let url = target.to_string();
            match (&self.link, url.split_once("://").map(|(s, _)| s)) {
                (Link::Tls(_), Some("http")) => return Err(ConfigError::PlaintextTarget(url)),
                (Link::Insecure, Some("https")) => return Err(ConfigError::TlsTarget(url)),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Args {
    /// Loads or makes the TLS material and builds a validated [`Config`].
    pub fn into_config(self) -> anyhow::Result<Config> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsMaterial::from_pem_files(cert, key)?,
            _ => {
                let tls = crate::tls::self_signed()?;
                tls.write_cert_der(&self.dev_cert_out)?;
                tracing::info!(path = %self.dev_cert_out.display(), "no --tls-cert given: wrote a self-signed certificate for local clients to trust");
                tls
            }
        };
        anyhow::ensure!(
            self.device_ca.is_none() || self.auth == Some(AuthMode::Mtls),
            "--device-ca goes with --auth mtls"
        );
        let mut device_ca = None;
        let auth = match (self.auth, &self.token_keys) {
            (Some(AuthMode::Mtls), _) => {
                let path = self.device_ca.as_deref().context(
                    "--auth mtls needs --device-ca FILE (the CA of device certificates)",
                )?;
                device_ca = Some(crate::tls::pem_certificates(path)?);
                Auth::Certificates
            }
            (Some(AuthMode::Token), Some(path)) => Auth::Tokens(load_keys(path)?),
            (Some(AuthMode::Token), None) => {
                anyhow::bail!(
                    "--auth token needs --token-keys FILE (`ingest token new-key` makes one)"
                )
            }
            (Some(AuthMode::None), _) => Auth::None,
            (None, Some(_)) => {
                anyhow::bail!("--token-keys is given but --auth is not; pass --auth token")
            }
            (None, None) if self.listen.ip().is_loopback() => Auth::None,
            (None, None) => anyhow::bail!(
                "ingest listens on {} with no device authentication: pass --auth token --token-keys FILE, \
                 or --auth none to let anyone who reaches it write as any uid",
                self.listen
            ),
        };
        let link = self.link.link()?.ok_or(spillway_proto::link::NoLink)?;
        let config = Config {
            uploaders: self.uploader,
            uploader_refresh: self.uploader_refresh,
            tls,
            device_ca,
            chunk_seconds: self.chunk_seconds,
            idle_timeout: self.idle_timeout,
            chunk_fill_timeout: self
                .chunk_fill_timeout
                .unwrap_or(Duration::from_secs(2 * u64::from(self.chunk_seconds))),
            max_frame_bytes: self.max_frame_bytes,
            max_sessions: self.max_sessions,
            max_sessions_per_uid: self.max_sessions_per_uid,
            hello_timeout: self.hello_timeout,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_buffered_bytes: self.max_buffered_bytes,
            auth: Arc::new(auth),
            link,
            internal_server_name: self.internal_server_name,
            shutdown_grace: self.shutdown_grace,
            forward_timeout: self.forward_timeout,
            omi: self.omi.into_config(self.chunk_seconds)?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Reads a keys file (see [`crate::auth::token`]).
pub fn load_keys(path: &std::path::Path) -> anyhow::Result<Keyring> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token keys in {}", path.display()))?;
    Keyring::parse(&text).with_context(|| format!("the token keys in {}", path.display()))
}

/// Ingest's memory bound in bytes (deploy/README.md, "Memory") for `--max-buffered-bytes`,
/// `--max-sessions` and `--max-frame-bytes`: the budget, then per session the QUIC stream
/// receive window, two frames and 64 KiB of state, then 64 MiB for the runtime. deploy-check
/// holds the manifests' limits to it; the bench holds a measurement to it (row 5c).
pub fn memory_bound(max_buffered_bytes: u128, max_sessions: u128, max_frame_bytes: u128) -> u128 {
    const MIB: u128 = 1024 * 1024;
    max_buffered_bytes
        + max_sessions * (u128::from(crate::STREAM_RECEIVE_WINDOW) + 2 * max_frame_bytes + 65_536)
        + 64 * MIB
}
