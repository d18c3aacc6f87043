//! A throwaway PKI for the ingest → uploader link: one CA, a server certificate for the
//! uploaders and a client certificate for the ingests, made with rcgen. `cargo xtask up`, chaos,
//! the bench and the tests run the link with it, so the TLS path is the one exercised.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use spillway_proto::link::LinkTls;

/// Names the uploaders' certificate is valid for: loopback, and the headless Service deploy/
/// runs them behind.
pub const UPLOADER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "spillway-uploader"];

/// PEM certificate and private key.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA and the two certificates it signed.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca: String,
    pub uploader: Pem,
    pub ingest: Pem,
}

/// Where [`DevPki::write`] put the files.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub ca: PathBuf,
    pub uploader_cert: PathBuf,
    pub uploader_key: PathBuf,
    pub ingest_cert: PathBuf,
    pub ingest_key: PathBuf,
}

impl PkiFiles {
    /// The uploader's `--internal-*` flags.
    pub fn uploader_args(&self) -> Vec<String> {
        flags(&self.ca, &self.uploader_cert, &self.uploader_key)
    }

    /// Ingest's `--internal-*` flags.
    pub fn ingest_args(&self) -> Vec<String> {
        flags(&self.ca, &self.ingest_cert, &self.ingest_key)
    }
}

fn flags(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--internal-ca".into(),
        ca.display().to_string(),
        "--internal-cert".into(),
        cert.display().to_string(),
        "--internal-key".into(),
        key.display().to_string(),
    ]
}

fn leaf(
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<Pem> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

impl DevPki {
    /// A fresh CA ("spillway-dev-ca") and its two certificates.
    pub fn generate() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "spillway-dev-ca");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        Ok(Self {
            ca: ca_cert.pem(),
            uploader: leaf(
                &UPLOADER_NAMES,
                "spillway-uploader",
                ExtendedKeyUsagePurpose::ServerAuth,
                &issuer,
            )?,
            ingest: leaf(
                &["spillway-ingest"],
                "spillway-ingest",
                ExtendedKeyUsagePurpose::ClientAuth,
                &issuer,
            )?,
        })
    }

    /// The uploader's side of the link.
    pub fn uploader_tls(&self) -> LinkTls {
        LinkTls::from_pem(
            self.ca.as_bytes(),
            self.uploader.cert.as_bytes(),
            self.uploader.key.as_bytes(),
        )
    }

    /// Ingest's side of the link (also what a test uses to call an uploader as ingest does).
    pub fn ingest_tls(&self) -> LinkTls {
        LinkTls::from_pem(
            self.ca.as_bytes(),
            self.ingest.cert.as_bytes(),
            self.ingest.key.as_bytes(),
        )
    }

    /// Writes the files into `dir/pki/` (keys readable by the owner only).
    pub fn write(&self, dir: &Path) -> anyhow::Result<PkiFiles> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
        let files = PkiFiles {
            ca: pki.join("ca.pem"),
            uploader_cert: pki.join("uploader.pem"),
            uploader_key: pki.join("uploader-key.pem"),
            ingest_cert: pki.join("ingest.pem"),
            ingest_key: pki.join("ingest-key.pem"),
        };
        for (path, text, secret) in [
            (&files.ca, &self.ca, false),
            (&files.uploader_cert, &self.uploader.cert, false),
            (&files.uploader_key, &self.uploader.key, true),
            (&files.ingest_cert, &self.ingest.cert, false),
            (&files.ingest_key, &self.ingest.key, true),
        ] {
            write_file(path, text, secret)?;
        }
        Ok(files)
    }
}

fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
