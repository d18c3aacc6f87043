//! Fuzz-style property tests of every parser of untrusted bytes the uploader exposes.
//!
//! - [`KeyTemplate`] (`--key-template`): `str::parse` on arbitrary text, and `render` of every
//!   template that parses with arbitrary prefixes, ids, seqs and offsets; a template built from
//!   known segments renders exactly what those segments say (the round trip).
//! - Spool records: [`Record`] is the protobuf of a record file on disk, and a disk can hand
//!   back anything. `Record::decode` on arbitrary bytes and on single-byte corruptions of a valid
//!   encoding (the spool's own checks must catch every corruption that changes the audio or the
//!   chunk id), then the public path: a [`Spool`] on a temporary directory whose record files
//!   are overwritten, mutated, truncated or planted as orphans, drained with
//!   [`Spool::next_from`] after [`Spool::reconcile`]: nothing panics, damaged records are
//!   quarantined, never drained with other audio.
//! - The wire: `ClientMessage`, `ServerMessage`, `PutChunkRequest` and `PutChunkResponse`
//!   decoding arbitrary bytes (and re-encoding what decodes: the round trip), and `PutChunk`
//!   requests of any content through [`Service`]: refused with a precise status, or stored
//!   under the key the template gives.
//!
//! Runs under plain `cargo test` (stable, no libFuzzer) with case counts that keep it to a few
//! seconds. A longer campaign:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test -p spillway-uploader --test fuzz_parsers --release
//! ```
//!
//! `PROPTEST_CASES` sets the case count of the in-memory properties; the ones that write a
//! spool to disk (every case opens sled and syncs files) run one case per 20 of it, at least
//! their default. Failures are not persisted to a regressions file (the checkout stays clean):
//! proptest prints the minimal failing input.
//!
//! What these properties found (panics on record files with no or a huge sample rate, an empty
//! orphan adopted, a record's sample rate not checked against its index entry) is fixed and
//! kept as the regression tests at the end. One operator-side issue stays `#[ignore]`d: a key
//! template whose separators can run together gives two chunk ids one key.
//!
//! One file past the usual ~700 lines on purpose: the record, spool and `PutChunk` properties
//! share their record generators and damage model; split, each part would copy them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::registry::Registry;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use prost::Message;
use spillway_proto::device::{ClientMessage, ServerMessage};
use spillway_proto::uploader::{ChunkId, PutChunkRequest, PutChunkResponse};
use spillway_proto::validate;
use spillway_uploader::metrics::Metrics;
use spillway_uploader::object::{DEFAULT_TEMPLATE, KeyTemplate, TemplateError};
use spillway_uploader::put::{Server, Service};
use spillway_uploader::spool::{Limits, Record, Spool, Spooled};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

fn env_cases() -> Option<u32> {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// `cases` unless `PROPTEST_CASES` says otherwise; no regressions file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: env_cases().unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// For properties doing disk I/O per case: `PROPTEST_CASES / 20`, at least `cases`.
fn io_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: env_cases().map_or(cases, |n| (n / 20).max(cases)),
        failure_persistence: None,
        // Shrinking reruns the I/O: bounded, yet enough to reach a small input.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Turns a `TestRunner` result into a test failure showing the minimal input.
fn check<T: std::fmt::Debug>(result: Result<(), proptest::test_runner::TestError<T>>) {
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Target 3: KeyTemplate
// ---------------------------------------------------------------------------------------------

/// One piece of a template as written.
#[derive(Debug, Clone)]
enum Segment {
    /// Text without `{`.
    Literal(String),
    Prefix,
    Uid,
    Session,
    Seq(Option<usize>),
    Part,
}

impl Segment {
    fn text(&self) -> String {
        match self {
            Segment::Literal(s) => s.clone(),
            Segment::Prefix => "{prefix}".into(),
            Segment::Uid => "{uid}".into(),
            Segment::Session => "{session}".into(),
            Segment::Seq(None) => "{seq}".into(),
            Segment::Seq(Some(w)) => format!("{{seq:0{w}}}"),
            Segment::Part => "{part}".into(),
        }
    }

    /// What this segment must render to.
    fn render(&self, prefix: &str, uid: &str, session: &str, seq: u64, offset: u64) -> String {
        match self {
            Segment::Literal(s) => s.clone(),
            Segment::Prefix => prefix.into(),
            Segment::Uid => uid.into(),
            Segment::Session => session.into(),
            Segment::Seq(None) => seq.to_string(),
            Segment::Seq(Some(w)) => format!("{seq:0w$}"),
            Segment::Part if offset > 0 => format!("_{offset}"),
            Segment::Part => String::new(),
        }
    }
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        3 => "[^{]{0,6}".prop_map(Segment::Literal),
        1 => "[/._a-z}-]{0,4}".prop_map(Segment::Literal),
        1 => Just(Segment::Prefix),
        2 => Just(Segment::Uid),
        2 => Just(Segment::Session),
        2 => proptest::option::of(0usize..=20).prop_map(Segment::Seq),
        2 => Just(Segment::Part),
    ]
}

/// Template text: arbitrary strings, and strings stitched from placeholders, near-placeholders
/// and stray braces.
fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => segment().prop_map(|s| s.text()),
        1 => Just("{".to_owned()),
        1 => Just("}".to_owned()),
        1 => Just("{}".to_owned()),
        1 => Just("{{uid}}".to_owned()),
        1 => "\\{seq:[-+0-9a-z ]{0,25}\\}",
        1 => Just("{seq:021}".to_owned()),
        1 => Just("{seq:0+5}".to_owned()),
        1 => Just("{seq:099999999999999999999999}".to_owned()),
        1 => "\\{\\PC{0,8}\\}",
        1 => "\\PC{0,4}",
    ];
    prop_oneof![
        1 => any::<String>(),
        1 => "\\PC{0,40}",
        1 => Just(DEFAULT_TEMPLATE.to_owned()),
        6 => proptest::collection::vec(piece, 0..12).prop_map(|p| p.concat()),
    ]
}

/// Any text, including what is no valid id (render is given whatever a record holds).
fn render_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9._-]{1,16}",
        1 => any::<String>(),
        1 => "\\PC{0,300}",
        1 => Just(String::new()),
    ]
}

/// Valid ids of up to `max` characters (no rejections: "." and ".." become "x." and "x..").
fn valid_id(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._-]{{1,{max}}}"))
        .unwrap()
        .prop_map(|s| {
            if validate::id(&s).is_ok() {
                s
            } else {
                format!("x{s}")
            }
        })
}

fn wide_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0u64..1_000_000, any::<u64>(), Just(u64::MAX)]
}

proptest! {
    #![proptest_config(config(8192))]

    /// Any text: `parse` never panics and its error is the precise one; whatever parses
    /// renders without panicking, with every id, seq and offset it is given.
    #[test]
    fn key_template_parse_and_render_never_panic(
        text in template_text(),
        prefix in render_arg(),
        uid in render_arg(),
        session in render_arg(),
        seq in wide_u64(),
        offset in wide_u64(),
    ) {
        match text.parse::<KeyTemplate>() {
            Err(e) => {
                prop_assert!(!e.to_string().trim().is_empty());
                match &e {
                    TemplateError::Unknown(name) => {
                        let placeholder = format!("{{{name}}}");
                        prop_assert!(text.contains(&placeholder), "{:?} not in {:?}", name, text);
                    }
                    TemplateError::Unclosed => {
                        // The scan stopped at a '{' with no '}' after it: so is the last '{'.
                        let last_open = text.rfind('{').expect("an unclosed brace exists");
                        prop_assert!(!text[last_open..].contains('}'), "{:?}", text);
                    }
                    TemplateError::NotUnique => {
                        prop_assert!(
                            ["{uid}", "{session}", "{part}"].iter().any(|p| !text.contains(p))
                                || !text.contains("{seq"),
                            "{:?}", text
                        );
                    }
                }
            }
            Ok(t) => {
                for p in ["{uid}", "{session}", "{part}", "{seq"] {
                    prop_assert!(text.contains(p), "{:?} parsed without {}", text, p);
                }
                let key = t.render(&prefix, &uid, &session, seq, offset);
                prop_assert!(key.contains(&uid) && key.contains(&session));
                prop_assert!(key.contains(&seq.to_string()));
                if offset > 0 {
                    let part = format!("_{offset}");
                    prop_assert!(key.contains(&part));
                }
                // Deterministic: one chunk id, one key.
                prop_assert_eq!(&key, &t.render(&prefix, &uid, &session, seq, offset));
                let again: KeyTemplate = text.parse().unwrap();
                prop_assert_eq!(again, t);
            }
        }
    }

    /// A template stitched from known segments parses iff it names uid, session, seq and part,
    /// and then renders exactly the concatenation of what each segment stands for.
    #[test]
    fn key_template_round_trips(
        segments in proptest::collection::vec(segment(), 0..10),
        prefix in render_arg(),
        uid in render_arg(),
        session in render_arg(),
        seq in wide_u64(),
        offset in wide_u64(),
    ) {
        let text: String = segments.iter().map(Segment::text).collect();
        let names = |f: fn(&Segment) -> bool| segments.iter().any(f);
        let complete = names(|s| matches!(s, Segment::Uid))
            && names(|s| matches!(s, Segment::Session))
            && names(|s| matches!(s, Segment::Seq(_)))
            && names(|s| matches!(s, Segment::Part));
        match text.parse::<KeyTemplate>() {
            Ok(t) => {
                prop_assert!(complete, "{:?} parsed", text);
                let want: String = segments
                    .iter()
                    .map(|s| s.render(&prefix, &uid, &session, seq, offset))
                    .collect();
                prop_assert_eq!(t.render(&prefix, &uid, &session, seq, offset), want);
            }
            Err(e) => {
                prop_assert!(!complete, "{:?} refused: {}", text, e);
                prop_assert_eq!(e, TemplateError::NotUnique);
            }
        }
    }

    /// The default layout gives every chunk id (valid ids, any seq and offset) its own key.
    #[test]
    fn default_template_gives_every_chunk_its_own_key(
        a in (valid_id(8), valid_id(8), wide_u64(), wide_u64()),
        b in (valid_id(8), valid_id(8), wide_u64(), wide_u64()),
        shift in 0usize..8,
    ) {
        let t = KeyTemplate::default();
        // b: a's uid and session with characters moved across the separator, or unrelated.
        let joined = format!("{}{}", a.0, a.1);
        let cut = shift.clamp(1, joined.len() - 1);
        let moved = (joined[..cut].to_owned(), joined[cut..].to_owned(), a.2, a.3);
        for other in [b, moved] {
            let valid = validate::id(&other.0).is_ok() && validate::id(&other.1).is_ok();
            if valid && other != a {
                prop_assert_ne!(
                    t.render("p/", &a.0, &a.1, a.2, a.3),
                    t.render("p/", &other.0, &other.1, other.2, other.3)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target 4: spool records
// ---------------------------------------------------------------------------------------------

/// Records as the service would accept them.
fn record() -> impl Strategy<Value = Record> {
    // What `PutChunk` accepts: whole samples (1 to 150 of them) inside the chunk.
    (
        valid_id(12),
        valid_id(12),
        0u64..1000,
        8_000u32..=48_000,
        150u64..=48_000,
        0u64..48_000,
        proptest::collection::vec(any::<u8>(), 2..300),
    )
        .prop_map(
            |(uid, session, seq, sample_rate, chunk_samples, off, mut pcm)| {
                pcm.truncate(pcm.len() & !1);
                Record {
                    uid,
                    session,
                    seq,
                    sample_rate,
                    chunk_samples,
                    first_sample: seq * chunk_samples + off % (chunk_samples - 149),
                    crc32c: spillway_proto::checksum::crc32c(&pcm),
                    pcm: Bytes::from(pcm),
                    ..Record::default()
                }
            },
        )
}

/// What can happen to a record file's bytes.
#[derive(Debug, Clone)]
enum Damage {
    Flip { at: f64, xor: u8 },
    Remove { at: f64 },
    Insert { at: f64, byte: u8 },
    Truncate { keep: f64 },
    Append(Vec<u8>),
    Replace(Vec<u8>),
}

impl Damage {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        let idx = |at: f64, len: usize| ((len as f64) * at) as usize;
        match self {
            Damage::Flip { at, xor } if !b.is_empty() => {
                let i = idx(*at, b.len());
                b[i] ^= (*xor).max(1);
            }
            Damage::Remove { at } if !b.is_empty() => {
                b.remove(idx(*at, b.len()));
            }
            Damage::Flip { .. } | Damage::Remove { .. } => b.push(0),
            Damage::Insert { at, byte } => b.insert(idx(*at, b.len() + 1).min(b.len()), *byte),
            Damage::Truncate { keep } => b.truncate(idx(*keep, b.len())),
            Damage::Append(extra) => b.extend_from_slice(extra),
            Damage::Replace(new) => b = new.clone(),
        }
        b
    }
}

fn single_byte_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0f64..1.0, any::<u8>()).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        (0.0f64..1.0).prop_map(|at| Damage::Remove { at }),
        (0.0f64..1.0, any::<u8>()).prop_map(|(at, byte)| Damage::Insert { at, byte }),
    ]
}

fn any_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        6 => single_byte_damage(),
        1 => (0.0f64..1.0).prop_map(|keep| Damage::Truncate { keep }),
        1 => proptest::collection::vec(any::<u8>(), 1..32).prop_map(Damage::Append),
        2 => proptest::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Replace),
    ]
}

/// The checks the spool applies to a record file before it hands the record to the drain
/// (`Spool::load`): the PCM matches its CRC32C, and the chunk id and CRC32C are the ones its
/// index entry was committed with.
fn passes_spool_checks(r: &Record, committed: &Record) -> bool {
    r.intact()
        && (&r.uid, &r.session, r.seq, r.first_sample, r.crc32c)
            == (
                &committed.uid,
                &committed.session,
                committed.seq,
                committed.first_sample,
                committed.crc32c,
            )
}

proptest! {
    #![proptest_config(config(8192))]

    /// Arbitrary bytes: `Record::decode` never panics, and what decodes re-encodes to a record
    /// that decodes the same (the round trip of the canonical form).
    #[test]
    fn record_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(r) = Record::decode(bytes.as_slice()) {
            let again = Record::decode(r.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(&again, &r);
            let _ = (r.intact(), r.offset(), r.stops_short());
        }
    }

    /// A single byte of a valid record's encoding flipped, removed or inserted: the result
    /// fails to decode, or fails the spool's checks, or carries exactly the committed audio
    /// under the committed id. A flip inside the PCM is caught by `Record::intact` itself.
    #[test]
    fn a_corrupted_record_never_passes_with_other_audio(
        original in record(),
        damage in single_byte_damage(),
    ) {
        let bytes = original.encode_to_vec();
        let damaged = damage.apply(&bytes);
        prop_assert_ne!(&damaged, &bytes);
        let Ok(r) = Record::decode(damaged.as_slice()) else {
            return Ok(());
        };
        let pcm_at = bytes.len() - original.pcm.len();
        if let Damage::Flip { at, .. } = damage {
            let i = ((bytes.len() as f64) * at) as usize;
            if i >= pcm_at {
                prop_assert!(!r.intact(), "a flip in the PCM passed the CRC32C");
            }
        }
        if passes_spool_checks(&r, &original) {
            prop_assert_eq!(&r.pcm, &original.pcm, "other audio passed the spool's checks");
        }
    }
}

/// A temporary spool with `records` committed (distinct ids), and their files in order.
struct TestSpool {
    spool: Arc<Spool>,
    files: Vec<PathBuf>,
    /// Declared last: removed after the spool has closed.
    _dir: tempfile::TempDir,
}

fn record_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rec"))
        .collect();
    files.sort();
    files
}

fn spool_with(rt: &tokio::runtime::Runtime, records: &[Record]) -> TestSpool {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(1 << 30)).unwrap());
    for r in records {
        rt.block_on(spool.commit(r)).unwrap();
    }
    let files = record_files(spool.dir());
    assert_eq!(files.len(), records.len());
    TestSpool {
        spool,
        files,
        _dir: dir,
    }
}

/// Drains everything `next_from` hands out (without removing it): the records and the number
/// quarantined on the way.
fn drain(spool: &Spool) -> (Vec<Spooled>, u64) {
    let (mut from, mut out, mut quarantined) = (0, Vec::new(), 0);
    for _ in 0..1000 {
        let (next, q) = spool.next_from(from).unwrap();
        quarantined += q;
        let Some((pos, s)) = next else {
            return (out, quarantined);
        };
        out.push(s);
        from = pos + 1;
    }
    panic!("next_from does not terminate");
}

/// `count` records with distinct ids (their seq is their index).
fn distinct(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let off = r.first_sample - r.seq * r.chunk_samples;
            r.seq = i as u64;
            r.first_sample = r.seq * r.chunk_samples + off;
            r
        })
        .collect()
}

/// Record files damaged in every way, then drained through the public API: nothing panics,
/// the damaged record is quarantined (or, if its bytes still pass, is the committed record),
/// and every other record drains untouched.
#[test]
fn damaged_record_files_are_quarantined_never_drained() {
    let rt = runtime();
    let mut runner = TestRunner::new(io_config(128));
    let strategy = (
        proptest::collection::vec(record(), 1..4).prop_map(distinct),
        0.0f64..1.0,
        any_damage(),
    );
    check(runner.run(&strategy, |(records, victim, damage)| {
        let t = spool_with(&rt, &records);
        let victim = ((records.len() as f64) * victim) as usize;
        let before = std::fs::read(&t.files[victim]).unwrap();
        let after = damage.apply(&before);
        std::fs::write(&t.files[victim], &after).unwrap();
        let (drained, quarantined) = drain(&t.spool);
        let mut seen = vec![false; records.len()];
        for s in &drained {
            let r = &s.record;
            let i = usize::try_from(r.seq).unwrap();
            prop_assert!(i < records.len() && !seen[i], "drained {:?}", r);
            seen[i] = true;
            prop_assert!(r.intact());
            prop_assert!(passes_spool_checks(r, &records[i]));
            prop_assert_eq!(&r.pcm, &records[i].pcm);
            if i != victim {
                prop_assert_eq!(r, &records[i], "an undamaged record changed");
            }
        }
        for (i, seen) in seen.iter().enumerate() {
            prop_assert!(
                *seen || i == victim,
                "undamaged record {} was not drained",
                i
            );
        }
        prop_assert_eq!(quarantined, u64::from(!seen[victim]));
        prop_assert_eq!(t.spool.len(), drained.len() as u64);
        Ok::<(), TestCaseError>(())
    }));
}

/// Record files the index does not name (after a crash or index damage) holding any bytes:
/// `reconcile` never panics, never fails, adopts only intact records, and the drain never
/// panics on what it adopted.
#[test]
fn orphan_record_files_of_any_bytes_are_reconciled_without_panic() {
    let rt = runtime();
    let mut runner = TestRunner::new(io_config(128));
    let orphan = prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..512),
        3 => (record(), any_damage()).prop_map(|(r, d)| d.apply(&r.encode_to_vec())),
        1 => record().prop_map(|r| r.encode_to_vec()),
    ];
    // Far above the positions a fresh spool hands out: the orphan never overwrites a record.
    let strategy = (record(), orphan, 1_000_000u64..2_000_000);
    check(runner.run(&strategy, |(committed, orphan, pos)| {
        let t = spool_with(&rt, std::slice::from_ref(&committed));
        let path = t.spool.dir().join(format!("{pos:020}.rec"));
        std::fs::write(&path, &orphan).unwrap();
        let found = t.spool.reconcile().unwrap();
        prop_assert!(found.lost.is_empty());
        prop_assert!(found.adopted + found.quarantined <= 1);
        let decoded = Record::decode(orphan.as_slice()).ok().filter(Record::sound);
        if decoded.is_none() {
            prop_assert_eq!((found.adopted, found.quarantined), (0, 1));
        }
        let (drained, quarantined) = drain(&t.spool);
        prop_assert_eq!(quarantined, 0, "reconcile already set aside what fails");
        for s in &drained {
            prop_assert!(s.record.intact());
        }
        prop_assert!(
            drained.iter().any(|s| s.record == committed)
                || found.adopted == 1 && drained.len() == 1,
            "the committed record is drained, unless an adopted longer piece superseded it"
        );
        Ok::<(), TestCaseError>(())
    }));
}

// ---------------------------------------------------------------------------------------------
// Target 5: wire messages
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(8192))]

    /// Device frames of any bytes: decoding never panics; what decodes round-trips.
    #[test]
    fn device_messages_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = ClientMessage::decode(Bytes::from(bytes.clone())) {
            prop_assert_eq!(ClientMessage::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        }
        if let Ok(m) = ServerMessage::decode(bytes.as_slice()) {
            prop_assert_eq!(ServerMessage::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        }
    }

    /// `PutChunk` bodies of any bytes: decoding never panics; what decodes round-trips.
    #[test]
    fn uploader_messages_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = PutChunkRequest::decode(Bytes::from(bytes.clone())) {
            prop_assert_eq!(PutChunkRequest::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        }
        if let Ok(m) = PutChunkResponse::decode(bytes.as_slice()) {
            prop_assert_eq!(PutChunkResponse::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        }
    }
}

const MAX_CHUNK_SECONDS: u32 = 60;

/// The status a put deserves by the service's rules (in its order), `None` when valid.
fn expected_refusal(req: &PutChunkRequest) -> Option<tonic::Code> {
    use tonic::Code::{DataLoss, InvalidArgument};
    let Some(id) = &req.id else {
        return Some(InvalidArgument);
    };
    if validate::id(&id.uid).is_err()
        || validate::id(&id.session).is_err()
        || validate::sample_rate(req.sample_rate).is_err()
    {
        return Some(InvalidArgument);
    }
    let max = u64::from(MAX_CHUNK_SECONDS) * u64::from(req.sample_rate);
    let samples = (req.pcm.len() / 2) as u64;
    let inside = id
        .seq
        .checked_mul(req.chunk_samples)
        .zip(
            id.seq
                .checked_add(1)
                .and_then(|n| n.checked_mul(req.chunk_samples)),
        )
        .is_some_and(|(start, end)| {
            req.first_sample >= start
                && req
                    .first_sample
                    .checked_add(samples)
                    .is_some_and(|e| e <= end)
        });
    if req.chunk_samples == 0
        || req.chunk_samples > max
        || req.pcm.is_empty()
        || req.pcm.len() % 2 == 1
        || samples > req.chunk_samples
        || !inside
    {
        return Some(InvalidArgument);
    }
    if spillway_proto::checksum::crc32c(&req.pcm) != req.crc32c {
        return Some(DataLoss);
    }
    None
}

/// Mostly-valid requests with one or more fields pushed out of range.
fn put_request() -> impl Strategy<Value = PutChunkRequest> {
    let id = prop_oneof![
        16 => ("[A-Za-z0-9._-]{1,16}", "[A-Za-z0-9._-]{1,16}", prop_oneof![8 => 0u64..100, 1 => any::<u64>()])
            .prop_map(|(uid, session, seq)| Some(ChunkId { uid, session, seq })),
        1 => ("\\PC{0,20}", "\\PC{0,20}", any::<u64>())
            .prop_map(|(uid, session, seq)| Some(ChunkId { uid, session, seq })),
        1 => Just(None),
    ];
    (
        id,
        prop_oneof![16 => 8_000u32..=48_000, 1 => any::<u32>()],
        prop_oneof![12 => 1u64..=8_000, 1 => any::<u64>(), 1 => Just(0u64)],
        prop_oneof![12 => Just(None), 1 => any::<u64>().prop_map(Some)],
        0u64..8_000,
        prop_oneof![
            // Mostly a whole number of samples, at least one.
            8 => proptest::collection::vec(any::<u8>(), 2..200).prop_map(|mut p| {
                p.truncate(p.len() & !1);
                p
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..400),
        ],
        proptest::bool::weighted(0.85),
    )
        .prop_map(
            |(id, sample_rate, chunk_samples, first, off, pcm, good_crc)| {
                let seq = id.as_ref().map_or(0, |i| i.seq);
                let crc = spillway_proto::checksum::crc32c(&pcm);
                PutChunkRequest {
                    id,
                    sample_rate,
                    chunk_samples,
                    first_sample: first.unwrap_or_else(|| {
                        seq.saturating_mul(chunk_samples)
                            .saturating_add(off % chunk_samples.max(1))
                    }),
                    crc32c: if good_crc { crc } else { crc ^ 1 },
                    pcm: Bytes::from(pcm),
                    ..PutChunkRequest::default()
                }
            },
        )
}

/// How a property's request reaches the service.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// A whole request, as gathered.
    Whole,
    /// As an HTTP/2 body in the generated encoding (the PCM before the CRC32C: gathered), cut
    /// every `step` bytes.
    Generated { step: usize },
    /// As an HTTP/2 body with the PCM last, as ingest sends it (streamed to the spool), cut
    /// every `step` bytes.
    PcmLast { step: usize },
}

fn route() -> impl Strategy<Value = Route> {
    prop_oneof![
        Just(Route::Whole),
        (1usize..300).prop_map(|step| Route::Generated { step }),
        (1usize..300).prop_map(|step| Route::PcmLast { step }),
    ]
}

/// `body` framed as one gRPC message.
fn framed(message: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    body
}

/// Calls `PutChunk` on `server` with `body` cut into frames of `step` bytes, and reads the
/// answer as a gRPC client would.
async fn call_http(
    server: &Server,
    body: &[u8],
    step: usize,
) -> Result<PutChunkResponse, tonic::Status> {
    use http_body_util::BodyExt as _;
    use tower::Service as _;
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = body
        .chunks(step.max(1))
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let request = http::Request::builder()
        .method("POST")
        .uri("/spillway.uploader.v1.Uploader/PutChunk")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
        .unwrap();
    let response = server.clone().call(request).await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        assert_ne!(status.code(), tonic::Code::Ok, "an answer in the headers");
        return Err(status);
    }
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let data = collected.to_bytes();
    assert_eq!(data[0], 0);
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert_eq!(data.len(), 5 + len);
    Ok(PutChunkResponse::decode(&data[5..]).unwrap())
}

/// `req` through `path`.
async fn put_by(
    service: &Arc<Service>,
    req: &PutChunkRequest,
    path: Route,
) -> Result<PutChunkResponse, tonic::Status> {
    let server = Server(Arc::clone(service));
    match path {
        Route::Whole => service.put(req.clone()).await,
        Route::Generated { step } => call_http(&server, &framed(&req.encode_to_vec()), step).await,
        Route::PcmLast { step } => {
            let head = PutChunkRequest {
                pcm: Bytes::new(),
                ..req.clone()
            };
            let mut message = Vec::new();
            spillway_proto::split::encode_head(&head, 5, req.pcm.len(), &mut message);
            message.extend_from_slice(&req.pcm);
            call_http(&server, &framed(&message), step).await
        }
    }
}

fn put_service(spool: Arc<Spool>) -> Arc<Service> {
    Arc::new(Service {
        spool,
        template: KeyTemplate::default(),
        prefix: "p/".into(),
        max_chunk_seconds: MAX_CHUNK_SECONDS,
        metrics: Metrics::register(&mut Registry::default()),
        omi_sealed: false,
        gathered: Default::default(),
    })
}

/// `PutChunk` requests of any content through the service itself, whole or as HTTP/2 bodies
/// cut anywhere (gathered, or streamed to the spool): refused with exactly the status the rules
/// give, or (when the spool has room) stored and answered with the key the template gives.
#[test]
fn put_chunk_requests_of_any_content_get_a_precise_answer() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(64 << 20)).unwrap());
    let service = put_service(Arc::clone(&spool));
    let mut runner = TestRunner::new(io_config(1024));
    let strategy = (
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..256)
                .prop_map(|b| PutChunkRequest::decode(b.as_slice()).unwrap_or_default()),
            4 => put_request(),
        ],
        route(),
    );
    check(runner.run(&strategy, |(req, path)| {
        let want = expected_refusal(&req);
        let got = rt.block_on(put_by(&service, &req, path));
        match (got, want) {
            (Err(status), Some(code)) => {
                prop_assert_eq!(status.code(), code, "{}", status.message());
                prop_assert!(!status.message().trim().is_empty());
            }
            (Err(status), None) => {
                // Valid, but the spool said no: only for lack of room or a conflicting put.
                prop_assert!(
                    matches!(
                        status.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::AlreadyExists
                    ),
                    "{:?}",
                    status
                );
            }
            (Ok(resp), None) => {
                let id = req.id.unwrap();
                let chunk_start = id.seq * req.chunk_samples;
                let want_key = KeyTemplate::default().render(
                    "p/",
                    &id.uid,
                    &id.session,
                    id.seq,
                    req.first_sample - chunk_start,
                );
                prop_assert_eq!(resp.key, want_key);
                prop_assert_eq!(resp.crc32c, req.crc32c);
            }
            (Ok(resp), Some(code)) => {
                prop_assert!(false, "accepted {:?} ({:?}), want {:?}", req, resp, code);
            }
        }
        Ok::<(), TestCaseError>(())
    }));
    // Streamed or not, a refused put left no temporary file behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("records"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Any bytes at all as a `PutChunk` body, cut anywhere: answered (never a panic or a hang),
/// refused with a status and message unless they happen to be a valid put.
#[test]
fn put_chunk_bodies_of_any_bytes_get_an_answer() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), Limits::reject(64 << 20)).unwrap());
    let server = Server(put_service(spool));
    let mut runner = TestRunner::new(config(2048));
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        // A plausible prefix, then anything.
        (0u32..200, proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(len, rest)| {
            let mut b = vec![0];
            b.extend_from_slice(&len.to_be_bytes());
            b.extend(rest);
            b
        }),
    ];
    check(runner.run(&(body, 1usize..40), |(body, step)| {
        match rt.block_on(call_http(&server, &body, step)) {
            Ok(resp) => prop_assert!(!resp.key.is_empty()),
            Err(status) => prop_assert!(!status.message().trim().is_empty(), "{status:?}"),
        }
        Ok::<(), TestCaseError>(())
    }));
}

/// The generators are worth their cases: sampled, template texts reach every parse outcome
/// and put requests every answer (valid, each refusal code).
#[test]
fn the_generators_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeMap;
    let mut runner = TestRunner::deterministic();
    let mut sample = |name: &str, outcome: &dyn Fn(&mut TestRunner) -> String, want: &[&str]| {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..2_000 {
            *seen.entry(outcome(&mut runner)).or_default() += 1;
        }
        eprintln!("{name}: {seen:?}");
        for w in want {
            assert!(
                seen.get(*w).copied().unwrap_or(0) >= 20,
                "{name}: {w} rarely reached: {seen:?}"
            );
        }
    };
    let texts = template_text();
    sample(
        "templates",
        &|r| match texts.new_tree(r).unwrap().current().parse::<KeyTemplate>() {
            Ok(_) => "ok".into(),
            Err(TemplateError::Unknown(_)) => "unknown".into(),
            Err(TemplateError::Unclosed) => "unclosed".into(),
            Err(TemplateError::NotUnique) => "not_unique".into(),
        },
        &["ok", "unknown", "unclosed", "not_unique"],
    );
    let puts = put_request();
    sample(
        "puts",
        &|r| match expected_refusal(&puts.new_tree(r).unwrap().current()) {
            None => "valid".into(),
            Some(code) => format!("{code:?}"),
        },
        &["valid", "InvalidArgument", "DataLoss"],
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions: what the properties above found, fixed (and one operator-side issue, ignored).
// ---------------------------------------------------------------------------------------------

/// A record file truncated to nothing (or any record decoding with no sample rate) panics the
/// drain: `Spool::next_from` → `Spool::load` → `Spooled::decode` → `object::wav_header(_, 0)` →
/// hound divides by the sample rate. Reached from disk contents alone; the same panic with
/// `object::wav(pcm, 0)`.
#[test]
fn an_empty_record_file_is_quarantined_not_panicked_on() {
    let rt = runtime();
    let r = Record {
        uid: "u".into(),
        session: "s".into(),
        seq: 0,
        sample_rate: 8_000,
        chunk_samples: 8_000,
        first_sample: 0,
        crc32c: spillway_proto::checksum::crc32c(b"ab"),
        pcm: Bytes::from_static(b"ab"),
        ..Record::default()
    };
    let t = spool_with(&rt, std::slice::from_ref(&r));
    std::fs::write(&t.files[0], b"").unwrap();
    let (drained, quarantined) = drain(&t.spool);
    assert!(drained.is_empty());
    assert_eq!(quarantined, 1);
}

/// `object::wav` returns a `Result`, yet panics on the sample rates hound cannot write: 0
/// (division by zero, in every build) and above `u32::MAX / 2` (multiplication overflow, in
/// builds with overflow checks). The root of the spool panics above.
#[test]
fn wav_refuses_out_of_range_sample_rates() {
    let panicking: Vec<u32> = [0, u32::MAX / 2 + 1, u32::MAX]
        .into_iter()
        .filter(|&rate| {
            std::panic::catch_unwind(|| spillway_uploader::object::wav(b"ab", rate)).is_err()
        })
        .collect();
    assert!(
        panicking.is_empty(),
        "object::wav panicked at sample rates {panicking:?}"
    );
}

/// An orphan record file of zero bytes decodes as `Record::default()`, which is "intact" (the
/// CRC32C of no PCM is 0): `reconcile` adopts it as a chunk of uid "" and session "", which the
/// service would never have accepted, and the drain then panics on it as above.
#[test]
fn an_empty_orphan_file_is_not_adopted() {
    let rt = runtime();
    let t = spool_with(&rt, &[]);
    std::fs::write(t.spool.dir().join(format!("{:020}.rec", 7)), b"").unwrap();
    let found = t.spool.reconcile().unwrap();
    // Today: adopted (found.adopted == 1), then the drain panics here.
    let (drained, _) = drain(&t.spool);
    assert_eq!(found.adopted, 0, "an empty file is no chunk");
    assert!(drained.is_empty());
}

/// A template passes `KeyTemplate`'s check when it names uid, session, seq and part, but
/// nothing makes the key unambiguous: with `-` between ids (this crate's own example
/// template), two chunks of different users get one key; with `{part}` before `{seq}`, two
/// pieces of one session do. (The store then keeps the second beside the first as a
/// `.conflict-` object rather than losing it.) Not an untrusted input (the operator writes
/// the template), so reported, not a property above.
#[test]
#[ignore = "library issue: an accepted key template can give two chunk ids one key"]
fn known_issue_an_accepted_template_can_give_two_chunks_one_key() {
    let t: KeyTemplate = "audio/{session}-{uid}-{seq:03}{part}.wav".parse().unwrap();
    assert_ne!(
        t.render("", "c", "a-b", 1, 0),
        t.render("", "b-c", "a", 1, 0),
        "uid c of session a-b and uid b-c of session a"
    );
    let t: KeyTemplate = "{uid}/{session}/{part}{seq}".parse().unwrap();
    assert_ne!(t.render("", "u", "s", 23, 1), t.render("", "u", "s", 3, 12));
}

/// The spool checks a record file's PCM (CRC32C), chunk id and CRC32C against its index entry,
/// but not its `sample_rate` or `chunk_samples`: one flipped byte in either is drained as
/// valid, and the chunk is uploaded with another WAV header or under another key.
#[test]
fn record_metadata_outside_the_checksum_is_checked() {
    let rt = runtime();
    let r = Record {
        uid: "u".into(),
        session: "s".into(),
        seq: 1,
        sample_rate: 16_000,
        chunk_samples: 16_000,
        first_sample: 16_000,
        crc32c: spillway_proto::checksum::crc32c(b"abcd"),
        pcm: Bytes::from_static(b"abcd"),
        ..Record::default()
    };
    let t = spool_with(&rt, std::slice::from_ref(&r));
    let mut bytes = std::fs::read(&t.files[0]).unwrap();
    let mut tampered = r.clone();
    tampered.sample_rate = 16_001;
    assert_eq!(tampered.encode_to_vec().len(), bytes.len());
    bytes.copy_from_slice(&tampered.encode_to_vec());
    std::fs::write(&t.files[0], &bytes).unwrap();
    let (drained, _) = drain(&t.spool);
    assert!(
        drained.iter().all(|s| s.record == r),
        "drained {:?}",
        drained.iter().map(|s| &s.record).collect::<Vec<_>>()
    );
}
