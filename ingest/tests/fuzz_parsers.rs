//! Fuzz-style property tests of every parser of untrusted bytes ingest exposes: what a device
//! sends before it is trusted.
//!
//! - [`Session::on_frame`]: a device frame (any bytes) decoded as a `ClientMessage`, and the
//!   `Hello` it carries validated (uid, token, session, sample rate, encoding, channels,
//!   resume point), with `--auth none` and with `--auth token`. Arbitrary frames are checked
//!   against a shadow session fed the same frames pre-decoded; structured hellos with arbitrary
//!   field values are checked against the documented order of checks (each refusal has its own
//!   `ErrorCode`); accepted audio is fed through [`Session::feed`] and must come back out of
//!   the chunks, byte for byte, on the session's sample grid.
//! - [`Keyring::verify`]: device tokens (arbitrary strings, `spw1.<kid>.<payload>.<mac>`-shaped
//!   strings, payloads signed with the real key, and single-byte mutations of a valid token),
//!   and the issue → verify round trip. [`Keyring::parse`] on arbitrary keys files.
//!
//! The properties: nothing panics, every error is a precise value (never
//! `ERROR_CODE_UNSPECIFIED`, never an empty message, the code the input deserves), and a
//! mutated token never lets a device in as anyone but the uid it was issued for.
//!
//! Runs under plain `cargo test` (stable, no libFuzzer) with case counts that keep it to a few
//! seconds. A longer campaign:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p spillway-ingest --test fuzz_parsers --release
//! ```
//!
//! `PROPTEST_CASES` sets every property's case count. Failures are not persisted to a
//! regressions file (the checkout stays clean): proptest prints the minimal failing input.
//!
//! One file past the usual ~700 lines on purpose: the frame, hello and token properties share
//! their generators and the reference model of the hello checks; split, each half would copy them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use spillway_ingest::auth::{Auth, Grant, Keyring, Scope, TokenError};
use spillway_ingest::chunker::{Chunk, MAX_RESUME_SAMPLE};
use spillway_ingest::session::{Limits, Output, Params, Refusal, Session};
use spillway_proto::device::client_message::Kind;
use spillway_proto::device::{Audio, ClientMessage, Encoding, ErrorCode, Hello};
use spillway_proto::validate;

/// The one key of the token tests.
const KEYS: &str = "k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
/// Its secret (bytes 0x20..=0x3f), to sign payloads the way the keyring would.
const SECRET: [u8; 32] = {
    let mut s = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        s[i] = 0x20 + i as u8;
        i += 1;
    }
    s
};
/// Last second humantime can print (end of year 9999); `now` never goes past it.
const LAST_PRINTABLE_SECOND: u64 = 253_402_300_799;

fn keyring() -> Keyring {
    Keyring::parse(KEYS).expect("the test key parses")
}

/// `cases` unless `PROPTEST_CASES` says otherwise; no regressions file.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes, 0..4096 of them, biased towards short frames.
fn frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => proptest::collection::vec(any::<u8>(), 0..4096),
    ]
}

/// `len` bytes of cheap pseudo-random audio (large buffers would be slow to draw byte by byte).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Audio payloads: mostly small, sometimes more than a whole chunk (96,000 bytes at 48 kHz).
fn audio_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => frame_bytes(),
        1 => (4_096usize..100_000, any::<u64>()).prop_map(|(len, seed)| noise(len, seed)),
    ]
}

/// What a device stream might carry: raw bytes, encoded audio, encoded audio with one byte
/// changed, or a hello without a credential.
fn stream_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => frame_bytes(),
        3 => audio_bytes().prop_map(|pcm| audio_msg(&pcm).encode_to_vec()),
        1 => (frame_bytes(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(pcm, i, x)| {
            let mut f = audio_msg(&pcm).encode_to_vec();
            let at = i.index(f.len());
            f[at] ^= x.max(1);
            f
        }),
        1 => (id_string(), id_string(), sample_rate()).prop_map(|(uid, session, sample_rate)| {
            hello_msg(Hello {
                uid,
                session,
                sample_rate,
                encoding: Encoding::PcmS16le as i32,
                channels: 1,
                token: String::new(),
                resume_from: 0,
            })
            .encode_to_vec()
        }),
    ]
}

/// Identifier-ish strings: mostly valid ids, plus every kind of invalid one.
fn id_string() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => "[A-Za-z0-9._-]{1,128}",
        1 => Just(String::new()),
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just("x".repeat(129)),
        1 => Just("a/b".to_owned()),
        1 => Just("../../etc/passwd".to_owned()),
        1 => "[A-Za-z0-9._/-]{0,140}",
        1 => "\\PC{0,40}",
        1 => any::<String>(),
        1 => "[a-z]{1,8}[\u{0}-\u{1f}\u{7f}\u{80}-\u{10ffff}][a-z]{0,8}",
    ]
}

fn sample_rate() -> impl Strategy<Value = u32> {
    prop_oneof![
        20 => 8_000u32..=48_000,
        1 => Just(7_999u32),
        1 => Just(48_001u32),
        1 => Just(0u32),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

fn encoding() -> impl Strategy<Value = i32> {
    prop_oneof![
        12 => Just(Encoding::PcmS16le as i32),
        1 => Just(Encoding::Unspecified as i32),
        1 => -3i32..5,
        1 => any::<i32>(),
    ]
}

fn channels() -> impl Strategy<Value = u32> {
    prop_oneof![12 => Just(1u32), 1 => 0u32..4, 1 => any::<u32>()]
}

fn resume_from() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        4 => 0u64..1_000_000,
        2 => 0..=MAX_RESUME_SAMPLE,
        1 => Just(MAX_RESUME_SAMPLE),
        1 => Just(MAX_RESUME_SAMPLE + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

/// Which token a hello carries (issued in the test body: it may depend on the uid).
#[derive(Debug, Clone)]
enum TokenKind {
    /// A valid token for the hello's own uid.
    ForUid,
    /// A valid gateway token for a prefix of the hello's uid (`len` characters).
    PrefixOfUid(usize),
    /// A valid token for someone else.
    ForOther(String),
    /// A token for the hello's uid that expired at the epoch (sessions open at the epoch).
    Expired,
    /// Literal text.
    Text(String),
}

fn token_kind() -> impl Strategy<Value = TokenKind> {
    prop_oneof![
        6 => Just(TokenKind::ForUid),
        2 => (0usize..8).prop_map(TokenKind::PrefixOfUid),
        1 => "[a-z]{1,8}".prop_map(TokenKind::ForOther),
        1 => Just(TokenKind::Expired),
        1 => Just(TokenKind::Text(String::new())),
        1 => any::<String>().prop_map(TokenKind::Text),
        1 => "spw1\\.[A-Za-z0-9_.-]{0,40}".prop_map(TokenKind::Text),
    ]
}

fn token_for(keys: &Keyring, kind: &TokenKind, uid: &str) -> String {
    let issue = |scope: Scope, exp: u64| keys.issue(None, &scope, exp).expect("k1 is held");
    match kind {
        TokenKind::ForUid => issue(Scope::Uid(uid.to_owned()), u64::MAX / 2),
        TokenKind::PrefixOfUid(n) => {
            let prefix: String = uid.chars().take(*n).collect();
            issue(Scope::Prefix(prefix), u64::MAX / 2)
        }
        TokenKind::ForOther(other) => issue(Scope::Uid(other.clone()), u64::MAX / 2),
        TokenKind::Expired => issue(Scope::Uid(uid.to_owned()), 0),
        TokenKind::Text(t) => t.clone(),
    }
}

#[derive(Debug, Clone, Copy)]
enum AuthMode {
    None,
    Tokens,
}

fn auth_mode() -> impl Strategy<Value = AuthMode> {
    prop_oneof![Just(AuthMode::None), Just(AuthMode::Tokens)]
}

fn auth_of(mode: AuthMode) -> Arc<Auth> {
    Arc::new(match mode {
        AuthMode::None => Auth::None,
        AuthMode::Tokens => Auth::Tokens(keyring()),
    })
}

fn session(auth: &Arc<Auth>) -> Session {
    Session::new(
        Limits {
            chunk_seconds: 1,
            auth: Arc::clone(auth),
        },
        SystemTime::UNIX_EPOCH,
    )
}

/// Hello fields, the token still to be chosen.
#[derive(Debug, Clone)]
struct HelloSpec {
    uid: String,
    session: String,
    sample_rate: u32,
    encoding: i32,
    channels: u32,
    resume_from: u64,
    token: TokenKind,
}

fn hello_spec() -> impl Strategy<Value = HelloSpec> {
    (
        id_string(),
        id_string(),
        sample_rate(),
        encoding(),
        channels(),
        resume_from(),
        token_kind(),
    )
        .prop_map(
            |(uid, session, sample_rate, encoding, channels, resume_from, token)| HelloSpec {
                uid,
                session,
                sample_rate,
                encoding,
                channels,
                resume_from,
                token,
            },
        )
}

fn hello_of(spec: &HelloSpec, keys: &Keyring) -> Hello {
    Hello {
        uid: spec.uid.clone(),
        session: spec.session.clone(),
        sample_rate: spec.sample_rate,
        encoding: spec.encoding,
        channels: spec.channels,
        token: token_for(keys, &spec.token, &spec.uid),
        resume_from: spec.resume_from,
    }
}

fn hello_msg(hello: Hello) -> ClientMessage {
    ClientMessage {
        kind: Some(Kind::Hello(hello)),
    }
}

fn audio_msg(pcm: &[u8]) -> ClientMessage {
    ClientMessage {
        kind: Some(Kind::Audio(Audio {
            pcm: Bytes::copy_from_slice(pcm),
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// Oracles
// ---------------------------------------------------------------------------------------------

/// Every refusal is a precise value.
fn assert_precise(r: &Refusal) {
    assert_ne!(r.code, ErrorCode::Unspecified, "{r:?}");
    assert!(!r.message.trim().is_empty(), "{r:?}");
    assert!(!r.to_string().is_empty());
}

/// The code a hello deserves, in the documented order of checks (uid, credential, session,
/// sample rate, encoding, channels, resume point); `Ok` when it is accepted.
fn expected_code(hello: &Hello, auth: &Auth) -> Result<(), ErrorCode> {
    if validate::id(&hello.uid).is_err() {
        return Err(ErrorCode::InvalidUid);
    }
    if let Auth::Tokens(keys) = auth {
        match keys.verify(&hello.token, SystemTime::UNIX_EPOCH) {
            Err(_) => return Err(ErrorCode::Unauthenticated),
            Ok(grant) if !grant.scope.allows(&hello.uid) => {
                return Err(ErrorCode::PermissionDenied);
            }
            Ok(_) => {}
        }
    }
    if validate::id(&hello.session).is_err() {
        return Err(ErrorCode::InvalidSession);
    }
    if validate::sample_rate(hello.sample_rate).is_err() {
        return Err(ErrorCode::UnsupportedSampleRate);
    }
    if hello.encoding != Encoding::PcmS16le as i32 {
        return Err(ErrorCode::UnsupportedEncoding);
    }
    if hello.channels != 1 {
        return Err(ErrorCode::UnsupportedChannels);
    }
    if hello.resume_from > MAX_RESUME_SAMPLE {
        return Err(ErrorCode::InvalidResume);
    }
    Ok(())
}

/// Checks a chunk against the session's grid and the stream so far; returns where the next
/// chunk must start.
fn check_chunk(chunk: &Chunk, params: &Params, expect_first: u64) -> u64 {
    let n = params.chunk_samples;
    assert_eq!(chunk.first_sample, expect_first, "chunks are contiguous");
    assert_eq!(chunk.seq, chunk.first_sample / n, "seq is the grid cell");
    assert_eq!(chunk.pcm.len() % 2, 0, "whole samples only");
    assert!(!chunk.pcm.is_empty(), "no empty chunk");
    assert!(
        chunk.end_sample() <= (chunk.seq + 1) * n,
        "a chunk never crosses its boundary"
    );
    assert_eq!(
        chunk.crc32c,
        spillway_proto::checksum::crc32c(&chunk.pcm),
        "the running checksum is the chunk's"
    );
    chunk.end_sample()
}

/// Feeds accepted audio until every byte is taken, the way the server does; collects the
/// chunks.
fn feed_all(s: &mut Session, pcm: &[u8], chunks: &mut Vec<Chunk>) {
    let mut rest = pcm;
    let mut steps = 0usize;
    while !rest.is_empty() {
        let (taken, chunk) = s.feed(rest);
        assert!(taken <= rest.len(), "took {taken} of {}", rest.len());
        assert!(taken > 0 || chunk.is_some(), "feed made no progress");
        rest = &rest[taken..];
        chunks.extend(chunk);
        steps += 1;
        assert!(steps <= pcm.len() + 1, "feed loops");
    }
}

/// Ends a streaming session and checks the audio came out whole: every chunk on the grid from
/// the resume point on, and their concatenation the input minus at most one dangling byte.
fn finish_and_check(s: &mut Session, params: &Params, mut chunks: Vec<Chunk>, sent: &[u8]) {
    let flush = s.finish().expect("a streaming session flushes");
    assert_eq!(flush.dangling_byte, sent.len() % 2 == 1);
    chunks.extend(flush.chunk);
    let mut next = params.start_sample;
    let mut out = Vec::with_capacity(sent.len());
    for c in &chunks {
        next = check_chunk(c, params, next);
        out.extend_from_slice(&c.pcm);
    }
    assert_eq!(out.len(), sent.len() - sent.len() % 2);
    assert!(out == sent[..out.len()], "the chunks are the audio sent");
    // A second finish has nothing left.
    let again = s.finish().expect("still streaming");
    assert_eq!((again.chunk, again.dangling_byte), (None, false));
}

// ---------------------------------------------------------------------------------------------
// Target 1: Session::on_frame
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(4096))]

    /// Arbitrary frames, optionally after a valid hello: `on_frame` never panics, refuses what
    /// does not decode as `MALFORMED_FRAME`, and otherwise does exactly what `on_message` does
    /// with the decoded message (checked against a shadow session).
    #[test]
    fn arbitrary_frames_never_panic_and_refusals_are_precise(
        mode in auth_mode(),
        valid_hello in any::<bool>(),
        rate in 8_000u32..=48_000,
        resume in 0u64..100_000,
        frames in proptest::collection::vec(stream_frame(), 0..12),
    ) {
        let auth = auth_of(mode);
        let (mut real, mut shadow) = (session(&auth), session(&auth));
        let mut all_frames = Vec::new();
        if valid_hello {
            let hello = Hello {
                uid: "alice".into(),
                session: "s-1".into(),
                sample_rate: rate,
                encoding: Encoding::PcmS16le as i32,
                channels: 1,
                token: keyring().issue(None, &Scope::Uid("alice".into()), u64::MAX / 2).unwrap(),
                resume_from: resume,
            };
            all_frames.push(hello_msg(hello).encode_to_vec());
        }
        all_frames.extend(frames);
        let (mut real_chunks, mut shadow_chunks) = (Vec::new(), Vec::new());
        let mut sent = Vec::new();
        for frame in all_frames {
            let len = frame.len();
            let frame = Bytes::from(frame);
            let decoded = ClientMessage::decode(frame.clone());
            let got = real.on_frame(frame);
            match decoded {
                Err(_) => {
                    let r = got.expect_err("a frame that does not decode is refused");
                    assert_precise(&r);
                    prop_assert_eq!(r.code, ErrorCode::MalformedFrame);
                    prop_assert!(r.message.contains(&len.to_string()), "{}", r.message);
                }
                Ok(msg) => {
                    let want = shadow.on_message(msg);
                    prop_assert_eq!(&got, &want);
                    match got {
                        Err(r) => assert_precise(&r),
                        Ok(Output::Accepted(p)) => {
                            prop_assert_eq!(real.params(), Some(&p));
                            prop_assert_eq!(real.chunk_bytes(), Some(p.chunk_samples as usize * 2));
                        }
                        Ok(Output::Audio(pcm)) => {
                            prop_assert!(real.params().is_some(), "audio only after a hello");
                            feed_all(&mut real, &pcm, &mut real_chunks);
                            feed_all(&mut shadow, &pcm, &mut shadow_chunks);
                            sent.extend_from_slice(&pcm);
                        }
                    }
                }
            }
        }
        prop_assert_eq!(&real_chunks, &shadow_chunks);
        match real.params().cloned() {
            Some(params) => finish_and_check(&mut real, &params, real_chunks, &sent),
            None => {
                prop_assert!(real.finish().is_none(), "nothing to flush before a hello");
                prop_assert_eq!(real.feed(&[1, 2, 3]), (3, None));
            }
        }
    }

    /// Structurally valid hellos with arbitrary field values (unicode, '/', '..', huge rates,
    /// unknown encodings, resume points up to u64::MAX, every kind of token), then arbitrary
    /// audio: each hello gets exactly the code its first bad field deserves, an accepted one
    /// the parameters it asked for, and the audio comes back out of the chunks whole.
    #[test]
    fn structured_hellos_get_exactly_their_code_and_audio_round_trips(
        mode in auth_mode(),
        spec in hello_spec(),
        audio in proptest::collection::vec(audio_bytes(), 0..8),
        trailing_hello in any::<bool>(),
        near_boundary in proptest::option::weighted(0.5, 0u64..2_000),
    ) {
        let keys = keyring();
        let auth = auth_of(mode);
        let mut spec = spec;
        if let (Some(d), 8_000..=48_000) = (near_boundary, spec.sample_rate) {
            // Resume a little before a chunk boundary, so the audio crosses it.
            let rate = u64::from(spec.sample_rate);
            let cell = spec.resume_from.min(MAX_RESUME_SAMPLE - rate) / rate + 1;
            spec.resume_from = cell * rate - d - 1;
        }
        let hello = hello_of(&spec, &keys);
        let want = expected_code(&hello, &auth);
        let mut s = session(&auth);
        let got = s.on_frame(Bytes::from(hello_msg(hello.clone()).encode_to_vec()));
        match (&got, want) {
            (Err(r), Err(code)) => {
                assert_precise(r);
                prop_assert_eq!(r.code, code, "{}", r.message);
                prop_assert!(s.params().is_none());
                // Refused: audio is still refused as before a hello.
                let r = s.on_frame(Bytes::from(audio_msg(b"ab").encode_to_vec())).unwrap_err();
                prop_assert_eq!(r.code, ErrorCode::ExpectedHello);
                return Ok(());
            }
            (Ok(Output::Accepted(p)), Ok(())) => {
                prop_assert_eq!(&p.uid, &hello.uid);
                prop_assert_eq!(&p.session, &hello.session);
                prop_assert_eq!(p.sample_rate, hello.sample_rate);
                prop_assert_eq!(p.start_sample, hello.resume_from);
                prop_assert_eq!(p.chunk_samples, u64::from(hello.sample_rate));
            }
            _ => prop_assert!(false, "hello {:?}: got {:?}, want {:?}", hello, got, want),
        }
        let params = s.params().cloned().expect("accepted");
        let mut chunks = Vec::new();
        let mut sent = Vec::new();
        for pcm in &audio {
            match s.on_frame(Bytes::from(audio_msg(pcm).encode_to_vec())) {
                Ok(Output::Audio(got)) => {
                    prop_assert_eq!(&got[..], &pcm[..]);
                    feed_all(&mut s, &got, &mut chunks);
                    sent.extend_from_slice(pcm);
                }
                other => prop_assert!(false, "audio refused: {:?}", other),
            }
        }
        if trailing_hello {
            let r = s.on_frame(Bytes::from(hello_msg(hello).encode_to_vec())).unwrap_err();
            assert_precise(&r);
            prop_assert_eq!(r.code, ErrorCode::UnexpectedHello);
        }
        finish_and_check(&mut s, &params, chunks, &sent);
    }

    /// Single-byte mutations of an encoded valid hello: never a panic, and the result is what
    /// the mutated bytes decode to (or `MALFORMED_FRAME`).
    #[test]
    fn mutated_hello_frames_are_judged_by_what_they_decode_to(
        mode in auth_mode(),
        at_frac in 0.0f64..1.0,
        op in 0u8..3,
        byte in any::<u8>(),
    ) {
        let keys = keyring();
        let auth = auth_of(mode);
        let hello = Hello {
            uid: "alice".into(),
            session: "s-1".into(),
            sample_rate: 16_000,
            encoding: Encoding::PcmS16le as i32,
            channels: 1,
            token: keys.issue(None, &Scope::Uid("alice".into()), u64::MAX / 2).unwrap(),
            resume_from: 12_345,
        };
        let mut frame = hello_msg(hello).encode_to_vec();
        let i = ((frame.len() as f64) * at_frac) as usize;
        match op {
            0 => {
                let last = frame.len() - 1;
                frame[i.min(last)] ^= byte.max(1);
            }
            1 => {
                frame.remove(i.min(frame.len() - 1));
            }
            _ => frame.insert(i, byte),
        }
        let got = session(&auth).on_frame(Bytes::from(frame.clone()));
        match ClientMessage::decode(frame.as_slice()) {
            Err(_) => prop_assert_eq!(got.unwrap_err().code, ErrorCode::MalformedFrame),
            Ok(msg) => {
                let want = session(&auth).on_message(msg.clone());
                prop_assert_eq!(&got, &want);
                if let Err(r) = &got {
                    assert_precise(r);
                    if let Some(Kind::Hello(h)) = &msg.kind {
                        prop_assert_eq!(Err(r.code), expected_code(h, &auth));
                    }
                }
                if let (Ok(Output::Accepted(_)), Some(Kind::Hello(h))) = (&got, &msg.kind) {
                    prop_assert_eq!(expected_code(h, &auth), Ok(()));
                    if matches!(mode, AuthMode::Tokens) {
                        prop_assert_eq!(&h.uid, "alice", "a mutated frame let in another uid");
                    }
                }
            }
        }
    }
}

/// What the device stream's framing must make of `wire` (4-byte big-endian length, then the
/// frame): the complete frames, whether a length over `max` stops it, and the bytes of an
/// unfinished frame left at the end.
fn reference_frames(wire: &[u8], max: usize) -> (Vec<Vec<u8>>, bool, usize) {
    let mut frames = Vec::new();
    let mut rest = wire;
    loop {
        let Some((head, body)) = rest.split_first_chunk::<4>() else {
            return (frames, false, rest.len());
        };
        let len = u32::from_be_bytes(*head) as usize;
        if len > max {
            return (frames, true, rest.len());
        }
        if body.len() < len {
            return (frames, false, rest.len());
        }
        frames.push(body[..len].to_vec());
        rest = &body[len..];
    }
}

proptest! {
    #![proptest_config(config(2048))]

    /// A device stream of any bytes, arriving in any pieces, through the framing codec ingest
    /// reads it with and then through a session: the codec yields exactly the frames the
    /// length prefixes delimit, refuses a length over the limit, never panics, and every frame
    /// gets a precise answer from the session.
    #[test]
    fn device_streams_of_any_bytes_are_framed_and_judged_precisely(
        mode in auth_mode(),
        payloads in proptest::collection::vec(stream_frame(), 0..6),
        tail in frame_bytes(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        max in prop_oneof![
            Just(spillway_proto::framing::DEFAULT_MAX_FRAME_BYTES),
            1usize..5_000,
        ],
    ) {
        use tokio_util::codec::Decoder as _;
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend_from_slice(&(p.len() as u32).to_be_bytes());
            wire.extend_from_slice(p);
        }
        wire.extend_from_slice(&tail);
        let (want, too_large, left) = reference_frames(&wire, max);

        let mut codec = spillway_proto::framing::codec(max);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let (mut buf, mut got, mut failed, mut at) = (bytes::BytesMut::new(), Vec::new(), false, 0);
        'read: for cut in cuts {
            buf.extend_from_slice(&wire[at..cut]);
            at = cut;
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => got.push(frame.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(!e.to_string().is_empty());
                        failed = true;
                        break 'read;
                    }
                }
            }
        }
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(failed, too_large);
        if !failed {
            let end = codec.decode_eof(&mut buf);
            match left {
                0 => prop_assert!(matches!(end, Ok(None))),
                // A head whose frame never came: tokio-util drops it quietly.
                4 => prop_assert!(!matches!(end, Ok(Some(_)))),
                _ => prop_assert!(end.is_err(), "{} bytes left, got {:?}", left, end),
            }
        }
        let mut s = session(&auth_of(mode));
        let mut chunks = Vec::new();
        for frame in got {
            prop_assert!(frame.len() <= max);
            match s.on_frame(Bytes::from(frame)) {
                Err(r) => assert_precise(&r),
                Ok(Output::Audio(pcm)) => feed_all(&mut s, &pcm, &mut chunks),
                Ok(Output::Accepted(_)) => {}
            }
        }
        let _ = s.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// Target 2: Keyring::verify and Keyring::parse
// ---------------------------------------------------------------------------------------------

/// Base64url text (no padding), sometimes with characters outside the alphabet.
fn b64ish() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| B64.encode(b)),
        2 => "[A-Za-z0-9_-]{0,80}",
        1 => "[A-Za-z0-9_+/=-]{0,80}",
        1 => "\\PC{0,20}",
    ]
}

fn kid_ish() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("k1".to_owned()),
        2 => "[A-Za-z0-9_-]{1,32}",
        1 => "[A-Za-z0-9_-]{33,40}",
        1 => Just(String::new()),
        1 => "\\PC{0,10}",
    ]
}

/// JSON payloads a token might carry: the right shape with odd values, wrong shapes, garbage.
fn payload_json() -> impl Strategy<Value = String> {
    let val = prop_oneof![
        "\\PC{0,12}".prop_map(|s| serde_json::Value::String(s).to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("1e400".to_owned()),
    ];
    let key = prop_oneof![
        Just("uid"),
        Just("uid_prefix"),
        Just("exp"),
        Just("admin"),
        Just("UID"),
    ];
    prop_oneof![
        4 => proptest::collection::vec((key, val), 0..5).prop_map(|fields| {
            let body: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::Value::String(k.to_owned())))
                .collect();
            format!("{{{}}}", body.join(","))
        }),
        1 => "\\PC{0,40}",
        1 => Just(r#"{"uid":"a","exp":1,"exp":99999999999}"#.to_owned()),
        1 => Just(r#"{"uid":"a","uid":"b","exp":99999999999}"#.to_owned()),
    ]
}

/// Signs `spw1.<kid>.<payload>` with the test secret, as `Keyring::issue` would.
fn sign(kid: &str, payload: &[u8]) -> String {
    let signed = format!("spw1.{kid}.{}", B64.encode(payload));
    let key = hmac::Key::new(hmac::HMAC_SHA256, &SECRET);
    let mac = B64.encode(hmac::sign(&key, signed.as_bytes()).as_ref());
    format!("{signed}.{mac}")
}

/// The checks every verification result must pass, whatever the token.
fn check_verdict(token: &str, got: &Result<Grant, TokenError>, now: u64) {
    match got {
        Err(e) => {
            assert!(!e.to_string().trim().is_empty());
            match e {
                TokenError::Missing => assert!(token.is_empty()),
                TokenError::TooLong(n) => {
                    assert_eq!(*n, token.len());
                    assert!(*n > spillway_ingest::auth::token::MAX_TOKEN_BYTES);
                }
                TokenError::UnknownKey(kid) => assert_ne!(kid, "k1"),
                _ => {}
            }
            if token.is_empty() {
                assert_eq!(*e, TokenError::Missing);
            }
        }
        Ok(g) => {
            assert_eq!(g.kid, "k1");
            assert!(g.expires > now, "an expired token was let in");
            assert!(token.len() <= spillway_ingest::auth::token::MAX_TOKEN_BYTES);
        }
    }
}

proptest! {
    #![proptest_config(config(8192))]

    /// Arbitrary strings and `spw1.<kid>.<payload>.<mac>`-shaped ones with random parts: never
    /// a panic, always a precise error (a random MAC never verifies).
    #[test]
    fn verify_never_panics_on_arbitrary_tokens(
        raw in prop_oneof![
            any::<String>(),
            "\\PC{0,64}",
            "[.a-z0-9]{0,16}",
            "\\PC{1000,1100}",
        ],
        kid in kid_ish(),
        payload in b64ish(),
        mac in b64ish(),
        extra_dots in 0usize..3,
        now in 0..=LAST_PRINTABLE_SECOND,
    ) {
        let keys = keyring();
        for token in [
            raw.clone(),
            format!("spw1.{kid}.{payload}.{mac}"),
            format!("spw1.{kid}.{payload}{}.{mac}", ".".repeat(extra_dots)),
            format!("{raw}.{mac}"),
        ] {
            let got = keys.verify(&token, at(now));
            check_verdict(&token, &got, now);
            prop_assert!(got.is_err(), "an unsigned token verified: {token:?} -> {got:?}");
        }
    }

    /// Payloads correctly signed with the held key but of any shape: the claims parser after
    /// the MAC never panics, and lets in only exactly one of uid/uid_prefix with a future exp.
    #[test]
    fn signed_payloads_of_any_shape_are_judged_precisely(
        json in payload_json(),
        raw_payload in proptest::collection::vec(any::<u8>(), 0..64),
        use_raw in proptest::bool::weighted(0.1),
        now in prop_oneof![Just(0u64), 0..=LAST_PRINTABLE_SECOND],
    ) {
        let payload = if use_raw { raw_payload } else { json.into_bytes() };
        let token = sign("k1", &payload);
        let got = keyring().verify(&token, at(now));
        check_verdict(&token, &got, now);
        if let Ok(g) = &got {
            let v: serde_json::Value = serde_json::from_slice(&payload).expect("accepted ⇒ JSON");
            let obj = v.as_object().expect("accepted ⇒ an object");
            prop_assert!(obj.keys().all(|k| ["uid", "uid_prefix", "exp"].contains(&k.as_str())));
            prop_assert_eq!(obj.get("exp").and_then(serde_json::Value::as_u64), Some(g.expires));
            match &g.scope {
                Scope::Uid(u) => {
                    prop_assert_eq!(obj.get("uid").and_then(|v| v.as_str()), Some(u.as_str()));
                    prop_assert!(obj.get("uid_prefix").is_none_or(serde_json::Value::is_null));
                }
                Scope::Prefix(p) => {
                    prop_assert_eq!(obj.get("uid_prefix").and_then(|v| v.as_str()), Some(p.as_str()));
                    prop_assert!(obj.get("uid").is_none_or(serde_json::Value::is_null));
                }
            }
        }
    }

    /// One byte of a valid token flipped, removed or inserted: never a panic, and never a grant
    /// for anyone but the uid it was issued for (in fact, never a grant at all).
    #[test]
    fn a_mutated_token_never_grants_another_uid(
        at_frac in 0.0f64..1.0,
        op in 0u8..3,
        byte in any::<u8>(),
        now in 0..=LAST_PRINTABLE_SECOND,
    ) {
        let keys = keyring();
        let token = keys.issue(None, &Scope::Uid("alice".into()), u64::MAX / 2).unwrap();
        prop_assert_eq!(
            keys.verify(&token, at(now)).map(|g| g.scope),
            Ok(Scope::Uid("alice".into()))
        );
        let mut bytes = token.clone().into_bytes();
        let i = ((bytes.len() as f64) * at_frac) as usize;
        match op {
            0 => {
                let last = bytes.len() - 1;
                bytes[i.min(last)] ^= byte.max(1);
            }
            1 => {
                bytes.remove(i.min(bytes.len() - 1));
            }
            _ => bytes.insert(i, byte),
        }
        let mutated = String::from_utf8_lossy(&bytes).into_owned();
        prop_assume!(mutated != token);
        let got = keys.verify(&mutated, at(now));
        check_verdict(&mutated, &got, now);
        if let Ok(g) = &got {
            prop_assert_eq!(&g.scope, &Scope::Uid("alice".into()), "{:?}", mutated);
        }
        prop_assert!(got.is_err(), "a mutated token still verifies: {mutated:?}");
        // Through a session, the same token never opens a stream for alice or anyone else.
        let auth = Auth::Tokens(keys);
        for uid in ["alice", "bob", "alice2"] {
            prop_assert!(auth.authorize(uid, &mutated, None, at(now)).is_err());
        }
    }

    /// issue → verify returns the scope issued, for any uid or prefix (unicode included), until
    /// the token expires and `EXPIRED` from then on; an over-long one is `TOO_LONG`.
    #[test]
    fn issue_then_verify_round_trips(
        who in prop_oneof![
            4 => "[A-Za-z0-9._-]{1,128}",
            1 => any::<String>(),
            1 => "\\PC{0,300}",
            1 => "[\"\\\\/.{}:]{0,20}",
        ],
        prefix in any::<bool>(),
        exp in prop_oneof![1..=LAST_PRINTABLE_SECOND, 1..=u64::MAX, Just(u64::MAX)],
        now_frac in 0.0f64..1.0,
    ) {
        let keys = keyring();
        let scope = if prefix { Scope::Prefix(who.clone()) } else { Scope::Uid(who.clone()) };
        let token = keys.issue(None, &scope, exp).unwrap();
        let before = ((exp.min(LAST_PRINTABLE_SECOND + 1) - 1) as f64 * now_frac) as u64;
        let got = keys.verify(&token, at(before));
        if token.len() > spillway_ingest::auth::token::MAX_TOKEN_BYTES {
            prop_assert_eq!(got, Err(TokenError::TooLong(token.len())));
            return Ok(());
        }
        prop_assert_eq!(
            got,
            Ok(Grant { scope: scope.clone(), kid: "k1".into(), expires: exp })
        );
        prop_assert!(scope.allows(&who));
        if exp <= LAST_PRINTABLE_SECOND {
            let late = exp + ((LAST_PRINTABLE_SECOND - exp) as f64 * now_frac) as u64;
            prop_assert!(matches!(keys.verify(&token, at(late)), Err(TokenError::Expired(_))));
        }
    }

    /// Keys files of any text never panic the parser; whatever parses holds valid key ids
    /// that sign tokens which verify.
    #[test]
    fn keyring_parse_never_panics_and_what_parses_works(
        text in prop_oneof![
            any::<String>(),
            "\\PC{0,200}",
            proptest::collection::vec(
                (
                    prop_oneof!["[A-Za-z0-9_-]{1,32}", "\\PC{0,8}", Just("#".to_owned())],
                    prop_oneof![
                        proptest::collection::vec(any::<u8>(), 0..48)
                            .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                        proptest::collection::vec(any::<u8>(), 28..48).prop_map(|b| B64.encode(b)),
                        "[A-Za-z0-9+/=_-]{0,64}",
                    ],
                    prop_oneof![Just(" "), Just("\t"), Just("  "), Just(" x ")],
                    prop_oneof![Just("\n"), Just("\r\n"), Just("\n\n"), Just("\n# c\n")],
                ),
                0..5,
            )
            .prop_map(|lines| lines
                .into_iter()
                .map(|(k, s, sep, nl)| format!("{k}{sep}{s}{nl}"))
                .collect::<String>()),
        ],
    ) {
        match Keyring::parse(&text) {
            Err(e) => prop_assert!(!e.to_string().trim().is_empty()),
            Ok(ring) => {
                let kids: Vec<String> = ring.kids().map(str::to_owned).collect();
                prop_assert!(!kids.is_empty());
                for kid in &kids {
                    prop_assert!((1..=32).contains(&kid.len()));
                    prop_assert!(kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                    let t = ring.issue(Some(kid), &Scope::Uid("u".into()), 10).unwrap();
                    let g = ring.verify(&t, at(5)).unwrap();
                    prop_assert_eq!(&g.kid, kid);
                    prop_assert_eq!(g.scope, Scope::Uid("u".into()));
                }
            }
        }
    }
}

/// The generators are worth their cases: sampled, the structured hellos reach every refusal
/// code the hello checks can give, and acceptance, under both auth modes.
#[test]
fn the_hello_generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeMap;
    let keys = keyring();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = hello_spec();
    for mode in [AuthMode::None, AuthMode::Tokens] {
        let auth = auth_of(mode);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..2_000 {
            let spec = strategy.new_tree(&mut runner).unwrap().current();
            let outcome = match expected_code(&hello_of(&spec, &keys), &auth) {
                Ok(()) => "ACCEPTED",
                Err(code) => code.as_str_name(),
            };
            *seen.entry(outcome.to_owned()).or_default() += 1;
        }
        eprintln!("{mode:?}: {seen:?}");
        let mut want = vec![
            "ACCEPTED",
            "INVALID_UID",
            "INVALID_SESSION",
            "UNSUPPORTED_SAMPLE_RATE",
            "UNSUPPORTED_ENCODING",
            "UNSUPPORTED_CHANNELS",
            "INVALID_RESUME",
        ];
        if matches!(mode, AuthMode::Tokens) {
            want.extend(["UNAUTHENTICATED", "PERMISSION_DENIED"]);
        }
        for code in want {
            assert!(
                seen.get(code).copied().unwrap_or(0) >= 5,
                "{mode:?}: {code} is rarely reached: {seen:?}"
            );
        }
        assert!(
            seen["ACCEPTED"] >= 200,
            "{mode:?}: too few hellos accepted: {seen:?}"
        );
    }
}
