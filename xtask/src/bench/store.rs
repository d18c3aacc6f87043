//! The drain against raw `PutObject`: rows 1 and 2 and the adaptive pool.
//!
//! Spillway's figure is `uploader drain` (the release binary, a process) emptying a spool of
//! 1.92 MB chunks (60 s at 16 kHz) into the store; the baseline is a plain aws-sdk-s3
//! `PutObject` loop in this process sending objects of the same size at the same concurrency to
//! the same store.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use spillway_uploader::spool::{Limits, Record, Spool};

use super::{Env, MB, Results, Row, StoreProc};

/// Samples in one chunk: 60 s at 16 kHz.
pub const CHUNK_SAMPLES: u64 = 960_000;
/// Bytes of PCM in one chunk.
pub const CHUNK_BYTES: usize = 1_920_000;

/// PCM for chunk `seq`: a shared pattern made distinct per chunk (its first bytes).
pub fn chunk_pcm(base: &Bytes, seq: u64) -> Bytes {
    let mut v = base.to_vec();
    v[..8].copy_from_slice(&seq.to_le_bytes());
    Bytes::from(v)
}

/// Hands out the numbers `0..total` to concurrent workers, each number once; `None` once all
/// are taken.
pub fn claim(next: &std::sync::atomic::AtomicU64, total: u64) -> Option<u64> {
    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (n < total).then_some(n)
}

/// A pattern of PCM that is not all one value.
pub fn base_pcm() -> Bytes {
    Bytes::from(
        (0..CHUNK_BYTES)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Commits `chunks` full chunks into a fresh spool at `dir`, 8 at a time; returns the bytes of
/// PCM spooled.
pub async fn fill_spool(dir: &Path, chunks: u64, session: &str) -> anyhow::Result<u64> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let spool = Arc::new(Spool::open(dir, Limits::reject(u64::MAX / 2))?);
    let base = base_pcm();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (spool, base, next, session) = (
            Arc::clone(&spool),
            base.clone(),
            Arc::clone(&next),
            session.to_owned(),
        );
        tasks.spawn(async move {
            while let Some(seq) = claim(&next, chunks) {
                let pcm = chunk_pcm(&base, seq);
                let record = Record {
                    uid: "bench".into(),
                    session: session.clone(),
                    seq,
                    sample_rate: 16_000,
                    chunk_samples: CHUNK_SAMPLES,
                    first_sample: seq * CHUNK_SAMPLES,
                    crc32c: spillway_proto::checksum::crc32c(&pcm),
                    pcm,
                    ..Default::default()
                };
                spool.commit(&record).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    spool.flush().await?;
    Ok(chunks * CHUNK_BYTES as u64)
}

/// Runs `uploader drain` on `spool` with `workers` (a number or `auto`); returns how long the
/// drain itself took, from its log: from the spool opened and the bucket checked to the spool
/// empty, as the raw loop is timed from its client made and its bucket created. (Process start
/// is row 7's figure; through a store that answers 30 ms late, the start's two bucket requests
/// alone were 2.5 ms per object at one worker.)
pub async fn drain(
    env: &Env,
    spool: &Path,
    store: &StoreProc,
    workers: &str,
    extra: &[&str],
) -> anyhow::Result<Duration> {
    let log = env.logs.join("uploader-drain.log");
    std::fs::write(&log, "")?;
    let file = std::fs::OpenOptions::new().append(true).open(&log)?;
    let status = tokio::process::Command::new(env.bin.join("uploader"))
        .arg("drain")
        .args(["--spool-dir", &spool.display().to_string()])
        .args(store.uploader_args())
        .args(["--bucket", spillway_kit::cluster::BUCKET, "--create-bucket"])
        .args(["--workers", workers])
        .args(["--drain-timeout", "10m", "--log-format", "json"])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", spillway_kit::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", spillway_kit::s3::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .await
        .context("running uploader drain")?;
    ensure!(
        status.success(),
        "uploader drain failed ({status}); see {}",
        log.display()
    );
    let seconds = drain_log(env)
        .iter()
        .rev()
        .find(|v| v.pointer("/fields/message").and_then(|m| m.as_str()) == Some("drain finished"))
        .and_then(|v| v.pointer("/fields/elapsed_seconds")?.as_f64())
        .with_context(|| format!("no \"drain finished\" with its time in {}", log.display()))?;
    Ok(Duration::from_secs_f64(seconds))
}

/// The last `uploader drain`'s JSON log lines.
fn drain_log(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.logs.join("uploader-drain.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every limit `uploader drain --workers auto` logged, in order, after the one it starts at.
fn auto_limits(env: &Env) -> Vec<f64> {
    drain_log(env)
        .iter()
        .filter_map(|v| v.pointer("/fields/limit")?.as_f64())
        .collect()
}

/// The limit `uploader drain --workers auto` last logged, if any.
fn last_auto_limit(env: &Env) -> Option<f64> {
    drain_log(env)
        .iter()
        .rev()
        .find_map(|v| v.pointer("/fields/limit")?.as_f64())
}

/// The objects the drain of a spool filled by [`fill_spool`] stores: each chunk's WAV, every one
/// distinct. The raw loop sends these from memory, so neither side uploads one buffer that stays
/// in the CPU's cache (a single reused body made the baseline ~30 % cheaper per byte in hashing
/// and copying than any real upload of distinct objects can be).
pub fn wav_bodies(chunks: u64) -> anyhow::Result<Vec<Bytes>> {
    let base = base_pcm();
    (0..chunks)
        .map(|seq| {
            let wav = spillway_uploader::object::wav(&chunk_pcm(&base, seq), 16_000)?;
            Ok(Bytes::from(wav))
        })
        .collect()
}

/// Sends `objects` objects, the bodies in turn, with `concurrency` `PutObject`s in flight, with
/// the SDK's defaults, but as the uploader signs them: over HTTPS `UNSIGNED-PAYLOAD` (the SDK
/// still sends a checksum of the body), over HTTP a signed SHA-256; returns the wall time.
pub async fn raw_put(
    store: &StoreProc,
    bodies: &[Bytes],
    objects: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let s3 = store.client().await?;
    let unsigned = store.ca_file.is_some();
    let _ = s3
        .create_bucket()
        .bucket(spillway_kit::cluster::BUCKET)
        .send()
        .await;
    let bodies: Arc<[Bytes]> = bodies.into();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (s3, bodies, next) = (s3.clone(), Arc::clone(&bodies), Arc::clone(&next));
        tasks.spawn(async move {
            while let Some(i) = claim(&next, objects as u64) {
                let body = &bodies[i as usize % bodies.len()];
                let put = s3
                    .put_object()
                    .bucket(spillway_kit::cluster::BUCKET)
                    .key(format!("raw/{i:06}.wav"))
                    .body(aws_sdk_s3::primitives::ByteStream::from(body.clone()));
                if unsigned {
                    put.customize().disable_payload_signing().send().await
                } else {
                    put.send().await
                }
                .context("PutObject")?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// One point: Spillway's drain and the raw loop, same objects and concurrency. Returns MB/s of
/// each, and the raw loop's client CPU seconds per MB.
async fn point(
    env: &Env,
    store: &StoreProc,
    spool: &Path,
    chunks: u64,
    workers: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let bytes = fill_spool(spool, chunks, &format!("w{workers}")).await? as f64;
    let took = drain(env, spool, store, &workers.to_string(), &[]).await?;
    store.clear()?;
    // Up to 256 distinct bodies (492 MB) in turn: none stays in the CPU's cache, and the bench
    // does not hold 2 GB for row 1 (with all 1,024 in memory the raw loop ran 15-25 % slower in
    // three runs of eight).
    let bodies = wav_bodies(chunks.min(256))?;
    let cpu = super::cpu_seconds(std::process::id())?;
    let raw = raw_put(store, &bodies, chunks as usize, workers).await?;
    // This process's CPU while the raw loop ran: the `PutObject` client's alone.
    let cpu = super::cpu_seconds(std::process::id())? - cpu;
    drop(bodies);
    store.clear()?;
    Ok((
        bytes / took.as_secs_f64() / MB,
        bytes / raw.as_secs_f64() / MB,
        cpu / (bytes / MB),
    ))
}

pub async fn run(env: &Env, results: &mut Results, out: &Path) -> anyhow::Result<()> {
    let spool = env.dir.join("spool-drain");

    // Row 1: no added latency, the default 16 workers.
    eprintln!("== store: drain vs raw PutObject");
    let store = StoreProc::start(env, "plain", Duration::ZERO).await?;
    let chunks = if env.quick { 24 } else { 1024 };
    let (ours, raw, put_cpu) = point(env, &store, &spool, chunks, 16).await?;
    results.put_mb_s = Some(raw);
    results.floor.put = Some(put_cpu);
    results.rows.push(
        Row::ratio_at_least(
            "1",
            "drain → store vs raw PutObject, 1.92 MB objects, 16 workers",
            "MB/s",
            ours,
            raw,
            0.9,
        )
        .note(format!(
            "{chunks} objects; {:.0} vs {:.0} objects/s",
            ours * MB / (CHUNK_BYTES as f64),
            raw * MB / (CHUNK_BYTES as f64)
        )),
    );
    drop(store);

    // Row 2: the store answers `latency` late; sweep the workers.
    let ms = env.latency.as_millis();
    eprintln!("== store: worker sweep at {ms} ms");
    let store = StoreProc::start(env, "slow", env.latency).await?;
    let sweep: &[usize] = if env.quick {
        &[1, 8, 32]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    for &w in sweep {
        let chunks = if env.quick {
            (w as u64 * 2).clamp(8, 32)
        } else {
            (w as u64 * 8).clamp(24, 320)
        };
        let (ours, raw, _) = point(env, &store, &spool, chunks, w).await?;
        eprintln!("   workers {w:>2}: drain {ours:.0} MB/s, raw {raw:.0} MB/s");
        results.sweep.push((w, ours, raw));
    }
    let best = results
        .sweep
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .context("empty sweep")?;
    let (w1, one, _) = results.sweep[0];
    results.rows.push(
        Row::ratio_at_least(
            "2",
            &format!("drain at {ms} ms store latency: best workers vs 1 worker"),
            "MB/s",
            best.1,
            one,
            1.0,
        )
        .note(format!(
            "best at {} workers ({:.2} of raw PutObject at the same concurrency); {w1} worker: {one:.0} MB/s; curve in the plot",
            best.0,
            best.1 / best.2
        )),
    );

    // Adaptive: told nothing about the latency.
    let chunks = if env.quick { 32 } else { 320 };
    let bytes = fill_spool(&spool, chunks, "auto").await? as f64;
    let took = drain(
        env,
        &spool,
        &store,
        "auto",
        &["--workers-min", "1", "--workers-max", "256"],
    )
    .await?;
    store.clear()?;
    let auto = bytes / took.as_secs_f64() / MB;
    let limit = last_auto_limit(env).unwrap_or(f64::NAN);
    results.auto = Some((auto, limit));
    // Where auto went: from its start at 4, each limit it logged (rises at most once a second).
    results.auto_path = std::iter::once(4.0).chain(auto_limits(env)).collect();
    results.rows.push(
        Row::ratio_at_least(
            "2a",
            &format!("`--workers auto` at {ms} ms vs the best fixed setting"),
            "MB/s",
            auto,
            best.1,
            0.9,
        )
        .note(format!(
            "best fixed: {} workers; auto's last limit: {limit:.0}; {chunks} objects from a start at 4",
            best.0
        )),
    );
    drop(store);
    std::fs::remove_dir_all(&spool).ok();

    let svg = out.join("workers.svg");
    super::plot::workers(
        &svg,
        ms,
        &results.sweep,
        results.auto.map(|a| a.0),
        &results.auto_path,
    )
    .with_context(|| format!("plotting {}", svg.display()))?;
    eprintln!("   plot: {}", svg.display());
    Ok(())
}
