use anyhow::Context;
use clap::Parser;
use spillway_uploader::{Args, Command, Flags};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            spillway_ops::termination_signal().await;
            shutdown.cancel();
        }
    });
    match args.command {
        Some(Command::Drain(flags)) => drain(flags, shutdown).await,
        None => serve(args.flags, shutdown).await,
    }
}

async fn serve(flags: Flags, shutdown: CancellationToken) -> anyhow::Result<()> {
    spillway_ops::init_tracing(flags.log_format);
    let (listen, http_listen) = (flags.listen, flags.http_listen);
    let config = flags.into_config()?;
    let grpc = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding gRPC on {listen}"))?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| format!("binding HTTP on {http_listen}"))?;
    spillway_uploader::run(
        config,
        spillway_uploader::Listeners { grpc, http },
        shutdown,
    )
    .await
}

/// `uploader drain`: exits 0 once the spool is empty, 2 when chunks are left.
async fn drain(flags: Flags, interrupt: CancellationToken) -> anyhow::Result<()> {
    spillway_ops::init_tracing(flags.log_format);
    let config = flags.into_drain_config()?;
    let dir = config.spool_dir.clone();
    let report =
        spillway_uploader::drain_spool(config, std::time::Duration::from_secs(5), interrupt)
            .await?;
    if report.left > 0 {
        eprintln!(
            "uploader drain: {} chunks ({} bytes) are still spooled in {}; run it again",
            report.left,
            report.left_bytes,
            dir.display()
        );
        std::process::exit(2);
    }
    Ok(())
}
