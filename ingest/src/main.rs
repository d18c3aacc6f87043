use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = spillway_ingest::Args::parse();
    if let Some(command) = args.command.take() {
        return command.run().await;
    }
    spillway_ops::init_tracing(args.log_format);
    let (listen, http_listen, omi_listen) = (args.listen, args.http_listen, args.omi.omi_listen);
    let config = args.into_config()?;
    let quic =
        std::net::UdpSocket::bind(listen).with_context(|| format!("binding QUIC on {listen}"))?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| format!("binding HTTP on {http_listen}"))?;
    let omi = match omi_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the Omi WebSocket on {addr}"))?,
        ),
        None => None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            spillway_ops::termination_signal().await;
            shutdown.cancel();
        }
    });
    spillway_ingest::run(
        config,
        spillway_ingest::Listeners { quic, http, omi },
        shutdown,
    )
    .await
}
