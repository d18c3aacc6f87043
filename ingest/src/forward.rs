//! Hands chunks to the uploaders over gRPC. A chunk goes to its session's preferred healthy
//! uploader ([`crate::balance`]); one that is unreachable, shutting down (`UNAVAILABLE`) or full
//! (`RESOURCE_EXHAUSTED`) is skipped and the chunk goes to the next. Only when every uploader
//! refuses does the forwarder back off (jittered, exponential) and try them all again, so only
//! then does backpressure reach the devices. It keeps going until an uploader commits the chunk,
//! one refuses it for good, or the session gives up (shutdown grace ran out).
//!
//! Any uploader may take any chunk: ids and object keys are deterministic, so a chunk committed
//! by two uploaders (its ack was lost on the way back from the first) becomes one object.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use spillway_proto::uploader::{ChunkId, Layout, PutChunkRequest, PutChunkResponse};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use spillway_proto::link::Link;

use crate::balance::{Balancer, Cooldown};
use crate::chunker::Chunk;
use crate::metrics::Metrics;
use crate::session::Params;

/// Why a chunk could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// An uploader refused the chunk for good (a bug or a version mismatch, never load).
    #[error("uploader refused the chunk: {0}")]
    Refused(tonic::Status),
    /// The session stopped waiting (shutdown grace ran out).
    #[error("gave up waiting for the uploader")]
    Abandoned,
}

/// Where uploaders are: one URL, or a DNS name whose every address is an uploader (a
/// Kubernetes headless Service), re-resolved periodically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://host:port` or `https://host:port`: one endpoint.
    Url(String),
    /// `dns://host:port`: every address the name resolves to, on that port.
    Dns { host: String, port: u16 },
}

/// A `--uploader` value that is neither form.
#[derive(Debug, thiserror::Error)]
#[error(
    "--uploader must be http://HOST:PORT, https://HOST:PORT or dns://NAME:PORT (every address of NAME), got {0:?}"
)]
pub struct BadTarget(String);

impl FromStr for Target {
    type Err = BadTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadTarget(s.to_owned());
        if let Some(rest) = s.strip_prefix("dns://") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse::<u16>().map_err(|_| bad())?;
            if host.is_empty() || port == 0 || host.contains('/') {
                return Err(bad());
            }
            return Ok(Self::Dns {
                host: host.to_owned(),
                port,
            });
        }
        let uri: http::Uri = s.parse().map_err(|_| bad())?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(Self::Url(s.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(url) => f.write_str(url),
            Self::Dns { host, port } => write!(f, "dns://{host}:{port}"),
        }
    }
}

/// A cheap-to-clone handle on the uploaders.
#[derive(Clone, Debug)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    targets: Vec<Target>,
    /// Plaintext, or mutual TLS with this name expected of every uploader's certificate
    /// (`None`: the host the endpoint names; a `dns://` name for each of its addresses).
    link: Link,
    server_name: Option<String>,
    balancer: Mutex<Balancer<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The last good answer of each DNS target, kept while a lookup fails.
    resolved: Mutex<HashMap<String, Vec<SocketAddr>>>,
    attempt_timeout: Duration,
    message_limit: usize,
    metrics: Metrics,
}

/// Codes worth trying elsewhere or again: the uploader is away, full or slow. Anything else is
/// a refusal.
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        status.code(),
        Unavailable
            | ResourceExhausted
            | DeadlineExceeded
            | Aborted
            | Unknown
            | Internal
            | Cancelled
    )
}

impl Forwarder {
    /// Connects lazily: ingest starts even when no uploader is up yet. `dns://` targets have no
    /// endpoint until [`Forwarder::refresh`] resolves them.
    pub fn new(
        targets: Vec<Target>,
        link: Link,
        server_name: Option<String>,
        chunk_seconds: u32,
        attempt_timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, tonic::transport::Error> {
        // The largest chunk is chunk_seconds at the highest sample rate; leave room for the
        // envelope.
        let message_limit = spillway_proto::validate::max_chunk_bytes(chunk_seconds) + 64 * 1024;
        let forwarder = Self {
            inner: Arc::new(Inner {
                targets,
                link,
                server_name,
                balancer: Mutex::new(Balancer::new(Cooldown::default())),
                channels: Mutex::default(),
                resolved: Mutex::default(),
                attempt_timeout,
                message_limit,
                metrics,
            }),
        };
        forwarder.install(forwarder.endpoints(&HashMap::new()))?;
        Ok(forwarder)
    }

    /// The endpoint URLs the targets name, given the DNS answers, each with the name its
    /// uploader's certificate must carry.
    fn endpoints(&self, resolved: &HashMap<String, Vec<SocketAddr>>) -> Vec<(String, String)> {
        let scheme = match self.inner.link {
            Link::Tls(_) => "https",
            Link::Insecure => "http",
        };
        let named = |host: &str| {
            self.inner
                .server_name
                .clone()
                .unwrap_or_else(|| host.to_owned())
        };
        let mut urls = Vec::new();
        for target in &self.inner.targets {
            match target {
                Target::Url(url) => {
                    let host = url
                        .parse::<http::Uri>()
                        .ok()
                        .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
                        .unwrap_or_default();
                    urls.push((url.clone(), named(&host)));
                }
                Target::Dns { host, .. } => {
                    let addrs = resolved.get(&target.to_string()).into_iter().flatten();
                    urls.extend(addrs.map(|a| (format!("{scheme}://{a}"), named(host))));
                }
            }
        }
        urls
    }

    /// Makes `urls` the endpoint set: new ones get a lazy channel, gone ones are forgotten (a
    /// put in flight on one finishes on its own clone).
    fn install(&self, endpoints: Vec<(String, String)>) -> Result<(), tonic::transport::Error> {
        let mut channels = self.inner.channels.lock();
        let mut next = HashMap::new();
        let mut urls = Vec::with_capacity(endpoints.len());
        for (url, server_name) in endpoints {
            let channel = match channels.remove(&url) {
                Some(c) => c,
                None => {
                    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())?
                        .connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true)
                        .initial_stream_window_size(spillway_proto::GRPC_STREAM_WINDOW)
                        .initial_connection_window_size(spillway_proto::GRPC_CONNECTION_WINDOW);
                    if let Link::Tls(tls) = &self.inner.link {
                        endpoint = endpoint.tls_config(tls.client(&server_name))?;
                    }
                    endpoint.connect_lazy()
                }
            };
            next.insert(url.clone(), channel);
            urls.push(url);
        }
        *channels = next;
        let mut balancer = self.inner.balancer.lock();
        balancer.set(urls);
        self.gauge(&balancer);
        Ok(())
    }

    fn gauge(&self, balancer: &Balancer<String>) {
        let m = &self.inner.metrics;
        m.uploader_endpoints
            .set(i64::try_from(balancer.len()).unwrap_or(i64::MAX));
        m.uploader_endpoints_healthy
            .set(i64::try_from(balancer.healthy(Instant::now())).unwrap_or(i64::MAX));
    }

    /// Resolves every `dns://` target again and updates the endpoint set. A failed or empty
    /// lookup keeps that target's last good answer (a DNS hiccup must not strand the chunks).
    pub async fn refresh(&self) {
        let mut changed = false;
        for target in &self.inner.targets {
            let Target::Dns { host, port } = target else {
                continue;
            };
            let name = target.to_string();
            let answer = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map(|addrs| {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    addrs
                });
            let mut resolved = self.inner.resolved.lock();
            match answer {
                Ok(addrs) if !addrs.is_empty() => {
                    if resolved.get(&name) != Some(&addrs) {
                        tracing::info!(target = %name, endpoints = ?addrs, "uploader endpoints changed");
                        resolved.insert(name, addrs);
                        changed = true;
                    }
                }
                Ok(_) => {
                    self.inner.metrics.uploader_resolve_failures.inc();
                    tracing::warn!(target = %name, kept = ?resolved.get(&name),
                        "uploader name resolved to no address; keeping the last answer");
                }
                Err(e) => {
                    self.inner.metrics.uploader_resolve_failures.inc();
                    tracing::warn!(target = %name, error = %e, kept = ?resolved.get(&name),
                        "resolving the uploader name failed; keeping the last answer");
                }
            }
        }
        if changed {
            let urls = self.endpoints(&self.inner.resolved.lock());
            if let Err(e) = self.install(urls) {
                tracing::error!(error = %e, "an uploader address is not a valid endpoint");
            }
        } else {
            self.gauge(&self.inner.balancer.lock());
        }
    }

    /// Re-resolves the `dns://` targets every `every` until `stop`.
    pub async fn keep_refreshed(self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => self.refresh().await,
                () = stop.cancelled() => return,
            }
        }
    }

    /// Puts one chunk of a QUIC session (the WAV layout), trying the uploaders in its session's
    /// order, until one commits it, one refuses it for good, or `give_up` fires.
    pub async fn put(
        &self,
        params: &Params,
        chunk: &Chunk,
        give_up: &CancellationToken,
    ) -> Result<PutChunkResponse, ForwardError> {
        let request = PutChunkRequest {
            id: Some(ChunkId {
                uid: params.uid.clone(),
                session: params.session.clone(),
                seq: chunk.seq,
            }),
            sample_rate: params.sample_rate,
            chunk_samples: params.chunk_samples,
            first_sample: chunk.first_sample,
            crc32c: chunk.crc32c,
            pcm: chunk.pcm.clone(),
            layout: Layout::Wav.into(),
            start_time: 0.0,
        };
        self.send(&request, give_up).await
    }

    /// Puts one request, trying the uploaders in the order of its (uid, session), until one
    /// commits it, one refuses it for good, or `give_up` fires.
    pub async fn send(
        &self,
        request: &PutChunkRequest,
        give_up: &CancellationToken,
    ) -> Result<PutChunkResponse, ForwardError> {
        let id = request.id.clone().unwrap_or_default();
        let (uid, session, seq) = (&id.uid, &id.session, id.seq);
        let affinity = format!("{uid}/{session}");
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        let m = &self.inner.metrics;
        let started = Instant::now();
        loop {
            let order = self.inner.balancer.lock().order(&affinity, Instant::now());
            let tried = order.len();
            for (i, url) in order.into_iter().enumerate() {
                let Some(mut channel) = self.inner.channels.lock().get(&url).cloned() else {
                    continue;
                };
                let call = crate::put_chunk::put_chunk(
                    &mut channel,
                    request,
                    self.inner.attempt_timeout,
                    self.inner.message_limit,
                );
                let outcome = tokio::select! {
                    r = call => r,
                    () = give_up.cancelled() => return Err(ForwardError::Abandoned),
                };
                match outcome {
                    Ok(response) => {
                        m.ack_seconds.0.observe(started.elapsed().as_secs_f64());
                        let mut balancer = self.inner.balancer.lock();
                        balancer.succeeded(&url, Instant::now());
                        self.gauge(&balancer);
                        return Ok(response);
                    }
                    Err(status) if !transient(&status) => {
                        return Err(ForwardError::Refused(status));
                    }
                    Err(status) => {
                        m.forward_retries.inc();
                        let cooldown = {
                            let mut balancer = self.inner.balancer.lock();
                            let c = balancer.refused(&url, Instant::now());
                            self.gauge(&balancer);
                            c
                        };
                        let next = i + 1 < tried;
                        if next {
                            m.forward_failovers.inc();
                        }
                        tracing::warn!(uid = %uid, session = %session,
                            seq, uploader = %url, code = ?status.code(),
                            message = status.message(), ?cooldown, failover = next,
                            "PutChunk failed");
                    }
                }
            }
            if tried == 0 {
                tracing::warn!(uid = %uid, session = %session, seq,
                    targets = ?self.inner.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "no uploader endpoint known yet; waiting");
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = give_up.cancelled() => return Err(ForwardError::Abandoned),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploader_targets_parse_or_say_why_not() {
        assert_eq!(
            "http://127.0.0.1:50051".parse::<Target>().ok(),
            Some(Target::Url("http://127.0.0.1:50051".into()))
        );
        assert_eq!(
            "dns://spillway-uploader:50051".parse::<Target>().ok(),
            Some(Target::Dns {
                host: "spillway-uploader".into(),
                port: 50051
            })
        );
        for bad in [
            "spillway-uploader:50051",
            "dns://spillway-uploader",
            "dns://:50051",
            "dns://x:0",
            "dns://x:99999",
            "grpc://x:1",
            "http://",
        ] {
            let e = bad.parse::<Target>().err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("dns://NAME:PORT")),
                "{bad}: {e:?}"
            );
        }
    }
}
