//! Filesystem faults, one at a time, on [`FaultFs`]: what a put answers, what it leaves on
//! disk, and what the next open and `reconcile` make of it; and a crash at every operation of a
//! commit, a superseding commit and a removal.

use super::fault_fs::{Fault, FaultFs, Op};
use super::*;

/// A spool on `fs` in `dir`, with a bound large enough never to matter.
fn spool_on(dir: &Path, fs: &FaultFs) -> Arc<Spool> {
    Arc::new(Spool::open_with(dir, Limits::reject(1 << 20), Arc::new(fs.clone())).unwrap())
}

/// The names in `records/`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("records"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every intact record, oldest first, as (seq, PCM).
fn contents(spool: &Spool) -> Vec<(u64, Vec<u8>)> {
    let (mut from, mut out) = (0, Vec::new());
    while let (Some((pos, Spooled { record: r, .. })), _) = spool.next_from(from).unwrap() {
        out.push((r.seq, r.pcm.to_vec()));
        from = pos + 1;
    }
    out
}

#[tokio::test]
async fn short_and_interrupted_writes_still_write_the_exact_record() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    for fault in [
        Fault::Short(3),
        Fault::Interrupted,
        Fault::Short(1),
        Fault::Short(40),
    ] {
        fs.fail_next(Op::Write, fault);
    }
    let r = record(0, &[9; 300]);
    assert_eq!(spool.commit(&r).await.unwrap(), Committed::Stored);
    assert_eq!(fs.fired().len(), 4, "{:?}", fs.fired());
    let files = record_files(dir.path());
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), r.encode_to_vec());
    assert_eq!(spool.used_bytes(), r.encode_to_vec().len() as u64);
}

#[tokio::test]
async fn a_failed_write_or_sync_fails_the_put_and_leaves_nothing() {
    for (op, fault) in [
        (Op::Create, Fault::Eio),
        (Op::Write, Fault::Eio),
        (Op::Write, Fault::Zero),
        (Op::SyncData, Fault::Eio),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::default();
        let spool = spool_on(dir.path(), &fs);
        fs.fail_next(op, fault);
        let err = spool.commit(&record(0, &[1; 100])).await.unwrap_err();
        assert!(matches!(err, SpoolError::Io(_)), "{op:?} {fault:?}: {err}");
        assert_eq!(fs.fired(), [(op, fault)]);
        assert_eq!(names(dir.path()), Vec::<String>::new(), "{op:?} {fault:?}");
        assert_eq!((spool.len(), spool.used_bytes()), (0, 0));
        // The next put goes through.
        assert_eq!(
            spool.commit(&record(0, &[1; 100])).await.unwrap(),
            Committed::Stored
        );
    }
}

/// Out of space while the record is written or linked (ENOSPC on create, write, sync or link):
/// the put is refused `DiskFull` (`RESOURCE_EXHAUSTED` `disk_full` at the service: ingest holds
/// the chunk and retries) and leaves nothing behind.
#[tokio::test]
async fn a_disk_that_runs_out_while_a_record_is_written_refuses_the_put_disk_full() {
    for op in [Op::Create, Op::Write, Op::SyncData, Op::HardLink] {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultFs::default();
        let spool = spool_on(dir.path(), &fs);
        fs.fail_next(op, Fault::Enospc);
        let err = spool.commit(&record(0, &[1; 100])).await.unwrap_err();
        assert!(matches!(err, SpoolError::DiskFull { .. }), "{op:?}: {err}");
        assert_eq!(names(dir.path()), Vec::<String>::new(), "{op:?}");
        assert_eq!((spool.len(), spool.used_bytes()), (0, 0));
    }
}

#[tokio::test]
async fn a_failed_link_reserves_nothing_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    fs.fail_next(Op::HardLink, Fault::Eio);
    let err = spool.commit(&record(0, &[1; 100])).await.unwrap_err();
    assert!(matches!(err, SpoolError::Io(_)), "{err}");
    assert_eq!(names(dir.path()), Vec::<String>::new());
    assert_eq!((spool.len(), spool.used_bytes()), (0, 0));
}

#[tokio::test]
async fn a_failed_directory_sync_is_an_error_and_the_orphan_is_adopted_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    {
        let spool = spool_on(dir.path(), &fs);
        fs.fail_next(Op::SyncDir, Fault::Eio);
        let err = spool.commit(&record(0, &[1; 100])).await.unwrap_err();
        assert!(matches!(err, SpoolError::Io(_)), "{err}");
        assert_eq!(
            (spool.len(), spool.used_bytes()),
            (0, 0),
            "reservation returned"
        );
        assert_eq!(record_files(dir.path()).len(), 1, "the linked file stays");
    }
    let spool = spool_on(dir.path(), &fs);
    assert_eq!(spool.reconcile().unwrap().adopted, 1);
    assert_eq!(contents(&spool), [(0, vec![1; 100])]);
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    spool.commit(&record(0, &[1; 100])).await.unwrap();
    fs.set_room(Some(crate::disk::Room {
        free_bytes: crate::disk::RESERVE_BYTES + 10,
        free_inodes: None,
    }));
    let mark = fs.mark();
    let err = spool.commit(&record(1, &[1; 100])).await.unwrap_err();
    assert!(matches!(err, SpoolError::DiskFull { .. }), "{err}");
    let ops: Vec<Op> = fs.ops_since(mark).into_iter().map(|(op, _)| op).collect();
    assert_eq!(ops, [Op::Room], "nothing but the statvfs");
    // A repeat of a spooled chunk needs no room: still a duplicate.
    assert_eq!(
        spool.commit(&record(0, &[1; 100])).await.unwrap(),
        Committed::Duplicate
    );
    assert_eq!(names(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_read_error_fails_the_read_and_quarantines_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    spool.commit(&record(0, &[1; 100])).await.unwrap();
    fs.fail_next(Op::Read, Fault::Eio);
    assert!(matches!(spool.next_from(0), Err(SpoolError::Io(_))));
    let (Some(_), 0) = spool.next_from(0).unwrap() else {
        panic!("the record was quarantined for a read error")
    };
    assert_eq!(spool.len(), 1);
}

/// A removal whose file deletion fails has taken the entries out already: the file is an
/// orphan, adopted at the next start (and uploaded again; the store finds it identical).
#[tokio::test]
async fn a_failed_deletion_after_upload_brings_the_chunk_back_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    {
        let spool = spool_on(dir.path(), &fs);
        spool.commit(&record(0, &[1; 100])).await.unwrap();
        let (Some((pos, s)), _) = spool.next_from(0).unwrap() else {
            panic!("empty")
        };
        fs.fail_next(Op::RemoveFile, Fault::Eio);
        assert!(spool.remove(pos, &s.record).await.is_err());
        assert_eq!(spool.len(), 0);
    }
    let spool = spool_on(dir.path(), &fs);
    assert_eq!(spool.reconcile().unwrap().adopted, 1);
    assert_eq!(contents(&spool), [(0, vec![1; 100])]);
}

/// An error checking whether a record file exists counts it lost, yet the file is adopted back
/// by the same `reconcile`: an over-count, never a loss. (`reconcile` keeps `Path::exists`'s
/// meaning; telling "cannot tell" from "gone" would avoid the over-count.)
#[tokio::test]
async fn an_error_looking_up_a_record_file_over_counts_it_lost_but_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    spool.commit(&record(0, &[1; 100])).await.unwrap();
    fs.fail_next(Op::Exists, Fault::Eio);
    let found = spool.reconcile().unwrap();
    assert_eq!((found.lost.len(), found.adopted), (1, 1), "{found:?}");
    assert_eq!(contents(&spool), [(0, vec![1; 100])]);
}

/// The operations a fresh spool performs for `action`, counted on a scratch spool.
async fn ops_of(action: Action) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::default();
    let spool = spool_on(dir.path(), &fs);
    let spooled = action.prepare(&spool).await;
    let mark = fs.mark();
    let _ = action.run(&spool, spooled).await;
    fs.ops_since(mark).len()
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// A new chunk (seq 1) beside the one spooled (seq 0).
    Store,
    /// A longer piece of seq 0, superseding the spooled one.
    Extend,
    /// The removal of seq 0 after its upload.
    Remove,
}

impl Action {
    /// Spools seq 0 and reads it back (as the drain would before removing it).
    async fn prepare(self, spool: &Arc<Spool>) -> (u64, Record) {
        spool.commit(&record(0, &[1; 100])).await.unwrap();
        let (Some((pos, s)), _) = spool.next_from(0).unwrap() else {
            panic!("empty")
        };
        (pos, s.record)
    }

    /// Runs the action; true when it answered success.
    async fn run(self, spool: &Arc<Spool>, (pos, spooled): (u64, Record)) -> bool {
        match self {
            Self::Store => spool.commit(&record(1, &[2; 100])).await.is_ok(),
            Self::Extend => spool.commit(&record(0, &[1; 160])).await.is_ok(),
            Self::Remove => spool.remove(pos, &spooled).await.is_ok(),
        }
    }
}

/// The process dies after each operation of a put, of a superseding put and of a removal in
/// turn; at the next start (open and reconcile on a healthy disk): what was acknowledged
/// before is there byte for byte, what the action answered success for took effect, nothing
/// is there twice, no temporary file is left, and the sizes match what drains.
#[tokio::test]
async fn a_crash_at_any_operation_keeps_every_acknowledged_chunk() {
    for action in [Action::Store, Action::Extend, Action::Remove] {
        let total = ops_of(action).await;
        assert!(total >= 1, "{action:?}: {total} operations");
        for n in 0..=total {
            let dir = tempfile::tempdir().unwrap();
            let fs = FaultFs::default();
            let ok = {
                let spool = spool_on(dir.path(), &fs);
                let spooled = action.prepare(&spool).await;
                fs.crash_after(n);
                action.run(&spool, spooled).await
            };
            assert_eq!(fs.crashed(), n < total, "{action:?} crash after {n}");
            fs.heal();
            let spool = spool_on(dir.path(), &fs);
            spool.reconcile().unwrap();
            let got = contents(&spool);
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            let mut unique = seqs.clone();
            unique.dedup();
            assert_eq!(seqs, unique, "{action:?} {n}: twice: {got:?}");
            let zero = got.iter().find(|(s, _)| *s == 0).map(|(_, p)| p.clone());
            let one = got.iter().find(|(s, _)| *s == 1).map(|(_, p)| p.clone());
            match action {
                Action::Store => {
                    assert_eq!(zero, Some(vec![1; 100]), "{action:?} {n}");
                    if ok {
                        assert_eq!(one, Some(vec![2; 100]), "{action:?} {n}");
                    }
                }
                Action::Extend => {
                    let zero = zero.unwrap_or_default();
                    assert!(
                        zero == vec![1; 100] || zero == vec![1; 160],
                        "{action:?} {n}: {zero:?}"
                    );
                    if ok {
                        assert_eq!(zero, vec![1; 160], "{action:?} {n}");
                    }
                }
                Action::Remove => {
                    if ok {
                        assert_eq!(zero, None, "{action:?} {n}: removed, yet back");
                    }
                }
            }
            assert!(
                names(dir.path()).iter().all(|f| !f.starts_with("tmp-")),
                "{action:?} {n}"
            );
            let size: u64 = got
                .iter()
                .map(|(seq, pcm)| record(*seq, pcm).encode_to_vec().len() as u64)
                .sum();
            assert_eq!(
                (spool.len(), spool.used_bytes()),
                (got.len() as u64, size),
                "{action:?} {n}"
            );
        }
    }
}
