//! `ingest status` and `uploader status` against the real daemons in one process: what they
//! report after a simulated device streamed while the store was down, and while the spool
//! drains once it is back (the upload rate comes from two scrapes), in text and in JSON.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::{Options, Pipeline};
use spillway_kit::sim::{DeviceSpec, Progress, run_device};
use spillway_uploader::status::StatusFlags;

const LIMIT: Duration = Duration::from_secs(120);

fn uploader_args(p: &Pipeline, interval: Duration) -> spillway_uploader::status::StatusArgs {
    spillway_uploader::status::StatusArgs {
        metrics_url: format!("http://{}/metrics", p.uploader_http),
        flags: StatusFlags {
            interval,
            timeout: Duration::from_secs(5),
            json: true,
        },
    }
}

fn ingest_args(p: &Pipeline) -> spillway_ingest::cli::status::StatusArgs {
    spillway_ingest::cli::status::StatusArgs {
        metrics_url: format!("http://{}/metrics", p.ingest_http),
        flags: StatusFlags {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            json: true,
        },
    }
}

async fn until_uploader(p: &Pipeline, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = p.uploader_metrics().await.expect("metrics");
        if done(&m) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_what_a_device_sent_while_the_store_was_down_and_the_drain_after() {
    tokio::time::timeout(LIMIT, async {
        let p = Pipeline::start(Options {
            chunk_seconds: 1,
            spool_max_bytes: 200_000,
            ..Options::default()
        })
        .await
        .expect("pipeline");
        p.store_failing(true).expect("fault on");
        let device = p.device().await.expect("connect");
        let report = run_device(
            &device,
            DeviceSpec::synthetic("stella", "glance", 8_000, 4.0, 21),
            &Progress::hidden(),
        )
        .await
        .expect("session");
        device.close().await;
        assert_eq!(report.acks.len(), 4);
        until_uploader(&p, "the breaker to open", |m| {
            metric(m, "spillway_uploader_breaker_state") == 2.0
        })
        .await;

        // Four chunks spooled (16,000 bytes of PCM each), none uploaded, the store failing.
        let up = spillway_uploader::status::collect(&uploader_args(&p, Duration::from_millis(200)))
            .await
            .expect("uploader status")
            .to_json();
        assert_eq!(up["daemon"], json!("uploader"));
        assert_eq!(up["ready"], json!(true));
        assert_eq!(up["spool"]["chunks"], json!(4.0));
        let bytes = up["spool"]["bytes"].as_f64().unwrap();
        assert!((64_000.0..66_000.0).contains(&bytes), "{bytes}");
        assert_eq!(up["spool"]["max_bytes"], json!(200_000.0));
        assert_eq!(
            up["spool"]["format"],
            json!(f64::from(spillway_uploader::spool::FORMAT)),
            "the spool's mark, for rollouts"
        );
        assert!(up["spool"]["oldest_chunk_age_seconds"].as_f64().is_some());
        assert!(
            matches!(
                up["uploads"]["breaker"].as_str(),
                Some("open" | "half-open")
            ),
            "{up}"
        );
        assert_eq!(up["puts"]["results"]["total"]["stored"], json!(4.0));
        assert!(up["uploads"]["results"]["total"]["error"].as_f64().unwrap() >= 1.0);
        assert_eq!(up["uploads"]["results"]["total"].get("ok"), None, "{up}");
        assert_eq!(up["losses"]["dropped_chunks"], json!(0.0));

        let ingest = spillway_ingest::cli::status::collect(&ingest_args(&p))
            .await
            .expect("ingest status");
        let text = ingest.to_text();
        let ingest = ingest.to_json();
        assert_eq!(ingest["daemon"], json!("ingest"));
        assert_eq!(ingest["ready"], json!(true));
        assert_eq!(ingest["acks"]["chunks"], json!(4.0));
        assert_eq!(ingest["sessions"]["active"], json!(0.0));
        assert_eq!(ingest["uploaders"]["endpoints"], json!(1.0));
        assert_eq!(ingest["budget"]["buffered_bytes"], json!(0.0));
        // No ack in the interval: no latency to report, and a rate of 0.
        assert_eq!(ingest["acks"]["ack_p99_seconds"], Value::Null);
        assert_eq!(ingest["acks"]["per_second"], json!(0.0));
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("chunks acked") && l.ends_with(" 4")),
            "{text}"
        );

        // The store comes back during the scrapes' interval: the four chunks are uploaded
        // between them, and the rate says so.
        let interval = Duration::from_secs(10);
        let args = uploader_args(&p, interval);
        let during = tokio::spawn(async move { spillway_uploader::status::collect(&args).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.store_failing(false).expect("fault off");
        let summary = during.await.expect("task").expect("uploader status");
        let text = summary.to_text();
        let up = summary.to_json();
        assert_eq!(up["spool"]["chunks"], json!(0.0), "{up}");
        assert_eq!(up["uploads"]["breaker"], json!("closed"));
        assert_eq!(up["uploads"]["results"]["recent"]["ok"], json!(4.0), "{up}");
        let uploaded = up["uploads"]["per_second"].as_f64().unwrap()
            * up["interval_seconds"].as_f64().unwrap();
        assert!((uploaded - 4.0).abs() < 1e-6, "{up}");
        assert!(up["uploads"]["bytes_per_second"].as_f64().unwrap() > 0.0);
        assert!(
            text.starts_with(&format!(
                "uploader at http://{}/metrics: ready",
                p.uploader_http
            )),
            "{text}"
        );
        assert!(text.contains("store breaker"), "{text}");

        // The JSON's shape, for scripts.
        let shape = |v: &Value| -> Vec<(String, Vec<String>)> {
            let mut sections: Vec<(String, Vec<String>)> = v
                .as_object()
                .unwrap()
                .iter()
                .filter_map(|(k, v)| {
                    let mut keys: Vec<String> = v.as_object()?.keys().cloned().collect();
                    keys.sort();
                    Some((k.clone(), keys))
                })
                .collect();
            sections.sort();
            sections
        };
        assert_eq!(
            shape(&up),
            [
                (
                    "losses",
                    vec![
                        "conflicts",
                        "dropped_chunks",
                        "lost_chunks",
                        "quarantined_chunks"
                    ]
                ),
                (
                    "puts",
                    vec!["commit_p99_seconds", "per_second", "rejections", "results"]
                ),
                (
                    "spool",
                    vec![
                        "bytes",
                        "chunks",
                        "disk_free_bytes",
                        "fill_ratio",
                        "format",
                        "max_bytes",
                        "oldest_chunk_age_seconds"
                    ]
                ),
                (
                    "uploads",
                    vec![
                        "breaker",
                        "bytes_per_second",
                        "concurrency_limit",
                        "errors_per_second",
                        "in_flight",
                        "per_second",
                        "results"
                    ]
                ),
            ]
            .map(|(k, v)| (
                k.to_owned(),
                v.into_iter().map(str::to_owned).collect::<Vec<_>>()
            ))
        );
        assert_eq!(
            shape(&ingest)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            ["acks", "budget", "connections", "sessions", "uploaders"]
        );
        p.stop().await.expect("clean stop");
    })
    .await
    .expect("bounded in time");
}

#[tokio::test]
async fn status_of_nothing_says_where_it_looked() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let args = spillway_uploader::status::StatusArgs {
        metrics_url: format!("http://{addr}/metrics"),
        flags: StatusFlags {
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(2),
            json: false,
        },
    };
    let e = spillway_uploader::status::collect(&args)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("http://{addr}/metrics: connecting")),
        "{e}"
    );
}
