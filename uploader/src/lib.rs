//! Spillway uploader: commits every chunk to a bounded sled spool on disk *before* it
//! acknowledges, then drains the spool to S3-compatible object storage.
//!
//! Data path: [`service`] (gRPC `PutChunk`, validated) → [`spool`] (commit + flush, bounded)
//! → [`drain`] (oldest first, `workers` at once, breaker + backoff) → [`store`] (`PutObject`
//! of a WAV built by [`object`], CRC32C verified by the store) → spool delete.

pub mod adaptive;
pub mod admission;
pub mod config;
pub mod disk;
pub mod drain;
pub mod metrics;
pub mod object;
pub mod put;
pub mod seal;
pub mod spool;
pub mod status;
pub mod store;
pub mod transport;
pub mod upload;

use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use spillway_ops::{self as ops, Readiness};
use tokio_util::sync::CancellationToken;

pub use config::{Args, Command, Config, Flags, OmiDecrypt, StaticCredentials};

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

    let spool = spool_of(&config, &metrics).await?;
    metrics
        .spool_max_bytes
        .set(i64::try_from(config.spool_max_bytes).unwrap_or(i64::MAX));
    metrics.spool_format.set(i64::from(spool.format()));
    metrics.spool(&spool);
    tracing::info!(dir = %config.spool_dir.display(), chunks = spool.len(), bytes = spool.used_bytes(),
        max_bytes = config.spool_max_bytes, format = spool.format(), "spool open");

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
    let drain = drain_of(&config, &spool, store, &metrics);
    let drain_task = {
        // The index is made to agree with the record files (after a crash or damage) before
        // the drain starts, in the background: the service takes chunks meanwhile, and start-up
        // does not wait for the backlog.
        let (spool, m, stop, timeout) = (
            Arc::clone(&spool),
            metrics.clone(),
            drain_stop.clone(),
            config.drain_timeout,
        );
        tokio::spawn(async move {
            reconcile(spool, &m).await;
            drain.run(stop, timeout).await;
        })
    };

    let service = put::Server(Arc::new(put::Service {
        spool: Arc::clone(&spool),
        template: config.key_template.clone(),
        prefix: config.key_prefix.clone(),
        max_chunk_seconds: config.max_chunk_seconds,
        metrics: metrics.clone(),
        omi_sealed: config.omi_sealer.is_some(),
        gathered: put::Gathered::default(),
    }));

    let grpc_addr = listeners.grpc.local_addr();
    let readiness = tokio::spawn(track_readiness(
        Arc::clone(&spool),
        metrics.clone(),
        config.spool_high_watermark,
        spillway_proto::validate::max_chunk_bytes(config.max_chunk_seconds) as u64,
        ready.clone(),
        shutdown.clone(),
    ));
    tracing::info!(grpc = %ops::describe(grpc_addr), http = %ops::describe(http_addr),
        bucket = %config.bucket, endpoint, workers = %config.worker_pool(), "uploader started");
    // Streams per connection: room beyond the cap, so a call over it reaches the cap's layer
    // and is refused at once instead of queueing in the client's HTTP/2 stack.
    let streams = u32::try_from(config.max_puts_in_flight.saturating_mul(2)).unwrap_or(u32::MAX);
    let mut server = tonic::transport::Server::builder();
    match &config.link {
        spillway_proto::link::Link::Tls(tls) => {
            server = server
                .tls_config(tls.server())
                .context("the --internal-* TLS material")?;
            tracing::info!(
                "gRPC link: mutual TLS (ingest must present a certificate of --internal-ca)"
            );
        }
        spillway_proto::link::Link::Insecure => tracing::warn!(
            "--insecure-internal: gRPC in plaintext, no authentication: anyone who reaches --listen can put chunks"
        ),
    }
    let served = server
        .initial_stream_window_size(put::PUT_STREAM_WINDOW)
        .max_frame_size(Some(put::MAX_FRAME))
        .initial_connection_window_size(spillway_proto::GRPC_CONNECTION_WINDOW)
        .max_concurrent_streams(streams)
        .timeout(config.put_timeout)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .layer(admission::PutsInFlight::new(
            config.max_puts_in_flight,
            metrics.clone(),
        ))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listeners.grpc),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    ready.set(false);
    readiness.abort();
    let _ = readiness.await;
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

/// Opens the spool `config` names, counting evictions in `metrics`.
async fn spool_of(
    config: &Config,
    metrics: &metrics::Metrics,
) -> anyhow::Result<Arc<spool::Spool>> {
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
        max_chunks: config.spool_max_chunks,
        when_full: config.when_full,
        on_drop,
    };
    let m = metrics.clone();
    let writes = config.spool_format;
    let spool = tokio::task::spawn_blocking(move || open_spool(&dir, limits, writes, &m))
        .await
        .context("opening the spool")??;
    Ok(Arc::new(spool))
}

/// Makes the index agree with the record files (after a crash or damage) and counts what it
/// found.
async fn reconcile(spool: Arc<spool::Spool>, m: &metrics::Metrics) {
    let reconciled = tokio::task::spawn_blocking(move || spool.reconcile())
        .await
        .map_err(|e| spool::SpoolError::Task(e.to_string()))
        .and_then(|r| r);
    match reconciled {
        Ok(found) => {
            m.spool_lost_chunks.inc_by(found.lost.len() as u64);
            m.spool_quarantined.inc_by(found.quarantined);
            m.spool_adopted_chunks.inc_by(found.adopted);
        }
        Err(e) => tracing::error!(error = %e, "checking the spool against its files failed"),
    }
}

fn drain_of(
    config: &Config,
    spool: &Arc<spool::Spool>,
    store: store::Store,
    metrics: &metrics::Metrics,
) -> drain::Drain {
    drain::Drain {
        spool: Arc::clone(spool),
        store,
        workers: config.worker_pool(),
        template: config.key_template.clone(),
        prefix: config.key_prefix.clone(),
        sealer: config.omi_sealer.clone(),
        breaker: Arc::new(Mutex::new(spillway_breaker::Breaker::new(config.breaker))),
        metrics: metrics.clone(),
        attempts: Mutex::default(),
        keys: Mutex::default(),
        recovered: tokio::sync::Notify::new(),
    }
}

/// What [`drain_spool`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Chunks uploaded (or found already stored).
    pub uploaded: u64,
    /// Chunks still spooled (the timeout passed, or it was interrupted).
    pub left: u64,
    /// Bytes still spooled.
    pub left_bytes: u64,
}

/// `uploader drain`: uploads everything in the spool at `config.spool_dir` and returns once it
/// is empty, `config.drain_timeout` has passed, or `interrupt` fires; what is left stays
/// spooled. Logs progress every `progress_every`. Takes no chunks and serves nothing.
pub async fn drain_spool(
    config: Config,
    progress_every: std::time::Duration,
    interrupt: CancellationToken,
) -> anyhow::Result<DrainReport> {
    config.validate()?;
    let metrics = metrics::Metrics::register(&mut Registry::default());
    let spool = spool_of(&config, &metrics).await?;
    let store = store::Store::new(&config).await;
    let endpoint = config.s3_endpoint.as_deref().unwrap_or("AWS S3");
    store.check_bucket(config.create_bucket, endpoint).await?;
    reconcile(Arc::clone(&spool), &metrics).await;
    let (chunks, bytes) = (spool.len(), spool.used_bytes());
    tracing::info!(dir = %config.spool_dir.display(), chunks, bytes, bucket = %config.bucket,
        endpoint, timeout = ?config.drain_timeout, "draining the spool");
    let started = std::time::Instant::now();
    let progress = tokio::spawn({
        let spool = Arc::clone(&spool);
        async move {
            loop {
                tokio::time::sleep(progress_every).await;
                let done = bytes.saturating_sub(spool.used_bytes());
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3) / 1e6;
                tracing::info!(
                    left = spool.len(),
                    left_bytes = spool.used_bytes(),
                    uploaded = chunks.saturating_sub(spool.len()),
                    mb_per_s = format!("{rate:.1}"),
                    "draining"
                );
            }
        }
    });
    let stop = CancellationToken::new();
    stop.cancel();
    let drain = drain_of(&config, &spool, store, &metrics);
    tokio::select! {
        () = drain.run(stop, config.drain_timeout) => {}
        () = interrupt.cancelled() => {
            tracing::warn!(left = spool.len(), "interrupted: what is left stays spooled");
            spool.flush().await.context("flushing the spool")?;
        }
    }
    progress.abort();
    let _ = progress.await;
    let report = DrainReport {
        uploaded: chunks.saturating_sub(spool.len()),
        left: spool.len(),
        left_bytes: spool.used_bytes(),
    };
    tracing::info!(
        uploaded = report.uploaded,
        left = report.left,
        elapsed_seconds = started.elapsed().as_secs_f64(),
        "drain finished"
    );
    Ok(report)
}

/// Keeps `/readyz` true only while the uploader is serving and its spool is at or below the
/// high watermark, so a load balancer steers new work elsewhere before the spool is full. Also
/// refreshes the spool gauges, the oldest chunk's age among them, so they move while nothing
/// else does.
async fn track_readiness(
    spool: Arc<spool::Spool>,
    metrics: metrics::Metrics,
    watermark: f64,
    largest_chunk: u64,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut was = None;
    let mut disk_was = true;
    loop {
        metrics.spool(&spool);
        metrics.spool_age(&spool);
        let below = spool.fill_ratio() <= watermark;
        // The disk under the spool must have room for the largest chunk beyond its reserves.
        let disk_ok = match disk::Room::of(spool.dir()) {
            Ok(room) => {
                metrics
                    .spool_disk_free_bytes
                    .set(i64::try_from(room.free_bytes).unwrap_or(i64::MAX));
                metrics.spool_disk_free_inodes.set(
                    room.free_inodes
                        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
                );
                room.fits(largest_chunk)
            }
            Err(e) => {
                tracing::warn!(error = %e, "statvfs of the spool failed");
                true
            }
        };
        if disk_ok != disk_was {
            if disk_ok {
                tracing::info!("the spool's disk has room again");
            } else {
                tracing::error!(
                    "the spool's disk is nearly full (bytes or inodes): not ready, puts refused"
                );
            }
            disk_was = disk_ok;
        }
        let now = below && disk_ok && !shutdown.is_cancelled();
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

/// Opens the spool. If sled cannot open its index at all (an error or a panic inside sled), the
/// damaged index is renamed aside for an operator and a fresh one is made: the record files are
/// whole, and [`spool::Spool::reconcile`] adopts every one of them, so no audio is lost and the
/// uploader keeps serving rather than crash-looping on a disk it cannot read.
fn open_spool(
    dir: &std::path::Path,
    limits: spool::Limits,
    writes: u32,
    metrics: &metrics::Metrics,
) -> anyhow::Result<spool::Spool> {
    let attempt = |limits: spool::Limits| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            spool::Spool::open_as(dir, limits, writes)
        }))
    };
    let failure = match attempt(limits.clone()) {
        Ok(Ok(spool)) => return Ok(spool),
        // Only sled's own errors say the index is damaged. Anything else (a spool another
        // process holds, one of a format this build does not read, a directory it cannot
        // write) is refused as it is: setting the index aside would "repair" a healthy spool,
        // or a newer release's.
        Ok(Err(spool::SpoolError::Storage(e))) => e.to_string(),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => "sled panicked while recovering it".to_owned(),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let index = dir.join("index");
    let aside = dir.join(format!("index.damaged-{stamp}"));
    std::fs::rename(&index, &aside).with_context(|| {
        format!(
            "the spool index in {} cannot be opened ({failure}) and cannot be moved aside",
            index.display()
        )
    })?;
    metrics.spool_set_aside.inc();
    tracing::error!(index = %index.display(), moved_to = %aside.display(), error = %failure,
        "the spool index cannot be opened: moved aside; it is rebuilt from the record files");
    match attempt(limits) {
        Ok(r) => r.with_context(|| format!("creating a new spool index in {}", index.display())),
        Err(_) => anyhow::bail!("sled panicked creating a new index in {}", index.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spool in `dir` holding three committed records, closed.
    async fn spool_with_three_records(dir: &std::path::Path) {
        let spool = Arc::new(spool::Spool::open(dir, spool::Limits::reject(1 << 20)).unwrap());
        for seq in 0..3 {
            let pcm = bytes::Bytes::from(vec![seq as u8; 64]);
            let record = spool::Record {
                uid: "u".into(),
                session: "s".into(),
                seq,
                sample_rate: 8000,
                chunk_samples: 32,
                first_sample: seq * 32,
                crc32c: crc32c::crc32c(&pcm),
                pcm,
                ..spool::Record::default()
            };
            spool.commit(&record).await.unwrap();
        }
    }

    /// Every file under `dir` with its bytes.
    fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut found = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    found.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        found.sort();
        found
    }

    /// The daemon's open (also `uploader drain`'s) sets a damaged index aside, but a spool of a
    /// newer or unknown format is not damaged: it is refused and every file stays as it was
    /// (found by `cargo xtask chaos`'s rollback: the index of a newer spool was moved aside).
    #[tokio::test]
    async fn a_spool_of_a_newer_or_unknown_format_is_refused_not_set_aside() {
        for format in ["spillway-spool 99\n", "not a format line\n"] {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("spool");
            spool_with_three_records(&dir).await;
            std::fs::write(dir.join("FORMAT"), format).unwrap();
            let before = files(&dir);
            let metrics = metrics::Metrics::register(&mut Registry::default());
            let refused = open_spool(
                &dir,
                spool::Limits::reject(1 << 20),
                spool::FORMAT,
                &metrics,
            );
            let Err(e) = refused else {
                panic!("a spool marked {format:?} opened");
            };
            assert!(e.to_string().contains("it was left as it is"), "{e:#}");
            assert_eq!(metrics.spool_set_aside.get(), 0, "{format:?}");
            assert!(
                files(&dir) == before,
                "{format:?}: the spool's files changed"
            );
        }
    }

    #[tokio::test]
    async fn an_index_sled_cannot_open_is_moved_aside_and_rebuilt_from_the_records() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        spool_with_three_records(&dir).await;
        let index = dir.join("index");
        std::fs::write(index.join("conf"), b"\xff\x00 not a sled config \x01").unwrap();
        std::fs::write(index.join("db"), vec![0xa5; 4096]).unwrap();
        let metrics = metrics::Metrics::register(&mut Registry::default());
        let spool = open_spool(
            &dir,
            spool::Limits::reject(1 << 20),
            spool::FORMAT,
            &metrics,
        )
        .unwrap();
        assert_eq!(metrics.spool_set_aside.get(), 1);
        let aside = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref().is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("index.damaged-")
                })
            })
            .count();
        assert_eq!(aside, 1, "the damaged index is kept for an operator");
        let found = spool.reconcile().unwrap();
        assert_eq!(found.adopted, 3, "{found:?}");
        assert_eq!(spool.len(), 3, "no audio lost");
    }
}
