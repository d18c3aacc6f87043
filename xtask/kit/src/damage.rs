//! Damage done to a stopped spool, the way a bad disk does it (chaos rows and the durability tests).

use anyhow::Context as _;

/// Damages a stopped spool the way a bad disk does: cuts the tail of the index's log, or flips
/// one byte in the middle of a spooled chunk's record file.
pub fn damage_spool(dir: &std::path::Path, flip: bool) -> anyhow::Result<()> {
    if flip {
        let blob = std::fs::read_dir(dir.join("records"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rec"))
            .min()
            .context("no record in the spool to damage")?;
        let mut bytes = std::fs::read(&blob)?;
        let mid = bytes.len() / 2;
        if let Some(b) = bytes.get_mut(mid) {
            *b ^= 0x5a;
        }
        std::fs::write(&blob, bytes)?;
    } else {
        let db = dir.join("index").join("db");
        let len = std::fs::metadata(&db)?.len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)?
            .set_len(len.saturating_sub(200))?;
    }
    Ok(())
}
