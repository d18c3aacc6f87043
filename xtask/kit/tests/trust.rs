//! Who may write, and what a stranger can hold: device tokens bound to a uid, the hello
//! deadline, per-uid session slots and a connection's idle timer, against the real ingest and
//! uploader in one process. An honest device streams alongside every refusal and loses nothing.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use spillway_ingest::auth::{Keyring, Scope};
use spillway_ingest::client::Device;
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline};
use spillway_kit::sim::{DeviceReport, DeviceSpec, Progress, run_device, verify_device};
use spillway_proto::device::{ErrorCode, Hello, ServerMessage, server_message::Kind};

const LIMIT: Duration = Duration::from_secs(120);

fn keys() -> Keyring {
    Keyring::parse("k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap()
}

fn token(keys: &Keyring, scope: Scope, ttl_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = now.checked_add_signed(ttl_secs).unwrap();
    keys.issue(None, &scope, expires).unwrap()
}

fn hello(uid: &str, session: &str, token: &str) -> Hello {
    let mut h = DeviceSpec::synthetic(uid, session, 8_000, 1.0, 1).hello();
    h.token = token.into();
    h
}

/// Opens a stream, sends `hello` and returns the first error ingest answers with.
async fn refusal(device: &Device, hello: Hello) -> spillway_proto::device::Error {
    let (mut tx, rx) = device.open().await.expect("stream");
    tx.hello(hello).await.expect("hello");
    first_error(rx.collect().await.expect("answers"))
}

fn first_error(messages: Vec<ServerMessage>) -> spillway_proto::device::Error {
    messages
        .into_iter()
        .find_map(|m| match m.kind {
            Some(Kind::Error(e)) => Some(e),
            _ => None,
        })
        .expect("an error")
}

fn streaming(p: &Pipeline, spec: DeviceSpec) -> tokio::task::JoinHandle<DeviceReport> {
    let (addr, cert) = (p.ingest_quic, p.cert_der.clone());
    tokio::spawn(async move {
        let device = Device::connect(addr, "localhost", &cert)
            .await
            .expect("connect");
        let report = run_device(&device, spec, &Progress::hidden())
            .await
            .expect("session");
        device.close().await;
        report
    })
}

async fn undisturbed(p: &Pipeline, honest: tokio::task::JoinHandle<DeviceReport>, chunks: usize) {
    let report = honest.await.expect("device task");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let s3 = p.s3().await;
    let objects = verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
        .await
        .expect("every acknowledged chunk stored byte for byte");
    assert_eq!(objects, chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_writes_only_as_the_uid_its_token_names() {
    tokio::time::timeout(LIMIT, async {
        let keys = keys();
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            token_keys: Some(keys.clone()),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let mut honest = DeviceSpec::synthetic("alice", "walk", 8_000, 3.0, 7);
        honest.token = token(&keys, Scope::Uid("alice".into()), 3_600);
        let honest = streaming(&p, honest);

        let device = p.device().await.expect("connect");
        let alice = token(&keys, Scope::Uid("alice".into()), 3_600);
        let other_key = Keyring::parse("k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let cases = [
            (
                hello("bob", "x", &alice),
                ErrorCode::PermissionDenied,
                "not as uid \"bob\"",
            ),
            (
                hello("alice", "x", ""),
                ErrorCode::Unauthenticated,
                "no token",
            ),
            (
                hello("alice", "x", "sesame"),
                ErrorCode::Unauthenticated,
                "malformed",
            ),
            (
                hello("alice", "x", &token(&keys, Scope::Uid("alice".into()), -1)),
                ErrorCode::Unauthenticated,
                "expired",
            ),
            (
                hello(
                    "alice",
                    "x",
                    &token(&other_key, Scope::Uid("alice".into()), 3_600),
                ),
                ErrorCode::Unauthenticated,
                "does not verify",
            ),
        ];
        for (h, code, says) in cases {
            let e = refusal(&device, h).await;
            assert_eq!(e.code, code as i32, "{e:?}");
            assert!(e.message.contains(says), "{e:?}");
        }
        // A gateway's token covers every uid under its prefix, and nothing else.
        let gateway = token(&keys, Scope::Prefix("gw-".into()), 3_600);
        let mut spec = DeviceSpec::synthetic("gw-carol", "s", 8_000, 1.0, 8);
        spec.token = gateway.clone();
        let carol = run_device(&device, spec, &Progress::hidden())
            .await
            .expect("gateway");
        assert_eq!(carol.acks.len(), 1, "{:?}", carol.errors);
        let e = refusal(&device, hello("alice", "x", &gateway)).await;
        assert_eq!(e.code, ErrorCode::PermissionDenied as i32);

        undisturbed(&p, honest, 3).await;
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_refusals_total{code=\"PERMISSION_DENIED\"}"
            ),
            2.0
        );
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_refusals_total{code=\"UNAUTHENTICATED\"}"
            ),
            4.0
        );
        let keys_stored = p.object_keys("").await.unwrap();
        assert!(
            keys_stored
                .iter()
                .all(|k| k.starts_with("alice/walk/") || k.starts_with("gw-carol/")),
            "{keys_stored:?}"
        );
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_hello_hold_no_session_slot_and_are_refused_at_the_deadline() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            max_sessions: 1,
            hello_timeout: Duration::from_millis(500),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        // Ten streams that send two bytes of a length prefix and then nothing (slowloris).
        let loris = p.device().await.expect("connect");
        let mut silent = Vec::new();
        for _ in 0..10 {
            let (mut tx, rx) = loris.open().await.expect("stream");
            tx.raw(&[0, 0]).await.expect("two bytes");
            silent.push((tx, rx));
        }
        // The one session slot is still free for an honest device.
        let honest = streaming(&p, DeviceSpec::synthetic("dora", "s", 8_000, 2.0, 3));
        for (tx, rx) in silent {
            let e = first_error(rx.collect().await.expect("answers"));
            assert_eq!(e.code, ErrorCode::HelloTimeout as i32, "{e:?}");
            drop(tx);
        }
        undisturbed(&p, honest, 2).await;
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(&m, "spillway_ingest_refusals_total{code=\"HELLO_TIMEOUT\"}"),
            10.0
        );
        loris.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_take_every_session_slot() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            max_sessions_per_uid: 2,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");
        let mut held = Vec::new();
        for i in 0..2 {
            let (mut tx, mut rx) = device.open().await.expect("stream");
            tx.hello(hello("eve", &format!("s{i}"), ""))
                .await
                .expect("hello");
            let first = rx.next().await.expect("read").expect("an answer");
            assert!(matches!(first.kind, Some(Kind::Accepted(_))), "{first:?}");
            held.push((tx, rx));
        }
        let e = refusal(&device, hello("eve", "s3", "")).await;
        assert_eq!(e.code, ErrorCode::Overloaded as i32);
        assert!(e.message.contains("--max-sessions-per-uid"), "{e:?}");
        // Another uid is not affected.
        let honest = streaming(&p, DeviceSpec::synthetic("fay", "s", 8_000, 1.0, 4));
        undisturbed(&p, honest, 1).await;
        drop(held);
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_do_not_keep_a_connection_open() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            idle_timeout: Duration::from_secs(1),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");
        let started = tokio::time::Instant::now();
        // A refused stream every 300 ms, for up to 5 s: only sessions keep a connection open,
        // so it is closed about a second after it opened.
        let mut refused = 0;
        while started.elapsed() < Duration::from_secs(5) {
            let Ok((mut tx, rx)) = device.open().await else {
                break;
            };
            if tx.hello(hello("..", "s", "")).await.is_err() {
                break;
            }
            match rx.collect().await {
                Ok(m) if !m.is_empty() => refused += 1,
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let lasted = started.elapsed();
        assert!(
            lasted < Duration::from_secs(3),
            "kept open for {lasted:?} by {refused} refused streams"
        );
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(&m, "spillway_ingest_idle_connections_closed_total"),
            1.0
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_beyond_the_in_flight_cap_are_refused_at_once_and_trickling_ones_time_out() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            max_puts_in_flight: 2,
            // Long enough that the probe below meets both slots held even on busy cores.
            put_timeout: Duration::from_secs(4),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        // A rogue client holds both slots with puts whose bodies never arrive.
        let channel = p.uploader_channel().await.expect("channel");
        let holders: Vec<_> = (0..2)
            .map(|_| tokio::spawn(spillway_kit::rogue::trickling_put(channel.clone())))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // A whole put beyond them is refused at once, before its body is read.
        let pcm = vec![1u8; 16_000];
        let put = mallory_put("flood", pcm);
        let refused = loop {
            let started = tokio::time::Instant::now();
            match p.put_chunk(put.clone()).await {
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    assert!(
                        started.elapsed() < Duration::from_secs(1),
                        "refused at once"
                    );
                    break status.code();
                }
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "never refused: {other:?}"
                ),
            }
            // The holders may not be in flight yet.
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(refused, tonic::Code::ResourceExhausted);
        let m = p.uploader_metrics().await.unwrap();
        assert!(
            metric(
                &m,
                "spillway_uploader_put_rejections_total{reason=\"too_many_in_flight\"}"
            ) >= 1.0
        );
        // The trickling puts end at --put-timeout, freeing their slots; an honest device (whose
        // ingest retried meanwhile) loses nothing.
        let honest = streaming(&p, DeviceSpec::synthetic("gil", "s", 8_000, 2.0, 5));
        for h in holders {
            let code = h.await.expect("task").expect("answer");
            assert_ne!(code, tonic::Code::Ok, "a trickled put is never committed");
        }
        undisturbed(&p, honest, 2).await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uploader_answers_only_clients_holding_a_certificate_of_its_ca() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let pcm = vec![3u8; 16_000];
        let put = mallory_put("rogue", pcm);
        let attempt = |channel: anyhow::Result<tonic::transport::Channel>| {
            let put = put.clone();
            async move {
                let channel = channel?;
                let mut client =
                    spillway_proto::uploader::uploader_client::UploaderClient::new(channel);
                client.put_chunk(put).await?;
                anyhow::Ok(())
            }
        };
        let addr = p.uploader_grpc;
        // Plaintext: no TLS at all.
        let plain = attempt(spillway_kit::pipeline::uploader_channel(addr, None).await).await;
        assert!(plain.is_err(), "a plaintext client was answered");
        // TLS that trusts the uploader but shows no certificate of its own.
        let pki = spillway_kit::pki::DevPki::generate().unwrap();
        let no_cert = async {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(p.pki.ca.as_bytes()))
                .domain_name("localhost");
            anyhow::Ok(
                tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                    .tls_config(tls)?
                    .connect()
                    .await?,
            )
        };
        assert!(
            attempt(no_cert.await).await.is_err(),
            "a client without a certificate was answered"
        );
        // A client certificate from another CA (that trusts the uploader's CA).
        let forged = spillway_proto::link::LinkTls::from_pem(
            p.pki.ca.as_bytes(),
            pki.ingest.cert.as_bytes(),
            pki.ingest.key.as_bytes(),
        );
        let other_ca =
            attempt(spillway_kit::pipeline::uploader_channel(addr, Some(&forged)).await).await;
        assert!(
            other_ca.is_err(),
            "a certificate of another CA was accepted"
        );
        // Nothing reached the service; ingest's own certificate does.
        let m = p.uploader_metrics().await.unwrap();
        assert_eq!(
            metric(&m, "spillway_uploader_puts_total{result=\"stored\"}"),
            0.0
        );
        p.put_chunk(put.clone())
            .await
            .expect("ingest's certificate is accepted");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

/// A one-second chunk of `pcm` at 8 kHz for uid `mallory`, as a rogue client would put it.
fn mallory_put(session: &str, pcm: Vec<u8>) -> spillway_proto::uploader::PutChunkRequest {
    spillway_proto::uploader::PutChunkRequest {
        id: Some(spillway_proto::uploader::ChunkId {
            uid: "mallory".into(),
            session: session.into(),
            seq: 0,
        }),
        sample_rate: 8_000,
        chunk_samples: 8_000,
        first_sample: 0,
        crc32c: spillway_proto::checksum::crc32c(&pcm),
        pcm: pcm.into(),
        ..Default::default()
    }
}

/// A CA for device certificates and a certificate it signs naming `uri` (a SAN URI).
fn device_pki() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device-ca");
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

fn device_cert(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    uri: &str,
) -> spillway_ingest::tls::TlsMaterial {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    spillway_ingest::tls::TlsMaterial {
        cert_chain: vec![cert.der().clone()],
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_a_device_writes_only_as_the_uid_its_certificate_names() {
    tokio::time::timeout(LIMIT, async {
        let (ca, issuer) = device_pki();
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            device_ca: Some(vec![ca.der().clone()]),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let alice = device_cert(&issuer, "spillway:uid:alice");
        let device = Device::connect_as(p.ingest_quic, "localhost", &p.cert_der, &alice)
            .await
            .expect("alice's certificate is accepted");
        let report = run_device(
            &device,
            DeviceSpec::synthetic("alice", "walk", 8_000, 2.0, 11),
            &Progress::hidden(),
        )
        .await
        .expect("alice streams as alice");
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(30))
                .await
                .expect("stored"),
            2
        );
        let e = refusal(&device, hello("bob", "x", "")).await;
        assert_eq!(e.code, ErrorCode::PermissionDenied as i32, "{e:?}");
        device.close().await;
        // No certificate, or one of another CA: the handshake fails (TLS 1.3 tells the client
        // after its side finished, so the first stream is where it shows).
        assert!(
            !gets_in(p.device().await).await,
            "a device without a certificate got in"
        );
        let (_, stranger) = device_pki();
        let forged = device_cert(&stranger, "spillway:uid:alice");
        let connected = Device::connect_as(p.ingest_quic, "localhost", &p.cert_der, &forged).await;
        assert!(
            !gets_in(connected).await,
            "a certificate of another CA got in"
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

/// True when a session as `alice` is accepted on this connection.
async fn gets_in(device: anyhow::Result<Device>) -> bool {
    let Ok(device) = device else { return false };
    let Ok((mut tx, mut rx)) = device.open().await else {
        return false;
    };
    if tx.hello(hello("alice", "x", "")).await.is_err() {
        return false;
    }
    let first = tokio::time::timeout(Duration::from_secs(5), rx.next()).await;
    matches!(
        first,
        Ok(Ok(Some(ServerMessage {
            kind: Some(Kind::Accepted(_))
        })))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_session_holds_one_first_step_and_is_flushed_at_the_fill_timeout() {
    tokio::time::timeout(LIMIT, async {
        // 2 s chunks of 16 kHz audio are 64,000 bytes; a trickler may hold 16 KiB of them.
        let p = Pipeline::start(Options {
            chunk_seconds: 2,
            chunk_fill_timeout: Some(Duration::from_secs(3)),
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let device = p.device().await.expect("connect");
        let mut tricklers = Vec::new();
        for i in 0..3 {
            let (mut tx, mut rx) = device.open().await.expect("stream");
            let h = DeviceSpec::synthetic(&format!("tess-{i}"), "drip", 16_000, 1.0, 1).hello();
            tx.hello(h).await.expect("hello");
            let first = rx.next().await.expect("read").expect("an answer");
            assert!(matches!(first.kind, Some(Kind::Accepted(_))), "{first:?}");
            tricklers.push((tx, rx));
        }
        // One sample every 100 ms each: 20 B/s where real time is 32,000.
        let (writers, readers): (Vec<_>, Vec<_>) = tricklers.into_iter().unzip();
        let drip = tokio::spawn(async move {
            let mut writers = writers;
            for _ in 0..60 {
                for tx in &mut writers {
                    let _ = tx.audio(bytes::Bytes::from_static(&[1, 0])).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            writers
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(&m, "spillway_ingest_buffered_bytes"),
            3.0 * 16_384.0,
            "each trickler holds one first step, not a 64,000-byte chunk"
        );
        // An honest device meanwhile streams at full speed and loses nothing.
        let honest = streaming(&p, DeviceSpec::synthetic("hana", "s", 16_000, 4.0, 5));
        for rx in readers {
            let messages = rx.collect().await.expect("answers");
            let acked: u64 = messages
                .iter()
                .filter_map(|m| match &m.kind {
                    Some(Kind::Ack(a)) => Some(a.end_sample - a.first_sample),
                    _ => None,
                })
                .sum();
            let e = first_error(messages);
            assert_eq!(e.code, ErrorCode::TooSlow as i32, "{e:?}");
            assert!(e.message.contains("--chunk-fill-timeout"), "{e:?}");
            assert!(
                (25..=35).contains(&acked),
                "about 3 s of drips (30 samples) were flushed and acknowledged, got {acked}"
            );
        }
        let _writers = drip.await.expect("drip");
        undisturbed(&p, honest, 2).await;
        let m = p.ingest_metrics().await.unwrap();
        assert_eq!(
            metric(
                &m,
                "spillway_ingest_sessions_ended_total{reason=\"too_slow\"}"
            ),
            3.0
        );
        assert_eq!(metric(&m, "spillway_ingest_buffered_bytes"), 0.0);
        device.close().await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}
