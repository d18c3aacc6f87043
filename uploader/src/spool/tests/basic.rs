//! Commits, reads, ownership, age, duplicates and sizing.

use super::*;

#[tokio::test]
async fn commits_survive_reopen_and_drain_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
        for seq in [0, 1, 2] {
            assert_eq!(
                spool.commit(&record(seq, &[seq as u8; 100])).await.unwrap(),
                Committed::Stored
            );
        }
    }
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
    assert_eq!(spool.len(), 3);
    let mut from = 0;
    let mut seqs = Vec::new();
    while let (Some((pos, Spooled { record: r, .. })), 0) = spool.next_from(from).unwrap() {
        seqs.push(r.seq);
        spool.remove(pos, &r).await.unwrap();
        from = pos + 1;
    }
    assert_eq!(seqs, [0, 1, 2]);
    assert_eq!((spool.len(), spool.used_bytes()), (0, 0));
}

#[tokio::test]
async fn a_record_read_back_carries_its_wav_around_the_same_pcm() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap());
    let pcm: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
    spool.commit(&record(0, &pcm)).await.unwrap();
    spool.commit(&record(1, b"")).await.unwrap();
    let written: Vec<Vec<u8>> = record_files(dir.path())
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(
        written.contains(&record(0, &pcm).encode_to_vec()),
        "the file is the record's protobuf encoding, written in two parts"
    );
    let (Some((pos, first)), 0) = spool.next_from(0).unwrap() else {
        panic!("no record")
    };
    let wav = first.wav.unwrap();
    assert_eq!(&wav[..], &crate::object::wav(&pcm, 8_000).unwrap()[..]);
    assert_eq!(&first.record.pcm[..], &pcm[..]);
    assert_eq!(
        first.record.pcm.as_ptr(),
        wav[wav.len() - pcm.len()..].as_ptr(),
        "the body is laid out around the PCM read, not copied"
    );
    // An empty record (which PutChunk refuses) read back from disk is not sound: it is
    // quarantined, never uploaded.
    let (None, 1) = spool.next_from(pos + 1).unwrap() else {
        panic!("the empty record was not quarantined")
    };
}

#[test]
fn a_spool_has_one_owner_and_a_second_is_refused_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
    let second = Spool::open(dir.path(), Limits::reject(1 << 20));
    assert!(matches!(second, Err(SpoolError::InUse(_))), "{second:?}");
    drop(first);
    Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap();
}

#[tokio::test]
async fn the_oldest_chunks_age_counts_from_its_commit_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    {
        let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
        assert_eq!(spool.oldest_age(now).unwrap(), None, "empty");
        for seq in [0, 1] {
            spool.commit(&record(seq, &[1; 100])).await.unwrap();
        }
    }
    // Pretend the first chunk was committed 90 s ago, before a restart.
    let first = dir.path().join("records").join(format!("{:020}.rec", 0));
    std::fs::File::options()
        .append(true)
        .open(&first)
        .unwrap()
        .set_modified(now - Duration::from_secs(90))
        .unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
    let age = spool.oldest_age(now).unwrap().unwrap();
    assert!(
        age >= Duration::from_secs(90) && age < Duration::from_secs(95),
        "{age:?}"
    );
    let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(0).unwrap() else {
        panic!("no record")
    };
    spool.remove(pos, &r).await.unwrap();
    let age = spool.oldest_age(now).unwrap().unwrap();
    assert!(
        age < Duration::from_secs(5),
        "the next oldest is fresh: {age:?}"
    );
}

#[tokio::test]
async fn same_id_is_stored_once_and_conflicting_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
    assert_eq!(
        spool.commit(&record(0, b"ab")).await.unwrap(),
        Committed::Stored
    );
    assert_eq!(
        spool.commit(&record(0, b"ab")).await.unwrap(),
        Committed::Duplicate
    );
    assert!(matches!(
        spool.commit(&record(0, b"cd")).await,
        Err(SpoolError::Conflict { .. })
    ));
    assert_eq!(spool.len(), 1);
    // A device that resumed after losing the ack of a partial chunk resends it longer.
    assert_eq!(
        spool.commit(&record(0, b"abcdef")).await.unwrap(),
        Committed::Extended
    );
    assert_eq!(
        spool.commit(&record(0, b"abcd")).await.unwrap(),
        Committed::Duplicate,
        "a shorter resend of what is spooled stores nothing"
    );
    assert_eq!(spool.len(), 1);
    let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(0).unwrap() else {
        panic!("empty")
    };
    assert_eq!(&r.pcm[..], b"abcdef");
    assert!(spool.is_current(pos, &r).unwrap());
    assert_eq!(spool.used_bytes(), r.encode_to_vec().len() as u64);
}

#[tokio::test]
async fn reopening_sizes_the_backlog_from_the_index_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (used, len) = {
        let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
        for seq in 0..5 {
            spool
                .commit(&record(seq, &vec![7; 100 + seq as usize * 10]))
                .await
                .unwrap();
        }
        let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(0).unwrap() else {
            panic!("empty")
        };
        spool.remove(pos, &r).await.unwrap();
        spool.flush().await.unwrap();
        (spool.used_bytes(), spool.len())
    };
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 20)).unwrap());
    assert_eq!((spool.used_bytes(), spool.len()), (used, len));
    assert_eq!(len, 4);
}

#[test]
fn every_temporary_file_is_removed_at_open_whoever_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap());
    let records = dir.path().join("records");
    // Ours by name (a container restarts with the same pid) and another process's.
    let mine = records.join(format!("tmp-{}-0", std::process::id()));
    std::fs::write(&mine, b"half a put").unwrap();
    std::fs::write(records.join("tmp-1-7"), b"half a put").unwrap();
    let spool = Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap();
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    assert_eq!(spool.len(), 0);
}
