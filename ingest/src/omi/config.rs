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
    /// Base URL of the real Omi pusher (`ws://host:port`, or `wss://` with the system's CA
    /// roots): every listen session is relayed to `{URL}/v1/trigger/listen?{its query}`, all
    /// frames but audio, and the pusher's 201s come back. Off when absent. The relay never holds
    /// up storing audio.
    #[arg(long, env = "SPILLWAY_OMI_UPSTREAM")]
    pub omi_upstream: Option<String>,
    /// Relay audio (101) to --omi-upstream too, for the pusher's webhooks and realtime apps.
    #[arg(long, env = "SPILLWAY_OMI_UPSTREAM_AUDIO")]
    pub omi_upstream_audio: bool,
    /// Bytes of frames one session holds for --omi-upstream while it is slow or down; when
    /// full the oldest are dropped (counted in spillway_ingest_omi_upstream_dropped_frames_total).
    /// The most held is this times --max-sessions.
    #[arg(long, env = "SPILLWAY_OMI_UPSTREAM_QUEUE_BYTES", default_value_t = MIN_QUEUE_BYTES)]
    pub omi_upstream_queue_bytes: usize,
}

/// The smallest `--omi-upstream-queue-bytes`: two of listen's largest audio frames and more.
pub const MIN_QUEUE_BYTES: usize = 256 * 1024;

/// Where and what the front end relays (`--omi-upstream*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `ws://` or `wss://` URL, no query, no trailing `/`: the route is appended to it.
    pub url: String,
    /// Relay audio (101) too.
    pub audio: bool,
    /// Bytes of frames a session's relay holds at most.
    pub queue_bytes: usize,
}

impl UpstreamConfig {
    /// Checks an `--omi-upstream` URL: `ws://` or `wss://`, a host, no query or fragment.
    pub fn new(url: &str, audio: bool, queue_bytes: usize) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--omi-upstream {url} is not a URL"))?;
        match uri.scheme_str() {
            Some("ws" | "wss") => {}
            _ => anyhow::bail!(
                "--omi-upstream {url}: the pusher's WebSocket URL starts ws:// or wss://"
            ),
        }
        anyhow::ensure!(
            uri.host().is_some_and(|h| !h.is_empty()),
            "--omi-upstream {url} names no host"
        );
        anyhow::ensure!(
            uri.query().is_none() && !url.contains('#'),
            "--omi-upstream {url}: give the base URL only; each session's query is appended"
        );
        anyhow::ensure!(
            queue_bytes >= MIN_QUEUE_BYTES,
            "--omi-upstream-queue-bytes must be at least {MIN_QUEUE_BYTES} (listen sends about a \
             second of audio a frame, 96 KB at 48 kHz)"
        );
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            audio,
            queue_bytes,
        })
    }
}

/// The longest `--chunk-seconds` the Omi front end takes: an Omi chunk's id puts its first sample
/// at `seq × chunk_samples` with `seq` its start in Unix milliseconds (below 2^32 s), and that
/// product must fit in 64 bits at 48 kHz.
pub const MAX_OMI_CHUNK_SECONDS: u32 = 89;

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
    /// The real pusher every session is relayed to (`--omi-upstream`), if any.
    pub upstream: Option<UpstreamConfig>,
}

impl OmiConfig {
    /// Local defaults: no authentication, the pusher's 300 s receive timeout.
    pub fn local() -> Self {
        Self {
            auth: OmiAuth::None,
            receive_timeout: Duration::from_secs(300),
            commit_every: Duration::from_secs(60),
            upstream: None,
        }
    }
}

impl OmiArgs {
    /// The front end's configuration for chunks of `chunk_seconds`; errors say which flag to fix.
    pub fn into_config(self, chunk_seconds: u32) -> anyhow::Result<OmiConfig> {
        anyhow::ensure!(
            self.omi_listen.is_none() || chunk_seconds <= MAX_OMI_CHUNK_SECONDS,
            "--omi-listen takes --chunk-seconds up to {MAX_OMI_CHUNK_SECONDS} (an Omi chunk's \
             id is its start in milliseconds times its length in samples, which must fit in 64 \
             bits); got {chunk_seconds}"
        );
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
        let upstream = match &self.omi_upstream {
            Some(url) => {
                anyhow::ensure!(
                    self.omi_listen.is_some(),
                    "--omi-upstream relays the sessions of --omi-listen, which is not given"
                );
                Some(UpstreamConfig::new(
                    url,
                    self.omi_upstream_audio,
                    self.omi_upstream_queue_bytes,
                )?)
            }
            None => {
                anyhow::ensure!(
                    !self.omi_upstream_audio,
                    "--omi-upstream-audio needs --omi-upstream URL"
                );
                None
            }
        };
        Ok(OmiConfig {
            auth,
            receive_timeout: self.omi_receive_timeout,
            commit_every: self.omi_commit_every,
            upstream,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{MAX_OMI_CHUNK_SECONDS, MIN_QUEUE_BYTES, OmiArgs, UpstreamConfig};

    #[test]
    fn an_upstream_url_is_a_websocket_base_url() {
        let c = UpstreamConfig::new("ws://pusher:8080/", false, 1 << 22).unwrap();
        assert_eq!(c.url, "ws://pusher:8080");
        let c = UpstreamConfig::new("wss://pusher.example/base", true, 1 << 22).unwrap();
        assert_eq!(c.url, "wss://pusher.example/base");
        for bad in [
            "http://pusher:8080",
            "pusher:8080",
            "ws://pusher/?uid=x",
            "ws://pusher/#x",
            "ws:///path",
            "not a url",
        ] {
            assert!(UpstreamConfig::new(bad, false, 1 << 22).is_err(), "{bad}");
        }
        assert!(UpstreamConfig::new("ws://pusher", false, 1024).is_err());
    }

    #[test]
    fn chunks_too_long_for_an_omi_chunk_id_are_refused_at_start() {
        let args = OmiArgs {
            omi_listen: Some("127.0.0.1:8080".parse().unwrap()),
            omi_auth: None,
            omi_token_file: None,
            omi_receive_timeout: std::time::Duration::from_secs(300),
            omi_commit_every: std::time::Duration::from_secs(60),
            omi_upstream: None,
            omi_upstream_audio: false,
            omi_upstream_queue_bytes: MIN_QUEUE_BYTES,
        };
        assert!(args.clone().into_config(MAX_OMI_CHUNK_SECONDS).is_ok());
        let refused = args
            .clone()
            .into_config(MAX_OMI_CHUNK_SECONDS + 1)
            .unwrap_err();
        assert!(
            refused.to_string().contains("--chunk-seconds up to 89"),
            "{refused}"
        );
        // The largest id the limit allows fits: 2^32 s in ms, times the chunk at 48 kHz.
        let largest = (1u64 << 32) * 1000;
        assert!(
            largest
                .checked_mul(u64::from(MAX_OMI_CHUNK_SECONDS) * 48_000)
                .is_some()
        );
        assert!(
            largest
                .checked_mul(u64::from(MAX_OMI_CHUNK_SECONDS + 1) * 48_000)
                .is_none()
        );
        let off = OmiArgs {
            omi_listen: None,
            ..args
        };
        assert!(off.into_config(600).is_ok(), "no Omi front end, no limit");
    }

    #[test]
    fn the_upstream_flags_go_together() {
        let args = |listen: Option<&str>, upstream: Option<&str>, audio| OmiArgs {
            omi_listen: listen.map(|a| a.parse().unwrap()),
            omi_auth: None,
            omi_token_file: None,
            omi_receive_timeout: std::time::Duration::from_secs(300),
            omi_commit_every: std::time::Duration::from_secs(60),
            omi_upstream: upstream.map(str::to_owned),
            omi_upstream_audio: audio,
            omi_upstream_queue_bytes: 4 << 20,
        };
        let ok = args(Some("127.0.0.1:8080"), Some("ws://pusher:8080"), true);
        let upstream = ok.into_config(60).unwrap().upstream.unwrap();
        assert!(upstream.audio);
        assert_eq!(upstream.queue_bytes, 4 << 20);
        assert!(
            args(None, Some("ws://pusher:8080"), false)
                .into_config(60)
                .is_err()
        );
        assert!(
            args(Some("127.0.0.1:8080"), None, true)
                .into_config(60)
                .is_err()
        );
        assert!(
            args(Some("127.0.0.1:8080"), None, false)
                .into_config(60)
                .unwrap()
                .upstream
                .is_none()
        );
    }
}
