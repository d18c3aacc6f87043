//! The Omi pusher's WebSocket front end (`--omi-listen`): Omi's `listen` service points its
//! pusher URL here and changes nothing else. The protocol's rules are sans-IO in
//! [`spillway_core::omi`]; this module moves bytes, keeps time and reuses everything QUIC
//! sessions use: the session and per-uid slots, the memory budget ([`crate::feed`]), the
//! forwarder and the uploaders. Chunks are stored in Omi's layout (`chunks/{uid}/{conversation}/
//! {start}.batch.bin`, or `.batch.enc` when the uploader seals them).
//!
//! A connection's life:
//! 1. Before the upgrade: a connection slot under the caps QUIC connections share
//!    (`listener.rs`), for at most `--hello-timeout` unless it is upgraded, then the bearer token
//!    (`--omi-auth bearer`; 401 without it). Nothing is held for a request that fails it.
//! 2. After the upgrade: the query (uid, sample rate, timeline version; 1008 when bad), then a
//!    session slot and a slot of the uid's (1013, "try again later", at either limit), then 202
//!    when `audio_timeline=2` was asked.
//! 3. Frames, one at a time ([`session`]): a malformed one closes 1003, none for
//!    `--omi-receive-timeout` closes 1011, shutdown closes 1001; every close first stores the
//!    audio received so far. With `--omi-upstream`, a copy of each frame (audio only with
//!    `--omi-upstream-audio`) is offered to the session's relay to the real pusher
//!    ([`upstream`]), which never holds up the rest.

mod config;
mod listener;
mod resume;
mod session;
mod upstream;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use spillway_core::omi::query::ListenParams;
use tokio_util::sync::CancellationToken;

pub use config::{OmiArgs, OmiAuth, OmiAuthMode, OmiConfig, UpstreamConfig};
pub(crate) use upstream::Upstream;

use crate::metrics::CodeLabel;
use crate::server::Shared;

/// The route Omi's listen connects to.
pub const ROUTE: &str = "/v1/trigger/listen";

/// What the front end's connections share.
pub(crate) struct Front {
    pub shared: Arc<Shared>,
    pub config: OmiConfig,
    /// The real pusher sessions are relayed to (`--omi-upstream`), and its circuit breaker.
    pub upstream: Option<Arc<Upstream>>,
    /// Where recent captures' accepted audio ended, for reconnects.
    pub(crate) timelines: resume::Timelines,
}

impl Front {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: OmiConfig,
        upstream: Option<Arc<Upstream>>,
        max_sessions: usize,
    ) -> Self {
        Self {
            shared,
            config,
            upstream,
            timelines: resume::Timelines::new(
                max_sessions.saturating_mul(4),
                std::time::Duration::from_secs(600),
            ),
        }
    }
}

/// Serves the WebSocket on `listener` until `stop` fires; upgraded connections are tracked by
/// the daemon's task tracker, so shutdown waits for them to store their audio.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    connections: crate::admission::Connections,
    front: Arc<Front>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let capped = listener::Capped {
        inner: listener,
        slots: connections,
        metrics: front.shared.metrics.clone(),
        upgrade_within: front.shared.hello_timeout,
    };
    let app = axum::Router::new()
        .route(ROUTE, axum::routing::get(upgrade))
        .with_state(front)
        .into_make_service_with_connect_info::<listener::Upgraded>();
    axum::serve(capped, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn upgrade(
    State(front): State<Arc<Front>>,
    ConnectInfo(upgraded): ConnectInfo<listener::Upgraded>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let OmiAuth::Bearer(token) = &front.config.auth
        && !token.verify(
            headers
                .get(header::AUTHORIZATION)
                .map(axum::http::HeaderValue::as_bytes),
        )
    {
        front
            .shared
            .metrics
            .omi_closes
            .get_or_create(&CodeLabel { code: "401".into() })
            .inc();
        tracing::warn!("Omi connection refused: no valid bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <--omi-token-file's token> is needed\n",
        )
            .into_response();
    }
    let query = query.unwrap_or_default();
    let params = ListenParams::parse(&query);
    let max = front.shared.max_frame_bytes;
    let tasks = front.shared.tasks.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // A WebSocket now: the session's own deadlines apply, not the upgrade's.
            upgraded.mark();
            tasks.track_future(session::run(socket, params, query, front))
        })
}
