//! A local Spillway cluster of real processes: the embedded S3 server (served by the `xtask`
//! binary itself), the uploader and ingest, on fixed loopback ports chosen at start so any of
//! them can be killed and started again where it was. `cargo xtask up` and `cargo xtask chaos`
//! both run on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::process::{Child, Command};

use crate::pipeline::wait_ready;

/// The bucket every local cluster writes to.
pub const BUCKET: &str = "spillway";

pub fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A daemon process, killed if dropped while still running.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let log = logs.join(format!("{name}.log"));
        // Appended to, so a daemon restarted by `chaos` keeps the log of its previous run.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit (SIGKILL after 30 s).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                ensure!(
                    status.success(),
                    "{} exited with {status}; see {}",
                    self.name,
                    self.log.display()
                );
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not stop within 30 s of SIGTERM; killed", self.name)
            }
        }
    }
}

pub async fn wait_tcp(addr: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        proc.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{} not listening on {addr} after 30 s",
            proc.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub async fn ready(addr: SocketAddr, proc: &mut Proc) -> anyhow::Result<()> {
    tokio::select! {
        r = wait_ready(addr) => r.with_context(|| format!("{}; see {}", proc.name, proc.log.display())),
        r = async { loop { proc.check_alive()?; tokio::time::sleep(Duration::from_millis(100)).await; } } => r,
    }
}

/// Builds the real `ingest` and `uploader` binaries (and `xtask`, which serves the store) and
/// returns the directory holding them.
///
/// Builds every workspace binary: that selects the same features as `cargo test --workspace`,
/// so after the tests nothing is compiled again (building only the two daemons would unify
/// features differently and rebuild much of the AWS SDK).
pub fn build_daemons(release: bool) -> anyhow::Result<PathBuf> {
    cargo_build(release, &[])
}

/// Builds "the next release" for `cargo xtask chaos`'s rolling-upgrade row: the same tree with
/// the uploader's test-only `spool-format-next` feature (spool format one newer), copied into
/// `<profile>/next-build/`, whose directory is returned. Call [`build_daemons`] after it, so
/// `<profile>/` holds the default build again. Only the uploader and the crates above it compile
/// twice; cargo keeps both sets of artifacts, so a second run compiles nothing.
pub fn build_next_daemons(release: bool) -> anyhow::Result<PathBuf> {
    let built = cargo_build(
        release,
        &["--features", "spillway-uploader/spool-format-next"],
    )?;
    let next = built.join("next-build");
    std::fs::create_dir_all(&next).with_context(|| format!("creating {}", next.display()))?;
    for daemon in ["ingest", "uploader"] {
        std::fs::copy(built.join(daemon), next.join(daemon))
            .with_context(|| format!("copying {daemon} into {}", next.display()))?;
    }
    Ok(next)
}

fn cargo_build(release: bool, extra: &[&str]) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins"]).args(extra);
    // `cargo run` gave this process the variables it sets for a package (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Some build scripts (ring's) watch those, so passing them on would
    // make this build and every later plain `cargo` build rebuild each other's dependencies.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*name);
        }
    }
    if release {
        cmd.arg("--release");
    }
    eprintln!("building the daemons: {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "cargo build failed");
    // This program was built into <target>/<profile>/xtask by the same cargo, so the target
    // directory is two levels up, whatever CARGO_TARGET_DIR or the config says.
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let target = me
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not inside a cargo target directory", me.display()))?;
    let dir = target.join(if release { "release" } else { "debug" });
    for daemon in ["ingest", "uploader", "xtask"] {
        let path = dir.join(daemon);
        ensure!(path.is_file(), "{} was not built", path.display());
    }
    Ok(dir)
}

/// One of the cluster's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Store,
    /// The uploader with this index.
    Uploader(usize),
    /// The ingest with this index.
    Ingest(usize),
}

/// How to run a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// State directory (created): store files, spools, logs, certificate.
    pub dir: PathBuf,
    /// Directory holding the built `xtask`, `uploader` and `ingest` binaries.
    pub bin: PathBuf,
    pub chunk_seconds: u32,
    pub workers: usize,
    /// How many uploaders (each with its own spool) and ingests (each forwarding to every
    /// uploader) to run.
    pub uploaders: usize,
    pub ingests: usize,
    /// Extra flags for every uploader and every ingest.
    pub uploader_args: Vec<String>,
    pub ingest_args: Vec<String>,
    /// Devices prove their uid with a signed token (`--auth token`, a fresh key in the
    /// cluster's directory); otherwise ingest runs `--auth none`.
    pub device_auth: bool,
    /// The store serves HTTPS (`xtask s3 --tls`, a throwaway CA kept for the cluster's life)
    /// and every uploader trusts that CA alone (`--s3-ca-file`); otherwise plain HTTP.
    pub store_tls: bool,
}

/// An uploader's fixed addresses and, while it runs, its process.
pub struct UploaderNode {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Where its binary is, when not [`ClusterOptions::bin`], and its own extra flags (a rolled
    /// node: [`Cluster::roll`]).
    bin: Option<PathBuf>,
    args: Vec<String>,
    proc: Option<Proc>,
}

/// An ingest's fixed addresses and, while it runs, its process.
pub struct IngestNode {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    /// The Omi pusher WebSocket (`--omi-listen`, loopback, no authentication).
    pub omi: SocketAddr,
    /// Where its binary is, when not [`ClusterOptions::bin`], and its own extra flags (a rolled
    /// node: [`Cluster::roll`]).
    bin: Option<PathBuf>,
    args: Vec<String>,
    proc: Option<Proc>,
}

/// A running cluster on fixed loopback ports.
pub struct Cluster {
    pub opts: ClusterOptions,
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub s3_addr: SocketAddr,
    /// `http://` or, with [`ClusterOptions::store_tls`], `https://` and the store's CA.
    pub s3_endpoint: String,
    pub s3_ca_file: Option<PathBuf>,
    s3_ca: Option<spillway_uploader::transport::StoreCa>,
    pub uploaders: Vec<UploaderNode>,
    pub ingests: Vec<IngestNode>,
    pub cert_path: PathBuf,
    /// Ingest's self-signed certificate (DER), for devices to trust.
    pub cert: Vec<u8>,
    /// The ingest → uploader link's throwaway PKI (mutual TLS), and its files under `dir/pki`.
    pub pki: crate::pki::DevPki,
    pub pki_files: crate::pki::PkiFiles,
    /// The token keys ingest verifies with (`--auth token`), and their file.
    pub token_keys: Option<(spillway_ingest::auth::Keyring, PathBuf)>,
    s3: Option<Proc>,
}

impl Cluster {
    /// Starts the store, the uploaders and the ingests, each ready before the next.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Self> {
        ensure!(
            opts.uploaders >= 1 && opts.ingests >= 1,
            "a cluster needs at least one uploader and one ingest"
        );
        let logs = opts.dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let dir = std::fs::canonicalize(&opts.dir)?;
        let s3_addr = free_tcp()?;
        let uploaders = (0..opts.uploaders)
            .map(|_| {
                Ok(UploaderNode {
                    grpc: free_tcp()?,
                    http: free_tcp()?,
                    bin: None,
                    args: Vec::new(),
                    proc: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let ingests = (0..opts.ingests)
            .map(|_| {
                Ok(IngestNode {
                    quic: free_udp()?,
                    http: free_tcp()?,
                    omi: free_tcp()?,
                    bin: None,
                    args: Vec::new(),
                    proc: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let pki = crate::pki::DevPki::generate()?;
        let pki_files = pki.write(&dir)?;
        let token_keys = if opts.device_auth {
            let line = spillway_ingest::auth::token::new_key_line("k1")?;
            let path = dir.join("token-keys");
            std::fs::write(&path, format!("{line}\n"))?;
            Some((spillway_ingest::auth::Keyring::parse(&line)?, path))
        } else {
            None
        };
        // Made before the store starts (it loads the same files), so the uploaders have the CA.
        let (s3_ca_file, s3_ca) = if opts.store_tls {
            let tls_dir = crate::s3::tls_dir(&dir.join("s3"));
            let (pki, files) = crate::pki::StorePki::load_or_generate(&tls_dir)?;
            (Some(files.ca), Some(pki.store_ca()?))
        } else {
            (None, None)
        };
        let scheme = if opts.store_tls { "https" } else { "http" };
        let mut cluster = Self {
            token_keys,
            s3_ca_file,
            s3_ca,
            pki,
            pki_files,
            logs: dir.join("logs"),
            cert_path: dir.join("ingest-cert.der"),
            dir,
            s3_addr,
            s3_endpoint: format!("{scheme}://{s3_addr}"),
            uploaders,
            ingests,
            cert: Vec::new(),
            opts,
            s3: None,
        };
        // One certificate for the cluster's life, so a restarted ingest is still trusted.
        let (cert_pem, key_pem) = spillway_ingest::tls::self_signed_pem()?;
        let (cert_file, key_file) = (
            cluster.dir.join("ingest-cert.pem"),
            cluster.dir.join("ingest-key.pem"),
        );
        std::fs::write(&cert_file, cert_pem)?;
        std::fs::write(&key_file, key_pem)?;
        let tls = spillway_ingest::tls::TlsMaterial::from_pem_files(&cert_file, &key_file)?;
        tls.write_cert_der(&cluster.cert_path)?;
        cluster.cert = tls.leaf_der().to_vec();
        cluster.start_daemon(Daemon::Store).await?;
        for i in 0..cluster.uploaders.len() {
            cluster.start_daemon(Daemon::Uploader(i)).await?;
        }
        for i in 0..cluster.ingests.len() {
            cluster.start_daemon(Daemon::Ingest(i)).await?;
        }
        Ok(cluster)
    }

    /// A device token for `uid`, valid for a day (empty when ingest runs `--auth none`).
    pub fn token(&self, uid: &str) -> anyhow::Result<String> {
        self.token_for(&spillway_ingest::auth::Scope::Uid(uid.to_owned()))
    }

    /// A device token for `scope` (a uid, or a gateway's uid prefix), valid for a day.
    pub fn token_for(&self, scope: &spillway_ingest::auth::Scope) -> anyhow::Result<String> {
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 86_400;
        self.token_scoped(scope, expires)
    }

    /// A device token for `uid` that expires at `expires` (Unix seconds).
    pub fn token_until(&self, uid: &str, expires: u64) -> anyhow::Result<String> {
        self.token_scoped(&spillway_ingest::auth::Scope::Uid(uid.to_owned()), expires)
    }

    /// A device token for `scope` (a uid, or a gateway's uid prefix) that expires at `expires`.
    pub fn token_scoped(
        &self,
        scope: &spillway_ingest::auth::Scope,
        expires: u64,
    ) -> anyhow::Result<String> {
        let Some((keys, _)) = &self.token_keys else {
            return Ok(String::new());
        };
        Ok(keys.issue(None, scope, expires)?)
    }

    /// The process id of a running daemon.
    pub fn pid(&self, d: Daemon) -> Option<u32> {
        match d {
            Daemon::Store => self.s3.as_ref()?.id(),
            Daemon::Uploader(i) => self.uploaders.get(i)?.proc.as_ref()?.id(),
            Daemon::Ingest(i) => self.ingests.get(i)?.proc.as_ref()?.id(),
        }
    }

    /// An S3 client for the cluster's store (trusting its CA when it serves HTTPS).
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        crate::s3::client_with_ca(&self.s3_endpoint, self.s3_ca.as_ref()).await
    }

    /// The spool directory of uploader `i`.
    pub fn spool_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("spool-{i}"))
    }

    pub fn s3_root(&self) -> PathBuf {
        self.dir.join("s3")
    }

    fn slot(&mut self, d: Daemon) -> anyhow::Result<&mut Option<Proc>> {
        Ok(match d {
            Daemon::Store => &mut self.s3,
            Daemon::Uploader(i) => {
                &mut self
                    .uploaders
                    .get_mut(i)
                    .with_context(|| format!("no uploader {i}"))?
                    .proc
            }
            Daemon::Ingest(i) => {
                &mut self
                    .ingests
                    .get_mut(i)
                    .with_context(|| format!("no ingest {i}"))?
                    .proc
            }
        })
    }

    /// The flags uploader `i` runs with (its credentials are [`UPLOADER_ENV`]).
    pub fn uploader_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let node = self
            .uploaders
            .get(i)
            .with_context(|| format!("no uploader {i}"))?;
        let mut args = vec![
            "--listen".into(),
            node.grpc.to_string(),
            "--http-listen".into(),
            node.http.to_string(),
            "--spool-dir".into(),
            self.spool_dir(i).display().to_string(),
            "--s3-endpoint".into(),
            self.s3_endpoint.clone(),
            "--bucket".into(),
            BUCKET.into(),
            "--create-bucket".into(),
            "--workers".into(),
            self.opts.workers.to_string(),
            "--max-chunk-seconds".into(),
            self.opts.chunk_seconds.to_string(),
        ];
        if let Some(ca) = &self.s3_ca_file {
            args.extend(["--s3-ca-file".into(), ca.display().to_string()]);
        }
        args.extend(self.pki_files.uploader_args());
        args.extend(self.opts.uploader_args.iter().cloned());
        args.extend(node.args.iter().cloned());
        Ok(args)
    }

    /// Runs daemon `d` from the binaries in `bin` with `args` added to its flags from its next
    /// start on (a rolling upgrade: [`Cluster::terminate`], `roll`, [`Cluster::start_daemon`]).
    pub fn roll(&mut self, d: Daemon, bin: &Path, args: &[&str]) -> anyhow::Result<()> {
        let (slot, extra) = match d {
            Daemon::Store => bail!("the store is not rolled"),
            Daemon::Uploader(i) => {
                let n = self
                    .uploaders
                    .get_mut(i)
                    .with_context(|| format!("no uploader {i}"))?;
                (&mut n.bin, &mut n.args)
            }
            Daemon::Ingest(i) => {
                let n = self
                    .ingests
                    .get_mut(i)
                    .with_context(|| format!("no ingest {i}"))?;
                (&mut n.bin, &mut n.args)
            }
        };
        *slot = Some(bin.to_owned());
        *extra = args.iter().map(|a| (*a).to_owned()).collect();
        Ok(())
    }

    /// Starts one daemon where it ran before (same ports, same state) and waits until it is
    /// ready. An uploader is ready only once its spool is open: how long that takes is what
    /// `chaos` reports as its restart time.
    pub async fn start_daemon(&mut self, d: Daemon) -> anyhow::Result<()> {
        let dir = &self.dir;
        let proc = match d {
            Daemon::Store => {
                let mut args = vec![
                    "s3".into(),
                    "--root".into(),
                    dir.join("s3").display().to_string(),
                    "--listen".into(),
                    self.s3_addr.to_string(),
                ];
                if self.opts.store_tls {
                    args.push("--tls".into());
                }
                let mut p =
                    Proc::spawn("s3", &self.opts.bin.join("xtask"), &args, &[], &self.logs)?;
                wait_tcp(self.s3_addr, &mut p).await?;
                p
            }
            Daemon::Uploader(i) => {
                let node = self
                    .uploaders
                    .get(i)
                    .with_context(|| format!("no uploader {i}"))?;
                let http = node.http;
                let mut p = Proc::spawn(
                    &name("uploader", i, self.uploaders.len()),
                    &node.bin.as_ref().unwrap_or(&self.opts.bin).join("uploader"),
                    &self.uploader_args(i)?,
                    &UPLOADER_ENV,
                    &self.logs,
                )?;
                ready(http, &mut p).await?;
                p
            }
            Daemon::Ingest(i) => {
                let node = self
                    .ingests
                    .get(i)
                    .with_context(|| format!("no ingest {i}"))?;
                let mut args = vec![
                    "--listen".into(),
                    node.quic.to_string(),
                    "--http-listen".into(),
                    node.http.to_string(),
                    "--omi-listen".into(),
                    node.omi.to_string(),
                    "--tls-cert".into(),
                    self.dir.join("ingest-cert.pem").display().to_string(),
                    "--tls-key".into(),
                    self.dir.join("ingest-key.pem").display().to_string(),
                    "--chunk-seconds".into(),
                    self.opts.chunk_seconds.to_string(),
                ];
                for u in &self.uploaders {
                    args.push("--uploader".into());
                    args.push(format!("https://{}", u.grpc));
                }
                args.extend(self.pki_files.ingest_args());
                if let Some((_, keys)) = &self.token_keys {
                    args.extend([
                        "--auth".into(),
                        "token".into(),
                        "--token-keys".into(),
                        keys.display().to_string(),
                    ]);
                }
                args.extend(self.opts.ingest_args.iter().cloned());
                args.extend(node.args.iter().cloned());
                let http = node.http;
                let mut p = Proc::spawn(
                    &name("ingest", i, self.ingests.len()),
                    &node.bin.as_ref().unwrap_or(&self.opts.bin).join("ingest"),
                    &args,
                    &[],
                    &self.logs,
                )?;
                ready(http, &mut p).await?;
                p
            }
        };
        *self.slot(d)? = Some(proc);
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye.
    pub async fn kill(&mut self, d: Daemon) -> anyhow::Result<()> {
        if let Some(mut p) = self.slot(d)?.take() {
            p.child.start_kill()?;
            p.child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM, then a clean exit is required.
    pub async fn terminate(&mut self, d: Daemon) -> anyhow::Result<()> {
        match self.slot(d)?.take() {
            Some(p) => p.stop().await,
            None => Ok(()),
        }
    }

    /// Stops the ingests, the uploaders and the store, in that order; returns the first error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut stopped = Vec::new();
        for i in 0..self.ingests.len() {
            stopped.push(self.terminate(Daemon::Ingest(i)).await);
        }
        for i in 0..self.uploaders.len() {
            stopped.push(self.terminate(Daemon::Uploader(i)).await);
        }
        stopped.push(self.terminate(Daemon::Store).await);
        stopped.into_iter().collect()
    }
}

/// The store's credentials, in every uploader's environment.
pub const UPLOADER_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", crate::s3::ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", crate::s3::SECRET_KEY),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A process's name (and log file): `uploader`, or `uploader-2` when there are several.
fn name(kind: &str, i: usize, of: usize) -> String {
    if of == 1 {
        kind.to_owned()
    } else {
        format!("{kind}-{i}")
    }
}
