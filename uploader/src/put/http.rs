//! `PutChunk` over HTTP/2 by hand: the request body decoded as it arrives ([`PutDecoder`]), the
//! PCM streamed to the spool when it is the message's last field, the answer framed as gRPC.
//!
//! Served through tonic's router ([`Server`] is a `NamedService`), so the transport's layers
//! apply as to any tonic service: mutual TLS, the `--put-timeout` deadline on the whole call,
//! the cap on calls in flight (`crate::admission`), HTTP/2 flow control.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use prost::Message;
use spillway_proto::checksum::Crc32c;
use spillway_proto::uploader::{PutChunkRequest, PutChunkResponse};
use tonic::Status;

use super::decode::{DecodeError, Event, PutDecoder};
use super::{Service, refuse};
use crate::spool::Incoming;

/// The method's path.
pub const PATH: &str = "/spillway.uploader.v1.Uploader/PutChunk";

/// The `Uploader` gRPC service, for tonic's router.
#[derive(Clone)]
pub struct Server(pub Arc<Service>);

impl tonic::server::NamedService for Server {
    const NAME: &'static str = "spillway.uploader.v1.Uploader";
}

type Answer =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for Server
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            if request.uri().path() != PATH {
                let status = Status::unimplemented(format!(
                    "{} is not a method of this uploader",
                    request.uri().path()
                ));
                return Ok(status.into_http());
            }
            Ok(match service.receive(request.into_body()).await {
                Ok(answer) => respond(&answer),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A successful call's response: the message, then `grpc-status: 0` in the trailers.
fn respond(answer: &PutChunkResponse) -> http::Response<tonic::body::Body> {
    let mut message = BytesMut::with_capacity(5 + answer.encoded_len());
    message.put_u8(0);
    // A key and two integers: far under 4 GiB.
    message.put_u32(u32::try_from(answer.encoded_len()).unwrap_or(u32::MAX));
    answer.encode_raw(&mut message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(message.freeze())),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// What became of the PCM field so far.
enum Pcm {
    /// Not begun (or absent).
    None,
    /// Streamed to the spool: the put's key and the CRC32C of the bytes handed over.
    Streamed {
        incoming: Incoming,
        key: String,
        crc: Crc32c,
        started: std::time::Instant,
    },
    /// Gathered whole: the field does not end the message (or its fields fail a check, which
    /// the whole message then answers); holds one of the few permits for that.
    Gathered(BytesMut, tokio::sync::OwnedSemaphorePermit),
}

impl Service {
    /// Reads, checks and commits one `PutChunk` request body.
    async fn receive<B>(&self, mut body: B) -> Result<PutChunkResponse, Status>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut decoder = PutDecoder::new(self.max_message());
        let mut events = Vec::new();
        let mut pcm = Pcm::None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                self.refused(refuse(
                    "body",
                    Status::cancelled(format!("reading the PutChunk request: {e}")),
                ))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            decoder
                .push(data, &mut events)
                .map_err(|e| self.malformed(&e))?;
            for event in events.drain(..) {
                match event {
                    Event::PcmStart { len, last } => {
                        pcm = self.start(&decoder, len, last)?;
                    }
                    Event::Pcm(bytes) => match &mut pcm {
                        Pcm::Streamed { incoming, crc, .. } => {
                            crc.update(&bytes);
                            if !incoming.pcm(bytes).await {
                                // The spool stopped early (full, or an I/O error): answer now.
                                return self.stopped(pcm).await;
                            }
                        }
                        Pcm::Gathered(buf, _) => buf.extend_from_slice(&bytes),
                        Pcm::None => {}
                    },
                }
            }
        }
        let fields = decoder.finish().map_err(|e| self.malformed(&e))?;
        match pcm {
            Pcm::Streamed {
                incoming,
                key,
                crc,
                started,
            } => {
                // The PCM ended the message: `fields` are the ones checked at its start.
                if let Err(refusal) = Self::check_crc(fields.crc32c, crc.value()) {
                    let _ = incoming.abort().await;
                    return Err(self.refused(refusal));
                }
                let outcome = incoming.commit().await;
                self.answer(key, fields.crc32c, outcome, started)
            }
            Pcm::Gathered(buf, _permit) => {
                self.put(PutChunkRequest {
                    pcm: buf.freeze(),
                    ..fields
                })
                .await
            }
            Pcm::None => self.put(fields).await,
        }
    }

    /// The PCM field begins, `len` bytes: streamed when it ends the message and the fields
    /// before it pass every check but the checksum; else gathered (and checked whole).
    fn start(&self, decoder: &PutDecoder, len: u64, last: bool) -> Result<Pcm, Status> {
        let fields = decoder
            .fields_before_pcm()
            .map_err(|e| self.malformed(&e))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if last && let Ok(head) = self.check_fields(&fields, len) {
            let key = self.template.key_for(&self.prefix, &head, self.omi_sealed);
            return Ok(Pcm::Streamed {
                incoming: self.spool.incoming(head, len),
                key,
                crc: Crc32c::default(),
                started: std::time::Instant::now(),
            });
        }
        let permit = Arc::clone(&self.gathered.0)
            .try_acquire_owned()
            .map_err(|_| {
                self.refused(refuse(
                    "too_many_gathered",
                    Status::resource_exhausted(format!(
                        "this put's pcm is not the last field of its message, and {} such puts \
                         (gathered whole in memory) are in flight; send the pcm last, as ingest does",
                        super::Gathered::MAX
                    )),
                ))
            })?;
        // The decoder bounds `len` by the message, and the message by `max_message`.
        Ok(Pcm::Gathered(
            BytesMut::with_capacity(len.min(self.max_message())),
            permit,
        ))
    }

    /// The answer when the spool stopped receiving before the PCM's end.
    async fn stopped(&self, pcm: Pcm) -> Result<PutChunkResponse, Status> {
        let Pcm::Streamed {
            incoming,
            key,
            started,
            ..
        } = pcm
        else {
            return Err(Status::internal("no streamed put to stop"));
        };
        // The writer stops early only on an error, which `abort` returns.
        let outcome = incoming.abort().await.and_then(|()| {
            Err(crate::spool::SpoolError::Task(
                "the spool's writer stopped early without an error".into(),
            ))
        });
        self.answer(key, 0, outcome, started)
    }

    /// Counts, logs and answers a request that is not one acceptable message.
    fn malformed(&self, e: &DecodeError) -> Status {
        self.refused(refuse(e.reason(), Status::new(e.code(), e.to_string())))
    }
}
