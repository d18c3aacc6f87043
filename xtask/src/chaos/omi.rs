//! The chaos rows of the Omi path: simulated listen sessions ([`spillway_kit::omi_sim`]) stream
//! in real time to the Omi WebSocket of a cluster of the real binaries while a daemon is
//! killed. Omi's protocol has no acknowledgements, so nothing is "acknowledged": each row says
//! how much of every capture the store holds, the most any session lost against the bound the
//! configuration sets, and whether anything is there twice or altered (both must be 0).

use std::time::{Duration, Instant};

use spillway_kit::cluster::{BUCKET, Cluster, ClusterOptions, Daemon};
use spillway_kit::omi_sim::{OmiAudit, OmiSpec, audit, play};

/// `--omi-commit-every` in these rows: what an ingest crash may lose, plus the frame in flight.
pub(super) const COMMIT_EVERY_S: u32 = 5;
const RATE: u32 = 16_000;

/// One row of the Omi table.
#[derive(Debug, Clone, Default)]
pub(super) struct OmiRow {
    scenario: String,
    sessions: usize,
    sent: f64,
    stored: f64,
    /// The most one session lost, in seconds.
    worst_loss: f64,
    /// What the configuration allows one session to lose, in seconds.
    bound: f64,
    duplicated: f64,
    altered: usize,
    reconnects: u32,
    note: String,
    problems: Vec<String>,
}

impl OmiRow {
    pub(super) fn failed(&self) -> bool {
        !self.problems.is_empty()
            || self.duplicated > 0.0
            || self.altered > 0
            || self.worst_loss > self.bound
    }

    pub(super) fn name(&self) -> &str {
        &self.scenario
    }
}

#[derive(Clone, Copy)]
enum Kill {
    Uploader,
    Ingest,
    /// Nothing is killed: ingest relays to an upstream pusher that is down for the whole row.
    UpstreamDown,
}

/// The rows: kill -9 of the uploader (nothing may be lost: ingest holds the audio until an
/// uploader commits it), and of ingest (at most `--omi-commit-every` and the frame in flight).
pub(super) async fn rows(
    base: &ClusterOptions,
    sessions: usize,
    only: Option<&str>,
) -> anyhow::Result<Vec<OmiRow>> {
    let mut rows = Vec::new();
    for (name, kill, bound) in [
        ("Omi: kill -9 uploader", Kill::Uploader, 0.0),
        (
            "Omi: kill -9 ingest",
            Kill::Ingest,
            f64::from(COMMIT_EVERY_S) + 1.0,
        ),
        ("Omi: upstream pusher down", Kill::UpstreamDown, 0.0),
    ] {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        eprintln!("== {name}");
        let mut opts = base.clone();
        opts.dir = base.dir.join(name.replace([' ', ':'], "-"));
        opts.chunk_seconds = 60;
        opts.ingest_args = vec!["--omi-commit-every".into(), format!("{COMMIT_EVERY_S}s")];
        if let Kill::UpstreamDown = kill {
            // A port nothing listens on: every connect is refused, as from a pusher that is down.
            let dead = spillway_kit::cluster::free_tcp()?;
            opts.ingest_args.extend([
                "--omi-upstream".into(),
                format!("ws://{dead}"),
                "--omi-upstream-audio".into(),
            ]);
        }
        let row = tokio::time::timeout(
            Duration::from_secs(240),
            row(name, kill, bound, opts, sessions),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish in time")))
        .unwrap_or_else(|e| OmiRow {
            scenario: name.to_owned(),
            problems: vec![format!("{e:#}")],
            ..OmiRow::default()
        });
        eprintln!("   {row:?}");
        rows.push(row);
    }
    Ok(rows)
}

async fn row(
    name: &str,
    kill: Kill,
    bound: f64,
    opts: ClusterOptions,
    sessions: usize,
) -> anyhow::Result<OmiRow> {
    let mut c = Cluster::start(opts).await?;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        .floor()
        + 0.5;
    let specs: Vec<OmiSpec> = (0..sessions)
        .map(|s| OmiSpec {
            uid: format!("listen-{s:02}"),
            conversation: "chaos".into(),
            sample_rate: RATE,
            seconds: 30,
            speed: 1.0,
            t0,
            seed: 40 + s as u64,
        })
        .collect();
    let addr = c.ingests[0].omi;
    let tasks: Vec<_> = specs
        .iter()
        .cloned()
        .map(|spec| tokio::spawn(async move { play(addr, &spec, Duration::from_secs(150)).await }))
        .collect();
    // Mid-capture: 12 s in, 2 s down.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let daemon = match kill {
        Kill::Uploader => Some(Daemon::Uploader(0)),
        Kill::Ingest => Some(Daemon::Ingest(0)),
        Kill::UpstreamDown => None,
    };
    if let Some(daemon) = daemon {
        c.kill(daemon).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.start_daemon(daemon).await?;
    }
    let mut reconnects = 0;
    for t in tasks {
        reconnects += t.await??.reconnects;
    }
    let relay = spillway_kit::pipeline::http_get(c.ingests[0].http, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let s3 = c.s3().await;
    // Until the store holds all it is going to: nothing new for 3 s.
    let mut audits: Vec<OmiAudit> = Vec::new();
    let mut steady = Instant::now();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && steady.elapsed() < Duration::from_secs(3) {
        let mut now = Vec::new();
        for spec in &specs {
            now.push(audit(&s3, BUCKET, spec).await?);
        }
        let stored = |a: &[OmiAudit]| a.iter().map(|a| a.stored).sum::<f64>();
        if audits.is_empty() || stored(&now) > stored(&audits) {
            steady = Instant::now();
        }
        audits = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    c.stop().await?;
    Ok(OmiRow {
        scenario: name.to_owned(),
        sessions,
        sent: specs.iter().map(|s| f64::from(s.seconds)).sum(),
        stored: audits.iter().map(|a| a.stored).sum(),
        worst_loss: audits.iter().map(|a| a.missing).fold(0.0, f64::max),
        bound,
        duplicated: audits.iter().map(|a| a.duplicated).sum(),
        altered: audits.iter().map(|a| a.altered).sum(),
        reconnects,
        note: match kill {
            Kill::Uploader => "ingest holds each chunk until an uploader commits it".into(),
            Kill::Ingest => format!(
                "--omi-commit-every {COMMIT_EVERY_S}s: the open chunk and the frame in flight die with ingest"
            ),
            Kill::UpstreamDown => {
                let m = |series: &str| spillway_kit::metrics::metric(&relay, series);
                format!(
                    "--omi-upstream (audio too) refuses every connect: {} connects tried by {sessions} sessions in 30 s (the breaker's), {} frames dropped and counted; every capture stored in full",
                    m("spillway_ingest_omi_upstream_connects_total{result=\"failed\"}")
                        + m("spillway_ingest_omi_upstream_connects_total{result=\"timeout\"}"),
                    m(
                        "spillway_ingest_omi_upstream_dropped_frames_total{reason=\"upstream_down\"}"
                    ) + m(
                        "spillway_ingest_omi_upstream_dropped_frames_total{reason=\"queue_full\"}"
                    ),
                )
            }
        },
        problems: Vec::new(),
    })
}

pub(super) fn render(rows: &[OmiRow]) -> String {
    use crate::report::Align::{Left, Right};
    let columns = [
        ("scenario", Left),
        ("sessions", Right),
        ("audio sent", Right),
        ("stored", Right),
        ("most lost by a session", Right),
        ("bound", Right),
        ("duplicated", Right),
        ("altered", Right),
        ("reconnects", Right),
        ("notes", Left),
    ];
    crate::report::table(
        &columns,
        rows.iter().map(|r| {
            let note = super::note_cell(&r.note, &r.problems);
            vec![
                r.scenario.clone(),
                r.sessions.to_string(),
                format!("{:.0} s", r.sent),
                format!("{:.1} s", r.stored),
                format!("{:.2} s", r.worst_loss),
                format!("{:.0} s", r.bound),
                format!("{:.2} s", r.duplicated),
                r.altered.to_string(),
                r.reconnects.to_string(),
                note,
            ]
        }),
    )
}
