//! Opening a spool: its owner lock, its directories, the cleanup of temporaries, the sled
//! index, and the size and position floor read from the index and the file names alone.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio::sync::Notify;

use super::fs::{Filesystem, StdFs, ignore_missing};
use super::index::{open_index, parse_meta, position_of};
use super::{Limits, Spool, SpoolError};

impl Spool {
    /// Opens (or creates) the spool in `dir` and sizes what it already holds from the index
    /// alone, never reading the audio: start-up time does not grow with the backlog's bytes.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, SpoolError> {
        Self::open_as(dir, limits, super::FORMAT)
    }

    /// [`Spool::open`] for an uploader that writes format `writes` (`--spool-format`): a spool
    /// of an older format is marked `writes`, not [`super::FORMAT`], so the release before can
    /// still open it. [`SpoolError::UnwritableFormat`] outside [`super::OLDEST_PIN`] to
    /// [`super::FORMAT`].
    pub fn open_as(dir: &Path, limits: Limits, writes: u32) -> Result<Self, SpoolError> {
        Self::open_inner(dir, limits, Arc::new(StdFs), writes)
    }

    /// [`Spool::open`] with its record files and directories on `fs` (tests pass one that
    /// injects faults; sled's own files under `index/` never go through it).
    #[cfg(test)]
    pub(crate) fn open_with(
        dir: &Path,
        limits: Limits,
        fs: Arc<dyn Filesystem>,
    ) -> Result<Self, SpoolError> {
        Self::open_inner(dir, limits, fs, super::FORMAT)
    }

    fn open_inner(
        dir: &Path,
        limits: Limits,
        fs: Arc<dyn Filesystem>,
        writes: u32,
    ) -> Result<Self, SpoolError> {
        let started = Instant::now();
        let writes = super::format::writable(writes)?;
        // Before anything is written: a spool of a newer format is left exactly as it is.
        let found = super::format::check(dir)?;
        std::fs::create_dir_all(dir)?;
        // Our own lock, taken before sled's: a second owner is told so plainly, and a spool in
        // use is never mistaken for a damaged one.
        let owner = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        match owner.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::InUse(dir.to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let records = dir.join("records");
        let quarantine_dir = dir.join("quarantine");
        std::fs::create_dir_all(&records)?;
        std::fs::create_dir_all(&quarantine_dir)?;
        // Holding the lock, no one else writes here: every temporary file is a put that never
        // committed (a crash, or a write that failed), whatever process made it. In a
        // container the pid is the same at every start, so none is spared for its name.
        let stale = remove_temporaries(fs.as_ref(), &records)?;
        if stale > 0 {
            tracing::info!(
                stale,
                "removed temporary files of puts that never committed"
            );
        }
        let db = open_index(&dir.join("index"))?;
        let chunks = db.open_tree("chunks")?;
        let index = db.open_tree("index")?;
        let quarantine = db.open_tree("quarantine")?;
        // Sized from the small metadata entries, never from the audio.
        let (mut used, mut count) = (0u64, 0u64);
        for entry in chunks.iter() {
            let (key, value) = entry?;
            match parse_meta(&value) {
                Some((size, _)) => {
                    used += size;
                    count += 1;
                }
                None => {
                    // Its record file is still there: reconcile adopts it again.
                    tracing::error!(key = ?key, "damaged spool metadata entry dropped");
                    chunks.remove(key)?;
                }
            }
        }
        // Positions are never handed out twice, even by an index rebuilt from nothing: start
        // above every position a record file or the index already uses.
        let floor = highest_record_position(fs.as_ref(), &records)?
            .max(chunks.last()?.and_then(|(k, _)| position_of(&k)))
            .map_or(0, |p| p + 1);
        let format = super::format::mark(dir, found, writes)?;
        tracing::debug!(count, used, floor, elapsed = ?started.elapsed(), "spool sized from its index");
        Ok(Self {
            db,
            chunks,
            index,
            quarantine,
            records,
            quarantine_dir,
            limits,
            used: AtomicU64::new(used),
            count: AtomicU64::new(count),
            writer: parking_lot::Mutex::new(()),
            queue: parking_lot::Mutex::default(),
            committed: Notify::new(),
            tmp_seq: AtomicU64::new(0),
            next_pos: AtomicU64::new(floor),
            fs,
            format,
            _owner: owner,
        })
    }
}

/// Deletes every `tmp-*` file in `records`; returns how many there were.
fn remove_temporaries(fs: &dyn Filesystem, records: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for name in fs.read_dir_names(records)? {
        if name.to_string_lossy().starts_with("tmp-") {
            ignore_missing(fs.remove_file(&records.join(name)))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The highest position named by a record file in `records`.
fn highest_record_position(fs: &dyn Filesystem, records: &Path) -> std::io::Result<Option<u64>> {
    let mut highest = None;
    for name in fs.read_dir_names(records)? {
        let pos = name
            .to_str()
            .and_then(|n| n.strip_suffix(".rec"))
            .and_then(|p| p.parse::<u64>().ok());
        highest = highest.max(pos);
    }
    Ok(highest)
}
