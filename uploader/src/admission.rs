//! A hard cap on `PutChunk` calls in flight (`--max-puts-in-flight`), whoever sends them and
//! however many ingests there are: a call beyond it is answered `RESOURCE_EXHAUSTED` at once,
//! before its body is read, and counted. ingest treats that as it treats a full spool: it
//! sends the chunk to another uploader or holds it and retries, which pushes back on devices.
//!
//! Each call in flight streams its PCM to disk and holds about 1.5 MiB
//! ([`crate::put::STREAMED_CALL_BYTES`]; a few gathered whole hold a chunk, `put/http.rs`), so
//! the uploader's memory is bounded by its own flags (deploy/README.md, "Memory"), not by the
//! size of the ingest fleet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// The layer: one permit per call in flight.
#[derive(Clone)]
pub struct PutsInFlight {
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

impl PutsInFlight {
    pub fn new(max: usize, metrics: Metrics) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for PutsInFlight {
    type Service = Capped<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Capped {
            inner,
            permits: Arc::clone(&self.permits),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service behind [`PutsInFlight`].
#[derive(Clone)]
pub struct Capped<S> {
    inner: S,
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

type Answer<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Capped<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.metrics.rejected("too_many_in_flight");
            tracing::warn!(
                reason = "too_many_in_flight",
                "PutChunk refused: --max-puts-in-flight calls are in flight"
            );
            let status = tonic::Status::resource_exhausted(
                "the uploader has --max-puts-in-flight calls in flight; retry or try another uploader",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            drop(permit);
            response
        })
    }
}
