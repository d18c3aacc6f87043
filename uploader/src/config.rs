//! Uploader configuration: flags with `SPILLWAY_*` environment fallbacks, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spillway_ops::LogFormat;

use spillway_proto::link::Link;

use crate::adaptive::{Bounds, Workers};
use crate::object::KeyTemplate;
use crate::seal::Sealer;
use crate::spool::WhenFull;
use crate::transport::{PayloadSigning, StoreCa};

/// The `uploader` command line: the daemon's flags, or a subcommand.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "uploader",
    version,
    about = "Spillway uploader: commits chunks to a disk spool before acknowledging, then drains it to S3",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

/// What the `uploader` binary does besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
// Parsed once per process: boxing the daemon's flags would save nothing worth the indirection.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Upload everything in a spool directory (one a scaled-down uploader left behind) and
    /// exit: 0 once the spool is empty, 2 when --drain-timeout passed first (what is left stays
    /// spooled). Takes the daemon's flags; the listen addresses are not used.
    Drain(Flags),
    /// Decrypt an object Omi stored with its "enhanced" encryption at rest (`….batch.enc`:
    /// AES-256-GCM frames under a per-user key derived from its ENCRYPTION_SECRET) to raw
    /// PCM16LE mono, or to a WAV with --wav. Writes nothing unless every frame authenticates;
    /// exits 1 on any error.
    OmiDecrypt(OmiDecrypt),
    /// A running uploader's state at a glance, read from its /metrics (two scrapes --interval
    /// apart, for rates) and /readyz: readiness, the spool's fill and oldest chunk, uploads and
    /// the store's circuit breaker, commits, refusals by reason and losses. --json for scripts.
    Status(crate::status::StatusArgs),
}

/// Arguments of `uploader omi-decrypt`.
#[derive(Debug, Clone, clap::Args)]
pub struct OmiDecrypt {
    /// File holding Omi's ENCRYPTION_SECRET (one trailing newline is not part of it).
    #[arg(long, env = "SPILLWAY_OMI_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// The Omi user id the object belongs to.
    #[arg(long)]
    pub uid: String,
    /// Write a WAV (mono, 16-bit) instead of raw PCM.
    #[arg(long)]
    pub wav: bool,
    /// The WAV's sample rate in Hz (8000 to 48000).
    #[arg(long, default_value_t = 16_000, requires = "wav", value_parser = parse_sample_rate)]
    pub sample_rate: u32,
    /// The encrypted object; `-` reads standard input.
    pub input: PathBuf,
    /// Where the audio goes; `-` writes standard output.
    pub output: PathBuf,
}

fn parse_sample_rate(s: &str) -> Result<u32, String> {
    let rate = s.trim().parse::<u32>().map_err(|e| e.to_string())?;
    spillway_proto::validate::sample_rate(rate).map_err(|e| e.to_string())?;
    Ok(rate)
}

/// Flags of the `uploader` daemon (and of `uploader drain`).
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// TCP address of the gRPC service ingest calls.
    #[arg(
        long,
        env = "SPILLWAY_UPLOADER_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// TCP address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "SPILLWAY_UPLOADER_HTTP_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub http_listen: SocketAddr,
    /// Directory of the sled spool.
    #[arg(long, env = "SPILLWAY_SPOOL_DIR", default_value = ".spillway/spool")]
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold; it never holds more.
    #[arg(long, env = "SPILLWAY_SPOOL_MAX_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub spool_max_bytes: u64,
    /// Most chunks the spool may hold (each costs an inode and a block, however small);
    /// default: one per 16 KiB of --spool-max-bytes.
    #[arg(long, env = "SPILLWAY_SPOOL_MAX_CHUNKS")]
    pub spool_max_chunks: Option<u64>,
    /// When the spool is full: `reject` refuses the put (RESOURCE_EXHAUSTED; ingest holds the
    /// chunk and retries, pushing back on devices) or `drop-oldest` evicts the oldest chunks
    /// (counted in spillway_uploader_spool_dropped_chunks_total and logged).
    #[arg(long, env = "SPILLWAY_WHEN_FULL", value_enum, default_value_t = WhenFull::Reject)]
    pub when_full: WhenFull,
    /// The spool format this uploader writes and marks its spool with: by default the newest
    /// it knows. During an upgrade whose release raises the format, pin the one before (the
    /// running release's) so that release can still open every spool: rolling back needs no
    /// drain until the pin is removed (deploy/README.md, "Upgrades and rollbacks").
    #[arg(long, env = "SPILLWAY_SPOOL_FORMAT")]
    pub spool_format: Option<u32>,
    /// Fraction of --spool-max-bytes above which /readyz answers 503, so a load balancer
    /// steers new work to other uploaders (0 < x <= 1).
    #[arg(long, env = "SPILLWAY_SPOOL_HIGH_WATERMARK", default_value_t = 0.9)]
    pub spool_high_watermark: f64,
    /// Concurrent uploads to the object store: a number (1..=1024), or `auto` to adjust it to
    /// the store's latency and errors between --workers-min and --workers-max.
    #[arg(long, env = "SPILLWAY_WORKERS", default_value = "16", value_parser = parse_workers)]
    pub workers: WorkersFlag,
    /// Fewest concurrent uploads `--workers auto` goes down to.
    #[arg(long, env = "SPILLWAY_WORKERS_MIN", default_value_t = 1)]
    pub workers_min: usize,
    /// Most concurrent uploads `--workers auto` goes up to (and most chunks in memory).
    #[arg(long, env = "SPILLWAY_WORKERS_MAX", default_value_t = 256)]
    pub workers_max: usize,
    /// Longest chunk accepted, in seconds; gRPC message limits derive from it.
    #[arg(long, env = "SPILLWAY_MAX_CHUNK_SECONDS", default_value_t = 60)]
    pub max_chunk_seconds: u32,
    /// Most PutChunk calls in flight, from all ingests together; one more is refused
    /// RESOURCE_EXHAUSTED before its body is read. Each holds up to two largest chunks, so this
    /// bounds the uploader's memory whatever the number of ingests (deploy/README.md, "Memory").
    #[arg(long, env = "SPILLWAY_MAX_PUTS_IN_FLIGHT", default_value_t = 64)]
    pub max_puts_in_flight: usize,
    /// Longest one PutChunk call may take, body and commit included (a client that trickles
    /// its body holds a slot no longer than this).
    #[arg(long, env = "SPILLWAY_PUT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub put_timeout: Duration,
    /// Bucket objects are written to.
    #[arg(long, env = "SPILLWAY_BUCKET", default_value = "spillway")]
    pub bucket: String,
    /// Create the bucket at start when it does not exist.
    #[arg(long, env = "SPILLWAY_CREATE_BUCKET")]
    pub create_bucket: bool,
    /// S3-compatible endpoint URL; unset means AWS S3 itself.
    #[arg(long, env = "SPILLWAY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// What SigV4 signs of each object's body: `signed` its SHA-256, `unsigned`
    /// UNSIGNED-PAYLOAD (https:// endpoints only: TLS protects the body in flight), `auto`
    /// unsigned exactly when the endpoint is https:// (AWS S3 is). Every body also carries a
    /// CRC32C the store verifies.
    #[arg(long, env = "SPILLWAY_S3_PAYLOAD_SIGNING", value_enum, default_value_t = PayloadSigning::Auto)]
    pub s3_payload_signing: PayloadSigning,
    /// PEM file of the CA (one or more certificates) the store's certificate must chain to,
    /// in place of the system's roots: for an https:// --s3-endpoint with a private CA.
    #[arg(long, env = "SPILLWAY_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,
    /// Region of the bucket.
    #[arg(long, env = "SPILLWAY_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Prefix substituted for {prefix} in the key template.
    #[arg(long, env = "SPILLWAY_KEY_PREFIX", default_value = "")]
    pub key_prefix: String,
    /// Object key template: {prefix} {uid} {session} {seq} or {seq:0N}; must name uid, session, seq.
    #[arg(long, env = "SPILLWAY_KEY_TEMPLATE", default_value = crate::object::DEFAULT_TEMPLATE)]
    pub key_template: String,
    /// File holding Omi's ENCRYPTION_SECRET (at least 32 bytes; a Kubernetes Secret mounted as
    /// a file): chunks of the Omi front end are then stored as Omi's "enhanced" encryption at
    /// rest, `.batch.enc` (HKDF-SHA256 per uid, AES-256-GCM). Without it they are `.batch.bin`.
    #[arg(long, env = "SPILLWAY_OMI_SECRET_FILE")]
    pub omi_secret_file: Option<PathBuf>,
    /// Consecutive upload failures that open the object-store circuit breaker.
    #[arg(long, env = "SPILLWAY_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker first waits before a probe upload; doubles on each failed probe.
    #[arg(long, env = "SPILLWAY_BREAKER_OPEN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_open: Duration,
    /// Ceiling of that wait: the longest the drain can lag behind a store that came back.
    #[arg(long, env = "SPILLWAY_BREAKER_MAX_OPEN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub breaker_max_open: Duration,
    /// Timeout of one PutObject attempt.
    #[arg(long, env = "SPILLWAY_UPLOAD_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub upload_timeout: Duration,
    /// On SIGTERM, how long to keep uploading before exiting; what is left stays spooled and
    /// is drained at the next start. For `uploader drain`, how long it may take in all.
    #[arg(long, env = "SPILLWAY_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Log format.
    #[arg(long, env = "SPILLWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The gRPC link's security.
    #[command(flatten)]
    pub link: spillway_proto::link::LinkArgs,
}

/// The value of `--workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkersFlag {
    Fixed(usize),
    Auto,
}

/// Most concurrent uploads, fixed or adaptive.
pub const MAX_WORKERS: usize = 1024;

fn parse_workers(s: &str) -> Result<WorkersFlag, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(WorkersFlag::Auto);
    }
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(WorkersFlag::Fixed(n)),
        _ => Err(format!(
            "expected a number of concurrent uploads from 1 to {MAX_WORKERS}, or `auto`"
        )),
    }
}

/// Static credentials, for tests and local runs; production uses the standard AWS chain.
#[derive(Debug, Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Validated configuration that [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Config {
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_max_chunks: u64,
    pub when_full: WhenFull,
    /// The format the spool is marked with and written in (`--spool-format`).
    pub spool_format: u32,
    pub spool_high_watermark: f64,
    /// Concurrent uploads when `adaptive` is `None`. With `--workers auto` it holds the maximum
    /// (the most uploads, and chunks in memory, at once) and the drain does not use it.
    pub workers: usize,
    /// `--workers auto`: the drain adjusts its concurrency between these bounds
    /// (`--workers-min`, `--workers-max`). `None`: `workers` uploads at once.
    pub adaptive: Option<Bounds>,
    pub max_chunk_seconds: u32,
    pub max_puts_in_flight: usize,
    pub put_timeout: Duration,
    /// The gRPC listener's security (`--internal-*` or `--insecure-internal`).
    pub link: Link,
    pub bucket: String,
    pub create_bucket: bool,
    pub s3_endpoint: Option<String>,
    /// `--s3-payload-signing`: `unsigned` is valid only with an `https://` endpoint.
    pub s3_payload_signing: PayloadSigning,
    /// `--s3-ca-file`, read and checked: the store's certificate must chain to it.
    pub s3_ca: Option<StoreCa>,
    pub region: String,
    pub key_prefix: String,
    pub key_template: KeyTemplate,
    /// Seals Omi-layout chunks (`--omi-secret-file`); `None`: stored in the clear.
    pub omi_sealer: Option<Arc<Sealer>>,
    pub upload_timeout: Duration,
    pub drain_timeout: Duration,
    pub breaker: spillway_breaker::Config,
    /// Overrides the AWS credential chain when set (not a flag: tests and xtask only).
    pub credentials: Option<StaticCredentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--workers must be 1..=1024 or auto, got {0}")]
    Workers(usize),
    #[error("--workers-min must be at least 1, got {0}")]
    WorkersMin(usize),
    #[error("--workers-max must be from --workers-min ({min}) to 1024, got {max}")]
    WorkersMax { min: usize, max: usize },
    #[error("--max-chunk-seconds must be 1..=600, got {0}")]
    MaxChunkSeconds(u32),
    #[error(
        "--spool-format must be {oldest}..={newest} (the spool formats this uploader writes), got {0}",
        oldest = crate::spool::OLDEST_PIN,
        newest = crate::spool::FORMAT
    )]
    SpoolFormat(u32),
    #[error("--spool-max-chunks must be at least 1")]
    SpoolMaxChunks,
    #[error("--max-puts-in-flight must be 1..=4096, got {0}")]
    MaxPutsInFlight(usize),
    #[error("--put-timeout must be 1s to 10m")]
    PutTimeout,
    #[error("--spool-max-bytes ({max}) must hold at least one largest chunk ({need} bytes)")]
    SpoolTooSmall { max: u64, need: u64 },
    #[error(
        "--breaker-failures must be at least 1 and --breaker-open at most --breaker-max-open, both non-zero"
    )]
    Breaker,
    #[error("--spool-high-watermark must be in (0, 1], got {0}")]
    HighWatermark(f64),
    #[error("--bucket {0:?} is not a valid bucket name (3-63 characters of a-z, 0-9, '.', '-')")]
    Bucket(String),
    #[error(transparent)]
    UnsignedOverHttp(#[from] crate::transport::UnsignedOverHttp),
    #[error("--s3-ca-file needs an https:// --s3-endpoint, got {0}")]
    CaOverHttp(String),
    #[error("reading --s3-ca-file {path}: {source}")]
    CaRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--s3-ca-file {path} {source}")]
    Ca {
        path: PathBuf,
        source: crate::transport::CaError,
    },
    #[error("--omi-secret-file: {0}")]
    OmiSecret(#[from] crate::seal::SealError),
    #[error("--key-template: {0}")]
    KeyTemplate(#[from] crate::object::TemplateError),
    #[error(transparent)]
    NoLink(spillway_proto::link::NoLink),
    #[error(transparent)]
    LinkTls(#[from] spillway_proto::link::LinkError),
}

impl Config {
    /// Local defaults around a spool directory and an endpoint; tests start from here.
    pub fn local(spool_dir: PathBuf, s3_endpoint: String, bucket: String) -> Self {
        Self {
            spool_dir,
            spool_max_bytes: 1024 * 1024 * 1024,
            spool_max_chunks: crate::spool::default_max_chunks(1024 * 1024 * 1024),
            when_full: WhenFull::Reject,
            spool_format: crate::spool::FORMAT,
            spool_high_watermark: 0.9,
            workers: 16,
            adaptive: None,
            max_chunk_seconds: 60,
            max_puts_in_flight: 64,
            put_timeout: Duration::from_secs(60),
            link: Link::Insecure,
            bucket,
            create_bucket: true,
            s3_endpoint: Some(s3_endpoint),
            s3_payload_signing: PayloadSigning::Auto,
            s3_ca: None,
            region: "us-east-1".into(),
            key_prefix: String::new(),
            key_template: KeyTemplate::default(),
            omi_sealer: None,
            upload_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            breaker: breaker_config(5, Duration::from_secs(1), Duration::from_secs(5)),
            credentials: None,
        }
    }

    /// How the drain sizes its pool of uploads.
    pub fn worker_pool(&self) -> Workers {
        match self.adaptive {
            Some(bounds) => Workers::Auto(bounds),
            None => Workers::Fixed(self.workers),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(ConfigError::Workers(self.workers));
        }
        if let Some(Bounds { min, max }) = self.adaptive {
            if min == 0 {
                return Err(ConfigError::WorkersMin(min));
            }
            if !(min..=MAX_WORKERS).contains(&max) {
                return Err(ConfigError::WorkersMax { min, max });
            }
        }
        if !(1..=600).contains(&self.max_chunk_seconds) {
            return Err(ConfigError::MaxChunkSeconds(self.max_chunk_seconds));
        }
        let need = spillway_proto::validate::max_chunk_bytes(self.max_chunk_seconds) as u64;
        if self.spool_max_bytes < need {
            return Err(ConfigError::SpoolTooSmall {
                max: self.spool_max_bytes,
                need,
            });
        }
        let b = &self.breaker;
        if b.failure_threshold == 0 || b.open_for.is_zero() || b.open_for > b.max_open_for {
            return Err(ConfigError::Breaker);
        }
        if !(self.spool_high_watermark > 0.0 && self.spool_high_watermark <= 1.0) {
            return Err(ConfigError::HighWatermark(self.spool_high_watermark));
        }
        if crate::spool::writable(self.spool_format).is_err() {
            return Err(ConfigError::SpoolFormat(self.spool_format));
        }
        if self.spool_max_chunks == 0 {
            return Err(ConfigError::SpoolMaxChunks);
        }
        if !(1..=4096).contains(&self.max_puts_in_flight) {
            return Err(ConfigError::MaxPutsInFlight(self.max_puts_in_flight));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.put_timeout) {
            return Err(ConfigError::PutTimeout);
        }
        let endpoint = self.s3_endpoint.as_deref();
        self.s3_payload_signing.check(endpoint)?;
        if let Some(e) = endpoint.filter(|_| self.s3_ca.is_some())
            && !crate::transport::is_https(Some(e))
        {
            return Err(ConfigError::CaOverHttp(e.to_owned()));
        }
        let b = &self.bucket;
        let ok = (3..=63).contains(&b.len())
            && b.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
        if !ok {
            return Err(ConfigError::Bucket(b.clone()));
        }
        Ok(())
    }
}

impl Flags {
    /// The daemon's configuration: the gRPC link must be TLS or explicitly plaintext.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        self.resolve(true)
    }

    /// `uploader drain`'s: it serves nothing, so it needs no link.
    pub fn into_drain_config(self) -> Result<Config, ConfigError> {
        self.resolve(false)
    }

    fn resolve(self, serves: bool) -> Result<Config, ConfigError> {
        let (workers, adaptive) = match self.workers {
            WorkersFlag::Fixed(n) => (n, None),
            WorkersFlag::Auto => {
                let bounds = Bounds {
                    min: self.workers_min,
                    max: self.workers_max,
                };
                (self.workers_max.clamp(1, MAX_WORKERS), Some(bounds))
            }
        };
        let link = match self.link.link()? {
            Some(link) => link,
            None if !serves => Link::Insecure,
            None => return Err(ConfigError::NoLink(spillway_proto::link::NoLink)),
        };
        let config = Config {
            key_template: self.key_template.parse()?,
            spool_dir: self.spool_dir,
            spool_max_bytes: self.spool_max_bytes,
            spool_max_chunks: self
                .spool_max_chunks
                .unwrap_or_else(|| crate::spool::default_max_chunks(self.spool_max_bytes)),
            when_full: self.when_full,
            spool_format: self.spool_format.unwrap_or(crate::spool::FORMAT),
            spool_high_watermark: self.spool_high_watermark,
            workers,
            adaptive,
            max_chunk_seconds: self.max_chunk_seconds,
            max_puts_in_flight: self.max_puts_in_flight,
            put_timeout: self.put_timeout,
            link,
            bucket: self.bucket,
            create_bucket: self.create_bucket,
            s3_endpoint: self.s3_endpoint,
            s3_payload_signing: self.s3_payload_signing,
            s3_ca: self.s3_ca_file.as_deref().map(read_ca).transpose()?,
            region: self.region,
            key_prefix: self.key_prefix,
            omi_sealer: self
                .omi_secret_file
                .as_deref()
                .map(Sealer::from_file)
                .transpose()?
                .map(Arc::new),
            upload_timeout: self.upload_timeout,
            drain_timeout: self.drain_timeout,
            breaker: breaker_config(
                self.breaker_failures,
                self.breaker_open,
                self.breaker_max_open,
            ),
            credentials: None,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Reads and checks `--s3-ca-file`.
fn read_ca(path: &std::path::Path) -> Result<StoreCa, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::CaRead {
        path: path.to_owned(),
        source,
    })?;
    StoreCa::from_pem(&pem).map_err(|source| ConfigError::Ca {
        path: path.to_owned(),
        source,
    })
}

fn breaker_config(failures: u32, open: Duration, max_open: Duration) -> spillway_breaker::Config {
    spillway_breaker::Config {
        failure_threshold: failures,
        open_for: open,
        max_open_for: max_open,
    }
}

/// The uploader's memory bound in bytes (deploy/README.md, "Memory"), set by its own flags
/// alone: `--workers` uploads, each holding up to two largest chunks (`--max-chunk-seconds` at
/// 48 kHz); `--max-puts-in-flight` puts streamed to the spool, each holding its stream's window
/// and a few frames ([`crate::put::STREAMED_CALL_BYTES`]); at most [`crate::put::Gathered::MAX`]
/// puts gathered whole (a chunk each, beside that); plus 128 MiB for the runtime, TLS and the
/// index. deploy-check holds the manifests' limits to it.
pub fn memory_bound(workers: u128, puts_in_flight: u128, max_chunk_seconds: u128) -> u128 {
    const MIB: u128 = 1024 * 1024;
    let largest_chunk =
        max_chunk_seconds * u128::from(spillway_proto::validate::MAX_SAMPLE_RATE) * 2;
    let streamed = u128::from(crate::put::STREAMED_CALL_BYTES);
    let gathered = crate::put::Gathered::MAX as u128;
    2 * workers * largest_chunk
        + puts_in_flight * streamed
        + gathered * (largest_chunk + streamed)
        + 128 * MIB
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, String> {
        let argv = ["uploader", "--insecure-internal"]
            .into_iter()
            .chain(args.iter().copied());
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.flags.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn the_grpc_link_is_tls_or_plaintext_by_name() {
        let bare = Args::try_parse_from(["uploader"]).unwrap();
        let err = bare.flags.into_config().unwrap_err().to_string();
        assert!(
            err.contains("--internal-ca") && err.contains("--insecure-internal"),
            "{err}"
        );
        // `uploader drain` serves nothing: it needs neither.
        let drain = Args::try_parse_from(["uploader"]).unwrap();
        assert!(drain.flags.into_drain_config().is_ok());
        // A half-given TLS set is refused by the parser; a missing file with a clear message.
        assert!(Args::try_parse_from(["uploader", "--internal-ca", "ca.pem"]).is_err());
        let missing = Args::try_parse_from([
            "uploader",
            "--internal-ca",
            "/nonexistent/ca.pem",
            "--internal-cert",
            "c.pem",
            "--internal-key",
            "k.pem",
        ])
        .unwrap();
        let err = missing.flags.into_config().unwrap_err().to_string();
        assert!(
            err.contains("reading --internal-ca /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn workers_is_a_number_or_auto_with_bounds() {
        let c = config(&[]).unwrap();
        assert_eq!((c.workers, c.adaptive), (16, None), "16 fixed by default");
        assert_eq!(c.worker_pool(), Workers::Fixed(16));
        let c = config(&["--workers", "8", "--workers-max", "4"]).unwrap();
        assert_eq!(
            c.worker_pool(),
            Workers::Fixed(8),
            "bounds apply to auto only"
        );
        let c = config(&["--workers", "auto"]).unwrap();
        assert_eq!(c.adaptive, Some(Bounds { min: 1, max: 256 }));
        assert_eq!(c.workers, 256, "the most uploads at once");
        let c = config(&["--workers=AUTO", "--workers-min=8", "--workers-max=64"]).unwrap();
        assert_eq!(c.worker_pool(), Workers::Auto(Bounds { min: 8, max: 64 }));
        let c = config(&["--workers=auto", "--workers-min=1024", "--workers-max=1024"]).unwrap();
        assert_eq!(
            c.adaptive,
            Some(Bounds {
                min: 1024,
                max: 1024
            })
        );
    }

    #[test]
    fn bad_workers_are_refused_plainly() {
        for bad in ["0", "1025", "many", "-3", ""] {
            let e = config(&[&format!("--workers={bad}")]).unwrap_err();
            assert!(e.contains("from 1 to 1024, or `auto`"), "{bad:?}: {e}");
        }
        let e = config(&["--workers", "auto", "--workers-min", "0"]).unwrap_err();
        assert_eq!(e, "--workers-min must be at least 1, got 0");
        let e = config(&["--workers=auto", "--workers-min=10", "--workers-max=5"]).unwrap_err();
        assert_eq!(
            e,
            "--workers-max must be from --workers-min (10) to 1024, got 5"
        );
        let e = config(&["--workers=auto", "--workers-max=2000"]).unwrap_err();
        assert_eq!(
            e,
            "--workers-max must be from --workers-min (1) to 1024, got 2000"
        );
        let mut c = Config::local("s".into(), "http://x".into(), "bucket".into());
        c.workers = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Workers(0))));
        c.workers = 4;
        c.adaptive = Some(Bounds { min: 3, max: 2 });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::WorkersMax { min: 3, max: 2 })
        ));
    }

    #[test]
    fn the_spool_format_is_the_newest_unless_pinned_to_the_one_before() {
        use crate::spool::{FORMAT, OLDEST_PIN};
        assert_eq!(config(&[]).unwrap().spool_format, FORMAT);
        let pinned = config(&["--spool-format", &OLDEST_PIN.to_string()]).unwrap();
        assert_eq!(pinned.spool_format, OLDEST_PIN);
        for bad in [1, FORMAT + 1] {
            let e = config(&["--spool-format", &bad.to_string()]).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "--spool-format must be {OLDEST_PIN}..={FORMAT} (the spool formats this \
                     uploader writes), got {bad}"
                )
            );
        }
    }
}
