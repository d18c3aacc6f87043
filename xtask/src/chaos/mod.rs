//! `cargo xtask chaos`: every failure scenario against the real binaries on loopback, each
//! bounded in time, summed up in one table.
//!
//! Each scenario starts a fresh [`Cluster`] (store, uploader and ingest as processes), streams
//! audio from resuming devices ([`spillway_kit::sim::run_resuming_device`]), does its damage mid-load,
//! waits for the devices to finish and the spool to drain, then audits the store: every
//! acknowledged object must be there exactly once, byte for byte ([`spillway_kit::sim::audit_all`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use spillway_kit::cluster::{
    BUCKET, Cluster, ClusterOptions, Daemon, build_daemons, build_next_daemons,
};
use spillway_kit::metrics::metric;
use spillway_kit::pipeline::http_get;
use spillway_kit::sim::{DeviceSpec, Progress, ResumedReport, audit_all, run_resuming_device};

mod omi;
mod scenarios;
mod upgrade;

use scenarios::{Action, Scenario, scenarios};

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Short outages (5 s) for CI; without it the store outage lasts 60 s.
    #[arg(long)]
    pub quick: bool,
    /// Run only the scenarios whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Simulated devices per scenario.
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// State directory (one folder per scenario, kept for inspection).
    #[arg(long, default_value = ".spillway/chaos")]
    pub dir: PathBuf,
    /// Also write the table, with the command, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Build and run the daemons in release mode.
    #[arg(long)]
    pub release: bool,
}

/// One line of the table.
#[derive(Debug, Clone, Default)]
struct Row {
    scenario: String,
    audio_seconds: f64,
    acked: usize,
    objects: usize,
    lost: usize,
    duplicated: usize,
    /// Acknowledged chunks dropped on purpose and counted (`--when-full drop-oldest`) or lost to
    /// disk damage and counted.
    counted_drops: usize,
    recovery: Option<Duration>,
    note: String,
    problems: Vec<String>,
    /// What the devices went through: connections after their first, and every error ingest
    /// sent them, by code.
    reconnects: u32,
    device_errors: std::collections::BTreeMap<String, usize>,
}

const CHUNK_SECONDS: u32 = 2;
const RATE: u32 = 8_000;
pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let selected = |s: &Scenario| {
        args.only
            .as_deref()
            .is_none_or(|only| s.name.contains(only))
    };
    // The rolling upgrade needs a second build; it leaves the default one in place after it.
    let next = scenarios()
        .iter()
        .any(|s| matches!(s.run, Action::RollingUpgrade) && selected(s))
        .then(|| build_next_daemons(args.release))
        .transpose()?;
    let bin = build_daemons(args.release)?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    let outage = if args.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    };
    let mut rows = Vec::new();
    for (i, s) in scenarios().into_iter().enumerate() {
        if !selected(&s) {
            continue;
        }
        eprintln!("== {}", s.name);
        let started = Instant::now();
        let opts = ClusterOptions {
            dir: args.dir.join(format!("{i:02}")),
            bin: bin.clone(),
            chunk_seconds: CHUNK_SECONDS,
            workers: 8,
            uploaders: s.uploaders,
            ingests: s.ingests,
            uploader_args: s.uploader_args.clone(),
            ingest_args: s.ingest_args.clone(),
            // As deployed: devices prove their uid, and the link is mutual TLS.
            device_auth: true,
            store_tls: false,
        };
        let row = tokio::time::timeout(
            outage + Duration::from_secs(240),
            scenario(&s, opts, args.devices, outage, next.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish in time")));
        let row = row.unwrap_or_else(|e| Row {
            scenario: s.name.to_owned(),
            problems: vec![format!("{e:#}")],
            ..Row::default()
        });
        eprintln!("   {:.1} s, {:?}", started.elapsed().as_secs_f64(), row);
        rows.push(row);
    }
    let omi_rows = omi::rows(
        &ClusterOptions {
            dir: args.dir.join("omi"),
            bin: bin.clone(),
            chunk_seconds: CHUNK_SECONDS,
            workers: 8,
            uploaders: 1,
            ingests: 1,
            uploader_args: Vec::new(),
            ingest_args: Vec::new(),
            device_auth: true,
            store_tls: false,
        },
        args.devices,
        args.only.as_deref(),
    )
    .await?;
    let table = render(&rows);
    println!("{table}");
    let omi_table = omi::render(&omi_rows);
    if !omi_rows.is_empty() {
        println!("{omi_table}");
    }
    if let Some(path) = &args.record {
        let command = format!(
            "cargo xtask chaos{}{}",
            if args.quick { " --quick" } else { "" },
            if args.release { " --release" } else { "" }
        );
        let text = format!(
            "Produced by `{command}` ({} devices per scenario, 2 s chunks of 8 kHz audio; \
             the store outage lasted {} s). Lost and duplicated count acknowledged audio: both \
             must be 0 in every row. \"Counted\" are chunks the pipeline gave up on purpose or \
             found damaged, and reported in its metrics.\n\n{table}\n",
            args.devices,
            outage.as_secs()
        );
        // `--only` that picks no row of a table leaves that table as it was.
        if !rows.is_empty() {
            crate::report::write_between_markers(path, BEGIN, END, &text)?;
        }
        if !omi_rows.is_empty() {
            let text = format!(
                "Produced by `{command}`: {} simulated Omi listen sessions per row (timeline \
                 version 2, 1 s frames of 16 kHz audio in real time, 30 s each), the daemon killed \
                 12 s in and restarted 2 s later, 60 s chunks with `--omi-commit-every {}s`. \
                 Omi's protocol has no acknowledgements: \"most lost\" is the largest share of one \
                 capture missing from the store, which must stay within the bound; duplicated and \
                 altered must be 0.\n\n{omi_table}\n",
                args.devices,
                omi::COMMIT_EVERY_S
            );
            crate::report::write_between_markers(path, OMI_BEGIN, OMI_END, &text)?;
        }
    }
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| !r.problems.is_empty() || r.lost > r.counted_drops || r.duplicated > 0)
        .map(|r| r.scenario.clone())
        .chain(
            omi_rows
                .iter()
                .filter(|r| r.failed())
                .map(|r| r.name().to_owned()),
        )
        .collect();
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {failed:?}");
    Ok(())
}

fn render(rows: &[Row]) -> String {
    use crate::report::Align::{Left, Right};
    let columns = [
        ("scenario", Left),
        ("audio sent", Right),
        ("chunks acked", Right),
        ("objects", Right),
        ("lost", Right),
        ("duplicated", Right),
        ("counted", Right),
        ("recovered in", Right),
        ("notes", Left),
    ];
    crate::report::table(
        &columns,
        rows.iter().map(|r| {
            let recovery = r
                .recovery
                .map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
            let note = note_cell(&r.note, &r.problems);
            vec![
                r.scenario.clone(),
                format!("{:.0} s", r.audio_seconds),
                r.acked.to_string(),
                r.objects.to_string(),
                r.lost.saturating_sub(r.counted_drops).to_string(),
                r.duplicated.to_string(),
                r.counted_drops.to_string(),
                recovery,
                note,
            ]
        }),
    )
}

/// A row's notes cell: its note, or what went wrong.
fn note_cell(note: &str, problems: &[String]) -> String {
    if problems.is_empty() {
        note.to_owned()
    } else {
        format!("FAILED: {}", problems.join("; "))
    }
}

async fn metrics_of(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Polls until `done` holds, returning how long it took (`None` after `limit`).
async fn until(limit: Duration, mut done: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn devices(
    c: &Cluster,
    n: usize,
    seconds: f64,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<ResumedReport>>>> {
    (0..n)
        .map(|d| {
            let mut spec = DeviceSpec::synthetic(
                &format!("device-{d:02}"),
                "chaos",
                RATE,
                seconds,
                100 + d as u64,
            );
            spec.token = c.token(&spec.uid)?;
            // Ten times real time: 40 s of audio in about 4 s.
            spec.speed = 10.0;
            spec.mean_frame_bytes = 1_600;
            let ingest = c.ingests[d % c.ingests.len()].quic;
            let mut config = spillway_ingest::client::ResumeConfig::local(ingest, c.cert.clone());
            config.idle_timeout = Duration::from_secs(2);
            config.max_backoff = Duration::from_secs(1);
            config.give_up_after = Some(Duration::from_secs(180));
            Ok(tokio::spawn(async move {
                run_resuming_device(config, spec, &Progress::hidden()).await
            }))
        })
        .collect()
}

async fn scenario(
    s: &Scenario,
    opts: ClusterOptions,
    n_devices: usize,
    outage: Duration,
    next: Option<&std::path::Path>,
) -> anyhow::Result<Row> {
    let mut c = Cluster::start(opts).await?;
    // The roll takes longer than the other faults: the devices stream through all of it.
    let seconds = match s.run {
        Action::RollingUpgrade => 300.0,
        _ => 40.0,
    };
    let mut row = Row {
        scenario: s.name.to_owned(),
        note: s.note.to_owned(),
        audio_seconds: seconds * n_devices as f64,
        ..Row::default()
    };
    let load = devices(&c, n_devices, seconds)?;
    let spool_empty = |c: &Cluster| {
        let addrs: Vec<_> = c.uploaders.iter().map(|u| u.http).collect();
        async move {
            for addr in addrs {
                let (status, body) = http_get(addr, "/metrics").await.unwrap_or_default();
                if status != 200 || metric(&body, "spillway_uploader_spool_chunks") != 0.0 {
                    return false;
                }
            }
            true
        }
    };
    match s.run {
        Action::KillUploader { times } => {
            let mut worst = Duration::ZERO;
            for _ in 0..times {
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                c.kill(Daemon::Uploader(0)).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let t = Instant::now();
                c.start_daemon(Daemon::Uploader(0)).await?;
                worst = worst.max(t.elapsed());
            }
            row.recovery = Some(worst);
        }
        Action::KillIngest => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            c.kill(Daemon::Ingest(0)).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            c.start_daemon(Daemon::Ingest(0)).await?;
            let addr = c.ingests[0].http;
            until(Duration::from_secs(60), async || {
                metric(
                    &metrics_of(addr).await,
                    "spillway_ingest_chunks_acked_total",
                ) >= 1.0
            })
            .await;
            row.recovery = Some(t.elapsed());
        }
        Action::StoreDown => {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            c.kill(Daemon::Store).await?;
            tokio::time::sleep(outage).await;
            c.start_daemon(Daemon::Store).await?;
            let t = Instant::now();
            row.recovery = after_devices(&c, load, &mut row, t, spool_empty).await?;
            return finish(c, row).await;
        }
        Action::StoreErrors => {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            let flag = spillway_kit::s3::fault_flag(&c.s3_root());
            std::fs::write(&flag, b"")?;
            tokio::time::sleep(outage).await;
            std::fs::remove_file(&flag)?;
            let t = Instant::now();
            row.recovery = after_devices(&c, load, &mut row, t, spool_empty).await?;
            return finish(c, row).await;
        }
        Action::SpoolFull => {
            c.kill(Daemon::Store).await?;
            let addr = c.uploaders[0].http;
            until(Duration::from_secs(60), async || {
                let m = metrics_of(addr).await;
                metric(&m, "spillway_uploader_spool_fill_ratio") > 0.9
            })
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.start_daemon(Daemon::Store).await?;
            let t = Instant::now();
            row.recovery = after_devices(&c, load, &mut row, t, spool_empty).await?;
            let m = metrics_of(c.uploaders[0].http).await;
            row.counted_drops = metric(&m, "spillway_uploader_spool_dropped_chunks_total") as usize;
            return finish(c, row).await;
        }
        Action::ConnectionFlood => {
            let mut flood = Vec::new();
            for _ in 0..200 {
                flood.push(
                    spillway_ingest::client::Device::connect(
                        c.ingests[0].quic,
                        "localhost",
                        &c.cert,
                    )
                    .await?,
                );
            }
            let addr = c.ingests[0].http;
            row.recovery = until(Duration::from_secs(30), async || {
                metric(
                    &metrics_of(addr).await,
                    "spillway_ingest_idle_connections_closed_total",
                ) >= 200.0
            })
            .await;
            if row.recovery.is_none() {
                row.problems
                    .push("ingest did not close the silent connections".into());
            }
            drop(flood);
        }
        Action::DeafDevice => {
            // Speaks the protocol, then never reads what ingest sends and goes silent without
            // finishing: ingest must flush its audio, end the session and not be held by it.
            let deaf =
                spillway_ingest::client::Device::connect(c.ingests[0].quic, "localhost", &c.cert)
                    .await?;
            let (mut tx, _never_read) = deaf.open().await?;
            let mut spec = DeviceSpec::synthetic("deaf", "chaos", RATE, 5.0, 999);
            spec.token = c.token(&spec.uid)?;
            tx.hello(spec.hello()).await?;
            tx.audio(bytes::Bytes::from(
                spec.source.bytes(0, (spec.samples * 2) as usize),
            ))
            .await?;
            let t = Instant::now();
            let addr = c.ingests[0].http;
            row.recovery = until(Duration::from_secs(30), async || {
                let m = metrics_of(addr).await;
                metric(&m, "spillway_ingest_sessions_ended_total{reason=\"idle\"}") >= 1.0
            })
            .await
            .map(|_| t.elapsed());
            if row.recovery.is_none() {
                row.problems
                    .push("ingest never ended the deaf session".into());
            }
            drop((tx, deaf));
        }
        Action::DamagedSpool { flip } => {
            c.kill(Daemon::Store).await?;
            // Let a backlog build up, then kill the uploader and damage its spool.
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            c.kill(Daemon::Uploader(0)).await?;
            spillway_kit::damage::damage_spool(&c.spool_dir(0), flip)?;
            let t = Instant::now();
            c.start_daemon(Daemon::Uploader(0)).await?;
            row.recovery = Some(t.elapsed());
            c.start_daemon(Daemon::Store).await?;
            let t = Instant::now();
            after_devices(&c, load, &mut row, t, spool_empty).await?;
            let m = metrics_of(c.uploaders[0].http).await;
            row.counted_drops = (metric(&m, "spillway_uploader_spool_quarantined_total")
                + metric(&m, "spillway_uploader_spool_lost_chunks_total"))
                as usize;
            return finish(c, row).await;
        }
        Action::UploaderLost => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let flag = spillway_kit::s3::fault_flag(&c.s3_root());
            std::fs::write(&flag, b"")?;
            // Sessions pick uploaders by hash (of addresses that change every run), so the
            // victim is whichever holds the most acknowledged chunks, at least two.
            let addrs: Vec<_> = c.uploaders.iter().map(|u| u.http).collect();
            let mut victim = None;
            until(Duration::from_secs(30), async || {
                let mut most = (0.0, 0);
                for (i, addr) in addrs.iter().enumerate() {
                    let held = metric(&metrics_of(*addr).await, "spillway_uploader_spool_chunks");
                    if held > most.0 {
                        most = (held, i);
                    }
                }
                victim = (most.0 >= 2.0).then_some(most.1);
                victim.is_some()
            })
            .await;
            let Some(victim) = victim else {
                row.problems
                    .push("no uploader held two acknowledged chunks".into());
                return finish(c, row).await;
            };
            c.kill(Daemon::Uploader(victim)).await?;
            std::fs::remove_file(&flag)?;
            let t = Instant::now();
            let ingest = c.ingests[0].http;
            let acked = |m: &str| metric(m, "spillway_ingest_chunks_acked_total");
            let before = acked(&metrics_of(ingest).await);
            row.recovery = until(Duration::from_secs(60), async || {
                acked(&metrics_of(ingest).await) >= before + n_devices as f64
            })
            .await
            .map(|_| t.elapsed());
            // The load goes on through the two others for the whole outage.
            tokio::time::sleep(outage.saturating_sub(t.elapsed())).await;
            let m = metrics_of(ingest).await;
            if metric(&m, "spillway_ingest_forward_failovers_total") < 1.0 {
                row.problems.push("ingest never failed over".into());
            }
            c.start_daemon(Daemon::Uploader(victim)).await?;
        }
        Action::RollingUpgrade => {
            let next = next.context("the rolling upgrade needs the second build")?;
            let t = Instant::now();
            upgrade::roll(&mut c, next, &mut row).await?;
            row.recovery = Some(t.elapsed());
            after_devices(&c, load, &mut row, Instant::now(), spool_empty).await?;
            row.note = format!("{}. {}", row.note, upgrade::devices_saw(&row));
            upgrade::refused_rollback(&mut c, &mut row).await?;
            return finish(c, row).await;
        }
        Action::SigtermDuringLoad => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let t = Instant::now();
            c.terminate(Daemon::Ingest(0)).await?;
            c.start_daemon(Daemon::Ingest(0)).await?;
            c.terminate(Daemon::Uploader(0)).await?;
            c.start_daemon(Daemon::Uploader(0)).await?;
            row.recovery = Some(t.elapsed());
        }
    }
    after_devices(&c, load, &mut row, Instant::now(), spool_empty).await?;
    finish(c, row).await
}

/// Waits for the devices, then for `done` (the spool drained); audits every session into `row`.
/// Returns the time from `since` until `done` held.
async fn after_devices<F, Fut>(
    c: &Cluster,
    load: Vec<tokio::task::JoinHandle<anyhow::Result<ResumedReport>>>,
    row: &mut Row,
    since: Instant,
    done: F,
) -> anyhow::Result<Option<Duration>>
where
    F: Fn(&Cluster) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut reports = Vec::new();
    for d in load {
        match d.await.context("device task")? {
            Ok(r) => {
                row.reconnects += r.report.reconnects;
                for e in &r.report.errors {
                    *row.device_errors
                        .entry(e.code().as_str_name().to_owned())
                        .or_default() += 1;
                }
                reports.push(r);
            }
            Err(e) => row.problems.push(format!("device: {e:#}")),
        }
    }
    let mut recovered = None;
    while since.elapsed() < Duration::from_secs(180) {
        if done(c).await {
            recovered = Some(since.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if recovered.is_none() {
        row.problems.push("the spool never drained".into());
    }
    let s3 = c.s3().await;
    let a = audit_all(&s3, BUCKET, &reports, Duration::from_secs(5)).await?;
    row.acked += a.acked;
    row.objects += a.objects;
    row.lost += a.lost;
    row.duplicated += a.duplicated;
    row.problems.extend(a.ack_problems);
    Ok(recovered)
}

async fn finish(c: Cluster, mut row: Row) -> anyhow::Result<Row> {
    if let Err(e) = c.stop().await {
        row.problems.push(format!("stopping: {e:#}"));
    }
    Ok(row)
}

const BEGIN: &str = "<!-- chaos:begin (written by cargo xtask chaos --record) -->";
const END: &str = "<!-- chaos:end -->";
const OMI_BEGIN: &str = "<!-- chaos-omi:begin (written by cargo xtask chaos --record) -->";
const OMI_END: &str = "<!-- chaos-omi:end -->";

#[cfg(test)]
mod tests {
    use super::{Row, render};
    use std::time::Duration;

    #[test]
    fn the_table_reads_as_recorded_in_chaos_md() {
        let rows = [
            Row {
                scenario: "kill -9 uploader".into(),
                audio_seconds: 599.6,
                acked: 300,
                objects: 300,
                lost: 3,
                duplicated: 0,
                counted_drops: 2,
                recovery: Some(Duration::from_millis(1_234)),
                note: "restarted".into(),
                problems: vec![],
                ..Row::default()
            },
            Row {
                scenario: "x".into(),
                note: "not shown".into(),
                problems: vec!["a".into(), "b".into()],
                ..Row::default()
            },
        ];
        assert_eq!(
            render(&rows),
            "| scenario | audio sent | chunks acked | objects | lost | duplicated | counted | recovered in | notes |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n\
             | kill -9 uploader | 600 s | 300 | 300 | 1 | 0 | 2 | 1.23 s | restarted |\n\
             | x | 0 s | 0 | 0 | 0 | 0 | 0 | - | FAILED: a; b |\n"
        );
    }
}
