//! A `PutChunk` request decoded as its bytes arrive, without gathering the message (sans-IO).
//!
//! tonic's decoder waits for a whole gRPC message (a 1.92–5.76 MB chunk) in one buffer before
//! protobuf sees any of it. [`PutDecoder`] instead takes the request body's frames as they come
//! and yields the PCM field's bytes as views of those frames ([`Event::Pcm`]), so the service
//! can write them to the record's file straight away; every other field (a few dozen bytes) is
//! kept, raw, and decoded by prost ([`PutDecoder::fields`]).
//!
//! The bytes are the network's: every length is checked against what remains of the message
//! before it is trusted, the fields beside the PCM are capped at [`FIELDS_CAP`] bytes, the
//! message at the size the service allows, and nothing here panics or allocates by a length it
//! was told (property-tested in `tests/fuzz_parsers.rs`).

use bytes::{Buf, Bytes};
use prost::Message;
use spillway_proto::uploader::PutChunkRequest;

/// `PutChunkRequest.pcm`'s field number.
pub const PCM_FIELD: u64 = 5;

/// The most bytes the fields other than the PCM may take: a chunk id of two validated ids, a
/// few integers and whatever unknown fields a newer ingest adds. Far above what a valid request
/// carries (under 300 bytes), far below a chunk.
pub const FIELDS_CAP: usize = 64 * 1024;

/// What the bytes pushed so far made of the PCM field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The PCM field begins; `len` bytes follow (as [`Event::Pcm`]). The fields before it are
    /// [`PutDecoder::fields_before_pcm`]; `last` when the PCM ends the message (no field
    /// follows it).
    PcmStart { len: u64, last: bool },
    /// The PCM's next bytes, a view of the frame pushed.
    Pcm(Bytes),
}

/// Why a request body is not one acceptable `PutChunkRequest` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message is compressed (flag {0}); this uploader takes uncompressed messages")]
    Compressed(u8),
    #[error("the message is {len} bytes, over this uploader's limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("field {field} has wire type {wire}, which no PutChunkRequest field uses")]
    WireType { field: u64, wire: u8 },
    #[error("a field number of 0, or over 2^29-1")]
    FieldNumber,
    #[error("a varint runs past 10 bytes")]
    Varint,
    #[error("field {field} runs past the end of the message")]
    Overrun { field: u64 },
    #[error("the pcm field appears twice")]
    PcmRepeated,
    #[error("the fields other than pcm exceed {FIELDS_CAP} bytes")]
    FieldsTooLarge,
    #[error("the request body ended {missing} bytes before the end of its message")]
    Truncated { missing: u64 },
    #[error("the request body carries no message")]
    NoMessage,
    #[error("the request body continues after its message; a PutChunk call carries one")]
    Trailing,
    #[error("the fields do not decode: {0}")]
    Fields(String),
}

impl DecodeError {
    /// The gRPC status code tonic's own decoder would answer, where it has one.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Compressed(_) => tonic::Code::Unimplemented,
            Self::TooLarge { .. } => tonic::Code::OutOfRange,
            _ => tonic::Code::InvalidArgument,
        }
    }

    /// The metric label of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "message_too_large",
            Self::Compressed(_) => "compressed",
            _ => "malformed",
        }
    }
}

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The 5-byte gRPC prefix: compressed flag, big-endian length.
    Prefix,
    /// A field's key (a varint).
    Key,
    /// A varint value of a kept field, copied byte by byte.
    VarintValue { field: u64 },
    /// The length of a length-delimited field (a varint).
    Length { field: u64 },
    /// `left` more bytes of a kept field's value, copied.
    Copy { field: u64, left: u64 },
    /// `left` more bytes of the PCM, yielded.
    Pcm { left: u64 },
    /// The message has ended.
    Done,
}

/// The decoder of one request body (see the module doc).
#[derive(Debug)]
pub struct PutDecoder {
    max_message: usize,
    state: State,
    /// The prefix, or the varint being read (a key or a length).
    small: [u8; 10],
    small_len: usize,
    /// Bytes of the message not consumed yet.
    left: u64,
    /// Every field but the PCM, as it came (keys and values).
    fields: Vec<u8>,
    pcm_seen: bool,
    /// How many bytes of `fields` came before the PCM.
    before_pcm: usize,
}

impl PutDecoder {
    /// A decoder taking messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            state: State::Prefix,
            small: [0; 10],
            small_len: 0,
            left: 0,
            fields: Vec::new(),
            pcm_seen: false,
            before_pcm: 0,
        }
    }

    /// The fields that came before the PCM, decoded (the PCM left empty); all of them once the
    /// PCM turned out to end the message.
    pub fn fields_before_pcm(&self) -> Result<PutChunkRequest, DecodeError> {
        decode_fields(&self.fields[..self.before_pcm])
    }

    /// Takes the body's next bytes; the PCM's events are appended to `out`.
    pub fn push(&mut self, mut data: Bytes, out: &mut Vec<Event>) -> Result<(), DecodeError> {
        while data.has_remaining() {
            match self.state {
                State::Done => return Err(DecodeError::Trailing),
                State::Prefix => self.prefix_byte(data.get_u8())?,
                State::Pcm { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    out.push(Event::Pcm(data.split_to(n)));
                    self.consumed(n as u64);
                    self.state = self.after_field(left - n as u64, |left| State::Pcm { left });
                }
                State::Copy { field, left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.keep(&data.split_to(n))?;
                    self.consumed(n as u64);
                    self.state =
                        self.after_field(left - n as u64, |left| State::Copy { field, left });
                }
                State::Key | State::VarintValue { .. } | State::Length { .. } => {
                    let byte = data.get_u8();
                    self.varint_byte(byte, out)?;
                }
            }
        }
        Ok(())
    }

    /// The body ended: the message must be whole. Returns its fields other than the PCM.
    pub fn finish(&self) -> Result<PutChunkRequest, DecodeError> {
        match self.state {
            State::Done => decode_fields(&self.fields),
            State::Prefix if self.small_len == 0 => Err(DecodeError::NoMessage),
            State::Prefix => Err(DecodeError::Truncated {
                missing: (5 - self.small_len) as u64,
            }),
            _ => Err(DecodeError::Truncated { missing: self.left }),
        }
    }

    fn prefix_byte(&mut self, byte: u8) -> Result<(), DecodeError> {
        self.small[self.small_len] = byte;
        self.small_len += 1;
        if self.small_len < 5 {
            return Ok(());
        }
        self.small_len = 0;
        if self.small[0] != 0 {
            return Err(DecodeError::Compressed(self.small[0]));
        }
        let len = u64::from(u32::from_be_bytes([
            self.small[1],
            self.small[2],
            self.small[3],
            self.small[4],
        ]));
        if len > self.max_message as u64 {
            return Err(DecodeError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        self.left = len;
        self.state = if len == 0 { State::Done } else { State::Key };
        Ok(())
    }

    /// One byte of a varint (a key, a kept varint value, or a length).
    fn varint_byte(&mut self, byte: u8, out: &mut Vec<Event>) -> Result<(), DecodeError> {
        if self.left == 0 {
            return Err(DecodeError::Overrun {
                field: self.current_field(),
            });
        }
        self.consumed(1);
        if self.small_len == self.small.len() {
            return Err(DecodeError::Varint);
        }
        self.small[self.small_len] = byte;
        self.small_len += 1;
        if byte & 0x80 != 0 {
            // More bytes to come; a varint cut by the message's end is caught on the next byte
            // or by `finish`.
            if self.left == 0 {
                return Err(DecodeError::Overrun {
                    field: self.current_field(),
                });
            }
            return Ok(());
        }
        let raw = self.small;
        let bytes = &raw[..self.small_len];
        self.small_len = 0;
        let value = varint_value(bytes).ok_or(DecodeError::Varint)?;
        match self.state {
            State::Key => self.key(value, bytes),
            State::VarintValue { .. } => {
                self.keep(bytes)?;
                self.state = self.after_field(0, |_| State::Key);
                Ok(())
            }
            State::Length { field } => self.length(field, value, bytes, out),
            _ => Ok(()),
        }
    }

    fn key(&mut self, key: u64, raw: &[u8]) -> Result<(), DecodeError> {
        let (field, wire) = (key >> 3, (key & 7) as u8);
        if field == 0 || field > (1 << 29) - 1 {
            return Err(DecodeError::FieldNumber);
        }
        if field == PCM_FIELD {
            if wire != 2 {
                return Err(DecodeError::WireType { field, wire });
            }
            if self.pcm_seen {
                return Err(DecodeError::PcmRepeated);
            }
            self.pcm_seen = true;
            self.state = State::Length { field };
            return Ok(());
        }
        self.keep(raw)?;
        self.state = match wire {
            0 => State::VarintValue { field },
            1 => self.fixed(field, 8)?,
            2 => State::Length { field },
            5 => self.fixed(field, 4)?,
            _ => return Err(DecodeError::WireType { field, wire }),
        };
        Ok(())
    }

    fn fixed(&self, field: u64, len: u64) -> Result<State, DecodeError> {
        if len > self.left {
            return Err(DecodeError::Overrun { field });
        }
        Ok(State::Copy { field, left: len })
    }

    fn length(
        &mut self,
        field: u64,
        len: u64,
        raw: &[u8],
        out: &mut Vec<Event>,
    ) -> Result<(), DecodeError> {
        if len > self.left {
            return Err(DecodeError::Overrun { field });
        }
        if field == PCM_FIELD {
            self.before_pcm = self.fields.len();
            out.push(Event::PcmStart {
                len,
                last: len == self.left,
            });
            self.state = self.after_field(len, |left| State::Pcm { left });
            return Ok(());
        }
        self.keep(raw)?;
        self.state = self.after_field(len, |left| State::Copy { field, left });
        Ok(())
    }

    /// The state once a field has `left` bytes to go: `more(left)`, or the next key, or the
    /// end of the message.
    fn after_field(&self, left: u64, more: impl FnOnce(u64) -> State) -> State {
        if left > 0 {
            more(left)
        } else if self.left == 0 {
            State::Done
        } else {
            State::Key
        }
    }

    fn consumed(&mut self, n: u64) {
        self.left = self.left.saturating_sub(n);
    }

    fn keep(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        if self.fields.len().saturating_add(bytes.len()) > FIELDS_CAP {
            return Err(DecodeError::FieldsTooLarge);
        }
        self.fields.extend_from_slice(bytes);
        Ok(())
    }

    fn current_field(&self) -> u64 {
        match self.state {
            State::VarintValue { field } | State::Length { field } | State::Copy { field, .. } => {
                field
            }
            State::Pcm { .. } => PCM_FIELD,
            _ => 0,
        }
    }
}

/// `bytes`, whole fields, decoded.
fn decode_fields(bytes: &[u8]) -> Result<PutChunkRequest, DecodeError> {
    PutChunkRequest::decode(bytes).map_err(|e| DecodeError::Fields(e.to_string()))
}

/// The value of a complete varint (at most 10 bytes, the last without its high bit); `None`
/// when it overflows 64 bits.
fn varint_value(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate() {
        let part = u64::from(b & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        value |= part << (7 * i);
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_proto::uploader::ChunkId;

    fn request(pcm: &[u8]) -> PutChunkRequest {
        PutChunkRequest {
            id: Some(ChunkId {
                uid: "alice".into(),
                session: "walk-1".into(),
                seq: 3,
            }),
            sample_rate: 16_000,
            chunk_samples: 960_000,
            first_sample: 2_880_000,
            pcm: Bytes::copy_from_slice(pcm),
            crc32c: 0x1234_5678,
            layout: 0,
            start_time: 0.0,
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        body
    }

    /// Decodes `body` pushed in pieces of `step` bytes: (fields, pcm, whether the PCM started
    /// after the CRC32C field).
    fn decode(body: &[u8], step: usize) -> Result<(PutChunkRequest, Vec<u8>), DecodeError> {
        let mut d = PutDecoder::new(1 << 20);
        let mut events = Vec::new();
        let mut pcm = Vec::new();
        for piece in body.chunks(step.max(1)) {
            d.push(Bytes::copy_from_slice(piece), &mut events)?;
            for e in events.drain(..) {
                match e {
                    Event::PcmStart { len, .. } => assert_eq!(pcm.len() as u64, 0, "{len}"),
                    Event::Pcm(b) => pcm.extend_from_slice(&b),
                }
            }
        }
        Ok((d.finish()?, pcm))
    }

    #[test]
    fn the_generated_encoding_decodes_in_any_pieces() {
        let req = request(&[1, 2, 3, 4, 5, 6]);
        let body = framed(&req.encode_to_vec());
        for step in [1, 2, 3, 7, 64, body.len()] {
            let (fields, pcm) = decode(&body, step).unwrap();
            assert_eq!(pcm, req.pcm.to_vec());
            assert_eq!(
                fields,
                PutChunkRequest {
                    pcm: Bytes::new(),
                    ..req.clone()
                }
            );
        }
    }

    #[test]
    fn the_pcm_last_encoding_announces_every_other_field_first() {
        let req = request(&[9; 4000]);
        let head = PutChunkRequest {
            pcm: Bytes::new(),
            ..req.clone()
        };
        let mut message = Vec::new();
        spillway_proto::split::encode_head(&head, 5, req.pcm.len(), &mut message);
        message.extend_from_slice(&req.pcm);
        let mut d = PutDecoder::new(1 << 20);
        let mut events = Vec::new();
        d.push(Bytes::from(framed(&message)), &mut events).unwrap();
        assert_eq!(
            events[0],
            Event::PcmStart {
                len: 4000,
                last: true
            }
        );
        assert_eq!(d.fields_before_pcm().unwrap(), head);
        assert_eq!(d.finish().unwrap(), head);
    }

    #[test]
    fn refusals_are_precise() {
        let good = framed(&request(&[1, 2]).encode_to_vec());
        let mut compressed = good.clone();
        compressed[0] = 1;
        assert_eq!(decode(&compressed, 3), Err(DecodeError::Compressed(1)));
        let mut huge = good.clone();
        huge[1..5].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(matches!(
            decode(&huge, 9),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(
            decode(&good[..good.len() - 1], 4),
            Err(DecodeError::Truncated { missing: 1 })
        );
        assert_eq!(
            decode(&good[..3], 4),
            Err(DecodeError::Truncated { missing: 2 })
        );
        assert_eq!(decode(&[], 4), Err(DecodeError::NoMessage));
        let mut twice = good.clone();
        twice.extend_from_slice(&good);
        assert_eq!(decode(&twice, 5), Err(DecodeError::Trailing));
        // pcm twice, a group, a length past the end, field 0.
        assert_eq!(
            decode(&framed(&[0x2a, 1, 0, 0x2a, 1, 0]), 2),
            Err(DecodeError::PcmRepeated)
        );
        assert_eq!(
            decode(&framed(&[0x1b, 0]), 1),
            Err(DecodeError::WireType { field: 3, wire: 3 })
        );
        assert_eq!(
            decode(&framed(&[0x2a, 9, 0]), 1),
            Err(DecodeError::Overrun { field: 5 })
        );
        assert_eq!(
            decode(&framed(&[0x02, 0]), 1),
            Err(DecodeError::FieldNumber)
        );
        assert_eq!(
            decode(&framed(&[0x10, 0x80]), 1),
            Err(DecodeError::Overrun { field: 2 })
        );
        assert_eq!(
            decode(
                &framed(
                    &[0x10; 1]
                        .iter()
                        .chain(&[0xff; 11])
                        .copied()
                        .collect::<Vec<_>>()
                ),
                1
            ),
            Err(DecodeError::Varint)
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_the_fields_are_capped() {
        // An unknown field 20 (a newer ingest's), length-delimited, before the PCM.
        let req = request(&[7, 7]);
        let mut message = vec![0xa2, 0x01, 3, b'n', b'e', b'w'];
        message.extend_from_slice(&req.encode_to_vec());
        let (fields, pcm) = decode(&framed(&message), 2).unwrap();
        assert_eq!(pcm, vec![7, 7]);
        assert_eq!(fields.id, req.id);
        let mut big = vec![0xa2, 0x01];
        prost::encoding::encode_varint(FIELDS_CAP as u64, &mut big);
        big.resize(big.len() + FIELDS_CAP, 0);
        assert_eq!(
            decode(&framed(&big), 4096),
            Err(DecodeError::FieldsTooLarge)
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Any request, its fields (and an unknown one) in any order, cut anywhere: the same
        /// fields and PCM as prost decoding the whole, and `last` exactly when the PCM ends it.
        #[test]
        fn any_order_and_any_cut_decode_as_prost_does(
            seq in any::<u64>(),
            crc in any::<u32>(),
            rate in any::<u32>(),
            pcm in proptest::collection::vec(any::<u8>(), 0..3000),
            order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle(),
            keep in 0usize..=6,
            cuts in proptest::collection::vec(1usize..500, 1..20),
        ) {
            let order = &order[..keep];
            let mut req = request(&pcm);
            if let Some(id) = req.id.as_mut() {
                id.seq = seq;
            }
            req.crc32c = crc;
            req.sample_rate = rate;
            // Each field encoded on its own, then laid out in `order` (a field left out is absent).
            let one = |r: PutChunkRequest| r.encode_to_vec();
            let parts = [
                one(PutChunkRequest { id: req.id.clone(), ..Default::default() }),
                one(PutChunkRequest { sample_rate: rate, chunk_samples: 960_000, ..Default::default() }),
                one(PutChunkRequest { first_sample: 7, ..Default::default() }),
                one(PutChunkRequest { pcm: req.pcm.clone(), ..Default::default() }),
                one(PutChunkRequest { crc32c: crc, layout: 1, start_time: 1.5, ..Default::default() }),
                vec![0xa2, 0x01, 2, 0xde, 0xad],
            ];
            let message: Vec<u8> = order.iter().flat_map(|&i| parts[i].clone()).collect();
            let whole = PutChunkRequest::decode(message.as_slice()).unwrap();
            let body = framed(&message);
            let mut d = PutDecoder::new(1 << 20);
            let (mut events, mut got, mut at, mut last) = (Vec::new(), Vec::new(), 0, None);
            for cut in cuts.iter().cycle() {
                if at >= body.len() {
                    break;
                }
                let end = (at + cut).min(body.len());
                d.push(Bytes::copy_from_slice(&body[at..end]), &mut events).unwrap();
                at = end;
                for e in events.drain(..) {
                    match e {
                        Event::PcmStart { last: l, .. } => last = Some(l),
                        Event::Pcm(b) => got.extend_from_slice(&b),
                    }
                }
            }
            let fields = d.finish().unwrap();
            prop_assert_eq!(&got[..], &whole.pcm[..]);
            prop_assert_eq!(fields, PutChunkRequest { pcm: Bytes::new(), ..whole });
            let pcm_last = !pcm.is_empty() && order.last() == Some(&3);
            if !pcm.is_empty() && order.contains(&3) {
                prop_assert_eq!(last, Some(pcm_last));
            }
        }
    }
}
