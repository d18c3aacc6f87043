//! The WebSocket protocol of Omi's "pusher" service, sans-IO, so that Omi's `listen` service can
//! point at Spillway unchanged. Bytes and query strings in; typed frames, chunks and close codes
//! out. No sockets, no runtime, no clock (the caller owns the 300 s receive timeout).
//!
//! # The contract, in brief (from `/work/shared/omi-pusher.md`)
//! - `listen` opens one WebSocket per user session: `GET /v1/trigger/listen?uid=…&sample_rate=…`,
//!   optionally `client_kind` and `audio_timeline=2`. The uid is not authenticated by the pusher.
//!   A sample rate outside 8000–48000 (default 8000) or a timeline version other than 2 closes the
//!   socket with 1008 ([`query`]).
//! - Every message is binary: a little-endian u32 opcode, then its payload. 100 heartbeat; 101
//!   audio (a little-endian f64 Unix time of the first sample, then PCM s16le mono); 102
//!   transcript and 105 speaker samples (JSON, not needed here); 103 names the conversation the
//!   following audio belongs to; 104 asks to process a conversation and is answered by 201. With
//!   `audio_timeline=2` the server first sends 202, the timeline acknowledgement. A bad frame
//!   closes 1003 ([`frame`]).
//! - Audio is stored only once a 103 has named the conversation. A chunk starts at the time of its
//!   first 101 frame and is cut after 60 s of audio, when the conversation changes, at disconnect
//!   and, in timeline version 2, at any gap over 1 ms. In version 2 the timestamps identify the
//!   audio (a replay carries the same times): exact replays are ignored, overlaps trimmed, and
//!   overlaps with different bytes counted as conflicts. In version 1 the timestamp is only the
//!   arrival time minus the frame's duration ([`timeline`]).
//! - Objects are `chunks/{uid}/{conversation_id}/{start:.3}.batch.bin`: raw PCM, no header, the
//!   start being the chunk's first-sample Unix time. Keys are the caller's business; every
//!   [`timeline::OmiChunk`] carries what they need.
//!
//! # Invariants this code guarantees
//! - Decoding never panics, whatever the bytes; every refusal is a [`CloseRefusal`] whose code is
//!   one of [`close`] and whose reason fits a close frame (at most 123 bytes).
//! - A uid or conversation id that gets through is 1–128 characters of `[A-Za-z0-9._-]`, not `.`
//!   or `..` (`spillway_proto::validate::id`, the rule the QUIC front end applies): safe as an
//!   object-key segment. [`ConversationId`] can only hold such a value; `client_kind` follows the
//!   same rule within 64 bytes (it may become a metric label).
//! - Audio before the first 103 is never stored, only counted (as the pusher drops it).
//! - PCM is never copied by decoding: [`frame::Audio`] borrows the message.
//! - One chunk of audio at most is held per connection (the [`crate::chunker::Chunker`]'s
//!   buffer); replays are compared with that and nothing else.
//! - In timeline version 2, for any split of a continuous capture into frames, with any replays
//!   and overlaps of the same bytes, the chunks' concatenation is the capture exactly: nothing
//!   lost, nothing twice (a property test checks it).
//! - Every chunk knows its conversation, sample rate, sample count and first-sample Unix time;
//!   the chunks that continue a 60 s run start exactly `chunk_samples` samples after the previous
//!   one, by sample count, not by re-reading frame timestamps.

use std::borrow::Cow;
use std::fmt;

use spillway_proto::validate::{self, IdError};

pub mod bearer;
pub mod frame;
pub mod query;
pub mod timeline;

#[cfg(test)]
mod props;

/// WebSocket close codes the pusher uses, and the room a close reason has.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (draining for shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// A malformed frame (the pusher's "bad frame").
    pub const MALFORMED: u16 = 1003;
    /// A policy violation: a bad query (sample rate, timeline version, uid).
    pub const POLICY: u16 = 1008;
    /// No frame arrived within the receive timeout (300 s at the pusher).
    pub const RECEIVE_TIMEOUT: u16 = 1011;
    /// The longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
    pub const MAX_REASON_BYTES: usize = 123;
}

/// Why the connection is closed: a close code and its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("close {code}: {reason}")]
pub struct CloseRefusal {
    pub code: u16,
    /// At most [`close::MAX_REASON_BYTES`] bytes (cut at a character boundary).
    pub reason: Cow<'static, str>,
}

impl CloseRefusal {
    /// A refusal with `code`; a reason longer than a close frame allows is shortened.
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        let mut reason = reason.into();
        if reason.len() > close::MAX_REASON_BYTES {
            let mut end = close::MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.to_mut().truncate(end);
        }
        Self { code, reason }
    }

    /// A malformed frame: close code 1003.
    pub fn malformed(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(close::MALFORMED, reason)
    }

    /// A policy violation: close code 1008.
    pub fn policy(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(close::POLICY, reason)
    }
}

/// A conversation id that is safe as an object-key segment: it passed
/// `spillway_proto::validate::id`, so it cannot be built any other way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConversationId(String);

impl ConversationId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        validate::id(value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ConversationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_fits_a_close_frame_and_keeps_whole_characters() {
        let r = CloseRefusal::policy("é".repeat(100));
        assert_eq!(r.code, close::POLICY);
        assert_eq!(
            r.reason.len(),
            122,
            "61 two-byte characters, not half of one"
        );
        assert_eq!(
            CloseRefusal::malformed("short").reason,
            Cow::Borrowed("short")
        );
    }

    #[test]
    fn a_conversation_id_is_a_safe_key_segment() {
        assert_eq!(
            ConversationId::parse("conv-1.a_b").map(|c| c.to_string()),
            Ok("conv-1.a_b".to_owned())
        );
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
