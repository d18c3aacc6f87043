//! Durability under trouble, in one process against the embedded store: object-store outages,
//! a full spool (reject and drop-oldest), ingest's memory budget, and an uploader restarted with
//! a backlog. These are the fast versions of the `cargo xtask chaos` scenarios; each is bounded
//! in time. Every acknowledged chunk is read back from the store and compared byte for byte.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline, http_get, uploader_config};
use spillway_kit::sim::{DeviceReport, DeviceSpec, Progress, run_device, verify_device};
use spillway_uploader::spool::WhenFull;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

/// Chunks of one second at 8 kHz: 16,000 bytes each, so a small spool fills quickly.
fn small() -> Options {
    Options {
        chunk_seconds: 1,
        // The smallest spool the uploader accepts for 1 s chunks holds one 48 kHz chunk
        // (96,000 bytes); this one holds about a dozen 8 kHz chunks.
        spool_max_bytes: 200_000,
        ..Options::default()
    }
}

async fn uploader_metrics(p: &Pipeline) -> String {
    p.uploader_metrics().await.expect("metrics")
}

async fn ingest_metrics(p: &Pipeline) -> String {
    p.ingest_metrics().await.expect("metrics")
}

/// Polls the uploader's metrics until `done` holds (at most 30 s).
async fn until_uploader(p: &Pipeline, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = uploader_metrics(p).await;
        if done(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the uploader's `/readyz` until it answers `status` (at most 10 s): readiness follows
/// the spool's fill within a fraction of a second.
async fn until_ready(p: &Pipeline, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (now, _) = http_get(p.uploader_http, "/readyz").await.expect("readyz");
        if now == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed {now}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn streaming(p: &Pipeline, spec: DeviceSpec) -> tokio::task::JoinHandle<DeviceReport> {
    let (addr, cert) = (p.ingest_quic, p.cert_der.clone());
    tokio::spawn(async move {
        let device = spillway_ingest::client::Device::connect(addr, "localhost", &cert)
            .await
            .expect("connect");
        let report = run_device(&device, spec, &Progress::hidden())
            .await
            .expect("session");
        device.close().await;
        report
    })
}

/// Small chunks, and an uploader that stops draining 500 ms after it is told to stop.
fn backlog() -> Options {
    Options {
        drain_timeout: Duration::from_millis(500),
        ..small()
    }
}

/// A pipeline with its store down and one device's six acknowledged chunks in the spool.
async fn six_spooled(
    opts: Options,
    uid: &str,
    session: &str,
    seed: u64,
) -> (Pipeline, DeviceReport) {
    let mut p = Pipeline::start(opts).await.expect("pipeline");
    p.stop_store().await.expect("store down");
    let report = streaming(&p, DeviceSpec::synthetic(uid, session, 8_000, 5.5, seed))
        .await
        .expect("device task");
    assert_eq!(
        report.acks.len(),
        6,
        "acknowledged while the store was down"
    );
    (p, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_fills_the_spool_which_pushes_back_and_then_everything_drains() {
    tokio::time::timeout(LIMIT, async {
        let mut p = Pipeline::start(small()).await.expect("pipeline");
        p.stop_store().await.expect("store down");

        // 30 chunks of audio against a spool that holds about 12, with the store down.
        let device = streaming(&p, DeviceSpec::synthetic("olga", "outage", 8_000, 30.0, 11));

        // The spool fills to its bound and no further; puts are refused, not dropped; the
        // uploader reports not-ready so a balancer would steer work elsewhere.
        let m = until_uploader(&p, "a full spool", |m| {
            metric(
                m,
                "spillway_uploader_put_rejections_total{reason=\"spool_full\"}",
            ) >= 1.0
        })
        .await;
        assert!(metric(&m, "spillway_uploader_spool_bytes") <= 200_000.0);
        assert!(metric(&m, "spillway_uploader_upload_retries_total") >= 1.0);
        assert_eq!(
            metric(&m, "spillway_uploader_spool_dropped_chunks_total"),
            0.0
        );
        // Above the high watermark the uploader is not ready.
        until_ready(&p, 503).await;
        assert!(
            !device.is_finished(),
            "the device is held back while nothing can be committed"
        );
        assert!(
            metric(
                &ingest_metrics(&p).await,
                "spillway_ingest_forward_retries_total"
            ) >= 1.0
        );

        // The store comes back: the backlog drains, the device finishes, every chunk is there.
        p.start_store().await.expect("store up");
        let report = device.await.expect("device task");
        let s3 = p.s3().await;
        let objects = verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
            .await
            .expect("every acknowledged chunk reached the store, byte for byte");
        assert_eq!(objects, 30);
        let m = until_uploader(&p, "an empty spool", |m| {
            metric(m, "spillway_uploader_spool_chunks") == 0.0
        })
        .await;
        assert!(metric(&m, "spillway_uploader_spool_bytes") == 0.0);
        until_ready(&p, 200).await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_bound_and_counts_every_chunk_it_drops() {
    tokio::time::timeout(LIMIT, async {
        let mut p = Pipeline::start(Options {
            when_full: WhenFull::DropOldest,
            ..small()
        })
        .await
        .expect("pipeline");
        p.stop_store().await.expect("store down");
        let report = streaming(&p, DeviceSpec::synthetic("pia", "evict", 8_000, 30.0, 12))
            .await
            .expect("device task");
        // Nothing pushes back in this mode: every chunk is acknowledged at once.
        assert_eq!(report.acks.len(), 30);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let m = uploader_metrics(&p).await;
        let dropped = metric(&m, "spillway_uploader_spool_dropped_chunks_total");
        let spooled = metric(&m, "spillway_uploader_spool_chunks");
        assert!(
            dropped >= 1.0,
            "the spool overflowed, so chunks were dropped"
        );
        assert_eq!(
            dropped + spooled,
            30.0,
            "every chunk is spooled or counted as dropped"
        );
        assert!(metric(&m, "spillway_uploader_spool_bytes") <= 200_000.0);
        let dropped_bytes = metric(&m, "spillway_uploader_spool_dropped_bytes_total");
        assert!(
            (dropped * 16_000.0..dropped * 16_100.0).contains(&dropped_bytes),
            "{dropped_bytes} bytes for {dropped} records of 16,000 bytes of PCM each"
        );

        // The newest chunks survive and reach the store; the oldest were the ones dropped.
        p.start_store().await.expect("store up");
        until_uploader(&p, "an empty spool", |m| {
            metric(m, "spillway_uploader_spool_chunks") == 0.0
        })
        .await;
        let keys = p.object_keys("pia/evict/").await.expect("list");
        // Every chunk that was not dropped is there. A dropped chunk that was already being
        // uploaded from memory may have arrived too (eviction frees the disk, it does not
        // cancel an upload under way); at most `workers` of them.
        let kept: Vec<String> = (dropped as u64..30)
            .map(|seq| format!("pia/evict/{seq:06}.wav"))
            .collect();
        assert!(kept.iter().all(|k| keys.contains(k)), "{keys:?}");
        assert!(keys.len() <= kept.len() + small().workers, "{keys:?}");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

const BUDGET: usize = 10 * 16 * 1024 + 96_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_memory_budget_slows_devices_down_and_loses_nothing() {
    tokio::time::timeout(LIMIT, async {
        // The least budget ten sessions may have (a 16 KiB first step each and one 1 s chunk at
        // 48 kHz): room for sixteen 1 s chunks at 8 kHz, shared by ten devices sending as fast as
        // they can, each of which holds one being filled and one on its way.
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            max_sessions: 10,
            max_buffered_bytes: BUDGET,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let devices: Vec<_> = (0..10)
            .map(|d| {
                streaming(
                    &p,
                    DeviceSpec::synthetic(&format!("dev-{d}"), "budget", 8_000, 5.0, 20 + d),
                )
            })
            .collect();
        let s3 = p.s3().await;
        for device in devices {
            let report = device.await.expect("device task");
            assert_eq!(
                verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
                    .await
                    .expect("undisturbed"),
                5
            );
        }
        let m = ingest_metrics(&p).await;
        assert!(
            metric(&m, "spillway_ingest_budget_waits_total") >= 1.0,
            "ten devices cannot all fit in sixteen chunks: some must have waited"
        );
        assert_eq!(metric(&m, "spillway_ingest_buffered_bytes"), 0.0);
        assert_eq!(metric(&m, "spillway_ingest_budget_bytes"), BUDGET as f64);
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_left_spooled_at_shutdown_are_uploaded_after_the_restart() {
    tokio::time::timeout(LIMIT, async {
        let (mut p, report) = six_spooled(backlog(), "quinn", "backlog", 13).await;

        // SIGTERM-like stop: the drain cannot reach the store, gives up after its timeout and
        // exits cleanly with the chunks still spooled; the new uploader drains them.
        p.restart_uploader().await.expect("restart");
        let m = uploader_metrics(&p).await;
        assert_eq!(metric(&m, "spillway_uploader_spool_chunks"), 6.0);
        p.start_store().await.expect("store up");
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
                .await
                .expect("the backlog reached the store"),
            6
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spooled_chunk_costs_that_chunk_alone_quarantined_and_counted() {
    tokio::time::timeout(LIMIT, async {
        let (mut p, _) = six_spooled(backlog(), "rita", "rot", 19).await;

        // A byte of the oldest record file rots while no uploader runs; the next one reads
        // every record in its upload tasks, and must set that one aside and send the rest.
        p.stop_uploader().await.expect("stop");
        spillway_kit::damage::damage_spool(&p.spool_dir, true).expect("damage");
        p.restart_uploader().await.expect("restart");
        p.start_store().await.expect("store up");
        let m = until_uploader(&p, "the spool drained", |m| {
            metric(m, "spillway_uploader_spool_chunks") == 0.0
                && metric(m, "spillway_uploader_spool_quarantined_total") >= 1.0
        })
        .await;
        assert_eq!(metric(&m, "spillway_uploader_spool_quarantined_total"), 1.0);
        let keys = p.object_keys("rita/").await.expect("list");
        assert_eq!(keys.len(), 5, "every other chunk stored: {keys:?}");
        assert!(
            std::fs::read_dir(p.spool_dir.join("quarantine"))
                .expect("quarantine dir")
                .count()
                == 1,
            "the damaged record is kept aside for inspection"
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploader_drain_empties_an_orphaned_spool_and_says_what_it_could_not() {
    tokio::time::timeout(LIMIT, async {
        let opts = backlog();
        let (mut p, report) = six_spooled(opts.clone(), "orphan", "s", 17).await;
        let (spool_dir, endpoint) = (p.spool_dir.clone(), p.s3_endpoint.clone());
        let config = |timeout| {
            let mut c = uploader_config(spool_dir.clone(), &endpoint, &opts);
            c.drain_timeout = timeout;
            c
        };
        let drain = |timeout| {
            spillway_uploader::drain_spool(
                config(timeout),
                Duration::from_millis(200),
                CancellationToken::new(),
            )
        };

        let in_use = drain(Duration::from_secs(1))
            .await
            .expect_err("spool in use");
        assert!(
            format!("{in_use:#}").contains("in use by another process"),
            "{in_use:#}"
        );

        p.stop_uploader()
            .await
            .expect("uploader stops, leaving its spool");
        let stuck = drain(Duration::from_secs(1)).await.expect("drain runs");
        assert_eq!(
            (stuck.uploaded, stuck.left),
            (0, 6),
            "store down: all left, said so"
        );
        assert!(stuck.left_bytes > 0);

        p.start_store().await.expect("store up");
        let done = drain(Duration::from_secs(30)).await.expect("drain runs");
        assert_eq!((done.uploaded, done.left, done.left_bytes), (6, 0, 0));
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(5))
                .await
                .expect("every acknowledged chunk stored"),
            6
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_across_an_ingest_restart_mid_chunk_without_loss_or_duplicates() {
    tokio::time::timeout(LIMIT, async {
        let mut p = Pipeline::start(Options {
            chunk_seconds: 1,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        let mut spec = DeviceSpec::synthetic("rosa", "roaming", 8_000, 6.0, 14);
        spec.speed = 1.0;
        spec.mean_frame_bytes = 800;
        let mut config =
            spillway_ingest::client::ResumeConfig::local(p.ingest_quic, p.cert_der.clone());
        config.give_up_after = Some(Duration::from_secs(30));
        let device = tokio::spawn(async move {
            spillway_kit::sim::run_resuming_device(config, spec, &Progress::hidden()).await
        });

        // Mid-stream, and almost surely mid-chunk, ingest is restarted: it flushes the partial
        // chunk, acknowledges it and says SHUTTING_DOWN; the device reconnects and resumes.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        p.restart_ingest().await.expect("restart ingest");

        let report = device.await.expect("task").expect("the session completes");
        assert!(report.report.reconnects >= 1);
        assert!(
            report
                .report
                .errors
                .iter()
                .any(|e| e.code == spillway_proto::device::ErrorCode::ShuttingDown as i32),
            "{:?}",
            report.report.errors
        );
        let pieces: Vec<_> = report
            .report
            .acks
            .iter()
            .filter(|a| a.key.contains('_'))
            .map(|a| a.key.clone())
            .collect();
        assert_eq!(
            pieces.len(),
            1,
            "one chunk was cut by the restart: {pieces:?}"
        );
        let s3 = p.s3().await;
        let objects =
            spillway_kit::sim::verify_resumed(&s3, &p.bucket, &report, Duration::from_secs(60))
                .await
                .expect("every sample once, byte for byte");
        assert_eq!(objects, 7, "six chunks, one of them in two pieces");
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_answering_slow_down_is_retried_behind_the_breaker_until_it_recovers() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(small()).await.expect("pipeline");
        p.store_failing(true).expect("fault on");
        let report = streaming(&p, DeviceSpec::synthetic("sara", "slow", 8_000, 4.0, 15))
            .await
            .expect("device task");
        assert_eq!(
            report.acks.len(),
            4,
            "the spool absorbs what the store refuses"
        );
        let m = until_uploader(&p, "the breaker to open", |m| {
            metric(m, "spillway_uploader_breaker_state") == 2.0
        })
        .await;
        assert!(metric(&m, "spillway_uploader_uploads_total{result=\"error\"}") >= 5.0);
        assert!(metric(&m, "spillway_uploader_upload_max_attempts") >= 2.0);
        assert_eq!(metric(&m, "spillway_uploader_spool_chunks"), 4.0);

        p.store_failing(false).expect("fault off");
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
                .await
                .expect("drained once the store recovered"),
            4
        );
        until_uploader(&p, "the breaker to close", |m| {
            metric(m, "spillway_uploader_breaker_state") == 0.0
                && metric(m, "spillway_uploader_spool_chunks") == 0.0
        })
        .await;
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_open_a_session_are_closed_after_the_idle_timeout() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            idle_timeout: Duration::from_secs(1),
            ..small()
        })
        .await
        .expect("pipeline");
        let mut flood = Vec::new();
        for _ in 0..20 {
            flood.push(p.device().await.expect("connect"));
        }
        // A real session alongside is unaffected.
        let good = streaming(&p, DeviceSpec::synthetic("tess", "busy", 8_000, 3.0, 16));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let closed = metric(
                &ingest_metrics(&p).await,
                "spillway_ingest_idle_connections_closed_total",
            );
            if closed >= 20.0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{closed} of 20 closed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for device in &flood {
            assert!(device.open().await.is_err(), "closed by ingest");
        }
        let report = good.await.expect("device task");
        let s3 = p.s3().await;
        assert_eq!(
            verify_device(&s3, &p.bucket, &report, Duration::from_secs(60))
                .await
                .expect("undisturbed"),
            3
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}
