//! Old peers against today's daemons (`proto/WIRE.md`), in one process with the real store on
//! loopback: the bytes recorded with the historical schemas (`proto/tests/wire/fixtures/`) are
//! sent verbatim, a 1.0 device's over QUIC to today's ingest, a 1.0 and a pre-Omi ingest's over
//! the link's mutual TLS to today's uploader, and every answer is decoded with the old peer's
//! own schema. And a future device offering `spillway/2` beside `spillway/1` still gets
//! `spillway/1`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../../../proto/tests/wire/history.rs"]
mod history;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use history::{CHUNK_SAMPLES, RECEIPT, RESUME, V1_0, field, pcm, uint, unknown, unknown_varint};
use prost::Message as _;
use prost_reflect::{DynamicMessage, Value};
use spillway_ingest::auth::{Keyring, Scope};
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline};

const LIMIT: Duration = Duration::from_secs(120);

/// A QUIC connection to ingest offering `alpn`, in order, as a device of any version would.
async fn connect(
    p: &Pipeline,
    alpn: &[&[u8]],
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(p.cert_der.clone()))
        .unwrap();
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    crypto.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            p.ingest_quic,
            "localhost",
        )
        .unwrap();
    Ok((endpoint, connecting.await?))
}

/// The ALPN the handshake settled on.
fn negotiated(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Writes `bytes` on a new stream (finishing it unless `finish` is false), then reads until
/// ingest finishes its side: its frames. Ingest may stop reading first (a refusal): that write
/// error is what an old device would see too, and the answer is read all the same.
async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Vec<Vec<u8>> {
    let (mut tx, mut rx) = conn.open_bi().await.expect("a stream");
    let sent = tx.write_all(bytes).await;
    if finish && sent.is_ok() {
        tx.finish().expect("finish");
    }
    let answer = rx.read_to_end(1 << 20).await.expect("ingest's answer");
    drop(tx);
    history::frames(&answer)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect()
}

/// Each frame decoded as `commit`'s ServerMessage: (kind, message).
fn server_messages(commit: &str, frames: &[Vec<u8>]) -> Vec<(String, DynamicMessage)> {
    frames
        .iter()
        .map(|f| {
            history::kind(&history::decode(
                commit,
                "spillway.device.v1.ServerMessage",
                f,
            ))
        })
        .collect()
}

/// The PCM of the WAV object at `key`, once the drain uploaded it (mono s16 at 8 kHz).
async fn stored_pcm(p: &Pipeline, key: &str) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Some(body) = p.object(key).await.expect("store") {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{key} never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wav = hound::WavReader::new(std::io::Cursor::new(body)).expect("a WAV file");
    let spec = wav.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (1, history::SAMPLE_RATE, 16),
        "{key}"
    );
    wav.into_samples::<i16>()
        .flat_map(|s| s.unwrap().to_le_bytes())
        .collect()
}

/// Checks an ack as `commit`'s decoder sees it; the receipt (field 5 before 8bdd8bc) is the
/// CRC32C of the samples it covers.
fn check_ack(commit: &str, ack: &DynamicMessage, seq: u64, first: u64, end: u64, key: &str) {
    assert_eq!(
        [
            uint(ack, "seq"),
            uint(ack, "first_sample"),
            uint(ack, "end_sample")
        ],
        [seq, first, end],
        "{ack:?}"
    );
    assert_eq!(field(ack, "key").as_str(), Some(key));
    let receipt = u64::from(crc32c::crc32c(&pcm(first, end - first)));
    if commit == RECEIPT {
        assert_eq!(uint(ack, "crc32c"), receipt);
    } else {
        // Unknown to the old device, skipped without an error.
        assert_eq!(unknown(ack), [5], "{ack:?}");
        assert_eq!(unknown_varint(ack, 5), Some(receipt));
    }
}

/// The error among `messages`, which must be the last: (code as a number, message).
fn last_error(messages: &[(String, DynamicMessage)]) -> (i32, String) {
    let (kind, e) = messages.last().expect("an answer");
    assert_eq!(kind, "error", "{messages:?}");
    let code = e
        .get_field_by_name("code")
        .unwrap()
        .as_enum_number()
        .unwrap();
    (code, field(e, "message").as_str().unwrap().to_owned())
}

/// The name `commit`'s ErrorCode gives `code`, `None` when it has none.
fn old_name(commit: &str, code: i32) -> Option<String> {
    history::schema(commit)
        .get_enum_by_name("spillway.device.v1.ErrorCode")
        .unwrap()
        .get_value(code)
        .map(|v| v.name().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_devices_stream_to_todays_ingest_and_read_its_answers() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            chunk_fill_timeout: Some(Duration::from_millis(1_500)),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let (_endpoint, conn) = connect(&p, &[b"spillway/1"]).await.expect("handshake");

        // A 1.0 device: its hello, three frames of audio, the end of its stream.
        let frames = exchange(&conn, &history::fixture("4b779cb-client-stream.bin"), true).await;
        let answers = server_messages(V1_0, &frames);
        assert_eq!(answers.len(), 3, "{answers:?}");
        let (kind, accepted) = &answers[0];
        assert_eq!(kind, "accepted");
        assert_eq!(uint(accepted, "chunk_samples"), CHUNK_SAMPLES);
        assert_eq!(
            uint(accepted, "max_frame_bytes"),
            spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES as u64
        );
        // start_sample is 0, so absent: nothing the 1.0 device does not know.
        assert!(unknown(accepted).is_empty(), "{accepted:?}");
        use history::v1_0_stream::{SESSION, UID};
        let key = |seq: u64| format!("{UID}/{SESSION}/{seq:06}.wav");
        assert_eq!(answers[1].0, "ack");
        check_ack(V1_0, &answers[1].1, 0, 0, 8_000, &key(0));
        assert_eq!(answers[2].0, "ack");
        check_ack(V1_0, &answers[2].1, 1, 8_000, 12_000, &key(1));
        assert_eq!(stored_pcm(&p, &key(0)).await, pcm(0, 8_000));
        assert_eq!(stored_pcm(&p, &key(1)).await, pcm(8_000, 4_000));

        // A resuming device from before tokens: accepted where it resumes.
        let frames = exchange(
            &conn,
            &history::fixture("656c89a-client-resume-stream.bin"),
            true,
        )
        .await;
        let answers = server_messages(RESUME, &frames);
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(answers[0].0, "accepted");
        assert_eq!(uint(&answers[0].1, "start_sample"), 8_000);
        let resumed = "old-device/resumed/000001.wav";
        check_ack(RESUME, &answers[1].1, 1, 8_000, 12_000, resumed);
        assert_eq!(stored_pcm(&p, resumed).await, pcm(8_000, 4_000));

        // A 1.0 device slower than the chunk fill timeout: its audio is acked, then TOO_SLOW,
        // a code it does not know, reaches it as the number 19.
        let slow = history::framed(&[
            history::client_hello(V1_0, "old-device", "slow", &[]),
            history::client_audio(V1_0, &pcm(0, 100)),
        ]);
        let answers = server_messages(V1_0, &exchange(&conn, &slow, false).await);
        assert_eq!(answers.len(), 3, "{answers:?}");
        check_ack(V1_0, &answers[1].1, 0, 0, 100, "old-device/slow/000000.wav");
        let (code, message) = last_error(&answers);
        assert_eq!(code, spillway_proto::device::ErrorCode::TooSlow as i32);
        assert_eq!(old_name(V1_0, code), None);
        assert!(message.contains("--chunk-fill-timeout"), "{message}");
        assert_eq!(
            stored_pcm(&p, "old-device/slow/000000.wav").await,
            pcm(0, 100)
        );

        conn.close(0u32.into(), b"done");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

fn keys() -> Keyring {
    Keyring::parse("k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap()
}

fn token(keys: &Keyring, uid: &str) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    keys.issue(None, &Scope::Uid(uid.into()), now + 3_600)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_auth_token_old_devices_are_refused_with_codes_they_decode() {
    tokio::time::timeout(LIMIT, async {
        let keys = keys();
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            token_keys: Some(keys.clone()),
            hello_timeout: Duration::from_millis(500),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let (_endpoint, conn) = connect(&p, &[b"spillway/1"]).await.expect("handshake");

        // No token: UNAUTHENTICATED (11), a code 1.0 already had, naming what is missing.
        for (commit, file) in [
            (V1_0, "4b779cb-client-stream.bin"),
            (RESUME, "656c89a-client-resume-stream.bin"),
        ] {
            let answers = server_messages(
                commit,
                &exchange(&conn, &history::fixture(file), true).await,
            );
            assert_eq!(answers.len(), 1, "{commit}: {answers:?}");
            let (code, message) = last_error(&answers);
            assert_eq!(old_name(commit, code).as_deref(), Some("UNAUTHENTICATED"));
            assert!(message.contains("Hello.token"), "{message}");
        }

        // A token for another uid: PERMISSION_DENIED, unknown to 1.0, kept as the number 17.
        let other = history::framed(&[history::client_hello(
            V1_0,
            "old-device",
            "x",
            &[("token", Value::String(token(&keys, "alice")))],
        )]);
        let answers = server_messages(V1_0, &exchange(&conn, &other, true).await);
        let (code, message) = last_error(&answers);
        assert_eq!(code, 17);
        assert_eq!(old_name(V1_0, code), None);
        assert!(message.contains("not as uid \"old-device\""), "{message}");

        // Two bytes of a hello, then nothing: HELLO_TIMEOUT, kept as the number 18.
        let stream = history::fixture("4b779cb-client-stream.bin");
        let answers = server_messages(V1_0, &exchange(&conn, &stream[..2], false).await);
        let (code, _) = last_error(&answers);
        assert_eq!(code, 18);
        assert_eq!(old_name(V1_0, code), None);

        // Hello.token is a 1.0 field: a 1.0 device given its token streams as before.
        use history::v1_0_stream::{FRAMES, SAMPLES, SESSION, UID};
        let mut messages = vec![history::client_hello(
            V1_0,
            UID,
            SESSION,
            &[("token", Value::String(token(&keys, UID)))],
        )];
        let audio = pcm(0, SAMPLES);
        let mut rest = audio.as_slice();
        for n in FRAMES {
            let (frame, tail) = rest.split_at(n);
            messages.push(history::client_audio(V1_0, frame));
            rest = tail;
        }
        let answers = server_messages(
            V1_0,
            &exchange(&conn, &history::framed(&messages), true).await,
        );
        let kinds: Vec<&str> = answers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["accepted", "ack", "ack"]);
        check_ack(
            V1_0,
            &answers[2].1,
            1,
            8_000,
            12_000,
            "old-device/v1-0/000001.wav",
        );
        assert_eq!(
            stored_pcm(&p, "old-device/v1-0/000000.wav").await,
            pcm(0, 8_000)
        );
        // Only that session stored anything.
        assert_eq!(
            p.object_keys("old-device/").await.unwrap(),
            ["old-device/v1-0/000000.wav", "old-device/v1-0/000001.wav"]
        );

        conn.close(0u32.into(), b"done");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

/// One `PutChunk` call with `body` as its request body, verbatim, over the link's mutual TLS:
/// (the status, the response message when there is one).
async fn raw_put(p: &Pipeline, body: Vec<u8>) -> (tonic::Status, Option<Vec<u8>>) {
    use http_body_util::BodyExt as _;
    use tower::{Service as _, ServiceExt as _};
    let mut channel = p.uploader_channel().await.expect("the link");
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("https://localhost/spillway.uploader.v1.Uploader/PutChunk")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        )))
        .unwrap();
    let response = channel
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .expect("an answer");
    let (head, body) = response.into_parts();
    let body = body.collect().await.expect("the answer's body");
    let trailers = body.trailers().cloned().unwrap_or_default();
    let status = tonic::Status::from_header_map(&head.headers)
        .or_else(|| tonic::Status::from_header_map(&trailers))
        .expect("a grpc-status");
    let data = body.to_bytes();
    let message = (data.len() >= 5).then(|| {
        assert_eq!(data[0], 0, "uncompressed");
        let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        assert_eq!(data.len(), 5 + len);
        data[5..].to_vec()
    });
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_ingests_puts_are_stored_as_wav_by_todays_uploader() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        for (commit, file, key, first, samples) in [
            // A 1.0 ingest: the PCM before the CRC32C (gathered by the uploader).
            (
                V1_0,
                "4b779cb-put-chunk.grpc",
                history::v1_0_put::KEY,
                history::v1_0_put::FIRST_SAMPLE,
                history::v1_0_put::SAMPLES,
            ),
            // A pre-Omi ingest: the PCM last (streamed to the spool), a resumed piece.
            (
                RECEIPT,
                "8bdd8bc-put-chunk-pcm-last.grpc",
                history::pre_omi_put::KEY,
                history::pre_omi_put::FIRST_SAMPLE,
                history::pre_omi_put::SAMPLES,
            ),
        ] {
            let (status, message) = raw_put(&p, history::fixture(file)).await;
            assert_eq!(status.code(), tonic::Code::Ok, "{file}: {status:?}");
            let answer = history::decode(
                commit,
                "spillway.uploader.v1.PutChunkResponse",
                &message.expect("a response message"),
            );
            assert_eq!(field(&answer, "key").as_str(), Some(key), "{file}");
            assert_eq!(
                answer.get_field_by_name("newly_stored").unwrap().as_bool(),
                Some(true),
                "{file}"
            );
            let receipt = u64::from(crc32c::crc32c(&pcm(first, samples)));
            if commit == RECEIPT {
                assert_eq!(uint(&answer, "crc32c"), receipt);
            } else {
                assert_eq!(unknown_varint(&answer, 3), Some(receipt));
            }
            assert_eq!(stored_pcm(&p, key).await, pcm(first, samples), "{key}");
        }
        assert_eq!(
            p.object_keys("old-ingest/").await.unwrap(),
            [history::pre_omi_put::KEY, history::v1_0_put::KEY]
        );

        // A layout this uploader does not know (a future ingest's) is refused, not stored as
        // WAV: today's uploader fails closed where a pre-Omi one failed open.
        let mut future = spillway_proto::uploader::PutChunkRequest::decode(
            &history::fixture("4b779cb-put-chunk.grpc")[5..],
        )
        .unwrap();
        future.id.as_mut().unwrap().session = "future".into();
        future.layout = 2;
        let (status, _) = raw_put(&p, history::grpc_body(&future.encode_to_vec())).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), "layout 2 is not one this uploader knows");
        let m = p.uploader_metrics().await.unwrap();
        assert_eq!(
            metric(
                &m,
                "spillway_uploader_put_rejections_total{reason=\"invalid_layout\"}"
            ),
            1.0
        );
        assert_eq!(
            metric(&m, "spillway_uploader_puts_total{result=\"stored\"}"),
            2.0
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offering_spillway_2_first_gets_spillway_1_and_one_offering_only_spillway_2_is_refused()
 {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let failures = "spillway_ingest_handshake_failures_total";
        assert_eq!(metric(&p.ingest_metrics().await.unwrap(), failures), 0.0);

        // A future device that speaks both, preferring spillway/2, gets spillway/1 and works.
        let (_endpoint, conn) = connect(&p, &[b"spillway/2", b"spillway/1"])
            .await
            .expect("handshake");
        assert_eq!(negotiated(&conn).as_deref(), Some(&b"spillway/1"[..]));
        let frames = exchange(&conn, &history::fixture("4b779cb-client-stream.bin"), true).await;
        let kinds: Vec<String> = server_messages(V1_0, &frames)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, ["accepted", "ack", "ack"]);
        conn.close(0u32.into(), b"done");

        // spillway/2 alone: no protocol in common, the handshake fails, and ingest counts it.
        let refused = connect(&p, &[b"spillway/2"]).await;
        let e = refused.expect_err("no handshake without spillway/1");
        assert!(
            matches!(e, quinn::ConnectionError::ConnectionClosed(ref c)
                if c.error_code == quinn::TransportErrorCode::crypto(120)),
            "a TLS no_application_protocol alert (120), got {e}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(&p.ingest_metrics().await.unwrap(), failures) < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "never counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metric(&p.ingest_metrics().await.unwrap(), failures), 1.0);
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}
