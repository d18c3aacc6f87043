//! The spool: `PutChunk` commits against raw append + `fdatasync` (row 3), the uploader's memory
//! with a large backlog (row 5b), and a restart with that backlog (row 7).
//!
//! The uploader runs as its release binary. While the spool fills, its store is a port nobody
//! listens on, so nothing drains and every byte committed stays spooled.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use spillway_proto::uploader::{ChunkId, PutChunkRequest};

use super::store::{CHUNK_BYTES, CHUNK_SAMPLES, base_pcm, chunk_pcm, claim};
use super::{Env, MB, MIB, Results, Row, StoreProc, rss, uploader};
use spillway_kit::cluster::free_tcp;
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::http_get;

/// Concurrent clients committing chunks, and of the baseline's appenders.
const CLIENTS: usize = 8;

/// `chunks` full chunks through `PutChunk`, `CLIENTS` at a time; returns the wall time.
async fn put_chunks(
    grpc: std::net::SocketAddr,
    tls: Option<&spillway_proto::link::LinkTls>,
    chunks: u64,
) -> anyhow::Result<Duration> {
    let limit = CHUNK_BYTES * 2;
    // A connection per client, as an uploader has one from each ingest in front of it: through
    // a single HTTP/2 connection (one ingest) commits ran at about 300 MB/s, that connection's
    // one task being the limit (row 3a: the spool alone commits at over 1 GB/s).
    let mut channels = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        channels.push(
            spillway_kit::pipeline::uploader_endpoint(grpc, tls)?
                .tcp_nodelay(true)
                .initial_stream_window_size(spillway_proto::GRPC_STREAM_WINDOW)
                .initial_connection_window_size(spillway_proto::GRPC_CONNECTION_WINDOW)
                .connect()
                .await?,
        );
    }
    let base = base_pcm();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut channel in channels {
        let (base, next) = (base.clone(), Arc::clone(&next));
        tasks.spawn(async move {
            while let Some(seq) = claim(&next, chunks) {
                let pcm = chunk_pcm(&base, seq);
                let request = PutChunkRequest {
                    id: Some(ChunkId {
                        uid: "bench".into(),
                        session: "commit".into(),
                        seq,
                    }),
                    sample_rate: 16_000,
                    chunk_samples: CHUNK_SAMPLES,
                    first_sample: seq * CHUNK_SAMPLES,
                    // Ingest computes it as the bytes arrive, with the same function.
                    crc32c: spillway_proto::checksum::crc32c(&pcm),
                    pcm,
                    ..Default::default()
                };
                // Ingest's own call: the request's fields, then the audio's own buffer.
                spillway_ingest::put_chunk::put_chunk(
                    &mut channel,
                    &request,
                    Duration::from_secs(60),
                    limit,
                )
                .await
                .with_context(|| format!("PutChunk {seq}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Puts in flight at once in the flood (row 5f): the uploader's default `--max-puts-in-flight`.
const FLOOD: usize = 64;

/// Row 5f: `rounds` × [`FLOOD`] puts of 60 s chunks at 48 kHz (5.76 MB, the largest), all
/// [`FLOOD`] in flight at once (8 connections, 8 calls each), to an uploader whose store is
/// down (so its workers hold records too). Returns the uploader's peak RSS and the bytes sent.
async fn flood(env: &Env, rounds: u64) -> anyhow::Result<(u64, f64)> {
    let spool = env.dir.join("spool-flood");
    let dead = format!("http://{}", free_tcp()?);
    let u = uploader(
        env,
        "uploader-flood",
        &spool,
        vec!["--s3-endpoint".into(), dead],
    )
    .await?;
    let pid = u.proc.id().context("uploader pid")?;
    let samples: u64 = 60 * 48_000;
    let pcm = bytes::Bytes::from(
        (0..samples as usize * 2)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect::<Vec<u8>>(),
    );
    let crc = spillway_proto::checksum::crc32c(&pcm);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = rounds * FLOOD as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let channel = spillway_kit::pipeline::uploader_endpoint(u.grpc, env.client_tls().as_ref())?
            .initial_stream_window_size(spillway_proto::GRPC_STREAM_WINDOW)
            .initial_connection_window_size(spillway_proto::GRPC_CONNECTION_WINDOW)
            .connect()
            .await?;
        for _ in 0..FLOOD / 8 {
            let (mut channel, pcm, next) = (channel.clone(), pcm.clone(), Arc::clone(&next));
            tasks.spawn(async move {
                while let Some(seq) = claim(&next, total) {
                    // Every chunk the same audio under its own id: the spool stores each.
                    let request = PutChunkRequest {
                        id: Some(ChunkId {
                            uid: "flood".into(),
                            session: "flood".into(),
                            seq,
                        }),
                        sample_rate: 48_000,
                        chunk_samples: samples,
                        first_sample: seq * samples,
                        crc32c: crc,
                        pcm: pcm.clone(),
                        ..Default::default()
                    };
                    spillway_ingest::put_chunk::put_chunk(
                        &mut channel,
                        &request,
                        Duration::from_secs(120),
                        1 << 20,
                    )
                    .await
                    .with_context(|| format!("flood PutChunk {seq}"))?;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let (peak, _) = rss(pid)?;
    u.proc.stop().await?;
    std::fs::remove_dir_all(&spool).ok();
    Ok((peak, total as f64 * pcm.len() as f64))
}

/// The baseline: `chunks` chunks appended to one file by `CLIENTS` threads, each append
/// followed by its own `fdatasync`; returns the wall time.
fn append_fdatasync(path: &Path, chunks: u64) -> anyhow::Result<Duration> {
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?,
    );
    let base = base_pcm();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (file, base, next) = (Arc::clone(&file), base.clone(), Arc::clone(&next));
            std::thread::spawn(move || -> std::io::Result<()> {
                while let Some(seq) = claim(&next, chunks) {
                    let pcm = chunk_pcm(&base, seq);
                    // O_APPEND: each chunk lands whole at the end; each then syncs alone.
                    (&*file).write_all(&pcm)?;
                    file.sync_data()?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("an appender panicked"))??;
    }
    let took = started.elapsed();
    std::fs::remove_file(path)?;
    Ok(took)
}

pub async fn run(env: &Env, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("== spool: PutChunk commits vs append + fdatasync");
    let spool = env.dir.join("spool-commit");
    // 4 GiB of chunks in the full run (the memory row's backlog); a smoke run's worth in quick.
    let chunks: u64 = if env.quick {
        48
    } else {
        (4u64 << 30).div_ceil(CHUNK_BYTES as u64)
    };
    let bytes = chunks as f64 * CHUNK_BYTES as f64;
    let dead = format!("http://{}", free_tcp()?);
    let u = uploader(
        env,
        "uploader-commit",
        &spool,
        vec!["--s3-endpoint".into(), dead],
    )
    .await?;
    let (proc, grpc) = (u.proc, u.grpc);
    let pid = proc.id().context("uploader pid")?;
    let took = put_chunks(grpc, env.client_tls().as_ref(), chunks).await?;
    let ours = bytes / took.as_secs_f64() / MB;
    let (peak, now) = rss(pid)?;
    let cpu = super::cpu_seconds(std::process::id())?;
    let raw = append_fdatasync(&env.dir.join("append.bin"), chunks)?;
    // This process's CPU while its threads appended and synced (nothing else runs meanwhile).
    results.floor.disk = Some((super::cpu_seconds(std::process::id())? - cpu) / (bytes / MB));
    let raw = bytes / raw.as_secs_f64() / MB;
    results.disk_mb_s = Some(raw);
    eprintln!("   commit {ours:.0} MB/s, append+fdatasync {raw:.0} MB/s");
    results.rows.push(
        Row::ratio_at_least(
            "3",
            &format!("PutChunk commit, {CLIENTS} clients (a connection each) vs append + fdatasync per chunk, {CLIENTS} threads"),
            "MB/s",
            ours,
            raw,
            0.8,
        )
        .note(format!(
            "{chunks} chunks of 1.92 MB ({:.1} GiB); {:.0} vs {:.0} chunks/s",
            bytes / (1u64 << 30) as f64,
            ours * MB / CHUNK_BYTES as f64,
            raw * MB / CHUNK_BYTES as f64
        )),
    );
    results.rows.push(
        Row::figure(
            "5b",
            &format!(
                "uploader peak RSS with {:.1} GiB spooled",
                bytes / (1u64 << 30) as f64
            ),
            "MiB",
            peak as f64 / MIB,
            "< 256 MiB",
            (peak as f64) < 256.0 * MIB,
        )
        .note(format!("RSS at the end: {:.0} MiB", now as f64 / MIB)),
    );
    proc.stop().await?;

    eprintln!("== spool: a flood of the largest puts, {FLOOD} in flight");
    let (peak, sent) = flood(env, if env.quick { 1 } else { 4 }).await?;
    let bound = spillway_uploader::config::memory_bound(16, FLOOD as u128, 60);
    let gathered_bound = 2 * (16 + FLOOD as u128) * 5_760_000 + (128 << 20);
    results.rows.push(
        Row::figure(
            "5f",
            &format!(
                "uploader peak RSS, {FLOOD} puts of 5.76 MB chunks (60 s at 48 kHz) in flight at once, store down"
            ),
            "MiB",
            peak as f64 / MIB,
            &format!(
                "≤ {:.0} MiB (2·W·C + Q·S + G·(C + S) + 128 MiB)",
                bound as f64 / MIB
            ),
            u128::from(peak) <= bound,
        )
        .note(format!(
            "W = 16, Q = {FLOOD}; {:.1} GB put; the bound when each put was gathered whole, 2·(W + Q)·C + 128 MiB: {:.0} MiB",
            sent / 1e9,
            gathered_bound as f64 / MIB
        )),
    );

    // Where the time goes: the same commits made in this process, without gRPC.
    let direct = env.dir.join("spool-direct");
    let started = Instant::now();
    super::store::fill_spool(&direct, chunks.min(512), "direct").await?;
    let direct_mb =
        chunks.min(512) as f64 * CHUNK_BYTES as f64 / started.elapsed().as_secs_f64() / MB;
    std::fs::remove_dir_all(&direct).ok();
    eprintln!("   Spool::commit in-process {direct_mb:.0} MB/s");
    results.rows.push(
        Row::ratio_at_least(
            "3a",
            "(profile) Spool::commit in-process, 8 tasks, vs the same baseline",
            "MB/s",
            direct_mb,
            raw,
            0.8,
        )
        .note("row 3 without gRPC: what the spool itself costs"),
    );

    eprintln!("== spool: restart with the backlog, drain");
    let store = StoreProc::start(env, "recovery", Duration::ZERO).await?;
    let u = uploader(env, "uploader-recovery", &spool, store.uploader_args()).await?;
    let (proc, http, to_ready) = (u.proc, u.http, u.to_ready);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let (_, m) = http_get(http, "/metrics").await?;
        if metric(&m, "spillway_uploader_spool_chunks") == 0.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not drain in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = bytes / started.elapsed().as_secs_f64() / MB;
    let (peak, _) = rss(proc.id().context("uploader pid")?)?;
    proc.stop().await?;
    drop(store);
    std::fs::remove_dir_all(&spool).ok();
    results.rows.push(
        Row::figure(
            "7",
            &format!(
                "uploader restart with {:.1} GiB spooled: until it accepts chunks",
                bytes / (1u64 << 30) as f64
            ),
            "s",
            to_ready.as_secs_f64(),
            "< 2 s",
            to_ready < Duration::from_secs(2),
        )
        .note("process start to /readyz 200, spool opened, index sized"),
    );
    match results.put_mb_s {
        Some(put) => results.rows.push(
            Row::ratio_at_least(
                "7b",
                "then its drain vs row 1's raw PutObject",
                "MB/s",
                drained,
                put,
                0.9,
            )
            .note(format!(
                "16 workers; uploader peak RSS while draining {:.0} MiB",
                peak as f64 / MIB
            )),
        ),
        None => results.rows.push(
            Row::figure(
                "7b",
                "then its drain",
                "MB/s",
                drained,
                "row 1 not run",
                true,
            )
            .note("run the store group too for the ratio"),
        ),
    }
    Ok(())
}
