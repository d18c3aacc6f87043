//! The byte and record bounds, with both `WhenFull` policies.

use super::*;

#[tokio::test]
async fn the_bound_is_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1000)).unwrap());
    let mut stored = 0;
    for seq in 0..10 {
        match spool.commit(&record(seq, &[0; 200])).await {
            Ok(Committed::Stored) => stored += 1,
            Err(SpoolError::Full { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(spool.used_bytes() <= 1000);
    }
    assert_eq!(stored, 4);
    let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(0).unwrap() else {
        panic!("empty")
    };
    spool.remove(pos, &r).await.unwrap();
    assert!(matches!(
        spool.commit(&record(99, &[0; 200])).await,
        Ok(Committed::Stored)
    ));
}

#[tokio::test]
async fn drop_oldest_evicts_oldest_first_reports_each_and_keeps_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let dropped = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&dropped);
    let spool = Arc::new(
        Spool::open(
            dir.path(),
            Limits {
                max_bytes: 1000,
                max_chunks: 1000,
                when_full: WhenFull::DropOldest,
                on_drop: std::sync::Arc::new(move |d| sink.lock().unwrap().push(d.seq)),
            },
        )
        .unwrap(),
    );
    for seq in 0..10 {
        assert_eq!(
            spool.commit(&record(seq, &[seq as u8; 200])).await.unwrap(),
            Committed::Stored
        );
        assert!(spool.used_bytes() <= 1000, "bound exceeded at seq {seq}");
    }
    assert_eq!(*dropped.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
    let mut left = Vec::new();
    let mut from = 0;
    while let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(from).unwrap() {
        left.push(r.seq);
        from = pos + 1;
    }
    assert_eq!(left, [6, 7, 8, 9]);
    // An evicted id can be spooled again; it is not mistaken for a duplicate.
    assert_eq!(
        spool.commit(&record(0, &[0; 200])).await.unwrap(),
        Committed::Stored
    );
    assert!(spool.used_bytes() <= 1000);
}

#[tokio::test]
async fn tiny_chunks_are_capped_by_count_and_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_chunks: 3,
        ..Limits::reject(1 << 30)
    };
    let spool = Arc::new(Spool::open(dir.path(), limits).unwrap());
    for seq in 0..3 {
        spool.commit(&record(seq, &[1, 2])).await.unwrap();
    }
    let err = spool.commit(&record(3, &[1, 2])).await.unwrap_err();
    assert!(matches!(err, SpoolError::TooManyChunks { max: 3 }), "{err}");
    // A byte bound too: refused before a temporary file exists.
    let small_dir = tempfile::tempdir().unwrap();
    let small = Arc::new(Spool::open(small_dir.path(), Limits::reject(100)).unwrap());
    let err = small.commit(&record(0, &[0; 200])).await.unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    let files = |d: &Path| std::fs::read_dir(d.join("records")).unwrap().count();
    assert_eq!(
        files(dir.path()),
        3,
        "only the three records, no temporary left"
    );
    assert_eq!(files(small_dir.path()), 0);
    // A repeat of a spooled id is still a duplicate, not refused.
    assert_eq!(
        spool.commit(&record(2, &[1, 2])).await.unwrap(),
        Committed::Duplicate
    );
}
