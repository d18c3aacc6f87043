//! TLS material for the QUIC endpoint, and the rustls configurations of both ends.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Host names the self-signed certificate is valid for.
pub const SELF_SIGNED_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

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

    /// A fresh self-signed certificate for [`SELF_SIGNED_NAMES`], for local use and tests.
    pub fn self_signed() -> anyhow::Result<Self> {
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(names)
            .context("generating a self-signed certificate")?;
        Ok(Self {
            cert_chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
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

/// A fresh self-signed certificate for [`SELF_SIGNED_NAMES`] as PEM (certificate, private key),
/// for local tooling that must restart ingest with the same certificate.
pub fn self_signed_pem() -> anyhow::Result<(String, String)> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| (*s).to_owned()).collect();
    let ck = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The QUIC server configuration: TLS 1.3, ALPN `spillway/1` only. With `device_ca` (PEM roots,
/// `--auth mtls`) every device must present a client certificate that chains to them.
pub fn server_config(
    tls: &TlsMaterial,
    device_ca: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<quinn::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match device_ca {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for root in roots {
                store
                    .add(root.clone())
                    .context("adding a --device-ca certificate")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                provider(),
            )
            .build()
            .context("building the device certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut crypto = builder
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .context("TLS certificate and key do not match")?;
    crypto.alpn_protocols = vec![spillway_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Reads PEM certificates (a CA bundle).
pub fn pem_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
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
