//! The transport-independent core of one audio session: it validates the hello, feeds audio to
//! the [`Chunker`] and decides every protocol error. QUIC (today) and a WebSocket front end
//! (planned) both drive this same type; neither knows how chunks are cut.
//!
//! Sans-IO: decoded messages in, [`Output`] or a [`Refusal`] out.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message;
use spillway_proto::device::{ClientMessage, Encoding, ErrorCode, Hello, client_message::Kind};
use spillway_proto::validate;

use crate::auth::{Auth, Denied};
use crate::chunker::{Chunk, Chunker, Flush, MAX_RESUME_SAMPLE};

/// Per-daemon rules a session is held to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub chunk_seconds: u32,
    /// Who may write as which uid.
    pub auth: Arc<Auth>,
}

/// Who is speaking and how, once the hello is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub uid: String,
    pub session: String,
    pub sample_rate: u32,
    pub chunk_samples: u64,
    /// Session sample the stream starts at: the hello's resume point (0 for a new session).
    pub start_sample: u64,
}

/// A protocol error: the session is refused with this code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str_name())]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What a message produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// The hello was accepted.
    Accepted(Params),
    /// Audio was accepted; hand it to [`Session::feed`] (in steps, so the caller can reserve
    /// memory for each chunk before it is filled).
    Audio(bytes::Bytes),
}

#[derive(Debug)]
enum Phase {
    AwaitHello,
    Streaming { params: Params, chunker: Chunker },
}

/// One session's protocol state.
#[derive(Debug)]
pub struct Session {
    limits: Limits,
    phase: Phase,
    /// When the stream opened: credentials are checked as of then (the hello must follow
    /// within ingest's hello deadline).
    opened: SystemTime,
    /// What the connection's verified client certificate names (`--auth mtls`).
    certified: Option<crate::auth::Scope>,
}

impl Session {
    pub fn new(limits: Limits, opened: SystemTime) -> Self {
        Self {
            limits,
            phase: Phase::AwaitHello,
            opened,
            certified: None,
        }
    }

    /// The scope the connection's client certificate names, checked with `--auth mtls`.
    #[must_use]
    pub fn certified(mut self, scope: Option<crate::auth::Scope>) -> Self {
        self.certified = scope;
        self
    }

    /// The accepted parameters, once the hello is through.
    pub fn params(&self) -> Option<&Params> {
        match &self.phase {
            Phase::Streaming { params, .. } => Some(params),
            Phase::AwaitHello => None,
        }
    }

    /// Bytes of one full chunk (what a budget reservation grows to), once the hello is through.
    pub fn chunk_bytes(&self) -> Option<usize> {
        match &self.phase {
            Phase::Streaming { chunker, .. } => Some(chunker.chunk_bytes()),
            Phase::AwaitHello => None,
        }
    }

    /// How many more bytes of memory to reserve before feeding more audio, given `held` reserved
    /// for the chunk being filled ([`crate::reserve::next_reservation`]); `None` while there is
    /// room, or before a hello.
    pub fn reservation_needed(&self, held: usize) -> Option<usize> {
        match &self.phase {
            Phase::Streaming { chunker, .. } => {
                crate::reserve::next_reservation(chunker.room(), held, chunker.pending_bytes())
            }
            Phase::AwaitHello => None,
        }
    }

    /// Grows the chunk buffer to the `held` bytes reserved for it.
    pub fn ensure_capacity(&mut self, held: usize) {
        if let Phase::Streaming { chunker, .. } = &mut self.phase {
            chunker.ensure_capacity(held);
        }
    }

    /// Bytes received and not yet in an emitted chunk.
    pub fn pending_bytes(&self) -> usize {
        match &self.phase {
            Phase::Streaming { chunker, .. } => chunker.pending_bytes(),
            Phase::AwaitHello => 0,
        }
    }

    /// Decodes one frame and applies it.
    pub fn on_frame(&mut self, frame: Bytes) -> Result<Output, Refusal> {
        let len = frame.len();
        // Decoded from `Bytes`, the audio is a view of the frame, not a copy of it.
        let msg = ClientMessage::decode(frame).map_err(|e| {
            Refusal::new(
                ErrorCode::MalformedFrame,
                format!("frame of {len} bytes is not a ClientMessage: {e}"),
            )
        })?;
        self.on_message(msg)
    }

    /// Applies one decoded message.
    pub fn on_message(&mut self, msg: ClientMessage) -> Result<Output, Refusal> {
        match (&mut self.phase, msg.kind) {
            (Phase::AwaitHello, Some(Kind::Hello(hello))) => {
                let params = self.accept(hello)?;
                let chunker = Chunker::starting_at(params.chunk_samples, params.start_sample);
                self.phase = Phase::Streaming {
                    params: params.clone(),
                    chunker,
                };
                Ok(Output::Accepted(params))
            }
            (Phase::AwaitHello, Some(Kind::Audio(_))) => Err(Refusal::new(
                ErrorCode::ExpectedHello,
                "audio arrived before hello; the first message must be Hello",
            )),
            (_, None) => Err(Refusal::new(
                ErrorCode::MalformedFrame,
                "message carries neither hello nor audio",
            )),
            (Phase::Streaming { .. }, Some(Kind::Hello(_))) => Err(Refusal::new(
                ErrorCode::UnexpectedHello,
                "a second hello on the same stream; open a new stream for a new session",
            )),
            (Phase::Streaming { .. }, Some(Kind::Audio(audio))) => Ok(Output::Audio(audio.pcm)),
        }
    }

    /// Feeds accepted audio to the chunker, up to the end of the chunk being filled: returns how
    /// many bytes were taken and the chunk they completed, if any. Call again with the rest.
    /// Before a hello there is no chunker (audio is refused then): the bytes are ignored.
    pub fn feed(&mut self, pcm: &[u8]) -> (usize, Option<Chunk>) {
        match &mut self.phase {
            Phase::Streaming { chunker, .. } => chunker.push_until_chunk(pcm),
            Phase::AwaitHello => (pcm.len(), None),
        }
    }

    /// Ends the session (device finished, idle timeout or shutdown): flushes the pending audio.
    /// `Ok(None)` before a hello: there is nothing to flush.
    pub fn finish(&mut self) -> Option<Flush> {
        match &mut self.phase {
            Phase::Streaming { chunker, .. } => Some(chunker.finish()),
            Phase::AwaitHello => None,
        }
    }

    fn accept(&self, hello: Hello) -> Result<Params, Refusal> {
        validate::id(&hello.uid)
            .map_err(|e| Refusal::new(ErrorCode::InvalidUid, format!("uid {e}")))?;
        self.limits
            .auth
            .authorize(
                &hello.uid,
                &hello.token,
                self.certified.as_ref(),
                self.opened,
            )
            .map_err(|denied| {
                let code = match denied {
                    Denied::Unauthenticated(_) | Denied::NoCertificateScope => {
                        ErrorCode::Unauthenticated
                    }
                    Denied::OtherUid { .. } => ErrorCode::PermissionDenied,
                };
                Refusal::new(code, denied.to_string())
            })?;
        validate::id(&hello.session)
            .map_err(|e| Refusal::new(ErrorCode::InvalidSession, format!("session {e}")))?;
        validate::sample_rate(hello.sample_rate)
            .map_err(|e| Refusal::new(ErrorCode::UnsupportedSampleRate, e.to_string()))?;
        if hello.encoding != Encoding::PcmS16le as i32 {
            let name = Encoding::try_from(hello.encoding).map_or_else(
                |_| format!("unknown value {}", hello.encoding),
                |e| e.as_str_name().to_owned(),
            );
            return Err(Refusal::new(
                ErrorCode::UnsupportedEncoding,
                format!("encoding {name} is not supported; use ENCODING_PCM_S16LE"),
            ));
        }
        if hello.channels != 1 {
            return Err(Refusal::new(
                ErrorCode::UnsupportedChannels,
                format!(
                    "{} channels are not supported; send mono (1)",
                    hello.channels
                ),
            ));
        }
        if hello.resume_from > MAX_RESUME_SAMPLE {
            return Err(Refusal::new(
                ErrorCode::InvalidResume,
                format!(
                    "resume_from {} is beyond the last resumable sample {MAX_RESUME_SAMPLE}",
                    hello.resume_from
                ),
            ));
        }
        Ok(Params {
            start_sample: hello.resume_from,
            chunk_samples: u64::from(self.limits.chunk_seconds) * u64::from(hello.sample_rate),
            uid: hello.uid,
            session: hello.session,
            sample_rate: hello.sample_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_proto::device::Audio;

    fn hello(uid: &str, session: &str, rate: u32) -> ClientMessage {
        ClientMessage {
            kind: Some(Kind::Hello(Hello {
                uid: uid.into(),
                session: session.into(),
                sample_rate: rate,
                encoding: Encoding::PcmS16le as i32,
                channels: 1,
                token: String::new(),
                resume_from: 0,
            })),
        }
    }

    fn audio(pcm: &[u8]) -> ClientMessage {
        ClientMessage {
            kind: Some(Kind::Audio(Audio {
                pcm: bytes::Bytes::copy_from_slice(pcm),
            })),
        }
    }

    fn limits() -> Limits {
        Limits {
            chunk_seconds: 1,
            auth: Arc::new(Auth::None),
        }
    }

    fn new(limits: Limits) -> Session {
        Session::new(limits, SystemTime::UNIX_EPOCH)
    }

    fn code_of(s: &mut Session, m: ClientMessage) -> ErrorCode {
        s.on_message(m).expect_err("must be refused").code
    }

    #[test]
    fn hello_then_audio_cuts_chunks() {
        let mut s = new(limits());
        let Ok(Output::Accepted(p)) = s.on_message(hello("u", "s", 8000)) else {
            panic!("hello refused")
        };
        assert_eq!(p.chunk_samples, 8000);
        let Ok(Output::Audio(pcm)) = s.on_message(audio(&[0; 16_001])) else {
            panic!("audio refused")
        };
        let (taken, chunk) = s.feed(&pcm);
        assert_eq!(taken, 16_000, "feeding stops at the chunk boundary");
        assert_eq!(chunk.map(|c| c.samples()), Some(8000));
        assert_eq!(s.feed(&pcm[taken..]), (1, None));
        let flush = s.finish().expect("streaming");
        assert!(flush.dangling_byte);
        assert_eq!(flush.chunk, None);
    }

    #[test]
    fn every_bad_hello_gets_its_own_code() {
        let cases = [
            (hello("../x", "s", 8000), ErrorCode::InvalidUid),
            (hello("a/b", "s", 8000), ErrorCode::InvalidUid),
            (hello("", "s", 8000), ErrorCode::InvalidUid),
            (hello(&"u".repeat(129), "s", 8000), ErrorCode::InvalidUid),
            (hello("u", "a\u{7}b", 8000), ErrorCode::InvalidSession),
            (hello("u", "..", 8000), ErrorCode::InvalidSession),
            (hello("u", "s", 7999), ErrorCode::UnsupportedSampleRate),
            (hello("u", "s", 48_001), ErrorCode::UnsupportedSampleRate),
        ];
        for (msg, code) in cases {
            assert_eq!(code_of(&mut new(limits()), msg), code);
        }
        let mut wrong = hello("u", "s", 8000);
        if let Some(Kind::Hello(h)) = &mut wrong.kind {
            h.encoding = 0;
        }
        assert_eq!(
            code_of(&mut new(limits()), wrong.clone()),
            ErrorCode::UnsupportedEncoding
        );
        if let Some(Kind::Hello(h)) = &mut wrong.kind {
            h.encoding = Encoding::PcmS16le as i32;
            h.channels = 2;
        }
        assert_eq!(
            code_of(&mut new(limits()), wrong),
            ErrorCode::UnsupportedChannels
        );
    }

    #[test]
    fn order_and_framing_errors() {
        assert_eq!(
            code_of(&mut new(limits()), audio(&[1, 2])),
            ErrorCode::ExpectedHello
        );
        let mut s = new(limits());
        assert!(s.on_message(hello("u", "s", 8000)).is_ok());
        assert_eq!(
            code_of(&mut s, hello("u", "s", 8000)),
            ErrorCode::UnexpectedHello
        );
        assert_eq!(
            new(limits())
                .on_frame(Bytes::from_static(&[0xff, 0xff, 0xff]))
                .expect_err("garbage")
                .code,
            ErrorCode::MalformedFrame
        );
    }

    #[test]
    fn a_device_writes_only_as_the_uid_its_token_names() {
        use crate::auth::{Keyring, Scope};
        use std::time::Duration;
        let keys = Keyring::parse("k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap();
        let limits = Limits {
            chunk_seconds: 1,
            auth: Arc::new(Auth::Tokens(keys.clone())),
        };
        let with = |uid: &str, token: &str| {
            let mut m = hello(uid, "s", 8000);
            if let Some(Kind::Hello(h)) = &mut m.kind {
                h.token = token.into();
            }
            m
        };
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let alice = keys.issue(None, &Scope::Uid("alice".into()), 100).unwrap();
        let gateway = keys.issue(None, &Scope::Prefix("gw-".into()), 100).unwrap();
        let open = |t: u64| Session::new(limits.clone(), at(t));
        assert!(open(5).on_message(with("alice", &alice)).is_ok());
        assert!(open(5).on_message(with("gw-bob", &gateway)).is_ok());
        let refused = |t: u64, m: ClientMessage| open(t).on_message(m).expect_err("refused");
        let r = refused(5, with("bob", &alice));
        assert_eq!(r.code, ErrorCode::PermissionDenied);
        assert!(
            r.message.contains("uid \"alice\"") && r.message.contains("\"bob\""),
            "{}",
            r.message
        );
        assert_eq!(
            refused(5, with("bob", &gateway)).code,
            ErrorCode::PermissionDenied
        );
        for (t, m, says) in [
            (5, with("alice", ""), "no token"),
            (5, with("alice", "sesame"), "malformed"),
            (
                100,
                with("alice", &alice),
                "expired at 1970-01-01T00:01:40Z",
            ),
        ] {
            let r = refused(t, m);
            assert_eq!(r.code, ErrorCode::Unauthenticated);
            assert!(r.message.contains(says), "{}", r.message);
        }
        // The uid is checked before the token: a bad uid gets its own code.
        assert_eq!(refused(5, with("../x", &alice)).code, ErrorCode::InvalidUid);
    }
}
