//! Scale-out, in one process against the embedded store: one ingest in front of three
//! uploaders, one of which dies under load. Each uploader runs on its own runtime so its death
//! tears down its connections as a crash would. Every acknowledged chunk is read back from the
//! store and compared byte for byte.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{IsolatedUploader, Options, http_get, start_s3, uploader_config};
use spillway_kit::sim::{DeviceSpec, Progress, run_device, verify_device};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

async fn metrics(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await.expect("metrics").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_fails_over_when_one_of_three_uploaders_dies_and_its_spool_drains_after_restart() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let s3_root = dir.path().join("s3");
        let (endpoint, _s3) = start_s3(s3_root.clone(), CancellationToken::new())
            .await
            .unwrap();
        let opts = Options {
            chunk_seconds: 1,
            workers: 2,
            bucket: "scale".into(),
            pki: Some(spillway_kit::pki::DevPki::generate().unwrap()),
            ..Options::default()
        };
        let mut uploaders = Vec::new();
        for i in 0..3 {
            let config = uploader_config(dir.path().join(format!("spool-{i}")), &endpoint, &opts);
            uploaders.push(IsolatedUploader::start(config).await.unwrap());
        }

        let tls = spillway_ingest::tls::self_signed().unwrap();
        let cert = tls.leaf_der().to_vec();
        let mut config = spillway_ingest::Config::local(String::new(), tls);
        config.uploaders = uploaders
            .iter()
            .map(|u| spillway_ingest::forward::Target::Url(format!("https://{}", u.grpc)))
            .collect();
        // The link as deployed: mutual TLS.
        config.link = spillway_proto::link::Link::Tls(opts.pki.as_ref().unwrap().ingest_tls());
        config.chunk_seconds = 1;
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let quic_addr = quic.local_addr().unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest_http = http.local_addr().unwrap();
        let stop = CancellationToken::new();
        let ingest = tokio::spawn(spillway_ingest::run(
            config,
            spillway_ingest::Listeners {
                quic,
                http,
                omi: None,
            },
            stop.clone(),
        ));
        spillway_kit::pipeline::wait_ready(ingest_http)
            .await
            .unwrap();
        let m = metrics(ingest_http).await;
        assert_eq!(metric(&m, "spillway_ingest_uploader_endpoints"), 3.0);

        // The store fails for a while, so every uploader holds acknowledged chunks in its spool.
        let fault = spillway_kit::s3::fault_flag(&s3_root);
        std::fs::write(&fault, b"").unwrap();

        // Twelve devices, 8 kHz, 24 s of audio each at 4x real time: 6 s of load.
        let devices: Vec<_> = (0..12)
            .map(|d| {
                let cert = cert.clone();
                tokio::spawn(async move {
                    let device =
                        spillway_ingest::client::Device::connect(quic_addr, "localhost", &cert)
                            .await
                            .expect("connect");
                    let mut spec = DeviceSpec::synthetic(&format!("dev{d}"), "s", 8_000, 24.0, d);
                    spec.speed = 4.0;
                    let report = run_device(&device, spec, &Progress::hidden())
                        .await
                        .expect("session");
                    device.close().await;
                    report
                })
            })
            .collect();

        // Under load, the uploader holding the most acknowledged chunks dies. (Sessions pick
        // uploaders by hash of addresses that change every run: any of the three may be it.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let victim = loop {
            let mut most = (0.0, 0);
            for (i, u) in uploaders.iter().enumerate() {
                let held = metric(&metrics(u.http).await, "spillway_uploader_spool_chunks");
                if held > most.0 {
                    most = (held, i);
                }
            }
            if most.0 >= 3.0 {
                break most.1;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no uploader took three chunks"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        uploaders[victim].kill();
        let killed_at = tokio::time::Instant::now();
        std::fs::remove_file(&fault).unwrap();

        let reports: Vec<_> = futures_join(devices).await;
        let load_ended = killed_at.elapsed();
        let m = metrics(ingest_http).await;
        assert!(
            metric(&m, "spillway_ingest_forward_failovers_total") >= 1.0,
            "ingest sent chunks past the dead uploader:\n{m}"
        );
        assert_eq!(
            metric(&m, "spillway_ingest_uploader_endpoints_healthy"),
            2.0,
            "{m}"
        );
        for r in &reports {
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert_eq!(
                r.acks.len(),
                24,
                "every chunk acknowledged while one uploader was dead"
            );
        }
        assert!(load_ended < Duration::from_secs(60), "{load_ended:?}");

        // The dead uploader comes back on its spool: what it had acknowledged reaches the store.
        uploaders[victim].restart().await.unwrap();
        let s3 = spillway_kit::s3::client(&endpoint).await;
        for r in &reports {
            assert_eq!(
                verify_device(&s3, "scale", r, Duration::from_secs(60))
                    .await
                    .expect("every acknowledged chunk stored once, byte for byte"),
                24
            );
        }
        stop.cancel();
        ingest.await.unwrap().unwrap();
    })
    .await
    .expect("bounded in time");
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("device task"));
    }
    out
}
