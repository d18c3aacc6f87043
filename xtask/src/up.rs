//! `cargo xtask up`: the embedded S3 server, the uploaders and the ingests as processes on
//! loopback, optionally with simulated devices, optionally verifying every object and exiting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use spillway_kit::cluster::{BUCKET, Cluster, ClusterOptions, build_daemons};
use spillway_kit::sim::{DeviceSpec, Progress, Source};

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Simulated devices, each streaming one session; 0 runs the pipeline until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Simulated Omi listen sessions (the pusher WebSocket, timeline version 2, 1 s frames),
    /// each with its own uid and conversation, beside the devices.
    #[arg(long, default_value_t = 0)]
    pub omi: usize,
    /// Seconds of audio each device (and each Omi session) sends.
    #[arg(long, default_value_t = 150.0)]
    pub seconds: f64,
    /// Playback speed: 1 is real time, 10 ten times faster, 0 as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Stream this mono 16-bit WAV file (looped) instead of a synthetic tone.
    #[arg(long)]
    pub wav: Option<PathBuf>,
    /// Sample rate of the synthetic audio.
    #[arg(long, default_value_t = 16_000)]
    pub sample_rate: u32,
    /// Chunk length ingest cuts.
    #[arg(long, default_value_t = 60)]
    pub chunk_seconds: u32,
    /// Upload workers of each uploader.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Uploaders to run, each with its own spool; every ingest forwards to all of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub uploaders: u16,
    /// Ingests to run; devices are spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub ingests: u16,
    /// After the devices finish, check every object against what was sent, then stop and exit
    /// (non-zero on any difference). Starts from an empty state directory.
    #[arg(long)]
    pub verify: bool,
    /// How devices prove their uid: `none` (anyone may write as any uid; local runs) or
    /// `token` (a signed token per device, as deployed).
    #[arg(long, value_enum, default_value_t = spillway_ingest::config::AuthMode::None)]
    pub auth: spillway_ingest::config::AuthMode,
    /// State directory: object store, spool, logs, certificate.
    #[arg(long, default_value = ".spillway/up")]
    pub dir: PathBuf,
    /// Build and run the daemons in release mode.
    #[arg(long)]
    pub release: bool,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    ensure!(
        (args.devices == 0 && args.omi == 0) || args.seconds > 0.0,
        "--seconds must be positive"
    );
    ensure!(
        args.speed >= 0.0,
        "--speed must be 0 (as fast as possible) or positive"
    );
    let bin = build_daemons(args.release)?;
    if args.verify && args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    let cluster = Cluster::start(ClusterOptions {
        dir: args.dir.clone(),
        bin,
        chunk_seconds: args.chunk_seconds,
        workers: args.workers,
        uploaders: usize::from(args.uploaders),
        ingests: usize::from(args.ingests),
        uploader_args: Vec::new(),
        ingest_args: Vec::new(),
        device_auth: args.auth == spillway_ingest::config::AuthMode::Token,
        store_tls: false,
    })
    .await?;
    let ingests: Vec<SocketAddr> = cluster.ingests.iter().map(|i| i.quic).collect();
    let s3_endpoint = cluster.s3_endpoint.clone();
    let cert = cluster.cert.clone();
    let dir = cluster.dir.clone();

    println!("Spillway is up:");
    for (i, node) in cluster.ingests.iter().enumerate() {
        println!(
            "  ingest {i}    quic://{}  (ALPN spillway/1, certificate {})  ops http://{}/metrics",
            node.quic,
            cluster.cert_path.display(),
            node.http
        );
    }
    for (i, node) in cluster.uploaders.iter().enumerate() {
        println!(
            "  uploader {i}  grpc+tls://{}  ops http://{}/metrics  spool {}",
            node.grpc,
            node.http,
            cluster.spool_dir(i).display()
        );
    }
    println!(
        "  link        mutual TLS, CA and certificates in {}",
        cluster
            .pki_files
            .ca
            .parent()
            .map_or_else(String::new, |d| d.display().to_string())
    );
    println!(
        "  s3          {s3_endpoint}  bucket {BUCKET}  (access key {}, files in {})",
        spillway_kit::s3::ACCESS_KEY,
        dir.join("s3").display()
    );
    println!("  logs        {}", cluster.logs.display());

    let omi: Vec<SocketAddr> = cluster.ingests.iter().map(|n| n.omi).collect();
    for (i, addr) in omi.iter().enumerate() {
        println!(
            "  omi {i}       ws://{addr}/v1/trigger/listen  (Omi's pusher protocol, no authentication)"
        );
    }
    let result = if args.devices == 0 && args.omi == 0 {
        println!("Press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
        Ok(())
    } else {
        let token = |uid: &str| cluster.token(uid);
        simulate(&args, &ingests, &omi, &cert, &s3_endpoint, &token).await
    };
    println!("stopping");
    let stopped = cluster.stop().await;
    result?;
    stopped
}

async fn simulate(
    args: &UpArgs,
    ingests: &[SocketAddr],
    omi_addrs: &[SocketAddr],
    cert: &[u8],
    s3_endpoint: &str,
    token: &dyn Fn(&str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let (source_for, rate): (Box<dyn Fn(u64) -> Source>, u32) = match &args.wav {
        Some(path) => {
            let (source, rate) = Source::wav_file(path)?;
            (Box::new(move |_| source.clone()), rate)
        }
        None => {
            let rate = args.sample_rate;
            (
                Box::new(move |seed| Source::Synthetic {
                    seed,
                    sample_rate: rate,
                }),
                rate,
            )
        }
    };
    spillway_proto::validate::sample_rate(rate)?;
    let samples = (args.seconds * f64::from(rate)).round() as u64;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let total_bytes = samples * 2 * args.devices as u64;
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} sent, {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = Progress::new(bar);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..args.devices {
        let uid = format!("device-{d:03}");
        let spec = DeviceSpec {
            token: token(&uid)?,
            uid,
            session: format!("run-{run_id}"),
            sample_rate: rate,
            samples,
            speed: args.speed,
            mean_frame_bytes: (rate as usize / 10).max(1),
            source: source_for(d as u64 + 1),
            seed: d as u64,
        };
        let ingest = ingests[d % ingests.len()];
        let (cert, progress) = (cert.to_vec(), progress.clone());
        tasks.spawn(async move {
            let device =
                spillway_ingest::client::Device::connect(ingest, "localhost", &cert).await?;
            let report = spillway_kit::sim::run_device(&device, spec, &progress).await;
            device.close().await;
            report
        });
    }
    let mut omi_tasks = tokio::task::JoinSet::new();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        .floor();
    for o in 0..args.omi {
        let spec = spillway_kit::omi_sim::OmiSpec {
            uid: format!("omi-{o:03}"),
            conversation: format!("conv-{run_id}"),
            sample_rate: rate,
            seconds: args.seconds.ceil() as u32,
            speed: args.speed,
            t0: t0 + 0.25,
            seed: o as u64 + 1,
        };
        let addr = omi_addrs[o % omi_addrs.len()];
        let limit = Duration::from_secs_f64(if args.speed > 0.0 {
            args.seconds / args.speed + 120.0
        } else {
            600.0
        });
        omi_tasks.spawn(async move {
            let played = spillway_kit::omi_sim::play(addr, &spec, limit).await;
            played.map(|p| (spec, p))
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        reports.push(r.context("device task")??);
    }
    progress.bar.finish();
    let elapsed = started.elapsed();
    let sent: u64 = reports.iter().map(|r| r.sent_bytes).sum();
    let acked: usize = reports.iter().map(|r| r.acks.len()).sum();
    let errors: usize = reports.iter().map(|r| r.errors.len()).sum();
    println!(
        "{} devices sent {:.1} s of audio each ({} bytes in all) in {:.1} s; {acked} chunks acked; {errors} errors",
        args.devices,
        args.seconds,
        sent,
        elapsed.as_secs_f64()
    );
    for r in reports.iter().filter(|r| !r.errors.is_empty()) {
        eprintln!("  {}/{}: {:?}", r.spec.uid, r.spec.session, r.errors);
    }
    let mut omi_played = Vec::new();
    while let Some(r) = omi_tasks.join_next().await {
        omi_played.push(r.context("Omi session task")??);
    }
    if args.omi > 0 {
        let reconnects: u32 = omi_played.iter().map(|(_, p)| p.reconnects).sum();
        println!(
            "{} Omi sessions sent {} s of audio each; {reconnects} reconnects",
            args.omi,
            args.seconds.ceil()
        );
    }
    if !args.verify {
        return Ok(());
    }
    let s3 = spillway_kit::s3::client(s3_endpoint).await;
    for (spec, _) in &omi_played {
        let waited = Instant::now();
        let audit = loop {
            let audit = spillway_kit::omi_sim::audit(&s3, BUCKET, spec).await?;
            if audit.missing == 0.0 || waited.elapsed() > Duration::from_secs(120) {
                break audit;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(
            audit.missing == 0.0 && audit.duplicated == 0.0 && audit.altered == 0,
            "Omi session {}: {audit:?}",
            spec.uid
        );
    }
    if args.omi > 0 {
        println!(
            "verified {} Omi sessions: every second of each capture stored once, in Omi's layout",
            args.omi
        );
    }
    let mut objects = 0;
    for r in &reports {
        objects +=
            spillway_kit::sim::verify_device(&s3, BUCKET, r, Duration::from_secs(120)).await?;
    }
    println!(
        "verified {objects} objects in bucket {BUCKET}: every one is a valid WAV equal to the audio sent"
    );
    Ok(())
}
