//! Reading the spool: the drain's cursor over the `chunks` tree ([`Spool::next_from`],
//! [`Spool::queued_from`], [`Spool::load`]), and how a put compares with what its id names.

use super::index::{parse_index, parse_meta, position_key, position_of};
use super::{Record, Spool, SpoolError, Spooled};

/// A spooled entry found in the index whose record file has not been read yet
/// ([`Spool::queued_from`]); [`Spool::load`] reads it.
#[derive(Debug)]
pub struct Queued {
    pub pos: u64,
    /// The `chunks` value as found: a quarantine moves the entry only if it is still this.
    value: sled::IVec,
    meta: Record,
}

/// What [`Spool::load`] found (`T`: the record, or what the caller made of it).
#[derive(Debug)]
pub enum Loaded<T = Spooled> {
    /// The record, intact: upload it.
    Ready(T),
    /// Missing or damaged: moved to `quarantine/` (and to be counted).
    Quarantined,
    /// The entry changed meanwhile (superseded, removed, or readable after all).
    Changed,
}

impl<T> Loaded<T> {
    /// Applies `f` to a ready record.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Loaded<U> {
        match self {
            Self::Ready(t) => Loaded::Ready(f(t)),
            Self::Quarantined => Loaded::Quarantined,
            Self::Changed => Loaded::Changed,
        }
    }
}

/// How a put relates to what is already spooled under its id.
pub(super) enum Existing {
    /// The indexed record has this put's CRC32C: the same content.
    Same,
    /// The indexed record's PCM starts with this put's: a shorter resend, nothing to store.
    Covers,
    /// This put's PCM starts with the indexed record's: the put supersedes it.
    ExtendedBy,
    /// The entry, its metadata or its record file is damaged or gone: as if absent.
    Gone,
    /// Other content under the same id (the indexed record's CRC32C).
    Differs(u32),
}

impl Spool {
    /// Compares a put with the record its id already names (one read, only on this rare path).
    pub(super) fn compare(&self, existing: &[u8], record: &Record) -> Result<Existing, SpoolError> {
        let Some((pos, crc, _)) = parse_index(existing) else {
            return Ok(Existing::Gone);
        };
        if crc == record.crc32c {
            return Ok(Existing::Same);
        }
        let Some((_, meta)) = self
            .chunks
            .get(position_key(pos))?
            .and_then(|v| parse_meta(&v))
        else {
            return Ok(Existing::Gone);
        };
        let Some(Spooled { record: old, .. }) = self.read_record(pos, &meta)? else {
            return Ok(Existing::Gone);
        };
        Ok(if record.pcm.starts_with(&old.pcm) {
            Existing::ExtendedBy
        } else if old.pcm.starts_with(&record.pcm) {
            Existing::Covers
        } else {
            Existing::Differs(crc)
        })
    }

    /// True while the index still names the record at `pos` for its id: false once a longer
    /// piece superseded it (then only the newer one may be uploaded).
    pub fn is_current(&self, pos: u64, record: &Record) -> Result<bool, SpoolError> {
        Ok(self
            .index
            .get(record.index_key())?
            .and_then(|v| parse_index(&v))
            .is_some_and(|(p, _, _)| p == pos))
    }

    /// The oldest intact record at a position `>= from`. Records whose file is gone, fails its
    /// checksum or does not match its metadata are quarantined and skipped; how many is returned
    /// alongside. [`Spool::queued_from`] and [`Spool::load`] in one call.
    pub fn next_from(&self, from: u64) -> Result<(Option<(u64, Spooled)>, u64), SpoolError> {
        let mut quarantined = 0;
        let mut from = from;
        let mut retried: Option<u64> = None;
        loop {
            let (next, q) = self.queued_from(from)?;
            quarantined += q;
            let Some(queued) = next else {
                return Ok((None, quarantined));
            };
            match self.load(&queued)? {
                Loaded::Ready(spooled) => return Ok((Some((queued.pos, spooled)), quarantined)),
                Loaded::Quarantined => quarantined += 1,
                Loaded::Changed if retried == Some(queued.pos) => {
                    // Changed twice under us: leave it to the next pass.
                    from = queued.pos.saturating_add(1);
                }
                // It changed meanwhile (superseded, removed, or readable after all): look again.
                Loaded::Changed => retried = Some(queued.pos),
            }
        }
    }

    /// The oldest entry at a position `>= from`, its record file not yet read: an index lookup
    /// only, so the drain can leave the read to the upload that takes it and read several
    /// records at once. Entries whose metadata does not decode are quarantined and skipped; how
    /// many is returned alongside.
    pub fn queued_from(&self, from: u64) -> Result<(Option<Queued>, u64), SpoolError> {
        let mut quarantined = 0;
        loop {
            // The iterator lives only for this statement. A sled iterator holds a read guard on
            // sled's concurrency control, and a transaction (quarantine's, or a concurrent
            // commit's) waits for every such guard: nothing below may run while one is alive.
            let next = self.chunks.range(position_key(from)..).next().transpose()?;
            let Some((key, value)) = next else {
                return Ok((None, quarantined));
            };
            if let Some((pos, (_, meta))) = position_of(&key).zip(parse_meta(&value)) {
                return Ok((Some(Queued { pos, value, meta }), quarantined));
            }
            if self.quarantine(&key, &value, None)? {
                tracing::error!(key = ?key, "spool metadata does not decode; quarantined");
                quarantined += 1;
            }
        }
    }

    /// Reads `queued`'s record file and checks it against its metadata; one that is missing or
    /// fails its checksum is quarantined. Blocking file I/O: call it off the async runtime.
    pub fn load(&self, queued: &Queued) -> Result<Loaded, SpoolError> {
        if let Some(spooled) = self.read_record(queued.pos, &queued.meta)? {
            return Ok(Loaded::Ready(spooled));
        }
        let key = position_key(queued.pos);
        if !self.quarantine(&key, &queued.value, Some(&queued.meta))? {
            return Ok(Loaded::Changed);
        }
        let m = &queued.meta;
        tracing::error!(pos = queued.pos, uid = %m.uid, session = %m.session, seq = m.seq,
            "spooled chunk is missing or fails its checksum; quarantined");
        Ok(Loaded::Quarantined)
    }

    /// The entry at exactly `pos`, if the index still has one.
    pub fn queued_at(&self, pos: u64) -> Result<Option<Queued>, SpoolError> {
        Ok(self.chunks.get(position_key(pos))?.and_then(|value| {
            let (_, meta) = parse_meta(&value)?;
            Some(Queued { pos, value, meta })
        }))
    }
}
