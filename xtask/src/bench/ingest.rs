//! Ingest: throughput against raw QUIC (row 4), real-time devices the whole pipeline sustains
//! (row 4b), ingest's memory (row 5) and ack latency (row 6).
//!
//! Ingest runs as its release binary. For row 4 it forwards to an uploader in this process that
//! acknowledges without storing (so the figure is ingest's own), and the baseline is
//! `xtask quic-sink`, a quinn server that reads every stream to its end and discards it, fed the
//! same bytes by the same client code. Rows 4b-6 run the real pipeline: store (tmpfs), uploader
//! (spool on the disk under test), ingest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use spillway_ingest::client::Device;
use spillway_proto::device::server_message::Kind;
use spillway_proto::device::{Encoding, Hello};
use spillway_proto::uploader::uploader_server::{Uploader, UploaderServer};
use spillway_proto::uploader::{PutChunkRequest, PutChunkResponse};
use tokio_util::sync::CancellationToken;

use super::{Env, MB, MIB, Results, Row, StoreProc, percentile, rss};
use crate::cluster::{Proc, free_tcp, free_udp, ready};
use crate::pipeline::http_get;

/// 16 kHz, 16-bit mono.
const BYTES_PER_SECOND: u64 = 32_000;

/// UDP sockets the real-time devices of row 4b share.
const SIM_SOCKETS: usize = 16;

/// An uploader that acknowledges every chunk and keeps nothing.
struct Discard;

#[tonic::async_trait]
impl Uploader for Discard {
    async fn put_chunk(
        &self,
        request: tonic::Request<PutChunkRequest>,
    ) -> Result<tonic::Response<PutChunkResponse>, tonic::Status> {
        Ok(tonic::Response::new(PutChunkResponse {
            key: String::new(),
            newly_stored: true,
            // The receipt an uploader gives: the CRC32C it checked (here, taken on trust).
            crc32c: request.into_inner().crc32c,
        }))
    }
}

/// A gRPC server with the link's TLS (or none, `--insecure`).
fn builder(env: &Env) -> anyhow::Result<tonic::transport::Server> {
    let b = tonic::transport::Server::builder();
    Ok(if env.insecure {
        b
    } else {
        b.tls_config(env.pki.uploader_tls().server())?
    })
}

async fn discard_uploader(env: &Env, stop: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let limit = spillway_proto::validate::max_chunk_bytes(60) + 64 * 1024;
    let service = UploaderServer::new(Discard)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    tokio::spawn(
        // The real uploader's HTTP/2 windows: with h2's 64 KiB defaults every chunk waits on
        // window updates, which no deployed uploader does.
        builder(env)?
            .initial_stream_window_size(spillway_proto::GRPC_STREAM_WINDOW)
            .initial_connection_window_size(spillway_proto::GRPC_CONNECTION_WINDOW)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            ),
    );
    Ok(addr)
}

/// `xtask quic-sink`: accepts QUIC connections with ingest's TLS and ALPN, reads every stream to
/// its end, discards it, and finishes its side. The baseline of row 4.
pub async fn quic_sink(
    listen: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    let tls = spillway_ingest::tls::TlsMaterial::from_pem_files(cert, key)?;
    let mut config = spillway_ingest::tls::server_config(&tls, None)?;
    // ingest's own transport settings (windows, stream limits), so only ingest's work differs.
    config.transport_config(Arc::new(spillway_ingest::transport_config()));
    let endpoint = quinn::Endpoint::server(config, listen)?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Some(_)) = recv.read(&mut buf).await {}
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
    Ok(())
}

/// Certificate and key files for ingest and the sink, and the DER devices trust.
struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    der: Vec<u8>,
}

fn tls(env: &Env) -> anyhow::Result<Tls> {
    let (cert_pem, key_pem) = spillway_ingest::tls::self_signed_pem()?;
    let (cert, key) = (
        env.dir.join("ingest-cert.pem"),
        env.dir.join("ingest-key.pem"),
    );
    std::fs::write(&cert, cert_pem)?;
    std::fs::write(&key, key_pem)?;
    let der = spillway_ingest::tls::TlsMaterial::from_pem_files(&cert, &key)?
        .leaf_der()
        .to_vec();
    Ok(Tls { cert, key, der })
}

/// `--max-sessions` and `--max-buffered-bytes` high enough that they never bind.
const UNBOUNDED: (usize, u64) = (10_000, 8 << 30);

/// Starts ingest forwarding to `uploader` with `(max_sessions, max_buffered_bytes)`; returns it
/// with its QUIC and HTTP addresses.
async fn ingest(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    name: &str,
    (sessions, budget): (usize, u64),
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let (quic, http) = (free_udp()?, free_tcp()?);
    let mut args = env.ingest_link_args(uploader)?;
    args.extend([
        "--listen".into(),
        quic.to_string(),
        "--http-listen".into(),
        http.to_string(),
        "--tls-cert".into(),
        tls.cert.display().to_string(),
        "--tls-key".into(),
        tls.key.display().to_string(),
        "--chunk-seconds".into(),
        chunk_seconds.to_string(),
        "--max-sessions".into(),
        sessions.to_string(),
        "--max-buffered-bytes".into(),
        budget.to_string(),
        // Every simulated device shares 127.0.0.1 (and up to 2,000 connect at once): the
        // per-source cap, and the retry a half-full endpoint asks of new addresses, would
        // measure the caps, not ingest (ATTACKS.md measures those).
        "--max-connections".into(),
        "100000".into(),
        "--max-connections-per-ip".into(),
        "100000".into(),
    ]);
    let mut p = Proc::spawn(name, &env.bin.join("ingest"), &args, &[], &env.logs)?;
    ready(http, &mut p).await?;
    Ok((p, quic, http))
}

/// The bench's device-token key (not a secret: it exists for the length of a run). ingest runs
/// `--auth token`, as deployed, so every hello's token is verified.
const TOKEN_KEY: &str = "bench AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Writes the token key file ingest reads; returns its path.
pub(super) fn token_keys(env: &Env) -> anyhow::Result<std::path::PathBuf> {
    let path = env.dir.join("token-keys");
    std::fs::write(&path, format!("{TOKEN_KEY}\n"))?;
    Ok(path)
}

fn hello(uid: &str) -> anyhow::Result<Hello> {
    let keys = spillway_ingest::auth::Keyring::parse(TOKEN_KEY)?;
    let scope = spillway_ingest::auth::Scope::Uid(uid.to_owned());
    Ok(Hello {
        uid: uid.into(),
        session: "bench".into(),
        sample_rate: 16_000,
        encoding: Encoding::PcmS16le as i32,
        channels: 1,
        token: keys.issue(None, &scope, u64::from(u32::MAX))?,
        resume_from: 0,
    })
}

/// Sends `bytes` of audio as fast as flow control allows, in frames of (at most) `frame`.
async fn send(
    tx: &mut spillway_ingest::client::SessionWriter,
    frame: &Bytes,
    bytes: u64,
) -> anyhow::Result<()> {
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(frame.len() as u64) as usize;
        tx.audio(frame.slice(..n)).await?;
        sent += n as u64;
    }
    Ok(())
}

/// `devices` sessions each sending `bytes` as fast as they can, in 16 KiB frames, to `server`;
/// returns the wall time until every server finished its side (ingest: every chunk acked; the
/// sink: everything read).
async fn blast(
    server: SocketAddr,
    cert: &[u8],
    devices: usize,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let payload = Bytes::from(super::store::base_pcm().slice(..16 * 1024).to_vec());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        let (cert, payload) = (cert.to_vec(), payload.clone());
        tasks.spawn(async move {
            let device = Device::connect(server, "localhost", &cert).await?;
            let (mut tx, rx) = device.open().await?;
            tx.hello(hello(&format!("blast-{d}"))?).await?;
            send(&mut tx, &payload, bytes).await?;
            tx.finish()?;
            rx.collect().await?;
            device.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Row 4b's goal: real-time devices sustained, as a fraction of the disk-bound ceiling.
const GOAL_4B: f64 = 0.7;

/// The device counts row 4b tries: `fixed`, plus the goal's own point ([`GOAL_4B`] × the
/// disk-bound ceiling, rounded up to 25) when it falls among them, so that passing it is the
/// goal met rather than something between two coarse steps.
fn with_goal_step(fixed: &[usize], ceiling: Option<f64>) -> Vec<usize> {
    let mut steps = fixed.to_vec();
    let top = fixed.iter().max().copied().unwrap_or(0);
    if let Some(c) = ceiling {
        let goal = ((GOAL_4B * c / 25.0).ceil() as usize) * 25;
        if goal > 0 && goal < top && !steps.contains(&goal) {
            steps.push(goal);
            steps.sort_unstable();
        }
    }
    steps
}

/// The uploader's commit-latency histogram (`spillway_uploader_commit_seconds`) as (upper bound
/// in seconds, cumulative count) pairs, `+Inf` last.
fn commit_buckets(metrics: &str) -> Vec<(f64, f64)> {
    crate::metrics::buckets(metrics, "spillway_uploader_commit_seconds")
}

/// The smallest bucket bound every commit between two scrapes fell under: `None` when no
/// commit happened or the histogram is missing.
fn slowest_commit_within(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta = |le: f64| {
        let at = |h: &[(f64, f64)]| h.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
        at(after) - at(before)
    };
    let all = delta(f64::INFINITY);
    if all <= 0.0 {
        return None;
    }
    after.iter().map(|(le, _)| *le).find(|le| delta(*le) >= all)
}

/// A commit-latency bound for the table.
fn within(bound: Option<f64>) -> String {
    match bound {
        None => "? (no commits seen)".into(),
        Some(b) if b.is_infinite() => "over 8 s (beyond the histogram)".into(),
        Some(b) => format!("{:.0} ms", b * 1000.0),
    }
}

/// What one step of real-time devices saw.
#[derive(Debug, Default)]
struct Step {
    devices: usize,
    /// Ack latencies: from the last byte of a chunk written to its ack read.
    latencies: Vec<Duration>,
    expected_acks: usize,
    worst_lag: Duration,
    errors: usize,
    ingest_peak: u64,
    ingest_idle: u64,
    max_held: u64,
    /// Every commit of the step was durable within this many seconds (a histogram bound).
    commits_within: Option<f64>,
}

impl Step {
    fn sustained(&self) -> bool {
        self.errors == 0
            && self.latencies.len() == self.expected_acks
            && self.worst_lag <= Duration::from_secs(1)
            && self
                .latencies
                .last()
                .is_none_or(|l| *l <= Duration::from_secs(1))
    }
}

/// `devices` real-time 16 kHz devices through the whole pipeline, starts spread over one chunk,
/// each streaming `chunks` chunks in 200 ms frames.
async fn realtime(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    devices: usize,
    chunks: u64,
) -> anyhow::Result<Step> {
    let (proc, quic, _http) = ingest(
        env,
        tls,
        uploader,
        chunk_seconds,
        &format!("ingest-rt-{devices}"),
        UNBOUNDED,
    )
    .await?;
    let pid = proc.id().context("ingest pid")?;
    let (_, idle) = rss(pid)?;
    let chunk_bytes = u64::from(chunk_seconds) * BYTES_PER_SECOND;
    let frame = Bytes::from(super::store::base_pcm().slice(..6_400).to_vec());
    let frame_every = Duration::from_millis(200);
    // Bytes sent and acknowledged by all devices: what ingest must hold is the difference.
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let max_held = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (sent, acked, max_held) =
            (Arc::clone(&sent), Arc::clone(&acked), Arc::clone(&max_held));
        tokio::spawn(async move {
            loop {
                let held = sent
                    .load(Ordering::Relaxed)
                    .saturating_sub(acked.load(Ordering::Relaxed));
                max_held.fetch_max(held, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // The simulated devices share a few UDP sockets, as devices behind a gateway do: a socket
    // and its driver task per device made the load generator itself the first thing to run
    // out of CPU on these two cores.
    let sockets = (0..SIM_SOCKETS)
        .map(|_| quinn::Endpoint::client(([127, 0, 0, 1], 0).into()))
        .collect::<Result<Vec<_>, _>>()
        .context("binding the simulated devices' sockets")?;
    let t0 = Instant::now() + Duration::from_secs(1);
    let spread = Duration::from_secs(u64::from(chunk_seconds));
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        let (cert, frame, sent, acked) = (
            tls.der.clone(),
            frame.clone(),
            Arc::clone(&sent),
            Arc::clone(&acked),
        );
        let socket = sockets[d % sockets.len()].clone();
        let start = t0 + spread.mul_f64(d as f64 / devices as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let device = Device::connect_on(&socket, quic, "localhost", &cert).await?;
            let (mut tx, mut rx) = device.open().await?;
            tx.hello(hello(&format!("rt-{d:05}"))?).await?;
            let total = chunk_bytes * chunks;
            let ends: Arc<parking_lot::Mutex<Vec<Instant>>> = Arc::default();
            let reader = {
                let (ends, acked) = (Arc::clone(&ends), Arc::clone(&acked));
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    while let Some(m) = rx.next().await? {
                        match m.kind {
                            Some(Kind::Ack(a)) => {
                                let now = Instant::now();
                                acked.fetch_add(
                                    (a.end_sample - a.first_sample) * 2,
                                    Ordering::Relaxed,
                                );
                                let end = ends.lock().get(a.seq as usize).copied();
                                if let Some(end) = end {
                                    latencies.push(now.saturating_duration_since(end));
                                }
                            }
                            Some(Kind::Error(_)) => errors += 1,
                            _ => {}
                        }
                    }
                    anyhow::Ok((latencies, errors))
                })
            };
            let begun = Instant::now();
            let mut written = 0u64;
            let mut worst_lag = Duration::ZERO;
            let mut n = 0u32;
            while written < total {
                let due = begun + frame_every * n;
                let now = Instant::now();
                if now < due {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    worst_lag = worst_lag.max(now - due);
                }
                written += frame.len() as u64;
                if written.is_multiple_of(chunk_bytes) {
                    // Stamped as the chunk's last byte leaves (before the ack can come back).
                    ends.lock().push(Instant::now());
                }
                tx.audio(frame.clone()).await?;
                sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
                n += 1;
            }
            tx.finish()?;
            let (latencies, errors) = reader.await??;
            device.close().await;
            anyhow::Ok((latencies, errors, worst_lag))
        });
    }
    let mut step = Step {
        devices,
        expected_acks: devices * chunks as usize,
        ingest_idle: idle,
        ..Step::default()
    };
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok((latencies, errors, lag)) => {
                step.latencies.extend(latencies);
                step.errors += errors;
                step.worst_lag = step.worst_lag.max(lag);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "a real-time device failed");
                step.errors += 1;
            }
        }
    }
    monitor.abort();
    step.latencies.sort();
    step.max_held = max_held.load(Ordering::Relaxed);
    step.ingest_peak = rss(pid)?.0;
    proc.stop().await?;
    Ok(step)
}

/// What row 5 measured.
struct Memory {
    devices: usize,
    idle: u64,
    peak: u64,
    /// Audio ingest held when the peak was read: every session's chunk in progress.
    held: u64,
}

/// Row 5: `devices` sessions at once, each holding one chunk in progress (the chunk but its
/// last 200 ms frame), at the product's chunk length. Devices fill their chunks 32 at a time,
/// so what QUIC buffers in flight stays near what real-time devices leave; once every chunk is
/// held, ingest's peak RSS is read, then every device completes its chunk and must get its ack.
async fn memory(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    devices: usize,
) -> anyhow::Result<Memory> {
    let (proc, quic, _) = ingest(
        env,
        tls,
        uploader,
        chunk_seconds,
        "ingest-memory",
        UNBOUNDED,
    )
    .await?;
    let pid = proc.id().context("ingest pid")?;
    let (_, idle) = rss(pid)?;
    let chunk_bytes = u64::from(chunk_seconds) * BYTES_PER_SECOND;
    let last = 6_400u64;
    let hold = chunk_bytes - last;
    let frame = Bytes::from(super::store::base_pcm().slice(..64 * 1024).to_vec());
    let filling = Arc::new(tokio::sync::Semaphore::new(32));
    let held = Arc::new(tokio::sync::Barrier::new(devices + 1));
    let release = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        let (cert, frame, filling, held, release) = (
            tls.der.clone(),
            frame.clone(),
            Arc::clone(&filling),
            Arc::clone(&held),
            release.clone(),
        );
        tasks.spawn(async move {
            let permit = filling.acquire_owned().await?;
            let filled = async {
                let device = Device::connect(quic, "localhost", &cert).await?;
                let (mut tx, rx) = device.open().await?;
                tx.hello(hello(&format!("mem-{d:05}"))?).await?;
                send(&mut tx, &frame, hold).await?;
                anyhow::Ok((device, tx, rx))
            }
            .await;
            drop(permit);
            // Every task reaches the barrier, failed or not, so the count always completes.
            held.wait().await;
            let (device, mut tx, rx) = filled?;
            release.cancelled().await;
            tx.audio(frame.slice(..last as usize)).await?;
            tx.finish()?;
            let acks = rx
                .collect()
                .await?
                .into_iter()
                .filter(|m| matches!(m.kind, Some(Kind::Ack(_))))
                .count();
            device.close().await;
            anyhow::ensure!(acks == 1, "device {d}: {acks} acks for its one chunk");
            anyhow::Ok(())
        });
    }
    held.wait().await;
    // Let ingest take in what QUIC still held, then read its high-water mark.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (peak, _) = rss(pid)?;
    release.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    proc.stop().await?;
    Ok(Memory {
        devices,
        idle,
        peak,
        held: devices as u64 * hold,
    })
}

pub async fn run(env: &Env, results: &mut Results) -> anyhow::Result<()> {
    let tls = tls(env)?;

    eprintln!("== ingest: vs raw QUIC");
    let stop = CancellationToken::new();
    let discard = discard_uploader(env, stop.clone()).await?;
    let (devices, chunks) = if env.quick { (4, 4) } else { (16, 30) };
    let bytes = chunks * 60 * BYTES_PER_SECOND;
    let total = (devices as u64 * bytes) as f64;
    let (proc, quic, _) = ingest(env, &tls, discard, 60, "ingest-blast", UNBOUNDED).await?;
    let ours = total / blast(quic, &tls.der, devices, bytes).await?.as_secs_f64() / MB;
    proc.stop().await?;
    let sink_addr = free_udp()?;
    let mut sink = Proc::spawn(
        "quic-sink",
        &env.bin.join("xtask"),
        &[
            "quic-sink".into(),
            "--listen".into(),
            sink_addr.to_string(),
            "--cert".into(),
            tls.cert.display().to_string(),
            "--key".into(),
            tls.key.display().to_string(),
        ],
        &[],
        &env.logs,
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.check_alive()?;
    let raw = total
        / blast(sink_addr, &tls.der, devices, bytes)
            .await?
            .as_secs_f64()
        / MB;
    sink.stop().await.ok();
    eprintln!("   ingest {ours:.0} MB/s, raw quinn {raw:.0} MB/s");
    results.rows.push(
        Row::ratio_at_least(
            "4",
            &format!(
                "ingest (QUIC, chunking, gRPC forward) vs raw quinn streams, {devices} devices"
            ),
            "MB/s",
            ours,
            raw,
            0.7,
        )
        .note(format!(
            "{:.0} MB per device as fast as possible; the uploader acknowledges without storing",
            bytes as f64 / MB
        )),
    );

    eprintln!("== ingest: memory with every session holding a chunk in progress");
    let (mem_seconds, mem_devices) = if env.quick { (2, 20) } else { (60, 1000) };
    let discard = discard_uploader(env, stop.clone()).await?;
    let mem = memory(env, &tls, discard, mem_seconds, mem_devices).await?;
    stop.cancel();
    eprintln!(
        "   {} sessions: idle {:.0} MiB, peak {:.0} MiB, audio held {:.0} MiB",
        mem.devices,
        mem.idle as f64 / MIB,
        mem.peak as f64 / MIB,
        mem.held as f64 / MIB
    );

    // The memory limit deploy/ computes for ingest, held to a measurement: the local overlay's
    // flags (16 sessions, a 64 MiB budget) with every session sending as fast as it can.
    eprintln!("== ingest: peak RSS at full speed against deploy/'s bound for its flags");
    let (sessions, budget) = (16usize, 64u64 << 20);
    let bound_stop = CancellationToken::new();
    let discard = discard_uploader(env, bound_stop.clone()).await?;
    let (proc, quic, _) =
        ingest(env, &tls, discard, 60, "ingest-bound", (sessions, budget)).await?;
    let pid = proc.id().context("ingest pid")?;
    let per_device = if env.quick { 2 } else { 8 } * 60 * BYTES_PER_SECOND;
    blast(quic, &tls.der, sessions, per_device).await?;
    let (peak, _) = rss(pid)?;
    proc.stop().await?;
    bound_stop.cancel();
    let frame = spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES as u128;
    let bound = spillway_ingest::config::memory_bound(u128::from(budget), sessions as u128, frame);
    let bound = u64::try_from(bound).unwrap_or(u64::MAX);
    eprintln!(
        "   peak {:.0} MiB, bound {:.0} MiB",
        peak as f64 / MIB,
        bound as f64 / MIB
    );
    results.rows.push(
        Row::figure(
            "5c",
            &format!(
                "ingest peak RSS, {sessions} sessions at full speed, {} MiB budget, vs deploy/'s memory bound for those flags",
                budget >> 20
            ),
            "MiB",
            peak as f64 / MIB,
            &format!("≤ {:.0} MiB", bound as f64 / MIB),
            peak <= bound,
        )
        .note(format!(
            "B + S·(QUIC stream window + 2·F + 64 KiB) + 64 MiB (deploy/README.md), the local overlay's limit; {:.0} MB sent per session",
            per_device as f64 / MB
        )),
    );

    eprintln!("== ingest: real-time 16 kHz devices through the whole pipeline");
    let store = StoreProc::start(env, "realtime", Duration::ZERO).await?;
    let spool = env.dir.join("spool-realtime");
    let up = super::uploader(env, "uploader-realtime", &spool, &store.endpoint).await?;
    let (uploader, grpc, up_http) = (up.proc, up.grpc, up.http);
    let (chunk_seconds, fixed): (u32, &[usize]) = if env.quick {
        (2, &[20, 40])
    } else {
        (10, &[250, 500, 750, 1000, 1500, 2000, 3000, 4000])
    };
    let ceiling = results
        .disk_mb_s
        .map(|mb| mb * MB / BYTES_PER_SECOND as f64);
    let steps = with_goal_step(fixed, ceiling.filter(|_| !env.quick));
    let mut done: Vec<Step> = Vec::new();
    for &n in &steps {
        let before = commit_buckets(&http_get(up_http, "/metrics").await?.1);
        let mut step = realtime(env, &tls, grpc, chunk_seconds, n, 2).await?;
        let after = commit_buckets(&http_get(up_http, "/metrics").await?.1);
        step.commits_within = slowest_commit_within(&before, &after);
        eprintln!(
            "   {n} devices: {} of {} acks, p50 {:?}, p99 {:?}, max {:?}, worst send lag {:?}, {} errors, ingest peak RSS {:.0} MiB, every commit within {}",
            step.latencies.len(),
            step.expected_acks,
            percentile(&step.latencies, 50.0),
            percentile(&step.latencies, 99.0),
            step.latencies.last().copied().unwrap_or_default(),
            step.worst_lag,
            step.errors,
            step.ingest_peak as f64 / MIB,
            within(step.commits_within)
        );
        let ok = step.sustained();
        done.push(step);
        if !ok {
            break;
        }
        store.clear()?;
    }
    uploader.stop().await?;
    drop(store);
    std::fs::remove_dir_all(&spool).ok();

    let max = done
        .iter()
        .filter(|s| s.sustained())
        .map(|s| s.devices)
        .max()
        .unwrap_or(0);
    let tried = done
        .iter()
        .map(|s| s.devices.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let top = steps.iter().max().copied().unwrap_or(0);
    let row = match ceiling {
        Some(c) => Row::ratio_at_least(
            "4b",
            "real-time 16 kHz devices sustained (every ack within 1 s) vs the disk-bound ceiling",
            "devices",
            max as f64,
            c,
            GOAL_4B,
        ),
        None => Row::figure(
            "4b",
            "real-time 16 kHz devices sustained",
            "devices",
            max as f64,
            "run the spool group for the ceiling",
            true,
        ),
    };
    let limited = if max == top {
        format!("; {top} is the most tried: not the limit")
    } else {
        String::new()
    };
    // The disk's share of the acks' latency at the last step tried.
    let commits = done
        .last()
        .map(|s| {
            format!(
                "; at {} devices every commit durable within {}",
                s.devices,
                within(s.commits_within)
            )
        })
        .unwrap_or_default();
    results.rows.push(row.note(format!(
        "steps {tried}; {chunk_seconds} s chunks; ceiling = row 3's append+fdatasync MB/s ÷ 32 KB/s{limited}{commits}; devices run in the bench process on the same cores, {SIM_SOCKETS} UDP sockets among them"
    )));

    // Memory: the audio ingest must hold is one chunk in progress per session (the seeds'
    // pusher held ~16 times its one chunk). The goal allows a constant under 64 MiB beside
    // 1.25 × the audio; the idle RSS is that constant here, so the ratio is the growth over it.
    let grown = mem.peak.saturating_sub(mem.idle) as f64;
    let ratio = grown / mem.held as f64;
    let realtime = done
        .iter()
        .min_by_key(|s| s.devices.abs_diff(1000))
        .map(|s| {
            let held = s.devices as f64 * (u64::from(chunk_seconds) * BYTES_PER_SECOND) as f64;
            format!(
                "; in row 4b's {}-device step ({} s chunks) {:.2} ×, {:.0} KiB per session beside its chunk",
                s.devices,
                chunk_seconds,
                s.ingest_peak.saturating_sub(s.ingest_idle) as f64 / held,
                (s.ingest_peak.saturating_sub(s.ingest_idle) as f64 - held) / s.devices as f64 / 1024.0
            )
        })
        .unwrap_or_default();
    results.rows.push(
        Row::figure(
            "5",
            &format!(
                "ingest peak RSS growth ÷ audio held, {} sessions each holding a {} s chunk in progress",
                mem.devices, mem_seconds
            ),
            "×",
            ratio,
            "≤ 1.25 (+ idle < 64 MiB)",
            ratio <= 1.25 && (mem.idle as f64) < 64.0 * MIB,
        )
        .note(format!(
            "peak {:.0} MiB, idle {:.0} MiB, audio held {:.0} MiB ({:.0} KiB per session beside it){realtime}",
            mem.peak as f64 / MIB,
            mem.idle as f64 / MIB,
            mem.held as f64 / MIB,
            (grown - mem.held as f64) / mem.devices as f64 / 1024.0
        )),
    );

    // Latency at half the maximum sustained load.
    let half = max / 2;
    if let Some(step) = done
        .iter()
        .filter(|s| s.sustained() && s.devices <= half.max(1))
        .max_by_key(|s| s.devices)
    {
        let p99 = percentile(&step.latencies, 99.0);
        results.rows.push(
            Row::figure(
                "6",
                &format!("ack latency p99 at {} devices (≤ half the maximum)", step.devices),
                "ms",
                p99.as_secs_f64() * 1e3,
                "p99 ≤ 50 ms",
                p99 <= Duration::from_millis(50),
            )
            .note(format!(
                "p50 {:.1} ms, max {:.1} ms, {} acks; from a chunk's last byte written to its ack read",
                percentile(&step.latencies, 50.0).as_secs_f64() * 1e3,
                step.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                step.latencies.len()
            )),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_goal_step;

    #[test]
    fn the_goal_point_joins_the_steps_only_inside_their_range() {
        let fixed = [250, 500, 750, 1000, 4000];
        // 0.7 × 1,248 = 873.6: tried at 875, between 750 and 1,000.
        assert_eq!(
            with_goal_step(&fixed, Some(1248.0)),
            [250, 500, 750, 875, 1000, 4000]
        );
        // Beyond the largest step (a fast disk) or unknown: the fixed steps alone.
        assert_eq!(with_goal_step(&fixed, Some(18_000.0)), fixed);
        assert_eq!(with_goal_step(&fixed, None), fixed);
        // Rounded up onto a step already there (0.7 × 1,057 = 739.9 → 750): not tried twice.
        assert_eq!(with_goal_step(&fixed, Some(1057.0)), fixed);
    }

    #[test]
    fn a_steps_slowest_commit_is_the_bound_its_new_commits_all_fall_under() {
        let scrape = |counts: [u64; 4]| {
            let les = ["0.008", "0.032", "0.128", "+Inf"];
            let text: String = les
                .iter()
                .zip(counts)
                .map(|(le, c)| {
                    format!("spillway_uploader_commit_seconds_bucket{{le=\"{le}\"}} {c}\n")
                })
                .collect();
            super::commit_buckets(&format!(
                "# HELP x\n{text}spillway_uploader_commit_seconds_count {}\n",
                counts[3]
            ))
        };
        let before = scrape([10, 10, 10, 10]);
        // 5 new commits: 3 within 8 ms, one more within 32, the last within 128.
        let after = scrape([13, 14, 15, 15]);
        assert_eq!(super::slowest_commit_within(&before, &after), Some(0.128));
        // All new ones fast: the first bound.
        assert_eq!(
            super::slowest_commit_within(&before, &scrape([12, 12, 12, 12])),
            Some(0.008)
        );
        // One beyond the last finite bound, and none at all.
        assert_eq!(
            super::slowest_commit_within(&before, &scrape([10, 10, 10, 11])),
            Some(f64::INFINITY)
        );
        assert_eq!(super::slowest_commit_within(&before, &before), None);
        assert_eq!(super::slowest_commit_within(&[], &[]), None);
    }
}
