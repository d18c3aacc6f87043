//! Spools written by earlier releases still open and drain, byte for byte.
//!
//! `tests/fixtures/spool-v0/` was written by the spool of 2026-11-30 (before the spool was split
//! into modules and before its formats carry a version: format 1): record files, the sled index,
//! and one chunk in two pieces (a session resumed mid-chunk). `tests/fixtures/spool-v1/` is
//! format 2 (records may carry the Omi layout and first-sample time), written by the code that
//! introduced it: the same chunks and one Omi chunk. Each release whose on-disk format changes adds its own fixture, made by
//! that release's code with `cargo test -p spillway-uploader --test fixture_spools -- --ignored
//! write_fixture` (it writes `spool-new/`; rename it), and a test like the one below.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use spillway_uploader::spool::{FORMAT, Limits, Loaded, Record, Spool, SpoolError};

/// The chunks every fixture holds: (session, seq, first sample, samples), at 8 kHz with 1 s
/// chunks. Session "b" was resumed mid-chunk: its chunk 0 has a piece from sample 4,000.
const CHUNKS: [(&str, u64, u64, u64); 5] = [
    ("a", 0, 0, 8_000),
    ("a", 1, 8_000, 8_000),
    ("a", 2, 16_000, 3_000),
    ("b", 0, 0, 4_000),
    ("b", 0, 4_000, 4_000),
];

/// The PCM of a chunk: a pattern no two chunks share.
fn pcm(session: &str, first_sample: u64, samples: u64) -> Bytes {
    let salt = u64::from(session.as_bytes()[0]);
    (0..samples * 2)
        .map(|i| ((first_sample * 2 + i) * 31 + salt) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn record(session: &str, seq: u64, first_sample: u64, samples: u64) -> Record {
    let pcm = pcm(session, first_sample, samples);
    Record {
        uid: "fixture".into(),
        session: session.into(),
        seq,
        sample_rate: 8_000,
        chunk_samples: 8_000,
        first_sample,
        crc32c: spillway_proto::checksum::crc32c(&pcm),
        pcm,
        // Spooled before the Omi front end: no layout, so WAV.
        ..Record::default()
    }
}

/// The Omi chunk of format 2's fixture: 0.1 s at 16 kHz, in Omi's layout.
fn omi_record() -> Record {
    let pcm = pcm("conv-1", 7, 1_600);
    Record {
        uid: "fixture".into(),
        session: "conv-1".into(),
        seq: 1_786_961_845_727,
        sample_rate: 16_000,
        chunk_samples: 960_000,
        first_sample: 1_786_961_845_727 * 960_000,
        crc32c: spillway_proto::checksum::crc32c(&pcm),
        pcm,
        layout: spillway_proto::uploader::Layout::Omi.into(),
        start_time: 1_786_961_845.727_25,
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Every file under `dir` with its bytes, in path order.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Opens a copy of `fixture` (opening writes to the index) and drains it: every record it
/// holds, in position order.
fn drain_copy(fixture: &Path) -> Vec<Record> {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(fixture, copy.path());
    let spool = Spool::open(copy.path(), Limits::reject(64 << 20)).expect("the fixture opens");
    let reconciled = spool.reconcile().expect("reconcile");
    // Every record is found through the index: none lost, damaged, or adopted as an orphan
    // (adoption would hide an index the code can no longer read).
    assert!(reconciled.lost.is_empty(), "{reconciled:?}");
    assert_eq!(reconciled.quarantined, 0, "{reconciled:?}");
    assert_eq!(reconciled.adopted, 0, "{reconciled:?}");
    let mut drained = Vec::new();
    let mut from = 0;
    loop {
        let (queued, _) = spool.queued_from(from).unwrap();
        let Some(queued) = queued else { break };
        from = queued.pos + 1;
        match spool.load(&queued).unwrap() {
            Loaded::Ready(spooled) => drained.push(spooled.record),
            Loaded::Quarantined => panic!("a fixture record was quarantined"),
            Loaded::Changed => {}
        }
    }
    drained
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn expect_drained(drained: &[Record], expected: &[Record]) {
    assert_eq!(drained.len(), expected.len(), "{drained:?}");
    for want in expected {
        assert!(
            drained.contains(want),
            "chunk {}/{} from sample {} missing or changed",
            want.session,
            want.seq,
            want.first_sample
        );
    }
}

fn chunks() -> Vec<Record> {
    CHUNKS
        .iter()
        .map(|&(s, seq, first, n)| record(s, seq, first, n))
        .collect()
}

#[test]
fn the_v1_spool_format_2_drains_byte_for_byte_with_its_omi_chunk() {
    let drained = drain_copy(&fixture("spool-v1"));
    let mut expected = chunks();
    expected.push(omi_record());
    expect_drained(&drained, &expected);
}

#[test]
fn an_earlier_format_is_marked_current_once_opened() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&fixture("spool-v0"), copy.path());
    assert!(!copy.path().join("FORMAT").exists());
    drop(Spool::open(copy.path(), Limits::reject(64 << 20)).unwrap());
    assert_eq!(
        std::fs::read_to_string(copy.path().join("FORMAT")).unwrap(),
        format!("spillway-spool {FORMAT}\n")
    );
}

#[test]
fn a_spool_of_a_newer_format_is_refused_and_left_exactly_as_it_was() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&fixture("spool-v1"), copy.path());
    std::fs::write(
        copy.path().join("FORMAT"),
        format!("spillway-spool {}\n", FORMAT + 1),
    )
    .unwrap();
    let before = snapshot(copy.path());
    let refused = Spool::open(copy.path(), Limits::reject(64 << 20));
    let Err(e @ SpoolError::NewerFormat { .. }) = refused else {
        panic!("a newer format opened: {:?}", refused.err());
    };
    assert!(
        e.to_string().contains("newer than this uploader reads"),
        "{e}"
    );
    assert!(snapshot(copy.path()) == before, "the spool was changed");
}

#[test]
fn the_v0_spool_drains_byte_for_byte() {
    let drained = drain_copy(&fixture("spool-v0"));
    let expected = chunks();
    expect_drained(&drained, &expected);
}

/// Writes a fixture with this release's code into `tests/fixtures/spool-new/`.
#[tokio::test]
#[ignore = "writes a fixture for a new on-disk format; run by hand"]
async fn write_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-new");
    assert!(!dir.exists(), "{} exists already", dir.display());
    let spool = Arc::new(Spool::open(&dir, Limits::reject(64 << 20)).unwrap());
    for r in chunks().iter().chain([&omi_record()]) {
        spool.commit(r).await.unwrap();
    }
    spool.flush().await.unwrap();
    drop(spool);
    // The lock file is the running owner's; a fixture has none.
    let _ = std::fs::remove_file(dir.join("lock"));
}
