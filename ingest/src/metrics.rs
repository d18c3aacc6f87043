//! Ingest's Prometheus metrics, registered into a registry passed in (no global state).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a refusal: the protocol error code sent to the device.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Label of an outcome (an upstream connection attempt).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Label of how a session ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabel {
    pub reason: &'static str,
}

/// Seconds from a chunk's first `PutChunk` attempt until an uploader committed it, in buckets
/// from 1 ms to 33 s (a commit on a fast disk up to failovers and backoff while uploaders
/// refuse).
#[derive(Debug, Clone)]
pub struct AckSeconds(pub Histogram);

impl Default for AckSeconds {
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.001, 2.0, 16)))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub connections: Counter,
    pub handshake_failures: Counter,
    pub sessions_active: Gauge,
    pub sessions_ended: Family<EndLabel, Counter>,
    pub refusals: Family<CodeLabel, Counter>,
    pub audio_bytes: Counter,
    pub chunks_forwarded: Counter,
    pub chunks_acked: Counter,
    pub acked_bytes: Counter,
    pub ack_seconds: AckSeconds,
    pub forward_retries: Counter,
    pub forward_failovers: Counter,
    pub uploader_endpoints: Gauge,
    pub uploader_endpoints_healthy: Gauge,
    pub uploader_resolve_failures: Counter,
    pub budget_bytes: Gauge,
    pub buffered_bytes: Gauge,
    pub budget_waits: Counter,
    pub idle_connections_closed: Counter,
    pub connections_refused: Family<EndLabel, Counter>,
    pub quic_retries: Counter,
    /// The Omi WebSocket front end (`--omi-listen`).
    pub omi_connections: Counter,
    pub omi_closes: Family<CodeLabel, Counter>,
    pub omi_ignored_bytes: Family<EndLabel, Counter>,
    pub omi_unknown_opcodes: Counter,
    pub omi_chunks_cut: Family<EndLabel, Counter>,
    /// The relay to an upstream Omi pusher (`--omi-upstream`).
    pub omi_upstream_frames: Counter,
    pub omi_upstream_dropped_frames: Family<EndLabel, Counter>,
    pub omi_upstream_connects: Family<ResultLabel, Counter>,
    pub omi_upstream_replies: Family<EndLabel, Counter>,
    pub omi_upstream_queued_bytes: Gauge,
    pub omi_upstream_breaker_state: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("spillway_ingest");
        r.register(
            "connections",
            "QUIC connections accepted",
            m.connections.clone(),
        );
        r.register(
            "handshake_failures",
            "QUIC connections that failed their handshake (bad ALPN, bad TLS)",
            m.handshake_failures.clone(),
        );
        r.register(
            "sessions_active",
            "Audio sessions open now",
            m.sessions_active.clone(),
        );
        r.register(
            "sessions_ended",
            "Audio sessions ended, by reason",
            m.sessions_ended.clone(),
        );
        r.register(
            "refusals",
            "Sessions or frames refused, by protocol error code",
            m.refusals.clone(),
        );
        r.register(
            "audio_bytes",
            "PCM bytes received from devices",
            m.audio_bytes.clone(),
        );
        r.register(
            "chunks_forwarded",
            "Chunks handed to the uploader",
            m.chunks_forwarded.clone(),
        );
        r.register(
            "chunks_acked",
            "Chunks the uploader durably committed",
            m.chunks_acked.clone(),
        );
        r.register(
            "acked_bytes",
            "PCM bytes the uploader durably committed",
            m.acked_bytes.clone(),
        );
        r.register(
            "ack_seconds",
            "Time from a chunk's first PutChunk attempt until an uploader committed it (failovers, retries and backoff included): ingest's part of a device's wait for the chunk's Ack",
            m.ack_seconds.0.clone(),
        );
        r.register(
            "forward_retries",
            "PutChunk attempts that failed and were retried",
            m.forward_retries.clone(),
        );
        r.register(
            "forward_failovers",
            "PutChunk attempts refused by one uploader and sent on to the next",
            m.forward_failovers.clone(),
        );
        r.register(
            "uploader_endpoints",
            "Uploader endpoints known (the --uploader URLs and every address of each dns:// name)",
            m.uploader_endpoints.clone(),
        );
        r.register(
            "uploader_endpoints_healthy",
            "Uploader endpoints not cooling down after a refusal; 0 means backpressure reaches the devices",
            m.uploader_endpoints_healthy.clone(),
        );
        r.register(
            "uploader_resolve_failures",
            "Lookups of a dns:// uploader name that failed or found no address (the last answer is kept)",
            m.uploader_resolve_failures.clone(),
        );
        r.register(
            "budget_bytes",
            "Memory budget for audio not yet committed by the uploader (--max-buffered-bytes)",
            m.budget_bytes.clone(),
        );
        r.register(
            "buffered_bytes",
            "Bytes of the budget reserved now (chunks being filled or on their way to the uploader)",
            m.buffered_bytes.clone(),
        );
        r.register(
            "budget_waits",
            "Times a session stopped reading because the memory budget was spent",
            m.budget_waits.clone(),
        );
        r.register(
            "idle_connections_closed",
            "Connections closed for having no session open for the idle timeout",
            m.idle_connections_closed.clone(),
        );
        r.register(
            "connections_refused",
            "QUIC connections refused before their handshake: reason total (--max-connections) or per_source (--max-connections-per-ip)",
            m.connections_refused.clone(),
        );
        r.register(
            "quic_retries",
            "QUIC connection attempts asked to prove their address first (retry), sent once ingest holds half of --max-connections",
            m.quic_retries.clone(),
        );
        r.register(
            "omi_connections",
            "Omi pusher WebSocket connections accepted (--omi-listen), after authentication",
            m.omi_connections.clone(),
        );
        r.register(
            "omi_closes",
            "Omi WebSocket connections closed by ingest, by close code (1000 normal, 1001 shutdown, 1003 malformed frame, 1008 bad query, 1011 receive timeout, 1013 at a session limit), or before the upgrade (401 no bearer token, upgrade_timeout not upgraded within --hello-timeout)",
            m.omi_closes.clone(),
        );
        r.register(
            "omi_ignored_bytes",
            "Omi audio bytes not stored, by reason: no_conversation (before any 103), replay and overlap (timeline v2: audio already accepted), conflict (replayed bytes that differ from the audio held), unverified (replayed bytes no longer held to compare)",
            m.omi_ignored_bytes.clone(),
        );
        r.register(
            "omi_unknown_opcodes",
            "Omi frames with an opcode this front end does not know (ignored)",
            m.omi_unknown_opcodes.clone(),
        );
        r.register(
            "omi_chunks_cut",
            "Omi chunks finished, by why: full, gap (v2, over 1 ms), conversation (a 103 named another), processed (104), disconnect, fill_timeout",
            m.omi_chunks_cut.clone(),
        );
        r.register(
            "omi_upstream_frames",
            "Omi frames relayed to the upstream pusher (--omi-upstream)",
            m.omi_upstream_frames.clone(),
        );
        r.register(
            "omi_upstream_dropped_frames",
            "Omi frames not relayed to the upstream pusher, by reason: queue_full (the oldest, to make room under --omi-upstream-queue-bytes), upstream_down (still queued when the session ended, or lost with a broken upstream connection)",
            m.omi_upstream_dropped_frames.clone(),
        );
        r.register(
            "omi_upstream_connects",
            "Connection attempts to the upstream pusher, by result: ok, failed, timeout, breaker_open (not tried: the endpoint's circuit breaker is open)",
            m.omi_upstream_connects.clone(),
        );
        r.register(
            "omi_upstream_replies",
            "Messages from the upstream pusher, by what became of them: relayed (a 201, to listen), undelivered (a 201 listen did not take: gone, or not reading for 10 s), timeline_ack (a 202, dropped: ingest sent its own), other (dropped)",
            m.omi_upstream_replies.clone(),
        );
        r.register(
            "omi_upstream_queued_bytes",
            "Bytes of Omi frames waiting to be relayed upstream, all sessions together",
            m.omi_upstream_queued_bytes.clone(),
        );
        r.register(
            "omi_upstream_breaker_state",
            "The upstream pusher's circuit breaker: 0 closed, 1 half-open, 2 open",
            m.omi_upstream_breaker_state.clone(),
        );
        m
    }

    /// A session (of either front end) ended for `reason`.
    pub fn session_ended(&self, reason: &'static str) {
        self.sessions_active.dec();
        self.sessions_ended
            .get_or_create(&EndLabel { reason })
            .inc();
    }

    pub fn refused(&self, code: spillway_proto::device::ErrorCode) {
        self.refusals
            .get_or_create(&CodeLabel {
                code: code.as_str_name().to_owned(),
            })
            .inc();
    }
}
