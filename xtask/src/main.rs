use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Spillway's local orchestration")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the S3 server, uploader and ingest locally; optionally simulate devices and verify.
    Up(xtask::up::UpArgs),
    /// Kill, starve and damage a running cluster under load; audit that nothing acknowledged
    /// was lost or duplicated.
    Chaos(xtask::chaos::ChaosArgs),
    /// Attack a cluster of the real binaries beside honest devices; report what each attack got
    /// (must be nothing) and what the honest devices lost (must be nothing).
    Attack(xtask::attack::AttackArgs),
    /// Measure Spillway against baselines run on the same machine in the same run; write
    /// target/bench/results.json (and, with --record, BENCHMARKS.md).
    Bench(xtask::bench::BenchArgs),
    /// Validate deploy/ offline: render the overlays, check them against the binaries' flags,
    /// ports and metrics, and against the Kubernetes schemas.
    DeployCheck(xtask::deploy_check::DeployCheckArgs),
    /// Write a throwaway CA and the ingest → uploader link's certificates (uploader: serverAuth
    /// for localhost, 127.0.0.1 and spillway-uploader; ingest: clientAuth) as PEM into DIR/pki.
    Pki {
        #[arg(long, default_value = ".spillway")]
        dir: PathBuf,
    },
    /// A QUIC server that reads every stream to its end and discards it (the bench's baseline).
    QuicSink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// A WebSocket server on the Omi pusher's route that reads every message and discards it
    /// (the bench's baseline for the Omi front end).
    WsSink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serve the embedded S3-compatible store (what `up` starts as its first process).
    S3 {
        /// Directory holding one folder per bucket.
        #[arg(long, default_value = ".spillway/s3")]
        root: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Answer every request this much later (e.g. 30ms), as a remote store would.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        latency: std::time::Duration,
        /// Serve HTTPS, with a throwaway CA and certificate (localhost, 127.0.0.1) kept in
        /// ROOT.tls/ (made there on first use, so a restarted store is still trusted); clients
        /// trust ROOT.tls/ca.pem (the uploader's --s3-ca-file).
        #[arg(long)]
        tls: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up(args) => xtask::up::up(args).await,
        Cmd::Chaos(args) => xtask::chaos::chaos(args).await,
        Cmd::Attack(args) => xtask::attack::attack(args).await,
        Cmd::Bench(args) => xtask::bench::bench(args).await,
        Cmd::DeployCheck(args) => xtask::deploy_check::deploy_check(args),
        Cmd::Pki { dir } => {
            let files = spillway_kit::pki::DevPki::generate()?.write(&dir)?;
            println!("CA          {}", files.ca.display());
            println!(
                "uploader    {} {}",
                files.uploader_cert.display(),
                files.uploader_key.display()
            );
            println!(
                "ingest      {} {}",
                files.ingest_cert.display(),
                files.ingest_key.display()
            );
            Ok(())
        }
        Cmd::QuicSink { listen, cert, key } => {
            xtask::bench::ingest::quic_sink(listen, &cert, &key).await
        }
        Cmd::WsSink { listen } => xtask::bench::ingest::ws_sink(listen).await,
        Cmd::S3 {
            root,
            listen,
            latency,
            tls,
        } => {
            spillway_ops::init_tracing(spillway_ops::LogFormat::Text);
            // The certificate exists before the port opens: a client that waits for the port
            // (the bench) then finds the CA file.
            let pki = if tls {
                Some(spillway_kit::pki::StorePki::load_or_generate(
                    &spillway_kit::s3::tls_dir(&root),
                )?)
            } else {
                None
            };
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    spillway_ops::termination_signal().await;
                    stop.cancel();
                }
            });
            let Some((pki, files)) = pki else {
                tracing::info!(%listen, root = %root.display(), ?latency, "S3 server listening");
                return spillway_kit::s3::serve_with_latency(&root, listener, stop, latency).await;
            };
            tracing::info!(endpoint = %format!("https://{listen}"), ca = %files.ca.display(),
                root = %root.display(), ?latency, "S3 server listening over HTTPS");
            spillway_kit::s3::serve_tls(&root, listener, stop, latency, &pki).await
        }
    }
}
