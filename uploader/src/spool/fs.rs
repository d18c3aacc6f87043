//! The filesystem seam: every operation the spool performs on record files and on the
//! `records/` and `quarantine/` directories, behind a small trait, so tests can put a
//! fault-injecting implementation (`tests/fault_fs.rs`) where production uses [`StdFs`].
//!
//! Outside the trait on purpose: creating the spool's directories and taking its owner lock
//! (one-time setup at open, and the lock must keep real `flock` semantics), and sled, which
//! opens, writes, syncs and reads its own files in `index/`. All methods are blocking: callers
//! run them off the async threads, as they did before the seam.

use std::ffi::OsString;
use std::fmt::Debug;
use std::io::{IoSlice, Read as _};
use std::path::Path;
use std::time::SystemTime;

use crate::disk::Room;

/// The file operations of the spool (see the module doc for what stays outside).
pub(crate) trait Filesystem: Send + Sync + Debug {
    /// Creates (or truncates) `path` for writing: a new temporary record file.
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn WriteFile>>;
    /// Reads all of `path` into a new buffer that starts with `headroom` zero bytes (room for
    /// the WAV header in front of the record, so the audio is not copied again).
    fn read(&self, path: &Path, headroom: usize) -> std::io::Result<Vec<u8>>;
    /// The names of the entries of the directory `path`.
    fn read_dir_names(&self, path: &Path) -> std::io::Result<Vec<OsString>>;
    /// `Ok(false)` when `path` does not exist, an error when that cannot be told.
    fn try_exists(&self, path: &Path) -> std::io::Result<bool>;
    /// The modification time of `path`.
    fn modified(&self, path: &Path) -> std::io::Result<SystemTime>;
    /// Gives the file `from` a second name `to`; fails if `to` exists (never replaces it).
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
    /// Makes the directory `path`'s entries durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> std::io::Result<()>;
    /// What the filesystem holding `path` has left (statvfs, see [`crate::disk`]).
    fn room(&self, path: &Path) -> std::io::Result<Room>;
}

/// A file being written by [`Filesystem::create`].
pub(crate) trait WriteFile: Send {
    /// Writes some prefix of `bufs`, as [`std::io::Write::write_vectored`] does.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
    /// Makes the file's contents durable (`fdatasync`).
    fn sync_data(&mut self) -> std::io::Result<()>;
}

/// The real filesystem, through `std::fs` (and `rustix` for statvfs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StdFs;

impl Filesystem for StdFs {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn WriteFile>> {
        Ok(Box::new(std::fs::File::create(path)?))
    }

    fn read(&self, path: &Path, headroom: usize) -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let size = usize::try_from(file.metadata()?.len()).unwrap_or(0);
        let mut buf = Vec::with_capacity(headroom.saturating_add(size));
        buf.resize(headroom, 0);
        file.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn read_dir_names(&self, path: &Path) -> std::io::Result<Vec<OsString>> {
        std::fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn try_exists(&self, path: &Path) -> std::io::Result<bool> {
        path.try_exists()
    }

    fn modified(&self, path: &Path) -> std::io::Result<SystemTime> {
        std::fs::metadata(path)?.modified()
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }

    fn room(&self, path: &Path) -> std::io::Result<Room> {
        Room::of(path)
    }
}

impl WriteFile for std::fs::File {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        std::io::Write::write_vectored(self, bufs)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        std::fs::File::sync_data(self)
    }
}

/// Treats "not found" as done: for removals and renames of files that may already be gone.
pub(super) fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// True for "no space left on device" (ENOSPC, raw OS error 28 on Linux): a full disk, which
/// the spool reports as [`super::SpoolError::DiskFull`] rather than as an I/O failure.
pub(super) fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
}
