//! The Omi pusher front end against an independent client: `omi_listen.py`, a listen session
//! written in Python (`websockets`) from `../shared/omi-pusher.md` alone, plays a timeline-2
//! session (two conversations, heartbeats, a broken connection and a reconnect that resends the
//! last seconds, a 104) to the real ingest of an in-process pipeline, checks the replies and
//! writes what the store should hold. Every object under the uid is then read back and compared
//! byte for byte (opened with Omi's key derivation when the uploader seals).
//!
//! The interpreter is `$SPILLWAY_PYTHON`, else `python3`. Without `websockets` these tests fail
//! (they do not skip): `export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)` makes a venv
//! that has it.

// An integration-test crate: every helper here is test code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use spillway_kit::pipeline::{Options, Pipeline};

const LIMIT: Duration = Duration::from_secs(180);
/// How long the store may take to hold every chunk once the client has closed.
const SETTLE: Duration = Duration::from_secs(30);
const CHUNK_SECONDS: u32 = 2;
/// Seconds of capture the client sends (as fast as ingest takes them).
const SECONDS: u32 = 46;
const SECRET: &[u8] = b"an-omi-encryption-secret-of-32-bytes!";

/// An interpreter that has `websockets`, or a failure that says how to get one.
fn python() -> std::ffi::OsString {
    let python = std::env::var_os("SPILLWAY_PYTHON").unwrap_or_else(|| "python3".into());
    let how = "run `export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)` from the \
               repository root for a Python that has it";
    let probe = std::process::Command::new(&python)
        .args(["-c", "import websockets.asyncio.client"])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{python:?} cannot import `websockets` ({}); {how}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => panic!("cannot run {python:?} ({e}); {how}"),
    }
}

/// One chunk the client expects, as its `expected.json` lists it.
#[derive(Debug)]
struct Chunk {
    conversation: String,
    /// The object's key but for `.bin` / `.enc`.
    key: String,
    v2_start: String,
    samples: u64,
}

/// Reads the client's expectations: its chunks in key order, and each conversation's audio.
fn expectations(dir: &Path) -> (Vec<Chunk>, BTreeMap<String, Vec<u8>>) {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
    let chunks = doc["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Chunk {
            conversation: text(&c["conversation"]),
            key: text(&c["key"]),
            v2_start: text(&c["v2_start"]),
            samples: c["samples"].as_u64().unwrap(),
        })
        .collect();
    let audio = doc["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let c = text(c);
            let pcm = std::fs::read(dir.join(format!("{c}.pcm"))).unwrap();
            (c, pcm)
        })
        .collect();
    (chunks, audio)
}

/// The stored objects under `prefix`, key → audio (opened when `sealer` is given).
async fn stored(
    p: &Pipeline,
    prefix: &str,
    uid: &str,
    sealer: Option<&spillway_uploader::seal::Sealer>,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for key in p.object_keys(prefix).await.unwrap() {
        let Some(body) = p.object(&key).await.unwrap() else {
            continue;
        };
        let audio = match sealer {
            Some(s) => s
                .open(uid, &body)
                .unwrap_or_else(|e| panic!("{key} does not open: {e}")),
            None => body,
        };
        out.insert(key, audio);
    }
    out
}

/// Runs the client against a fresh pipeline at `rate`, sealed when `secret` is given, and
/// checks the store against what the client says it should hold.
async fn session(uid: &str, rate: u32, seed: u32, secret: Option<&[u8]>) {
    let p = Pipeline::start(Options {
        chunk_seconds: CHUNK_SECONDS,
        omi_secret: secret.map(<[u8]>::to_vec),
        ..Options::default()
    })
    .await
    .unwrap();
    let sealer = secret.map(|s| {
        spillway_uploader::seal::Sealer::from_secret(zeroize::Zeroizing::new(s.to_vec())).unwrap()
    });
    let ext = if secret.is_some() { "enc" } else { "bin" };

    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/omi_listen.py");
    let started = Instant::now();
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(format!("ws://{}", p.ingest_omi))
        .args(["--uid", uid])
        .args(["--rate", &rate.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--seconds", &SECONDS.to_string()])
        .args(["--chunk-seconds", &CHUNK_SECONDS.to_string()])
        .arg("--out")
        .arg(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "omi_listen.py: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("the listen session took {:?}", started.elapsed());
    let (chunks, audio) = expectations(dir.path());
    let want: Vec<String> = chunks.iter().map(|c| format!("{}.{ext}", c.key)).collect();

    // The store settles once every chunk is committed (the cut chunk is completed by the
    // reconnect's longer piece): poll until it holds the expected audio, then check exactly.
    let prefix = format!("chunks/{uid}/");
    let deadline = Instant::now() + SETTLE;
    let objects = loop {
        let objects = stored(&p, &prefix, uid, sealer.as_ref()).await;
        let done = objects.keys().eq(want.iter())
            && chunks
                .iter()
                .zip(objects.values())
                .all(|(c, a)| a.len() as u64 == c.samples * 2);
        if done || Instant::now() > deadline {
            break objects;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sizes: Vec<(&String, usize)> = objects.iter().map(|(k, a)| (k, a.len())).collect();
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>(),
        "the keys under {prefix}: nothing missing, nothing more (stored, with bytes: {sizes:?})"
    );
    for (c, (key, a)) in chunks.iter().zip(&objects) {
        assert_eq!(a.len() as u64, c.samples * 2, "{key}'s length");
    }
    for (conversation, pcm) in &audio {
        let joined: Vec<u8> = chunks
            .iter()
            .zip(objects.values())
            .filter(|(c, _)| &c.conversation == conversation)
            .flat_map(|(_, a)| a.iter().copied())
            .collect();
        assert!(
            !pcm.is_empty() && joined == *pcm,
            "conversation {conversation}: the objects are its audio, byte for byte \
             ({} stored bytes, {} sent)",
            joined.len(),
            pcm.len()
        );
    }

    // Omi's v2 metadata, on every object.
    let s3 = p.s3().await;
    for (c, key) in chunks.iter().zip(&want) {
        let head = s3
            .head_object()
            .bucket(&p.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.content_type(),
            Some("application/octet-stream"),
            "{key}"
        );
        let meta = head.metadata().unwrap();
        assert_eq!(meta["v2_start"], c.v2_start, "{key}");
        assert_eq!(meta["v2_samples"], c.samples.to_string(), "{key}");
        assert_eq!(meta["v2_sample_rate"], rate.to_string(), "{key}");
    }
    if let Some(s) = &sealer {
        let body = p.object(&want[0]).await.unwrap().unwrap();
        assert!(s.open("someone-else", &body).is_err(), "a key per uid");
    }
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_listen_session_at_8_khz_is_stored_byte_for_byte() {
    tokio::time::timeout(LIMIT, session("py-8k", 8_000, 8, None))
        .await
        .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_listen_session_at_16_khz_is_sealed_and_opens_byte_for_byte() {
    tokio::time::timeout(LIMIT, session("py-16k", 16_000, 16, Some(SECRET)))
        .await
        .expect("within the limit");
}
