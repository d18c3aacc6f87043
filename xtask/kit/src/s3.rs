//! An S3-compatible server on loopback, embedded (`s3s` + `s3s-fs`): the default object store
//! of `cargo xtask up` and of the end-to-end tests. It verifies SigV4 signatures and CRC32C
//! checksums, so uploads are checked as a real store would, and honours conditional writes
//! (`If-None-Match: *`, `If-Match`) atomically, as S3 does (see [`Writes`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

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
pub fn fault_flag(root: &Path) -> std::path::PathBuf {
    let mut p = root.as_os_str().to_owned();
    p.push(".fail");
    p.into()
}

/// The S3 service with fault injection in front.
#[derive(Clone)]
struct Faulty {
    inner: s3s::service::S3Service,
    flag: Arc<std::path::PathBuf>,
    latency: std::time::Duration,
    writes: Arc<Writes>,
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

/// Serves the store rooted at `root` (one directory per bucket) until `shutdown` fires.
pub async fn serve(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_latency(root, listener, shutdown, std::time::Duration::ZERO).await
}

/// [`serve`], answering every request `latency` late (as object storage across a network
/// does: `cargo xtask bench` sweeps upload workers against it).
pub async fn serve_with_latency(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
    latency: std::time::Duration,
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
        let conn = http.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// An S3 client for the local store at `endpoint` (used to verify what was written).
pub async fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "xtask");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}
