//! Making the index agree with the record files after a crash or damage to either: dangling
//! index entries dropped, entries whose file is gone reported lost, valid orphans adopted.

use std::path::Path;

use prost::Message;

use super::fs::ignore_missing;
use super::index::{index_value, parse_index, parse_meta, position_key, position_of};
use super::read::Existing;
use super::{Reconciled, Record, Spool, SpoolError, sub};

impl Spool {
    /// Makes the index agree with the record files, after a crash or damage: index entries
    /// whose file is gone are dropped and reported as lost; valid record files the index does
    /// not name are adopted; files that fail their checks are quarantined; temporary files of
    /// puts that never completed (never acknowledged) are deleted. Touches every record's
    /// directory entry, not its audio (only orphans are read); the uploader runs it in the
    /// background before the drain starts, so start-up does not wait for it.
    pub fn reconcile(&self) -> Result<Reconciled, SpoolError> {
        let mut found = Reconciled::default();
        // 1. Index entries pointing at no metadata entry are dangling (a crash between
        //    removals, or a damaged log): drop them. Counts come from `chunks`, not from here.
        // Entries first, then work: no sled iterator may be alive while other sled calls run
        // (see next_from); the service commits concurrently.
        let entries = self.index.iter().collect::<Result<Vec<_>, _>>()?;
        for (id, v) in entries {
            let pos = parse_index(&v).map(|(p, _, _)| p);
            if pos.is_none_or(|p| !self.chunks.contains_key(position_key(p)).unwrap_or(true)) {
                let _writer = self.lock();
                if self.index.get(&id)?.as_deref() == Some(v.as_ref())
                    && pos
                        .is_none_or(|p| !self.chunks.contains_key(position_key(p)).unwrap_or(true))
                {
                    self.index.remove(&id)?;
                }
            }
        }
        // 2. Every metadata entry needs its file (else the audio is lost: counted) and its
        //    index entry (rebuilt when missing). Keys first, as above.
        let keys = self.chunks.iter().keys().collect::<Result<Vec<_>, _>>()?;
        for key in keys {
            let _writer = self.lock();
            let Some(value) = self.chunks.get(&key)? else {
                continue;
            };
            let (Some(pos), Some((size, meta))) = (position_of(&key), parse_meta(&value)) else {
                continue;
            };
            let id = meta.index_key();
            // As `Path::exists`: a file that cannot be looked up counts as gone.
            if !self.fs.try_exists(&self.record_path(pos)).unwrap_or(false) {
                self.quarantine.insert(&key, value.as_ref())?;
                if self.forget(&key, &id)? {
                    sub(&self.used, size);
                    sub(&self.count, 1);
                }
                let id = String::from_utf8_lossy(&id).into_owned();
                tracing::error!(%id, pos, "spooled chunk's file is gone: lost to disk damage");
                found.lost.push(id);
            } else if self.index.get(&id)?.is_none() {
                self.index
                    .insert(id.as_slice(), &index_value(pos, meta.crc32c, size))?;
            }
        }
        // 3. Record files the index does not name: adopt the valid ones.
        let me = format!("tmp-{}-", std::process::id());
        for name in self.fs.read_dir_names(&self.records)? {
            let path = self.records.join(&name);
            let name = name.to_string_lossy();
            if name.starts_with("tmp-") {
                if !name.starts_with(&me) {
                    ignore_missing(self.fs.remove_file(&path))?;
                }
                continue;
            }
            let Some(pos) = name
                .strip_suffix(".rec")
                .and_then(|p| p.parse::<u64>().ok())
            else {
                continue;
            };
            if self.chunks.contains_key(position_key(pos))? {
                continue;
            }
            self.adopt(pos, &path, &mut found)?;
        }
        self.db.flush()?;
        Ok(found)
    }

    /// Takes back a record file the index does not name (under the writer lock, so a put in
    /// progress, whose file is named before its index entry, is never mistaken for one).
    fn adopt(&self, pos: u64, path: &Path, found: &mut Reconciled) -> Result<(), SpoolError> {
        let _writer = self.lock();
        if self.chunks.contains_key(position_key(pos))?
            || !self.fs.try_exists(path).unwrap_or(false)
        {
            return Ok(());
        }
        let bytes = self.fs.read(path, 0)?;
        let Some(record) = Record::decode(bytes.as_slice()).ok().filter(Record::sound) else {
            tracing::error!(pos, "unindexed spool file fails its checks; quarantined");
            ignore_missing(self.fs.rename(path, &self.quarantine_path(pos)))?;
            found.quarantined += 1;
            return Ok(());
        };
        let id = record.index_key();
        let mut supersedes = None;
        if let Some(v) = self.index.get(&id)?
            && let Some((other, _, other_size)) = parse_index(&v)
        {
            match self.compare(&v, &record)? {
                Existing::ExtendedBy => supersedes = Some((other, other_size)),
                Existing::Gone => {}
                // The indexed record is the same, longer, or different: this file is a
                // leftover (a superseded piece, or an upload whose deletion was cut short).
                Existing::Same | Existing::Covers | Existing::Differs(_) => {
                    ignore_missing(self.fs.remove_file(path))?;
                    return Ok(());
                }
            }
        }
        let size = bytes.len() as u64;
        self.install(
            pos,
            &id,
            &record,
            size,
            supersedes.map(|(old, _)| old),
            false,
        )?;
        if let Some((old, _)) = supersedes {
            ignore_missing(self.fs.remove_file(&self.record_path(old)))?;
        }
        tracing::warn!(pos, uid = %record.uid, session = %record.session, seq = record.seq,
            "adopted a spooled chunk the index had lost");
        found.adopted += 1;
        Ok(())
    }
}
