//! How the uploader reaches the store: what protects a `PutObject`'s body on the way
//! (`--s3-payload-signing`) and which CA the store's certificate must chain to (`--s3-ca-file`).
//!
//! Every body carries its CRC32C (`x-amz-checksum-crc32c`), made from the checksum ingest
//! computed as the audio arrived, and the store verifies it: that is what keeps damaged bytes
//! out of the bucket on every transport. What the SigV4 signature covers besides depends on the
//! transport:
//!
//! - over HTTPS, `UNSIGNED-PAYLOAD`: TLS already authenticates every byte between the uploader
//!   and the store, so a SHA-256 of the body (computed here, and again by the store to check
//!   it) would protect nothing more;
//! - over plain HTTP, the body's SHA-256: nothing else stops a machine in the path from
//!   replacing the body *and* its CRC32C, which no secret protects.

use aws_sdk_s3::config::SharedHttpClient;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// `--s3-payload-signing`: what SigV4 signs of a `PutObject`'s body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PayloadSigning {
    /// `unsigned` when the endpoint is `https://` (AWS S3 itself is), `signed` otherwise.
    #[default]
    Auto,
    /// The body's SHA-256, over either transport.
    Signed,
    /// `UNSIGNED-PAYLOAD`; refused unless the endpoint is `https://`.
    Unsigned,
}

/// What the signature covers of a body, once the flag met the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySigning {
    /// The body's SHA-256 (`x-amz-content-sha256: <hex>`), hashed once per upload.
    Sha256,
    /// `x-amz-content-sha256: UNSIGNED-PAYLOAD`: the body is never hashed with SHA-256.
    Unsigned,
}

impl PayloadSigning {
    /// What this flag means against `endpoint` (`None`: AWS S3, which is HTTPS).
    /// [`PayloadSigning::check`] refuses `unsigned` over plain HTTP at start.
    pub fn for_endpoint(self, endpoint: Option<&str>) -> BodySigning {
        match self {
            Self::Signed => BodySigning::Sha256,
            Self::Unsigned => BodySigning::Unsigned,
            Self::Auto if is_https(endpoint) => BodySigning::Unsigned,
            Self::Auto => BodySigning::Sha256,
        }
    }

    /// Refuses `unsigned` over plain HTTP: a body that neither TLS nor the signature
    /// protects could be changed in flight, its CRC32C with it.
    pub fn check(self, endpoint: Option<&str>) -> Result<(), UnsignedOverHttp> {
        match (self, endpoint) {
            (Self::Unsigned, Some(e)) if !is_https(Some(e)) => Err(UnsignedOverHttp {
                endpoint: e.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// `--s3-payload-signing unsigned` with an endpoint that is not `https://`.
#[derive(Debug, thiserror::Error)]
#[error(
    "--s3-payload-signing unsigned needs an https:// --s3-endpoint, got {endpoint}: over plain \
     HTTP nothing would stop a body (and its CRC32C) from being changed in flight; use auto or signed"
)]
pub struct UnsignedOverHttp {
    pub endpoint: String,
}

/// Whether the store is reached over TLS: an `https://` endpoint, or AWS S3 itself (`None`).
pub fn is_https(endpoint: Option<&str>) -> bool {
    endpoint.is_none_or(|e| {
        e.get(.."https://".len())
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    })
}

/// Why a CA file cannot be trusted as the store's.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("is not PEM: {0}")]
    Pem(String),
    #[error("cannot make a TLS client: {0}")]
    Tls(String),
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("certificate {index} cannot be a trust anchor: {reason}")]
    Unusable { index: usize, reason: String },
}

/// The CA (one or more PEM certificates) the store's certificate must chain to, in place of
/// the system's roots: for a store whose certificate a private CA issued. Checked when made,
/// so the HTTPS client built from it cannot fail later.
#[derive(Clone)]
pub struct StoreCa {
    certificates: usize,
    client: SharedHttpClient,
}

impl std::fmt::Debug for StoreCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCa")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl StoreCa {
    /// Every certificate in `pem` (other PEM sections are ignored) becomes a trust anchor; at
    /// least one must, and each must parse as one.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CaError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(CaError::NoCertificate);
        }
        // The checks the HTTPS connector makes when it loads the trust store (it panics on a
        // failure there): made here first, so a bad file is a start-up error.
        let mut roots = rustls::RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| CaError::Unusable {
                index,
                reason: e.to_string(),
            })?;
        }
        let context = TlsContext::builder()
            .with_trust_store(TrustStore::empty().with_pem_certificate(pem))
            .build()
            .map_err(|e| CaError::Tls(e.to_string()))?;
        let client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context)
            .build_https();
        Ok(Self {
            certificates: certs.len(),
            client,
        })
    }

    /// How many certificates it trusts.
    pub fn certificates(&self) -> usize {
        self.certificates
    }

    /// The S3 client's HTTP client: HTTPS checked against this CA alone (plain HTTP too, for
    /// an `http://` endpoint, which configuration refuses with a CA file).
    pub fn http_client(&self) -> SharedHttpClient {
        self.client.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn auto_leaves_the_body_unsigned_exactly_over_https() {
        use BodySigning::{Sha256, Unsigned};
        for (endpoint, auto) in [
            (Some("https://s3.example.com"), Unsigned),
            (Some("HTTPS://127.0.0.1:9000"), Unsigned),
            (None, Unsigned),
            (Some("http://127.0.0.1:9000"), Sha256),
            (Some("127.0.0.1:9000"), Sha256),
            (Some("httpsx"), Sha256),
        ] {
            assert_eq!(
                PayloadSigning::Auto.for_endpoint(endpoint),
                auto,
                "{endpoint:?}"
            );
            assert_eq!(PayloadSigning::Signed.for_endpoint(endpoint), Sha256);
            assert_eq!(PayloadSigning::Unsigned.for_endpoint(endpoint), Unsigned);
            assert!(PayloadSigning::Auto.check(endpoint).is_ok());
            assert!(PayloadSigning::Signed.check(endpoint).is_ok());
            assert_eq!(
                PayloadSigning::Unsigned.check(endpoint).is_ok(),
                auto == Unsigned,
                "{endpoint:?}"
            );
        }
    }

    #[test]
    fn a_ca_file_must_hold_usable_certificates() {
        assert!(matches!(
            StoreCa::from_pem(b"no pem here"),
            Err(CaError::NoCertificate)
        ));
        let key_only = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            StoreCa::from_pem(key_only),
            Err(CaError::NoCertificate)
        ));
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            StoreCa::from_pem(garbage),
            Err(CaError::Unusable { index: 0, .. })
        ));
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(StoreCa::from_pem(broken).is_err());
    }
}
