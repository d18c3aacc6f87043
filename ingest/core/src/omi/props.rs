//! Properties of the whole protocol: decoding and query parsing never panic, and a version 2
//! stream split into frames in any way, with any replays and overlaps of the same bytes, is
//! stored exactly once.

use proptest::collection::vec;
use proptest::prelude::*;

use super::ConversationId;
use super::frame::{Audio, Frame, decode, encode_audio};
use super::query::{ListenParams, TimelineVersion};
use super::timeline::{Action, Cut, OmiChunk, OmiStream};

/// Drives a stream as ingest would: each frame decided, then its `Append` fed in `step`-byte
/// pieces (odd ones split samples).
fn drive(
    s: &mut OmiStream,
    frame: &Frame<'_>,
    step: usize,
    out: &mut Vec<OmiChunk>,
) -> Vec<Action> {
    let mut rest = Vec::new();
    for action in s.on_frame(frame) {
        match action {
            Action::Chunk(c) => out.push(c),
            Action::Append(range) => {
                let Frame::Audio(audio) = frame else {
                    panic!("an Append for a frame without audio")
                };
                let mut data = &audio.pcm()[range];
                while !data.is_empty() {
                    let (taken, chunk) = s.feed(&data[..step.min(data.len())]);
                    assert!(taken > 0, "feeding makes progress");
                    data = &data[taken..];
                    out.extend(chunk);
                }
            }
            other => rest.push(other),
        }
    }
    rest
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..48)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decoding_any_payload_of_a_known_opcode_never_panics(
        op in 99u32..107,
        payload in vec(any::<u8>(), 0..48),
    ) {
        let mut m = op.to_le_bytes().to_vec();
        m.extend_from_slice(&payload);
        if let Ok(Frame::Audio(a)) = decode(&m) {
            prop_assert!(a.timestamp().is_finite() && a.timestamp() >= 0.0);
            prop_assert_eq!(a.pcm().len() % 2, 0);
        }
    }

    #[test]
    fn parsing_any_query_never_panics(
        q in "(uid|sample_rate|client_kind|audio_timeline|x)=[a-z0-9%+._/-]{0,12}(&(uid|sample_rate|client_kind|audio_timeline)=[a-zA-Z0-9%+]{0,8}){0,4}",
        junk in ".{0,40}",
    ) {
        if let Ok(p) = ListenParams::parse(&q) {
            prop_assert!(spillway_proto::validate::id(&p.uid).is_ok());
            prop_assert!((8_000..=48_000).contains(&p.sample_rate));
        }
        let _ = ListenParams::parse(&junk);
    }

    /// Arbitrary messages (after the first 103) never panic the stream, and whatever it stores
    /// is well formed.
    #[test]
    fn any_message_sequence_yields_well_formed_chunks(
        v2 in any::<bool>(),
        chunk_samples in 1u64..64,
        msgs in vec((99u32..107, vec(any::<u8>(), 0..40)), 0..40),
        step in 1usize..50,
    ) {
        let version = if v2 { TimelineVersion::V2 } else { TimelineVersion::V1 };
        let mut s = OmiStream::new(8_000, version, chunk_samples);
        let mut chunks = Vec::new();
        for (op, payload) in &msgs {
            let mut m = op.to_le_bytes().to_vec();
            m.extend_from_slice(payload);
            if let Ok(frame) = decode(&m) {
                drive(&mut s, &frame, step, &mut chunks);
            }
        }
        chunks.extend(s.finish());
        for c in &chunks {
            prop_assert!(!c.pcm.is_empty() && c.pcm.len() % 2 == 0);
            prop_assert!(c.samples() <= chunk_samples);
            prop_assert_eq!(c.crc32c, crc32c::crc32c(&c.pcm));
            prop_assert!(c.start.is_finite());
        }
    }

    #[test]
    fn a_v2_stream_with_replays_and_overlaps_is_stored_exactly_once(
        rate in prop::sample::select(vec![8_000u32, 16_000, 44_100, 48_000]),
        chunk_samples in 1u64..300,
        base_ms in 0u64..1_000_000_000,
        data in vec(any::<u8>(), 2..1_600),
        frames in vec((0usize..400, 1usize..150), 1..120),
        step in 1usize..400,
    ) {
        let total = data.len() / 2;
        let stream = &data[..2 * total];
        let base = 1_700_000_000.0 + base_ms as f64 / 1000.0;
        let time = |k: usize| base + k as f64 / f64::from(rate);
        let mut s = OmiStream::new(rate, TimelineVersion::V2, chunk_samples);
        let mut chunks = Vec::new();
        s.on_frame(&Frame::Conversation(ConversationId::parse("c").map_err(|e| TestCaseError::fail(e.to_string()))?));

        // Each frame starts anywhere from the end of what was sent back to `back` samples before
        // it: exact replays, overlaps and contiguous frames. The rest goes last, contiguously.
        let mut end = 0;
        let mut sent = 0u64;
        let spans = frames.iter().map(|&(back, len)| (back, len)).chain(std::iter::once((0, usize::MAX)));
        for (back, len) in spans {
            if end == total {
                break;
            }
            let start = end.saturating_sub(back);
            let stop = start.saturating_add(len).min(total);
            let audio = Audio::new(time(start), &stream[2 * start..2 * stop])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            drive(&mut s, &Frame::Audio(audio), step, &mut chunks);
            sent += 2 * (stop - start) as u64;
            end = end.max(stop);
        }
        chunks.extend(s.finish());

        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.pcm.iter().copied()).collect();
        prop_assert_eq!(&joined[..], stream, "nothing lost, nothing twice");
        let c = *s.counters();
        prop_assert_eq!((c.conflict_bytes, c.gap_cuts), (0, 0));
        prop_assert_eq!(sent, stream.len() as u64 + c.replayed_bytes + c.trimmed_bytes);
        let mut first = 0;
        for (k, ch) in chunks.iter().enumerate() {
            prop_assert!((ch.start - time(first)).abs() < 1e-6, "chunk {} starts at sample {}", k, first);
            let last = k + 1 == chunks.len();
            prop_assert!(ch.cut == Cut::Full || (last && ch.cut == Cut::Disconnect));
            prop_assert!(last || ch.samples() == chunk_samples);
            first += ch.samples() as usize;
        }
    }
}

#[test]
fn a_decoded_101_feeds_the_stream_without_a_copy() {
    let m = encode_audio(12.5, &[1, 0, 2, 0]);
    let Ok(frame) = decode(&m) else {
        panic!("valid 101")
    };
    let mut s = OmiStream::new(8_000, TimelineVersion::V2, 10);
    s.on_frame(&Frame::Conversation(
        ConversationId::parse("c").expect("id"),
    ));
    let mut chunks = Vec::new();
    assert!(drive(&mut s, &frame, 3, &mut chunks).is_empty());
    chunks.extend(s.finish());
    assert_eq!(
        (chunks[0].start, chunks[0].pcm.as_ref()),
        (12.5, &[1, 0, 2, 0][..])
    );
}
