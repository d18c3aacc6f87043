//! Stored audio is never replaced: the real uploader against the embedded store (which honours
//! conditional writes as S3 does), chunks put straight over gRPC as a rogue or confused client
//! would, every object read back byte for byte.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline};
use spillway_proto::uploader::{ChunkId, PutChunkRequest};

const LIMIT: Duration = Duration::from_secs(120);
const RATE: u32 = 8_000;

fn request(session: &str, pcm: &[u8]) -> PutChunkRequest {
    PutChunkRequest {
        id: Some(ChunkId {
            uid: "ivy".into(),
            session: session.into(),
            seq: 0,
        }),
        sample_rate: RATE,
        chunk_samples: u64::from(RATE) * 60,
        first_sample: 0,
        pcm: Bytes::copy_from_slice(pcm),
        crc32c: crc32c::crc32c(pcm),
        ..Default::default()
    }
}

fn pcm(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn wav(pcm: &[u8]) -> Vec<u8> {
    spillway_uploader::object::wav(pcm, RATE).expect("wav")
}

/// Waits until the uploader's `/metrics` satisfies `done`.
async fn until(p: &Pipeline, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = p.uploader_metrics().await.expect("metrics");
        if done(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads with this result so far, counted only once the spool is empty again (the spool
/// forgets a chunk just after its upload is counted; a put before that is a duplicate of it).
fn uploads(m: &str, result: &str) -> f64 {
    if metric(m, "spillway_uploader_spool_chunks") > 0.0 {
        return -1.0;
    }
    metric(
        m,
        &format!("spillway_uploader_uploads_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_audio_for_an_uploaded_chunk_is_set_aside_and_never_replaces_it() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let key = "ivy/reused/000000.wav";
        let original = pcm(32_000, 1);
        let r = p
            .put_chunk(request("reused", &original))
            .await
            .expect("put");
        assert_eq!(r.key, key);
        until(&p, "the original uploaded", |m| uploads(m, "ok") == 1.0).await;
        assert_eq!(p.object(key).await.unwrap(), Some(wav(&original)));

        // The same chunk id, different audio of the same length: a device that reused its
        // session name after a reboot, or anyone who can reach the uploader. Acknowledged (it
        // is durable), but it never replaces what is stored.
        let other = pcm(32_000, 2);
        p.put_chunk(request("reused", &other)).await.expect("put");
        let m = until(&p, "a conflict counted", |m| uploads(m, "conflict") == 1.0).await;
        assert_eq!(metric(&m, "spillway_uploader_upload_conflicts_total"), 1.0);
        assert_eq!(
            p.object(key).await.unwrap(),
            Some(wav(&original)),
            "original kept"
        );
        let aside = format!("{key}.conflict-{:08x}", crc32c::crc32c(&other));
        assert_eq!(
            p.object(&aside).await.unwrap(),
            Some(wav(&other)),
            "set aside"
        );

        // A shorter piece that is not a prefix, and a longer one that does not extend it: both
        // conflicts too, the original still byte for byte.
        p.put_chunk(request("reused", &other[..16_000]))
            .await
            .expect("put");
        until(&p, "two conflicts", |m| uploads(m, "conflict") == 2.0).await;
        let mut longer = pcm(32_000, 3);
        longer.extend_from_slice(&[7; 8_000]);
        p.put_chunk(request("reused", &longer)).await.expect("put");
        until(&p, "three conflicts", |m| uploads(m, "conflict") == 3.0).await;
        assert_eq!(
            p.object(key).await.unwrap(),
            Some(wav(&original)),
            "original kept"
        );
        let keys = p.object_keys("ivy/").await.unwrap();
        assert_eq!(keys.len(), 4, "the original and three set aside: {keys:?}");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_idempotent_and_only_a_longer_piece_supersedes_a_shorter_one() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let key = "ivy/resumed/000000.wav";
        let full = pcm(48_000, 9);

        // A piece flushed at idle, uploaded.
        p.put_chunk(request("resumed", &full[..16_000]))
            .await
            .expect("put");
        until(&p, "the short piece uploaded", |m| uploads(m, "ok") == 1.0).await;
        // The same bytes again after the spool forgot them: nothing new.
        p.put_chunk(request("resumed", &full[..16_000]))
            .await
            .expect("put");
        until(&p, "the repeat seen as identical", |m| {
            uploads(m, "identical") == 1.0
        })
        .await;
        // The device resumed after its ack was lost and sent the whole chunk: it extends the
        // stored piece, so it replaces it.
        p.put_chunk(request("resumed", &full)).await.expect("put");
        until(&p, "the longer piece stored", |m| {
            uploads(m, "superseded") == 1.0
        })
        .await;
        assert_eq!(p.object(key).await.unwrap(), Some(wav(&full)));
        // The shorter piece arriving late (another ingest's retry) changes nothing.
        p.put_chunk(request("resumed", &full[..32_000]))
            .await
            .expect("put");
        let m = until(&p, "the late short piece skipped", |m| {
            uploads(m, "already_longer") == 1.0
        })
        .await;
        assert_eq!(metric(&m, "spillway_uploader_upload_conflicts_total"), 0.0);
        assert_eq!(p.object(key).await.unwrap(), Some(wav(&full)));
        assert_eq!(p.object_keys("ivy/").await.unwrap(), [key]);
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}
