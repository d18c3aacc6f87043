//! The rolling-upgrade row: a cluster of two uploaders and two ingests taken, one daemon at a
//! time and under load, through a release's whole life as deploy/README.md tells it, onto a
//! second build of the same tree whose spool format is one newer (the uploader's test-only
//! `spool-format-next` feature):
//!
//! 1. the uploaders (highest ordinal first), then the ingests, onto the second build, its
//!    uploaders pinned to today's format (`--spool-format 2`);
//! 2. one uploader rolled back to the first build (it opens the pinned spool) and forward again;
//! 3. the pin removed, uploader by uploader (their spools are marked format 3);
//! 4. after the audit, one uploader rolled back to the first build once more: it must refuse
//!    the newer spool and leave every byte of it as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use spillway_kit::cluster::{Cluster, Daemon, UPLOADER_ENV};
use spillway_kit::metrics::metric;

use super::{Row, metrics_of, until};

/// What the second build's uploaders run with until the release is final.
const PIN: [&str; 2] = ["--spool-format", "2"];

/// Steps 1 to 3 above; what did not hold goes into `row.problems`.
pub(super) async fn roll(c: &mut Cluster, next: &Path, row: &mut Row) -> anyhow::Result<()> {
    let first = c.opts.bin.clone();
    // Sessions open on every daemon before the first one goes.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Highest ordinal first, as a StatefulSet rolls.
    let uploaders: Vec<usize> = (0..c.uploaders.len()).rev().collect();
    for &i in &uploaders {
        restart(c, Daemon::Uploader(i), next, &PIN, row).await?;
        expect_format(c, i, 2, row).await;
    }
    for i in 0..c.ingests.len() {
        restart(c, Daemon::Ingest(i), next, &[], row).await?;
    }
    let canary = uploaders[0];
    restart(c, Daemon::Uploader(canary), &first, &[], row).await?;
    expect_format(c, canary, 2, row).await;
    restart(c, Daemon::Uploader(canary), next, &PIN, row).await?;
    for &i in &uploaders {
        restart(c, Daemon::Uploader(i), next, &[], row).await?;
        expect_format(c, i, 3, row).await;
    }
    Ok(())
}

/// SIGTERM (as Kubernetes stops a pod), then `d` started where it ran from the binaries in `bin`
/// with `args`; it must serve again (an uploader store a chunk, an ingest acknowledge one)
/// before the next step.
async fn restart(
    c: &mut Cluster,
    d: Daemon,
    bin: &Path,
    args: &[&str],
    row: &mut Row,
) -> anyhow::Result<()> {
    c.terminate(d).await?;
    c.roll(d, bin, args)?;
    c.start_daemon(d).await?;
    let (http, series, what) = match d {
        Daemon::Uploader(i) => (
            c.uploaders[i].http,
            "spillway_uploader_puts_total{result=\"stored\"}",
            "stored no chunk",
        ),
        Daemon::Ingest(i) => (
            c.ingests[i].http,
            "spillway_ingest_chunks_acked_total",
            "acknowledged nothing",
        ),
        Daemon::Store => anyhow::bail!("the store is not rolled"),
    };
    // A fresh process counts from 0: ingest found the uploader again (its breaker closed), or
    // the ingest's devices came back and resumed.
    let served = until(Duration::from_secs(30), async || {
        metric(&metrics_of(http).await, series) >= 1.0
    })
    .await;
    if served.is_none() {
        row.problems.push(format!(
            "{d:?} from {} {args:?} {what} within 30 s",
            bin.display()
        ));
    }
    Ok(())
}

/// Uploader `i`'s spool is marked `format`, and its metric says so.
async fn expect_format(c: &Cluster, i: usize, format: u32, row: &mut Row) {
    let marked = std::fs::read_to_string(c.spool_dir(i).join("FORMAT")).unwrap_or_default();
    if marked.trim_end() != format!("spillway-spool {format}") {
        row.problems.push(format!(
            "uploader {i}'s spool is marked {marked:?}, not format {format}"
        ));
    }
    let m = metrics_of(c.uploaders[i].http).await;
    if metric(&m, "spillway_uploader_spool_format") != f64::from(format) {
        row.problems.push(format!(
            "uploader {i} does not report spool format {format}"
        ));
    }
}

/// What the devices went through, for the row's note: "Devices saw N reconnection attempts and
/// SHUTTING_DOWN xK" (the errors by code).
pub(super) fn devices_saw(row: &Row) -> String {
    let errors: Vec<_> = row
        .device_errors
        .iter()
        .map(|(code, n)| format!("{code} x{n}"))
        .collect();
    format!(
        "Devices saw {} reconnection attempts and {}",
        row.reconnects,
        if errors.is_empty() {
            "no error".to_owned()
        } else {
            errors.join(", ")
        }
    )
}

/// Step 4: stops uploader 0 (on the second build, its spool drained and marked format 3) and
/// starts the first build's uploader on the same spool with the same flags: it must exit with the
/// newer-format error and leave every file of the spool byte for byte as it was. Uploader 0 is
/// then started again on the second build.
pub(super) async fn refused_rollback(c: &mut Cluster, row: &mut Row) -> anyhow::Result<()> {
    let d = Daemon::Uploader(0);
    c.terminate(d).await?;
    let spool = c.spool_dir(0);
    let before = snapshot(&spool)?;
    let log = c.logs.join("uploader-rollback.log");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(c.opts.bin.join("uploader"))
            .args(c.uploader_args(0)?)
            .envs(UPLOADER_ENV)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the first build's uploader neither started nor refused within 30 s")??;
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    std::fs::write(&log, &said).with_context(|| format!("writing {}", log.display()))?;
    if output.status.success() || !said.contains("is format 3, newer than this uploader reads") {
        row.problems.push(format!(
            "the first build's uploader on a format-3 spool did not refuse it ({}); see {}",
            output.status,
            log.display()
        ));
    }
    if snapshot(&spool)? != before {
        row.problems
            .push("the refused rollback changed the spool's files".into());
    }
    c.start_daemon(d).await
}

/// Every file under `dir` with its bytes, in path order.
fn snapshot(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    Ok(files)
}
