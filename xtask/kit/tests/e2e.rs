//! End to end, in one process: embedded S3 (s3s-fs on loopback), the real uploader and the real
//! ingest on ephemeral ports, devices speaking QUIC. Nothing is mocked: every object is read
//! back from the store and compared byte for byte with what the device sent.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spillway_ingest::client::Device;
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline};
use spillway_kit::sim::{DeviceReport, DeviceSpec, Progress, run_device, verify_device};
use spillway_proto::device::{Encoding, ErrorCode, Hello, ServerMessage, server_message::Kind};

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(120);

fn spec(uid: &str, session: &str, sample_rate: u32, seconds: f64, seed: u64) -> DeviceSpec {
    DeviceSpec::synthetic(uid, session, sample_rate, seconds, seed)
}

fn progress() -> Arc<Progress> {
    Progress::hidden()
}

async fn stream(device: &Device, spec: DeviceSpec) -> DeviceReport {
    run_device(device, spec, &progress())
        .await
        .expect("device session")
}

fn hello(uid: &str, session: &str, sample_rate: u32) -> Hello {
    Hello {
        uid: uid.into(),
        session: session.into(),
        sample_rate,
        encoding: Encoding::PcmS16le as i32,
        channels: 1,
        token: String::new(),
        resume_from: 0,
    }
}

fn errors(messages: &[ServerMessage]) -> Vec<ErrorCode> {
    messages
        .iter()
        .filter_map(|m| match &m.kind {
            Some(Kind::Error(e)) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        })
        .collect()
}

fn acks(messages: &[ServerMessage]) -> Vec<(u64, u64, u64)> {
    messages
        .iter()
        .filter_map(|m| match &m.kind {
            Some(Kind::Ack(a)) => Some((a.seq, a.first_sample, a.end_sample)),
            _ => None,
        })
        .collect()
}

async fn ingest_metrics(p: &Pipeline) -> String {
    p.ingest_metrics().await.expect("metrics")
}

async fn uploader_metrics(p: &Pipeline) -> String {
    p.uploader_metrics().await.expect("metrics")
}

async fn object_keys(p: &Pipeline, prefix: &str) -> Vec<String> {
    p.object_keys(prefix).await.expect("list objects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_fifty_seconds_become_three_exact_wav_objects() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let device = p.device().await.expect("connect");
        let report = stream(&device, spec("alice", "walk-1", 16_000, 150.0, 1)).await;

        let bounds: Vec<_> = report
            .acks
            .iter()
            .map(|a| (a.seq, a.first_sample, a.end_sample))
            .collect();
        assert_eq!(
            bounds,
            [
                (0, 0, 960_000),
                (1, 960_000, 1_920_000),
                (2, 1_920_000, 2_400_000)
            ],
            "60 s, 60 s and 30 s of 16 kHz audio"
        );
        let s3 = p.s3().await;
        let objects = verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
            .await
            .expect("objects equal the audio sent");
        assert_eq!(objects, 3);
        assert_eq!(
            object_keys(&p, "alice/").await,
            [
                "alice/walk-1/000000.wav",
                "alice/walk-1/000001.wav",
                "alice/walk-1/000002.wav"
            ]
        );
        let m = ingest_metrics(&p).await;
        assert_eq!(metric(&m, "spillway_ingest_chunks_acked_total"), 3.0);
        assert_eq!(metric(&m, "spillway_ingest_audio_bytes_total"), 4_800_000.0);
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_sessions_on_one_connection_stay_apart() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 2,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");
        let mut a = spec("bob", "morning", 8_000, 7.0, 2);
        let mut b = spec("bob", "evening", 22_050, 5.5, 3);
        // Paced, so that frames of the two sessions really interleave on the connection.
        a.speed = 8.0;
        b.speed = 8.0;
        let (ra, rb) = tokio::join!(stream(&device, a), stream(&device, b));
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &ra, Duration::from_secs(60))
                .await
                .expect("morning"),
            4
        );
        assert_eq!(
            verify_device(&s3, &p.bucket, &rb, Duration::from_secs(60))
                .await
                .expect("evening"),
            3
        );
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sixty_second_chunk_at_48_khz_fits_every_limit() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let device = p.device().await.expect("connect");
        let mut s = spec("carol", "studio", 48_000, 60.0, 4);
        s.mean_frame_bytes = 64 * 1024;
        let report = stream(&device, s).await;
        assert_eq!(report.acks.len(), 1);
        assert_eq!(report.acks[0].end_sample, 2_880_000);
        let s3 = p.s3().await;
        verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
            .await
            .expect("5,760,000 bytes of PCM stored intact");
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

/// What one bad stream does, and the error code it must earn.
enum Bad {
    /// Send these frames (each already length-prefixed by the codec), then finish.
    Frames(Vec<Bytes>),
    /// Send this hello, then finish.
    Hello(Hello),
    /// A valid hello, then these raw PCM bytes, then finish.
    Audio(Vec<u8>),
}

fn encode(kind: spillway_proto::device::client_message::Kind) -> Bytes {
    use prost::Message;
    Bytes::from(spillway_proto::device::ClientMessage { kind: Some(kind) }.encode_to_vec())
}

async fn bad_session(device: &Device, bad: Bad) -> Vec<ServerMessage> {
    let (mut tx, rx) = device.open().await.expect("open stream");
    // The server may stop reading as soon as it refuses; later writes may fail, which is fine.
    let _ = async {
        match bad {
            Bad::Frames(frames) => {
                for f in frames {
                    tx.frame(f).await?;
                }
            }
            Bad::Hello(h) => tx.hello(h).await?,
            Bad::Audio(pcm) => {
                tx.hello(hello("dave", "odd", 8_000)).await?;
                tx.audio(Bytes::from(pcm)).await?;
            }
        }
        tx.finish()
    }
    .await;
    rx.collect().await.expect("ingest answers and finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_precise_error_and_a_metric_and_disturbs_no_one() {
    use spillway_proto::device::Audio;
    use spillway_proto::device::client_message::Kind as C;
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            max_frame_bytes: 4_096,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");

        // A good session streams in real time on the same connection the whole while.
        let mut good = spec("erin", "steady", 8_000, 4.0, 5);
        good.speed = 1.0;
        good.mean_frame_bytes = 800;
        let good_task = {
            let device = p.device().await.expect("second connection");
            tokio::spawn(async move {
                let report = run_device(&device, good, &progress()).await;
                device.close().await;
                report
            })
        };
        let good_same_connection = {
            let mut s = spec("erin", "same-connection", 8_000, 3.0, 6);
            s.speed = 1.0;
            s.mean_frame_bytes = 800;
            s
        };
        let alongside_progress = progress();
        let alongside = run_device(&device, good_same_connection, &alongside_progress);

        let mut wrong_encoding = hello("u", "s", 8_000);
        wrong_encoding.encoding = Encoding::Unspecified as i32;
        let mut stereo = hello("u", "s", 8_000);
        stereo.channels = 2;
        let audio = |pcm: &'static [u8]| {
            encode(C::Audio(Audio {
                pcm: Bytes::from_static(pcm),
            }))
        };
        let cases: Vec<(Bad, ErrorCode)> = vec![
            (Bad::Frames(vec![audio(&[1, 2])]), ErrorCode::ExpectedHello),
            (
                Bad::Frames(vec![Bytes::from_static(&[0xff, 0xff, 0xff, 0x07])]),
                ErrorCode::MalformedFrame,
            ),
            (
                Bad::Frames(vec![
                    encode(C::Hello(hello("u", "big", 8_000))),
                    Bytes::from(vec![0u8; 5_000]),
                ]),
                ErrorCode::FrameTooLarge,
            ),
            (
                Bad::Frames(vec![
                    encode(C::Hello(hello("u", "twice", 8_000))),
                    encode(C::Hello(hello("u", "twice", 8_000))),
                ]),
                ErrorCode::UnexpectedHello,
            ),
            (
                // An empty frame decodes to a message with neither hello nor audio.
                Bad::Frames(vec![Bytes::new()]),
                ErrorCode::MalformedFrame,
            ),
            (Bad::Hello(hello("../x", "s", 8_000)), ErrorCode::InvalidUid),
            (Bad::Hello(hello("a/b", "s", 8_000)), ErrorCode::InvalidUid),
            (Bad::Hello(hello("", "s", 8_000)), ErrorCode::InvalidUid),
            (
                Bad::Hello(hello(&"u".repeat(129), "s", 8_000)),
                ErrorCode::InvalidUid,
            ),
            (
                Bad::Hello(hello("u", "tab\there", 8_000)),
                ErrorCode::InvalidSession,
            ),
            (
                Bad::Hello(hello("u", "..", 8_000)),
                ErrorCode::InvalidSession,
            ),
            (Bad::Hello(hello("u", "", 8_000)), ErrorCode::InvalidSession),
            (
                Bad::Hello(hello("u", "s", 7_999)),
                ErrorCode::UnsupportedSampleRate,
            ),
            (
                Bad::Hello(hello("u", "s", 48_001)),
                ErrorCode::UnsupportedSampleRate,
            ),
            (Bad::Hello(wrong_encoding), ErrorCode::UnsupportedEncoding),
            (Bad::Hello(stereo), ErrorCode::UnsupportedChannels),
        ];
        let mut expected_counts = std::collections::BTreeMap::<&str, f64>::new();
        let bad_ones = async {
            for (bad, code) in cases {
                let messages = bad_session(&device, bad).await;
                assert_eq!(errors(&messages), [code], "{messages:?}");
                assert!(acks(&messages).is_empty());
                *expected_counts.entry(code.as_str_name()).or_default() += 1.0;
            }
            // A dangling odd byte: the whole samples are kept and acked, the byte is reported.
            let messages = bad_session(&device, Bad::Audio(vec![1, 2, 3, 4, 5])).await;
            assert_eq!(errors(&messages), [ErrorCode::OddTrailingByte]);
            assert_eq!(acks(&messages), [(0, 0, 2)]);
            *expected_counts.entry("ODD_TRAILING_BYTE").or_default() += 1.0;
        };
        let (report, ()) = tokio::join!(alongside, bad_ones);
        let report = report.expect("good session on the same connection");
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
                .await
                .expect("undisturbed"),
            3
        );
        let other = good_task
            .await
            .expect("task")
            .expect("good session on another connection");
        assert_eq!(
            verify_device(&s3, &p.bucket, &other, Duration::from_secs(60))
                .await
                .expect("undisturbed"),
            4
        );

        // Wrong ALPN: the handshake is refused, and counted.
        let wrong = Device::connect_with_alpn(p.ingest_quic, "localhost", &p.cert_der, b"h3").await;
        assert!(wrong.is_err(), "a connection offering only h3 must fail");

        let m = ingest_metrics(&p).await;
        for (code, n) in &expected_counts {
            let series = format!("spillway_ingest_refusals_total{{code=\"{code}\"}}");
            assert_eq!(metric(&m, &series), *n, "{series}");
        }
        assert!(metric(&m, "spillway_ingest_handshake_failures_total") >= 1.0);
        // Nothing from the bad streams reached the store except the odd-byte session's sample.
        assert_eq!(object_keys(&p, "u/").await, Vec::<String>::new());
        assert_eq!(object_keys(&p, "dave/").await, ["dave/odd/000000.wav"]);
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_flushed_acknowledged_and_told_why() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            idle_timeout: Duration::from_secs(1),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");
        let (mut tx, rx) = device.open().await.expect("stream");
        tx.hello(hello("frank", "quiet", 8_000))
            .await
            .expect("hello");
        tx.audio(Bytes::from(vec![7u8; 16_000]))
            .await
            .expect("audio");
        // ... and then nothing, without finishing.
        let messages = rx.collect().await.expect("ingest finishes its side");
        assert_eq!(acks(&messages), [(0, 0, 8_000)]);
        assert_eq!(errors(&messages), [ErrorCode::IdleTimeout]);
        drop(tx);
        let m = ingest_metrics(&p).await;
        assert_eq!(
            metric(&m, "spillway_ingest_sessions_ended_total{reason=\"idle\"}"),
            1.0
        );
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_partial_chunks_before_ingest_exits() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let device = p.device().await.expect("connect");
        let (mut tx, rx) = device.open().await.expect("stream");
        tx.hello(hello("gina", "late", 16_000))
            .await
            .expect("hello");
        tx.audio(Bytes::from(vec![3u8; 32_000]))
            .await
            .expect("audio");
        let reader = tokio::spawn(rx.collect());
        // Wait until ingest has the audio, then stop the daemons while the session is open.
        while metric(
            &ingest_metrics(&p).await,
            "spillway_ingest_audio_bytes_total",
        ) < 32_000.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s3 = p.s3().await;
        let bucket = p.bucket.clone();
        p.stop().await.expect("clean stop");
        let messages = reader.await.expect("task").expect("messages");
        assert_eq!(acks(&messages), [(0, 0, 16_000)]);
        assert_eq!(errors(&messages), [ErrorCode::ShuttingDown]);
        drop((tx, device, s3, bucket));
    })
    .await
    .expect("bounded in time");
}

async fn put(
    p: &Pipeline,
    seq: u64,
    pcm: Vec<u8>,
    crc: Option<u32>,
) -> Result<spillway_proto::uploader::PutChunkResponse, tonic::Status> {
    use spillway_proto::uploader::{ChunkId, PutChunkRequest};
    let crc32c = crc.unwrap_or_else(|| crc32c::crc32c(&pcm));
    p.put_chunk(PutChunkRequest {
        id: Some(ChunkId {
            uid: "hank".into(),
            session: "direct".into(),
            seq,
        }),
        sample_rate: 8_000,
        chunk_samples: 8_000 * 60,
        first_sample: seq * 8_000 * 60,
        pcm: Bytes::from(pcm),
        crc32c,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_chunk_is_idempotent_and_refuses_damaged_or_oversized_chunks() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options::default()).await.expect("pipeline");
        let pcm: Vec<u8> = (0..16_000u32).map(|i| (i % 253) as u8).collect();

        let first = put(&p, 0, pcm.clone(), None).await.expect("stored");
        let again = put(&p, 0, pcm.clone(), None).await.expect("acked again");
        assert_eq!(first.key, "hank/direct/000000.wav");
        assert_eq!(again.key, first.key);
        assert!(first.newly_stored);
        // While the chunk is still spooled the second put stores nothing new; if the drain
        // already uploaded it, the put is spooled again and overwrites the same key. Either
        // way: both acknowledged, one key, one object (checked below).

        let bad_crc = put(&p, 1, pcm.clone(), Some(0xdead_beef))
            .await
            .expect_err("crc");
        assert_eq!(bad_crc.code(), tonic::Code::DataLoss, "{bad_crc:?}");
        let odd = put(&p, 1, vec![0; 1_001], None).await.expect_err("odd");
        assert_eq!(odd.code(), tonic::Code::InvalidArgument, "{odd:?}");
        // One sample more than a 60 s chunk at 8 kHz.
        let long = put(&p, 1, vec![0; 960_002], None).await.expect_err("long");
        assert_eq!(long.code(), tonic::Code::InvalidArgument, "{long:?}");
        // Beyond the message limit derived from the longest chunk (60 s at 48 kHz).
        let huge = put(&p, 1, vec![0; 6_000_000], None)
            .await
            .expect_err("huge");
        assert_eq!(huge.code(), tonic::Code::OutOfRange, "{huge:?}");

        let m = uploader_metrics(&p).await;
        for (reason, n) in [
            ("checksum_mismatch", 1.0),
            ("odd_byte_count", 1.0),
            ("oversized", 1.0),
            ("message_too_large", 1.0),
        ] {
            let series = format!("spillway_uploader_put_rejections_total{{reason=\"{reason}\"}}");
            assert_eq!(metric(&m, &series), n, "{series}");
        }
        let stored = metric(&m, "spillway_uploader_puts_total{result=\"stored\"}");
        let duplicate = metric(&m, "spillway_uploader_puts_total{result=\"duplicate\"}");
        assert_eq!(stored + duplicate, 2.0);
        assert_eq!(duplicate, if again.newly_stored { 0.0 } else { 1.0 });
        // Every committed put is timed; a refused one is not.
        assert_eq!(metric(&m, "spillway_uploader_commit_seconds_count"), 2.0);
        // Exactly one object, once the drain got to it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while object_keys(&p, "hank/").await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never uploaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(object_keys(&p, "hank/").await, ["hank/direct/000000.wav"]);
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_a_clear_start_up_error() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = tokio_util::sync::CancellationToken::new();
        let (endpoint, s3) = spillway_kit::pipeline::start_s3(dir.path().join("s3"), stop.clone())
            .await
            .expect("s3");
        let opts = Options {
            bucket: "no-such-bucket".into(),
            ..Options::default()
        };
        let mut config =
            spillway_kit::pipeline::uploader_config(dir.path().join("spool"), &endpoint, &opts);
        config.create_bucket = false;
        let listeners = spillway_uploader::Listeners {
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            http: tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        };
        let err = spillway_uploader::run(config, listeners, stop.clone())
            .await
            .expect_err("must refuse to start");
        let text = format!("{err:#}");
        assert!(
            text.contains("\"no-such-bucket\" does not exist") && text.contains("--create-bucket"),
            "{text}"
        );
        stop.cancel();
        s3.await.expect("task").expect("s3 stops");
    })
    .await
    .expect("bounded in time");
}
