//! The spool's on-disk format version: `FORMAT` in the spool directory, one line,
//! `spillway-spool <N>`.
//!
//! - 1: every spool written before the file existed (records with fields 1 to 8, WAV only).
//! - 2: records may also carry fields 9 and 10 (the Omi layout and first-sample time).
//!
//! Invariant: an uploader opens every spool of a format up to [`FORMAT`] (a record without the
//! newer fields decodes as the older format meant it) and marks it [`FORMAT`] once it has opened
//! it; a spool of a newer format is refused at start with [`SpoolError::NewerFormat`] and left
//! exactly as it was, never "repaired". A release that changes what a record or the index means
//! raises [`FORMAT`], and adds a fixture spool of its format to `tests/fixture_spools.rs`.
//! Uploaders older than the file (format 1 code) do not read it: rolling back past it is what
//! deploy/README.md's upgrade notes warn of.

use std::path::Path;

use super::SpoolError;

/// The newest format this code reads and the one it writes.
pub const FORMAT: u32 = 2;

const FILE: &str = "FORMAT";
const PREFIX: &str = "spillway-spool ";

/// The format of the spool in `dir` (1 when it has no `FORMAT` file: a spool of an earlier
/// release, or a new one); refuses a format this code does not know. Reads only.
pub(super) fn check(dir: &Path) -> Result<u32, SpoolError> {
    let text = match std::fs::read_to_string(dir.join(FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(1),
        Err(e) => return Err(e.into()),
    };
    let found = text
        .trim_end()
        .strip_prefix(PREFIX)
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| SpoolError::UnknownFormat {
            dir: dir.to_owned(),
            text: text.chars().take(64).collect(),
        })?;
    if found > FORMAT {
        return Err(SpoolError::NewerFormat {
            dir: dir.to_owned(),
            found,
            supported: FORMAT,
        });
    }
    Ok(found)
}

/// Marks the spool in `dir` as [`FORMAT`] (after it opened), atomically: a temporary file,
/// synced, renamed over `FORMAT`, the directory synced.
pub(super) fn mark(dir: &Path, found: u32) -> Result<(), SpoolError> {
    if found == FORMAT {
        return Ok(());
    }
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{PREFIX}{FORMAT}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::info!(dir = %dir.display(), from = found, to = FORMAT, "spool format marked");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn formats_up_to_ours_open_and_are_marked_newer_and_unknown_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            check(dir.path()).unwrap(),
            1,
            "no file: an earlier release's spool"
        );
        mark(dir.path(), 1).unwrap();
        assert_eq!(check(dir.path()).unwrap(), FORMAT);
        std::fs::write(dir.path().join(FILE), "spillway-spool 99\n").unwrap();
        assert!(matches!(
            check(dir.path()),
            Err(SpoolError::NewerFormat { found: 99, .. })
        ));
        std::fs::write(dir.path().join(FILE), "something else").unwrap();
        assert!(matches!(
            check(dir.path()),
            Err(SpoolError::UnknownFormat { .. })
        ));
    }
}
