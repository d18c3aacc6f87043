//! `ingest stream`: the tool a device-gateway engineer tries first. It streams a mono 16-bit
//! WAV file (or raw PCM s16le from stdin) to an ingest, local or remote, exactly as a device
//! should: through the resuming client, with a device token, keeping audio until an ack's
//! receipt matches what was sent. It prints each ack and a summary, and exits non-zero on any
//! refusal.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use spillway_proto::device::{Encoding, Hello};

use crate::client::{ResumeConfig, stream_resuming};

#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// ingest's QUIC address, HOST:PORT (a name is resolved).
    #[arg(long)]
    pub server: String,
    /// The name ingest's certificate carries (default: the host of --server).
    #[arg(long)]
    pub server_name: Option<String>,
    /// The certificate to trust for ingest: its CA's, or ingest's own self-signed one (PEM or
    /// DER; `cargo xtask up` writes .spillway/up/ingest-cert.der).
    #[arg(long)]
    pub ca: PathBuf,
    /// A file holding the device token (`ingest token issue`); or set SPILLWAY_DEVICE_TOKEN.
    /// Without either, the hello carries none (an ingest running --auth none).
    #[arg(long, env = "SPILLWAY_DEVICE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[arg(long)]
    pub uid: String,
    #[arg(long)]
    pub session: String,
    /// A mono 16-bit WAV file, or `-` for raw PCM s16le mono on stdin (then --sample-rate).
    pub input: PathBuf,
    /// Sample rate of raw PCM from stdin.
    #[arg(long, default_value_t = 16_000)]
    pub sample_rate: u32,
    /// Most unacknowledged audio held in memory; reading the input waits beyond it.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_unacked_bytes: usize,
    /// Give up when nothing was acknowledged for this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub give_up_after: Duration,
}

/// Reads the device token: the file, else the environment, else none.
fn token(args: &StreamArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token in {}", path.display()))?;
        return Ok(text.trim().to_owned());
    }
    Ok(std::env::var("SPILLWAY_DEVICE_TOKEN").unwrap_or_default())
}

/// The trusted certificate in DER, from PEM or DER.
fn trusted(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"-----") {
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(&bytes)
            .with_context(|| format!("{} holds no PEM certificate", path.display()))?;
        return Ok(cert.to_vec());
    }
    Ok(bytes)
}

pub async fn run(args: StreamArgs) -> anyhow::Result<()> {
    let server = tokio::net::lookup_host(&args.server)
        .await
        .with_context(|| format!("resolving {}", args.server))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.server))?;
    let server_name = args.server_name.clone().unwrap_or_else(|| {
        args.server
            .rsplit_once(':')
            .map_or(args.server.as_str(), |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_owned()
    });
    let (pcm_source, sample_rate): (Box<dyn std::io::Read + Send>, u32) =
        if args.input.as_os_str() == "-" {
            (Box::new(std::io::stdin()), args.sample_rate)
        } else {
            let reader = hound::WavReader::open(&args.input)
                .with_context(|| format!("opening {}", args.input.display()))?;
            let spec = reader.spec();
            anyhow::ensure!(
                spec.channels == 1
                    && spec.bits_per_sample == 16
                    && spec.sample_format == hound::SampleFormat::Int,
                "{} is {} channel(s) of {}-bit {:?}; send mono 16-bit PCM",
                args.input.display(),
                spec.channels,
                spec.bits_per_sample,
                spec.sample_format
            );
            let rate = spec.sample_rate;
            let mut file = std::io::BufReader::new(reader.into_inner());
            // hound has read the header: what follows is the data chunk.
            let mut pcm = Vec::new();
            file.read_to_end(&mut pcm)?;
            (Box::new(std::io::Cursor::new(pcm)), rate)
        };
    spillway_proto::validate::sample_rate(sample_rate)?;
    let hello = Hello {
        uid: args.uid.clone(),
        session: args.session.clone(),
        sample_rate,
        encoding: Encoding::PcmS16le as i32,
        channels: 1,
        token: token(&args)?,
        resume_from: 0,
    };
    let mut config = ResumeConfig::local(server, trusted(&args.ca)?);
    config.server_name = server_name;
    config.max_unacked_bytes = args.max_unacked_bytes;
    config.give_up_after = Some(args.give_up_after);

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    // Reads the input on a blocking thread, 64 KiB at a time; the channel holds it back when
    // the client's outbox is full.
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut source = pcm_source;
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = source.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                return Ok(total);
            }
        }
    });
    let started = Instant::now();
    let report = stream_resuming(config, hello, rx).await?;
    let sent = reader.await.context("the input reader")??;
    for ack in &report.acks {
        println!(
            "ack seq {} samples [{}, {}) receipt {} key {}",
            ack.seq,
            ack.first_sample,
            ack.end_sample,
            ack.crc32c.map_or("-".into(), |c| format!("{c:08x}")),
            ack.key
        );
    }
    eprintln!(
        "streamed {sent} bytes ({:.1} s of audio) in {:.1} s: {} chunks acknowledged, {} reconnects, {} receipt mismatches resent",
        sent as f64 / 2.0 / f64::from(sample_rate),
        started.elapsed().as_secs_f64(),
        report.acks.len(),
        report.reconnects,
        report.receipt_mismatches
    );
    for e in &report.errors {
        eprintln!("ingest said: {}", e.message);
    }
    Ok(())
}
