//! Throwaway PKIs, made with rcgen:
//!
//! - [`DevPki`], the ingest → uploader link's: one CA, a server certificate for the uploaders
//!   and a client certificate for the ingests. `cargo xtask up`, chaos, the bench and the tests
//!   run the link with it, so the TLS path is the one exercised.
//! - [`StorePki`], the embedded store's when it serves HTTPS (`s3::serve_tls`): a CA of its
//!   own and a server certificate for loopback, the CA being what the uploader's
//!   `--s3-ca-file` trusts.

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

/// Names the embedded store's certificate is valid for: how a client on this machine dials it.
pub const STORE_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

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

/// A fresh self-signed CA named `common_name`: its PEM certificate, and the issuer that signs
/// with it.
fn ca(common_name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    Ok((ca_cert.pem(), Issuer::new(ca_params, ca_key)))
}

impl DevPki {
    /// A fresh CA ("spillway-dev-ca") and its two certificates.
    pub fn generate() -> anyhow::Result<Self> {
        let (ca, issuer) = ca("spillway-dev-ca")?;
        Ok(Self {
            ca,
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

/// The embedded store's throwaway PKI: a CA ("spillway-store-ca") and the server certificate
/// it signed for [`STORE_NAMES`].
#[derive(Debug, Clone)]
pub struct StorePki {
    /// What a client must trust (the uploader's `--s3-ca-file`).
    pub ca: String,
    pub server: Pem,
}

/// Where [`StorePki::write`] put the files.
#[derive(Debug, Clone)]
pub struct StorePkiFiles {
    /// The CA certificate: pass it as `--s3-ca-file`.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl StorePkiFiles {
    /// The files in `dir`: `ca.pem`, `cert.pem`, `key.pem`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

impl StorePki {
    /// A fresh CA and a server certificate for loopback.
    pub fn generate() -> anyhow::Result<Self> {
        let (ca, issuer) = ca("spillway-store-ca")?;
        Ok(Self {
            ca,
            server: leaf(
                &STORE_NAMES,
                "spillway-store",
                ExtendedKeyUsagePurpose::ServerAuth,
                &issuer,
            )?,
        })
    }

    /// Writes the files into `dir` (created; the key readable by the owner only).
    pub fn write(&self, dir: &Path) -> anyhow::Result<StorePkiFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = StorePkiFiles::in_dir(dir);
        write_file(&files.ca, &self.ca, false)?;
        write_file(&files.cert, &self.server.cert, false)?;
        write_file(&files.key, &self.server.key, true)?;
        Ok(files)
    }

    /// The PKI in `dir` if [`StorePki::write`] left one there, otherwise a fresh one written
    /// there: a store restarted on the same directory keeps the certificate its clients trust.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<(Self, StorePkiFiles)> {
        let files = StorePkiFiles::in_dir(dir);
        if files.ca.is_file() && files.cert.is_file() && files.key.is_file() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let pki = Self {
                ca: read(&files.ca)?,
                server: Pem {
                    cert: read(&files.cert)?,
                    key: read(&files.key)?,
                },
            };
            return Ok((pki, files));
        }
        let pki = Self::generate()?;
        let files = pki.write(dir)?;
        Ok((pki, files))
    }

    /// The CA as the uploader trusts it (`--s3-ca-file`), for clients made in this process.
    pub fn store_ca(&self) -> anyhow::Result<spillway_uploader::transport::StoreCa> {
        spillway_uploader::transport::StoreCa::from_pem(self.ca.as_bytes())
            .context("the store's throwaway CA")
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
