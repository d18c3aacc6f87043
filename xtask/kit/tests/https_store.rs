//! The store over HTTPS: the embedded store behind rustls with a throwaway CA, the real
//! uploader trusting that CA alone (`--s3-ca-file`). Over HTTPS a body is sent
//! `UNSIGNED-PAYLOAD` (`--s3-payload-signing auto`), so its SHA-256 is never computed, and the
//! CRC32C the store verifies is what keeps a damaged body out; over plain HTTP the body stays
//! signed by its SHA-256. Nothing is mocked: the store counts how every object put was signed,
//! and every object is read back and compared byte for byte.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use base64::Engine as _;
use spillway_kit::pipeline::{Options, Pipeline};
use spillway_kit::sim::{DeviceSpec, Progress, run_device, verify_device};
use spillway_uploader::transport::PayloadSigning;
use tokio_util::sync::CancellationToken;

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(120);

/// Streams `specs` (each on a connection of its own) through `p`, reads every object back and
/// compares it byte for byte; returns how many objects that was.
async fn stream_and_verify(p: &Pipeline, specs: Vec<DeviceSpec>) -> u64 {
    let mut objects = 0;
    for spec in specs {
        let device = p.device().await.expect("connect");
        let report = run_device(&device, spec, &Progress::hidden())
            .await
            .expect("device session");
        device.close().await;
        let s3 = p.s3().await;
        objects += verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
            .await
            .expect("every object equals the audio sent") as u64;
    }
    objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_auto_stores_every_chunk_byte_for_byte_with_unsigned_bodies() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            store_tls: true,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        assert!(
            p.s3_endpoint.starts_with("https://127.0.0.1:"),
            "{}",
            p.s3_endpoint
        );
        let ca = p.s3_ca_file.as_ref().expect("the store's CA file");
        let pem = std::fs::read_to_string(ca).expect("CA readable");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

        let objects = stream_and_verify(
            &p,
            vec![
                // 60 s, 60 s and 30 s; then a 48 kHz chunk and a short last one.
                DeviceSpec::synthetic("alice", "walk-1", 16_000, 150.0, 1),
                DeviceSpec::synthetic("bob", "studio", 48_000, 70.0, 2),
            ],
        )
        .await;
        assert_eq!(objects, 5);
        let puts = &p.s3_payloads;
        assert!(puts.unsigned() >= objects, "{puts:?}");
        assert_eq!(
            (puts.sha256(), puts.other()),
            (0, 0),
            "no body is signed over HTTPS: {puts:?}"
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_plain_http_auto_and_over_https_signed_keep_the_sha256_signature() {
    tokio::time::timeout(LIMIT, async {
        for (store_tls, signing) in [
            (false, PayloadSigning::Auto),
            (true, PayloadSigning::Signed),
        ] {
            let p = Pipeline::start(Options {
                chunk_seconds: 2,
                store_tls,
                s3_payload_signing: signing,
                ..Options::default()
            })
            .await
            .expect("pipeline");
            let spec = DeviceSpec::synthetic("carol", "desk", 8_000, 5.0, 3);
            let objects = stream_and_verify(&p, vec![spec]).await;
            assert_eq!(objects, 3);
            let puts = &p.s3_payloads;
            assert!(
                puts.sha256() >= objects,
                "{store_tls} {signing:?}: {puts:?}"
            );
            assert_eq!(
                (puts.unsigned(), puts.other()),
                (0, 0),
                "{store_tls} {signing:?}: {puts:?}"
            );
            p.stop().await.expect("clean stop");
        }
    })
    .await
    .expect("bounded in time");
}

/// The CRC32C of `body` as `x-amz-checksum-crc32c` carries it.
fn crc32c_header(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(spillway_proto::checksum::crc32c(body).to_be_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_body_whose_crc32c_does_not_match_is_refused_by_the_store() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        let store = spillway_kit::s3::start_tls(dir.path().join("s3"), stop.clone())
            .await
            .expect("store");
        let s3 = spillway_kit::s3::client_with_ca(&store.endpoint, Some(&store.ca)).await;
        s3.create_bucket()
            .bucket("integrity")
            .send()
            .await
            .expect("bucket");
        let body = b"RIFF....WAVEfmt audio whose checksum ingest made".to_vec();
        let put = |key: &'static str, body: Vec<u8>, checksum: String| {
            s3.put_object()
                .bucket("integrity")
                .key(key)
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .checksum_crc32_c(checksum)
                .body(ByteStream::from(body))
                .customize()
                .disable_payload_signing()
                .send()
        };

        // The body as sent, with its CRC32C: stored.
        put("good.wav", body.clone(), crc32c_header(&body))
            .await
            .expect("a body that matches its CRC32C is stored");
        let stored = s3
            .get_object()
            .bucket("integrity")
            .key("good.wav")
            .send()
            .await
            .expect("read back")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        assert_eq!(stored.as_ref(), body.as_slice());

        // One byte changed after the CRC32C was made (what a damaged buffer would send): the
        // signature covers no byte of it, and the store refuses it for the CRC32C alone.
        let mut damaged = body.clone();
        damaged[20] ^= 0x01;
        let err = put("damaged.wav", damaged, crc32c_header(&body))
            .await
            .expect_err("a body that does not match its CRC32C is refused");
        let service = err.as_service_error().expect("the store's answer");
        assert_eq!(service.meta().code(), Some("BadDigest"), "{service:?}");
        assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(400));
        // What the uploader acts on is that answer (the put is retried from the spool). Unlike
        // S3, s3s-fs writes the file before it compares the checksum, so the refused bytes are
        // left at the key: nothing here relies on what is there afterwards.

        assert_eq!(
            (
                store.payloads.unsigned(),
                store.payloads.sha256(),
                store.payloads.other()
            ),
            (2, 0, 0),
            "both puts went unsigned"
        );
        stop.cancel();
        store.task.await.expect("task").expect("store stops");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_trusted_only_through_its_own_ca() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        let store = spillway_kit::s3::start_tls(dir.path().join("s3"), stop.clone())
            .await
            .expect("store");
        let trusted = spillway_kit::s3::client_with_ca(&store.endpoint, Some(&store.ca)).await;
        trusted
            .list_buckets()
            .send()
            .await
            .expect("through the store's CA");
        // Another CA, and the system's roots: the handshake fails, nothing is asked.
        let other = spillway_kit::pki::StorePki::generate()
            .expect("pki")
            .store_ca()
            .expect("ca");
        for client in [
            spillway_kit::s3::client_with_ca(&store.endpoint, Some(&other)).await,
            spillway_kit::s3::client(&store.endpoint).await,
        ] {
            let err = client
                .list_buckets()
                .send()
                .await
                .expect_err("an untrusted certificate");
            assert!(
                matches!(err, aws_sdk_s3::error::SdkError::DispatchFailure(_)),
                "{err:?}"
            );
        }
        stop.cancel();
        store.task.await.expect("task").expect("store stops");
    })
    .await
    .expect("bounded in time");
}
