//! A [`Filesystem`] that fails on demand: the real filesystem on a temporary directory, plus a
//! log of every operation, faults armed for the next operation of a kind (EIO, ENOSPC, a short
//! write, a write that takes nothing, an interrupted write), a crash point (the first `n`
//! operations from now are performed, every later one fails, as if the process had died
//! there), and a disk that reports itself nearly full.
//!
//! The syncs (`sync_data`, `sync_dir`) are logged and can fail, but are not performed: a crash
//! point models the process dying, and the page cache keeps every write it completed; what
//! the syncs guard against (power loss) is not modelled, and skipping them keeps the tests
//! fast.
//!
//! What a crash point does not cover: sled, whose I/O is its own. Dropping the spool after a
//! crash point flushes sled (a clean close of the index); the model test copies `index/` while
//! the spool is still alive when it wants sled's unflushed tail lost as well.

use std::ffi::OsString;
use std::io::{IoSlice, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::SystemTime;

use crate::disk::Room;
use crate::spool::fs::{Filesystem, StdFs, WriteFile};

/// The operations of [`Filesystem`] (and [`WriteFile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Write,
    SyncData,
    Read,
    ReadDir,
    Exists,
    Modified,
    HardLink,
    Rename,
    RemoveFile,
    SyncDir,
    Room,
}

/// What an armed operation does instead of its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Fails with EIO (raw OS error 5), doing nothing.
    Eio,
    /// Fails with ENOSPC (raw OS error 28), doing nothing.
    Enospc,
    /// A write that takes at most this many bytes (other operations: no fault).
    Short(usize),
    /// A write that takes nothing: `Ok(0)` (other operations: no fault).
    Zero,
    /// Fails with `Interrupted` (EINTR), doing nothing.
    Interrupted,
}

impl Fault {
    /// The error the operation returns, if the fault is one.
    fn error(self) -> Option<std::io::Error> {
        match self {
            Self::Eio => Some(std::io::Error::from_raw_os_error(5)),
            Self::Enospc => Some(std::io::Error::from_raw_os_error(28)),
            Self::Interrupted => Some(std::io::ErrorKind::Interrupted.into()),
            Self::Short(_) | Self::Zero => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Every operation asked for, performed or not.
    log: Vec<(Op, PathBuf)>,
    /// Faults waiting for the next operation of their kind, in order.
    armed: Vec<(Op, Fault)>,
    /// Faults that fired.
    fired: Vec<(Op, Fault)>,
    /// Operations still performed before the crash (`None`: no crash point).
    crash_in: Option<usize>,
    /// True once an operation was refused for the crash.
    crashed: bool,
    /// What `room` reports instead of statvfs.
    room: Option<Room>,
}

/// The fault-injecting filesystem. Clones share their state: the test keeps one to arm faults
/// and read the log while the spool holds another.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultFs {
    state: Arc<Mutex<State>>,
}

impl FaultFs {
    /// Arms `fault` for the next `op` (after any armed before it for the same op).
    pub(crate) fn fail_next(&self, op: Op, fault: Fault) {
        self.state.lock().armed.push((op, fault));
    }

    /// Performs the next `n` operations, then refuses every later one with EIO.
    pub(crate) fn crash_after(&self, n: usize) {
        self.state.lock().crash_in = Some(n);
    }

    /// True once the crash point was reached (an operation was refused for it).
    pub(crate) fn crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Forgets the crash point and every armed fault (as a restarted process would find the
    /// disk); the room override stays: a full disk is still full.
    pub(crate) fn heal(&self) {
        let mut s = self.state.lock();
        s.crash_in = None;
        s.crashed = false;
        s.armed.clear();
    }

    /// Makes `room` report `room` (`None`: the real statvfs).
    pub(crate) fn set_room(&self, room: Option<Room>) {
        self.state.lock().room = room;
    }

    /// How many operations were asked for so far (a mark for [`FaultFs::ops_since`]).
    pub(crate) fn mark(&self) -> usize {
        self.state.lock().log.len()
    }

    /// The operations asked for since `mark`.
    pub(crate) fn ops_since(&self, mark: usize) -> Vec<(Op, PathBuf)> {
        let s = self.state.lock();
        s.log.get(mark..).unwrap_or_default().to_vec()
    }

    /// The faults that fired so far, oldest first.
    pub(crate) fn fired(&self) -> Vec<(Op, Fault)> {
        self.state.lock().fired.clone()
    }

    /// Logs `op`; refuses it after the crash point; else returns the fault armed for it.
    fn enter(&self, op: Op, path: &Path) -> std::io::Result<Option<Fault>> {
        let mut s = self.state.lock();
        s.log.push((op, path.to_owned()));
        match s.crash_in {
            Some(0) => {
                s.crashed = true;
                return Err(std::io::Error::other("the process died here (crash point)"));
            }
            Some(n) => s.crash_in = Some(n - 1),
            None => {}
        }
        let fault = s
            .armed
            .iter()
            .position(|(o, _)| *o == op)
            .map(|i| s.armed.remove(i).1);
        if let Some(f) = fault {
            s.fired.push((op, f));
        }
        Ok(fault)
    }

    /// [`FaultFs::enter`] for an operation that either fails or is performed whole.
    fn check(&self, op: Op, path: &Path) -> std::io::Result<()> {
        match self.enter(op, path)?.and_then(Fault::error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Filesystem for FaultFs {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn WriteFile>> {
        self.check(Op::Create, path)?;
        Ok(Box::new(FaultFile {
            file: std::fs::File::create(path)?,
            path: path.to_owned(),
            fs: self.clone(),
        }))
    }

    fn read(&self, path: &Path, headroom: usize) -> std::io::Result<Vec<u8>> {
        self.check(Op::Read, path)?;
        StdFs.read(path, headroom)
    }

    fn read_dir_names(&self, path: &Path) -> std::io::Result<Vec<OsString>> {
        self.check(Op::ReadDir, path)?;
        StdFs.read_dir_names(path)
    }

    fn try_exists(&self, path: &Path) -> std::io::Result<bool> {
        self.check(Op::Exists, path)?;
        StdFs.try_exists(path)
    }

    fn modified(&self, path: &Path) -> std::io::Result<SystemTime> {
        self.check(Op::Modified, path)?;
        StdFs.modified(path)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.check(Op::HardLink, to)?;
        StdFs.hard_link(from, to)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.check(Op::Rename, from)?;
        StdFs.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.check(Op::RemoveFile, path)?;
        StdFs.remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.check(Op::SyncDir, path)
    }

    fn room(&self, path: &Path) -> std::io::Result<Room> {
        self.check(Op::Room, path)?;
        match self.state.lock().room {
            Some(room) => Ok(room),
            None => StdFs.room(path),
        }
    }
}

/// A file created through [`FaultFs`]: its writes and sync can fail or fall short.
struct FaultFile {
    file: std::fs::File,
    path: PathBuf,
    fs: FaultFs,
}

impl WriteFile for FaultFile {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self.fs.enter(Op::Write, &self.path)? {
            None => std::io::Write::write_vectored(&mut self.file, bufs),
            Some(Fault::Zero) => Ok(0),
            Some(Fault::Short(n)) => {
                // At most `n` bytes, from the first part that has any.
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]);
                self.file.write(&first[..n.min(first.len())])
            }
            Some(f) => Err(f.error().unwrap_or_else(|| std::io::Error::other("fault"))),
        }
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        self.fs.check(Op::SyncData, &self.path)
    }
}
