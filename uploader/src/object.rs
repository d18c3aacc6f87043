//! What a chunk becomes in the object store: a WAV file at a deterministic key.
//!
//! Invariant: one chunk id ⇒ one key. The key is a pure function of (prefix, uid, session, seq,
//! offset), so a retried or repeated upload finds the same object and never duplicates it (and
//! never replaces it: see `store::Store::put`).
//! `offset` is 0 for a chunk that starts on its boundary, which is every chunk unless a device
//! resumed mid-chunk: then the piece from the resume point to the boundary gets `{part}` =
//! `_<offset in samples>` (e.g. `000002_480000.wav`), so it never overwrites the piece before it.

use std::fmt::Write as _;
use std::io::Cursor;
use std::str::FromStr;

use spillway_proto::BYTES_PER_SAMPLE;
use spillway_proto::uploader::Layout;

/// The default key layout.
pub const DEFAULT_TEMPLATE: &str = "{prefix}{uid}/{session}/{seq:06}{part}.wav";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Prefix,
    Uid,
    Session,
    Seq { width: usize },
    Piece,
}

/// A parsed object-key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unknown placeholder {{{0}}}; use {{prefix}}, {{uid}}, {{session}}, {{seq}}, {{seq:0N}} or {{part}}"
    )]
    Unknown(String),
    #[error("unclosed '{{'")]
    Unclosed,
    #[error(
        "must contain {{uid}}, {{session}}, {{seq}} and {{part}} so every chunk (and every piece of a chunk resumed mid-way) gets its own key"
    )]
    NotUnique,
}

impl FromStr for KeyTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or(TemplateError::Unclosed)? + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "prefix" => Part::Prefix,
                "uid" => Part::Uid,
                "session" => Part::Session,
                "seq" => Part::Seq { width: 0 },
                "part" => Part::Piece,
                _ => match name.strip_prefix("seq:0").map(str::parse::<usize>) {
                    Some(Ok(width)) if width <= 20 => Part::Seq { width },
                    _ => return Err(TemplateError::Unknown(name.to_owned())),
                },
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let has = |want: fn(&Part) -> bool| parts.iter().any(want);
        if !(has(|p| *p == Part::Uid)
            && has(|p| *p == Part::Session)
            && has(|p| matches!(p, Part::Seq { .. }))
            && has(|p| *p == Part::Piece))
        {
            return Err(TemplateError::NotUnique);
        }
        Ok(Self { parts })
    }
}

impl Default for KeyTemplate {
    fn default() -> Self {
        Self {
            parts: vec![
                Part::Prefix,
                Part::Uid,
                Part::Literal("/".into()),
                Part::Session,
                Part::Literal("/".into()),
                Part::Seq { width: 6 },
                Part::Piece,
                Part::Literal(".wav".into()),
            ],
        }
    }
}

impl KeyTemplate {
    /// The key of chunk `seq` of (`uid`, `session`), or of its piece starting `offset` samples
    /// into the chunk.
    pub fn render(&self, prefix: &str, uid: &str, session: &str, seq: u64, offset: u64) -> String {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => key.push_str(s),
                Part::Prefix => key.push_str(prefix),
                Part::Uid => key.push_str(uid),
                Part::Session => key.push_str(session),
                Part::Seq { width } => {
                    let _ = write!(key, "{seq:0width$}");
                }
                Part::Piece if offset > 0 => {
                    let _ = write!(key, "_{offset}");
                }
                Part::Piece => {}
            }
        }
        key
    }
}

impl KeyTemplate {
    /// The key of a spooled record: by this template for a WAV record, by Omi's layout
    /// ([`omi_key`]) for an Omi one (`sealed`: stored encrypted).
    pub fn key_for(&self, prefix: &str, r: &crate::spool::Record, sealed: bool) -> String {
        match r.layout() {
            Layout::Wav => self.render(prefix, &r.uid, &r.session, r.seq, r.offset()),
            Layout::Omi => omi_key(prefix, &r.uid, &r.session, r.seq, sealed),
        }
    }
}

/// Omi's pusher's key: `{prefix}chunks/{uid}/{conversation}/{seconds}.{millis:03}.batch.bin`
/// (`.batch.enc` when `sealed`), the first sample's Unix time as the pusher prints it with
/// three decimals. `key_millis` is that time in milliseconds (the chunk's `seq`), so the key is
/// a pure function of the chunk id, like the WAV layout's.
pub fn omi_key(
    prefix: &str,
    uid: &str,
    conversation: &str,
    key_millis: u64,
    sealed: bool,
) -> String {
    let ext = if sealed { "enc" } else { "bin" };
    format!(
        "{prefix}chunks/{uid}/{conversation}/{}.{:03}.batch.{ext}",
        key_millis / 1000,
        key_millis % 1000
    )
}

/// Wraps PCM s16le mono in a WAV (RIFF) container at `sample_rate`.
///
/// hound writes the header (for no samples); the PCM, already 16-bit little-endian as WAV
/// stores it, follows in one copy, and the two sizes the header carries (the RIFF chunk's and
/// the data chunk's, its last four bytes) are set for it. Encoding sample by sample through
/// hound cost 13 % of the drain's CPU; the test below holds this to hound's own output.
pub fn wav(pcm: &[u8], sample_rate: u32) -> Result<Vec<u8>, hound::Error> {
    let mut file = wav_header(pcm.len(), sample_rate)?;
    file.reserve_exact(pcm.len());
    file.extend_from_slice(pcm);
    Ok(file)
}

/// Room the drain leaves in front of a record it reads, so the WAV header can be written in
/// place before the PCM: the object's body is then the record's own buffer, not a copy of it.
/// A mono 16-bit header is 44 bytes.
pub const WAV_HEADROOM: usize = 64;

/// The WAV header for `pcm_len` bytes of PCM s16le mono at `sample_rate`: what [`wav`] puts in
/// front of the PCM.
pub fn wav_header(pcm_len: usize, sample_rate: u32) -> Result<Vec<u8>, hound::Error> {
    // hound divides by the rate and multiplies it: outside the rates a chunk may have, it would
    // panic, not fail.
    if spillway_proto::validate::sample_rate(sample_rate).is_err() {
        return Err(hound::Error::Unsupported);
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::with_capacity(WAV_HEADROOM));
    hound::WavWriter::new(&mut out, spec)?.finalize()?;
    let mut header = out.into_inner();
    let len = header.len();
    if len < 12 || !pcm_len.is_multiple_of(BYTES_PER_SAMPLE) {
        return Err(hound::Error::Unsupported);
    }
    let data = u32::try_from(pcm_len).map_err(|_| hound::Error::TooWide)?;
    let riff = u32::try_from(len - 8)
        .ok()
        .and_then(|h| h.checked_add(data))
        .ok_or(hound::Error::TooWide)?;
    header[4..8].copy_from_slice(&riff.to_le_bytes());
    header[len - 4..len].copy_from_slice(&data.to_le_bytes());
    Ok(header)
}

#[cfg(test)]
mod tests {

    #[test]
    fn omi_keys_are_the_pushers_and_a_function_of_the_chunk_id() {
        assert_eq!(
            omi_key("", "alice", "conv-1", 1_786_961_845_727, false),
            "chunks/alice/conv-1/1786961845.727.batch.bin"
        );
        assert_eq!(
            omi_key("p/", "alice", "conv-1", 1_786_961_845_007, true),
            "p/chunks/alice/conv-1/1786961845.007.batch.enc"
        );
    }

    use super::*;

    #[test]
    fn default_key_layout() {
        let t = KeyTemplate::default();
        assert_eq!(t.render("p/", "u1", "s1", 7, 0), "p/u1/s1/000007.wav");
        assert_eq!(
            t.render("p/", "u1", "s1", 7, 480_000),
            "p/u1/s1/000007_480000.wav",
            "a piece resumed mid-chunk has its own key"
        );
        assert_eq!(DEFAULT_TEMPLATE.parse::<KeyTemplate>(), Ok(t));
    }

    #[test]
    fn templates_must_identify_the_chunk() {
        assert_eq!(
            "{uid}/{seq}{part}".parse::<KeyTemplate>(),
            Err(TemplateError::NotUnique)
        );
        assert_eq!(
            "{uid}/{session}/{seq}".parse::<KeyTemplate>(),
            Err(TemplateError::NotUnique),
            "without {{part}} two pieces of one chunk would share a key"
        );
        assert_eq!(
            "{uid}/{session}/{seq".parse::<KeyTemplate>(),
            Err(TemplateError::Unclosed)
        );
        assert!(matches!(
            "{uid}/{session}/{when}/{seq}{part}".parse::<KeyTemplate>(),
            Err(TemplateError::Unknown(_))
        ));
        let t: KeyTemplate = "audio/{session}-{uid}-{seq:03}{part}.wav".parse().unwrap();
        assert_eq!(t.render("", "u", "s", 12, 0), "audio/s-u-012.wav");
    }

    /// The WAV hound itself writes, sample by sample.
    fn hound_wav(pcm: &[u8], sample_rate: u32) -> Vec<u8> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut out = Cursor::new(Vec::new());
        let mut writer = hound::WavWriter::new(&mut out, spec).unwrap();
        for s in pcm.chunks_exact(2) {
            writer
                .write_sample(i16::from_le_bytes([s[0], s[1]]))
                .unwrap();
        }
        writer.finalize().unwrap();
        out.into_inner()
    }

    #[test]
    fn wav_is_byte_for_byte_what_hound_writes() {
        for (samples, rate) in [
            (0usize, 8_000),
            (1, 8_000),
            (2000, 16_000),
            (960_000, 16_000),
        ] {
            let pcm: Vec<u8> = (0..samples)
                .flat_map(|s| (s as u16).wrapping_mul(40_503).to_le_bytes())
                .collect();
            assert_eq!(
                wav(&pcm, rate).unwrap(),
                hound_wav(&pcm, rate),
                "{samples} samples"
            );
        }
        assert!(wav(&[1, 2, 3], 8_000).is_err(), "half a sample");
    }

    #[test]
    fn wav_round_trips_through_a_reader() {
        let pcm: Vec<u8> = (0..2000u16)
            .flat_map(|s| s.wrapping_mul(31).to_le_bytes())
            .collect();
        let file = wav(&pcm, 16_000).unwrap();
        assert_eq!(file.len(), 44 + pcm.len());
        let reader = hound::WavReader::new(Cursor::new(&file)).unwrap();
        assert_eq!(reader.spec().sample_rate, 16_000);
        assert_eq!(reader.spec().channels, 1);
        let back: Vec<u8> = reader
            .into_samples::<i16>()
            .flat_map(|s| s.unwrap().to_le_bytes())
            .collect();
        assert_eq!(back, pcm);
    }
}
