//! `PutChunk` without a second copy of the audio.
//!
//! tonic's generated client encodes each request into one buffer before sending it: a second
//! copy of the chunk for as long as it is in flight, and 8.6 % of ingest's CPU in row 4 of the
//! benchmarks. This sends the very same gRPC message as two HTTP/2 body frames instead: the
//! 5-byte gRPC prefix, every field but the PCM, and the PCM's key and length; then the PCM
//! `Bytes` the chunk already holds. The uploader cannot tell the difference (field order is
//! free in protobuf), and the answer is read with tonic's own decoder, so statuses, trailers,
//! deadlines (the channel's timeout layer reads `grpc-timeout`) and message limits behave as
//! with the generated client.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use spillway_proto::split;
use spillway_proto::uploader::{PutChunkRequest, PutChunkResponse};
use tonic::Status;
use tonic::codec::{Codec, Streaming};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

/// The method's path, as the generated client sends it.
const PATH: &str = "/spillway.uploader.v1.Uploader/PutChunk";

/// `PutChunkRequest.pcm`'s field number.
const PCM_FIELD: u32 = 5;

/// The request as a gRPC message in two pieces; concatenated, they are a valid length-prefixed,
/// uncompressed message that decodes to `request`.
pub fn frames(request: &PutChunkRequest) -> Result<[Bytes; 2], Status> {
    let pcm = request.pcm.clone();
    let head = PutChunkRequest {
        pcm: Bytes::new(),
        ..request.clone()
    };
    let len = u32::try_from(split::encoded_len(&head, PCM_FIELD, pcm.len()))
        .map_err(|_| Status::out_of_range("a PutChunk message over 4 GiB"))?;
    let mut buf = BytesMut::with_capacity(5 + head.encoded_len() + 16);
    buf.put_u8(0); // not compressed
    buf.put_u32(len);
    split::encode_head(&head, PCM_FIELD, pcm.len(), &mut buf);
    Ok([buf.freeze(), pcm])
}

/// Calls `PutChunk` on `channel` with `request`, giving up after `timeout`; answers no larger
/// than `max_message` are accepted.
pub async fn put_chunk(
    channel: &mut Channel,
    request: &PutChunkRequest,
    timeout: Duration,
    max_message: usize,
) -> Result<PutChunkResponse, Status> {
    let [head, pcm] = frames(request)?;
    let body = http_body_util::StreamBody::new(futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(head)),
        Ok(Frame::data(pcm)),
    ]));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(PATH)
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        // At most 8 digits, as gRPC allows.
        .header(
            "grpc-timeout",
            format!("{}m", timeout.as_millis().clamp(1, 99_999_999)),
        )
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building the PutChunk request: {e}")))?;
    let ready = channel
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("uploader channel not ready: {e}")))?;
    let response = ready
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A refusal may come as headers alone ("trailers-only"), with no message.
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let status_code = response.status();
    let decoder = tonic_prost::ProstCodec::<PutChunkRequest, PutChunkResponse>::default().decoder();
    let mut answer = Streaming::new_response(
        decoder,
        response.into_body(),
        status_code,
        None,
        Some(max_message),
    );
    let message = answer
        .message()
        .await?
        .ok_or_else(|| Status::internal("the uploader answered PutChunk with no message"))?;
    // Reading on to the end surfaces an error status sent in the trailers.
    answer.trailers().await?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_proto::uploader::ChunkId;

    fn request(pcm: &'static [u8]) -> PutChunkRequest {
        PutChunkRequest {
            id: Some(ChunkId {
                uid: "u".into(),
                session: "s".into(),
                seq: 7,
            }),
            sample_rate: 16_000,
            chunk_samples: 960_000,
            first_sample: 7 * 960_000,
            pcm: Bytes::from_static(pcm),
            crc32c: crc32c::crc32c(pcm),
            ..Default::default()
        }
    }

    #[test]
    fn the_two_frames_are_the_message_tonic_would_send_and_the_pcm_is_not_copied() {
        for pcm in [&b""[..], b"ab", &[7u8; 300_000]] {
            let req = request(pcm);
            let [head, body] = frames(&req).unwrap();
            let whole = [&head[..], &body[..]].concat();
            assert_eq!(whole[0], 0, "uncompressed");
            let len = u32::from_be_bytes([whole[1], whole[2], whole[3], whole[4]]) as usize;
            assert_eq!(len, whole.len() - 5);
            assert_eq!(PutChunkRequest::decode(&whole[5..]).unwrap(), req);
            assert_eq!(
                len,
                req.encoded_len(),
                "same length as prost's own encoding"
            );
            if !pcm.is_empty() {
                assert_eq!(body.as_ptr(), req.pcm.as_ptr(), "the chunk's own bytes");
            }
        }
    }
}
