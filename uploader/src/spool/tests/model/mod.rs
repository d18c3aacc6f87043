//! The model-based test: random sequences of steps run against a real spool on [`FaultFs`] and
//! against a model that says what must be true, compared after every step.
//!
//! Steps: a put (a new chunk, a longer or shorter piece of a spooled one, or other audio under
//! its id), the drain's removal after an upload, a clean restart, a put or removal meeting one
//! filesystem fault, a crash at an operation of a put or removal (optionally losing sled's
//! unflushed tail too: `index/` is copied while the spool is alive), a flipped byte in a
//! record file's audio followed by a restart, and a nearly full disk. A restart is what the
//! uploader does at start: open, then `reconcile`.
//!
//! Checked after every step, reading the whole spool back with [`Spool::next_from`]:
//! - every acknowledged put is there, byte for byte (or a longer piece of it that a device
//!   put), unless it was removed after upload, evicted (`drop-oldest`, reported), or damaged
//!   (then it is quarantined and counted, and costs nothing else);
//! - nothing removed after upload comes back, nothing is there twice, and nothing is there
//!   that was never put;
//! - a put without a fault gets exactly the outcome the model predicts (stored, duplicate,
//!   extended, conflict, full, too many chunks, disk full, and which chunks were evicted); a
//!   refused one left no file behind, and wrote nothing at all if its id was not spooled;
//! - the byte and record bounds hold (after a restart, adopted orphans may exceed them until
//!   the spool drains: adoption never drops audio), and `len`/`used_bytes` are exactly what
//!   reads back; after a restart `records/` holds no temporary and no unindexed file.
//!
//! Each case builds a spool and runs up to 40 steps. The default is 64 cases (a few seconds);
//! `PROPTEST_CASES` runs more, e.g.
//! `PROPTEST_CASES=2000 cargo test -p spillway-uploader --lib spool::tests::model`.
//! A failure prints the smallest sequence of steps found.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use super::fault_fs::{Fault, FaultFs, Op};
use super::*;
use crate::spool::index::parse_meta;

mod steps;

use steps::{Action, Expect, Step, kind, limits, pcm, size, step};

/// What must be true of the spool.
#[derive(Debug, Default)]
struct Model {
    /// What reads back, oldest first: (position, seq, PCM). Exact after every step.
    spooled: Vec<(u64, u64, Vec<u8>)>,
    /// Acknowledged, and not removed, evicted or damaged since: must read back, with this PCM
    /// or a longer piece that begins with it.
    acked: BTreeMap<u64, Vec<u8>>,
    /// Acknowledged chunks whose eviction failed halfway (its file is still there): out of the
    /// index until the next restart adopts them back.
    hidden: BTreeMap<u64, Vec<u8>>,
    /// Every PCM ever put under a seq.
    tried: BTreeMap<u64, BTreeSet<Vec<u8>>>,
    /// Removed after upload: must not come back.
    gone: BTreeSet<u64>,
    /// Seqs with a put or removal that failed or crashed: a file of theirs may be adopted at
    /// the next restart (and so come back after a removal).
    tainted: BTreeSet<u64>,
    /// Records damaged, each to be quarantined and counted.
    damaged: u64,
    /// Quarantined and lost, as the spool reported them.
    counted: u64,
    /// A crash ran: counts may exceed `damaged` (a quarantine undone by sled's lost tail).
    crashed: bool,
    /// Over the bounds by adoption at the last restart (allowed until it drains).
    over_by_adoption: bool,
    nearly_full: bool,
}

/// One case: a spool on a fault-injecting filesystem in a temporary directory, and its model.
struct Case {
    dir: tempfile::TempDir,
    fs: FaultFs,
    limits: Limits,
    dropped: Arc<Mutex<Vec<u64>>>,
    spool: Option<Arc<Spool>>,
    rt: tokio::runtime::Runtime,
    m: Model,
    /// Indexes sled refused after a crash copy, set aside as the uploader does.
    set_aside: u32,
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// The names in `records/`.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("records"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Copies a directory tree (sled's `index/`), as a crash would leave it on disk.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            // A file sled is writing may change under the copy: as a crash would find it.
            let _ = std::fs::copy(entry.path(), &target);
        }
    }
}

impl Case {
    fn new((max_bytes, max_chunks, drop_oldest): (u64, u64, bool)) -> Result<Self, TestCaseError> {
        let dropped = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&dropped);
        let limits = Limits {
            max_bytes,
            max_chunks,
            when_full: if drop_oldest {
                WhenFull::DropOldest
            } else {
                WhenFull::Reject
            },
            on_drop: Arc::new(move |d: &Dropped| sink.lock().unwrap().push(d.seq)),
        };
        let mut case = Self {
            dir: tempfile::tempdir().unwrap(),
            fs: FaultFs::default(),
            limits,
            dropped,
            spool: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            m: Model::default(),
            set_aside: 0,
        };
        case.open()?;
        Ok(case)
    }

    fn spool(&self) -> Arc<Spool> {
        Arc::clone(self.spool.as_ref().expect("open"))
    }

    fn open(&mut self) -> Result<(), TestCaseError> {
        let (dir, limits, fs) = (
            self.dir.path().to_owned(),
            self.limits.clone(),
            self.fs.clone(),
        );
        let open = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Spool::open_with(&dir, limits.clone(), Arc::new(fs.clone()))
            }))
        };
        let spool = match open() {
            Ok(Ok(spool)) => spool,
            // sled refused its index after a crash copy: set it aside, as the uploader does.
            _ if self.m.crashed => {
                self.set_aside += 1;
                let index = self.dir.path().join("index");
                let aside = self
                    .dir
                    .path()
                    .join(format!("index.damaged-{}", self.set_aside));
                std::fs::rename(index, aside).map_err(fail)?;
                open()
                    .map_err(|_| fail("sled panicked on a new index"))?
                    .map_err(fail)?
            }
            Ok(Err(e)) => return Err(fail(format!("open: {e}"))),
            Err(_) => return Err(fail("sled panicked opening a cleanly closed index")),
        };
        self.spool = Some(Arc::new(spool));
        Ok(())
    }

    /// Drops the spool (losing sled's unflushed tail too with `lose_tail`), opens it again on
    /// a healed filesystem and reconciles; then the hidden chunks must be back.
    fn restart(&mut self, lose_tail: bool) -> Result<(), TestCaseError> {
        let spool = self.spool.take();
        let index = self.dir.path().join("index");
        let copy = self.dir.path().join("index.crash");
        if lose_tail {
            copy_dir(&index, &copy);
        }
        drop(spool);
        if lose_tail {
            std::fs::remove_dir_all(&index).map_err(fail)?;
            std::fs::rename(&copy, &index).map_err(fail)?;
        }
        self.fs.heal();
        self.open()?;
        let spool = self.spool();
        let found = spool.reconcile().map_err(fail)?;
        self.m.counted += found.quarantined + found.lost.len() as u64;
        for (seq, pcm) in std::mem::take(&mut self.m.hidden) {
            self.m.acked.entry(seq).or_insert(pcm);
        }
        let over =
            spool.used_bytes() > self.limits.max_bytes || spool.len() > self.limits.max_chunks;
        if found.adopted > 0 && over {
            self.m.over_by_adoption = true;
        }
        self.observe()?;
        let names = names(self.dir.path());
        prop_assert!(
            names.iter().all(|n| !n.starts_with("tmp-")),
            "a temporary survived a restart: {names:?}"
        );
        prop_assert_eq!(
            names.len(),
            self.m.spooled.len(),
            "files the index does not name after a restart: {:?}",
            names
        );
        Ok(())
    }

    /// Reads the whole spool back and checks it against the model; the model then takes what
    /// was read as the spool's contents.
    fn observe(&mut self) -> Result<(), TestCaseError> {
        let spool = self.spool();
        let (mut from, mut got) = (0, Vec::new());
        loop {
            let (next, q) = spool.next_from(from).map_err(fail)?;
            self.m.counted += q;
            let Some((pos, s)) = next else { break };
            got.push((pos, s.record.seq, s.record.pcm.to_vec()));
            from = pos + 1;
        }
        let m = &self.m;
        let mut seen = BTreeSet::new();
        for (_, seq, pcm) in &got {
            prop_assert!(seen.insert(*seq), "seq {} reads back twice: {:?}", seq, got);
            prop_assert!(
                m.tried.get(seq).is_some_and(|t| t.contains(pcm)),
                "seq {} reads back audio never put",
                seq
            );
            prop_assert!(
                !m.gone.contains(seq) || m.tainted.contains(seq),
                "seq {} came back after its removal",
                seq
            );
        }
        for (seq, pcm) in &m.acked {
            let back = got.iter().find(|(_, s, _)| s == seq).map(|(_, _, p)| p);
            prop_assert!(
                back.is_some_and(|b| b.starts_with(pcm)),
                "acknowledged seq {} ({} bytes) reads back as {:?}",
                seq,
                pcm.len(),
                back.map(Vec::len)
            );
        }
        let used: u64 = got.iter().map(|(_, seq, pcm)| size(*seq, pcm)).sum();
        prop_assert_eq!(
            (spool.len(), spool.used_bytes()),
            (got.len() as u64, used),
            "sizes differ from what reads back"
        );
        if !m.over_by_adoption {
            prop_assert!(
                used <= self.limits.max_bytes,
                "{} bytes over the bound",
                used
            );
            prop_assert!(
                spool.len() <= self.limits.max_chunks,
                "records over the bound"
            );
        }
        if m.crashed {
            prop_assert!(
                m.counted >= m.damaged,
                "{} damaged, {} counted",
                m.damaged,
                m.counted
            );
        } else {
            prop_assert_eq!(m.counted, m.damaged, "quarantined and lost against damaged");
        }
        if used <= self.limits.max_bytes && spool.len() <= self.limits.max_chunks {
            self.m.over_by_adoption = false;
        }
        self.m.spooled = got;
        Ok(())
    }
    /// Runs `action`, with `arm` applied just before; true when a fault or the crash point
    /// changed what the action did.
    fn act(&mut self, action: Action, arm: impl FnOnce(&FaultFs)) -> Result<bool, TestCaseError> {
        match action {
            Action::Put {
                seq,
                variant,
                samples,
            } => self.put(u64::from(seq), pcm(seq, variant, samples), arm),
            Action::Remove { nth } => self.remove(nth, arm),
        }
    }

    fn put(
        &mut self,
        seq: u64,
        pcm: Vec<u8>,
        arm: impl FnOnce(&FaultFs),
    ) -> Result<bool, TestCaseError> {
        let rec = record(seq, &pcm);
        let need = size(seq, &pcm);
        let expect = self.predict(seq, &pcm, need);
        let was_spooled = self.m.spooled.iter().any(|(_, s, _)| *s == seq);
        let before = names(self.dir.path());
        let (mark, fired_before) = (self.fs.mark(), self.fs.fired().len());
        self.dropped.lock().unwrap().clear();
        let spool = self.spool();
        arm(&self.fs);
        let got = self.rt.block_on(spool.commit(&rec));
        let fired: Vec<(Op, Fault)> = self.fs.fired().split_off(fired_before);
        let faulted = self.fs.crashed()
            || fired.iter().any(|&(op, f)| match f {
                Fault::Short(_) => false,
                // The write loop retries an interrupted write; nothing else does.
                Fault::Interrupted => op != Op::Write,
                Fault::Zero => op == Op::Write,
                Fault::Eio | Fault::Enospc => true,
            });
        let crashed = self.fs.crashed();
        if !crashed {
            self.fs.heal();
        }
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap());
        self.m.tried.entry(seq).or_default().insert(pcm.clone());
        let answer = match &got {
            Ok(c) => Some(Expect::Ok(*c, dropped.clone())),
            Err(e) => kind(e),
        };
        if !faulted {
            prop_assert_eq!(
                answer,
                Some(expect.clone()),
                "put of seq {}: {:?}",
                seq,
                got
            );
            if got.is_err() {
                prop_assert_eq!(names(self.dir.path()), before, "a refused put left a file");
                let created = self
                    .fs
                    .ops_since(mark)
                    .iter()
                    .any(|(op, _)| *op == Op::Create);
                prop_assert!(
                    was_spooled || !created,
                    "a put refused {:?} wrote a file first",
                    expect
                );
            }
        } else {
            let enospc_writing = !crashed
                && fired.iter().any(|&(op, f)| {
                    f == Fault::Enospc
                        && matches!(op, Op::Create | Op::Write | Op::SyncData | Op::HardLink)
                });
            match (&got, &expect) {
                (Ok(c), Expect::Ok(e, evicted)) => {
                    prop_assert_eq!(c, e, "put of seq {} with {:?}", seq, fired);
                    prop_assert_eq!(&dropped, evicted);
                }
                (Ok(c), _) => return Err(fail(format!("{c:?}, expected {expect:?}"))),
                (Err(SpoolError::DiskFull { .. }), _) if enospc_writing => {}
                (Err(e), _) if enospc_writing => {
                    return Err(fail(format!("ENOSPC writing answered {e}, not DiskFull")));
                }
                (Err(SpoolError::Io(_)), _) => {}
                (Err(e), x) => prop_assert_eq!(kind(e), Some(x.clone()), "{}", e),
            }
            if let Expect::Ok(_, evicted) = &expect {
                prop_assert!(evicted.starts_with(&dropped), "evicted {:?}", dropped);
            }
            if got.is_err() {
                self.m.tainted.insert(seq);
            }
        }
        for d in &dropped {
            self.m.acked.remove(d);
        }
        if got.is_ok() {
            self.m.gone.remove(&seq);
            // A hidden piece's file is still there, to be adopted (or discarded) at the next
            // restart: it may come back even after this put's piece is removed.
            if self.m.hidden.remove(&seq).is_some() {
                self.m.tainted.insert(seq);
            }
        }
        // An acknowledged chunk gone from the index without an eviction report: only an
        // eviction whose file deletion failed does that (the file stays, to be adopted).
        // What the spool holds for `seq` if the put succeeded: what was there for a duplicate.
        let held = match (&got, self.m.spooled.iter().find(|(_, s, _)| *s == seq)) {
            (Ok(Committed::Duplicate), Some((_, _, old))) => old.clone(),
            _ => pcm.clone(),
        };
        if crashed {
            // The process is dead: nothing to read back until the restart.
            if got.is_ok() {
                self.m.acked.insert(seq, held);
            }
            return Ok(faulted);
        }
        let evicting = fired.iter().any(|(op, _)| *op == Op::RemoveFile);
        self.observe_after(evicting)?;
        if got.is_ok() {
            let back = self.m.spooled.iter().find(|(_, s, _)| *s == seq);
            prop_assert_eq!(
                back.map(|(_, _, b)| b),
                Some(&held),
                "acknowledged seq {} does not read back",
                seq
            );
            self.m.acked.insert(seq, held);
        }
        Ok(faulted)
    }

    fn remove(&mut self, nth: u8, arm: impl FnOnce(&FaultFs)) -> Result<bool, TestCaseError> {
        if self.m.spooled.is_empty() {
            return Ok(false);
        }
        let (pos, seq, pcm) = self.m.spooled[usize::from(nth) % self.m.spooled.len()].clone();
        let spool = self.spool();
        arm(&self.fs);
        let fired_before = self.fs.fired().len();
        let got = self.rt.block_on(spool.remove(pos, &record(seq, &pcm)));
        let crashed = self.fs.crashed();
        let faulted = crashed || self.fs.fired().len() > fired_before;
        if !faulted {
            got.as_ref().map_err(fail)?;
        }
        self.m.acked.remove(&seq);
        if got.is_ok() {
            self.m.gone.insert(seq);
        } else {
            self.m.tainted.insert(seq);
        }
        if !crashed {
            self.fs.heal();
            self.observe_after(false)?;
        }
        Ok(faulted)
    }

    /// [`Case::observe`] after an action; with `evicting`, acknowledged chunks missing from the
    /// index become hidden (back at the next restart) rather than a failure.
    fn observe_after(&mut self, evicting: bool) -> Result<(), TestCaseError> {
        if evicting && self.limits.when_full == WhenFull::DropOldest {
            let present: BTreeSet<u64> = self
                .spool()
                .chunks
                .iter()
                .values()
                .filter_map(|v| parse_meta(&v.ok()?))
                .map(|(_, meta)| meta.seq)
                .collect();
            let missing: Vec<u64> = self
                .m
                .acked
                .keys()
                .filter(|s| !present.contains(s))
                .copied()
                .collect();
            for seq in missing {
                if let Some(pcm) = self.m.acked.remove(&seq) {
                    self.m.hidden.insert(seq, pcm);
                }
            }
        }
        self.observe()
    }

    fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Act(action) => {
                self.act(action, |_| {})?;
            }
            Step::Faulty(action, op, fault) => {
                self.act(action, |fs| fs.fail_next(op, fault))?;
            }
            Step::Restart => self.restart(false)?,
            Step::Crash {
                action,
                after,
                lose_tail,
            } => {
                self.m.crashed = true;
                self.act(action, |fs| fs.crash_after(usize::from(after)))?;
                self.restart(lose_tail)?;
            }
            Step::Damage { nth, at } => {
                if self.m.spooled.is_empty() {
                    return Ok(());
                }
                let (pos, seq, pcm) =
                    self.m.spooled[usize::from(nth) % self.m.spooled.len()].clone();
                let path: PathBuf = self.spool().record_path(pos);
                let mut bytes = std::fs::read(&path).map_err(fail)?;
                let i = bytes.len() - pcm.len() + usize::from(at) % pcm.len();
                bytes[i] ^= 0x5a;
                std::fs::write(&path, bytes).map_err(fail)?;
                self.m.acked.remove(&seq);
                self.m.damaged += 1;
                let quarantined = std::fs::read_dir(self.dir.path().join("quarantine"))
                    .map_err(fail)?
                    .count();
                self.restart(false)?;
                let now = std::fs::read_dir(self.dir.path().join("quarantine"))
                    .map_err(fail)?
                    .count();
                prop_assert!(now > quarantined, "the damaged file was not quarantined");
                prop_assert!(
                    self.m.spooled.iter().all(|(p, _, _)| *p != pos),
                    "the damaged record reads back"
                );
            }
            Step::NearlyFull(full) => {
                self.m.nearly_full = full;
                self.fs.set_room(full.then(|| self.nearly_full_room()));
            }
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
fn the_spool_keeps_what_the_model_says_through_faults_crashes_and_damage() {
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        // Shrinking reruns the I/O: bounded, yet enough to reach a short sequence.
        max_shrink_iters: 1024,
        ..ProptestConfig::default()
    };
    let strategy = (limits(), prop::collection::vec(step(), 1..=40));
    let result = TestRunner::new(config).run(&strategy, |(limits, steps)| {
        let mut case = Case::new(limits)?;
        for step in steps {
            case.step(step)?;
        }
        case.restart(false)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
