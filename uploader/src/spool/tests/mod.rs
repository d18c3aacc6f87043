//! The spool's tests: examples of each behaviour (`basic`, `bounds`, `damage`), filesystem
//! faults (`faults`) on the fault-injecting filesystem of `fault_fs`, and the model-based test
//! (`model`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::*;

mod basic;
mod bounds;
mod damage;
mod fault_fs;
mod faults;
mod model;

/// A record of chunk `seq` (60 s chunks at 8 kHz, as `PutChunk` would accept it).
fn record(seq: u64, pcm: &[u8]) -> Record {
    Record {
        uid: "u".into(),
        session: "s".into(),
        seq,
        sample_rate: 8000,
        chunk_samples: 480_000,
        first_sample: seq * 480_000,
        crc32c: crc32c::crc32c(pcm),
        pcm: Bytes::copy_from_slice(pcm),
        ..Record::default()
    }
}

/// Six records, the odd ones large enough that sled keeps them in blob files.
async fn six_records(dir: &std::path::Path) {
    let spool = Arc::new(Spool::open(dir, Limits::reject(1 << 30)).unwrap());
    for seq in 0..6 {
        let n = if seq % 2 == 0 { 100 } else { 200_000 };
        spool
            .commit(&record(seq, &vec![seq as u8; n]))
            .await
            .unwrap();
    }
}

fn drained(spool: &Spool) -> Vec<u64> {
    let (mut from, mut seqs) = (0, Vec::new());
    while let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(from).unwrap() {
        seqs.push(r.seq);
        from = pos + 1;
    }
    seqs
}

fn record_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("records"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}
