//! Spillway ingest: accepts device audio over QUIC (one stream per session), cuts it into exact
//! chunks and hands each to the uploader, acknowledging to the device only once the uploader has
//! durably committed it.
//!
//! Data path: [`server`] (QUIC bytes) → [`session`] (protocol rules, transport-free) →
//! [`chunker`] (exact chunks, sans-IO) → [`forward`] (gRPC `PutChunk` to a healthy uploader chosen by [`balance`]) → `Ack` back.
//!
//! The transport-free rules live in the `spillway-core` crate (`ingest/core/`), re-exported
//! here under their old paths; this crate holds what does IO.

pub mod admission;
pub mod budget;
pub mod cli;
pub mod config;
pub(crate) mod feed;
pub mod forward;
pub mod metrics;
pub mod omi;
pub mod put_chunk;
mod server;
pub mod tls;

pub use spillway_core::{auth, balance, chunker, fill, outbox, session};
/// The device client (`spillway-device`), under its old path.
pub use spillway_device as client;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use spillway_ops::{self as ops, Readiness};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};

/// Sockets the daemon serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// UDP socket of the QUIC device endpoint.
    pub quic: std::net::UdpSocket,
    /// TCP listener of /metrics, /healthz and /readyz.
    pub http: tokio::net::TcpListener,
    /// TCP listener of the Omi pusher WebSocket (`--omi-listen`), if it is served.
    pub omi: Option<tokio::net::TcpListener>,
}

/// Bytes a device may send on one session beyond what ingest has read: what QUIC buffers for a
/// session that ingest is not reading (waiting for budget, or for the uploader). It lies
/// outside `--max-buffered-bytes`, so it is kept small: 256 KiB is 8 s of 16 kHz audio, and on
/// loopback still lets one session carry tens of MB/s.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;

/// The same for a whole connection, however many sessions it opens (quinn's default is
/// unlimited, which let a connection with 64 unread streams hold 64 × 1.25 MB).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// ingest's QUIC transport: bidirectional streams only (one per session), the receive windows
/// above, no datagrams.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(64u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    transport
}

/// Decides on a connection attempt before any handshake work: under load (half the connection
/// slots held) an address not yet validated is sent a QUIC retry, so a spoofed source cannot
/// take a slot; a source or the whole endpoint at its cap is refused, counted.
fn admit(
    incoming: quinn::Incoming,
    connections: &admission::Connections,
    shared: &Arc<server::Shared>,
    tasks: &TaskTracker,
) {
    let ip = incoming.remote_address().ip();
    if !incoming.remote_address_validated()
        && incoming.may_retry()
        && connections.held() * 2 >= connections.total()
    {
        shared.metrics.quic_retries.inc();
        if let Err(e) = incoming.retry() {
            e.into_incoming().ignore();
        }
        return;
    }
    match connections.try_take(&ip) {
        Ok(slot) => {
            tasks.spawn(server::connection(incoming, Arc::clone(shared), slot));
        }
        Err(full) => {
            let reason = match full {
                admission::Full::Total => "total",
                admission::Full::PerKey => "per_source",
            };
            shared
                .metrics
                .connections_refused
                .get_or_create(&metrics::EndLabel { reason })
                .inc();
            tracing::debug!(%ip, reason, "connection refused");
            incoming.refuse();
        }
    }
}

/// Runs ingest until `shutdown` is cancelled, then stops accepting, flushes every session's
/// pending audio, waits up to the shutdown grace for the uploader's acks, and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let omi_upstream = match &config.omi.upstream {
        Some(upstream) => Some(Arc::new(omi::Upstream::new(upstream, metrics.clone())?)),
        None => None,
    };

    let mut server_config = tls::server_config(&config.tls, config.device_ca.as_deref())?;
    server_config.transport_config(Arc::new(transport_config()));
    let quic_addr = listeners.quic.local_addr();
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        listeners.quic,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")?;

    let forwarder = forward::Forwarder::new(
        config.uploaders.clone(),
        config.link.clone(),
        config.internal_server_name.clone(),
        config.chunk_seconds,
        config.forward_timeout,
        metrics.clone(),
    )
    .context("an --uploader URL is not a valid endpoint")?;
    forwarder.refresh().await;
    let refresh_stop = CancellationToken::new();
    tokio::spawn(
        forwarder
            .clone()
            .keep_refreshed(config.uploader_refresh, refresh_stop.clone()),
    );

    let ready = Readiness::default();
    let ops_stop = CancellationToken::new();
    let http_addr = listeners.http.local_addr();
    let ops_task = tokio::spawn(ops::serve(
        listeners.http,
        Arc::new(registry),
        ready.clone(),
        ops_stop.clone().cancelled_owned(),
    ));

    let abandon = CancellationToken::new();
    {
        let (shutdown, abandon, grace) = (shutdown.clone(), abandon.clone(), config.shutdown_grace);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            abandon.cancel();
        });
    }
    let tasks = TaskTracker::new();
    let shared = Arc::new(server::Shared {
        limits: session::Limits {
            chunk_seconds: config.chunk_seconds,
            auth: Arc::clone(&config.auth),
        },
        forwarder,
        budget: budget::Budget::new(config.max_buffered_bytes, metrics.clone()),
        metrics,
        idle_timeout: config.idle_timeout,
        chunk_fill_timeout: config.chunk_fill_timeout,
        hello_timeout: config.hello_timeout,
        max_frame_bytes: config.max_frame_bytes,
        sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
        uids: admission::Uids::new(config.max_sessions, config.max_sessions_per_uid),
        shutdown: shutdown.clone(),
        abandon: abandon.clone(),
        tasks: tasks.clone(),
    });
    let connections =
        admission::Connections::new(config.max_connections, config.max_connections_per_ip);
    let omi_task = listeners.omi.map(|listener| {
        let addr = listener.local_addr();
        if matches!(config.omi.auth, omi::OmiAuth::None) {
            tracing::warn!("--omi-auth none: anyone who reaches the Omi WebSocket may write as any uid (a private network only)");
        }
        tracing::info!(omi = %ops::describe(addr), route = omi::ROUTE, "Omi pusher WebSocket listening");
        if let Some(up) = &config.omi.upstream {
            tracing::info!(upstream = %up.url, audio = up.audio, queue_bytes = up.queue_bytes,
                "Omi sessions relayed to the upstream pusher");
        }
        let front = Arc::new(omi::Front::new(
            Arc::clone(&shared),
            config.omi,
            omi_upstream,
            config.max_sessions,
        ));
        tokio::spawn(omi::serve(
            listener,
            connections.clone(),
            front,
            shutdown.clone(),
        ))
    });
    ready.set(true);
    match config.auth.as_ref() {
        auth::Auth::None => tracing::warn!(
            "--auth none: any device that reaches ingest may write as any uid (local runs only)"
        ),
        auth::Auth::Tokens(keys) => {
            tracing::info!(kids = ?keys.kids().collect::<Vec<_>>(), "devices authenticate with signed tokens");
        }
        auth::Auth::Certificates => {
            tracing::info!("devices authenticate with client certificates of --device-ca");
        }
    }
    tracing::info!(quic = %ops::describe(quic_addr), http = %ops::describe(http_addr),
        uploaders = ?config.uploaders.iter().map(ToString::to_string).collect::<Vec<_>>(),
        chunk_seconds = config.chunk_seconds, "ingest started");

    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => admit(incoming, &connections, &shared, &tasks),
                None => break,
            },
            () = shutdown.cancelled() => break,
        }
    }
    ready.set(false);
    tracing::info!("ingest shutting down: flushing sessions");
    if let Some(task) = omi_task {
        // Stops accepting; upgraded connections are in `tasks`.
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the Omi WebSocket server failed"),
            Err(e) => tracing::error!(error = %e, "the Omi WebSocket server task failed"),
        }
    }
    tasks.close();
    tasks.wait().await;
    abandon.cancel();
    refresh_stop.cancel();
    endpoint.close(0u32.into(), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    ops_stop.cancel();
    ops_task
        .await
        .context("ops server task")?
        .context("ops server")?;
    tracing::info!("ingest stopped");
    Ok(())
}
