//! [`Sealer`] against an independent implementation of Omi's format: `seal_reference.py`,
//! written with Python's `cryptography` (HKDF and AESGCM from `cryptography.hazmat`, as Omi's
//! backend uses them). Rust seals and Python opens, checking each frame byte for byte; Python
//! seals in several frames and Rust opens.
//!
//! The interpreter is `$SPILLWAY_PYTHON`, else `python3`. Without `cryptography` these tests
//! fail (they do not skip): `export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)` makes a
//! venv that has it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use spillway_uploader::seal::{SealError, Sealer};
use zeroize::Zeroizing;

const SECRET: &str = "a test ENCRYPTION_SECRET of more than 32 bytes: ünïcödé";

/// Omi's uids are Firebase ids; an empty and a non-ASCII one check the salt's encoding.
const UIDS: [&str; 4] = ["V1Ak3cR9vXhQ2mZpL0tYw8sEoN4u", "user-42", "", "üser-用户"];

fn sealer() -> Sealer {
    Sealer::from_secret(Zeroizing::new(SECRET.as_bytes().to_vec())).unwrap()
}

/// The reference script run by an interpreter that has `cryptography`, or a failure that says
/// how to get one.
fn reference() -> Command {
    let python = std::env::var_os("SPILLWAY_PYTHON").unwrap_or_else(|| "python3".into());
    let how = "run `export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)` from the \
               repository root for a Python that has it";
    let probe = Command::new(&python)
        .args(["-c", "import cryptography"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{python:?} cannot import `cryptography` ({}); {how}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run {python:?} ({e}); {how}"),
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seal_reference.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).env("ENCRYPTION_SECRET", SECRET);
    cmd
}

fn run(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PCM16LE-like bytes of every value, of odd and even lengths.
fn plaintexts() -> Vec<Vec<u8>> {
    let ramp = |n: usize| (0..n).map(|i| (i * 7 + i / 256) as u8).collect::<Vec<u8>>();
    vec![Vec::new(), ramp(1), ramp(320), ramp(32_001)]
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn python_opens_what_rust_seals_and_writes_the_same_frames() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealer();
    for uid in UIDS {
        // One frame per plaintext, concatenated as Omi merges chunks.
        let mut stored = Vec::new();
        for pcm in plaintexts() {
            stored.extend(s.seal(uid, &pcm).unwrap());
        }
        let (sealed, opened) = (file(dir.path(), "rust.enc"), file(dir.path(), "python.pcm"));
        std::fs::write(&sealed, &stored).unwrap();
        let mut cmd = reference();
        cmd.args(["open", uid]).arg(&sealed).arg(&opened);
        run(cmd);
        assert_eq!(
            std::fs::read(&opened).unwrap(),
            plaintexts().concat(),
            "uid {uid:?}"
        );
    }
}

#[test]
fn rust_opens_what_python_seals_in_several_frames() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealer();
    let pcm: Vec<u8> = plaintexts().concat();
    for uid in UIDS {
        let (plain, stored) = (file(dir.path(), "in.pcm"), file(dir.path(), "python.enc"));
        std::fs::write(&plain, &pcm).unwrap();
        let mut cmd = reference();
        cmd.args(["seal", uid])
            .arg(&plain)
            .arg(&stored)
            .arg("0,1,3200,0,28000,0");
        run(cmd);
        let stored = std::fs::read(&stored).unwrap();
        let frames = 6;
        assert_eq!(stored.len(), pcm.len() + frames * (4 + 12 + 16));
        assert_eq!(s.open(uid, &stored).unwrap(), pcm, "uid {uid:?}");

        let other = if uid == "user-42" {
            "user-43"
        } else {
            "user-42"
        };
        let wrong = s.open(other, &stored).unwrap_err();
        assert!(
            matches!(
                wrong,
                SealError::Authentication {
                    index: 0,
                    offset: 0
                }
            ),
            "{wrong}"
        );
    }
}
