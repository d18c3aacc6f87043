//! TLS of the QUIC endpoint: the server configuration, self-signed certificates for local use,
//! CA bundles. The certificate type and the client side live in `spillway_device::tls`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Host names the self-signed certificate is valid for.
pub const SELF_SIGNED_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

pub use spillway_device::tls::{TlsMaterial, client_config, client_config_with, provider};

/// A fresh self-signed certificate for [`SELF_SIGNED_NAMES`], for local use and tests.
pub fn self_signed() -> anyhow::Result<TlsMaterial> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| (*s).to_owned()).collect();
    let ck = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    Ok(TlsMaterial {
        cert_chain: vec![ck.cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
    })
}

/// A fresh self-signed certificate for [`SELF_SIGNED_NAMES`] as PEM (certificate, private key),
/// for local tooling that must restart ingest with the same certificate.
pub fn self_signed_pem() -> anyhow::Result<(String, String)> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| (*s).to_owned()).collect();
    let ck = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
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

/// A TLS client configuration that trusts the system's CA roots (a `wss://` --omi-upstream).
pub fn system_roots_client() -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A certificate the store refuses is skipped, as rustls' own loaders do.
        let _ = roots.add(cert);
    }
    anyhow::ensure!(!roots.is_empty(), "no CA certificates found on this system");
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
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
