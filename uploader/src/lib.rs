//! Spillway uploader: commits every chunk to a bounded sled spool on disk *before* it
//! acknowledges, then drains the spool to S3-compatible object storage.
//!
//! Data path: [`service`] (gRPC `PutChunk`, validated) → [`spool`] (commit + flush, bounded)
//! → [`drain`] (oldest first, `workers` at once, breaker + backoff) → [`store`] (`PutObject`
//! of a WAV built by [`object`], CRC32C verified by the store) → spool delete.

pub mod config;
pub mod drain;
pub mod metrics;
pub mod object;
pub mod service;
pub mod spool;
pub mod store;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use prometheus_client::registry::Registry;
use spillway_proto::ops::{self, Readiness};
use spillway_proto::uploader::uploader_server::UploaderServer;
use tokio_util::sync::CancellationToken;

pub use config::{Args, Config, StaticCredentials};

/// Sockets the daemon serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// TCP listener of the gRPC service.
    pub grpc: tokio::net::TcpListener,
    /// TCP listener of /metrics, /healthz and /readyz.
    pub http: tokio::net::TcpListener,
}

/// Runs the uploader until `shutdown` is cancelled: then it stops taking chunks (ingest sees
/// `UNAVAILABLE` and goes elsewhere or retries), commits what is in flight, keeps uploading until
/// the spool is empty or the drain timeout has passed, flushes the spool and returns. Whatever
/// was not uploaded stays spooled for the next start.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);

    let spool = {
        let dir = config.spool_dir.clone();
        let on_drop = {
            let m = metrics.clone();
            Arc::new(move |d: &spool::Dropped| {
                m.spool_dropped_chunks.inc();
                m.spool_dropped_bytes.inc_by(d.bytes);
            })
        };
        let limits = spool::Limits {
            max_bytes: config.spool_max_bytes,
            when_full: config.when_full,
            on_drop,
        };
        let m = metrics.clone();
        tokio::task::spawn_blocking(move || open_spool(&dir, limits, &m))
            .await
            .context("opening the spool")??
    };
    let spool = Arc::new(spool);
    {
        // Accounts for records the disk lost behind sled's back; in the background, because
        // it touches every record and start-up must not wait for the backlog.
        let (spool, m) = (Arc::clone(&spool), metrics.clone());
        tokio::task::spawn_blocking(move || match spool.reconcile() {
            Ok(lost) => {
                m.spool_lost_chunks.inc_by(lost.len() as u64);
            }
            Err(e) => tracing::error!(error = %e, "checking the spool against its index failed"),
        });
    }
    metrics
        .spool_max_bytes
        .set(i64::try_from(config.spool_max_bytes).unwrap_or(i64::MAX));
    metrics.spool(&spool);
    tracing::info!(dir = %config.spool_dir.display(), chunks = spool.len(), bytes = spool.used_bytes(),
        max_bytes = config.spool_max_bytes, "spool open");

    let store = store::Store::new(&config).await;
    let endpoint = config.s3_endpoint.as_deref().unwrap_or("AWS S3");
    store.check_bucket(config.create_bucket, endpoint).await?;

    let ready = Readiness::default();
    let ops_stop = CancellationToken::new();
    let http_addr = listeners.http.local_addr();
    let ops_task = tokio::spawn(ops::serve(
        listeners.http,
        Arc::new(registry),
        ready.clone(),
        ops_stop.clone().cancelled_owned(),
    ));

    let drain_stop = CancellationToken::new();
    let drain = drain::Drain {
        spool: Arc::clone(&spool),
        store,
        workers: config.workers,
        template: config.key_template.clone(),
        prefix: config.key_prefix.clone(),
        breaker: Arc::new(Mutex::new(spillway_breaker::Breaker::new(config.breaker))),
        metrics: metrics.clone(),
        attempts: Mutex::default(),
        keys: Mutex::default(),
        recovered: tokio::sync::Notify::new(),
    };
    let drain_task = tokio::spawn(drain.run(drain_stop.clone(), config.drain_timeout));

    let limit = spillway_proto::validate::max_chunk_bytes(config.max_chunk_seconds) + 64 * 1024;
    let service = UploaderServer::new(service::Service {
        spool: Arc::clone(&spool),
        template: config.key_template.clone(),
        prefix: config.key_prefix.clone(),
        max_chunk_seconds: config.max_chunk_seconds,
        metrics: metrics.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    let grpc_addr = listeners.grpc.local_addr();
    let readiness = tokio::spawn(track_readiness(
        Arc::clone(&spool),
        config.spool_high_watermark,
        ready.clone(),
        shutdown.clone(),
    ));
    tracing::info!(grpc = %ops::describe(grpc_addr), http = %ops::describe(http_addr),
        bucket = %config.bucket, endpoint, workers = config.workers, "uploader started");
    let served = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            service::count_transport_refusals(metrics.clone()),
        ))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listeners.grpc),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    ready.set(false);
    readiness.abort();
    tracing::info!(spooled = spool.len(), drain_timeout = ?config.drain_timeout,
        "uploader shutting down: no new chunks; draining the spool");
    drain_stop.cancel();
    drain_task.await.context("drain task")?;
    ops_stop.cancel();
    ops_task
        .await
        .context("ops server task")?
        .context("ops server")?;
    served.context("gRPC server")?;
    tracing::info!(spooled = spool.len(), "uploader stopped");
    Ok(())
}

/// Keeps `/readyz` true only while the uploader is serving and its spool is at or below the
/// high watermark, so a load balancer steers new work elsewhere before the spool is full.
async fn track_readiness(
    spool: Arc<spool::Spool>,
    watermark: f64,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut was = None;
    loop {
        let below = spool.fill_ratio() <= watermark;
        let now = below && !shutdown.is_cancelled();
        ready.set(now);
        if was != Some(below) {
            if below {
                tracing::info!(
                    fill = spool.fill_ratio(),
                    watermark,
                    "spool below its high watermark: ready"
                );
            } else {
                tracing::warn!(
                    fill = spool.fill_ratio(),
                    watermark,
                    "spool above its high watermark: not ready"
                );
            }
            was = Some(below);
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => {
                ready.set(false);
                return;
            }
        }
    }
}

/// Opens the spool. If sled cannot open it at all (an error or a panic inside sled), the
/// damaged directory is renamed aside, kept for an operator, and an empty spool takes its place:
/// the uploader keeps serving rather than crash-looping on a disk it cannot read.
fn open_spool(
    dir: &std::path::Path,
    limits: spool::Limits,
    metrics: &metrics::Metrics,
) -> anyhow::Result<spool::Spool> {
    let attempt = |limits: spool::Limits| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            spool::Spool::open(dir, limits)
        }))
    };
    let failure = match attempt(limits.clone()) {
        Ok(Ok(spool)) => return Ok(spool),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "sled panicked while recovering it".to_owned(),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = dir.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    let aside = std::path::PathBuf::from(aside);
    std::fs::rename(dir, &aside).with_context(|| {
        format!(
            "the spool in {} cannot be opened ({failure}) and cannot be moved aside",
            dir.display()
        )
    })?;
    metrics.spool_set_aside.inc();
    tracing::error!(dir = %dir.display(), moved_to = %aside.display(), error = %failure,
        "the spool cannot be opened: moved aside for an operator, starting with an empty spool");
    match attempt(limits) {
        Ok(r) => r.with_context(|| format!("creating a new spool in {}", dir.display())),
        Err(_) => anyhow::bail!("sled panicked creating a new spool in {}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_sled_cannot_open_is_moved_aside_and_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("conf"), b"\xff\x00 not a sled config \x01").unwrap();
        std::fs::write(dir.join("db"), vec![0xa5; 4096]).unwrap();
        let metrics = metrics::Metrics::register(&mut Registry::default());
        let spool = open_spool(&dir, spool::Limits::reject(1 << 20), &metrics).unwrap();
        assert!(spool.is_empty());
        assert_eq!(metrics.spool_set_aside.get(), 1);
        let aside: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("spool.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged spool is kept for an operator");
    }
}
