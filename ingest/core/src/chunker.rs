//! Cuts a session's byte stream into exact, session-aligned chunks. Sans-IO: bytes in, chunks
//! out, no clock, no sockets.
//!
//! Invariants:
//! - Chunk `k` holds samples `[k·N, (k+1)·N)` of the session, N = `chunk_samples`; every chunk
//!   but the last is exactly N samples (`2·N` bytes).
//! - How the bytes were split into frames changes nothing, not even a split inside a sample.
//! - The concatenation of all chunks is the input, minus at most one dangling odd byte at the end
//!   (reported by [`Chunker::finish`]).
//! - At most one chunk is buffered: memory per session is bounded by `2·N` bytes. A caller that
//!   accounts for memory grows the buffer itself ([`Chunker::ensure_capacity`]), exactly.
//! - A session resumed at sample `s` ([`Chunker::starting_at`]) keeps the same grid: its first
//!   chunk is the piece `[s, next boundary)` of chunk `s / N`, and every later chunk is exactly
//!   the chunk an uninterrupted session would have cut.

use bytes::{Bytes, BytesMut};
use spillway_proto::BYTES_PER_SAMPLE;
use spillway_proto::checksum::Crc32c;

/// Latest resume point ingest accepts: 2^48 samples, over 185 years at 48 kHz. Far beyond any
/// real session, and far from where `seq × chunk_samples` could overflow.
pub const MAX_RESUME_SAMPLE: u64 = 1 << 48;

/// A complete chunk of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// 0-based index of the chunk within the session.
    pub seq: u64,
    /// Session sample index of the chunk's first sample (`seq × chunk_samples`).
    pub first_sample: u64,
    /// PCM s16le bytes, always a whole number of samples.
    pub pcm: Bytes,
    /// CRC32C of `pcm`, computed as the bytes arrived (while they were still in the cache),
    /// not in a second pass over the finished chunk.
    pub crc32c: u32,
}

impl Chunk {
    /// Number of samples in the chunk.
    pub fn samples(&self) -> u64 {
        (self.pcm.len() / BYTES_PER_SAMPLE) as u64
    }

    /// Session sample index one past the chunk's last sample.
    pub fn end_sample(&self) -> u64 {
        self.first_sample + self.samples()
    }
}

/// What remained when the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flush {
    /// The final partial chunk, if any whole samples were pending.
    pub chunk: Option<Chunk>,
    /// True when one byte (half a sample) was left over and discarded.
    pub dangling_byte: bool,
}

/// The chunking state machine of one session.
#[derive(Debug)]
pub struct Chunker {
    chunk_samples: u64,
    chunk_bytes: usize,
    buf: BytesMut,
    /// CRC32C of `buf`.
    crc: Crc32c,
    /// The chunk being filled, and the session sample its bytes start at.
    seq: u64,
    first_sample: u64,
}

impl Chunker {
    /// A chunker producing chunks of `chunk_samples` samples (at least 1).
    pub fn new(chunk_samples: u64) -> Self {
        Self::starting_at(chunk_samples, 0)
    }

    /// A chunker for a session resumed at session sample `start`. The caller bounds `start`
    /// (ingest refuses resume points past [`MAX_RESUME_SAMPLE`]) so the grid arithmetic cannot
    /// overflow.
    pub fn starting_at(chunk_samples: u64, start: u64) -> Self {
        let chunk_samples = chunk_samples.max(1);
        Self {
            chunk_samples,
            chunk_bytes: chunk_samples as usize * BYTES_PER_SAMPLE,
            buf: BytesMut::new(),
            crc: Crc32c::default(),
            seq: start / chunk_samples,
            first_sample: start,
        }
    }

    /// Bytes of the chunk being filled once complete: a whole chunk, or less for the piece a
    /// resumed session starts with.
    pub fn room(&self) -> usize {
        let end = (self.seq + 1) * self.chunk_samples;
        (end - self.first_sample) as usize * BYTES_PER_SAMPLE
    }

    pub fn chunk_samples(&self) -> u64 {
        self.chunk_samples
    }

    /// Bytes received but not yet part of an emitted chunk.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The bytes of the chunk being filled (what [`Self::pending_bytes`] counts): the only audio
    /// a chunker holds, so the only audio a replay can still be compared with.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Makes the buffer of the chunk being filled hold `bytes` (at most [`Self::room`]) without
    /// growing again: one exact allocation per step, so the memory held is what the caller's
    /// budget counts. Growing copies what is pending (the first step, a few KiB).
    pub fn ensure_capacity(&mut self, bytes: usize) {
        let bytes = bytes.min(self.room());
        if self.buf.capacity() < bytes {
            let mut grown = BytesMut::with_capacity(bytes);
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
        }
    }

    /// Feeds bytes; calls `emit` for each chunk they complete, in order.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(Chunk)) {
        while !data.is_empty() {
            let (taken, chunk) = self.push_until_chunk(data);
            data = &data[taken..];
            if let Some(chunk) = chunk {
                emit(chunk);
            }
        }
    }

    /// Feeds bytes up to the end of the chunk being filled, no further: returns how many were
    /// taken and the chunk they completed, if any. A caller that must account for memory per
    /// chunk (ingest's budget) feeds this way, reserving the next chunk before the next call.
    pub fn push_until_chunk(&mut self, data: &[u8]) -> (usize, Option<Chunk>) {
        if data.is_empty() {
            return (0, None);
        }
        let room = self.room();
        if self.buf.capacity() == 0 {
            // Unless the caller grows the buffer itself, one exact allocation per chunk.
            self.buf.reserve(room);
        }
        let take = (room - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        self.crc.update(&data[..take]);
        if self.buf.len() == room {
            let pcm = self.buf.split().freeze();
            (take, Some(self.make_chunk(pcm)))
        } else {
            (take, None)
        }
    }

    /// Bytes one full chunk holds.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Ends the session: the pending whole samples become the final chunk.
    pub fn finish(&mut self) -> Flush {
        let dangling_byte = !self.buf.len().is_multiple_of(BYTES_PER_SAMPLE);
        if dangling_byte {
            self.buf.truncate(self.buf.len() - 1);
            // Rare (a session ending mid-sample): the checksum included the dropped byte.
            self.crc = Crc32c::default();
            self.crc.update(&self.buf);
        }
        let chunk = if self.buf.is_empty() {
            None
        } else {
            let pcm = self.buf.split().freeze();
            Some(self.make_chunk(pcm))
        };
        self.buf = BytesMut::new();
        Flush {
            chunk,
            dangling_byte,
        }
    }

    fn make_chunk(&mut self, pcm: Bytes) -> Chunk {
        let chunk = Chunk {
            seq: self.seq,
            first_sample: self.first_sample,
            pcm,
            crc32c: std::mem::take(&mut self.crc).value(),
        };
        self.seq += 1;
        self.first_sample = self.seq * self.chunk_samples;
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunk_samples: u64, input: &[u8], cuts: &[usize]) -> (Vec<Chunk>, Flush) {
        run_from(chunk_samples, 0, input, cuts)
    }

    /// Feeds `input` split at `cuts` (taken modulo its length) to a chunker starting at `start`.
    fn run_from(
        chunk_samples: u64,
        start: u64,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Chunk>, Flush) {
        let mut c = Chunker::starting_at(chunk_samples, start);
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|x| x % (input.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts.into_iter().chain(std::iter::once(input.len())) {
            c.push(&input[at..cut], |ch| out.push(ch));
            at = cut;
        }
        let flush = c.finish();
        (out, flush)
    }

    #[test]
    fn one_hundred_fifty_seconds_make_two_full_chunks_and_a_half() {
        let rate = 16_000u64;
        let input: Vec<u8> = (0..150 * rate * 2).map(|i| (i % 251) as u8).collect();
        let (chunks, flush) = run(60 * rate, &input, &[1, 3, 999_999, 1_920_001]);
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|c| c.samples() == 60 * rate));
        assert_eq!(chunks[1].first_sample, 60 * rate);
        let last = flush.chunk.expect("final partial chunk");
        assert_eq!(
            (last.seq, last.first_sample, last.samples()),
            (2, 120 * rate, 30 * rate)
        );
        assert!(!flush.dangling_byte);
    }

    #[test]
    fn a_buffer_grown_in_steps_holds_exactly_what_was_asked_and_cuts_the_same_chunk() {
        let mut c = Chunker::new(8);
        c.ensure_capacity(4);
        assert_eq!(c.buf.capacity(), 4, "one exact allocation per step");
        assert_eq!(c.push_until_chunk(&[1, 2, 3, 4]), (4, None));
        c.ensure_capacity(1_000);
        assert_eq!(c.buf.capacity(), 16, "never beyond the chunk");
        let (taken, chunk) = c.push_until_chunk(&(5..=17).collect::<Vec<u8>>());
        assert_eq!(taken, 12);
        let chunk = chunk.expect("complete");
        assert_eq!(chunk.pcm, (1..=16).collect::<Vec<u8>>());
        assert_eq!(chunk.crc32c, spillway_proto::checksum::crc32c(&chunk.pcm));
    }

    #[test]
    fn a_dangling_byte_is_reported_and_dropped() {
        let (chunks, flush) = run(4, &[1, 2, 3, 4, 5], &[]);
        assert!(chunks.is_empty());
        let last = flush.chunk.expect("final partial chunk");
        assert_eq!(last.pcm.to_vec(), vec![1, 2, 3, 4]);
        assert_eq!(
            last.crc32c,
            crc32c::crc32c(&[1, 2, 3, 4]),
            "without the dropped byte"
        );
        assert!(flush.dangling_byte);
    }

    #[test]
    fn nothing_pending_means_no_final_chunk() {
        let (chunks, flush) = run(2, &[1, 2, 3, 4], &[2]);
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            flush,
            Flush {
                chunk: None,
                dangling_byte: false
            }
        );
    }

    proptest! {
        #[test]
        fn a_resumed_session_cuts_the_same_grid(
            chunk_samples in 1u64..64,
            start in 0u64..500,
            input in proptest::collection::vec(any::<u8>(), 0..2_000),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let (mut out, flush) = run_from(chunk_samples, start, &input, &cuts);
            out.extend(flush.chunk);
            let mut expect_first = start;
            for (k, ch) in out.iter().enumerate() {
                prop_assert_eq!(ch.seq, expect_first / chunk_samples, "chunk {} is on the grid", k);
                prop_assert_eq!(ch.first_sample, expect_first);
                prop_assert!(ch.end_sample() <= (ch.seq + 1) * chunk_samples, "never crosses a boundary");
                if k + 1 < out.len() {
                    prop_assert_eq!(ch.end_sample(), (ch.seq + 1) * chunk_samples, "only the last is short");
                }
                expect_first = ch.end_sample();
            }
            let joined: Vec<u8> = out.iter().flat_map(|c| c.pcm.iter().copied()).collect();
            let whole = input.len() - input.len() % 2;
            prop_assert_eq!(&joined[..], &input[..whole]);
        }

        #[test]
        fn any_frame_split_gives_the_same_chunks(
            chunk_samples in 1u64..64,
            input in proptest::collection::vec(any::<u8>(), 0..2_000),
            cuts_a in proptest::collection::vec(any::<usize>(), 0..40),
            cuts_b in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let (a, fa) = run(chunk_samples, &input, &cuts_a);
            let (b, fb) = run(chunk_samples, &input, &cuts_b);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&fa, &fb);

            let all: Vec<Chunk> = a.into_iter().chain(fa.chunk.clone()).collect();
            for (k, c) in all.iter().enumerate() {
                prop_assert_eq!(c.seq, k as u64);
                prop_assert_eq!(c.first_sample, k as u64 * chunk_samples);
                prop_assert!(c.samples() <= chunk_samples);
                if k + 1 < all.len() {
                    prop_assert_eq!(c.samples(), chunk_samples);
                }
            }
            for c in &all {
                prop_assert_eq!(c.crc32c, crc32c::crc32c(&c.pcm), "chunk {}'s checksum", c.seq);
            }
            let joined: Vec<u8> = all.iter().flat_map(|c| c.pcm.iter().copied()).collect();
            let whole = input.len() - input.len() % 2;
            prop_assert_eq!(&joined[..], &input[..whole]);
            prop_assert_eq!(fa.dangling_byte, input.len() % 2 == 1);
        }
    }
}
