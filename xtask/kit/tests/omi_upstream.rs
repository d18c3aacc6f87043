//! The relay to an upstream Omi pusher (`--omi-upstream`), end to end: a fake pusher (an axum
//! WebSocket server in the test) records what reaches it and answers a 104 with a 201 of its
//! own; a dead one (accepts and hangs up) and a stalled one (accepts and never answers) stand
//! for an outage. Audio is stored byte for byte whatever the upstream does, and as fast.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use parking_lot::Mutex;
use spillway_kit::metrics::metric;
use spillway_kit::omi::{Listen, Reply};
use spillway_kit::pipeline::{Options, Pipeline};

const LIMIT: Duration = Duration::from_secs(150);
const RATE: u32 = 16_000;
const T0: f64 = 1_786_961_845.25;

fn options(upstream: Option<String>, audio: bool) -> Options {
    Options {
        chunk_seconds: 2,
        omi_upstream: upstream,
        omi_upstream_audio: audio,
        ..Options::default()
    }
}

/// `seconds` of a continuous capture, PCM s16le, different per `seed`.
fn capture(seconds: usize, seed: u32) -> Vec<u8> {
    (0..seconds * RATE as usize * 2)
        .map(|i| {
            ((i as u32) ^ seed)
                .wrapping_mul(2_654_435_761)
                .rotate_left(7) as u8
        })
        .collect()
}

fn frame(op: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = op.to_le_bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

fn audio_frame(ts: f64, pcm: &[u8]) -> Vec<u8> {
    let mut payload = ts.to_le_bytes().to_vec();
    payload.extend_from_slice(pcm);
    frame(101, &payload)
}

/// What one connection to the fake pusher brought: its query and its messages, in order.
type Seen = Arc<Mutex<Vec<(String, Vec<Vec<u8>>)>>>;

/// A fake pusher on 127.0.0.1: it records every message, sends the 202 when asked (ingest must
/// drop it), answers a 104 with a 201 marked `"by": "upstream"`, then a message of an opcode
/// listen does not know (ingest must drop it too).
async fn fake_pusher() -> (String, Seen) {
    async fn upgrade(
        State(seen): State<Seen>,
        RawQuery(query): RawQuery,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        ws.on_upgrade(move |socket| session(socket, query.unwrap_or_default(), seen))
    }
    async fn session(mut socket: WebSocket, query: String, seen: Seen) {
        let index = {
            let mut seen = seen.lock();
            seen.push((query.clone(), Vec::new()));
            seen.len() - 1
        };
        if query.contains("audio_timeline=2") {
            let ack = br#"{"type":"audio_timeline_ack","version":2}"#;
            let _ = socket.send(Message::Binary(frame(202, ack).into())).await;
        }
        while let Some(Ok(message)) = socket.recv().await {
            let Message::Binary(data) = message else {
                continue;
            };
            seen.lock()[index].1.push(data.to_vec());
            if data.starts_with(&104u32.to_le_bytes()) {
                let json: serde_json::Value = serde_json::from_slice(&data[4..]).unwrap();
                let result = serde_json::json!({
                    "conversation_id": json["conversation_id"], "success": true, "by": "upstream"
                });
                let result = frame(201, result.to_string().as_bytes());
                let _ = socket.send(Message::Binary(result.into())).await;
                let _ = socket.send(Message::Binary(frame(299, b"{}").into())).await;
            }
        }
    }
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/v1/trigger/listen", axum::routing::get(upgrade))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("ws://{addr}"), seen)
}

/// A pusher that is down: it accepts each connection and, with `hang_up`, closes it at once
/// (the handshake fails), otherwise holds it without a byte (the handshake times out). Returns
/// its URL and how many connections it accepted.
async fn dead_pusher(hang_up: bool) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if !hang_up {
                held.push(socket);
            }
        }
    });
    (format!("ws://{addr}"), accepted)
}

/// Waits until `n` objects are under `prefix`; returns their keys.
async fn keys(p: &Pipeline, prefix: &str, n: usize) -> Vec<String> {
    loop {
        let keys = p.object_keys(prefix).await.unwrap();
        if keys.len() >= n {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The objects under `prefix`, concatenated in key order.
async fn stored(p: &Pipeline, prefix: &str, n: usize) -> Vec<u8> {
    let mut all = Vec::new();
    for k in keys(p, prefix, n).await {
        all.extend(p.object(&k).await.unwrap().unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_audio_frames_reach_the_pusher_in_order_and_its_201_comes_back() {
    tokio::time::timeout(LIMIT, async {
        for audio in [false, true] {
            let (url, seen) = fake_pusher().await;
            let p = Pipeline::start(options(Some(url), audio)).await.unwrap();
            let pcm = capture(3, 1);
            let query = format!("uid=alice&sample_rate={RATE}&client_kind=ios&audio_timeline=2");
            let mut l = Listen::connect(p.ingest_omi, &query, None).await.unwrap();
            assert_eq!(
                l.next().await.unwrap(),
                Reply::Json(202, serde_json::json!({"type": "audio_timeline_ack", "version": 2})),
                "ingest's own 202"
            );
            let mut sent = vec![frame(103, b"conv-1")];
            for from in (0..pcm.len()).step_by(16_000) {
                let ts = T0 + (from / 2) as f64 / f64::from(RATE);
                sent.push(audio_frame(ts, &pcm[from..from + 16_000]));
            }
            sent.push(frame(102, br#"{"segments":[],"memory_id":"conv-1"}"#));
            sent.push(frame(105, br#"{"person_id":"p","conversation_id":"conv-1"}"#));
            sent.push(frame(999, b"{}"));
            sent.push(frame(100, b""));
            sent.push(frame(
                104,
                br#"{"conversation_id":"conv-1","language":"en"}"#,
            ));
            for f in &sent {
                l.raw(f).await.unwrap();
            }
            assert_eq!(
                l.next().await.unwrap(),
                Reply::Json(
                    201,
                    serde_json::json!({"conversation_id": "conv-1", "success": true, "by": "upstream"})
                ),
                "the pusher's 201, not the upstream's 202 (audio relayed: {audio})"
            );
            assert!(
                tokio::time::timeout(Duration::from_secs(1), l.next()).await.is_err(),
                "no 201 of ingest's own, nothing else relayed"
            );
            let want: Vec<Vec<u8>> = sent
                .iter()
                .filter(|f| audio || !f.starts_with(&101u32.to_le_bytes()))
                .cloned()
                .collect();
            {
                let seen = seen.lock();
                assert_eq!(seen.len(), 1, "one upstream connection for the session");
                assert_eq!(seen[0].0, query, "listen's query, as sent");
                assert!(seen[0].1 == want, "every relayed frame in order, byte for byte");
            }
            assert_eq!(l.close().await.unwrap(), 1000);
            assert!(
                stored(&p, "chunks/alice/conv-1/", 2).await == pcm,
                "audio stored byte for byte"
            );
            let m = p.ingest_metrics().await.unwrap();
            let replies = |r: &str| {
                metric(&m, &format!("spillway_ingest_omi_upstream_replies_total{{reason=\"{r}\"}}"))
            };
            assert_eq!(replies("relayed"), 1.0);
            assert_eq!(replies("timeline_ack"), 1.0);
            assert_eq!(replies("other"), 1.0);
            assert_eq!(metric(&m, "spillway_ingest_omi_upstream_frames_total"), want.len() as f64);
            assert_eq!(
                metric(&m, "spillway_ingest_omi_upstream_connects_total{result=\"ok\"}"),
                1.0
            );
            p.stop().await.unwrap();
        }
    })
    .await
    .expect("within the limit");
}

const SESSIONS: usize = 8;
const ROUNDS: usize = 3;

/// Streams `ROUNDS` rounds of 4 s of audio on `SESSIONS` listen sessions at once (two full
/// 2 s chunks each, a new conversation each round); returns, per round, the time from the
/// last frame sent to every chunk of the round stored, and the sessions, still open. Checks
/// the first session's audio.
async fn storage_times(p: &Pipeline) -> (Vec<Duration>, Vec<Listen>) {
    let mut listens = Vec::new();
    for s in 0..SESSIONS {
        let query = format!("uid=u{s}&sample_rate={RATE}");
        listens.push(Listen::connect(p.ingest_omi, &query, None).await.unwrap());
    }
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let pcm: Vec<Vec<u8>> = (0..SESSIONS)
            .map(|s| capture(4, (round * SESSIONS + s) as u32))
            .collect();
        let conv = format!("conv-{round}");
        for l in &mut listens {
            l.conversation(&conv).await.unwrap();
        }
        for from in (0..pcm[0].len()).step_by(16_000) {
            let ts = T0 + (round * 10) as f64 + (from / 2) as f64 / f64::from(RATE);
            for (l, pcm) in listens.iter_mut().zip(&pcm) {
                l.audio(ts, &pcm[from..from + 16_000]).await.unwrap();
            }
        }
        let last = Instant::now();
        for s in 0..SESSIONS {
            keys(p, &format!("chunks/u{s}/{conv}/"), 2).await;
        }
        times.push(last.elapsed());
        assert!(
            stored(p, &format!("chunks/u0/{conv}/"), 2).await == pcm[0],
            "audio stored byte for byte"
        );
    }
    (times, listens)
}

async fn close_all(listens: Vec<Listen>) {
    for l in listens {
        assert_eq!(l.close().await.unwrap(), 1000, "listen is not disconnected");
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[t.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_does_not_slow_storage_and_the_breaker_bounds_its_connects() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(options(None, false)).await.unwrap();
        let (without, listens) = storage_times(&p).await;
        close_all(listens).await;
        p.stop().await.unwrap();

        let (url, accepted) = dead_pusher(true).await;
        let p = Pipeline::start(options(Some(url), true)).await.unwrap();
        let started = Instant::now();
        let (with_dead, listens) = storage_times(&p).await;
        // The sessions stay open through more of the outage: their relays keep trying.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let during = started.elapsed();
        let attempts = accepted.load(Ordering::SeqCst);
        let m = p.ingest_metrics().await.unwrap();
        close_all(listens).await;
        p.stop().await.unwrap();

        eprintln!(
            "storage time after the last frame, {SESSIONS} sessions x {ROUNDS} rounds: \
             no upstream {without:?} (median {:?}); dead upstream {with_dead:?} (median {:?}); \
             {attempts} connection attempts reached the dead upstream in {during:?}",
            median(&without),
            median(&with_dead)
        );
        assert!(
            median(&with_dead) <= median(&without) * 3 + Duration::from_millis(500),
            "a dead upstream slowed storage: {with_dead:?} against {without:?}"
        );
        // Every session may try once before the shared breaker opens (they start together);
        // after that, one probe per open period (2 s, then 4 s, ...). Without the breaker each
        // session would retry after 0.2 s, 0.4 s, 0.8 s, ... on its own: some 40 in 5 s.
        let probes = 1 + (during.as_secs_f64() / 2.0).log2().max(0.0).ceil() as usize;
        assert!(
            attempts <= SESSIONS + probes + 3,
            "{attempts} connection attempts in {during:?}"
        );
        let connects = |r: &str| {
            metric(
                &m,
                &format!("spillway_ingest_omi_upstream_connects_total{{result=\"{r}\"}}"),
            )
        };
        assert_eq!(connects("ok"), 0.0);
        assert!(
            connects("failed") >= 5.0,
            "the breaker opened after 5 failures"
        );
        assert!(
            connects("breaker_open") >= 1.0,
            "sessions waited for the breaker"
        );
        assert_ne!(
            metric(&m, "spillway_ingest_omi_upstream_breaker_state"),
            0.0,
            "not closed"
        );
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_holds_at_most_the_queue_and_counts_what_it_drops() {
    tokio::time::timeout(LIMIT, async {
        const QUEUE: usize = 256 * 1024;
        let (url, accepted) = dead_pusher(false).await;
        let p = Pipeline::start(Options {
            omi_upstream_queue_bytes: QUEUE,
            ..options(Some(url), true)
        })
        .await
        .unwrap();
        let pcm = capture(20, 7);
        let mut l = Listen::connect(p.ingest_omi, &format!("uid=carol&sample_rate={RATE}"), None)
            .await
            .unwrap();
        l.conversation("conv-s").await.unwrap();
        l.op(100, b"").await.unwrap();
        // One-second frames, as listen sends them: 32 KB of audio each.
        for from in (0..pcm.len()).step_by(32_000) {
            let ts = T0 + (from / 2) as f64 / f64::from(RATE);
            l.audio(ts, &pcm[from..from + 32_000]).await.unwrap();
        }
        let offered = 2 + pcm.len() / 32_000;
        // Stored while the upstream stalls: all ten 2 s chunks.
        keys(&p, "chunks/carol/conv-s/", 10).await;
        let m = p.ingest_metrics().await.unwrap();
        let queued = metric(&m, "spillway_ingest_omi_upstream_queued_bytes");
        let dropped = |r: &str| {
            metric(
                &m,
                &format!("spillway_ingest_omi_upstream_dropped_frames_total{{reason=\"{r}\"}}"),
            )
        };
        let full = dropped("queue_full");
        eprintln!(
            "stalled upstream: {offered} frames offered, {full} dropped for room, \
             {queued} bytes queued (bound {QUEUE})"
        );
        assert!(
            queued > 0.0 && queued <= QUEUE as f64,
            "{queued} bytes queued"
        );
        // At most 8 one-second frames (32,012 bytes) fit in 256 KiB.
        assert!(full >= (offered - 8) as f64, "{full} dropped");
        assert_eq!(metric(&m, "spillway_ingest_omi_upstream_frames_total"), 0.0);

        assert_eq!(l.close().await.unwrap(), 1000, "listen is not disconnected");
        assert!(
            stored(&p, "chunks/carol/conv-s/", 10).await == pcm,
            "audio stored byte for byte"
        );
        // The session's end drops what is left, counted; nothing stays held.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = p.ingest_metrics().await.unwrap();
            let down = metric(
                &m,
                "spillway_ingest_omi_upstream_dropped_frames_total{reason=\"upstream_down\"}",
            );
            if down + full == offered as f64 {
                assert_eq!(metric(&m, "spillway_ingest_omi_upstream_queued_bytes"), 0.0);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{down} + {full} of {offered} counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(accepted.load(Ordering::SeqCst) >= 1, "the relay tried");
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}
