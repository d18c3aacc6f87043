//! An S3-compatible server on loopback, embedded (`s3s` + `s3s-fs`): the default object store
//! of `cargo xtask up` and of the end-to-end tests. It verifies SigV4 signatures and CRC32C
//! checksums, so uploads are checked as a real store would.

use std::path::Path;

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

/// Serves the store rooted at `root` (one directory per bucket) until `shutdown` fires.
pub async fn serve(
    root: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| anyhow::anyhow!("opening the store in {}: {e:?}", root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        b.build()
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
