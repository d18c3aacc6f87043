//! `cargo xtask attack`: attacks against the real binaries, each beside honest devices, and what
//! they got. Like chaos, every row runs on a fresh cluster of processes on loopback (device
//! tokens and the mutual-TLS link on, as deployed), with four resuming honest devices streaming
//! 40 s of 8 kHz audio at ten times real time while the attack runs; then every honest object is
//! read back. Columns: what the attacker achieved (must be 0), honest audio lost or overwritten
//! (must be 0), the honest acks' latency (p99, from the moment a chunk's last sample was sent),
//! and each daemon's peak RSS.
//!
//! The attacker's traffic comes from 127.0.0.2, the honest devices' from 127.0.0.1, so per-source
//! caps are what they would be on a network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use spillway_ingest::auth::Scope;
use spillway_ingest::client::{Device, ResumeConfig};
use spillway_proto::device::{ServerMessage, server_message::Kind};
use spillway_proto::uploader::{ChunkId, PutChunkRequest, uploader_client::UploaderClient};

use spillway_kit::cluster::{BUCKET, Cluster, ClusterOptions, Daemon};
use spillway_kit::sim::{DeviceSpec, Progress, ResumedReport, audit_all, run_resuming_device};

mod exhaust;

const RATE: u32 = 8_000;
const CHUNK_SECONDS: u32 = 2;
const SPEED: f64 = 10.0;
const SECONDS: f64 = 40.0;
/// Where the attacker's sockets are bound.
const ATTACKER: [u8; 4] = [127, 0, 0, 2];

#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    /// State directory (one folder per row).
    #[arg(long, default_value = ".spillway/attack")]
    pub dir: PathBuf,
    /// Fewer attempts per row (CI's smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Only the rows whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Write the table into this Markdown file (between its attack markers).
    #[arg(long)]
    pub record: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
enum Attack {
    ForgedUid,
    BadTokens,
    StrangerOnTheLink,
    OverwriteOverGrpc,
    OverwriteAsDevice,
    Slowloris,
    ConnectionFlood,
    PutFlood,
    Trickle,
    OmiNoUpgrade,
    FullDisk,
}

const ROWS: [(&str, Attack); 11] = [
    (
        "forged uid (a valid token for another uid)",
        Attack::ForgedUid,
    ),
    ("expired, malformed and wrong-key tokens", Attack::BadTokens),
    (
        "gRPC without a certificate, with another CA's, in plaintext",
        Attack::StrangerOnTheLink,
    ),
    (
        "overwrite acknowledged chunks over gRPC (a rogue pod with ingest's certificate)",
        Attack::OverwriteOverGrpc,
    ),
    (
        "overwrite acknowledged chunks as the device (a stolen token, the same session)",
        Attack::OverwriteAsDevice,
    ),
    (
        "hellos never sent: 16 connections x 32 streams",
        Attack::Slowloris,
    ),
    ("connection flood: 400 connections", Attack::ConnectionFlood),
    (
        "PutChunk flood from a rogue ingest: 16 trickling, then 48 at once",
        Attack::PutFlood,
    ),
    (
        "trickling sessions under a gateway token: one sample per 500 ms each",
        Attack::Trickle,
    ),
    (
        "Omi connections never upgraded: 16 silent or trickling headers",
        Attack::OmiNoUpgrade,
    ),
    (
        "the spool's disk filled by another tenant for 3 s",
        Attack::FullDisk,
    ),
];

/// One row of the table.
#[derive(Debug, Default)]
struct Row {
    name: String,
    attempts: u64,
    /// What the attacker got that it must not (0 in a passing row).
    achieved: u64,
    what: String,
    honest_lost: usize,
    honest_duplicated: usize,
    honest_p99: Option<Duration>,
    ingest_rss: u64,
    uploader_rss: u64,
    problems: Vec<String>,
}

pub async fn attack(args: AttackArgs) -> anyhow::Result<()> {
    let bin = spillway_kit::cluster::build_daemons(false)?;
    let mut rows = Vec::new();
    for (i, (name, attack)) in ROWS.into_iter().enumerate() {
        if args.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        eprintln!("== {name}");
        let dir = args.dir.join(format!("{i:02}"));
        let spool = dir.join("spool-0");
        exhaust::unmount(&spool);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        if matches!(attack, Attack::FullDisk)
            && let Err(e) = exhaust::mount_spool_disk(&spool)
        {
            eprintln!("   skipped: {e:#}");
            rows.push(Row {
                name: name.to_owned(),
                what: format!(
                    "skipped: a disk to fill needs a tmpfs mount, which needs root: {e:#}"
                ),
                ..Row::default()
            });
            continue;
        }
        let opts = ClusterOptions {
            dir,
            bin: bin.clone(),
            chunk_seconds: CHUNK_SECONDS,
            workers: 8,
            uploaders: 1,
            ingests: 1,
            uploader_args: ["--max-puts-in-flight", "16", "--put-timeout", "5s"]
                .map(String::from)
                .to_vec(),
            ingest_args: [
                "--max-sessions",
                "64",
                "--max-connections",
                "256",
                "--max-connections-per-ip",
                "16",
                "--hello-timeout",
                "2s",
                "--chunk-fill-timeout",
                "4s",
            ]
            .map(String::from)
            .to_vec(),
            device_auth: true,
            store_tls: false,
        };
        let row = tokio::time::timeout(
            Duration::from_secs(300),
            run_row(name, attack, opts, args.quick),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish in time")))
        .unwrap_or_else(|e| Row {
            name: name.to_owned(),
            problems: vec![format!("{e:#}")],
            ..Row::default()
        });
        if matches!(attack, Attack::FullDisk) {
            exhaust::unmount(&spool);
        }
        eprintln!("   {row:?}");
        rows.push(row);
    }
    let table = render(&rows);
    println!("{table}");
    if let Some(path) = &args.record {
        crate::report::write_between_markers(
            path,
            "<!-- attack:begin (written by cargo xtask attack --record) -->",
            "<!-- attack:end -->",
            &table,
        )?;
    }
    let failed: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.achieved > 0 || r.honest_lost > 0 || r.honest_duplicated > 0 || !r.problems.is_empty()
        })
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} attack row(s) failed: {:?}",
        failed.len(),
        failed.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    Ok(())
}

fn render(rows: &[Row]) -> String {
    use crate::report::Align::{Left, Right};
    let columns = [
        ("attack", Left),
        ("attempts", Right),
        ("attacker achieved", Left),
        ("honest audio lost / overwritten", Right),
        ("honest ack p99", Right),
        ("ingest peak RSS", Right),
        ("uploader peak RSS", Right),
    ];
    crate::report::table(
        &columns,
        rows.iter().map(|r| {
            let p99 = r
                .honest_p99
                .map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
            let problems = if r.problems.is_empty() {
                String::new()
            } else {
                format!(" **problems:** {}", r.problems.join("; "))
            };
            vec![
                r.name.clone(),
                r.attempts.to_string(),
                format!("{} ({}){problems}", r.achieved, r.what),
                (r.honest_lost + r.honest_duplicated).to_string(),
                p99,
                format!("{} MiB", r.ingest_rss >> 20),
                format!("{} MiB", r.uploader_rss >> 20),
            ]
        }),
    )
}

fn honest(
    c: &Cluster,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<ResumedReport>>>> {
    (0..4u64)
        .map(|d| {
            let mut spec =
                DeviceSpec::synthetic(&format!("honest-{d}"), "walk", RATE, SECONDS, 700 + d);
            spec.token = c.token(&spec.uid)?;
            spec.speed = SPEED;
            spec.mean_frame_bytes = 1_600;
            let mut config = ResumeConfig::local(c.ingests[0].quic, c.cert.clone());
            config.give_up_after = Some(Duration::from_secs(120));
            Ok(tokio::spawn(async move {
                run_resuming_device(config, spec, &Progress::hidden()).await
            }))
        })
        .collect()
}

/// Each ack's latency: its arrival less the moment its last sample was sent (the producer is
/// paced at `SPEED` times real time from the session's start).
fn latencies(r: &ResumedReport) -> Vec<Duration> {
    r.report
        .acks
        .iter()
        .zip(&r.report.acked_at)
        .map(|(a, at)| {
            let sent = Duration::from_secs_f64(a.end_sample as f64 / f64::from(RATE) / SPEED);
            at.saturating_sub(sent)
        })
        .collect()
}

/// A device connection from the attacker's address.
async fn attacker_device(c: &Cluster) -> anyhow::Result<Device> {
    let socket = std::net::UdpSocket::bind(SocketAddr::from((ATTACKER, 0)))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Device::connect_on(&endpoint, c.ingests[0].quic, "localhost", &c.cert).await
}

fn hello(uid: &str, session: &str, token: String) -> spillway_proto::device::Hello {
    let mut h = DeviceSpec::synthetic(uid, session, RATE, 1.0, 1).hello();
    h.token = token;
    h
}

/// Sends `hello` on a new stream of `device`: true when ingest accepted the session.
async fn accepted(device: &Device, hello: spillway_proto::device::Hello) -> bool {
    let Ok((mut tx, mut rx)) = device.open().await else {
        return false;
    };
    if tx.hello(hello).await.is_err() {
        return false;
    }
    let first: Option<ServerMessage> = rx.next().await.ok().flatten();
    matches!(first.and_then(|m| m.kind), Some(Kind::Accepted(_)))
}

async fn run_row(
    name: &str,
    attack: Attack,
    opts: ClusterOptions,
    quick: bool,
) -> anyhow::Result<Row> {
    let c = Cluster::start(opts).await?;
    let mut row = Row {
        name: name.to_owned(),
        ..Row::default()
    };
    let n = if quick { 20 } else { 100 };
    let load = honest(&c)?;
    // The attacks that need the honest audio stored first wait for it; the others run beside it.
    let (attempts, achieved, what) = match attack {
        Attack::OverwriteOverGrpc | Attack::OverwriteAsDevice => {
            let reports = wait_honest(&c, load, &mut row).await?;
            let r = overwrite(&c, attack, &reports).await?;
            audit(&c, &reports, &mut row).await?;
            r
        }
        _ => {
            let r = beside(&c, attack, n).await?;
            let reports = wait_honest(&c, load, &mut row).await?;
            audit(&c, &reports, &mut row).await?;
            r
        }
    };
    row.attempts = attempts;
    row.achieved = achieved;
    row.what = what;
    if let Some(pid) = c.pid(Daemon::Ingest(0)) {
        row.ingest_rss = crate::bench::rss(pid)?.0;
    }
    if let Some(pid) = c.pid(Daemon::Uploader(0)) {
        row.uploader_rss = crate::bench::rss(pid)?.0;
    }
    if let Err(e) = c.stop().await {
        row.problems.push(format!("stopping: {e:#}"));
    }
    Ok(row)
}

/// Waits for the honest devices and the spool to empty; records their ack latencies.
async fn wait_honest(
    c: &Cluster,
    load: Vec<tokio::task::JoinHandle<anyhow::Result<ResumedReport>>>,
    row: &mut Row,
) -> anyhow::Result<Vec<ResumedReport>> {
    let mut reports = Vec::new();
    let mut all = Vec::new();
    for d in load {
        match d.await.context("device task")? {
            Ok(r) => {
                all.extend(latencies(&r));
                reports.push(r);
            }
            Err(e) => row.problems.push(format!("honest device: {e:#}")),
        }
    }
    all.sort();
    row.honest_p99 = all
        .get((all.len() * 99 / 100).min(all.len().saturating_sub(1)))
        .copied();
    let addr = c.uploaders[0].http;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = spillway_kit::pipeline::http_get(addr, "/metrics")
            .await
            .unwrap_or_default();
        // The devices are done: everything acknowledged is spooled; empty means uploaded.
        if spillway_kit::metrics::metric(&body, "spillway_uploader_spool_chunks") == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            row.problems.push("the spool never drained".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(reports)
}

/// Reads every honest object back: each must hold exactly the audio sent.
async fn audit(c: &Cluster, reports: &[ResumedReport], row: &mut Row) -> anyhow::Result<()> {
    let s3 = c.s3().await;
    let a = audit_all(&s3, BUCKET, reports, Duration::from_secs(5)).await?;
    row.honest_lost += a.lost;
    row.honest_duplicated += a.duplicated;
    row.problems.extend(a.ack_problems);
    Ok(())
}

/// The attacks that run while the honest devices stream: (attempts, achieved, what).
async fn beside(c: &Cluster, attack: Attack, n: u64) -> anyhow::Result<(u64, u64, String)> {
    let victim = "honest-0";
    match attack {
        Attack::ForgedUid => {
            let device = attacker_device(c).await?;
            let mine = c.token("mallory")?;
            let mut got = 0;
            for i in 0..n {
                got += u64::from(
                    accepted(&device, hello(victim, &format!("f{i}"), mine.clone())).await,
                );
            }
            Ok((n, got, "sessions accepted as the victim".into()))
        }
        Attack::BadTokens => {
            let device = attacker_device(c).await?;
            let expired = c.token_until(victim, 1)?;
            let other = spillway_ingest::auth::Keyring::parse(
                &spillway_ingest::auth::token::new_key_line("k1")?,
            )?;
            let wrong_key = other.issue(None, &Scope::Uid(victim.into()), u64::from(u32::MAX))?;
            let mut got = 0;
            for i in 0..n {
                for token in [
                    expired.clone(),
                    format!("spw1.k1.{i}.garbage"),
                    wrong_key.clone(),
                ] {
                    got +=
                        u64::from(accepted(&device, hello(victim, &format!("b{i}"), token)).await);
                }
            }
            Ok((3 * n, got, "sessions accepted".into()))
        }
        Attack::StrangerOnTheLink => {
            let addr = c.uploaders[0].grpc;
            let other = spillway_kit::pki::DevPki::generate()?;
            let forged = spillway_proto::link::LinkTls::from_pem(
                c.pki.ca.as_bytes(),
                other.ingest.cert.as_bytes(),
                other.ingest.key.as_bytes(),
            );
            let no_cert = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&c.pki.ca))
                .domain_name("localhost");
            let mut got = 0;
            for i in 0..n {
                let channel = match i % 3 {
                    0 => spillway_kit::pipeline::uploader_channel(addr, Some(&forged)).await,
                    1 => spillway_kit::pipeline::uploader_channel(addr, None).await,
                    _ => {
                        async {
                            Ok(
                                tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                                    .tls_config(no_cert.clone())?
                                    .connect()
                                    .await?,
                            )
                        }
                        .await
                    }
                };
                if let Ok(channel) = channel {
                    let put = put_request(victim, "walk", 0, &[9; 32_000]);
                    got += u64::from(UploaderClient::new(channel).put_chunk(put).await.is_ok());
                }
            }
            Ok((n, got, "puts answered".into()))
        }
        Attack::Slowloris => {
            let (mut held, mut devices) = (Vec::new(), Vec::new());
            for _ in 0..16 {
                let Ok(device) = attacker_device(c).await else {
                    continue;
                };
                for _ in 0..32 {
                    if let Ok((mut tx, rx)) = device.open().await {
                        let _ = tx.raw(&[0, 0]).await;
                        held.push((tx, rx));
                    }
                }
                devices.push(device);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop((held, devices));
            let sessions = metric_of(
                c.ingests[0].http,
                "spillway_ingest_refusals_total{code=\"OVERLOADED\"}",
            )
            .await;
            Ok((16 * 32, sessions as u64, "honest sessions refused".into()))
        }
        Attack::ConnectionFlood => {
            let mut conns = Vec::new();
            let mut admitted = 0u64;
            for _ in 0..400 {
                let attempt =
                    tokio::time::timeout(Duration::from_secs(2), attacker_device(c)).await;
                if let Ok(Ok(d)) = attempt {
                    admitted += 1;
                    conns.push(d);
                }
            }
            let beyond = admitted.saturating_sub(16);
            drop(conns);
            Ok((
                400,
                beyond,
                format!("connections beyond the per-IP cap of 16; {admitted} admitted"),
            ))
        }
        Attack::PutFlood => {
            // A rogue ingest holds every slot with puts whose bodies never come, then floods:
            // while the slots are held, not one more call may be served.
            let channel = spillway_kit::pipeline::uploader_channel(
                c.uploaders[0].grpc,
                Some(&c.pki.ingest_tls()),
            )
            .await?;
            let holders: Vec<_> = (0..16)
                .map(|_| tokio::spawn(spillway_kit::rogue::trickling_put(channel.clone())))
                .collect();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let tls = c.pki.ingest_tls();
            let mut calls = tokio::task::JoinSet::new();
            for i in 0..48u64 {
                let tls = tls.clone();
                let addr = c.uploaders[0].grpc;
                calls.spawn(async move {
                    let channel =
                        spillway_kit::pipeline::uploader_channel(addr, Some(&tls)).await?;
                    let pcm = vec![(i % 251) as u8; 2 * RATE as usize * CHUNK_SECONDS as usize];
                    let put = put_request("flood", &format!("s{i}"), 0, &pcm);
                    anyhow::Ok(
                        UploaderClient::new(channel)
                            .put_chunk(put)
                            .await
                            .map_err(|s| s.code()),
                    )
                });
            }
            let (mut served, mut refused) = (0u64, 0u64);
            while let Some(r) = calls.join_next().await {
                match r? {
                    Ok(Ok(_)) => served += 1,
                    Ok(Err(tonic::Code::ResourceExhausted)) => refused += 1,
                    _ => {}
                }
            }
            for h in holders {
                let _ = h.await;
            }
            Ok((
                64,
                served,
                format!(
                    "calls served beyond --max-puts-in-flight; {refused} refused at once, 16 trickling ones timed out"
                ),
            ))
        }
        Attack::Trickle => exhaust::trickle(c, if n < 100 { 16 } else { 48 }).await,
        Attack::OmiNoUpgrade => exhaust::omi_no_upgrade(c, 16).await,
        Attack::FullDisk => exhaust::full_disk(c, Duration::from_secs(3)).await,
        Attack::OverwriteOverGrpc | Attack::OverwriteAsDevice => Ok((0, 0, String::new())),
    }
}

/// Puts other audio under every acknowledged honest chunk id, by the device path or over gRPC:
/// (attempts, originals replaced, what). Conflicts are counted by the uploader.
async fn overwrite(
    c: &Cluster,
    attack: Attack,
    reports: &[ResumedReport],
) -> anyhow::Result<(u64, u64, String)> {
    let mut attempts = 0;
    match attack {
        Attack::OverwriteOverGrpc => {
            let channel = spillway_kit::pipeline::uploader_channel(
                c.uploaders[0].grpc,
                Some(&c.pki.ingest_tls()),
            )
            .await?;
            for r in reports {
                for ack in &r.report.acks {
                    let len = ((ack.end_sample - ack.first_sample) * 2) as usize;
                    let mut put =
                        put_request(&r.spec.uid, &r.spec.session, ack.seq, &vec![0x5a; len]);
                    put.first_sample = ack.first_sample;
                    attempts += 1;
                    let _ = UploaderClient::new(channel.clone()).put_chunk(put).await;
                }
            }
        }
        _ => {
            let victim = &reports[0];
            let mut spec =
                DeviceSpec::synthetic(&victim.spec.uid, &victim.spec.session, RATE, SECONDS, 9_999);
            spec.token = c.token(&victim.spec.uid)?;
            let config = ResumeConfig::local(c.ingests[0].quic, c.cert.clone());
            attempts = victim.report.acks.len() as u64;
            let _ = run_resuming_device(config, spec, &Progress::hidden()).await;
        }
    }
    // Let the drain take the attacker's chunks (each to a conflict key, never the original).
    let addr = c.uploaders[0].http;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_of(addr, "spillway_uploader_spool_chunks").await > 0.0 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conflicts = metric_of(addr, "spillway_uploader_upload_conflicts_total").await;
    // The audit that follows counts any original replaced as lost.
    Ok((
        attempts,
        0,
        format!("originals replaced; {conflicts} copies set aside as conflicts"),
    ))
}

fn put_request(uid: &str, session: &str, seq: u64, pcm: &[u8]) -> PutChunkRequest {
    let chunk_samples = u64::from(RATE) * u64::from(CHUNK_SECONDS);
    PutChunkRequest {
        id: Some(ChunkId {
            uid: uid.into(),
            session: session.into(),
            seq,
        }),
        sample_rate: RATE,
        chunk_samples,
        first_sample: seq * chunk_samples,
        crc32c: spillway_proto::checksum::crc32c(pcm),
        pcm: Bytes::copy_from_slice(pcm),
        ..Default::default()
    }
}

async fn metric_of(addr: SocketAddr, series: &str) -> f64 {
    let (_, body) = spillway_kit::pipeline::http_get(addr, "/metrics")
        .await
        .unwrap_or_default();
    spillway_kit::metrics::metric(&body, series)
}

#[cfg(test)]
mod tests {
    use super::{Row, render};
    use std::time::Duration;

    #[test]
    fn the_table_reads_as_recorded_in_attacks_md() {
        let rows = [
            Row {
                name: "forged token".into(),
                attempts: 40,
                achieved: 0,
                what: "sessions opened".into(),
                honest_lost: 0,
                honest_duplicated: 0,
                honest_p99: Some(Duration::from_micros(12_400)),
                ingest_rss: (50 << 20) + 5,
                uploader_rss: 80 << 20,
                problems: vec![],
            },
            Row {
                name: "y".into(),
                honest_lost: 1,
                honest_duplicated: 2,
                problems: vec!["p1".into()],
                ..Row::default()
            },
        ];
        assert_eq!(
            render(&rows),
            "| attack | attempts | attacker achieved | honest audio lost / overwritten | honest ack p99 | ingest peak RSS | uploader peak RSS |\n\
             | --- | ---: | --- | ---: | ---: | ---: | ---: |\n\
             | forged token | 40 | 0 (sessions opened) | 0 | 12 ms | 50 MiB | 80 MiB |\n\
             | y | 0 | 0 () **problems:** p1 | 3 | - | 0 MiB | 0 MiB |\n"
        );
    }
}
