//! The store's transport flags as the daemon parses them: `--s3-payload-signing` (what SigV4
//! signs of a body, unsigned only over HTTPS) and `--s3-ca-file` (the private CA an HTTPS
//! store's certificate must chain to), refused at start with a message naming the flag.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use clap::{CommandFactory as _, Parser as _};
use spillway_uploader::config::ConfigError;
use spillway_uploader::store::Store;
use spillway_uploader::transport::{BodySigning, PayloadSigning};
use spillway_uploader::{Args, Config, StaticCredentials};

fn config(args: &[&str]) -> Result<Config, String> {
    let argv = ["uploader", "--insecure-internal"]
        .into_iter()
        .chain(args.iter().copied());
    let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
    args.flags.into_config().map_err(|e| e.to_string())
}

/// What a store client built from `config` signs of each body (no request is sent).
async fn body_signing(mut config: Config) -> BodySigning {
    config.credentials = Some(StaticCredentials {
        access_key_id: "k".into(),
        secret_access_key: "s".into(),
    });
    Store::new(&config).await.body_signing()
}

/// A throwaway CA certificate, as `--s3-ca-file` holds one.
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn auto_signs_the_body_exactly_when_the_store_is_plain_http() {
    let c = config(&[]).unwrap();
    assert_eq!(c.s3_payload_signing, PayloadSigning::Auto, "the default");
    assert_eq!(
        body_signing(c).await,
        BodySigning::Unsigned,
        "AWS S3 is HTTPS"
    );
    let https = config(&["--s3-endpoint", "https://s3.example.com"]).unwrap();
    assert_eq!(body_signing(https).await, BodySigning::Unsigned);
    let http = config(&["--s3-endpoint", "http://127.0.0.1:9000"]).unwrap();
    assert_eq!(body_signing(http).await, BodySigning::Sha256);
    // Signed is allowed over either transport.
    for endpoint in ["http://127.0.0.1:9000", "https://s3.example.com"] {
        let c = config(&["--s3-endpoint", endpoint, "--s3-payload-signing", "signed"]).unwrap();
        assert_eq!(body_signing(c).await, BodySigning::Sha256, "{endpoint}");
    }
    let c = config(&[
        "--s3-endpoint",
        "https://s3.example.com",
        "--s3-payload-signing=unsigned",
    ])
    .unwrap();
    assert_eq!(body_signing(c).await, BodySigning::Unsigned);
}

#[test]
fn unsigned_over_plain_http_is_refused_at_start() {
    let e = config(&[
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--s3-payload-signing",
        "unsigned",
    ])
    .unwrap_err();
    assert!(
        e.starts_with("--s3-payload-signing unsigned needs an https:// --s3-endpoint, got http://127.0.0.1:9000"),
        "{e}"
    );
    // `uploader drain` too, and a configuration built in code (as the tests' pipeline does).
    let drain = Args::try_parse_from([
        "uploader",
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--s3-payload-signing",
        "unsigned",
    ])
    .unwrap();
    assert!(matches!(
        drain.flags.into_drain_config(),
        Err(ConfigError::UnsignedOverHttp(_))
    ));
    let mut c = Config::local("s".into(), "http://127.0.0.1:9000".into(), "bucket".into());
    c.s3_payload_signing = PayloadSigning::Unsigned;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::UnsignedOverHttp(_))
    ));
    // A value that is none of the three is the parser's error.
    let e = config(&["--s3-payload-signing", "maybe"]).unwrap_err();
    assert!(e.contains("auto, signed, unsigned"), "{e}");
}

#[test]
fn both_flags_read_their_environment_variables() {
    let command = Args::command();
    let env = |id: &str| {
        command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
    };
    assert_eq!(
        env("s3_payload_signing").as_deref(),
        Some("SPILLWAY_S3_PAYLOAD_SIGNING")
    );
    assert_eq!(env("s3_ca_file").as_deref(), Some("SPILLWAY_S3_CA_FILE"));
}

#[test]
fn a_ca_file_is_read_and_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // Two CAs in one file, as a bundle during a rotation.
    std::fs::write(&ca, format!("{}{}", ca_pem(), ca_pem())).unwrap();
    let ca = ca.display().to_string();
    let c = config(&[
        "--s3-endpoint",
        "https://127.0.0.1:9443",
        "--s3-ca-file",
        &ca,
    ])
    .unwrap();
    assert_eq!(c.s3_ca.as_ref().map(|ca| ca.certificates()), Some(2));

    let e = config(&[
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--s3-ca-file",
        &ca,
    ])
    .unwrap_err();
    assert_eq!(
        e,
        "--s3-ca-file needs an https:// --s3-endpoint, got http://127.0.0.1:9000"
    );
    let e = config(&["--s3-ca-file", "/nonexistent/ca.pem"]).unwrap_err();
    assert!(
        e.starts_with("reading --s3-ca-file /nonexistent/ca.pem: "),
        "{e}"
    );
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = config(&["--s3-ca-file", &empty.display().to_string()]).unwrap_err();
    assert_eq!(
        e,
        format!("--s3-ca-file {} holds no PEM certificate", empty.display())
    );
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = config(&["--s3-ca-file", &bad.display().to_string()]).unwrap_err();
    assert!(
        e.starts_with(&format!(
            "--s3-ca-file {} certificate 0 cannot be a trust anchor",
            bad.display()
        )),
        "{e}"
    );
}
