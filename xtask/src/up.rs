//! `cargo xtask up`: the embedded S3 server, the uploader and ingest as three processes on
//! loopback, optionally with simulated devices, optionally verifying every object and exiting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::process::{Child, Command};

use crate::pipeline::wait_ready;
use crate::sim::{DeviceSpec, Progress, Source};

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Simulated devices, each streaming one session; 0 runs the pipeline until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Seconds of audio each device sends.
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
    /// Upload workers.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// After the devices finish, check every object against what was sent, then stop and exit
    /// (non-zero on any difference). Starts from an empty state directory.
    #[arg(long)]
    pub verify: bool,
    /// State directory: object store, spool, logs, certificate.
    #[arg(long, default_value = ".spillway/up")]
    pub dir: PathBuf,
    /// Build and run the daemons in release mode.
    #[arg(long)]
    pub release: bool,
}

const BUCKET: &str = "spillway";

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A daemon process, killed if dropped while still running.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { name, child, log })
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit (SIGKILL after 30 s).
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                ensure!(
                    status.success(),
                    "{} exited with {status}; see {}",
                    self.name,
                    self.log.display()
                );
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not stop within 30 s of SIGTERM; killed", self.name)
            }
        }
    }
}

async fn wait_tcp(addr: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        proc.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{} not listening on {addr} after 30 s",
            proc.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn ready(addr: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    tokio::select! {
        r = wait_ready(addr) => r.with_context(|| format!("{}; see {}", proc.name, proc.log.display())),
        r = async { loop { proc.check_alive()?; tokio::time::sleep(Duration::from_millis(100)).await; } } => r,
    }
}

/// Builds the real `ingest` and `uploader` binaries (and `xtask`, which serves the store) and
/// returns the directory holding them.
///
/// Builds every workspace binary: that selects the same features as `cargo test --workspace`,
/// so after the tests nothing is compiled again (building only the two daemons would unify
/// features differently and rebuild much of the AWS SDK).
fn build_daemons(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins"]);
    // `cargo run` gave this process the variables it sets for a package (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Some build scripts (ring's) watch those, so passing them on would
    // make this build and every later plain `cargo` build rebuild each other's dependencies.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*name);
        }
    }
    if release {
        cmd.arg("--release");
    }
    eprintln!("building the daemons: {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "cargo build failed");
    // This program was built into <target>/<profile>/xtask by the same cargo, so the target
    // directory is two levels up, whatever CARGO_TARGET_DIR or the config says.
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let target = me
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not inside a cargo target directory", me.display()))?;
    let dir = target.join(if release { "release" } else { "debug" });
    for daemon in ["ingest", "uploader", "xtask"] {
        let path = dir.join(daemon);
        ensure!(path.is_file(), "{} was not built", path.display());
    }
    Ok(dir)
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    ensure!(
        args.devices == 0 || args.seconds > 0.0,
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
    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let dir = std::fs::canonicalize(&args.dir)?;

    let (s3_addr, ugrpc, uhttp, ihttp, iquic) = (
        free_tcp()?,
        free_tcp()?,
        free_tcp()?,
        free_tcp()?,
        free_udp()?,
    );
    let s3_endpoint = format!("http://{s3_addr}");
    // The freshly built xtask binary serves the store: the running one may just have been
    // replaced on disk by the build above.
    let mut s3 = Proc::spawn(
        "s3",
        &bin.join("xtask"),
        &[
            "s3".into(),
            "--root".into(),
            dir.join("s3").display().to_string(),
            "--listen".into(),
            s3_addr.to_string(),
        ],
        &[],
        &logs,
    )?;
    wait_tcp(s3_addr, &mut s3).await?;

    let creds = [
        ("AWS_ACCESS_KEY_ID", crate::s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", crate::s3::SECRET_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let mut uploader = Proc::spawn(
        "uploader",
        &bin.join("uploader"),
        &[
            "--listen".into(),
            ugrpc.to_string(),
            "--http-listen".into(),
            uhttp.to_string(),
            "--spool-dir".into(),
            dir.join("spool").display().to_string(),
            "--s3-endpoint".into(),
            s3_endpoint.clone(),
            "--bucket".into(),
            BUCKET.into(),
            "--create-bucket".into(),
            "--workers".into(),
            args.workers.to_string(),
            "--max-chunk-seconds".into(),
            args.chunk_seconds.max(60).to_string(),
        ],
        &creds,
        &logs,
    )?;
    ready(uhttp, &mut uploader).await?;

    let cert_path = dir.join("ingest-cert.der");
    let mut ingest = Proc::spawn(
        "ingest",
        &bin.join("ingest"),
        &[
            "--listen".into(),
            iquic.to_string(),
            "--http-listen".into(),
            ihttp.to_string(),
            "--uploader".into(),
            format!("http://{ugrpc}"),
            "--dev-cert-out".into(),
            cert_path.display().to_string(),
            "--chunk-seconds".into(),
            args.chunk_seconds.to_string(),
        ],
        &[],
        &logs,
    )?;
    ready(ihttp, &mut ingest).await?;
    let cert =
        std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;

    println!("Spillway is up:");
    println!(
        "  ingest    quic://{iquic}  (ALPN spillway/1, certificate {})  ops http://{ihttp}/metrics",
        cert_path.display()
    );
    println!(
        "  uploader  grpc://{ugrpc}  ops http://{uhttp}/metrics  spool {}",
        dir.join("spool").display()
    );
    println!(
        "  s3        {s3_endpoint}  bucket {BUCKET}  (access key {}, files in {})",
        crate::s3::ACCESS_KEY,
        dir.join("s3").display()
    );
    println!("  logs      {}", logs.display());

    let result = if args.devices == 0 {
        println!("Press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
        Ok(())
    } else {
        simulate(&args, iquic, &cert, &s3_endpoint).await
    };
    println!("stopping");
    let stopped = [ingest.stop().await, uploader.stop().await, s3.stop().await];
    result?;
    for r in stopped {
        r?;
    }
    Ok(())
}

async fn simulate(
    args: &UpArgs,
    ingest: SocketAddr,
    cert: &[u8],
    s3_endpoint: &str,
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
        let spec = DeviceSpec {
            uid: format!("device-{d:03}"),
            session: format!("run-{run_id}"),
            sample_rate: rate,
            samples,
            speed: args.speed,
            mean_frame_bytes: (rate as usize / 10).max(1),
            source: source_for(d as u64 + 1),
            seed: d as u64,
        };
        let (cert, progress) = (cert.to_vec(), progress.clone());
        tasks.spawn(async move {
            let device =
                spillway_ingest::client::Device::connect(ingest, "localhost", &cert).await?;
            let report = crate::sim::run_device(&device, spec, &progress).await;
            device.close().await;
            report
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
    if !args.verify {
        return Ok(());
    }
    let s3 = crate::s3::client(s3_endpoint).await;
    let mut objects = 0;
    for r in &reports {
        objects += crate::sim::verify_device(&s3, BUCKET, r, Duration::from_secs(120)).await?;
    }
    println!(
        "verified {objects} objects in bucket {BUCKET}: every one is a valid WAV equal to the audio sent"
    );
    Ok(())
}
