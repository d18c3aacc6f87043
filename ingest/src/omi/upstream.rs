//! The relay to the real Omi pusher (`--omi-upstream`). Spillway stores the audio (the pusher's
//! "private cloud sync"); everything else the pusher does (webhooks, apps, transcripts,
//! conversation processing) stays with it, so each listen session gets one WebSocket of its own
//! to `{upstream}/v1/trigger/listen?{the query listen sent}`.
//!
//! - What goes up: every client frame but audio, in the order read (100, 102 to 105, unknown
//!   opcodes), audio (101) too with `--omi-upstream-audio`. Each is copied into a buffer of its
//!   own: a `Bytes` view would keep alive the whole WebSocket read buffer it was cut from
//!   (tungstenite splits messages out of one), so queued heartbeats could hold many times the
//!   queue's bytes; the copy makes the bound below the memory held.
//! - The queue: one per session, bounded by bytes (`--omi-upstream-queue-bytes`). A push never
//!   waits: the oldest frames are dropped to make room (`queue_full`); what is still queued when
//!   the session ends, or is lost with a broken connection, is `upstream_down`. The last 103 to
//!   leave the queue (sent or dropped) is sent first on every new connection, so the audio after
//!   a reconnect, or after a dropped 103, lands in its conversation.
//! - Connecting: jittered exponential backoff per session, and one circuit breaker per upstream
//!   endpoint shared by every session ([`Upstream`], held by the front end): after [`BREAKER`]'s
//!   consecutive failures no session tries until it lets one probe through, so a pusher that is
//!   down is not hammered by every session at once (Omi's #6022 retry storm).
//! - What comes back: a 201 goes to listen through the session's sink. A 202 is dropped (ingest
//!   sent its own before the relay started); anything else is counted and dropped.
//! - The 104 and its 201: with an upstream, ingest sends no 201 of its own and listen gets the
//!   pusher's. A 201 is the result of conversation processing, which the pusher runs and
//!   Spillway does not, and listen takes it as the answer to its pending 104: a 201 from ingest
//!   would either come twice or stand in for the pusher's. The audio before a 104 is committed
//!   all the same; a 104 the relay drops, or one the pusher never answers, leaves listen without
//!   a 201, as a pusher that is down would.
//!
//! **Invariant: the durable path never waits for the upstream.** The read loop's only call
//! here is [`Relay::offer`], a copy and a push under a short lock; connecting, sending and
//! replying run in the relay's own task. An upstream that is down, slow or stalled costs dropped
//! relay frames, never a stalled session or a dropped listen connection
//! (`xtask/kit/tests/omi_upstream.rs` measures the time to store with and without a dead one).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::ws::Message;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt as _, StreamExt as _};
use parking_lot::Mutex;
use spillway_breaker::{Breaker, Config as BreakerConfig, Decision};
use spillway_core::omi::frame::{Frame, opcode};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message as Up;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::UpstreamConfig;
use super::session::{Sink, send};
use crate::metrics::{EndLabel, Metrics, ResultLabel};

/// The breaker of the upstream endpoint: 5 consecutive failed connects (all sessions together)
/// open it for 2 s, doubled after each failed probe up to a minute (listen's own breaker toward
/// the pusher opens for 60 s).
pub const BREAKER: BreakerConfig = BreakerConfig {
    failure_threshold: 5,
    open_for: Duration::from_secs(2),
    max_open_for: Duration::from_secs(60),
};
/// One connection attempt: TCP, TLS and the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One frame written upstream; past it the connection is taken for stalled and made anew.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// One reply written to listen.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connected relay may go on sending what is queued after its session ended.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// A connection that lived this long starts the backoff over when it breaks.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Backoff between one session's attempts (listen waits up to 15 s per try too).
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// The largest message read from upstream (a 201 is a small JSON).
const MAX_REPLY_BYTES: usize = 1024 * 1024;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One upstream endpoint, shared by every session of the front end.
pub(crate) struct Upstream {
    config: UpstreamConfig,
    /// `Some` for `wss://`: rustls with ingest's provider and the system's roots.
    tls: Option<tokio_tungstenite::Connector>,
    breaker: Mutex<Breaker>,
    metrics: Metrics,
}

impl Upstream {
    /// Errors when a `wss://` upstream finds no CA roots on this system.
    pub(crate) fn new(config: &UpstreamConfig, metrics: Metrics) -> anyhow::Result<Self> {
        let tls = if config.url.starts_with("wss://") {
            let tls = crate::tls::system_roots_client()
                .with_context(|| format!("--omi-upstream {}", config.url))?;
            Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls)))
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            tls,
            breaker: Mutex::new(Breaker::new(BREAKER)),
            metrics,
        })
    }

    /// Starts the relay of one listen session that sent `query`; it ends when the returned
    /// [`Relay`] is dropped (after up to [`FLUSH_GRACE`] of sending what is queued) or at
    /// `shutdown`.
    pub(crate) fn start(
        self: &Arc<Self>,
        query: &str,
        uid: &str,
        sink: Sink,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Relay {
        let queue = Arc::new(Queue::new(self.config.queue_bytes, self.metrics.clone()));
        let ended = CancellationToken::new();
        let task = Task {
            up: Arc::clone(self),
            url: url(&self.config.url, query),
            uid: uid.to_owned(),
            queue: Arc::clone(&queue),
            sink,
            ended: ended.clone(),
            shutdown,
        };
        tasks.spawn(task.run());
        Relay {
            queue,
            audio: self.config.audio,
            ended,
        }
    }

    /// Calls `f` on the shared breaker, then shows its state.
    fn breaker<T>(&self, f: impl FnOnce(&mut Breaker, Instant) -> T) -> T {
        let mut breaker = self.breaker.lock();
        let out = f(&mut breaker, Instant::now());
        let state = breaker.state().as_gauge();
        self.metrics.omi_upstream_breaker_state.set(state);
        out
    }

    /// Counts an attempt's result, and reports it to the breaker.
    fn attempted(&self, result: &'static str) {
        let m = &self.metrics.omi_upstream_connects;
        m.get_or_create(&ResultLabel { result }).inc();
        match result {
            "ok" => self.breaker(Breaker::on_success),
            "breaker_open" => {}
            _ => self.breaker(Breaker::on_failure),
        }
    }

    /// Tries until a connection is made, within the breaker and the session's backoff.
    async fn connect(
        &self,
        url: &str,
        uid: &str,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> Ws {
        loop {
            if let Decision::Reject { retry_at } = self.breaker(Breaker::check) {
                self.attempted("breaker_open");
                tokio::time::sleep_until(retry_at.into()).await;
                continue;
            }
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_REPLY_BYTES))
                .max_frame_size(Some(MAX_REPLY_BYTES));
            let tls = self.tls.clone();
            let connecting =
                tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, tls);
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok((ws, _))) => {
                    self.attempted("ok");
                    tracing::debug!(uid, "Omi upstream connected");
                    return ws;
                }
                Ok(Err(e)) => {
                    self.attempted("failed");
                    tracing::debug!(uid, error = %e, "Omi upstream connection failed");
                }
                Err(_elapsed) => self.attempted("timeout"),
            }
            tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
        }
    }
}

/// `{base}/v1/trigger/listen?{query}`.
fn url(base: &str, query: &str) -> String {
    let query = query.strip_prefix('?').unwrap_or(query);
    format!("{base}{}?{query}", super::ROUTE)
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The read loop's end of one session's relay. Dropping it ends the relay.
pub(crate) struct Relay {
    queue: Arc<Queue>,
    audio: bool,
    ended: CancellationToken,
}

impl Relay {
    /// Queues a copy of `message` (whose decoded form is `frame`) for the upstream if it is
    /// relayed. Never waits.
    pub(crate) fn offer(&self, frame: &Frame<'_>, message: &[u8]) {
        if self.audio || !matches!(frame, Frame::Audio(_)) {
            self.queue.push(Bytes::copy_from_slice(message));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.queue.close();
        self.ended.cancel();
    }
}

/// The frames waiting to go up, at most `cap` bytes of them.
struct Queue {
    held: Mutex<Held>,
    changed: Notify,
    cap: usize,
    metrics: Metrics,
}

#[derive(Default)]
struct Held {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
    /// The last 103 that left the queue, sent or dropped.
    context: Option<Bytes>,
}

fn opcode_of(message: &[u8]) -> Option<u32> {
    message.first_chunk::<4>().map(|op| u32::from_le_bytes(*op))
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Queue {
    fn new(cap: usize, metrics: Metrics) -> Self {
        Self {
            held: Mutex::new(Held::default()),
            changed: Notify::new(),
            cap,
            metrics,
        }
    }

    fn queued(&self, bytes: i64) {
        self.metrics.omi_upstream_queued_bytes.inc_by(bytes);
    }

    fn dropped(&self, reason: &'static str, frames: u64) {
        if frames > 0 {
            self.metrics
                .omi_upstream_dropped_frames
                .get_or_create(&EndLabel { reason })
                .inc_by(frames);
        }
    }

    /// Appends a frame, dropping the oldest until it fits (a frame larger than the whole queue
    /// is itself dropped).
    fn push(&self, frame: Bytes) {
        let mut dropped = 0;
        {
            let mut held = self.held.lock();
            if held.closed {
                return;
            }
            if frame.len() > self.cap {
                dropped += 1;
            } else {
                while held.bytes + frame.len() > self.cap {
                    let Some(old) = held.take() else { break };
                    self.queued(-signed(old.len()));
                    dropped += 1;
                }
                self.queued(signed(frame.len()));
                held.bytes += frame.len();
                held.frames.push_back(frame);
            }
        }
        self.dropped("queue_full", dropped);
        self.changed.notify_one();
    }

    /// The oldest frame; `None` once the queue is closed and empty.
    async fn next(&self) -> Option<Bytes> {
        loop {
            {
                let mut held = self.held.lock();
                if let Some(frame) = held.take() {
                    self.queued(-signed(frame.len()));
                    return Some(frame);
                }
                if held.closed {
                    return None;
                }
            }
            self.changed.notified().await;
        }
    }

    fn context(&self) -> Option<Bytes> {
        self.held.lock().context.clone()
    }

    /// No more pushes; what is queued may still be taken.
    fn close(&self) {
        self.held.lock().closed = true;
        self.changed.notify_one();
    }

    /// Drops everything queued, counted `upstream_down`.
    fn discard(&self) {
        let (frames, bytes) = {
            let mut held = self.held.lock();
            held.closed = true;
            let frames = held.frames.len() as u64;
            held.frames.clear();
            (frames, std::mem::take(&mut held.bytes))
        };
        self.queued(-signed(bytes));
        self.dropped("upstream_down", frames);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.discard();
    }
}

impl Held {
    /// Takes the oldest frame, remembering it when it names the conversation.
    fn take(&mut self) -> Option<Bytes> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.len();
        if opcode_of(&frame) == Some(opcode::CONVERSATION) {
            self.context = Some(frame.clone());
        }
        Some(frame)
    }
}

/// One session's relay task.
struct Task {
    up: Arc<Upstream>,
    url: String,
    uid: String,
    queue: Arc<Queue>,
    sink: Sink,
    ended: CancellationToken,
    shutdown: CancellationToken,
}

impl Task {
    async fn run(self) {
        let mut backoff = new_backoff();
        loop {
            let ws = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = self.ended.cancelled() => break,
                ws = self.up.connect(&self.url, &self.uid, &mut backoff) => ws,
            };
            let since = Instant::now();
            if self.pump(ws).await.is_break() {
                break;
            }
            if since.elapsed() >= STABLE_AFTER {
                backoff = new_backoff();
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = self.ended.cancelled() => break,
                () = tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)) => {}
            }
        }
        self.queue.discard();
    }

    /// Sends what is queued and relays what comes back. `Continue`: the connection broke while
    /// the session lives; `Break`: the session is over (and what was queued is sent, or
    /// [`FLUSH_GRACE`] is), or ingest shuts down.
    async fn pump(&self, ws: Ws) -> ControlFlow<()> {
        let (mut up, mut down) = ws.split();
        if let Some(context) = self.queue.context()
            && !self.write(&mut up, context).await
        {
            return ControlFlow::Continue(());
        }
        let flushed = async {
            self.ended.cancelled().await;
            tokio::time::sleep(FLUSH_GRACE).await;
        };
        tokio::pin!(flushed);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return goodbye(&mut up, CloseCode::Away).await,
                () = &mut flushed => return goodbye(&mut up, CloseCode::Normal).await,
                message = down.next() => match message {
                    Some(Ok(Up::Binary(reply))) => self.reply(reply).await,
                    Some(Ok(Up::Text(_))) => self.replied("other"),
                    Some(Ok(Up::Ping(_) | Up::Pong(_) | Up::Frame(_))) => {}
                    gone => {
                        tracing::info!(uid = %self.uid, ?gone, "Omi upstream connection ended");
                        return ControlFlow::Continue(());
                    }
                },
                frame = self.queue.next() => match frame {
                    Some(frame) => {
                        if !self.write(&mut up, frame).await {
                            return ControlFlow::Continue(());
                        }
                    }
                    None => return goodbye(&mut up, CloseCode::Normal).await,
                },
            }
        }
    }

    /// Writes one frame upstream; `false` (the frame counted lost) when the connection failed
    /// or stalled for [`SEND_TIMEOUT`].
    async fn write(&self, up: &mut Upward, frame: Bytes) -> bool {
        let sent = tokio::time::timeout(SEND_TIMEOUT, up.send(Up::Binary(frame))).await;
        if matches!(sent, Ok(Ok(()))) {
            self.up.metrics.omi_upstream_frames.inc();
            true
        } else {
            tracing::info!(uid = %self.uid, "Omi upstream not taking frames; reconnecting");
            self.queue.dropped("upstream_down", 1);
            false
        }
    }

    /// A message from the pusher: a 201 goes to listen, anything else is counted.
    async fn reply(&self, reply: Bytes) {
        match opcode_of(&reply) {
            Some(opcode::PROCESS_RESULT) => {
                let to_listen = send(&self.sink, Message::Binary(reply));
                if let Ok(Ok(())) = tokio::time::timeout(REPLY_TIMEOUT, to_listen).await {
                    self.replied("relayed");
                } else {
                    tracing::info!(uid = %self.uid, "listen gone or not reading; a pusher 201 dropped");
                    self.replied("undelivered");
                }
            }
            Some(opcode::TIMELINE_ACK) => self.replied("timeline_ack"),
            _ => self.replied("other"),
        }
    }

    fn replied(&self, reason: &'static str) {
        let replies = &self.up.metrics.omi_upstream_replies;
        replies.get_or_create(&EndLabel { reason }).inc();
    }
}

type Upward = SplitSink<Ws, Up>;

async fn goodbye(up: &mut Upward, code: CloseCode) -> ControlFlow<()> {
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), up.send(Up::Close(Some(frame)))).await;
    ControlFlow::Break(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(op: u32, payload: &[u8]) -> Bytes {
        let mut m = op.to_le_bytes().to_vec();
        m.extend_from_slice(payload);
        Bytes::from(m)
    }

    fn dropped(m: &Metrics, reason: &'static str) -> u64 {
        m.omi_upstream_dropped_frames
            .get_or_create(&EndLabel { reason })
            .get()
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_frames_and_keeps_the_conversation() {
        let m = Metrics::default();
        let q = Queue::new(100, m.clone());
        q.push(msg(103, b"conv-1"));
        for i in 0..10u8 {
            q.push(msg(101, &[i; 36]));
        }
        // 40-byte frames: two fit under 100 bytes, with the 10-byte 103 gone first.
        assert_eq!(dropped(&m, "queue_full"), 9);
        assert_eq!(m.omi_upstream_queued_bytes.get(), 80);
        assert_eq!(
            q.context(),
            Some(msg(103, b"conv-1")),
            "sent first next time"
        );
        assert_eq!(q.next().await, Some(msg(101, &[8; 36])));
        q.push(msg(101, &[0; 200]));
        assert_eq!(dropped(&m, "queue_full"), 10, "larger than the queue");
        q.push(msg(103, b"conv-2"));
        q.close();
        q.push(msg(100, b""));
        assert_eq!(q.next().await, Some(msg(101, &[9; 36])));
        assert_eq!(
            q.context(),
            Some(msg(103, b"conv-1")),
            "conv-2 not yet sent"
        );
        assert_eq!(q.next().await, Some(msg(103, b"conv-2")));
        assert_eq!(q.context(), Some(msg(103, b"conv-2")));
        assert_eq!(q.next().await, None, "closed and empty");
        assert_eq!(m.omi_upstream_queued_bytes.get(), 0);
    }

    #[tokio::test]
    async fn what_is_left_when_the_relay_ends_is_counted_upstream_down() {
        let m = Metrics::default();
        let q = Queue::new(1000, m.clone());
        for _ in 0..3 {
            q.push(msg(100, b""));
        }
        assert_eq!(q.next().await, Some(msg(100, b"")));
        drop(q);
        assert_eq!(dropped(&m, "upstream_down"), 2);
        assert_eq!(m.omi_upstream_queued_bytes.get(), 0);
    }

    #[test]
    fn audio_is_relayed_only_when_asked() {
        let m = Metrics::default();
        for audio in [false, true] {
            let relay = Relay {
                queue: Arc::new(Queue::new(1000, m.clone())),
                audio,
                ended: CancellationToken::new(),
            };
            for frame in [msg(101, &[0; 10]), msg(100, b"")] {
                let decoded = spillway_core::omi::frame::decode(&frame).unwrap();
                relay.offer(&decoded, &frame);
            }
            let held = relay.queue.held.lock().frames.len();
            assert_eq!(held, if audio { 2 } else { 1 });
        }
    }

    #[test]
    fn the_upstream_url_is_the_route_and_listens_query() {
        assert_eq!(
            url("ws://pusher:8080", "uid=a&sample_rate=16000"),
            "ws://pusher:8080/v1/trigger/listen?uid=a&sample_rate=16000"
        );
        assert_eq!(
            url("wss://p.example/base", "?uid=a"),
            "wss://p.example/base/v1/trigger/listen?uid=a"
        );
    }
}
