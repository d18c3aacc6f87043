//! Length-delimited framing of the device protocol: a 4-byte big-endian length, then that many
//! bytes of one protobuf message.

use tokio_util::codec::LengthDelimitedCodec;

/// Default largest frame, length prefix excluded.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;

/// The codec both ends of a device stream use; frames over `max_frame_bytes` are a decode error.
pub fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}
