//! `uploader omi-decrypt`, the real binary: an object sealed as Omi stores it comes out as the
//! PCM that went in, raw or in a WAV; a wrong uid or secret exits 1 and writes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use spillway_uploader::seal::Sealer;
use zeroize::Zeroizing;

const SECRET: &str = "an omi-decrypt test secret, 32 bytes or more";
const UID: &str = "V1Ak3cR9vXhQ2mZpL0tYw8sEoN4u";

/// A secret file (as `echo` writes it) and an object of three frames, as Omi merges chunks.
struct Setup {
    dir: tempfile::TempDir,
    secret: PathBuf,
    object: PathBuf,
    pcm: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let sealer = Sealer::from_secret(Zeroizing::new(SECRET.as_bytes().to_vec())).unwrap();
    let pcm: Vec<u8> = (0..16_000u32)
        .flat_map(|i| ((i % 400) as i16 * 80 - 16_000).to_le_bytes())
        .collect();
    let object = dir.path().join("00001.batch.enc");
    let stored: Vec<u8> = [&pcm[..3_200], &pcm[3_200..3_202], &pcm[3_202..]]
        .iter()
        .flat_map(|part| sealer.seal(UID, part).unwrap())
        .collect();
    std::fs::write(&object, stored).unwrap();
    Setup {
        dir,
        secret,
        object,
        pcm,
    }
}

fn uploader(args: &[&str], secret: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uploader"));
    cmd.arg("omi-decrypt")
        .env_remove("SPILLWAY_OMI_SECRET_FILE");
    if let Some(secret) = secret {
        cmd.arg("--secret-file").arg(secret);
    }
    cmd.args(args);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn decrypts_to_raw_pcm_and_to_wav() {
    let s = setup();
    let raw = s.dir.path().join("out.pcm");
    ok(&run(&mut uploader(
        &["--uid", UID, path(&s.object), path(&raw)],
        Some(&s.secret),
    )));
    assert_eq!(std::fs::read(&raw).unwrap(), s.pcm);

    // The secret file from the environment, and a WAV at a given rate.
    let wav = s.dir.path().join("out.wav");
    let mut cmd = uploader(
        &[
            "--uid",
            UID,
            "--wav",
            "--sample-rate",
            "8000",
            path(&s.object),
            path(&wav),
        ],
        None,
    );
    ok(&run(cmd.env("SPILLWAY_OMI_SECRET_FILE", &s.secret)));
    let mut reader = hound::WavReader::open(&wav).unwrap();
    let spec = reader.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (1, 8000, 16)
    );
    let samples: Vec<u8> = reader
        .samples::<i16>()
        .flat_map(|s| s.unwrap().to_le_bytes())
        .collect();
    assert_eq!(samples, s.pcm);
    let leftovers = std::fs::read_dir(s.dir.path()).unwrap().count();
    assert_eq!(
        leftovers, 4,
        "secret, object, out.pcm, out.wav: no partial files"
    );

    // Standard input to standard output, WAV at the default 16 kHz.
    let mut cmd = uploader(&["--uid", UID, "--wav", "-", "-"], Some(&s.secret));
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let object = std::fs::read(&s.object).unwrap();
    child.stdin.take().unwrap().write_all(&object).unwrap();
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let reader = hound::WavReader::new(std::io::Cursor::new(&out.stdout)).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000);
    assert_eq!(reader.len() as usize, s.pcm.len() / 2);
}

#[test]
fn a_wrong_uid_or_secret_exits_1_and_writes_nothing() {
    let s = setup();
    let out_path = s.dir.path().join("out.pcm");
    let other_secret = s.dir.path().join("other-secret");
    std::fs::write(&other_secret, "another secret of at least thirty-two bytes").unwrap();
    for (uid, secret) in [("someone-else", &s.secret), (UID, &other_secret)] {
        let out = run(&mut uploader(
            &["--uid", uid, path(&s.object), path(&out_path)],
            Some(secret),
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("does not authenticate: wrong uid or secret"),
            "{stderr}"
        );
        assert!(!out_path.exists(), "no output, not even a partial one");
    }
    // An existing output is left as it was.
    std::fs::write(&out_path, b"kept").unwrap();
    let out = run(&mut uploader(
        &["--uid", "someone-else", path(&s.object), path(&out_path)],
        Some(&s.secret),
    ));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&out_path).unwrap(), b"kept");
    assert_eq!(std::fs::read_dir(s.dir.path()).unwrap().count(), 4);

    // A short secret is refused naming its file, never showing it.
    std::fs::write(&other_secret, "hunter2\n").unwrap();
    let out = run(&mut uploader(
        &["--uid", UID, path(&s.object), path(&out_path)],
        Some(&other_secret),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("other-secret") && stderr.contains("7 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // --sample-rate means nothing without --wav, and is refused rather than ignored.
    let out = run(&mut uploader(
        &[
            "--uid",
            UID,
            "--sample-rate",
            "8000",
            path(&s.object),
            path(&out_path),
        ],
        Some(&s.secret),
    ));
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
}
