//! Encoding a message whose one large `bytes` field travels on its own.
//!
//! A chunk's PCM is megabytes; the rest of its message is a few dozen bytes. Encoding the
//! whole message into one buffer copies the PCM once more only to write it out again. Instead
//! [`encode_head`] encodes the rest with the field's key and length, and the caller sends or
//! writes the PCM after it as it is (an HTTP/2 frame of its own, the second slice of a
//! vectored write). Protobuf lets fields come in any order, so the two together decode to the
//! whole message.

use bytes::BufMut;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// Appends `head` (a message whose field number `field` is left empty), then the key and length
/// of `field` for a `tail_len`-byte value. Followed by those bytes, it is an encoding of `head`
/// with `field` set to them; an empty value is omitted, as protobuf omits it.
pub fn encode_head(head: &impl Message, field: u32, tail_len: usize, buf: &mut impl BufMut) {
    head.encode_raw(buf);
    if tail_len > 0 {
        encode_key(field, WireType::LengthDelimited, buf);
        encode_varint(tail_len as u64, buf);
    }
}

/// Bytes of the whole encoding: [`encode_head`]'s and the value's.
pub fn encoded_len(head: &impl Message, field: u32, tail_len: usize) -> usize {
    let tail = if tail_len == 0 {
        0
    } else {
        key_len(field) + encoded_len_varint(tail_len as u64) + tail_len
    };
    head.encoded_len() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uploader::{ChunkId, PutChunkRequest};
    use bytes::Bytes;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn head_then_value_decodes_to_the_whole_message(
            pcm in proptest::collection::vec(any::<u8>(), 0..70_000),
            seq in any::<u64>(),
            crc in any::<u32>(),
            omi in any::<bool>(),
        ) {
            let whole = PutChunkRequest {
                id: Some(ChunkId { uid: "u".into(), session: "s".into(), seq }),
                sample_rate: 16_000,
                chunk_samples: 960_000,
                first_sample: seq / 2,
                pcm: Bytes::from(pcm.clone()),
                crc32c: crc,
                // Fields numbered after the PCM's go in the head too.
                layout: i32::from(omi),
                start_time: if omi { 1_786_961_845.727 } else { 0.0 },
            };
            let head = PutChunkRequest { pcm: Bytes::new(), ..whole.clone() };
            let mut buf = Vec::new();
            encode_head(&head, 5, pcm.len(), &mut buf);
            buf.extend_from_slice(&pcm);
            prop_assert_eq!(buf.len(), encoded_len(&head, 5, pcm.len()));
            prop_assert_eq!(buf.len(), whole.encoded_len());
            prop_assert_eq!(PutChunkRequest::decode(&buf[..]).unwrap(), whole);
        }
    }
}
