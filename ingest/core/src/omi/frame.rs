//! One binary WebSocket message of the pusher protocol: a little-endian u32 opcode, then its
//! payload. Decoding borrows from the message (PCM is never copied) and never panics; a malformed
//! message is a [`CloseRefusal`] with code 1003 and a reason that says what was wrong.
//!
//! Also the two server → client messages Spillway sends: 202 (timeline acknowledgement) and 201
//! (the result of a 104).

use std::borrow::Cow;

use serde::Deserialize;

use super::{CloseRefusal, ConversationId};

/// Opcodes, as the pusher numbers them.
pub mod opcode {
    /// listen → pusher: heartbeat, empty, every 20 s.
    pub const HEARTBEAT: u32 = 100;
    /// listen → pusher: f64 LE Unix seconds of the first sample, then PCM s16le mono.
    pub const AUDIO: u32 = 101;
    /// listen → pusher: transcript segments (JSON).
    pub const TRANSCRIPT: u32 = 102;
    /// listen → pusher: the conversation the following audio belongs to (UTF-8).
    pub const CONVERSATION: u32 = 103;
    /// listen → pusher: process (finalize) a conversation (JSON).
    pub const PROCESS: u32 = 104;
    /// listen → pusher: speaker samples (JSON).
    pub const SPEAKER_SAMPLE: u32 = 105;
    /// pusher → listen: the JSON result of a 104.
    pub const PROCESS_RESULT: u32 = 201;
    /// pusher → listen: `{"type":"audio_timeline_ack","version":2}`.
    pub const TIMELINE_ACK: u32 = 202;
}

/// The latest 101 timestamp accepted: 2^32 s, in the year 2106. Anything later is not a clock
/// but garbage, and bounding it keeps `timestamp × sample_rate` far inside an i64.
pub const MAX_TIMESTAMP: f64 = 4_294_967_296.0;
/// The largest 104 payload parsed as JSON.
pub const MAX_PROCESS_JSON_BYTES: usize = 64 * 1024;

const OPCODE_BYTES: usize = 4;
const TIMESTAMP_BYTES: usize = 8;

/// The payload of a 101: audio and the Unix time of its first sample. Only built by
/// [`Audio::new`] (or [`decode`]), so a value always holds a finite timestamp in
/// `0..=MAX_TIMESTAMP` and whole samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Audio<'a> {
    timestamp: f64,
    pcm: &'a [u8],
}

impl<'a> Audio<'a> {
    /// Checks the timestamp and the PCM length (whole s16le samples).
    pub fn new(timestamp: f64, pcm: &'a [u8]) -> Result<Self, CloseRefusal> {
        if !timestamp.is_finite() {
            return Err(CloseRefusal::malformed(
                "101 timestamp is not a finite number",
            ));
        }
        if timestamp < 0.0 {
            return Err(CloseRefusal::malformed(format!(
                "101 timestamp {timestamp} is negative"
            )));
        }
        if timestamp > MAX_TIMESTAMP {
            return Err(CloseRefusal::malformed(format!(
                "101 timestamp {timestamp} is after {MAX_TIMESTAMP} (year 2106)"
            )));
        }
        if !pcm.len().is_multiple_of(2) {
            return Err(CloseRefusal::malformed(format!(
                "101 audio of {} bytes is not whole 16-bit samples",
                pcm.len()
            )));
        }
        Ok(Self { timestamp, pcm })
    }

    /// Unix seconds of the first sample.
    pub fn timestamp(&self) -> f64 {
        self.timestamp
    }

    /// PCM s16le mono, an even number of bytes (possibly none).
    pub fn pcm(&self) -> &'a [u8] {
        self.pcm
    }

    pub fn samples(&self) -> usize {
        self.pcm.len() / 2
    }
}

/// One decoded client message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<'a> {
    /// 100. A payload, if any, is ignored.
    Heartbeat,
    /// 101.
    Audio(Audio<'a>),
    /// 102: transcript segments, accepted and ignored (not parsed).
    Transcript(&'a [u8]),
    /// 103: the audio that follows belongs to this conversation.
    Conversation(ConversationId),
    /// 104: process a conversation; `None` means the current one.
    Process {
        conversation_id: Option<ConversationId>,
    },
    /// 105: speaker samples, accepted and ignored (not parsed).
    SpeakerSample(&'a [u8]),
    /// Any other opcode: the caller counts it and carries on; never fatal.
    Unknown(u32),
}

/// Decodes one binary message.
pub fn decode(msg: &[u8]) -> Result<Frame<'_>, CloseRefusal> {
    let (Some(op), Some(payload)) = (msg.get(..OPCODE_BYTES), msg.get(OPCODE_BYTES..)) else {
        return Err(CloseRefusal::malformed(format!(
            "message of {} bytes is shorter than its 4-byte opcode",
            msg.len()
        )));
    };
    let op = u32::from_le_bytes(le_bytes(op));
    Ok(match op {
        opcode::HEARTBEAT => Frame::Heartbeat,
        opcode::AUDIO => Frame::Audio(audio(payload, msg.len())?),
        opcode::TRANSCRIPT => Frame::Transcript(payload),
        opcode::CONVERSATION => Frame::Conversation(conversation(payload)?),
        opcode::PROCESS => Frame::Process {
            conversation_id: process(payload)?,
        },
        opcode::SPEAKER_SAMPLE => Frame::SpeakerSample(payload),
        other => Frame::Unknown(other),
    })
}

fn le_bytes<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

fn audio(payload: &[u8], msg_len: usize) -> Result<Audio<'_>, CloseRefusal> {
    let (Some(ts), Some(pcm)) = (
        payload.get(..TIMESTAMP_BYTES),
        payload.get(TIMESTAMP_BYTES..),
    ) else {
        return Err(CloseRefusal::malformed(format!(
            "101 message of {msg_len} bytes is shorter than 12 (opcode and timestamp)"
        )));
    };
    Audio::new(f64::from_le_bytes(le_bytes(ts)), pcm)
}

fn conversation(payload: &[u8]) -> Result<ConversationId, CloseRefusal> {
    let id = std::str::from_utf8(payload)
        .map_err(|e| CloseRefusal::malformed(format!("103 conversation id is not UTF-8: {e}")))?;
    ConversationId::parse(id)
        .map_err(|e| CloseRefusal::malformed(format!("103 conversation id {e}")))
}

/// The part of a 104 this code needs; other fields (language, …) are skipped unread.
#[derive(Deserialize)]
struct ProcessRequest<'a> {
    #[serde(default, borrow)]
    conversation_id: Option<Cow<'a, str>>,
}

fn process(payload: &[u8]) -> Result<Option<ConversationId>, CloseRefusal> {
    if payload.len() > MAX_PROCESS_JSON_BYTES {
        return Err(CloseRefusal::malformed(format!(
            "104 payload of {} bytes; at most {MAX_PROCESS_JSON_BYTES} are parsed",
            payload.len()
        )));
    }
    // serde would also read a JSON array into the struct; the pusher sends an object.
    if payload.trim_ascii_start().first() != Some(&b'{') {
        return Err(CloseRefusal::malformed("104 payload is not a JSON object"));
    }
    let req: ProcessRequest<'_> = serde_json::from_slice(payload)
        .map_err(|e| CloseRefusal::malformed(format!("104 payload: {e}")))?;
    req.conversation_id
        .map(|id| {
            ConversationId::parse(&id)
                .map_err(|e| CloseRefusal::malformed(format!("104 conversation_id {e}")))
        })
        .transpose()
}

/// A 202: the timeline acknowledgement, sent right after accepting an `audio_timeline=2` query.
pub fn timeline_ack() -> Vec<u8> {
    with_opcode(
        opcode::TIMELINE_ACK,
        br#"{"type":"audio_timeline_ack","version":2}"#,
    )
}

/// A 201: the successful result of a 104 for `conversation_id`. The id is valid
/// ([`ConversationId`]), so it needs no JSON escaping.
pub fn process_result(conversation_id: &ConversationId) -> Vec<u8> {
    let json = format!(r#"{{"conversation_id":"{conversation_id}","success":true}}"#);
    with_opcode(opcode::PROCESS_RESULT, json.as_bytes())
}

fn with_opcode(op: u32, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPCODE_BYTES + json.len());
    out.extend_from_slice(&op.to_le_bytes());
    out.extend_from_slice(json);
    out
}

/// A 101 message (tests and simulated clients).
#[cfg(test)]
pub(crate) fn encode_audio(timestamp: f64, pcm: &[u8]) -> Vec<u8> {
    let mut out = opcode::AUDIO.to_le_bytes().to_vec();
    out.extend_from_slice(&timestamp.to_le_bytes());
    out.extend_from_slice(pcm);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::omi::close;

    fn msg(op: u32, payload: &[u8]) -> Vec<u8> {
        with_opcode(op, payload)
    }

    fn malformed(m: &[u8]) -> String {
        let r = decode(m).expect_err("malformed");
        assert_eq!(r.code, close::MALFORMED);
        r.reason.into_owned()
    }

    fn conv(id: &str) -> ConversationId {
        ConversationId::parse(id).expect("valid id")
    }

    #[test]
    fn every_client_opcode_decodes() {
        assert_eq!(decode(&msg(100, b"")), Ok(Frame::Heartbeat));
        let m = encode_audio(1_786_961_845.727, &[1, 0, 2, 0]);
        let Ok(Frame::Audio(a)) = decode(&m) else {
            panic!("audio")
        };
        assert_eq!(
            (a.timestamp(), a.pcm(), a.samples()),
            (1_786_961_845.727, &[1, 0, 2, 0][..], 2)
        );
        assert!(
            std::ptr::eq(a.pcm().as_ptr(), m[12..].as_ptr()),
            "borrowed, not copied"
        );
        assert_eq!(
            decode(&encode_audio(0.0, &[]))
                .map(|f| matches!(f, Frame::Audio(a) if a.samples() == 0)),
            Ok(true)
        );
        assert_eq!(
            decode(&msg(102, b"{\"segments\":[]}")),
            Ok(Frame::Transcript(b"{\"segments\":[]}"))
        );
        assert_eq!(
            decode(&msg(103, b"conv-7")),
            Ok(Frame::Conversation(conv("conv-7")))
        );
        assert_eq!(decode(&msg(105, b"{}")), Ok(Frame::SpeakerSample(b"{}")));
        assert_eq!(decode(&msg(7, b"whatever")), Ok(Frame::Unknown(7)));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Ok(Frame::Unknown(u32::MAX))
        );
    }

    #[test]
    fn a_process_request_names_a_conversation_or_the_current_one() {
        let p = |json: &str| match decode(&msg(104, json.as_bytes())) {
            Ok(Frame::Process { conversation_id }) => Ok(conversation_id),
            other => Err(format!("{other:?}")),
        };
        let named = Ok(Some(conv("c1")));
        assert_eq!(
            p(r#"{"conversation_id":"c1","language":"en","x":[1,{"y":2}]}"#),
            named
        );
        assert_eq!(
            p(r#" {"conversation_id":"c\u0031"}"#),
            named,
            "escapes are decoded"
        );
        assert_eq!(p(r#"{"language":"en"}"#), Ok(None));
        assert_eq!(p(r#"{"conversation_id":null}"#), Ok(None));
    }

    #[test]
    fn malformed_messages_close_1003_with_a_precise_reason() {
        assert!(malformed(&[101, 0, 0]).contains("shorter than its 4-byte opcode"));
        assert!(malformed(&[]).contains("message of 0 bytes"));
        assert!(
            malformed(&msg(101, &[0; 7])).contains("101 message of 11 bytes is shorter than 12")
        );
        assert!(malformed(&encode_audio(1.0, &[1, 2, 3])).contains("3 bytes is not whole"));
        assert!(malformed(&encode_audio(f64::NAN, &[])).contains("not a finite"));
        assert!(malformed(&encode_audio(f64::INFINITY, &[])).contains("not a finite"));
        assert!(malformed(&encode_audio(-1.0, &[])).contains("negative"));
        assert!(malformed(&encode_audio(5e9, &[])).contains("year 2106"));
        assert!(malformed(&msg(103, b"")).contains("103 conversation id is empty"));
        assert!(malformed(&msg(103, b"../etc")).contains("'/'"));
        assert!(malformed(&msg(103, &[0xc3])).contains("not UTF-8"));
        assert!(malformed(&msg(103, "x".repeat(129).as_bytes())).contains("at most 128"));
        assert!(malformed(&msg(104, b"")).contains("not a JSON object"));
        assert!(malformed(&msg(104, b"[\"c1\"]")).contains("not a JSON object"));
        assert!(
            malformed(&msg(104, b"{\"conversation_id\":5}"))
                .starts_with("104 payload: invalid type")
        );
        assert!(
            malformed(&msg(104, b"{\"conversation_id\":\"a/b\"}"))
                .contains("104 conversation_id contains")
        );
        assert!(
            malformed(&msg(
                104,
                b"{\"conversation_id\":\"a\",\"conversation_id\":\"b\"}"
            ))
            .contains("duplicate")
        );
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_PROCESS_JSON_BYTES));
        assert!(malformed(&msg(104, big.as_bytes())).contains("at most 65536"));
    }

    #[test]
    fn server_messages_are_prefixed_with_their_opcode() {
        let ack = timeline_ack();
        assert_eq!(ack.get(..4), Some(&202u32.to_le_bytes()[..]));
        assert_eq!(
            ack.get(4..),
            Some(&br#"{"type":"audio_timeline_ack","version":2}"#[..])
        );
        let r = process_result(&conv("c-1"));
        assert_eq!(r.get(..4), Some(&[201, 0, 0, 0][..]));
        let json: serde_json::Value =
            serde_json::from_slice(r.get(4..).unwrap_or_default()).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({"conversation_id": "c-1", "success": true})
        );
    }
}
