//! The wire's history, for the compatibility tests of `spillway-proto` (tests/wire_history.rs)
//! and of the kit (xtask/kit/tests/wire_compat.rs), which both include this file: the schemas as
//! they were (`schemas/<commit>/`, compiled here with protox, decoded with prost-reflect, so an
//! old peer's decoder is its own schema's and not today's types), the bytes recorded with them
//! (`fixtures/`), and the values those bytes hold (README.md lists them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage as _, Value,
};

/// The first contract, version 1.0.
pub const V1_0: &str = "4b779cb";
/// Resume: Hello.resume_from, Accepted.start_sample, INVALID_RESUME.
pub const RESUME: &str = "656c89a";
/// Device identity: PERMISSION_DENIED, HELLO_TIMEOUT (Hello.token was already in 1.0).
pub const TRUST: &str = "7fb93b0";
/// The receipt: Ack.crc32c, PutChunkResponse.crc32c. The last device schema before TOO_SLOW and
/// the last uploader schema before the Omi layout.
pub const RECEIPT: &str = "8bdd8bc";
/// Every historical schema, oldest first.
pub const ALL: [&str; 4] = [V1_0, RESUME, TRUST, RECEIPT];

/// The recorded sessions' audio: 8 kHz, 1 s chunks (what the kit's pipeline runs with).
pub const SAMPLE_RATE: u32 = 8_000;
pub const CHUNK_SAMPLES: u64 = 8_000;

/// `fixtures/4b779cb-client-stream.bin`: a 1.0 device's hello and audio.
pub mod v1_0_stream {
    pub const UID: &str = "old-device";
    pub const SESSION: &str = "v1-0";
    /// Samples [0, 12000): one full chunk and half of the next.
    pub const SAMPLES: u64 = 12_000;
    /// Sizes of the three Audio frames' PCM (the first ends inside a sample).
    pub const FRAMES: [usize; 3] = [7_001, 8_999, 8_000];
}

/// `fixtures/656c89a-client-resume-stream.bin`: a device of the resume era, before tokens,
/// resuming a session at sample 8000.
pub mod resume_stream {
    pub const UID: &str = "old-device";
    pub const SESSION: &str = "resumed";
    pub const RESUME_FROM: u64 = 8_000;
    /// Samples [8000, 12000).
    pub const SAMPLES: u64 = 4_000;
    pub const FRAMES: [usize; 2] = [3_001, 4_999];
}

/// `fixtures/4b779cb-put-chunk.grpc`: a 1.0 ingest's PutChunk (tonic's generated client: the
/// fields in number order, the PCM before the CRC32C).
pub mod v1_0_put {
    pub const UID: &str = "old-ingest";
    pub const SESSION: &str = "v1-0";
    pub const SEQ: u64 = 2;
    pub const FIRST_SAMPLE: u64 = 16_000;
    pub const SAMPLES: u64 = 8_000;
    /// The key a 1.0 uploader stored it under (`{uid}/{session}/{seq:06}.wav`).
    pub const KEY: &str = "old-ingest/v1-0/000002.wav";
}

/// `fixtures/8bdd8bc-put-chunk-pcm-last.grpc`: a pre-Omi ingest's PutChunk (8bdd8bc's schema,
/// sent PCM last as ingest has since aa73bae): the second half of chunk 1, a resumed piece.
pub mod pre_omi_put {
    pub const UID: &str = "old-ingest";
    pub const SESSION: &str = "pre-omi";
    pub const SEQ: u64 = 1;
    pub const FIRST_SAMPLE: u64 = 12_000;
    pub const SAMPLES: u64 = 4_000;
    pub const KEY: &str = "old-ingest/pre-omi/000001_4000.wav";
}

/// `fixtures/4b779cb-put-chunk-response.bin`: a 1.0 uploader's answer to `v1_0_put` (no
/// receipt).
pub mod v1_0_response {
    pub const KEY: &str = super::v1_0_put::KEY;
    pub const NEWLY_STORED: bool = true;
}

/// Sample `i` of every recorded session: `(i * 7919) mod 65536` as a signed 16-bit value.
pub fn sample(i: u64) -> i16 {
    ((i.wrapping_mul(7_919)) & 0xffff) as u16 as i16
}

/// The PCM (s16le) of samples `[first, first + samples)`.
pub fn pcm(first: u64, samples: u64) -> Vec<u8> {
    (first..first + samples)
        .flat_map(|i| sample(i).to_le_bytes())
        .collect()
}

/// `proto/tests/wire`, from whichever crate's tests include this file.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|p| p.join("proto/tests/wire"))
        .find(|p| p.join("README.md").is_file())
        .expect("proto/tests/wire above the crate")
}

/// A recorded file's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = dir().join("fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The schemas (device and uploader) as they were at `commit`.
pub fn schema(commit: &str) -> DescriptorPool {
    let mut compiler =
        protox::Compiler::new([dir().join("schemas").join(commit)]).expect("include path");
    compiler
        .open_files(["device.proto", "uploader.proto"])
        .unwrap_or_else(|e| panic!("the schemas of {commit}: {e}"));
    compiler.descriptor_pool()
}

/// Message `name` (a full name) of `commit`'s schemas.
pub fn descriptor(commit: &str, name: &str) -> MessageDescriptor {
    schema(commit)
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("{commit} has no message {name}"))
}

/// `bytes` decoded as message `name` of `commit`'s schemas, as a peer of that time would.
pub fn decode(commit: &str, name: &str, bytes: &[u8]) -> DynamicMessage {
    DynamicMessage::decode(descriptor(commit, name), bytes)
        .unwrap_or_else(|e| panic!("{commit}'s {name} does not decode: {e}"))
}

/// A message of `commit`'s schemas with these fields set.
pub fn message(commit: &str, name: &str, fields: &[(&str, Value)]) -> DynamicMessage {
    let mut m = DynamicMessage::new(descriptor(commit, name));
    for (field, value) in fields {
        m.try_set_field_by_name(field, value.clone())
            .unwrap_or_else(|e| panic!("{commit}'s {name}.{field}: {e}"));
    }
    m
}

/// Field `name` of `m`, which must be set.
pub fn field(m: &DynamicMessage, name: &str) -> Value {
    assert!(m.has_field_by_name(name), "{m:?} has no {name}");
    m.get_field_by_name(name).expect("a field").into_owned()
}

/// Field `name` of `m` as a u64 (0 when absent).
pub fn uint(m: &DynamicMessage, name: &str) -> u64 {
    let v = m
        .get_field_by_name(name)
        .unwrap_or_else(|| panic!("{} has no field {name}", m.descriptor().full_name()));
    v.as_u64()
        .or_else(|| v.as_u32().map(u64::from))
        .unwrap_or_else(|| panic!("{name} is {v:?}"))
}

/// The numbers of `m`'s unknown fields, in order: what its schema did not know.
pub fn unknown(m: &DynamicMessage) -> Vec<u32> {
    m.unknown_fields().map(|f| f.number()).collect()
}

/// The value of `m`'s unknown varint field `number`.
pub fn unknown_varint(m: &DynamicMessage, number: u32) -> Option<u64> {
    let field = m.unknown_fields().find(|f| f.number() == number)?;
    let mut bytes = Vec::new();
    field.encode(&mut bytes);
    let mut buf = bytes.as_slice();
    let (n, wire) = prost::encoding::decode_key(&mut buf).ok()?;
    (n == number && wire == prost::encoding::WireType::Varint)
        .then(|| prost::encoding::decode_varint(&mut buf).ok())
        .flatten()
}

/// The sub-message set in `m`'s oneof, as (field name, message).
pub fn kind(m: &DynamicMessage) -> (String, DynamicMessage) {
    m.fields()
        .find_map(|(f, v)| Some((f.name().to_owned(), v.as_message()?.clone())))
        .unwrap_or_else(|| panic!("{m:?} carries nothing"))
}

/// The frames of a recorded device stream (each a 4-byte big-endian length, then the message).
pub fn frames(mut stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !stream.is_empty() {
        let (len, rest) = stream.split_at(4);
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let (frame, rest) = rest.split_at(len);
        out.push(frame);
        stream = rest;
    }
    out
}

/// The numbers of a message's top-level fields, in the order its bytes carry them.
pub fn field_order(mut message: &[u8]) -> Vec<u32> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut order = Vec::new();
    while !message.is_empty() {
        let (number, wire) = decode_key(&mut message).expect("a key");
        order.push(number);
        let skip = match wire {
            WireType::Varint => {
                decode_varint(&mut message).expect("a varint");
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => decode_varint(&mut message).expect("a length") as usize,
            other => panic!("wire type {other:?}"),
        };
        message = &message[skip..];
    }
    order
}

/// `message` as a gRPC request body: uncompressed, its length in 4 big-endian bytes, itself.
pub fn grpc_body(message: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    body.extend_from_slice(message);
    body
}

/// A device's `ClientMessage` of `commit`'s schema carrying a hello: 8 kHz s16le mono, with
/// `extra` fields (`resume_from`, `token`) set.
pub fn client_hello(
    commit: &str,
    uid: &str,
    session: &str,
    extra: &[(&str, Value)],
) -> DynamicMessage {
    let mut fields = vec![
        ("uid", Value::String(uid.into())),
        ("session", Value::String(session.into())),
        ("sample_rate", Value::U32(SAMPLE_RATE)),
        ("encoding", Value::EnumNumber(1)),
        ("channels", Value::U32(1)),
    ];
    fields.extend(extra.iter().cloned());
    let hello = message(commit, "spillway.device.v1.Hello", &fields);
    message(
        commit,
        "spillway.device.v1.ClientMessage",
        &[("hello", Value::Message(hello))],
    )
}

/// A device's `ClientMessage` of `commit`'s schema carrying audio.
pub fn client_audio(commit: &str, pcm: &[u8]) -> DynamicMessage {
    let audio = message(
        commit,
        "spillway.device.v1.Audio",
        &[("pcm", Value::Bytes(pcm.to_vec().into()))],
    );
    message(
        commit,
        "spillway.device.v1.ClientMessage",
        &[("audio", Value::Message(audio))],
    )
}

/// Messages as a device writes them to its stream: each after its length (4 bytes, big-endian).
pub fn framed(messages: &[DynamicMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let bytes = encode(m);
        out.extend_from_slice(&u32::try_from(bytes.len()).expect("small").to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// `m` encoded (prost's order: by field number).
pub fn encode(m: &DynamicMessage) -> Vec<u8> {
    m.encode_to_vec()
}
