//! One Omi listen connection: frames through [`OmiStream`], chunks through the memory budget to
//! the forwarder, 201s once what came before them is committed, and a close code at the end.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use spillway_core::omi::timeline::{Action, Cut, Ignore, OmiChunk, OmiStream};
use spillway_core::omi::{CloseRefusal, ConversationId, close, frame, query::ListenParams};
use spillway_proto::uploader::{ChunkId, Layout, PutChunkRequest};
use spillway_proto::validate::key_millis;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::Front;
use super::upstream::Relay;
use crate::budget::Reservation;
use crate::feed::{self, Budgeted, Stopped};
use crate::fill::FillTimer;
use crate::forward::ForwardError;
use crate::metrics::{CodeLabel, EndLabel, Metrics};

pub(super) type Sink = Arc<Mutex<SplitSink<WebSocket, Message>>>;

/// Close code for a connection refused at a session limit: "try again later".
const TRY_AGAIN_LATER: u16 = 1013;

/// What the reading half hands the forwarding half, in order. One at a time (a channel of one):
/// the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// A finished chunk and the budget it was filled under.
    Chunk(OmiChunk, Option<Reservation>),
    /// A 104: answered with a 201 once every chunk before it is committed.
    Processed(ConversationId),
}

/// How the read loop ended.
enum End {
    /// The peer closed, or its stream ended.
    Peer,
    /// Ingest closes with this code and reason.
    Close(u16, String),
    /// The transport failed; nothing more can be sent.
    Transport,
}

impl End {
    /// The forwarding half gave up on a chunk: listen should resend.
    fn forward_failed() -> Self {
        End::Close(
            close::RECEIVE_TIMEOUT,
            "the uploader refused a chunk; resend".into(),
        )
    }

    fn shutting_down() -> Self {
        End::Close(
            close::GOING_AWAY,
            "ingest is shutting down; audio so far was stored".into(),
        )
    }

    fn reason(&self) -> &'static str {
        match self {
            End::Peer => "finished",
            End::Close(close::GOING_AWAY, _) => "shutdown",
            End::Close(close::RECEIVE_TIMEOUT, _) => "idle",
            End::Close(_, _) => "refused",
            End::Transport => "transport",
        }
    }
}

pub(super) async fn run(
    socket: WebSocket,
    params: Result<ListenParams, CloseRefusal>,
    query: String,
    front: Arc<Front>,
) {
    let shared = &front.shared;
    let (sink, stream) = socket.split();
    let sink: Sink = Arc::new(Mutex::new(sink));
    let params = match params {
        Ok(params) => params,
        Err(refusal) => {
            tracing::warn!(code = refusal.code, reason = %refusal.reason, "Omi connection refused");
            return close(&sink, &shared.metrics, refusal.code, &refusal.reason).await;
        }
    };
    let Ok(_permit) = Arc::clone(&shared.sessions).try_acquire_owned() else {
        return close(
            &sink,
            &shared.metrics,
            TRY_AGAIN_LATER,
            "ingest is at its session limit; retry later",
        )
        .await;
    };
    let Ok(_uid_slot) = shared.uids.try_take(&params.uid) else {
        return close(
            &sink,
            &shared.metrics,
            TRY_AGAIN_LATER,
            "this uid has its most sessions open (--max-sessions-per-uid); retry later",
        )
        .await;
    };
    shared.metrics.omi_connections.inc();
    shared.metrics.sessions_active.inc();
    tracing::info!(uid = %params.uid, sample_rate = params.sample_rate,
        client_kind = %params.client_kind, timeline = ?params.timeline, "Omi session accepted");
    let mut end = if params.acks_timeline()
        && send(&sink, Message::Binary(Bytes::from(frame::timeline_ack())))
            .await
            .is_err()
    {
        End::Transport
    } else {
        End::Peer
    };

    let fatal = CancellationToken::new();
    let (tx, rx) = mpsc::channel::<Item>(1);
    let forwarding = tokio::spawn(forward_loop(
        Arc::clone(&front),
        params.clone(),
        rx,
        Arc::clone(&sink),
        fatal.clone(),
    ));
    if !matches!(end, End::Transport) {
        // The relay to --omi-upstream, if any, lives as long as the read loop.
        let relay = front.upstream.as_ref().map(|up| {
            up.start(
                &query,
                &params.uid,
                Arc::clone(&sink),
                &shared.tasks,
                shared.shutdown.clone(),
            )
        });
        end = read_loop(&front, &params, stream, &tx, relay.as_ref(), &fatal).await;
    }
    drop(tx);
    let forwarded = forwarding.await.unwrap_or(Err(ForwardError::Abandoned));
    if let Err(e) = &forwarded {
        tracing::error!(uid = %params.uid, error = %e, "Omi session's audio not all committed");
        end = match e {
            ForwardError::Abandoned => End::Close(
                close::GOING_AWAY,
                "ingest shut down before every chunk was committed; resend".into(),
            ),
            ForwardError::Refused(_) => End::forward_failed(),
        };
    }
    tracing::info!(uid = %params.uid, reason = end.reason(), "Omi session ended");
    shared.metrics.session_ended(end.reason());
    match end {
        End::Transport => {}
        End::Peer => close(&sink, &shared.metrics, close::NORMAL, "").await,
        End::Close(code, reason) => close(&sink, &shared.metrics, code, &reason).await,
    }
}

/// Reads frames until the connection ends; on every way out but a broken forwarder, the audio
/// received so far is handed over as a last chunk.
async fn read_loop(
    front: &Front,
    params: &ListenParams,
    mut stream: SplitStream<WebSocket>,
    tx: &mpsc::Sender<Item>,
    relay: Option<&Relay>,
    fatal: &CancellationToken,
) -> End {
    let shared = &front.shared;
    let metrics = &shared.metrics;
    let mut omi = OmiStream::for_params(params, shared.limits.chunk_seconds);
    let mut reserved: Option<Reservation> = None;
    let mut fill = FillTimer::new(shared.chunk_fill_timeout);
    // The loss bound (`--omi-commit-every`): unlike the fill deadline, no wait excuses it.
    let mut commit = FillTimer::new(front.config.commit_every);
    let from = Budgeted {
        budget: &shared.budget,
        shutdown: &shared.shutdown,
        fatal,
    };
    let receive_timeout = front.config.receive_timeout;
    let end = 'read: loop {
        let commit_at = commit.deadline();
        let fill_at = match (fill.deadline(), commit_at) {
            (Some(f), Some(c)) => Some(f.min(c)),
            (f, c) => f.or(c),
        }
        .map(tokio::time::Instant::from_std);
        let next = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break End::shutting_down(),
            () = fatal.cancelled() => break End::forward_failed(),
            () = sleep_until(fill_at) => {
                // A chunk whose first byte is --omi-commit-every old, or open past
                // --chunk-fill-timeout, is stored as it is; the connection goes on, and its next
                // audio starts a new chunk.
                let why = if commit_at.is_some_and(|c| c <= std::time::Instant::now()) {
                    "commit_every"
                } else {
                    "fill_timeout"
                };
                if let Some(chunk) = omi.finish()
                    && hand_over(tx, chunk, why, reserved.take(), metrics, fatal, &mut fill).await.is_err()
                {
                    break End::forward_failed();
                }
                fill = FillTimer::new(shared.chunk_fill_timeout);
                commit = FillTimer::new(front.config.commit_every);
                continue;
            }
            r = tokio::time::timeout(receive_timeout, stream.next()) => r,
        };
        let data = match next {
            Err(_elapsed) => {
                break End::Close(
                    close::RECEIVE_TIMEOUT,
                    format!("no frame for {receive_timeout:?}"),
                );
            }
            Ok(None | Some(Ok(Message::Close(_)))) => break End::Peer,
            Ok(Some(Err(e))) => {
                tracing::info!(uid = %params.uid, error = %e, "Omi connection failed");
                break End::Transport;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(_)))) => {
                break End::Close(
                    close::MALFORMED,
                    "text frames are not part of the protocol; every frame is binary".into(),
                );
            }
            Ok(Some(Ok(Message::Binary(data)))) => data,
        };
        let frame = match frame::decode(&data) {
            Ok(frame) => frame,
            Err(refusal) => break End::Close(refusal.code, refusal.reason.into_owned()),
        };
        if let Some(relay) = relay {
            relay.offer(&frame, &data);
        }
        if let frame::Frame::Unknown(op) = frame {
            metrics.omi_unknown_opcodes.inc();
            tracing::debug!(op, "Omi frame with an unknown opcode ignored");
        }
        // A reconnect: audio an earlier connection of this capture accepted is a replay.
        if let frame::Frame::Conversation(id) = &frame
            && omi.end_time().is_none()
            && let Some(end) =
                front
                    .timelines
                    .get(&params.uid, id.as_str(), std::time::Instant::now())
        {
            omi.continue_after(end);
        }
        for action in omi.on_frame(&frame) {
            match action {
                Action::Chunk(chunk) => {
                    let why = cut_label(chunk.cut);
                    // The run ended: nothing is open, so neither deadline runs.
                    let now = std::time::Instant::now();
                    fill.fed(now, true, 0);
                    commit.fed(now, true, 0);
                    if hand_over(tx, chunk, why, reserved.take(), metrics, fatal, &mut fill)
                        .await
                        .is_err()
                    {
                        break 'read End::forward_failed();
                    }
                }
                Action::Append(range) => {
                    metrics.audio_bytes.inc_by(range.len() as u64);
                    let mut rest = match &frame {
                        frame::Frame::Audio(audio) => audio.pcm().get(range).unwrap_or_default(),
                        _ => &[],
                    };
                    while !rest.is_empty() {
                        let (taken, chunk) =
                            match feed::step(&mut omi, rest, &mut reserved, &mut fill, &from).await
                            {
                                Ok(fed) => fed,
                                Err(Stopped::Shutdown) => {
                                    break 'read End::shutting_down();
                                }
                                Err(Stopped::Fatal) => {
                                    break 'read End::forward_failed();
                                }
                            };
                        rest = rest.get(taken..).unwrap_or_default();
                        commit.fed(
                            std::time::Instant::now(),
                            chunk.is_some(),
                            omi.pending_bytes(),
                        );
                        if let Some((chunk, held)) = chunk
                            && hand_over(tx, chunk, "full", held, metrics, fatal, &mut fill)
                                .await
                                .is_err()
                        {
                            break 'read End::forward_failed();
                        }
                    }
                }
                Action::Ignored { reason, bytes } => {
                    let reason = match reason {
                        Ignore::NoConversation => "no_conversation",
                        Ignore::Replay => "replay",
                        Ignore::Overlap => "overlap",
                    };
                    ignored(metrics, reason, bytes);
                }
                Action::Conflict { bytes } => {
                    tracing::warn!(uid = %params.uid, bytes,
                        "Omi audio replayed with other bytes than first received; the first kept");
                    ignored(metrics, "conflict", bytes);
                }
                Action::Unverified { bytes } => ignored(metrics, "unverified", bytes),
                Action::Process { conversation_id } => {
                    // With an upstream, listen gets the pusher's 201 instead (upstream.rs).
                    if relay.is_none()
                        && let Some(id) = conversation_id
                        && tx.send(Item::Processed(id)).await.is_err()
                    {
                        break 'read End::forward_failed();
                    }
                }
            }
        }
        if matches!(frame, frame::Frame::Audio(_)) {
            remember(front, params, &omi);
        }
    };
    remember(front, params, &omi);
    if !fatal.is_cancelled()
        && let Some(chunk) = omi.finish()
    {
        let _ = hand_over(
            tx,
            chunk,
            "disconnect",
            reserved.take(),
            metrics,
            fatal,
            &mut fill,
        )
        .await;
    }
    end
}

/// Remembers where this connection's accepted audio ends, for a reconnect of the same capture.
fn remember(front: &Front, params: &ListenParams, omi: &OmiStream) {
    if let (Some(conversation), Some(end)) = (omi.conversation(), omi.end_time()) {
        front.timelines.put(
            &params.uid,
            conversation.as_str(),
            end,
            std::time::Instant::now(),
        );
    }
}

/// Sends a finished chunk, with the reservation it was filled under, to the forwarding half;
/// waits while the one before is still being committed (not held against the fill deadline).
async fn hand_over(
    tx: &mpsc::Sender<Item>,
    chunk: OmiChunk,
    why: &'static str,
    reservation: Option<Reservation>,
    metrics: &Metrics,
    fatal: &CancellationToken,
    fill: &mut FillTimer,
) -> Result<(), ()> {
    metrics
        .omi_chunks_cut
        .get_or_create(&EndLabel { reason: why })
        .inc();
    let waited = tokio::time::Instant::now();
    let sent = tokio::select! {
        r = tx.send(Item::Chunk(chunk, reservation)) => r.map_err(|_| ()),
        () = fatal.cancelled() => Err(()),
    };
    fill.excuse(waited.elapsed());
    sent
}

fn cut_label(cut: Cut) -> &'static str {
    match cut {
        Cut::Full => "full",
        Cut::Gap => "gap",
        Cut::ConversationChanged => "conversation",
        Cut::Processed => "processed",
        Cut::Disconnect => "disconnect",
    }
}

fn ignored(metrics: &Metrics, reason: &'static str, bytes: usize) {
    metrics
        .omi_ignored_bytes
        .get_or_create(&EndLabel { reason })
        .inc_by(bytes as u64);
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Commits each chunk through the forwarder, in order, and answers each 104 after the chunks
/// before it. Stops at the first chunk refused for good (`fatal` then stops the reading half).
async fn forward_loop(
    front: Arc<Front>,
    params: ListenParams,
    mut rx: mpsc::Receiver<Item>,
    sink: Sink,
    fatal: CancellationToken,
) -> Result<(), ForwardError> {
    let shared = &front.shared;
    let metrics = &shared.metrics;
    let chunk_samples = u64::from(shared.limits.chunk_seconds) * u64::from(params.sample_rate);
    while let Some(item) = rx.recv().await {
        let (chunk, reservation) = match item {
            Item::Chunk(chunk, reservation) => (chunk, reservation),
            Item::Processed(id) => {
                let reply = Message::Binary(Bytes::from(frame::process_result(&id)));
                if tokio::time::timeout(Duration::from_secs(10), send(&sink, reply))
                    .await
                    .is_err()
                {
                    tracing::info!(uid = %params.uid, "listen not reading; a 201 dropped");
                }
                continue;
            }
        };
        let Some(request) = request_of(&params.uid, chunk_samples, &chunk) else {
            // The timeline checks every timestamp; a start outside 0..2^32 s cannot get here.
            let status = tonic::Status::invalid_argument(format!(
                "chunk start {} is not a Unix time a key can name",
                chunk.start
            ));
            fatal.cancel();
            return Err(ForwardError::Refused(status));
        };
        metrics.chunks_forwarded.inc();
        match shared.forwarder.send(&request, &shared.abandon).await {
            Ok(response) => {
                metrics.chunks_acked.inc();
                metrics.acked_bytes.inc_by(chunk.pcm.len() as u64);
                if response.crc32c != chunk.crc32c {
                    tracing::error!(uid = %params.uid, key = %response.key,
                        "the uploader committed other bytes than ingest sent");
                }
                tracing::debug!(uid = %params.uid, key = %response.key, "Omi chunk committed");
            }
            Err(e) => {
                tracing::error!(uid = %params.uid, conversation = %chunk.conversation_id.as_str(),
                    start = chunk.start, error = %e, "Omi chunk not committed");
                fatal.cancel();
                return Err(e);
            }
        }
        drop((chunk, reservation));
    }
    Ok(())
}

/// The `PutChunk` of an Omi chunk: its id is (uid, conversation, start in key milliseconds), so
/// a chunk replayed after a reconnect (timeline version 2) is the same chunk.
fn request_of(uid: &str, chunk_samples: u64, chunk: &OmiChunk) -> Option<PutChunkRequest> {
    let seq = key_millis(chunk.start)?;
    Some(PutChunkRequest {
        id: Some(ChunkId {
            uid: uid.to_owned(),
            session: chunk.conversation_id.as_str().to_owned(),
            seq,
        }),
        sample_rate: chunk.sample_rate,
        chunk_samples,
        first_sample: seq.checked_mul(chunk_samples)?,
        pcm: chunk.pcm.clone(),
        crc32c: chunk.crc32c,
        layout: Layout::Omi.into(),
        start_time: chunk.start,
    })
}

pub(super) async fn send(sink: &Sink, msg: Message) -> Result<(), axum::Error> {
    sink.lock().await.send(msg).await
}

/// Sends a close frame (code and reason) and counts it.
async fn close(sink: &Sink, metrics: &Metrics, code: u16, reason: &str) {
    metrics
        .omi_closes
        .get_or_create(&CodeLabel {
            code: code.to_string(),
        })
        .inc();
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let mut sink = sink.lock().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.close().await;
    })
    .await;
}
