//! The spool's public leaf types: outcomes, limits, errors and what `reconcile` reports.

use std::path::PathBuf;

/// Outcome of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This put stored the chunk.
    Stored,
    /// The chunk id was already spooled with the same content, or with content this put's
    /// PCM is a prefix of; nothing new was stored.
    Duplicate,
    /// The chunk id was spooled with PCM that this put's PCM extends (a device resumed after
    /// the ack of a partial chunk was lost): this record replaced it.
    Extended,
}

/// What a put does when the spool has no room for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Refuse the put (`RESOURCE_EXHAUSTED`); ingest holds the chunk and retries, which pushes
    /// back on the devices. Nothing acknowledged is ever lost.
    #[default]
    Reject,
    /// Evict the oldest spooled chunks until the new one fits. Acknowledged audio is lost, but
    /// every eviction is logged and counted.
    DropOldest,
}

/// A chunk evicted by [`WhenFull::DropOldest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub uid: String,
    pub session: String,
    pub seq: u64,
    /// Size of the evicted record.
    pub bytes: u64,
}

/// Called for every evicted chunk (the uploader counts them in a metric).
pub type OnDrop = std::sync::Arc<dyn Fn(&Dropped) + Send + Sync>;

/// How a spool is bounded.
#[derive(Clone)]
pub struct Limits {
    pub max_bytes: u64,
    /// Most records at once: each costs an inode and a block however small it is (a session's
    /// last chunk may be 2 bytes), so bytes alone do not bound the disk.
    pub max_chunks: u64,
    pub when_full: WhenFull,
    pub on_drop: OnDrop,
}

/// The default record cap for a byte bound: one record per 16 KiB, ext4's default inode ratio,
/// so a volume sized for the bytes has the inodes too.
pub fn default_max_chunks(max_bytes: u64) -> u64 {
    (max_bytes / (16 * 1024)).max(16)
}

impl Limits {
    /// Refuses puts beyond `max_bytes` (and [`default_max_chunks`] records).
    pub fn reject(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            max_chunks: default_max_chunks(max_bytes),
            when_full: WhenFull::Reject,
            on_drop: std::sync::Arc::new(|_| {}),
        }
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_bytes", &self.max_bytes)
            .field("max_chunks", &self.max_chunks)
            .field("when_full", &self.when_full)
            .finish_non_exhaustive()
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool full: {used} of {max} bytes used, {need} more needed")]
    Full { used: u64, max: u64, need: u64 },
    #[error("spool full: it holds its most records ({max})")]
    TooManyChunks { max: u64 },
    /// The spool's filesystem is below its reserves ([`crate::disk::Room::fits`]), so the put
    /// was refused before anything was written; or writing or linking its record file ran out
    /// of space (ENOSPC). The figures are read when refused.
    #[error(
        "the spool's disk is nearly full: {free_bytes} bytes and {free_inodes:?} inodes free; a put must leave {} bytes and {} inodes",
        crate::disk::RESERVE_BYTES,
        crate::disk::RESERVE_INODES
    )]
    DiskFull {
        free_bytes: u64,
        free_inodes: Option<u64>,
    },
    #[error(
        "chunk id already spooled with different content (crc32c {existing:08x}, new {new:08x})"
    )]
    Conflict { existing: u32, new: u32 },
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("spool file error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool task failed: {0}")]
    Task(String),
    #[error(
        "the spool in {0} is in use by another process (an uploader, or `uploader drain`); one spool has one owner"
    )]
    InUse(PathBuf),
    #[error(
        "the spool in {dir} is format {found}, newer than this uploader reads (up to {supported}): run the release that wrote it (or a newer one) on it; it was left as it is"
    )]
    NewerFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "this uploader writes spool formats {oldest} to {newest}, not {format} (--spool-format)"
    )]
    UnwritableFormat {
        format: u32,
        oldest: u32,
        newest: u32,
    },
    #[error(
        "the spool in {dir} has a FORMAT file this uploader cannot read ({text:?}); it was left as it is"
    )]
    UnknownFormat { dir: PathBuf, text: String },
}

/// What [`Spool::reconcile`](super::Spool::reconcile) found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Ids the index named whose record file is gone (logged; the audio is lost).
    pub lost: Vec<String>,
    /// Valid record files the index did not name (after a crash or damage to sled's files),
    /// taken back into the spool.
    pub adopted: u64,
    /// Record files that failed their checks, moved to `quarantine/`.
    pub quarantined: u64,
}
