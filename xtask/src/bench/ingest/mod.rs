//! Ingest: throughput against raw QUIC (row 4), real-time devices the whole pipeline sustains
//! (row 4b), ingest's memory (row 5) and ack latency (row 6); the Omi WebSocket's throughput
//! and memory (rows 4w and 5w, `omi.rs`).
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

use super::{Env, FloorCpu, MB, MIB, Results, Row, StoreProc, percentile, rss};
use spillway_kit::cluster::{Proc, free_tcp, free_udp, ready};
use spillway_kit::pipeline::http_get;

mod memory;
mod omi;
mod realtime;

use memory::*;
pub use omi::ws_sink;
use realtime::*;

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
    limits: (usize, u64),
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    ingest_with(env, tls, uploader, chunk_seconds, name, limits, &[]).await
}

/// [`ingest`] with `extra` flags.
async fn ingest_with(
    env: &Env,
    tls: &Tls,
    uploader: SocketAddr,
    chunk_seconds: u32,
    name: &str,
    (sessions, budget): (usize, u64),
    extra: &[String],
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
    args.extend(extra.iter().cloned());
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
    let sink_pid = sink.id().context("quic-sink pid")?;
    let cpu = crate::bench::cpu_seconds(sink_pid)?;
    let raw = total
        / blast(sink_addr, &tls.der, devices, bytes)
            .await?
            .as_secs_f64()
        / MB;
    // The receiving end's CPU alone: a quinn server that reads every byte and drops it.
    results.floor.quic = Some((crate::bench::cpu_seconds(sink_pid)? - cpu) / (total / MB));
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

    omi::run(env, &tls, results).await?;

    eprintln!("== ingest: real-time 16 kHz devices through the whole pipeline");
    let (chunk_seconds, fixed): (u32, &[usize]) = if env.quick {
        (2, &[20, 40])
    } else {
        (10, &[250, 500, 750, 1000, 1500, 2000, 3000, 4000])
    };
    let ceiling = results
        .disk_mb_s
        .map(|mb| mb * MB / BYTES_PER_SECOND as f64);
    let steps = with_goal_step(fixed, ceiling.filter(|_| !env.quick));
    let done = real_time_steps(env, &tls, chunk_seconds, &steps, None).await?;
    results
        .rows
        .push(row_4b("4b", &done, &steps, ceiling, chunk_seconds, None));
    if let Some(row) = row_4c(&done, results.floor, &results.machine) {
        results.rows.push(row);
    }
    // The same with the load generator (devices, store) on one core and the daemons on the
    // other, so the row measures Spillway rather than the devices it shares the cores with.
    if !env.quick && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        eprintln!("== ingest: real-time devices, devices and store on CPU 0, daemons on CPU 1");
        let pinned = real_time_steps(env, &tls, chunk_seconds, &steps, Some(PINNING)).await?;
        results.rows.push(row_4b(
            "4b-pinned",
            &pinned,
            &steps,
            ceiling,
            chunk_seconds,
            Some(PINNING),
        ));
    }

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
    let half = most_sustained(&done) / 2;
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
    use super::realtime::with_goal_step;

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
