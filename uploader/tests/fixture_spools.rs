//! Spools written by earlier releases still open and drain, byte for byte.
//!
//! `tests/fixtures/spool-v0/` was written by the spool of 2026-11-30 (before the spool was split
//! into modules and before its formats carry a version): record files, the sled index, and one
//! chunk in two pieces (a session resumed mid-chunk). Each release whose on-disk format changes adds its own fixture, made by
//! that release's code with `cargo test -p spillway-uploader --test fixture_spools -- --ignored
//! write_fixture` (it writes `spool-new/`; rename it), and a test like the one below.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use spillway_uploader::spool::{Limits, Loaded, Record, Spool};

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

#[test]
fn the_v0_spool_drains_byte_for_byte() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-v0");
    let drained = drain_copy(&fixture);
    let expected: Vec<Record> = CHUNKS
        .iter()
        .map(|&(s, seq, first, n)| record(s, seq, first, n))
        .collect();
    assert_eq!(drained.len(), expected.len(), "{drained:?}");
    for want in &expected {
        assert!(
            drained.contains(want),
            "chunk {}/{} from sample {} missing or changed",
            want.session,
            want.seq,
            want.first_sample
        );
    }
}

/// Writes a fixture with this release's code into `tests/fixtures/spool-new/`.
#[tokio::test]
#[ignore = "writes a fixture for a new on-disk format; run by hand"]
async fn write_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-new");
    assert!(!dir.exists(), "{} exists already", dir.display());
    let spool = Arc::new(Spool::open(&dir, Limits::reject(64 << 20)).unwrap());
    for &(session, seq, first, samples) in &CHUNKS {
        spool
            .commit(&record(session, seq, first, samples))
            .await
            .unwrap();
    }
    spool.flush().await.unwrap();
    drop(spool);
    // The lock file is the running owner's; a fixture has none.
    let _ = std::fs::remove_file(dir.join("lock"));
}
