//! One test per rule of [`super`]. Frames carry exact sample offsets from `T0`, as listen's
//! version 2 projection does.

use super::*;
use crate::omi::frame::Audio;

const RATE: u32 = 16_000;
/// A first-sample time with a fraction, as in a real key (`…/1786961845.727.batch.bin`).
const T0: f64 = 1_786_961_845.727;

fn conv(id: &str) -> ConversationId {
    ConversationId::parse(id).expect("valid id")
}

/// Samples `[from, to)` of a reference capture: every position has its own bytes.
fn capture(from: usize, to: usize) -> Vec<u8> {
    (from..to)
        .flat_map(|i| ((i * 7 + 3) as u16).to_le_bytes())
        .collect()
}

/// The time of sample `k` of the capture.
fn at(k: usize) -> f64 {
    T0 + k as f64 / f64::from(RATE)
}

struct Run {
    s: OmiStream,
    chunks: Vec<OmiChunk>,
}

impl Run {
    fn new(version: TimelineVersion, chunk_samples: u64) -> Self {
        let mut s = OmiStream::new(RATE, version, chunk_samples);
        assert!(s.on_frame(&Frame::Conversation(conv("c1"))).is_empty());
        Self {
            s,
            chunks: Vec::new(),
        }
    }

    fn v2() -> Self {
        Self::new(TimelineVersion::V2, 60 * u64::from(RATE))
    }

    fn frame(&mut self, f: &Frame<'_>) -> Vec<Action> {
        let chunks = &mut self.chunks;
        self.s.push(f, |c| chunks.push(c))
    }

    fn audio(&mut self, ts: f64, pcm: &[u8]) -> Vec<Action> {
        let audio = Audio::new(ts, pcm).expect("valid audio");
        self.frame(&Frame::Audio(audio))
    }

    /// Samples `[from, to)` of the capture, stamped with their true time.
    fn send(&mut self, from: usize, to: usize) -> Vec<Action> {
        self.audio(at(from), &capture(from, to))
    }

    fn finish(mut self) -> Vec<OmiChunk> {
        self.chunks.extend(self.s.finish());
        self.chunks
    }
}

#[test]
fn an_exact_replay_is_ignored() {
    let mut r = Run::v2();
    assert!(r.send(0, 1600).is_empty());
    assert!(r.send(1600, 3200).is_empty());
    assert_eq!(
        r.send(0, 1600),
        vec![Action::Ignored {
            reason: Ignore::Replay,
            bytes: 3200
        }],
        "equal to what is held: no conflict, nothing unverified"
    );
    let c = *r.s.counters();
    assert_eq!(
        (c.replayed_bytes, c.conflict_bytes, c.unverified_bytes),
        (3200, 0, 0)
    );
    let chunks = r.finish();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].pcm, capture(0, 3200));
    assert_eq!((chunks[0].start, chunks[0].cut), (T0, Cut::Disconnect));
    assert_eq!(chunks[0].key_time(), "1786961845.727");
}

#[test]
fn a_partial_overlap_is_trimmed_to_the_byte() {
    let mut r = Run::v2();
    r.send(0, 1000);
    // What the caller is told to feed: the frame from its 101st sample (201st byte) on.
    let frame = capture(900, 1500);
    let decided =
        r.s.on_frame(&Frame::Audio(Audio::new(at(900), &frame).expect("audio")));
    assert_eq!(
        decided,
        vec![
            Action::Ignored {
                reason: Ignore::Overlap,
                bytes: 200
            },
            Action::Append(200..1200)
        ]
    );
    assert_eq!(r.s.feed(&frame[200..]), (1000, None));
    assert_eq!(r.s.counters().trimmed_bytes, 200);
    let chunks = r.finish();
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        chunks[0].pcm,
        capture(0, 1500),
        "nothing lost, nothing twice"
    );
}

#[test]
fn a_conflicting_overlap_is_counted_and_the_first_bytes_kept() {
    let mut r = Run::v2();
    r.send(0, 1000);
    let mut frame = capture(900, 1500);
    for b in &mut frame[..20] {
        *b = !*b; // ten samples, both bytes changed
    }
    frame[21] ^= 1; // and one byte of the next
    let actions = r.audio(at(900), &frame);
    assert_eq!(
        actions,
        vec![
            Action::Conflict { bytes: 21 },
            Action::Ignored {
                reason: Ignore::Overlap,
                bytes: 200
            },
        ]
    );
    assert_eq!(r.s.counters().conflict_bytes, 21);
    assert_eq!(r.finish()[0].pcm, capture(0, 1500));
}

#[test]
fn overlap_with_flushed_audio_cannot_be_compared_and_is_counted_apart() {
    let mut r = Run::new(TimelineVersion::V2, 1000);
    r.send(0, 1000);
    assert_eq!(r.chunks.len(), 1, "a full chunk left the stream");
    let actions = r.send(900, 1100);
    assert_eq!(
        actions,
        vec![
            Action::Unverified { bytes: 200 },
            Action::Ignored {
                reason: Ignore::Overlap,
                bytes: 200
            },
        ]
    );
    // A replay straddling the flushed chunk and the held one: half compared, half not.
    r.send(1100, 1200);
    let mut replay = capture(950, 1150);
    replay[399] ^= 0xff; // the last byte, in the held part
    assert_eq!(
        r.audio(at(950), &replay),
        vec![
            Action::Conflict { bytes: 1 },
            Action::Unverified { bytes: 100 },
            Action::Ignored {
                reason: Ignore::Replay,
                bytes: 400
            },
        ]
    );
    let chunks = r.finish();
    assert_eq!(chunks[1].pcm, capture(1000, 1200));
    assert_eq!(chunks[1].start, at(1000));
}

#[test]
fn a_gap_of_0_9_ms_is_joined_and_1_1_ms_cuts() {
    let mut r = Run::v2();
    r.send(0, 1600);
    // 0.9 ms late (14.4 samples): joined, the audio placed right after.
    assert!(r.audio(at(1600) + 0.0009, &capture(1600, 3200)).is_empty());
    // Exactly 1 ms late (16 samples) is not over 1 ms: joined.
    let t = at(3200) + 0.0009 + 0.001;
    assert!(r.audio(t, &capture(3200, 4800)).is_empty());
    assert!(r.chunks.is_empty());
    // 1.1 ms late (17.6 samples): cut.
    let t2 = t + 0.1 + 0.0011;
    assert!(
        r.audio(t2, &capture(4800, 6400)).is_empty(),
        "the cut chunk is emitted"
    );
    assert_eq!(r.s.counters().gap_cuts, 1);
    let chunks = r.finish();
    assert_eq!(chunks.len(), 2);
    assert_eq!(
        (chunks[0].cut, chunks[0].start, chunks[0].pcm.clone()),
        (Cut::Gap, T0, capture(0, 4800).into())
    );
    assert_eq!(
        (chunks[1].start, chunks[1].pcm.clone()),
        (t2, capture(4800, 6400).into())
    );
}

#[test]
fn sixty_seconds_cut_and_continuing_chunks_start_exactly_60_s_later() {
    let mut r = Run::v2();
    let second = RATE as usize;
    for k in 0..150 {
        assert!(r.send(k * second, (k + 1) * second).is_empty());
    }
    let chunks = r.finish();
    let got: Vec<_> = chunks
        .iter()
        .map(|c| (c.start, c.samples(), c.cut))
        .collect();
    assert_eq!(
        got,
        vec![
            (T0, 960_000, Cut::Full),
            (T0 + 60.0, 960_000, Cut::Full),
            (T0 + 120.0, 480_000, Cut::Disconnect),
        ]
    );
    assert_eq!(chunks[1].key_time(), "1786961905.727");
    assert!(
        chunks
            .iter()
            .all(|c| c.sample_rate == RATE && c.conversation_id == conv("c1"))
    );
    assert_eq!(chunks[2].pcm, capture(120 * second, 150 * second));
}

#[test]
fn version_1_ignores_timestamps_and_counts_samples() {
    let mut r = Run::new(TimelineVersion::V1, 1000);
    // Arrival times: late, early, repeated; none of them cuts, trims or drops anything.
    for (k, ts) in [T0, T0 + 5.0, T0 - 3.0, T0 - 3.0, T0 + 0.3]
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.audio(ts, &capture(k * 300, (k + 1) * 300)), vec![]);
    }
    let chunks = r.finish();
    let got: Vec<_> = chunks.iter().map(|c| (c.start, c.samples())).collect();
    let step = 1000.0 / f64::from(RATE);
    assert_eq!(
        got,
        vec![(T0, 1000), (T0 + step, 500)],
        "starts by sample count"
    );
    assert_eq!(r_concat(&chunks), capture(0, 1500));
    assert_eq!(chunks[0].crc32c, crc32c::crc32c(&chunks[0].pcm));
}

fn r_concat(chunks: &[OmiChunk]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.pcm.iter().copied()).collect()
}

#[test]
fn a_new_conversation_cuts_and_the_same_one_again_does_not() {
    let mut r = Run::v2();
    r.send(0, 800);
    assert!(r.frame(&Frame::Conversation(conv("c1"))).is_empty());
    assert!(r.chunks.is_empty(), "the same id again is no change");
    r.frame(&Frame::Conversation(conv("c2")));
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(
        (
            r.chunks[0].conversation_id.as_str(),
            r.chunks[0].cut,
            r.chunks[0].samples()
        ),
        ("c1", Cut::ConversationChanged, 800)
    );
    r.send(800, 1200);
    let chunks = r.finish();
    assert_eq!(
        (chunks[1].conversation_id.as_str(), chunks[1].start),
        ("c2", at(800))
    );
}

#[test]
fn a_process_request_flushes_its_conversation_only() {
    let mut r = Run::v2();
    r.send(0, 800);
    let other = Frame::Process {
        conversation_id: Some(conv("old")),
    };
    assert_eq!(
        r.frame(&other),
        vec![Action::Process {
            conversation_id: Some(conv("old"))
        }]
    );
    assert!(
        r.chunks.is_empty(),
        "another conversation's 104 leaves this chunk alone"
    );
    let current = Frame::Process {
        conversation_id: None,
    };
    assert_eq!(
        r.frame(&current),
        vec![Action::Process {
            conversation_id: Some(conv("c1"))
        }]
    );
    assert_eq!(
        (r.chunks.len(), r.chunks[0].cut, r.chunks[0].samples()),
        (1, Cut::Processed, 800)
    );
    r.send(800, 1000);
    assert_eq!(
        r.s.conversation(),
        Some(&conv("c1")),
        "audio after a 104 stays in it"
    );
    let chunks = r.finish();
    assert_eq!((chunks[1].start, chunks[1].samples()), (at(800), 200));

    let mut none = OmiStream::new(RATE, TimelineVersion::V1, 100);
    assert_eq!(
        none.on_frame(&current),
        vec![Action::Process {
            conversation_id: None
        }]
    );
}

#[test]
fn audio_before_a_conversation_is_dropped_and_counted() {
    let mut s = OmiStream::new(RATE, TimelineVersion::V2, 1000);
    let pcm = capture(0, 400);
    let audio = Frame::Audio(Audio::new(T0, &pcm).expect("audio"));
    assert_eq!(
        s.on_frame(&audio),
        vec![Action::Ignored {
            reason: Ignore::NoConversation,
            bytes: 800
        }]
    );
    assert_eq!(s.counters().no_conversation_bytes, 800);
    s.on_frame(&Frame::Conversation(conv("c1")));
    let mut chunks = Vec::new();
    assert!(
        s.push(&audio, |c| chunks.push(c)).is_empty(),
        "not a replay: it was never taken"
    );
    chunks.extend(s.finish());
    assert_eq!(r_concat(&chunks), pcm);
}

#[test]
fn heartbeats_json_and_unknown_opcodes_change_nothing_but_a_count() {
    let mut r = Run::v2();
    r.send(0, 100);
    for f in [
        Frame::Heartbeat,
        Frame::Transcript(b"{}"),
        Frame::SpeakerSample(b"{}"),
        Frame::Unknown(999),
    ] {
        assert!(r.frame(&f).is_empty());
    }
    assert!(r.audio(at(100), &[]).is_empty(), "an empty 101 is nothing");
    assert_eq!(r.s.counters().unknown_opcodes, 1);
    assert_eq!(r.finish()[0].samples(), 100);
}

#[test]
fn a_caller_feeds_in_reserved_steps_and_the_end_is_what_it_fed() {
    let mut s = OmiStream::new(RATE, TimelineVersion::V2, 60 * u64::from(RATE));
    s.on_frame(&Frame::Conversation(conv("c1")));
    let pcm = capture(0, 16_000);
    let actions = s.on_frame(&Frame::Audio(Audio::new(T0, &pcm).expect("audio")));
    assert_eq!(actions, vec![Action::Append(0..32_000)]);
    assert_eq!(s.reservation_needed(0), Some(crate::reserve::FIRST_STEP));
    s.ensure_capacity(crate::reserve::FIRST_STEP);
    assert_eq!(
        s.feed(&pcm[..crate::reserve::FIRST_STEP]),
        (crate::reserve::FIRST_STEP, None)
    );
    assert_eq!(s.pending_bytes(), crate::reserve::FIRST_STEP);
    // The caller stops there (shutdown): the next frame, contiguous with the whole first one,
    // now starts after a gap, and the chunk holds exactly what was fed.
    let next = capture(16_000, 16_100);
    let actions = s.on_frame(&Frame::Audio(Audio::new(at(16_000), &next).expect("audio")));
    let Some(Action::Chunk(c)) = actions.first() else {
        panic!("a gap cut: {actions:?}")
    };
    assert_eq!((c.cut, c.pcm.len()), (Cut::Gap, crate::reserve::FIRST_STEP));
}

#[test]
fn a_new_connection_continues_after_the_last_one_and_stores_nothing_twice() {
    let mut first = Run::v2();
    first.send(0, 48_000);
    first.chunks.extend(first.s.finish());
    let end = first.s.end_time().expect("a v2 timeline");
    assert!((end - at(48_000)).abs() < 1e-6, "{end}");

    // listen reconnects and resends from 1 s before the break (same timestamps).
    let mut second = Run::v2();
    second.s.continue_after(end);
    let replay = second.send(16_000, 32_000);
    assert!(replay.contains(&Action::Ignored {
        reason: Ignore::Replay,
        bytes: 32_000
    }));
    let overlap = second.send(32_000, 64_000);
    assert!(overlap.contains(&Action::Ignored {
        reason: Ignore::Overlap,
        bytes: 32_000
    }));
    assert!(overlap.contains(&Action::Unverified { bytes: 32_000 }));
    second.chunks.extend(second.s.finish());

    let stored: Vec<u8> = first
        .chunks
        .iter()
        .chain(&second.chunks)
        .flat_map(|c| c.pcm.to_vec())
        .collect();
    assert_eq!(stored, capture(0, 64_000), "each sample once");
    assert_eq!(second.chunks.len(), 1);
    assert!((second.chunks[0].start - at(48_000)).abs() < 1e-6);
}

#[test]
fn continuing_is_ignored_in_version_1_and_once_audio_was_accepted() {
    let mut v1 = Run::new(TimelineVersion::V1, 60 * u64::from(RATE));
    v1.s.continue_after(at(100));
    assert_eq!(v1.s.end_time(), None);
    let mut v2 = Run::v2();
    v2.send(0, 1_000);
    v2.s.continue_after(at(100_000));
    let end = v2.s.end_time().expect("a v2 timeline");
    assert!((end - at(1_000)).abs() < 1e-6);
}
