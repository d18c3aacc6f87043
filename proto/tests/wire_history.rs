//! Old peers against today's types, message by message (`proto/WIRE.md`): bytes recorded with
//! each historical schema decode with today's types to what the old peer meant, and today's
//! messages decode with each historical schema to what the old peer expects, every field it
//! knows intact and what it does not know skipped without an error. The same bytes go through
//! the real daemons in xtask/kit/tests/wire_compat.rs.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "wire/history.rs"]
mod history;

use bytes::Bytes;
use history::{
    ALL, CHUNK_SAMPLES, RECEIPT, RESUME, SAMPLE_RATE, TRUST, V1_0, decode, field, field_order, pcm,
    uint, unknown, unknown_varint,
};
use prost::Message;
use prost_reflect::{DynamicMessage, Value};
use spillway_proto::device::{
    Accepted, Ack, ClientMessage, Error, ErrorCode, ServerMessage, client_message, server_message,
};
use spillway_proto::uploader::{ChunkId, Layout, PutChunkRequest, PutChunkResponse};

// ---- Recording (what README.md describes; `record_fixtures` writes it) ----

/// A session's hello then its audio, cut into frames of these sizes.
fn session(commit: &str, hello: DynamicMessage, audio_pcm: &[u8], sizes: &[usize]) -> Vec<u8> {
    assert_eq!(sizes.iter().sum::<usize>(), audio_pcm.len());
    let mut messages = vec![hello];
    let mut rest = audio_pcm;
    for &n in sizes {
        let (frame, tail) = rest.split_at(n);
        messages.push(history::client_audio(commit, frame));
        rest = tail;
    }
    history::framed(&messages)
}

/// A PutChunkRequest of `commit`'s schema, without its PCM.
fn put_head(
    commit: &str,
    uid: &str,
    session: &str,
    seq: u64,
    first: u64,
    pcm: &[u8],
) -> DynamicMessage {
    let id = history::message(
        commit,
        "spillway.uploader.v1.ChunkId",
        &[
            ("uid", Value::String(uid.into())),
            ("session", Value::String(session.into())),
            ("seq", Value::U64(seq)),
        ],
    );
    history::message(
        commit,
        "spillway.uploader.v1.PutChunkRequest",
        &[
            ("id", Value::Message(id)),
            ("sample_rate", Value::U32(SAMPLE_RATE)),
            ("chunk_samples", Value::U64(CHUNK_SAMPLES)),
            ("first_sample", Value::U64(first)),
            ("crc32c", Value::U32(crc32c::crc32c(pcm))),
        ],
    )
}

/// Every fixture file and its bytes, made with the historical schemas.
fn recordings() -> Vec<(&'static str, Vec<u8>)> {
    use history::{pre_omi_put, resume_stream, v1_0_put, v1_0_response, v1_0_stream};
    let v1_stream = session(
        V1_0,
        history::client_hello(V1_0, v1_0_stream::UID, v1_0_stream::SESSION, &[]),
        &pcm(0, v1_0_stream::SAMPLES),
        &v1_0_stream::FRAMES,
    );
    let resumed = session(
        RESUME,
        history::client_hello(
            RESUME,
            resume_stream::UID,
            resume_stream::SESSION,
            &[("resume_from", Value::U64(resume_stream::RESUME_FROM))],
        ),
        &pcm(resume_stream::RESUME_FROM, resume_stream::SAMPLES),
        &resume_stream::FRAMES,
    );
    // 1.0: prost's order, the PCM (5) before the CRC32C (6).
    let chunk = pcm(v1_0_put::FIRST_SAMPLE, v1_0_put::SAMPLES);
    let mut put = put_head(
        V1_0,
        v1_0_put::UID,
        v1_0_put::SESSION,
        v1_0_put::SEQ,
        v1_0_put::FIRST_SAMPLE,
        &chunk,
    );
    put.set_field_by_name("pcm", Value::Bytes(chunk.into()));
    let v1_put = history::grpc_body(&history::encode(&put));
    // Pre-Omi: every field but the PCM, then the PCM (protobuf merges the two).
    let chunk = pcm(pre_omi_put::FIRST_SAMPLE, pre_omi_put::SAMPLES);
    let mut message = history::encode(&put_head(
        RECEIPT,
        pre_omi_put::UID,
        pre_omi_put::SESSION,
        pre_omi_put::SEQ,
        pre_omi_put::FIRST_SAMPLE,
        &chunk,
    ));
    message.extend(history::encode(&history::message(
        RECEIPT,
        "spillway.uploader.v1.PutChunkRequest",
        &[("pcm", Value::Bytes(chunk.into()))],
    )));
    let pcm_last = history::grpc_body(&message);
    let response = history::encode(&history::message(
        V1_0,
        "spillway.uploader.v1.PutChunkResponse",
        &[
            ("key", Value::String(v1_0_response::KEY.into())),
            ("newly_stored", Value::Bool(v1_0_response::NEWLY_STORED)),
        ],
    ));
    vec![
        ("4b779cb-client-stream.bin", v1_stream),
        ("656c89a-client-resume-stream.bin", resumed),
        ("4b779cb-put-chunk.grpc", v1_put),
        ("8bdd8bc-put-chunk-pcm-last.grpc", pcm_last),
        ("4b779cb-put-chunk-response.bin", response),
    ]
}

/// Writes the fixtures: `cargo test -p spillway-proto --test wire_history -- --ignored`.
#[test]
#[ignore = "writes proto/tests/wire/fixtures; run once to record"]
fn record_fixtures() {
    let dir = history::dir().join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in recordings() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn the_fixtures_are_what_the_historical_schemas_encode() {
    let files: Vec<String> = std::fs::read_dir(history::dir().join("fixtures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let recorded = recordings();
    assert_eq!(files.len(), recorded.len(), "{files:?}");
    for (name, bytes) in recorded {
        assert!(
            history::fixture(name) == bytes,
            "{name} is not what README.md says it holds"
        );
    }
}

// ---- Old peers' bytes, today's decoders ----

/// A recorded stream decoded with today's ClientMessage: its hello, and its audio joined.
fn todays_view(stream: &[u8]) -> (spillway_proto::device::Hello, Vec<u8>) {
    let frames = history::frames(stream);
    let mut messages = frames
        .iter()
        .map(|f| ClientMessage::decode(*f).expect("decodes today"));
    let Some(ClientMessage {
        kind: Some(client_message::Kind::Hello(hello)),
    }) = messages.next()
    else {
        panic!("a hello first");
    };
    let audio = messages
        .flat_map(|m| match m.kind {
            Some(client_message::Kind::Audio(a)) => a.pcm.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    (hello, audio)
}

#[test]
fn a_1_0_hello_means_today_a_new_session_without_a_token() {
    use history::v1_0_stream::*;
    let (hello, audio) = todays_view(&history::fixture("4b779cb-client-stream.bin"));
    assert_eq!(
        hello,
        spillway_proto::device::Hello {
            uid: UID.into(),
            session: SESSION.into(),
            sample_rate: SAMPLE_RATE,
            encoding: spillway_proto::device::Encoding::PcmS16le as i32,
            channels: 1,
            // Absent: a new session, and no credential.
            token: String::new(),
            resume_from: 0,
        }
    );
    assert_eq!(audio, pcm(0, SAMPLES));
}

#[test]
fn a_pre_trust_resuming_hello_means_today_a_resume_without_a_token() {
    use history::resume_stream::*;
    let (hello, audio) = todays_view(&history::fixture("656c89a-client-resume-stream.bin"));
    assert_eq!(hello.resume_from, RESUME_FROM);
    assert_eq!((hello.uid.as_str(), hello.session.as_str()), (UID, SESSION));
    assert_eq!(hello.token, "");
    assert_eq!(audio, pcm(RESUME_FROM, SAMPLES));
}

/// The message of a recorded gRPC body (after its 5-byte prefix).
fn grpc_message(body: &[u8]) -> &[u8] {
    assert_eq!(body[0], 0, "uncompressed");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 5 + len);
    &body[5..]
}

#[test]
fn old_ingests_puts_are_wav_puts_today_in_either_field_order() {
    for (file, uid, session, seq, first, samples, order) in [
        (
            "4b779cb-put-chunk.grpc",
            history::v1_0_put::UID,
            history::v1_0_put::SESSION,
            history::v1_0_put::SEQ,
            history::v1_0_put::FIRST_SAMPLE,
            history::v1_0_put::SAMPLES,
            // tonic's generated client: the PCM before the CRC32C.
            [1, 2, 3, 4, 5, 6],
        ),
        (
            "8bdd8bc-put-chunk-pcm-last.grpc",
            history::pre_omi_put::UID,
            history::pre_omi_put::SESSION,
            history::pre_omi_put::SEQ,
            history::pre_omi_put::FIRST_SAMPLE,
            history::pre_omi_put::SAMPLES,
            [1, 2, 3, 4, 6, 5],
        ),
    ] {
        let body = history::fixture(file);
        let message = grpc_message(&body);
        assert_eq!(field_order(message), order, "{file}");
        let chunk = pcm(first, samples);
        assert_eq!(
            PutChunkRequest::decode(message).unwrap(),
            PutChunkRequest {
                id: Some(ChunkId {
                    uid: uid.into(),
                    session: session.into(),
                    seq,
                }),
                sample_rate: SAMPLE_RATE,
                chunk_samples: CHUNK_SAMPLES,
                first_sample: first,
                crc32c: crc32c::crc32c(&chunk),
                pcm: chunk.into(),
                // Absent: a WAV chunk, as every put before the Omi layout was.
                layout: Layout::Wav as i32,
                start_time: 0.0,
            },
            "{file}"
        );
    }
}

/// The hazard the upgrade order avoids (WIRE.md): PutChunkResponse.crc32c has no presence, so
/// a pre-receipt uploader's answer reads as a receipt of 0, and today's ingest would hand the
/// device `Ack.crc32c = Some(0)`, which it refuses as a mismatch for any other audio.
#[test]
fn a_pre_receipt_uploaders_answer_reads_as_a_receipt_of_zero() {
    let answer =
        PutChunkResponse::decode(history::fixture("4b779cb-put-chunk-response.bin").as_slice())
            .unwrap();
    assert_eq!(
        answer,
        PutChunkResponse {
            key: history::v1_0_response::KEY.into(),
            newly_stored: history::v1_0_response::NEWLY_STORED,
            crc32c: 0,
        }
    );
    let chunk = pcm(history::v1_0_put::FIRST_SAMPLE, history::v1_0_put::SAMPLES);
    assert_ne!(crc32c::crc32c(&chunk), answer.crc32c);
}

// ---- Today's bytes, old peers' decoders ----

/// Each ErrorCode today and the first schema that has it.
fn codes() -> Vec<(i32, &'static str)> {
    (0..=19)
        .map(|n| {
            let code = ErrorCode::try_from(n).expect("today's codes are 0..=19");
            let since = match code {
                ErrorCode::InvalidResume => RESUME,
                ErrorCode::PermissionDenied | ErrorCode::HelloTimeout => TRUST,
                ErrorCode::TooSlow => "5247ee6",
                _ => V1_0,
            };
            (n, since)
        })
        .collect()
}

fn knows(commit: &str, since: &str) -> bool {
    let order = [V1_0, RESUME, TRUST, RECEIPT, "5247ee6"];
    let at = |c: &str| order.iter().position(|o| *o == c).unwrap();
    at(since) <= at(commit)
}

fn server(kind: server_message::Kind) -> Vec<u8> {
    ServerMessage { kind: Some(kind) }.encode_to_vec()
}

#[test]
fn todays_accepted_and_ack_decode_with_every_old_device_schema() {
    let accepted = server(server_message::Kind::Accepted(Accepted {
        chunk_samples: CHUNK_SAMPLES,
        max_frame_bytes: 1 << 20,
        start_sample: 8_000,
    }));
    let ack = server(server_message::Kind::Ack(Ack {
        seq: 1,
        first_sample: 8_000,
        end_sample: 16_000,
        key: "u/s/000001.wav".into(),
        crc32c: Some(0xdead_beef),
    }));
    for commit in ALL {
        let m = decode(commit, "spillway.device.v1.ServerMessage", &accepted);
        let (name, a) = history::kind(&m);
        assert_eq!(name, "accepted");
        assert_eq!(uint(&a, "chunk_samples"), CHUNK_SAMPLES, "{commit}");
        assert_eq!(uint(&a, "max_frame_bytes"), 1 << 20, "{commit}");
        if knows(commit, RESUME) {
            assert_eq!(uint(&a, "start_sample"), 8_000, "{commit}");
            assert!(unknown(&a).is_empty());
        } else {
            // A 1.0 device skips it: it never resumes, so it always starts at 0 (absent).
            assert_eq!(unknown(&a), [3], "{commit}");
        }

        let m = decode(commit, "spillway.device.v1.ServerMessage", &ack);
        let (name, a) = history::kind(&m);
        assert_eq!(name, "ack");
        assert_eq!(
            [
                uint(&a, "seq"),
                uint(&a, "first_sample"),
                uint(&a, "end_sample")
            ],
            [1, 8_000, 16_000],
            "{commit}"
        );
        assert_eq!(field(&a, "key").as_str(), Some("u/s/000001.wav"));
        if knows(commit, RECEIPT) {
            assert_eq!(uint(&a, "crc32c"), 0xdead_beef, "{commit}");
        } else {
            assert_eq!(unknown(&a), [5], "{commit}");
            assert_eq!(unknown_varint(&a, 5), Some(0xdead_beef));
        }
    }
}

#[test]
fn every_error_code_today_decodes_with_every_old_device_schema_unknown_ones_as_numbers() {
    for commit in ALL {
        let old = history::schema(commit)
            .get_enum_by_name("spillway.device.v1.ErrorCode")
            .unwrap();
        let mut unknown_codes = Vec::new();
        for (n, since) in codes() {
            let bytes = server(server_message::Kind::Error(Error {
                code: n,
                message: format!("code {n}"),
            }));
            let m = decode(commit, "spillway.device.v1.ServerMessage", &bytes);
            let (name, e) = history::kind(&m);
            assert_eq!(name, "error");
            assert_eq!(
                field(&e, "message").as_str(),
                Some(format!("code {n}").as_str())
            );
            // Code 0 is absent on the wire; every other is kept as its number.
            let code = e.get_field_by_name("code").unwrap().as_enum_number();
            assert_eq!(code, Some(n), "{commit}");
            let today = ErrorCode::try_from(n).unwrap().as_str_name();
            match old.get_value(n) {
                Some(v) => {
                    assert!(knows(commit, since), "{commit} knows {today}?");
                    assert_eq!(v.name(), today, "{commit}: value {n} was never renamed");
                }
                None => {
                    assert!(!knows(commit, since), "{commit} should know {today}");
                    unknown_codes.push(n);
                }
            }
        }
        let expected: &[i32] = match commit {
            V1_0 => &[16, 17, 18, 19],
            RESUME => &[17, 18, 19],
            _ => &[19],
        };
        assert_eq!(unknown_codes, expected, "{commit}");
    }
}

#[test]
fn todays_put_chunk_response_decodes_with_every_old_uploader_schema() {
    let answer = PutChunkResponse {
        key: "old-ingest/v1-0/000002.wav".into(),
        newly_stored: true,
        crc32c: 0x0bad_cafe,
    }
    .encode_to_vec();
    for commit in ALL {
        let r = decode(commit, "spillway.uploader.v1.PutChunkResponse", &answer);
        assert_eq!(
            field(&r, "key").as_str(),
            Some("old-ingest/v1-0/000002.wav")
        );
        assert_eq!(field(&r, "newly_stored").as_bool(), Some(true));
        if knows(commit, RECEIPT) {
            assert_eq!(uint(&r, "crc32c"), 0x0bad_cafe, "{commit}");
        } else {
            assert_eq!(unknown_varint(&r, 3), Some(0x0bad_cafe), "{commit}");
        }
    }
}

/// Why uploaders roll before ingests (WIRE.md): an Omi put from today's ingest decodes, to a
/// pre-Omi uploader, as a WAV put with two unknown fields it skips.
#[test]
fn an_omi_put_reads_as_a_wav_put_to_a_pre_omi_uploader() {
    let omi = PutChunkRequest {
        id: Some(ChunkId {
            uid: "u".into(),
            session: "conversation".into(),
            seq: 1_764_480_000_250,
        }),
        sample_rate: 16_000,
        chunk_samples: 960_000,
        first_sample: 0,
        pcm: Bytes::from_static(&[1, 0, 2, 0]),
        crc32c: crc32c::crc32c(&[1, 0, 2, 0]),
        layout: Layout::Omi as i32,
        start_time: 1_764_480_000.25,
    }
    .encode_to_vec();
    let old = decode(RECEIPT, "spillway.uploader.v1.PutChunkRequest", &omi);
    assert_eq!(unknown(&old), [7, 8]);
    assert_eq!(uint(&old, "first_sample"), 0);
    assert_eq!(field(&old, "pcm").as_bytes().map(|b| b.len()), Some(4));
}
