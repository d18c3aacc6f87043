//! The Omi WebSocket front end: its throughput against a raw WebSocket server fed the same
//! frames (row 4w), and its memory per session with every session holding a chunk in progress
//! (row 5w, beside QUIC's row 5).
//!
//! Both run ingest's release binary with `--omi-listen`, forwarding to an uploader in this
//! process that acknowledges without storing, as row 4 does. The baseline is `xtask ws-sink`:
//! axum's WebSocket (the same tungstenite ingest uses), reading every message and discarding
//! it. Sessions are [`spillway_kit::omi::Listen`]s sending 1 s frames of 16 kHz audio with
//! timeline version 2, as Omi's listen does.

#[allow(clippy::wildcard_imports)]
use super::*;
use spillway_kit::omi::Listen;

/// `xtask ws-sink`: accepts WebSockets on the pusher's route, reads every message to the close,
/// discards it, and closes normally. The baseline of row 4w.
pub async fn ws_sink(listen: SocketAddr) -> anyhow::Result<()> {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    async fn upgrade(ws: WebSocketUpgrade) -> axum::response::Response {
        ws.max_message_size(1 << 20)
            .on_upgrade(|mut socket| async move {
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        // Answer the close (as ingest does) and flush it before the socket goes.
                        let _ = socket.send(Message::Close(None)).await;
                        let _ = futures_util::SinkExt::close(&mut socket).await;
                        break;
                    }
                }
            })
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = axum::Router::new().route(spillway_ingest::omi::ROUTE, axum::routing::get(upgrade));
    axum::serve(listener, app).await?;
    Ok(())
}

/// One second of 16 kHz audio: what listen sends in a frame.
const FRAME: usize = 32_000;

/// `sessions` listen sessions each sending `seconds` of audio as fast as the socket takes it;
/// returns the wall time until every server closed (ingest: after committing every chunk).
async fn blast(addr: SocketAddr, sessions: usize, seconds: u32) -> anyhow::Result<Duration> {
    let pcm = Bytes::from(crate::bench::store::base_pcm().slice(..FRAME).to_vec());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..sessions {
        let pcm = pcm.clone();
        tasks.spawn(async move {
            let query = format!("uid=omi-{s:04}&sample_rate=16000&audio_timeline=2");
            let mut l = Listen::connect(addr, &query, None).await?;
            l.conversation("bench").await?;
            for i in 0..seconds {
                l.audio(1.0e9 + f64::from(i), &pcm).await?;
            }
            let code = l.close().await?;
            anyhow::ensure!(code == 1000, "session {s} closed {code}");
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Rows 4w and 5w.
pub(super) async fn run(env: &Env, tls: &Tls, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("== ingest: the Omi WebSocket vs a raw WebSocket");
    let stop = CancellationToken::new();
    let discard = discard_uploader(env, stop.clone()).await?;
    let (sessions, seconds) = if env.quick { (4, 120) } else { (16, 1800) };
    let total = sessions as f64 * f64::from(seconds) * FRAME as f64;
    let omi = free_tcp()?;
    let extra = ["--omi-listen".to_owned(), omi.to_string()];
    let (proc, _, _) = ingest_with(env, tls, discard, 60, "ingest-omi", UNBOUNDED, &extra).await?;
    let ours = total / blast(omi, sessions, seconds).await?.as_secs_f64() / MB;
    proc.stop().await?;
    let sink_addr = free_tcp()?;
    let mut sink = Proc::spawn(
        "ws-sink",
        &env.bin.join("xtask"),
        &["ws-sink".into(), "--listen".into(), sink_addr.to_string()],
        &[],
        &env.logs,
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.check_alive()?;
    let raw = total / blast(sink_addr, sessions, seconds).await?.as_secs_f64() / MB;
    sink.stop().await.ok();
    eprintln!("   ingest (Omi) {ours:.0} MB/s, raw WebSocket {raw:.0} MB/s");
    results.rows.push(
        Row::ratio_at_least(
            "4w",
            &format!(
                "ingest's Omi WebSocket (pusher protocol, timeline v2, chunking, gRPC forward) vs a raw WebSocket server, {sessions} sessions"
            ),
            "MB/s",
            ours,
            raw,
            0.7,
        )
        .note(format!(
            "{:.0} MB per session in 1 s frames, as fast as possible; the uploader acknowledges without storing",
            f64::from(seconds) * FRAME as f64 / MB
        )),
    );

    eprintln!("== ingest: memory per Omi session, each holding a chunk in progress");
    let (hold_seconds, count) = if env.quick {
        (2u32, 20usize)
    } else {
        (59, 1000)
    };
    let (proc, _, _) = ingest_with(
        env,
        tls,
        discard,
        60,
        "ingest-omi-memory",
        UNBOUNDED,
        &extra,
    )
    .await?;
    let pid = proc.id().context("ingest pid")?;
    let (_, idle) = rss(pid)?;
    let pcm = Bytes::from(crate::bench::store::base_pcm().slice(..FRAME).to_vec());
    let filling = Arc::new(tokio::sync::Semaphore::new(32));
    let held = Arc::new(tokio::sync::Barrier::new(count + 1));
    let release = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..count {
        let (pcm, filling, held, release) = (
            pcm.clone(),
            Arc::clone(&filling),
            Arc::clone(&held),
            release.clone(),
        );
        tasks.spawn(async move {
            let permit = filling.acquire_owned().await?;
            let filled = async {
                let query = format!("uid=mem-{s:05}&sample_rate=16000&audio_timeline=2");
                let mut l = Listen::connect(omi, &query, None).await?;
                l.next().await?;
                l.conversation("bench").await?;
                for i in 0..hold_seconds {
                    l.audio(1.0e9 + f64::from(i), &pcm).await?;
                }
                anyhow::Ok(l)
            }
            .await;
            drop(permit);
            // Every task reaches the barrier, failed or not, so the count always completes.
            held.wait().await;
            let l = filled?;
            release.cancelled().await;
            let code = l.close().await?;
            anyhow::ensure!(code == 1000, "session {s} closed {code}");
            anyhow::Ok(())
        });
    }
    held.wait().await;
    // Let ingest take in what the sockets still held, then read its high-water mark.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (peak, _) = rss(pid)?;
    release.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    proc.stop().await?;
    stop.cancel();
    let audio = count as u64 * u64::from(hold_seconds) * FRAME as u64;
    let ratio = peak.saturating_sub(idle) as f64 / audio as f64;
    let beside = peak.saturating_sub(idle).saturating_sub(audio) / count as u64;
    eprintln!(
        "   {count} sessions: idle {:.0} MiB, peak {:.0} MiB, audio held {:.0} MiB",
        idle as f64 / MIB,
        peak as f64 / MIB,
        audio as f64 / MIB
    );
    results.rows.push(
        Row::figure(
            "5w",
            &format!(
                "ingest peak RSS growth ÷ audio held, {count} Omi sessions each holding a 60 s chunk in progress"
            ),
            "×",
            ratio,
            "≤ 1.25 (as row 5)",
            ratio <= 1.25,
        )
        .note(format!(
            "peak {:.0} MiB, idle {:.0} MiB, audio held {:.0} MiB ({} KiB per session beside it; row 5 gives QUIC's)",
            peak as f64 / MIB,
            idle as f64 / MIB,
            audio as f64 / MIB,
            beside / 1024
        )),
    );
    Ok(())
}
