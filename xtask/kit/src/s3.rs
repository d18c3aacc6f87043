//! An S3-compatible server on loopback, embedded (`s3s` + `s3s-fs`): the default object store
//! of `cargo xtask up` and of the end-to-end tests. It verifies SigV4 signatures and CRC32C
//! checksums, so uploads are checked as a real store would, and honours conditional writes
//! (`If-None-Match: *`, `If-Match`) atomically, as S3 does (see [`Writes`]). It serves plain
//! HTTP ([`serve`]) or, behind rustls with a throwaway CA, HTTPS ([`serve_tls`]), the same
//! store either way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Access key of the local store.
pub const ACCESS_KEY: &str = "spillway-local";
/// Secret key of the local store.
pub const SECRET_KEY: &str = "spillway-local-secret";

/// While this file exists next to the store's root (`<root>.fail`), every request is answered
/// `503 SlowDown`, as an overloaded S3 does: `cargo xtask chaos` creates and removes it.
pub fn fault_flag(root: &Path) -> PathBuf {
    let mut p = root.as_os_str().to_owned();
    p.push(".fail");
    p.into()
}

/// Where the store rooted at `root` keeps its throwaway PKI when it serves HTTPS
/// (`<root>.tls/`: `ca.pem`, `cert.pem`, `key.pem`), kept across restarts so its clients go on
/// trusting it.
pub fn tls_dir(root: &Path) -> PathBuf {
    let mut p = root.as_os_str().to_owned();
    p.push(".tls");
    p.into()
}

/// How the `PutObject` bodies the store received were signed, by their `x-amz-content-sha256`:
/// what the tests check the uploader sends over each transport.
#[derive(Debug, Default)]
pub struct Payloads {
    sha256: AtomicU64,
    unsigned: AtomicU64,
    other: AtomicU64,
}

impl Payloads {
    /// Bodies signed by their SHA-256 (64 hex digits).
    pub fn sha256(&self) -> u64 {
        self.sha256.load(Ordering::Relaxed)
    }

    /// Bodies sent `UNSIGNED-PAYLOAD`.
    pub fn unsigned(&self) -> u64 {
        self.unsigned.load(Ordering::Relaxed)
    }

    /// Any other kind (a streaming, chunk-signed body), or none named.
    pub fn other(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }

    /// Counts `req` if it puts an object (path-style: `/bucket/key`).
    fn note(&self, req: &http::Request<hyper::body::Incoming>) {
        let names_a_key = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split_once('/')
            .is_some_and(|(_, key)| !key.is_empty());
        if req.method() != http::Method::PUT || !names_a_key {
            return;
        }
        let signed = req
            .headers()
            .get("x-amz-content-sha256")
            .map(http::HeaderValue::as_bytes);
        let counter = match signed {
            Some(b"UNSIGNED-PAYLOAD") => &self.unsigned,
            Some(v) if v.len() == 64 && v.iter().all(u8::is_ascii_hexdigit) => &self.sha256,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The S3 service with fault injection in front.
#[derive(Clone)]
struct Faulty {
    inner: s3s::service::S3Service,
    flag: Arc<PathBuf>,
    latency: Duration,
    writes: Arc<Writes>,
    payloads: Arc<Payloads>,
}

/// One lock per object path for conditional writes. s3s-fs checks `If-None-Match: *` and
/// `If-Match` against the file, then writes it: two conditional writes to one key at once could
/// both pass the check. S3 decides them atomically (one gets `412`), and Spillway's rule that
/// stored audio is never replaced relies on that, so this store serializes them per key.
#[derive(Default)]
struct Writes(parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Writes {
    fn lock(&self, path: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock();
        Arc::clone(locks.entry(path.to_owned()).or_default())
    }

    fn release(&self, path: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.0.lock();
        drop(lock);
        if locks.get(path).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(path);
        }
    }
}

type Answer = std::pin::Pin<
    Box<dyn Future<Output = Result<s3s::HttpResponse, s3s::HttpError>> + Send + 'static>,
>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Faulty {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = Answer;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        if self.flag.exists() {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                <Message>Please reduce your request rate (fault injected by cargo xtask chaos).</Message></Error>";
            let mut response = http::Response::new(s3s::Body::from(body.to_owned()));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/xml"),
            );
            return Box::pin(async move { Ok(response) });
        }
        self.payloads.note(&req);
        let conditional = req.method() == http::Method::PUT
            && (req.headers().contains_key(http::header::IF_NONE_MATCH)
                || req.headers().contains_key(http::header::IF_MATCH));
        if conditional {
            let (writes, path) = (Arc::clone(&self.writes), req.uri().path().to_owned());
            let answer = hyper::service::Service::call(&self.inner, req);
            let latency = self.latency;
            return Box::pin(async move {
                let lock = writes.lock(&path);
                let r = {
                    let _held = lock.lock().await;
                    answer.await
                };
                writes.release(&path, lock);
                tokio::time::sleep(latency).await;
                r
            });
        }
        let answer = hyper::service::Service::call(&self.inner, req);
        let latency = self.latency;
        if latency.is_zero() {
            return answer;
        }
        // As a remote store's round trip: the request is handled, the answer comes later.
        Box::pin(async move {
            let r = answer.await;
            tokio::time::sleep(latency).await;
            r
        })
    }
}

/// How long a client may take over its TLS handshake before its connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the store rooted at `root` (one directory per bucket) until `shutdown` fires.
pub async fn serve(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_latency(root, listener, shutdown, Duration::ZERO).await
}

/// [`serve`], answering every request `latency` late (as object storage across a network
/// does: `cargo xtask bench` sweeps upload workers against it).
pub async fn serve_with_latency(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
    latency: Duration,
) -> anyhow::Result<()> {
    serve_on(root, listener, shutdown, latency, None, Arc::default()).await
}

/// [`serve_with_latency`] over HTTPS: every connection is TLS with `pki`'s server certificate
/// (for `localhost` and `127.0.0.1`), so a client must trust `pki.ca` (`--s3-ca-file`).
pub async fn serve_tls(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
    latency: Duration,
    pki: &crate::pki::StorePki,
) -> anyhow::Result<()> {
    let acceptor = tls_acceptor(pki)?;
    serve_on(
        root,
        listener,
        shutdown,
        latency,
        Some(acceptor),
        Arc::default(),
    )
    .await
}

/// TLS 1.2 and 1.3 with aws-lc, as S3 offers them, and HTTP/1.1 (what the SDK speaks).
fn tls_acceptor(pki: &crate::pki::StorePki) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(pki.server.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the store's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.server.key.as_bytes())
        .context("the store's private key")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the store's certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The accept loop of [`serve_with_latency`] and [`serve_tls`]: each connection served on a
/// task of its own (its TLS handshake too, so a silent client holds up no other). Object
/// puts are counted in `payloads`.
async fn serve_on(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
    latency: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    payloads: Arc<Payloads>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| anyhow::anyhow!("opening the store in {}: {e:?}", root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        Faulty {
            inner: b.build(),
            flag: Arc::new(fault_flag(root)),
            latency,
            writes: Arc::default(),
            payloads,
        }
    };
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let socket = tokio::select! {
            r = listener.accept() => match r {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an S3 connection failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (http, service, tls, watcher) = (
            http.clone(),
            service.clone(),
            tls.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let conn = http.serve_connection(TokioIo::new(socket), service);
                let _ = watcher.watch(conn.into_owned()).await;
                return;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                Ok(Ok(stream)) => {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake with an S3 client failed"),
                Err(_) => tracing::debug!("TLS handshake with an S3 client timed out"),
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// The embedded store serving HTTPS ([`start_tls`]).
#[derive(Debug)]
pub struct TlsStore {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The store's CA certificate (PEM): the uploader's `--s3-ca-file`.
    pub ca_file: PathBuf,
    /// That CA for a configuration made in code (`Config::s3_ca`) or [`client_with_ca`].
    pub ca: spillway_uploader::transport::StoreCa,
    /// How the bodies it received were signed.
    pub payloads: Arc<Payloads>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the embedded S3 server over HTTPS on an ephemeral port, with the throwaway CA and
/// certificate in [`tls_dir`]`(root)` (made there unless a store on this root
/// already made them).
pub async fn start_tls(root: PathBuf, stop: CancellationToken) -> anyhow::Result<TlsStore> {
    let (pki, files) = crate::pki::StorePki::load_or_generate(&tls_dir(&root))?;
    let ca = pki.store_ca()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let payloads = Arc::<Payloads>::default();
    Ok(TlsStore {
        endpoint: format!("https://{addr}"),
        ca_file: files.ca,
        ca,
        task: spawn(root, listener, stop, Some(&pki), Arc::clone(&payloads))?,
        payloads,
    })
}

/// Serves the store at `root` on `listener` on a task of its own, over HTTPS with `tls`, plain
/// HTTP otherwise, counting object puts in `payloads`.
pub fn spawn(
    root: PathBuf,
    listener: TcpListener,
    stop: CancellationToken,
    tls: Option<&crate::pki::StorePki>,
    payloads: Arc<Payloads>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let acceptor = tls.map(tls_acceptor).transpose()?;
    Ok(tokio::spawn(async move {
        serve_on(&root, listener, stop, Duration::ZERO, acceptor, payloads).await
    }))
}

/// An S3 client for the local store at `endpoint` (used to verify what was written).
pub async fn client(endpoint: &str) -> aws_sdk_s3::Client {
    client_with_ca(endpoint, None).await
}

/// [`client`], checking an `https://` store's certificate against `ca` (a [`serve_tls`] store's
/// [`crate::pki::StorePki::store_ca`]) instead of the system's roots.
pub async fn client_with_ca(
    endpoint: &str,
    ca: Option<&spillway_uploader::transport::StoreCa>,
) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "xtask");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .load()
        .await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .endpoint_url(endpoint)
        .force_path_style(true);
    if let Some(ca) = ca {
        conf = conf.http_client(ca.http_client());
    }
    aws_sdk_s3::Client::from_conf(conf.build())
}
