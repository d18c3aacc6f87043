//! The QUIC front end: accepts connections and streams, and drives one [`Session`] per stream.
//! Everything protocol-specific lives in [`crate::session`]; this file only moves bytes, keeps
//! time (idle timeout, shutdown grace) and writes replies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use spillway_proto::device::{Accepted, Ack, ErrorCode, ServerMessage, server_message::Kind};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{Budget, Reservation};
use crate::chunker::Chunk;
use crate::forward::{ForwardError, Forwarder};
use crate::metrics::{EndLabel, Metrics};
use crate::session::{Limits, Output, Params, Refusal, Session};

/// What every session task shares.
pub(crate) struct Shared {
    pub limits: Limits,
    pub forwarder: Forwarder,
    pub budget: Budget,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    pub max_frame_bytes: usize,
    pub sessions: Arc<Semaphore>,
    /// Fires when ingest is shutting down: sessions stop reading and flush.
    pub shutdown: CancellationToken,
    /// Fires once the shutdown grace has passed: forwarders stop waiting for the uploader.
    pub abandon: CancellationToken,
    pub tasks: TaskTracker,
}

type Writer = Arc<Mutex<FramedWrite<quinn::SendStream, LengthDelimitedCodec>>>;

async fn send(writer: &Writer, kind: Kind) -> std::io::Result<()> {
    let msg = ServerMessage { kind: Some(kind) };
    writer
        .lock()
        .await
        .send(Bytes::from(msg.encode_to_vec()))
        .await
}

/// Handles one QUIC connection: every bidirectional stream is one session.
pub(crate) async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            shared.metrics.handshake_failures.inc();
            tracing::warn!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    shared.metrics.connections.inc();
    tracing::debug!(%remote, "connection accepted");
    // A connection with no session open for the idle timeout is closed: a flood of connections
    // that never send cannot pin ingest's memory (the seed's ghost connections held 15 MiB each).
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ended = Arc::new(tokio::sync::Notify::new());
    loop {
        let idle = active.load(std::sync::atomic::Ordering::Acquire) == 0;
        let (tx, rx) = tokio::select! {
            r = conn.accept_bi() => match r {
                Ok(streams) => streams,
                Err(e) => {
                    tracing::debug!(%remote, reason = %e, "connection ended");
                    return;
                }
            },
            () = tokio::time::sleep(shared.idle_timeout), if idle => {
                shared.metrics.idle_connections_closed.inc();
                tracing::info!(%remote, "closing a connection with no session for the idle timeout");
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::IdleTimeout as u32),
                    b"no session within the idle timeout",
                );
                return;
            }
            () = ended.notified() => continue,
            () = shared.shutdown.cancelled() => return,
        };
        let (shared2, active2, ended2) =
            (Arc::clone(&shared), Arc::clone(&active), Arc::clone(&ended));
        active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        shared.tasks.spawn(async move {
            stream(tx, rx, shared2).await;
            active2.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            ended2.notify_one();
        });
    }
}

/// How a session's read loop ended.
enum End {
    Finished,
    Idle,
    Shutdown,
    Refused(Refusal),
    Transport(String),
    ForwardFailed,
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Finished => "finished",
            End::Idle => "idle",
            End::Shutdown => "shutdown",
            End::Refused(_) => "refused",
            End::Transport(_) => "transport",
            End::ForwardFailed => "forward_failed",
        }
    }
}

async fn stream(tx: quinn::SendStream, rx: quinn::RecvStream, shared: Arc<Shared>) {
    let writer: Writer = Arc::new(Mutex::new(FramedWrite::new(
        tx,
        spillway_proto::framing::codec(shared.max_frame_bytes),
    )));
    let Ok(_permit) = Arc::clone(&shared.sessions).try_acquire_owned() else {
        let refusal = Refusal::new(
            ErrorCode::Overloaded,
            "ingest is at its session limit; retry later",
        );
        shared.metrics.refused(refusal.code);
        tracing::warn!(
            code = refusal.code.as_str_name(),
            "session refused: at --max-sessions"
        );
        let mut rx = rx;
        let _ = rx.stop(quinn::VarInt::from_u32(refusal.code as u32));
        close(&writer, Some(refusal)).await;
        return;
    };
    shared.metrics.sessions_active.inc();
    session(rx, &writer, &shared).await;
}

async fn session(rx: quinn::RecvStream, writer: &Writer, shared: &Shared) {
    let mut reader = FramedRead::new(rx, spillway_proto::framing::codec(shared.max_frame_bytes));
    let mut session = Session::new(shared.limits.clone());
    let fatal = CancellationToken::new();
    // A chunk travels with the budget reservation it was filled under; the reservation is
    // returned once the uploader has committed the chunk.
    let (chunk_tx, chunk_rx) = mpsc::channel::<(Chunk, Option<Reservation>)>(1);
    let mut chunk_rx = Some(chunk_rx);
    let mut forwarding = None;
    let mut chunk_bytes = 0usize;
    let mut reserved: Option<Reservation> = None;

    let end = 'read: loop {
        let next = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break End::Shutdown,
            () = fatal.cancelled() => break End::ForwardFailed,
            r = tokio::time::timeout(shared.idle_timeout, reader.next()) => r,
        };
        let frame = match next {
            Err(_elapsed) => break End::Idle,
            Ok(None) => break End::Finished,
            Ok(Some(Err(e))) => break read_error(e, shared.max_frame_bytes),
            Ok(Some(Ok(frame))) => frame,
        };
        match session.on_frame(frame.freeze()) {
            Err(refusal) => break End::Refused(refusal),
            Ok(Output::Accepted(params)) => {
                tracing::info!(uid = %params.uid, session = %params.session,
                    sample_rate = params.sample_rate, "session accepted");
                chunk_bytes = session.chunk_bytes().unwrap_or(0);
                let accepted = Kind::Accepted(Accepted {
                    chunk_samples: params.chunk_samples,
                    start_sample: params.start_sample,
                    max_frame_bytes: u32::try_from(shared.max_frame_bytes).unwrap_or(u32::MAX),
                });
                if let Err(e) = send(writer, accepted).await {
                    break End::Transport(e.to_string());
                }
                if let Some(rx) = chunk_rx.take() {
                    let link = Link {
                        forwarder: shared.forwarder.clone(),
                        metrics: shared.metrics.clone(),
                        abandon: shared.abandon.clone(),
                        fatal: fatal.clone(),
                        ack_timeout: shared.idle_timeout,
                    };
                    forwarding = Some(tokio::spawn(forward_loop(
                        link,
                        params,
                        rx,
                        Arc::clone(writer),
                    )));
                }
            }
            Ok(Output::Audio(pcm)) => {
                shared.metrics.audio_bytes.inc_by(pcm.len() as u64);
                let mut rest = &pcm[..];
                while !rest.is_empty() {
                    // Reserve the chunk about to be filled before taking its bytes; waiting here
                    // stops reading, so the device is slowed by QUIC flow control.
                    if reserved.is_none() {
                        tokio::select! {
                            biased;
                            () = fatal.cancelled() => break 'read End::ForwardFailed,
                            r = shared.budget.reserve(chunk_bytes, &shared.shutdown) => match r {
                                Some(r) => reserved = Some(r),
                                None => break 'read End::Shutdown,
                            },
                        }
                    }
                    let (taken, chunk) = session.feed(rest);
                    rest = &rest[taken..];
                    if let Some(chunk) = chunk {
                        // Waits while the previous chunk is still being committed.
                        tokio::select! {
                            r = chunk_tx.send((chunk, reserved.take())) => if r.is_err() {
                                break 'read End::ForwardFailed;
                            },
                            () = fatal.cancelled() => break 'read End::ForwardFailed,
                        }
                    }
                }
            }
        }
    };

    let mut final_error = match &end {
        End::Refused(r) => {
            shared.metrics.refused(r.code);
            tracing::warn!(code = r.code.as_str_name(), message = %r.message, "session refused");
            let _ = reader
                .get_mut()
                .stop(quinn::VarInt::from_u32(r.code as u32));
            Some(r.clone())
        }
        End::Transport(e) => {
            tracing::info!(error = %e, "session stream failed; pending audio was never acknowledged");
            None
        }
        End::Idle => Some(Refusal::new(
            ErrorCode::IdleTimeout,
            format!(
                "no data for {:?}; audio so far was flushed",
                shared.idle_timeout
            ),
        )),
        End::Shutdown => Some(Refusal::new(
            ErrorCode::ShuttingDown,
            "ingest is shutting down; audio so far was flushed",
        )),
        End::Finished | End::ForwardFailed => None,
    };

    if matches!(end, End::Finished | End::Idle | End::Shutdown)
        && let Some(flush) = session.finish()
    {
        if let Some(chunk) = flush.chunk {
            let _ = chunk_tx.send((chunk, reserved.take())).await;
        }
        if flush.dangling_byte {
            let r = Refusal::new(
                ErrorCode::OddTrailingByte,
                "the session ended with an odd number of PCM bytes; the last byte was discarded",
            );
            shared.metrics.refused(r.code);
            tracing::warn!(
                code = r.code.as_str_name(),
                "dangling byte at end of session"
            );
            final_error.get_or_insert(r);
        }
    }
    drop(chunk_tx);
    drop(reserved);

    if let Some(task) = forwarding {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(ForwardError::Refused(status))) => {
                let r = Refusal::new(
                    ErrorCode::Internal,
                    format!("uploader refused a chunk: {}", status.message()),
                );
                shared.metrics.refused(r.code);
                final_error = Some(r);
            }
            Ok(Err(ForwardError::Abandoned)) => {
                final_error = Some(Refusal::new(
                    ErrorCode::ShuttingDown,
                    "ingest shut down before the uploader committed every chunk; unacknowledged audio must be resent",
                ));
            }
            Err(join) => tracing::error!(error = %join, "forwarding task failed"),
        }
    }
    if let Some(params) = session.params() {
        tracing::info!(uid = %params.uid, session = %params.session, reason = end.reason(), "session ended");
    }
    // Counted before the goodbye is delivered, so the metric is true once the device has it.
    shared.metrics.sessions_active.dec();
    shared
        .metrics
        .sessions_ended
        .get_or_create(&EndLabel {
            reason: end.reason(),
        })
        .inc();
    if !matches!(end, End::Transport(_)) {
        close(writer, final_error).await;
    }
}

/// Sends the final error, if any, then finishes the stream and waits briefly for delivery.
async fn close(writer: &Writer, error: Option<Refusal>) {
    if let Some(r) = error {
        let _ = send(
            writer,
            Kind::Error(spillway_proto::device::Error {
                code: r.code as i32,
                message: r.message,
            }),
        )
        .await;
    }
    let mut w = writer.lock().await;
    let stream = w.get_mut();
    if stream.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.stopped()).await;
    }
}

fn read_error(e: std::io::Error, max: usize) -> End {
    let too_long = e
        .get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
    if too_long {
        End::Refused(Refusal::new(
            ErrorCode::FrameTooLarge,
            format!("a frame is longer than the {max}-byte limit"),
        ))
    } else {
        End::Transport(e.to_string())
    }
}

/// What a session's forwarding task needs from the daemon.
struct Link {
    forwarder: Forwarder,
    metrics: Metrics,
    /// Fires when the shutdown grace has passed.
    abandon: CancellationToken,
    /// Fired by this task when a chunk is refused for good: the session stops reading.
    fatal: CancellationToken,
    /// How long a device may leave an ack unread before it is dropped.
    ack_timeout: Duration,
}

async fn forward_loop(
    link: Link,
    params: Params,
    mut rx: mpsc::Receiver<(Chunk, Option<Reservation>)>,
    writer: Writer,
) -> Result<(), ForwardError> {
    let Link {
        forwarder,
        metrics,
        abandon,
        fatal,
        ack_timeout,
    } = link;
    while let Some((chunk, reservation)) = rx.recv().await {
        metrics.chunks_forwarded.inc();
        let response = match forwarder.put(&params, &chunk, &abandon).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(uid = %params.uid, session = %params.session, seq = chunk.seq, error = %e, "chunk not committed");
                fatal.cancel();
                return Err(e);
            }
        };
        metrics.chunks_acked.inc();
        metrics.acked_bytes.inc_by(chunk.pcm.len() as u64);
        let ack = Ack {
            seq: chunk.seq,
            first_sample: chunk.first_sample,
            end_sample: chunk.end_sample(),
            key: response.key,
        };
        // Committed: the audio and its share of the budget are free before the device is
        // told, so a device that stops reading holds no memory.
        drop((chunk, reservation));
        match tokio::time::timeout(ack_timeout, send(&writer, Kind::Ack(ack))).await {
            Ok(Ok(())) => {}
            // The chunk is committed either way; the device learns on reconnect.
            Ok(Err(_)) => tracing::debug!("device gone before its ack"),
            Err(_) => tracing::info!("device not reading its acks; ack dropped"),
        }
    }
    Ok(())
}
