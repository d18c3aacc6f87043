//! File helpers shared by the spool's modules.

/// Treats "not found" as done: for removals and renames of files that may already be gone.
pub(super) fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
