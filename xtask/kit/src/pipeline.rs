//! The whole pipeline in one process (embedded S3, uploader, ingest) on ephemeral loopback
//! ports: what the end-to-end tests run. `cargo xtask up` runs the same daemons as processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spillway_ingest::client::Device;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Knobs the tests turn.
#[derive(Debug, Clone)]
pub struct Options {
    pub chunk_seconds: u32,
    pub workers: usize,
    pub spool_max_bytes: u64,
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    /// Ingest's `--chunk-fill-timeout`; `None` is its default (twice the chunk).
    pub chunk_fill_timeout: Option<Duration>,
    pub bucket: String,
    pub when_full: spillway_uploader::spool::WhenFull,
    pub max_buffered_bytes: usize,
    pub drain_timeout: Duration,
    /// Device tokens verified with these keys (`--auth token`); `None` is `--auth none`.
    pub token_keys: Option<spillway_ingest::auth::Keyring>,
    /// Device client certificates must chain to these roots (`--auth mtls`).
    pub device_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    pub max_sessions: usize,
    pub max_sessions_per_uid: usize,
    pub hello_timeout: Duration,
    pub max_puts_in_flight: usize,
    pub put_timeout: Duration,
    /// The ingest → uploader link's PKI: mutual TLS when set (the real path, which
    /// [`Pipeline::start`] always takes: it makes one when there is none); plaintext otherwise.
    pub pki: Option<crate::pki::DevPki>,
    /// The Omi WebSocket's bearer token (`--omi-auth bearer`); `None`: no authentication.
    pub omi_token: Option<Vec<u8>>,
    /// The uploader seals Omi chunks with this secret (`--omi-secret-file`).
    pub omi_secret: Option<Vec<u8>>,
    pub omi_receive_timeout: Duration,
    pub omi_commit_every: Duration,
    /// The real pusher Omi sessions are relayed to (`--omi-upstream ws://...`); `None`: off.
    pub omi_upstream: Option<String>,
    /// Relay audio upstream too (`--omi-upstream-audio`).
    pub omi_upstream_audio: bool,
    /// `--omi-upstream-queue-bytes`.
    pub omi_upstream_queue_bytes: usize,
    /// The store serves HTTPS with a throwaway CA ([`crate::pki::StorePki`]) and the uploader
    /// trusts that CA alone (`--s3-ca-file`); otherwise plain HTTP.
    pub store_tls: bool,
    /// The uploader's `--s3-payload-signing` (`auto`: unsigned exactly over HTTPS).
    pub s3_payload_signing: spillway_uploader::transport::PayloadSigning,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            chunk_seconds: 60,
            workers: 4,
            spool_max_bytes: 512 * 1024 * 1024,
            max_frame_bytes: spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(30),
            chunk_fill_timeout: None,
            bucket: "spillway-test".into(),
            when_full: spillway_uploader::spool::WhenFull::Reject,
            max_buffered_bytes: 256 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
            token_keys: None,
            device_ca: None,
            max_sessions: 256,
            max_sessions_per_uid: 4,
            hello_timeout: Duration::from_secs(5),
            max_puts_in_flight: 64,
            put_timeout: Duration::from_secs(60),
            pki: None,
            omi_token: None,
            omi_secret: None,
            omi_receive_timeout: Duration::from_secs(300),
            omi_commit_every: Duration::from_secs(60),
            omi_upstream: None,
            omi_upstream_audio: false,
            omi_upstream_queue_bytes: 256 * 1024,
            store_tls: false,
            s3_payload_signing: spillway_uploader::transport::PayloadSigning::Auto,
        }
    }
}

/// A running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    /// `http://127.0.0.1:PORT`, or `https://` with [`Options::store_tls`].
    pub s3_endpoint: String,
    /// With [`Options::store_tls`]: the store's CA certificate (PEM), what `--s3-ca-file` names.
    pub s3_ca_file: Option<PathBuf>,
    /// With [`Options::store_tls`]: that CA, as the uploader and [`Pipeline::s3`] trust it.
    pub s3_ca: Option<spillway_uploader::transport::StoreCa>,
    pub bucket: String,
    pub ingest_quic: SocketAddr,
    pub ingest_http: SocketAddr,
    /// The Omi pusher WebSocket (`ws://{ingest_omi}/v1/trigger/listen?...`).
    pub ingest_omi: SocketAddr,
    pub uploader_grpc: SocketAddr,
    pub uploader_http: SocketAddr,
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
    /// The ingest → uploader link's PKI (mutual TLS).
    pub pki: crate::pki::DevPki,
    pub spool_dir: PathBuf,
    opts: Options,
    /// How the object puts the store received were signed.
    pub s3_payloads: Arc<crate::s3::Payloads>,
    /// With [`Options::store_tls`], the store's certificate (kept across [`Pipeline::start_store`]).
    store_pki: Option<crate::pki::StorePki>,
    s3_addr: SocketAddr,
    s3_root: PathBuf,
    s3_stop: CancellationToken,
    uploader_stop: CancellationToken,
    ingest_stop: CancellationToken,
    s3: Option<JoinHandle<anyhow::Result<()>>>,
    uploader: JoinHandle<anyhow::Result<()>>,
    ingest: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn tcp() -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Starts the embedded S3 server on an ephemeral port; returns its endpoint URL.
pub async fn start_s3(
    root: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<(String, JoinHandle<anyhow::Result<()>>)> {
    let (listener, addr) = tcp().await?;
    let task = crate::s3::spawn(root, listener, stop, None, Arc::default())?;
    Ok((format!("http://{addr}"), task))
}

/// A gRPC channel to the uploader at `addr`: mutual TLS with `tls` (checking the uploader's
/// certificate for `localhost`), or plaintext.
pub async fn uploader_channel(
    addr: SocketAddr,
    tls: Option<&spillway_proto::link::LinkTls>,
) -> anyhow::Result<tonic::transport::Channel> {
    Ok(uploader_endpoint(addr, tls)?.connect().await?)
}

/// The uploader at `addr` as a gRPC endpoint not yet connected: with the link's TLS (`tls`,
/// the uploader's name `localhost`) or in plaintext.
pub fn uploader_endpoint(
    addr: SocketAddr,
    tls: Option<&spillway_proto::link::LinkTls>,
) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(match tls {
        Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.client("localhost"))?,
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?,
    })
}

/// Uploader configuration against the embedded store.
pub fn uploader_config(
    spool_dir: PathBuf,
    s3_endpoint: &str,
    opts: &Options,
) -> spillway_uploader::Config {
    let mut c =
        spillway_uploader::Config::local(spool_dir, s3_endpoint.to_owned(), opts.bucket.clone());
    c.workers = opts.workers;
    c.spool_max_bytes = opts.spool_max_bytes;
    c.spool_max_chunks = spillway_uploader::spool::default_max_chunks(opts.spool_max_bytes);
    c.max_chunk_seconds = opts.chunk_seconds;
    c.when_full = opts.when_full;
    c.drain_timeout = opts.drain_timeout;
    c.max_puts_in_flight = opts.max_puts_in_flight;
    c.put_timeout = opts.put_timeout;
    c.s3_payload_signing = opts.s3_payload_signing;
    if let Some(pki) = &opts.pki {
        c.link = spillway_proto::link::Link::Tls(pki.uploader_tls());
    }
    if let Some(secret) = &opts.omi_secret {
        match spillway_uploader::seal::Sealer::from_secret(zeroize::Zeroizing::new(secret.clone()))
        {
            Ok(sealer) => c.omi_sealer = Some(std::sync::Arc::new(sealer)),
            Err(e) => tracing::error!(error = %e, "the test's Omi secret is refused"),
        }
    }
    c.credentials = Some(spillway_uploader::StaticCredentials {
        access_key_id: crate::s3::ACCESS_KEY.into(),
        secret_access_key: crate::s3::SECRET_KEY.into(),
    });
    c
}

impl Pipeline {
    pub async fn start(mut opts: Options) -> anyhow::Result<Self> {
        let pki = match &opts.pki {
            Some(pki) => pki.clone(),
            None => crate::pki::DevPki::generate()?,
        };
        opts.pki = Some(pki.clone());
        let dir = tempfile::tempdir()?;
        let s3_stop = CancellationToken::new();
        let s3_root = dir.path().join("s3");
        let (store_pki, s3_ca_file, s3_ca) = if opts.store_tls {
            let tls_dir = crate::s3::tls_dir(&s3_root);
            let (pki, files) = crate::pki::StorePki::load_or_generate(&tls_dir)?;
            let ca = pki.store_ca()?;
            (Some(pki), Some(files.ca), Some(ca))
        } else {
            (None, None, None)
        };
        let (listener, s3_addr) = tcp().await?;
        let scheme = if store_pki.is_some() { "https" } else { "http" };
        let s3_endpoint = format!("{scheme}://{s3_addr}");
        let s3_payloads = Arc::<crate::s3::Payloads>::default();
        let s3 = crate::s3::spawn(
            s3_root.clone(),
            listener,
            s3_stop.clone(),
            store_pki.as_ref(),
            Arc::clone(&s3_payloads),
        )?;

        let spool_dir = dir.path().join("spool");
        let (grpc, uploader_grpc) = tcp().await?;
        let (uhttp, uploader_http) = tcp().await?;
        let uploader_stop = CancellationToken::new();
        let mut uconfig = uploader_config(spool_dir.clone(), &s3_endpoint, &opts);
        uconfig.s3_ca.clone_from(&s3_ca);
        let uploader = tokio::spawn(spillway_uploader::run(
            uconfig,
            spillway_uploader::Listeners { grpc, http: uhttp },
            uploader_stop.clone(),
        ));
        let opts_kept = opts.clone();

        let tls = spillway_ingest::tls::self_signed()?;
        let cert_der = tls.leaf_der().to_vec();
        let key_der = tls.key.secret_der().to_vec();
        let iconfig = ingest_config(uploader_grpc, &cert_der, &key_der, &opts);
        let quic = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let ingest_quic = quic.local_addr()?;
        let (ihttp, ingest_http) = tcp().await?;
        let (omi, ingest_omi) = tcp().await?;
        let ingest_stop = CancellationToken::new();
        let ingest = tokio::spawn(spillway_ingest::run(
            iconfig,
            spillway_ingest::Listeners {
                quic,
                http: ihttp,
                omi: Some(omi),
            },
            ingest_stop.clone(),
        ));

        let p = Self {
            s3_endpoint,
            s3_ca_file,
            s3_ca,
            s3_payloads,
            store_pki,
            bucket: opts.bucket,
            ingest_quic,
            ingest_http,
            ingest_omi,
            uploader_grpc,
            uploader_http,
            cert_der,
            key_der,
            pki,
            spool_dir,
            opts: opts_kept,
            s3_addr,
            s3_root,
            s3_stop,
            s3: Some(s3),
            uploader_stop,
            ingest_stop,
            uploader,
            ingest,
            _dir: dir,
        };
        wait_ready(p.uploader_http)
            .await
            .context("uploader never became ready")?;
        wait_ready(p.ingest_http)
            .await
            .context("ingest never became ready")?;
        Ok(p)
    }

    /// A device connected to ingest.
    pub async fn device(&self) -> anyhow::Result<Device> {
        Device::connect(self.ingest_quic, "localhost", &self.cert_der).await
    }

    /// Ingest's `/metrics` body.
    pub async fn ingest_metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.ingest_http, "/metrics").await?.1)
    }

    /// The uploader's `/metrics` body.
    pub async fn uploader_metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.uploader_http, "/metrics").await?.1)
    }

    /// One `PutChunk` straight to the uploader, as an ingest (or a rogue client) would send it.
    pub async fn put_chunk(
        &self,
        request: spillway_proto::uploader::PutChunkRequest,
    ) -> Result<spillway_proto::uploader::PutChunkResponse, tonic::Status> {
        use spillway_proto::uploader::uploader_client::UploaderClient;
        let channel = self
            .uploader_channel()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        let mut client = UploaderClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);
        client
            .put_chunk(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A gRPC channel to the uploader, as an ingest opens one (with ingest's certificate).
    pub async fn uploader_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        uploader_channel(self.uploader_grpc, Some(&self.pki.ingest_tls())).await
    }

    /// The object at `key` in the pipeline's bucket, `None` when there is none.
    pub async fn object(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let s3 = self.s3().await;
        match s3.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(o) => Ok(Some(o.body.collect().await?.into_bytes().to_vec())),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "reading {key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )),
        }
    }

    /// The keys of the objects under `prefix` in the pipeline's bucket, in order.
    pub async fn object_keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let s3 = self.s3().await;
        let keys = crate::sim::keys_under(&s3, &self.bucket, prefix).await?;
        Ok(keys.into_iter().collect())
    }

    /// An S3 client for the embedded store (trusting its CA when it serves HTTPS).
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        crate::s3::client_with_ca(&self.s3_endpoint, self.s3_ca.as_ref()).await
    }

    /// Makes the store answer every request `503 SlowDown` (`true`) or serve again (`false`).
    pub fn store_failing(&self, failing: bool) -> anyhow::Result<()> {
        let flag = crate::s3::fault_flag(&self.s3_root);
        if failing {
            std::fs::write(&flag, b"")?;
        } else if flag.exists() {
            std::fs::remove_file(&flag)?;
        }
        Ok(())
    }

    /// Stops the object store (an outage); [`Pipeline::start_store`] brings it back.
    pub async fn stop_store(&mut self) -> anyhow::Result<()> {
        self.s3_stop.cancel();
        if let Some(s3) = self.s3.take() {
            s3.await??;
        }
        Ok(())
    }

    /// Starts the object store again on the same address, with the same files.
    pub async fn start_store(&mut self) -> anyhow::Result<()> {
        let listener = bind_tcp_again(self.s3_addr).await?;
        self.s3_stop = CancellationToken::new();
        // Over HTTPS, with the certificate the uploader already trusts.
        self.s3 = Some(crate::s3::spawn(
            self.s3_root.clone(),
            listener,
            self.s3_stop.clone(),
            self.store_pki.as_ref(),
            Arc::clone(&self.s3_payloads),
        )?);
        Ok(())
    }

    /// Stops the uploader gracefully (it drains for up to the drain timeout, then exits with
    /// whatever is left spooled) and starts a new one on the same ports and spool.
    pub async fn restart_uploader(&mut self) -> anyhow::Result<()> {
        self.uploader_stop.cancel();
        (&mut self.uploader).await??;
        let grpc = bind_tcp_again(self.uploader_grpc).await?;
        let http = bind_tcp_again(self.uploader_http).await?;
        self.uploader_stop = CancellationToken::new();
        let mut config = uploader_config(self.spool_dir.clone(), &self.s3_endpoint, &self.opts);
        config.s3_ca.clone_from(&self.s3_ca);
        self.uploader = tokio::spawn(spillway_uploader::run(
            config,
            spillway_uploader::Listeners { grpc, http },
            self.uploader_stop.clone(),
        ));
        wait_ready(self.uploader_http)
            .await
            .context("restarted uploader never became ready")
    }

    /// Stops the uploader for good (it drains for up to the drain timeout, then exits with
    /// whatever is left spooled), leaving its spool to another owner.
    pub async fn stop_uploader(&mut self) -> anyhow::Result<()> {
        self.uploader_stop.cancel();
        let stopped = std::mem::replace(&mut self.uploader, tokio::spawn(async { Ok(()) }));
        stopped.await?
    }

    /// Stops ingest gracefully (it flushes every session's partial chunk and tells devices it is
    /// shutting down) and starts a new one on the same address with the same certificate.
    pub async fn restart_ingest(&mut self) -> anyhow::Result<()> {
        self.ingest_stop.cancel();
        (&mut self.ingest).await??;
        let quic = bind_udp_again(self.ingest_quic).await?;
        let http = bind_tcp_again(self.ingest_http).await?;
        let omi = bind_tcp_again(self.ingest_omi).await?;
        self.ingest_stop = CancellationToken::new();
        let config = ingest_config(
            self.uploader_grpc,
            &self.cert_der,
            &self.key_der,
            &self.opts,
        );
        self.ingest = tokio::spawn(spillway_ingest::run(
            config,
            spillway_ingest::Listeners {
                quic,
                http,
                omi: Some(omi),
            },
            self.ingest_stop.clone(),
        ));
        wait_ready(self.ingest_http)
            .await
            .context("restarted ingest never became ready")
    }

    /// Stops ingest, then the uploader, then the store; returns the first daemon error.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.ingest_stop.cancel();
        self.ingest.await??;
        self.uploader_stop.cancel();
        self.uploader.await??;
        self.s3_stop.cancel();
        if let Some(s3) = self.s3 {
            s3.await??;
        }
        Ok(())
    }
}

/// Polls `/readyz` until it answers 200 (up to 30 s).
pub async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http_get(addr, "/readyz").await {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{addr}/readyz not ready after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/1.1 GET of `path` (status, body) for the ops endpoints; no connection is kept.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}{path}")
        .parse()
        .with_context(|| format!("GET {path}: not a path"))?;
    let response = client.get(uri).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Ingest configuration for the test pipeline, around a fixed certificate and key.
fn ingest_config(
    uploader: SocketAddr,
    cert_der: &[u8],
    key_der: &[u8],
    opts: &Options,
) -> spillway_ingest::Config {
    let tls = spillway_ingest::tls::TlsMaterial {
        cert_chain: vec![rustls_pki_types::CertificateDer::from(cert_der.to_vec())],
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key_der.to_vec().into()),
    };
    let scheme = if opts.pki.is_some() { "https" } else { "http" };
    let mut c = spillway_ingest::Config::local(format!("{scheme}://{uploader}"), tls);
    if let Some(pki) = &opts.pki {
        c.link = spillway_proto::link::Link::Tls(pki.ingest_tls());
    }
    c.chunk_seconds = opts.chunk_seconds;
    c.max_frame_bytes = opts.max_frame_bytes;
    c.idle_timeout = opts.idle_timeout;
    c.chunk_fill_timeout = opts
        .chunk_fill_timeout
        .unwrap_or(Duration::from_secs(2 * u64::from(opts.chunk_seconds)));
    c.max_buffered_bytes = opts.max_buffered_bytes;
    c.max_sessions = opts.max_sessions;
    c.max_sessions_per_uid = opts.max_sessions_per_uid;
    c.hello_timeout = opts.hello_timeout;
    if let Some(keys) = &opts.token_keys {
        c.auth = std::sync::Arc::new(spillway_ingest::auth::Auth::Tokens(keys.clone()));
    }
    if let Some(roots) = &opts.device_ca {
        c.auth = std::sync::Arc::new(spillway_ingest::auth::Auth::Certificates);
        c.device_ca = Some(roots.clone());
    }
    c.omi.receive_timeout = opts.omi_receive_timeout;
    c.omi.commit_every = opts.omi_commit_every;
    if let Some(url) = &opts.omi_upstream {
        match spillway_ingest::omi::UpstreamConfig::new(
            url,
            opts.omi_upstream_audio,
            opts.omi_upstream_queue_bytes,
        ) {
            Ok(upstream) => c.omi.upstream = Some(upstream),
            Err(e) => tracing::error!(error = %e, "the test's Omi upstream is refused"),
        }
    }
    if let Some(token) = &opts.omi_token {
        match spillway_core::omi::bearer::BearerToken::from_file_contents(token) {
            Ok(token) => c.omi.auth = spillway_ingest::omi::OmiAuth::Bearer(token),
            Err(e) => tracing::error!(error = %e, "the test's Omi token is refused"),
        }
    }
    c
}

/// Binds a UDP address a stopped endpoint just released (its socket may linger a moment).
async fn bind_udp_again(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    bind_again(addr, || std::net::UdpSocket::bind(addr)).await
}

/// Binds a TCP address a stopped daemon just released. Under parallel tests another socket may
/// hold the port for a moment (an outgoing connection given it as its ephemeral port).
async fn bind_tcp_again(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    bind_again(addr, || {
        let std = std::net::TcpListener::bind(addr)?;
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    })
    .await
}

async fn bind_again<T>(
    addr: SocketAddr,
    bind: impl Fn() -> std::io::Result<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match bind() {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%addr, error = %e, "address still in use; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr} again")),
        }
    }
}

/// An uploader on its own Tokio runtime, so that [`IsolatedUploader::kill`] ends everything it
/// runs at once (its listeners, every connection, every upload), as a crash would, while the
/// test's own runtime goes on. Its spool and ports are kept for [`IsolatedUploader::restart`].
pub struct IsolatedUploader {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub config: spillway_uploader::Config,
    runtime: Option<tokio::runtime::Runtime>,
}

impl IsolatedUploader {
    /// Starts an uploader on fresh loopback ports and waits until it is ready.
    pub async fn start(config: spillway_uploader::Config) -> anyhow::Result<Self> {
        let grpc = std::net::TcpListener::bind("127.0.0.1:0")?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut u = Self {
            grpc: grpc.local_addr()?,
            http: http.local_addr()?,
            config,
            runtime: None,
        };
        u.launch(grpc, http).await?;
        Ok(u)
    }

    async fn launch(
        &mut self,
        grpc: std::net::TcpListener,
        http: std::net::TcpListener,
    ) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let config = self.config.clone();
        runtime.spawn(async move {
            for l in [&grpc, &http] {
                l.set_nonblocking(true)?;
            }
            let listeners = spillway_uploader::Listeners {
                grpc: tokio::net::TcpListener::from_std(grpc)?,
                http: tokio::net::TcpListener::from_std(http)?,
            };
            spillway_uploader::run(config, listeners, CancellationToken::new()).await
        });
        self.runtime = Some(runtime);
        wait_ready(self.http)
            .await
            .context("uploader never became ready")
    }

    /// Ends the uploader at once: no drain, no goodbye; connections are torn down.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Starts it again where it was: same ports, same spool.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let grpc = bind_again(self.grpc, || std::net::TcpListener::bind(self.grpc)).await?;
        let http = bind_again(self.http, || std::net::TcpListener::bind(self.http)).await?;
        // The killed runtime's threads release the spool as they wind down.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match spillway_uploader::spool::Spool::open(
                &self.config.spool_dir,
                spillway_uploader::spool::Limits::reject(self.config.spool_max_bytes),
            ) {
                Err(spillway_uploader::spool::SpoolError::InUse(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
        self.launch(grpc, http).await
    }
}

impl Drop for IsolatedUploader {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for IsolatedUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedUploader")
            .field("grpc", &self.grpc)
            .field("alive", &self.runtime.is_some())
            .finish()
    }
}
