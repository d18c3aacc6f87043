//! Where the pusher's audio goes: per 101 frame, what is appended to the current chunk of the
//! current conversation, and where chunks are cut. A pure state machine ([`OmiStream`]): frames
//! in, [`Action`]s and [`OmiChunk`]s out.
//!
//! # How it is driven
//! [`OmiStream::on_frame`] decides; it never takes audio itself. For a 101 it returns, in order,
//! the chunk a cut finished (if any), what was ignored or compared, and an [`Action::Append`]
//! naming the part of the frame's PCM to keep. The caller then hands that part to
//! [`OmiStream::feed`], in steps if it reserves memory per step as ingest does
//! ([`OmiStream::reservation_needed`], [`OmiStream::ensure_capacity`]), exactly as it feeds a QUIC
//! session ([`crate::session::Session::feed`]). [`OmiStream::push`] does both for a caller with
//! no budget. The end of the accepted audio is counted from what was fed, so a caller that stops
//! feeding early (shutdown) leaves no audio claimed that is not held.
//!
//! # Why it wraps [`Chunker`]
//! A run of contiguous audio (from its first frame until a gap, a conversation change, a 104 or
//! the end) is one [`Chunker`]: it already cuts exact `chunk_samples` chunks from any split of the
//! bytes, grows its buffer in the steps ingest's memory budget reserves, and checksums as bytes
//! arrive. Each cut here ends the run ([`Chunker::finish`]) and the next audio starts a new one, so
//! there is one chunker, not two. A chunk's start time is the run's first-sample time plus its
//! `first_sample / sample_rate`: continuing chunks start exactly `chunk_samples` later, by count.
//! The chunker's pending buffer ([`Chunker::pending`]) is also the only audio held, so replays
//! are compared with it and nothing else: no second copy, never more than one chunk.
//!
//! # Positions (timeline version 2)
//! Frames are placed on an integer sample axis. A frame's position is that of the last accepted
//! frame (its anchor) plus `round((t - t_anchor) × sample_rate)`: within one capture the
//! timestamps differ by whole samples, so the rounding is exact whatever the absolute time, and
//! the 1 ms tolerance (`gap × 1000 > sample_rate`) and the trimming are exact in samples. A frame
//! joined across a gap of at most 1 ms is placed at the end of the audio (no silence is invented),
//! and later frames are measured from where it was placed.
//!
//! Audio that arrives before any 103 is dropped and counted; it does not enter the timeline (a
//! later replay of it, once a conversation is named, is kept). A frame entirely before the end of
//! the accepted audio is a replay and is ignored, as the pusher does, even when it falls where a
//! gap was: that audio cannot be placed in a chunk already cut.

use std::ops::Range;

use bytes::Bytes;

use super::ConversationId;
use super::frame::{Audio, Frame};
use super::query::{ListenParams, TimelineVersion};
use crate::chunker::Chunker;

/// The pusher's chunk length.
pub const DEFAULT_CHUNK_SECONDS: u32 = 60;

/// Why a chunk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// It holds `chunk_samples`; the run continues in the next chunk.
    Full,
    /// Timeline version 2: the next frame started more than 1 ms after its end.
    Gap,
    /// A 103 named another conversation.
    ConversationChanged,
    /// A 104 for this conversation flushed it.
    Processed,
    /// The connection ended ([`OmiStream::finish`]).
    Disconnect,
}

/// A finished chunk: everything an object key and its metadata need.
#[derive(Debug, Clone, PartialEq)]
pub struct OmiChunk {
    pub conversation_id: ConversationId,
    /// Unix seconds of the first sample (the key's `{:.3}`).
    pub start: f64,
    pub sample_rate: u32,
    /// PCM s16le mono, whole samples, never empty.
    pub pcm: Bytes,
    /// CRC32C of `pcm`.
    pub crc32c: u32,
    pub cut: Cut,
}

impl OmiChunk {
    pub fn samples(&self) -> u64 {
        (self.pcm.len() / 2) as u64
    }

    /// The start as the pusher writes it in a key: three decimals.
    pub fn key_time(&self) -> String {
        format!("{:.3}", self.start)
    }
}

/// Why audio was not appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignore {
    /// No 103 has named a conversation yet.
    NoConversation,
    /// Version 2: the whole frame lies before the end of the accepted audio.
    Replay,
    /// Version 2: the frame's head overlaps the end of the accepted audio and was trimmed.
    Overlap,
}

/// What a frame asks of the caller, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A chunk a cut finished: store it.
    Chunk(OmiChunk),
    /// Feed these bytes of the frame's PCM ([`Audio::pcm`]) to [`OmiStream::feed`].
    Append(Range<usize>),
    /// Audio left out, and why.
    Ignored { reason: Ignore, bytes: usize },
    /// Of the replayed or trimmed bytes, these differed from the audio held for them.
    Conflict { bytes: usize },
    /// Of the replayed or trimmed bytes, these overlap audio no longer held (already in a
    /// finished chunk, or never accepted) and could not be compared.
    Unverified { bytes: usize },
    /// A 104: answer it with a 201 for this conversation (the current one when it named none;
    /// `None` when there is none).
    Process {
        conversation_id: Option<ConversationId>,
    },
}

/// Totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes of frames ignored as replays.
    pub replayed_bytes: u64,
    /// Bytes trimmed off the head of overlapping frames.
    pub trimmed_bytes: u64,
    /// Replayed or trimmed bytes unequal to the audio held for them.
    pub conflict_bytes: u64,
    /// Replayed or trimmed bytes that could not be compared (audio no longer held).
    pub unverified_bytes: u64,
    /// Bytes of audio dropped because no conversation was named yet.
    pub no_conversation_bytes: u64,
    pub unknown_opcodes: u64,
    /// Chunks cut at a gap over 1 ms.
    pub gap_cuts: u64,
}

/// One run of contiguous audio of one conversation: one chunker.
#[derive(Debug)]
struct Run {
    conversation: ConversationId,
    chunker: Chunker,
    /// Unix seconds of the run's first sample.
    start: f64,
    /// Timeline position of the run's first sample (version 2; 0 in version 1).
    start_pos: i64,
    /// Bytes fed to the chunker.
    fed: u64,
}

/// Version 2's sample axis.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    /// The last accepted frame: its timestamp and the position its first sample was placed at.
    anchor_ts: f64,
    anchor_pos: i64,
    /// One past the last accepted (fed) sample.
    end: i64,
}

/// The audio state of one listen connection.
#[derive(Debug)]
pub struct OmiStream {
    sample_rate: u32,
    version: TimelineVersion,
    chunk_samples: u64,
    conversation: Option<ConversationId>,
    run: Option<Run>,
    timeline: Option<Timeline>,
    counters: Counters,
}

impl OmiStream {
    /// A stream cutting chunks of `chunk_samples` samples (at least 1).
    pub fn new(sample_rate: u32, version: TimelineVersion, chunk_samples: u64) -> Self {
        Self {
            sample_rate: sample_rate.max(1),
            version,
            chunk_samples: chunk_samples.max(1),
            conversation: None,
            run: None,
            timeline: None,
            counters: Counters::default(),
        }
    }

    /// A stream for an accepted query, with chunks of `chunk_seconds`.
    pub fn for_params(params: &ListenParams, chunk_seconds: u32) -> Self {
        let chunk_samples = u64::from(chunk_seconds) * u64::from(params.sample_rate);
        Self::new(params.sample_rate, params.timeline, chunk_samples)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn conversation(&self) -> Option<&ConversationId> {
        self.conversation.as_ref()
    }

    /// Timeline version 2: the Unix time one past the last sample accepted on this connection,
    /// for a later connection of the same capture to continue from ([`Self::continue_after`]).
    pub fn end_time(&self) -> Option<f64> {
        let tl = self
            .timeline
            .filter(|_| self.version == TimelineVersion::V2)?;
        Some(tl.anchor_ts + (tl.end - tl.anchor_pos) as f64 / f64::from(self.sample_rate))
    }

    /// Timeline version 2, before this connection accepted any audio: an earlier connection of
    /// the same capture accepted audio up to `end_time` ([`Self::end_time`]), so audio before it
    /// is a replay (ignored) or an overlap (trimmed), counted as unverified since none of it is
    /// held here. Does nothing once the connection has a timeline, or in version 1.
    pub fn continue_after(&mut self, end_time: f64) {
        if self.version == TimelineVersion::V2
            && self.timeline.is_none()
            && (0.0..crate::omi::frame::MAX_TIMESTAMP).contains(&end_time)
        {
            self.timeline = Some(Timeline {
                anchor_ts: end_time,
                anchor_pos: 0,
                end: 0,
            });
        }
    }

    /// Applies one frame. See the module doc for the order of the actions.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        match frame {
            Frame::Heartbeat | Frame::Transcript(_) | Frame::SpeakerSample(_) => {}
            Frame::Unknown(_) => self.counters.unknown_opcodes += 1,
            Frame::Audio(audio) => self.on_audio(audio, &mut out),
            Frame::Conversation(id) => {
                if self.conversation.as_ref() != Some(id) {
                    out.extend(self.cut(Cut::ConversationChanged).map(Action::Chunk));
                    self.conversation = Some(id.clone());
                }
            }
            Frame::Process { conversation_id } => {
                let id = conversation_id
                    .as_ref()
                    .or(self.conversation.as_ref())
                    .cloned();
                if id.is_some() && id == self.conversation {
                    out.extend(self.cut(Cut::Processed).map(Action::Chunk));
                }
                out.push(Action::Process {
                    conversation_id: id,
                });
            }
        }
        out
    }

    fn on_audio(&mut self, audio: &Audio<'_>, out: &mut Vec<Action>) {
        let len = audio.pcm().len();
        if len == 0 {
            return;
        }
        let Some(conversation) = self.conversation.clone() else {
            self.counters.no_conversation_bytes += len as u64;
            out.push(Action::Ignored {
                reason: Ignore::NoConversation,
                bytes: len,
            });
            return;
        };
        let ts = audio.timestamp();
        let Some(tl) = self
            .timeline
            .filter(|_| self.version == TimelineVersion::V2)
        else {
            // Version 1, or the first audio of version 2: appended where the audio so far ends.
            if self.version == TimelineVersion::V2 {
                self.timeline = Some(Timeline {
                    anchor_ts: ts,
                    anchor_pos: 0,
                    end: 0,
                });
            }
            self.start_run_if_none(conversation, ts, 0);
            out.push(Action::Append(0..len));
            return;
        };

        let n = audio.samples() as i64;
        let p = tl.position(ts, self.sample_rate);
        let (placed, skip) = if p < tl.end {
            let overlap_end = (p + n).min(tl.end);
            self.compare(p, overlap_end, audio.pcm(), out);
            if p + n <= tl.end {
                self.counters.replayed_bytes += len as u64;
                out.push(Action::Ignored {
                    reason: Ignore::Replay,
                    bytes: len,
                });
                return;
            }
            let skip = (tl.end - p) as usize;
            self.counters.trimmed_bytes += 2 * skip as u64;
            out.push(Action::Ignored {
                reason: Ignore::Overlap,
                bytes: 2 * skip,
            });
            (p, skip)
        } else if (p - tl.end) * 1000 > i64::from(self.sample_rate) {
            if self.run.is_some() {
                self.counters.gap_cuts += 1;
                out.extend(self.cut(Cut::Gap).map(Action::Chunk));
            }
            (p, 0)
        } else {
            // Contiguous, or a gap of at most 1 ms: joined at the end.
            (tl.end, 0)
        };
        let first_kept = placed + skip as i64;
        self.timeline = Some(Timeline {
            anchor_ts: ts,
            anchor_pos: placed,
            end: tl.end.max(first_kept),
        });
        let start = ts + skip as f64 / f64::from(self.sample_rate);
        self.start_run_if_none(conversation, start, first_kept);
        out.push(Action::Append(2 * skip..len));
    }

    /// Compares the frame's samples at positions `[p, q)` with the audio the chunker still holds.
    fn compare(&mut self, p: i64, q: i64, pcm: &[u8], out: &mut Vec<Action>) {
        let total = 2 * (q - p).max(0) as usize;
        let held = self.run.as_ref().zip(self.timeline).map(|(run, tl)| {
            let pending = run.chunker.pending();
            (tl.end - (pending.len() / 2) as i64, pending)
        });
        let mut compared = 0;
        let mut conflicts = 0;
        if let Some((held_start, pending)) = held {
            let from = p.max(held_start);
            if from < q {
                let frame_at = 2 * (from - p) as usize;
                let held_at = 2 * (from - held_start) as usize;
                let bytes = 2 * (q - from) as usize;
                let ours = pcm.get(frame_at..frame_at + bytes).unwrap_or_default();
                let theirs = pending.get(held_at..held_at + bytes).unwrap_or_default();
                compared = ours.len().min(theirs.len());
                conflicts = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
            }
        }
        let unverified = total - compared;
        if conflicts > 0 {
            self.counters.conflict_bytes += conflicts as u64;
            out.push(Action::Conflict { bytes: conflicts });
        }
        if unverified > 0 {
            self.counters.unverified_bytes += unverified as u64;
            out.push(Action::Unverified { bytes: unverified });
        }
    }

    fn start_run_if_none(&mut self, conversation: ConversationId, start: f64, start_pos: i64) {
        if self.run.is_none() {
            self.run = Some(Run {
                conversation,
                chunker: Chunker::new(self.chunk_samples),
                start,
                start_pos,
                fed: 0,
            });
        }
    }

    /// Feeds bytes an [`Action::Append`] named, up to the end of the chunk being filled: returns
    /// how many were taken and the chunk they completed ([`Cut::Full`]), if any. Call again with
    /// the rest. Without a run (no `Append` was returned) the bytes are ignored.
    pub fn feed(&mut self, pcm: &[u8]) -> (usize, Option<OmiChunk>) {
        let Some(run) = &mut self.run else {
            return (pcm.len(), None);
        };
        let (taken, chunk) = run.chunker.push_until_chunk(pcm);
        run.fed += taken as u64;
        if let Some(tl) = &mut self.timeline {
            tl.end = run.start_pos + (run.fed / 2) as i64;
        }
        let chunk = chunk
            .map(|c| run.finished(c.first_sample, c.pcm, c.crc32c, Cut::Full, self.sample_rate));
        (taken, chunk)
    }

    /// [`Self::on_frame`], then every `Append` fed at once: chunks go to `emit` in order, the
    /// other actions are returned.
    pub fn push(&mut self, frame: &Frame<'_>, mut emit: impl FnMut(OmiChunk)) -> Vec<Action> {
        let mut rest = Vec::new();
        for action in self.on_frame(frame) {
            match action {
                Action::Chunk(chunk) => emit(chunk),
                Action::Append(range) => {
                    let pcm = match frame {
                        Frame::Audio(audio) => audio.pcm(),
                        _ => &[],
                    };
                    let mut data = pcm.get(range).unwrap_or_default();
                    while !data.is_empty() {
                        let (taken, chunk) = self.feed(data);
                        data = data.get(taken..).unwrap_or_default();
                        emit_some(chunk, &mut emit);
                        if taken == 0 {
                            break;
                        }
                    }
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// The connection ended: the partial chunk, if any.
    pub fn finish(&mut self) -> Option<OmiChunk> {
        self.cut(Cut::Disconnect)
    }

    /// How many more bytes to reserve before feeding, given `held` reserved for the chunk being
    /// filled ([`crate::reserve::next_reservation`]); `None` while there is room or no run.
    pub fn reservation_needed(&self, held: usize) -> Option<usize> {
        let run = self.run.as_ref()?;
        crate::reserve::next_reservation(run.chunker.room(), held, run.chunker.pending_bytes())
    }

    /// Grows the chunk buffer to the `held` bytes reserved for it.
    pub fn ensure_capacity(&mut self, held: usize) {
        if let Some(run) = &mut self.run {
            run.chunker.ensure_capacity(held);
        }
    }

    /// Bytes fed and not yet in a finished chunk.
    pub fn pending_bytes(&self) -> usize {
        self.run.as_ref().map_or(0, |r| r.chunker.pending_bytes())
    }

    /// Ends the run: its partial chunk (whole samples), if any.
    fn cut(&mut self, cut: Cut) -> Option<OmiChunk> {
        let mut run = self.run.take()?;
        let chunk = run.chunker.finish().chunk?;
        Some(run.finished(
            chunk.first_sample,
            chunk.pcm,
            chunk.crc32c,
            cut,
            self.sample_rate,
        ))
    }
}

fn emit_some(chunk: Option<OmiChunk>, emit: &mut impl FnMut(OmiChunk)) {
    if let Some(chunk) = chunk {
        emit(chunk);
    }
}

impl Run {
    fn finished(
        &self,
        first_sample: u64,
        pcm: Bytes,
        crc32c: u32,
        cut: Cut,
        rate: u32,
    ) -> OmiChunk {
        OmiChunk {
            conversation_id: self.conversation.clone(),
            start: self.start + first_sample as f64 / f64::from(rate),
            sample_rate: rate,
            pcm,
            crc32c,
            cut,
        }
    }
}

impl Timeline {
    /// The position of a frame's first sample, measured from the anchor.
    fn position(&self, ts: f64, rate: u32) -> i64 {
        // Timestamps are in 0..=2^32 s (`Audio::new`): the product stays below 2^48.
        self.anchor_pos + ((ts - self.anchor_ts) * f64::from(rate)).round() as i64
    }
}

#[cfg(test)]
#[path = "timeline_tests.rs"]
mod tests;
