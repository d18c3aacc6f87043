//! The spool's on-disk format version: `FORMAT` in the spool directory, one line,
//! `spillway-spool <N>`.
//!
//! - 1: every spool written before the file existed (records with fields 1 to 8, WAV only).
//! - 2: records may also carry fields 9 and 10 (the Omi layout and first-sample time).
//! - 3: only in builds with the test-only `spool-format-next` feature: the same records as 2,
//!   marked one newer, so `cargo xtask chaos`'s rolling-upgrade row can roll a cluster onto a
//!   "next release" that opens today's spools, and check that rolling back from it is refused.
//!
//! Invariant: an uploader opens every spool of a format up to [`FORMAT`] (a record without the
//! newer fields decodes as the older format meant it) and marks it with the format it writes
//! once it has opened it: [`FORMAT`], or the one `--spool-format` pins ([`OLDEST_PIN`] at
//! least); a mark never goes down. A spool of a newer format is refused at start with
//! [`SpoolError::NewerFormat`] and left exactly as it was, never "repaired". A release that
//! changes what a record or the index means raises [`FORMAT`], keeps writing the format before
//! it while `--spool-format` pins that (so the release before can still open every spool: a
//! rollback needs no drain until the operator removes the pin), and adds a fixture spool of its
//! format to `tests/fixture_spools.rs`. Uploaders older than the file (format 1 code) do not
//! read it: rolling back past it is what deploy/README.md's upgrade notes warn of.

use std::path::Path;

use super::SpoolError;

/// The newest format this code reads and the one it writes.
pub const FORMAT: u32 = if cfg!(feature = "spool-format-next") {
    3
} else {
    2
};

/// The oldest format this code can be pinned to write (`--spool-format`): the one before
/// [`FORMAT`], never 1 (a spool without a `FORMAT` file is read by uploaders that cannot read the
/// Omi layout, which every format-2 uploader may write).
pub const OLDEST_PIN: u32 = if FORMAT > 2 { FORMAT - 1 } else { 2 };

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

/// Marks the spool in `dir`, found as `found`, with `writes` (the format this uploader writes)
/// when that is newer, atomically: a temporary file, synced, renamed over `FORMAT`, the
/// directory synced. Never lowers a mark. Returns the spool's format from now on.
pub(super) fn mark(dir: &Path, found: u32, writes: u32) -> Result<u32, SpoolError> {
    if found >= writes {
        return Ok(found);
    }
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{PREFIX}{writes}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::info!(dir = %dir.display(), from = found, to = writes, "spool format marked");
    Ok(writes)
}

/// Refuses to write a format this code cannot write (`--spool-format` is checked with it too).
pub fn writable(writes: u32) -> Result<u32, SpoolError> {
    if (OLDEST_PIN..=FORMAT).contains(&writes) {
        Ok(writes)
    } else {
        Err(SpoolError::UnwritableFormat {
            format: writes,
            oldest: OLDEST_PIN,
            newest: FORMAT,
        })
    }
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
        assert_eq!(mark(dir.path(), 1, FORMAT).unwrap(), FORMAT);
        assert_eq!(check(dir.path()).unwrap(), FORMAT);
        assert_eq!(
            mark(dir.path(), FORMAT, OLDEST_PIN).unwrap(),
            FORMAT,
            "a pin never lowers a mark"
        );
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

    #[test]
    fn only_our_format_and_the_one_before_it_are_writable_never_1() {
        assert_eq!(writable(FORMAT).unwrap(), FORMAT);
        assert_eq!(writable(OLDEST_PIN).unwrap(), OLDEST_PIN);
        for w in [0, 1, FORMAT + 1] {
            assert!(matches!(
                writable(w),
                Err(SpoolError::UnwritableFormat { format, .. }) if format == w
            ));
        }
    }
}
