//! What a rogue client does, for the trust tests (and the attack rows to come): calls that
//! hold a server's resources while sending as little as they can.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

/// A request body that sends `first` and then never another byte (and never ends).
struct Trickle {
    first: Option<Bytes>,
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// Starts a `PutChunk` on `channel` whose body stops after the 5-byte gRPC message header
/// (announcing a 50 kB message, under any uploader's limit): the call stays in flight until the uploader gives up on it.
/// Resolves to the gRPC status the uploader answers with (from the headers or trailers).
pub async fn trickling_put(mut channel: tonic::transport::Channel) -> anyhow::Result<tonic::Code> {
    use tower::{Service as _, ServiceExt as _};
    let mut header = vec![0u8];
    header.extend_from_slice(&50_000u32.to_be_bytes());
    let body = tonic::body::Body::new(Trickle {
        first: Some(Bytes::from(header)),
    });
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("http://uploader/spillway.uploader.v1.Uploader/PutChunk")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(body)?;
    let response = channel.ready().await?.call(request).await?;
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from)
    };
    if let Some(code) = status(response.headers()) {
        return Ok(code);
    }
    let mut body = response.into_body();
    loop {
        let Some(frame) =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await
        else {
            anyhow::bail!("the answer ended without a gRPC status");
        };
        if let Ok(trailers) = frame?.into_trailers()
            && let Some(code) = status(&trailers)
        {
            return Ok(code);
        }
    }
}
