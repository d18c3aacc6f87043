//! TLS for the device side: a certificate chain with its key (a device's own identity for an
//! ingest running `--auth mtls`, or ingest's server certificate), and the QUIC client
//! configuration (TLS 1.3, aws-lc).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsMaterial {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// Loads a PEM certificate chain and PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
        if cert_chain.is_empty() {
            anyhow::bail!("{} holds no PEM certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading TLS private key {}", key.display()))?;
        Ok(Self { cert_chain, key })
    }

    /// The leaf certificate in DER, which a local client adds to its roots.
    pub fn leaf_der(&self) -> &[u8] {
        self.cert_chain.first().map_or(&[], |c| c.as_ref())
    }

    /// Writes the leaf certificate (DER) to `path`, creating parent directories.
    pub fn write_cert_der(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, self.leaf_der())
            .with_context(|| format!("writing certificate to {}", path.display()))
    }
}

/// The crypto provider both ends use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A QUIC client configuration trusting `roots` (DER certificates) and offering `alpn`;
/// `identity` is the device's own certificate for an ingest running `--auth mtls`.
pub fn client_config(roots: &[&[u8]], alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    client_config_with(roots, alpn, None)
}

/// [`client_config`] presenting `identity`.
pub fn client_config_with(
    roots: &[&[u8]],
    alpn: &[u8],
    identity: Option<&TlsMaterial>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der.to_vec()))
            .context("adding a trusted certificate")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store);
    let mut crypto = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
            .context("device certificate and key do not match")?,
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}
