//! Room left on the filesystem under the spool (statvfs): the spool's own bound counts its
//! records, but the disk is also what the index, quarantined files, temporary files and anyone
//! else on the volume use. A put is refused, and `/readyz` says not ready, while less than
//! [`RESERVE_BYTES`] or [`RESERVE_INODES`] is left.

use std::path::Path;

/// Free bytes a put must leave on the spool's filesystem beyond its own.
pub const RESERVE_BYTES: u64 = 64 * 1024 * 1024;
/// Free inodes a put must leave (filesystems without inode limits report none as limited).
pub const RESERVE_INODES: u64 = 1024;

/// What the filesystem has left for an unprivileged writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub free_bytes: u64,
    /// `None` on a filesystem that does not count inodes (`f_files` is 0).
    pub free_inodes: Option<u64>,
}

impl Room {
    /// Reads it for the filesystem holding `path`.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let s = rustix::fs::statvfs(path)?;
        Ok(Self {
            free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            free_inodes: (s.f_files > 0).then_some(s.f_favail),
        })
    }

    /// True when `bytes` more (in one new file) still leave the reserves.
    pub fn fits(&self, bytes: u64) -> bool {
        self.free_bytes >= bytes.saturating_add(RESERVE_BYTES)
            && self.free_inodes.is_none_or(|n| n > RESERVE_INODES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserves_are_kept() {
        let room = |free_bytes, free_inodes| Room {
            free_bytes,
            free_inodes,
        };
        assert!(room(RESERVE_BYTES + 10, None).fits(10));
        assert!(!room(RESERVE_BYTES + 10, None).fits(11));
        assert!(!room(u64::MAX, Some(RESERVE_INODES)).fits(1));
        assert!(room(u64::MAX, Some(RESERVE_INODES + 1)).fits(1));
        let here = Room::of(Path::new(".")).expect("statvfs");
        assert!(here.free_bytes > 0);
    }
}
