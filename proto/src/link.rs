//! The ingest → uploader link's security: TLS with a certificate at both ends, each chained to
//! one CA that both daemons are given. The uploader answers only clients whose certificate the
//! CA signed; ingest talks only to uploaders whose certificate the CA signed for the name it
//! dials. Certificates and keys are PEM files (Kubernetes Secrets in deploy/), read at start.
//!
//! Plaintext is [`Link::Insecure`], which each daemon allows only when asked by name
//! (`--insecure-internal`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a TLS handshake on the link may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The link's TLS material: the CA the peer's certificate must chain to, and this end's own
/// certificate chain and key.
#[derive(Clone)]
pub struct LinkTls {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for LinkTls {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").finish_non_exhaustive()
    }
}

/// Plaintext, or mutually authenticated TLS.
#[derive(Debug, Clone)]
pub enum Link {
    /// Plaintext HTTP/2, no authentication (`--insecure-internal`).
    Insecure,
    Tls(LinkTls),
}

/// A file of the link's TLS material that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

fn read_pem(what: &'static str, path: &Path, expected: &'static str) -> Result<Vec<u8>, LinkError> {
    let bytes = std::fs::read(path).map_err(|source| LinkError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    // A key may be PKCS#8 ("PRIVATE KEY"), SEC1 ("EC PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY").
    let found = if expected == "PRIVATE KEY" {
        text.contains(" PRIVATE KEY-----")
    } else {
        text.contains(&format!("-----BEGIN {expected}"))
    };
    if !found {
        return Err(LinkError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

impl LinkTls {
    /// Loads the CA certificate(s), this end's certificate chain and its private key.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, LinkError> {
        Ok(Self::from_pem(
            &read_pem("--internal-ca", ca, "CERTIFICATE")?,
            &read_pem("--internal-cert", cert, "CERTIFICATE")?,
            &read_pem("--internal-key", key, "PRIVATE KEY")?,
        ))
    }

    /// The same from PEM bytes (tests and local tooling).
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Self {
        Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        }
    }

    /// The uploader's side: its certificate, and client certificates required from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Ingest's side: the CA to check the uploader's certificate against `server_name`, and
    /// ingest's own certificate.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// The link's flags, the same on both daemons (`#[command(flatten)]`).
#[cfg(feature = "flags")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LinkArgs {
    /// PEM CA certificate(s) the peer's certificate must chain to (ingest's client certificate
    /// on the uploader; every uploader's on ingest). With --internal-cert and --internal-key the
    /// ingest → uploader link is mutually authenticated TLS.
    #[arg(long, env = "SPILLWAY_INTERNAL_CA", requires_all = ["internal_cert", "internal_key"])]
    pub internal_ca: Option<PathBuf>,
    /// PEM certificate chain this daemon presents on the link.
    #[arg(long, env = "SPILLWAY_INTERNAL_CERT", requires_all = ["internal_ca", "internal_key"])]
    pub internal_cert: Option<PathBuf>,
    /// PEM private key of --internal-cert.
    #[arg(long, env = "SPILLWAY_INTERNAL_KEY", requires_all = ["internal_ca", "internal_cert"])]
    pub internal_key: Option<PathBuf>,
    /// Plaintext, unauthenticated link: anyone who reaches the uploader's --listen can put
    /// chunks. Only for a private loopback setup.
    #[arg(
        long,
        env = "SPILLWAY_INSECURE_INTERNAL",
        conflicts_with = "internal_ca"
    )]
    pub insecure_internal: bool,
}

/// Neither TLS material nor `--insecure-internal` was given.
#[derive(Debug, thiserror::Error)]
#[error(
    "the ingest → uploader link needs --internal-ca, --internal-cert and --internal-key (mutual TLS), or --insecure-internal for plaintext"
)]
pub struct NoLink;

#[cfg(feature = "flags")]
impl LinkArgs {
    /// The link these flags ask for. `None` when they ask for nothing (the caller decides
    /// whether that is an error: it is for a daemon that serves or calls the link).
    pub fn link(&self) -> Result<Option<Link>, LinkError> {
        match (&self.internal_ca, &self.internal_cert, &self.internal_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Ok(Some(Link::Tls(LinkTls::from_files(ca, cert, key)?)))
            }
            _ if self.insecure_internal => Ok(Some(Link::Insecure)),
            _ => Ok(None),
        }
    }
}
