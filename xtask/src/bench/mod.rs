//! `cargo xtask bench`: Spillway's figures, each next to a baseline measured in the same run on
//! the same machine, so the ratio holds on a noisy 2-core VM where absolute numbers do not.
//!
//! Everything runs on loopback against the embedded S3 server (its files on tmpfs, so the local
//! disk serves the spool alone), with the release binaries as separate processes. `--quick` is a
//! smoke run (CI keeps the harness from rotting; it asserts nothing about speed). Results go to
//! `<target>/bench/results.json` and, with `--record`, into BENCHMARKS.md.
//!
//! - [`store`]: the drain against raw `PutObject` (rows 1, 2, adaptive workers).
//! - [`spool`]: `PutChunk` commits against append + `fdatasync`, uploader memory, recovery.
//! - [`ingest`]: ingest against raw QUIC, real-time devices, ingest memory, ack latency.

pub mod ingest;
pub mod plot;
pub mod spool;
pub mod store;
mod throttle;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde::Serialize;

use spillway_kit::cluster::{Proc, free_tcp, wait_tcp};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A smoke run: small sizes, few points, about two minutes. Its figures mean little.
    #[arg(long)]
    pub quick: bool,
    /// Run only the groups whose name contains one of these (comma-separated): store, spool,
    /// ingest. Row 4b's ceiling needs spool, so `--only spool,ingest` for it alone.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also write the table into this Markdown file (between bench markers).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// State directory for spools and logs: on the disk under test.
    #[arg(long, default_value = ".spillway/bench")]
    pub dir: PathBuf,
    /// Where the store keeps its objects: tmpfs, so the disk serves the spool alone.
    #[arg(long, default_value = "/dev/shm/spillway-bench")]
    pub store_dir: PathBuf,
    /// Latency the store adds to every request in the worker sweep.
    #[arg(long, default_value = "30ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Limit writes to the disk under `--dir` to this many MB/s for the whole run, daemons and
    /// baselines alike (a cgroup; Linux, as root): the ~40 MB/s volume row 4b's goal assumes.
    /// `--record` then writes a table of its own.
    #[arg(long, value_name = "MB_PER_S")]
    pub disk_mb_s: Option<f64>,
    /// The A/B of what trust costs: the ingest → uploader link in plaintext and ingest with
    /// `--auth none` (baselines in plaintext too), as before the trust work. Not how to deploy.
    /// `--record` then writes a table of its own.
    #[arg(long)]
    pub insecure: bool,
    /// The store over plain HTTP, every body signed with its SHA-256 (as before the uploader
    /// sent `UNSIGNED-PAYLOAD` over TLS): the A/B of what the body hash costs. By default the
    /// store serves HTTPS with a throwaway certificate, as S3 does. `--record` then writes a
    /// table of its own.
    #[arg(long)]
    pub plain_store: bool,
    /// Set when `cargo xtask bench` runs itself again as the release build.
    #[arg(long, hide = true)]
    pub in_release: bool,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub what: String,
    pub unit: String,
    pub spillway: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub goal: String,
    /// Whether the goal was met (`None`: no goal, or not measurable in this mode).
    pub met: Option<bool>,
    pub note: String,
}

impl Row {
    /// A row whose goal is `ratio >= min` (Spillway over the baseline, higher is better).
    pub fn ratio_at_least(
        id: &str,
        what: &str,
        unit: &str,
        spillway: f64,
        baseline: f64,
        min: f64,
    ) -> Self {
        let ratio = if baseline > 0.0 {
            spillway / baseline
        } else {
            0.0
        };
        Self {
            id: id.into(),
            what: what.into(),
            unit: unit.into(),
            spillway,
            baseline: Some(baseline),
            ratio: Some(ratio),
            goal: format!("≥ {min}"),
            met: Some(ratio >= min),
            note: String::new(),
        }
    }

    /// A row whose goal is `ratio <= max` (Spillway over the baseline, lower is better).
    pub fn ratio_at_most(
        id: &str,
        what: &str,
        unit: &str,
        spillway: f64,
        baseline: f64,
        max: f64,
    ) -> Self {
        let mut row = Self::ratio_at_least(id, what, unit, spillway, baseline, 0.0);
        let ratio = row.ratio.unwrap_or(f64::INFINITY);
        row.goal = format!("≤ {max}");
        row.met = Some(baseline > 0.0 && ratio <= max);
        row
    }

    /// A row with a goal of its own.
    pub fn figure(id: &str, what: &str, unit: &str, spillway: f64, goal: &str, met: bool) -> Self {
        Self {
            id: id.into(),
            what: what.into(),
            unit: unit.into(),
            spillway,
            baseline: None,
            ratio: None,
            goal: goal.into(),
            met: Some(met),
            note: String::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// Everything a run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub mode: String,
    pub machine: String,
    pub rows: Vec<Row>,
    /// The worker sweep: (workers, Spillway MB/s, raw PutObject MB/s).
    pub sweep: Vec<(usize, f64, f64)>,
    /// `--workers auto` in the sweep's conditions: MB/s and the limit it settled at.
    pub auto: Option<(f64, f64)>,
    /// The limits `--workers auto` went through, in order (its trajectory on the plot).
    pub auto_path: Vec<f64>,
    /// Raw append + fdatasync MB/s (row 3's baseline), the disk-bound ceiling's numerator.
    #[serde(skip)]
    pub disk_mb_s: Option<f64>,
    /// Raw PutObject MB/s at 16 workers without latency (row 1's baseline).
    #[serde(skip)]
    pub put_mb_s: Option<f64>,
    /// CPU seconds per MB of the floor's parts, each measured alone (row 4c's baseline).
    #[serde(skip)]
    pub floor: FloorCpu,
}

/// CPU seconds per MB of what carrying audio to a store cannot avoid, each part measured alone
/// in the run: receiving it over QUIC (the raw quinn sink of row 4), appending and
/// `fdatasync`ing it (row 3's baseline), and `PutObject`ing it (row 1's client).
#[derive(Debug, Default, Clone, Copy)]
pub struct FloorCpu {
    pub quic: Option<f64>,
    pub disk: Option<f64>,
    pub put: Option<f64>,
}

impl FloorCpu {
    /// The sum, once every part was measured.
    pub fn per_mb(&self) -> Option<f64> {
        Some(self.quic? + self.disk? + self.put?)
    }
}

/// CPU time (user + system) process `pid` has used so far, in seconds (`/proc/PID/stat`'s
/// utime and stime, in USER_HZ, 100 per second on Linux).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("/proc/{pid}/stat has no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line; the 12th and 13th after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    Ok((tick(11)? + tick(12)?) as f64 / 100.0)
}

/// The machine and the run's environment, shared by every group.
#[derive(Debug, Clone)]
pub struct Env {
    pub quick: bool,
    /// Release binaries: `ingest`, `uploader`, `xtask`.
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub store_dir: PathBuf,
    pub latency: Duration,
    /// The ingest → uploader link's PKI: every daemon and client of the run uses mutual TLS,
    /// as deploy/ does.
    pub pki: spillway_kit::pki::DevPki,
    pub pki_files: spillway_kit::pki::PkiFiles,
    /// `--insecure`: plaintext link, `--auth none`.
    pub insecure: bool,
    /// `--plain-store`: the store over plain HTTP (signed bodies).
    pub plain_store: bool,
}

impl Env {
    /// The uploader's link flags.
    pub fn uploader_link_args(&self) -> Vec<String> {
        if self.insecure {
            vec!["--insecure-internal".into()]
        } else {
            self.pki_files.uploader_args()
        }
    }

    /// Ingest's link and device-auth flags, and the URL of `uploader`.
    pub fn ingest_link_args(&self, uploader: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
        Ok(if self.insecure {
            vec![
                "--insecure-internal".into(),
                "--auth".into(),
                "none".into(),
                "--uploader".into(),
                format!("http://{uploader}"),
            ]
        } else {
            let mut args = self.pki_files.ingest_args();
            args.extend([
                "--auth".into(),
                "token".into(),
                "--token-keys".into(),
                ingest::token_keys(self)?.display().to_string(),
                "--uploader".into(),
                format!("https://{uploader}"),
            ]);
            args
        })
    }

    /// A gRPC client's TLS for the uploader; `None` in plaintext.
    pub fn client_tls(&self) -> Option<spillway_proto::link::LinkTls> {
        (!self.insecure).then(|| self.pki.ingest_tls())
    }
}

/// The benchmark's groups, in the order they run.
const GROUPS: [&str; 3] = ["store", "spool", "ingest"];

/// Whether `--only` selects `group`.
fn wanted(only: &[String], group: &str) -> bool {
    only.is_empty() || only.iter().any(|o| group.contains(o.as_str()))
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(o) = args
        .only
        .iter()
        .find(|o| !GROUPS.iter().any(|g| g.contains(o.as_str())))
    {
        anyhow::bail!(
            "--only {o:?} names no group; the groups are {}",
            GROUPS.join(", ")
        );
    }
    if !args.in_release {
        // Measure optimized code: build the release binaries and run this command again as
        // the release `xtask`.
        let bin = spillway_kit::cluster::build_daemons(true)?;
        let mut cmd = std::process::Command::new(bin.join("xtask"));
        cmd.arg("bench").arg("--in-release");
        cmd.args(std::env::args_os().skip(2));
        let status = cmd.status().context("running the release xtask")?;
        ensure!(status.success(), "the benchmark failed ({status})");
        return Ok(());
    }
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let bin = me
        .parent()
        .context("the xtask binary has no directory")?
        .to_owned();
    let target = bin.parent().context("no target directory")?.to_owned();
    for d in [&args.dir, &args.store_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
        }
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let dir = std::fs::canonicalize(&args.dir)?;
    // Before any daemon starts: they inherit the limit.
    let throttle = args
        .disk_mb_s
        .map(|mb| throttle::limit_writes(&dir, mb))
        .transpose()?;
    let pki = spillway_kit::pki::DevPki::generate()?;
    let pki_files = pki.write(&dir)?;
    let env = Env {
        pki,
        pki_files,
        insecure: args.insecure,
        plain_store: args.plain_store,
        quick: args.quick,
        bin,
        logs: dir.join("logs"),
        dir,
        store_dir: std::fs::canonicalize(&args.store_dir)?,
        latency: args.latency,
    };
    std::fs::create_dir_all(&env.logs)?;
    let out = target.join("bench");
    std::fs::create_dir_all(&out)?;
    let mut machine = machine();
    if let (Some(t), Some(mb)) = (&throttle, args.disk_mb_s) {
        machine.push_str(&format!(
            ", writes to disk {} limited to {mb} MB/s",
            t.device
        ));
    }
    if args.insecure {
        machine.push_str(", link in plaintext and --auth none (the A/B of what trust costs)");
    }
    machine.push_str(if args.plain_store {
        ", store over plain HTTP (bodies signed with their SHA-256)"
    } else {
        ", store over HTTPS (UNSIGNED-PAYLOAD, the CRC32C checked by the store)"
    });
    let mut results = Results {
        mode: if args.quick { "quick" } else { "full" }.into(),
        machine,
        ..Results::default()
    };
    eprintln!("machine: {}", results.machine);
    let wanted = |group: &str| wanted(&args.only, group);
    if wanted("store") {
        store::run(&env, &mut results, &out).await?;
    }
    if wanted("spool") {
        spool::run(&env, &mut results).await?;
    }
    if wanted("ingest") {
        ingest::run(&env, &mut results).await?;
    }
    let table = render(&results.rows);
    println!("{table}");
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("results: {}", json.display());
    if let Some(path) = &args.record {
        let mut command = String::from("cargo xtask bench");
        if args.quick {
            command.push_str(" --quick");
        }
        if !args.only.is_empty() {
            command.push_str(&format!(" --only {}", args.only.join(",")));
        }
        if let Some(mb) = args.disk_mb_s {
            command.push_str(&format!(" --disk-mb-s {mb}"));
        }
        if args.insecure {
            command.push_str(" --insecure");
        }
        if args.plain_store {
            command.push_str(" --plain-store");
        }
        let text = format!(
            "Produced by `{command}` on {} ({}).\n\n{table}\n",
            results.machine,
            today()
        );
        // A slow-disk or insecure run has a table of its own beside the default one.
        let (begin, end) = match args.disk_mb_s {
            None if args.plain_store => (
                "<!-- bench-plain-store:begin (written by cargo xtask bench --plain-store --record) -->"
                    .to_owned(),
                "<!-- bench-plain-store:end -->".to_owned(),
            ),
            None if args.insecure => (
                "<!-- bench-insecure:begin (written by cargo xtask bench --insecure --record) -->"
                    .to_owned(),
                "<!-- bench-insecure:end -->".to_owned(),
            ),
            None => (BEGIN.to_owned(), END.to_owned()),
            Some(mb) => (
                format!(
                    "<!-- bench-disk-{mb}:begin (written by cargo xtask bench --disk-mb-s {mb} --record) -->"
                ),
                format!("<!-- bench-disk-{mb}:end -->"),
            ),
        };
        crate::report::write_between_markers(path, &begin, &end, &text)?;
        // The plot in the docs is the default run's.
        if !results.sweep.is_empty()
            && args.disk_mb_s.is_none()
            && !args.insecure
            && !args.plain_store
        {
            let svg = path
                .parent()
                .unwrap_or(Path::new("."))
                .join("docs/bench-workers.svg");
            if let Some(parent) = svg.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(out.join("workers.svg"), &svg)
                .with_context(|| format!("copying the plot to {}", svg.display()))?;
        }
    }
    std::fs::remove_dir_all(&env.store_dir).ok();
    drop(throttle);
    Ok(())
}

const BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench --record) -->";
const END: &str = "<!-- bench:end -->";

fn render(rows: &[Row]) -> String {
    use crate::report::Align::{Left, Right};
    let columns = [
        ("#", Left),
        ("measured", Left),
        ("Spillway", Right),
        ("baseline", Right),
        ("ratio", Right),
        ("goal", Left),
        ("met", Left),
        ("notes", Left),
    ];
    let num = |v: f64| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    crate::report::table(
        &columns,
        rows.iter().map(|r| {
            vec![
                r.id.clone(),
                r.what.clone(),
                format!("{} {}", num(r.spillway), r.unit),
                r.baseline
                    .map_or_else(|| "-".into(), |b| format!("{} {}", num(b), r.unit)),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.2}")),
                r.goal.clone(),
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "-",
                }
                .to_owned(),
                r.note.clone(),
            ]
        }),
    )
}

/// Cores, memory and the disk under the state directory, as the run saw them.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .map_or_else(
            || "? GiB".into(),
            |kb| format!("{:.0} GiB", kb as f64 / 1048576.0),
        );
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({model}), {mem} memory")
}

/// Today's date (UTC), `YYYY-MM-DD`: the date part of humantime's RFC 3339 form of now (empty
/// for a clock before 1970 or after 9999, which that form cannot write).
fn today() -> String {
    use std::fmt::Write as _;
    let now = std::time::SystemTime::now();
    let mut date = String::new();
    if now.duration_since(std::time::UNIX_EPOCH).is_err()
        || write!(date, "{}", humantime::format_rfc3339_seconds(now)).is_err()
    {
        return String::new();
    }
    date.truncate("YYYY-MM-DD".len());
    date
}

/// The embedded store as its own process, its objects under `root`.
pub struct StoreProc {
    pub endpoint: String,
    pub root: PathBuf,
    /// The CA of an HTTPS store's throwaway certificate (PEM).
    pub ca_file: Option<PathBuf>,
    _proc: Proc,
}

impl StoreProc {
    /// The store process's pid.
    pub fn pid(&self) -> Option<u32> {
        self._proc.id()
    }

    pub async fn start(env: &Env, name: &str, latency: Duration) -> anyhow::Result<Self> {
        let root = env.store_dir.join(name);
        let addr = free_tcp()?;
        let mut proc = Proc::spawn(
            &format!("s3-{name}"),
            &env.bin.join("xtask"),
            &[
                "s3".into(),
                "--root".into(),
                root.display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--latency".into(),
                format!("{}ms", latency.as_millis()),
            ]
            .into_iter()
            .chain((!env.plain_store).then(|| "--tls".to_owned()))
            .collect::<Vec<_>>(),
            &[],
            &env.logs,
        )?;
        wait_tcp(addr, &mut proc).await?;
        let (scheme, ca_file) = if env.plain_store {
            ("http", None)
        } else {
            (
                "https",
                Some(spillway_kit::s3::tls_dir(&root).join("ca.pem")),
            )
        };
        Ok(Self {
            endpoint: format!("{scheme}://{addr}"),
            root,
            ca_file,
            _proc: proc,
        })
    }

    /// The uploader's flags for this store: its endpoint, and the CA of an HTTPS store.
    pub fn uploader_args(&self) -> Vec<String> {
        let mut args = vec!["--s3-endpoint".to_owned(), self.endpoint.clone()];
        if let Some(ca) = &self.ca_file {
            args.extend(["--s3-ca-file".to_owned(), ca.display().to_string()]);
        }
        args
    }

    /// An S3 client for this store, trusting its CA when it serves HTTPS.
    pub async fn client(&self) -> anyhow::Result<aws_sdk_s3::Client> {
        let ca = match &self.ca_file {
            Some(path) => Some(spillway_uploader::transport::StoreCa::from_pem(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )?),
            None => None,
        };
        Ok(spillway_kit::s3::client_with_ca(&self.endpoint, ca.as_ref()).await)
    }

    /// Deletes every object (the bucket stays).
    pub fn clear(&self) -> anyhow::Result<()> {
        let bucket = self.root.join(spillway_kit::cluster::BUCKET);
        if bucket.exists() {
            std::fs::remove_dir_all(&bucket)?;
            std::fs::create_dir_all(&bucket)?;
        }
        Ok(())
    }
}

/// A running uploader process (release binary) on fresh loopback ports.
pub struct UploaderProc {
    pub proc: Proc,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    /// From spawning the process to `/readyz` answering 200.
    pub to_ready: Duration,
}

/// Starts the uploader on `spool` (bounded at 64 GiB), storing where `s3` (its store flags,
/// [`StoreProc::uploader_args`]) says, and waits until it is ready.
pub async fn uploader(
    env: &Env,
    name: &str,
    spool: &Path,
    s3: Vec<String>,
) -> anyhow::Result<UploaderProc> {
    let (grpc, http) = (free_tcp()?, free_tcp()?);
    let started = std::time::Instant::now();
    let mut args: Vec<String> = env.uploader_link_args();
    args.extend([
        "--listen".into(),
        grpc.to_string(),
        "--http-listen".into(),
        http.to_string(),
        "--spool-dir".into(),
        spool.display().to_string(),
        "--spool-max-bytes".into(),
        (64u64 << 30).to_string(),
        "--bucket".into(),
        spillway_kit::cluster::BUCKET.into(),
        "--create-bucket".into(),
        "--drain-timeout".into(),
        "1s".into(),
    ]);
    args.extend(s3);
    let mut proc = Proc::spawn(
        name,
        &env.bin.join("uploader"),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", spillway_kit::s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", spillway_kit::s3::SECRET_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        &env.logs,
    )?;
    spillway_kit::cluster::ready(http, &mut proc).await?;
    Ok(UploaderProc {
        proc,
        grpc,
        http,
        to_ready: started.elapsed(),
    })
}

/// Peak and current resident memory of a process, in bytes (from /proc).
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

pub const MB: f64 = 1e6;
pub const MIB: f64 = 1024.0 * 1024.0;

/// The percentile `p` (0..=100) of `sorted` (ascending), or 0 for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::{Row, render, today, wanted};

    #[test]
    fn only_selects_every_group_any_of_its_names_matches() {
        let only = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(wanted(&only(&[]), "store"));
        let two = only(&["spool", "ingest"]);
        assert!(!wanted(&two, "store"));
        assert!(wanted(&two, "spool") && wanted(&two, "ingest"));
        // A substring: `o` names store and spool, not ingest.
        assert!(wanted(&only(&["o"]), "store") && !wanted(&only(&["o"]), "ingest"));
    }

    #[test]
    fn today_is_the_utc_date_date_prints() {
        let date_u = || {
            std::process::Command::new("date")
                .args(["-u", "+%Y-%m-%d"])
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
        };
        let (before, ours, after) = (date_u(), today(), date_u());
        assert_eq!(ours.len(), 10, "{ours}");
        assert!(ours.char_indices().all(|(i, c)| if i == 4 || i == 7 {
            c == '-'
        } else {
            c.is_ascii_digit()
        }));
        // (Unless `date` is missing, or midnight passed in between.)
        if before.is_some() && before == after {
            assert_eq!(Some(ours), before);
        }
    }

    #[test]
    fn the_table_reads_as_recorded_in_benchmarks_md() {
        let row = |id: &str, spillway, baseline, ratio, met, note: &str| Row {
            id: id.into(),
            what: format!("row {id}"),
            unit: "MB/s".into(),
            spillway,
            baseline,
            ratio,
            goal: ">= 1x".into(),
            met,
            note: note.into(),
        };
        let rows = [
            row("1", 123.456, Some(12.34), Some(10.0), Some(true), "n"),
            row("2", 1.5, None, None, Some(false), ""),
            row("3a", -250.0, Some(0.004), Some(0.125), None, "x | y"),
        ];
        assert_eq!(
            render(&rows),
            "| # | measured | Spillway | baseline | ratio | goal | met | notes |\n\
             | --- | --- | ---: | ---: | ---: | --- | --- | --- |\n\
             | 1 | row 1 | 123 MB/s | 12.3 MB/s | 10.00 | >= 1x | yes | n |\n\
             | 2 | row 2 | 1.50 MB/s | - | - | >= 1x | **no** |  |\n\
             | 3a | row 3a | -250 MB/s | 0.00 MB/s | 0.12 | >= 1x | - | x | y |\n"
        );
    }
}
