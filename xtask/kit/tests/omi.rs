//! The Omi pusher front end end to end: a stand-in for Omi's listen service speaks the pusher
//! WebSocket protocol to the real ingest, which forwards to the real uploader over mutual TLS,
//! which stores into the embedded S3 store; every object is read back and checked byte for byte
//! in Omi's layout (and, sealed, opened with Omi's key derivation).

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use spillway_kit::metrics::metric;
use spillway_kit::omi::{Listen, Reply};
use spillway_kit::pipeline::{Options, Pipeline};

const LIMIT: Duration = Duration::from_secs(120);
const RATE: u32 = 16_000;
/// The capture's first sample, in Unix seconds (a quarter second: exact in binary).
const T0: f64 = 1_786_961_845.25;
const SECRET: &[u8] = b"an-omi-encryption-secret-of-32-bytes!";
const TOKEN: &str = "listen-pods-shared-bearer-token-0123456789";

fn options() -> Options {
    Options {
        chunk_seconds: 2,
        ..Options::default()
    }
}

/// `seconds` of a continuous capture, PCM s16le.
fn capture(seconds: usize) -> Vec<u8> {
    (0..seconds * RATE as usize * 2)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect()
}

/// Sends samples `[from, to)` of `pcm` as one 101 frame stamped with their capture time.
async fn send(l: &mut Listen, pcm: &[u8], from: usize, to: usize) {
    let ts = T0 + from as f64 / f64::from(RATE);
    l.audio(ts, &pcm[from * 2..to * 2]).await.unwrap();
}

/// Waits until `n` objects are under `prefix`; returns their keys.
async fn keys(p: &Pipeline, prefix: &str, n: usize) -> Vec<String> {
    loop {
        let keys = p.object_keys(prefix).await.unwrap();
        if keys.len() >= n {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key(conversation: &str, start: f64, ext: &str) -> String {
    format!("chunks/alice/{conversation}/{start:.3}.batch.{ext}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeline_v2_stream_is_stored_in_omis_layout_with_replays_ignored_and_overlaps_trimmed() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(options()).await.unwrap();
        let pcm = capture(5);
        let query = format!("uid=alice&sample_rate={RATE}&client_kind=ios&audio_timeline=2");
        let mut l = Listen::connect(p.ingest_omi, &query, None).await.unwrap();
        assert_eq!(
            l.next().await.unwrap(),
            Reply::Json(
                202,
                serde_json::json!({"type": "audio_timeline_ack", "version": 2})
            )
        );
        // Audio before any 103 is not stored (the pusher drops it too).
        send(&mut l, &pcm, 0, 100).await;
        l.conversation("conv-1").await.unwrap();
        send(&mut l, &pcm, 0, 8_000).await;
        send(&mut l, &pcm, 8_000, 16_000).await;
        send(&mut l, &pcm, 16_000, 24_000).await;
        // An exact replay (listen reconnected and resent): ignored.
        send(&mut l, &pcm, 16_000, 24_000).await;
        send(&mut l, &pcm, 24_000, 32_000).await;
        // Overlaps the first chunk, already cut at 2 s: trimmed to its new half.
        send(&mut l, &pcm, 28_000, 36_000).await;
        for from in (36_000..80_000).step_by(4_000) {
            send(&mut l, &pcm, from, from + 4_000).await;
        }
        // An opcode this front end does not know, then a heartbeat: ignored.
        l.op(999, b"{}").await.unwrap();
        l.op(100, b"").await.unwrap();
        // 104 flushes the partial last chunk and is answered once it is committed.
        l.process("conv-1").await.unwrap();
        assert_eq!(
            l.next().await.unwrap(),
            Reply::Json(
                201,
                serde_json::json!({"conversation_id": "conv-1", "success": true})
            )
        );
        assert_eq!(l.close().await.unwrap(), 1000);

        let want = [
            key("conv-1", T0, "bin"),
            key("conv-1", T0 + 2.0, "bin"),
            key("conv-1", T0 + 4.0, "bin"),
        ];
        assert_eq!(keys(&p, "chunks/alice/conv-1/", 3).await, want);
        let mut stored = Vec::new();
        for k in &want {
            stored.extend(p.object(k).await.unwrap().unwrap());
        }
        assert!(stored == pcm, "the objects are the capture, byte for byte");
        let head = p
            .s3()
            .await
            .head_object()
            .bucket(&p.bucket)
            .key(&want[2])
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("application/octet-stream"));
        let meta = head.metadata().unwrap();
        assert_eq!(meta["v2_start"], "1786961849.25");
        assert_eq!(meta["v2_samples"], "16000");
        assert_eq!(meta["v2_sample_rate"], "16000");

        let m = p.ingest_metrics().await.unwrap();
        let ignored = |why: &str| {
            metric(
                &m,
                &format!("spillway_ingest_omi_ignored_bytes_total{{reason=\"{why}\"}}"),
            )
        };
        assert_eq!(ignored("no_conversation"), 200.0);
        assert_eq!(ignored("replay"), 16_000.0);
        assert_eq!(ignored("conflict"), 0.0);
        assert_eq!(metric(&m, "spillway_ingest_omi_unknown_opcodes_total"), 1.0);
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_omi_chunks_cut_total{reason=\"processed\"}"
            ),
            1.0
        );
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_chunks_open_with_omis_key_and_a_reconnects_resend_is_not_stored_twice() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            omi_secret: Some(SECRET.to_vec()),
            ..options()
        })
        .await
        .unwrap();
        let pcm = capture(3);
        let query = format!("uid=alice&sample_rate={RATE}&audio_timeline=2");
        // The first connection breaks 1.5 s in: ingest stores what it has.
        let mut l = Listen::connect(p.ingest_omi, &query, None).await.unwrap();
        l.next().await.unwrap();
        l.conversation("conv-2").await.unwrap();
        for from in (0..24_000).step_by(8_000) {
            send(&mut l, &pcm, from, from + 8_000).await;
        }
        drop(l);
        let first = keys(&p, "chunks/alice/conv-2/", 1).await;
        assert_eq!(first, [key("conv-2", T0, "enc")]);
        // listen reconnects and resends from half a second before the break (the same
        // timestamps): ingest remembers where the capture's accepted audio ended, so the resent
        // half second is a replay, and the capture goes on from the break.
        let mut l = Listen::connect(p.ingest_omi, &query, None).await.unwrap();
        l.next().await.unwrap();
        l.conversation("conv-2").await.unwrap();
        send(&mut l, &pcm, 16_000, 24_000).await;
        for from in (24_000..48_000).step_by(8_000) {
            send(&mut l, &pcm, from, from + 8_000).await;
        }
        assert_eq!(l.close().await.unwrap(), 1000);

        let want = [key("conv-2", T0, "enc"), key("conv-2", T0 + 1.5, "enc")];
        let sealer =
            spillway_uploader::seal::Sealer::from_secret(zeroize::Zeroizing::new(SECRET.to_vec()))
                .unwrap();
        let mut opened = Vec::new();
        for _ in 0..100 {
            assert_eq!(keys(&p, "chunks/alice/conv-2/", 2).await, want);
            opened.clear();
            for k in &want {
                let body = p.object(k).await.unwrap().unwrap();
                opened.extend(sealer.open("alice", &body).unwrap());
            }
            if opened.len() == pcm.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            opened == pcm,
            "the sealed objects open to the capture, byte for byte"
        );
        let body = p.object(&want[0]).await.unwrap().unwrap();
        assert!(sealer.open("bob", &body).is_err(), "a key per uid");
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_get_omis_close_codes_and_the_token_is_checked_before_the_upgrade() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            omi_token: Some(TOKEN.as_bytes().to_vec()),
            ..options()
        })
        .await
        .unwrap();
        let ok = format!("uid=alice&sample_rate={RATE}");
        let refused = Listen::connect(p.ingest_omi, &ok, None).await;
        assert!(
            format!("{:#}", refused.err().unwrap()).contains("401"),
            "no token: 401 before any WebSocket"
        );
        let refused = Listen::connect(p.ingest_omi, &ok, Some("not-the-token")).await;
        assert!(refused.is_err());

        for (query, code) in [
            ("uid=alice&sample_rate=100", 1008),
            ("uid=alice&sample_rate=16000&audio_timeline=3", 1008),
            ("uid=../x&sample_rate=16000", 1008),
        ] {
            let mut l = Listen::connect(p.ingest_omi, query, Some(TOKEN))
                .await
                .unwrap();
            assert_eq!(l.next().await.unwrap(), Reply::Closed(code), "{query}");
        }
        let mut l = Listen::connect(p.ingest_omi, &ok, Some(TOKEN))
            .await
            .unwrap();
        l.conversation("conv-3").await.unwrap();
        l.raw(&[101, 0, 0, 0, 1, 2, 3]).await.unwrap();
        assert_eq!(l.next().await.unwrap(), Reply::Closed(1003));

        let m = p.ingest_metrics().await.unwrap();
        let closes = |code: &str| {
            metric(
                &m,
                &format!("spillway_ingest_omi_closes_total{{code=\"{code}\"}}"),
            )
        };
        assert_eq!(closes("401"), 2.0);
        assert_eq!(closes("1008"), 3.0);
        assert_eq!(closes("1003"), 1.0);
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_chunk_is_committed_once_its_first_byte_is_commit_every_old() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            omi_commit_every: Duration::from_secs(1),
            ..options()
        })
        .await
        .unwrap();
        let pcm = capture(3);
        let query = format!("uid=alice&sample_rate={RATE}&audio_timeline=2");
        let mut l = Listen::connect(p.ingest_omi, &query, None).await.unwrap();
        l.next().await.unwrap();
        l.conversation("conv-4").await.unwrap();
        // 1.5 s of a 2 s chunk, then nothing: stored after 1 s, the connection still open.
        send(&mut l, &pcm, 0, 24_000).await;
        let started = std::time::Instant::now();
        assert_eq!(
            keys(&p, "chunks/alice/conv-4/", 1).await,
            [key("conv-4", T0, "bin")]
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        // The capture goes on: its next audio starts the next chunk where the first ended (and
        // that chunk runs its 2 s from there; the close stores the 1.5 s it got).
        send(&mut l, &pcm, 24_000, 48_000).await;
        assert_eq!(l.close().await.unwrap(), 1000);
        let want = [key("conv-4", T0, "bin"), key("conv-4", T0 + 1.5, "bin")];
        assert_eq!(keys(&p, "chunks/alice/conv-4/", 2).await, want);
        let mut stored = Vec::new();
        for k in &want {
            stored.extend(p.object(k).await.unwrap().unwrap());
        }
        assert!(stored == pcm, "the capture, byte for byte, in two objects");
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_omi_chunks_cut_total{reason=\"commit_every\"}"
            ),
            1.0
        );
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}

/// Reads until the server closes the connection; returns how long that took.
async fn closed_after(mut c: tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_not_upgraded_within_the_hello_timeout_is_closed_and_a_session_is_not() {
    use tokio::io::AsyncWriteExt as _;
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            omi_token: Some(TOKEN.as_bytes().to_vec()),
            hello_timeout: Duration::from_secs(1),
            ..options()
        })
        .await
        .unwrap();
        let connect = || tokio::net::TcpStream::connect(p.ingest_omi);
        // Connects and says nothing.
        let silent = connect().await.unwrap();
        // Trickles a request whose headers never end.
        let mut trickle = connect().await.unwrap();
        trickle
            .write_all(b"GET /v1/trigger/listen?uid=alice HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // Is refused 401 (the connection stays open for another request), then idles.
        let mut refused = connect().await.unwrap();
        refused
            .write_all(b"GET /v1/trigger/listen?uid=alice HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // An honest listen, upgraded, then silent past the deadline: its session goes on.
        let query = format!("uid=alice&sample_rate={RATE}");
        let mut honest = Listen::connect(p.ingest_omi, &query, Some(TOKEN))
            .await
            .unwrap();
        let (a, b, c) = tokio::join!(
            closed_after(silent),
            closed_after(trickle),
            closed_after(refused)
        );
        for (what, took) in [("silent", a), ("trickling", b), ("after a 401", c)] {
            assert!(
                took < Duration::from_secs(3),
                "{what}: closed after {took:?}, the deadline is 1 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pcm = capture(2);
        honest.conversation("conv-late").await.unwrap();
        send(&mut honest, &pcm, 0, 32_000).await;
        assert_eq!(honest.close().await.unwrap(), 1000);
        assert_eq!(
            keys(&p, "chunks/alice/conv-late/", 1).await,
            [key("conv-late", T0, "bin")]
        );
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_omi_closes_total{code=\"upgrade_timeout\"}"
            ),
            3.0
        );
        p.stop().await.unwrap();
    })
    .await
    .expect("within the limit");
}
