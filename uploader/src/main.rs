use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = spillway_uploader::Args::parse();
    spillway_proto::ops::init_tracing(args.log_format);
    let (listen, http_listen) = (args.listen, args.http_listen);
    let config = args.into_config()?;
    let grpc = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding gRPC on {listen}"))?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| format!("binding HTTP on {http_listen}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            spillway_proto::ops::termination_signal().await;
            shutdown.cancel();
        }
    });
    spillway_uploader::run(
        config,
        spillway_uploader::Listeners { grpc, http },
        shutdown,
    )
    .await
}
