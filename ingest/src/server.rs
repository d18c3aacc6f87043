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

use crate::admission::Uids;
use crate::budget::{Budget, Reservation};
use crate::chunker::Chunk;
use crate::feed::{self, Budgeted, Stopped};
use crate::fill::FillTimer;
use crate::forward::{ForwardError, Forwarder};
use crate::metrics::Metrics;
use crate::session::{Limits, Output, Params, Refusal, Session};

/// What every session task shares.
pub(crate) struct Shared {
    pub limits: Limits,
    pub forwarder: Forwarder,
    pub budget: Budget,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    /// How long a session's open chunk may stay open (`--chunk-fill-timeout`).
    pub chunk_fill_timeout: Duration,
    /// How long a new stream has to send its hello before it is refused.
    pub hello_timeout: Duration,
    pub max_frame_bytes: usize,
    pub sessions: Arc<Semaphore>,
    /// Sessions per uid (`--max-sessions-per-uid`).
    pub uids: Uids,
    /// Fires when ingest is shutting down: sessions stop reading and flush.
    pub shutdown: CancellationToken,
    /// Fires once the shutdown grace has passed: forwarders stop waiting for the uploader.
    pub abandon: CancellationToken,
    pub tasks: TaskTracker,
}

type Writer = Arc<Mutex<FramedWrite<quinn::SendStream, LengthDelimitedCodec>>>;
type Reader = FramedRead<quinn::RecvStream, LengthDelimitedCodec>;

async fn send(writer: &Writer, kind: Kind) -> std::io::Result<()> {
    let msg = ServerMessage { kind: Some(kind) };
    writer
        .lock()
        .await
        .send(Bytes::from(msg.encode_to_vec()))
        .await
}

/// The accepted sessions of one connection, and since when it has had none: only an accepted
/// session keeps a connection open. Streams that never say hello, or are refused, do not
/// restart its idle timer.
struct Occupancy {
    active: std::sync::atomic::AtomicUsize,
    idle_since: parking_lot::Mutex<tokio::time::Instant>,
    /// Wakes the connection's loop to look at its idle deadline again.
    changed: tokio::sync::Notify,
}

impl Occupancy {
    fn started(&self) {
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_one();
    }

    fn ended(&self) {
        if self
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            *self.idle_since.lock() = tokio::time::Instant::now();
        }
        self.changed.notify_one();
    }

    /// When the connection is to be closed for idling, `None` while a session is open.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<tokio::time::Instant> {
        if self.active.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock();
        Some(since + idle_timeout)
    }
}

/// The scope of a QUIC connection's verified client certificate, if it has one.
fn scope_of_connection(conn: &quinn::Connection) -> Option<crate::auth::Scope> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<rustls_pki_types::CertificateDer<'static>>>()?;
    crate::auth::cert::scope_of(chain.first()?)
}

/// Handles one QUIC connection: every bidirectional stream is one session. `_slot` is its
/// connection slot, given back when it ends.
pub(crate) async fn connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    _slot: crate::admission::Slot<std::net::IpAddr>,
) {
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
    // With `--auth mtls` the handshake verified the device's certificate; who it names holds
    // for every stream of the connection.
    let certified = matches!(shared.limits.auth.as_ref(), crate::auth::Auth::Certificates)
        .then(|| scope_of_connection(&conn))
        .flatten();
    // A connection with no session for the idle timeout is closed: a flood of connections
    // that never send (or only open streams that are refused) cannot pin ingest's memory or its
    // connection slots (the seed's ghost connections held 15 MiB each).
    let occupancy = Arc::new(Occupancy {
        active: std::sync::atomic::AtomicUsize::new(0),
        idle_since: parking_lot::Mutex::new(tokio::time::Instant::now()),
        changed: tokio::sync::Notify::new(),
    });
    loop {
        let deadline = occupancy.idle_deadline(shared.idle_timeout);
        let idle = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let (tx, rx) = tokio::select! {
            r = conn.accept_bi() => match r {
                Ok(streams) => streams,
                Err(e) => {
                    tracing::debug!(%remote, reason = %e, "connection ended");
                    return;
                }
            },
            () = idle => {
                shared.metrics.idle_connections_closed.inc();
                tracing::info!(%remote, "closing a connection with no session for the idle timeout");
                conn.close(
                    quinn::VarInt::from_u32(ErrorCode::IdleTimeout as u32),
                    b"no session within the idle timeout",
                );
                return;
            }
            () = occupancy.changed.notified() => continue,
            () = shared.shutdown.cancelled() => return,
        };
        let (shared2, occupancy2) = (Arc::clone(&shared), Arc::clone(&occupancy));
        let certified = certified.clone();
        shared.tasks.spawn(async move {
            stream(tx, rx, shared2, &occupancy2, certified).await;
        });
    }
}

/// How a session's read loop ended.
enum End {
    Finished,
    Idle,
    /// The open chunk outlived `--chunk-fill-timeout`.
    TooSlow,
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
            End::TooSlow => "too_slow",
            End::Shutdown => "shutdown",
            End::Refused(_) => "refused",
            End::Transport(_) => "transport",
            End::ForwardFailed => "forward_failed",
        }
    }
}

/// One stream: its hello within the hello deadline, then (only then) a session slot, a slot of
/// its uid's and the session itself. Until the hello is accepted the stream holds nothing but
/// its read buffer, bounded by the frame limit and QUIC's receive windows.
async fn stream(
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
    shared: Arc<Shared>,
    occupancy: &Occupancy,
    certified: Option<crate::auth::Scope>,
) {
    let writer: Writer = Arc::new(Mutex::new(FramedWrite::new(
        tx,
        spillway_proto::framing::codec(shared.max_frame_bytes),
    )));
    let mut reader = FramedRead::new(rx, spillway_proto::framing::codec(shared.max_frame_bytes));
    let mut session =
        Session::new(shared.limits.clone(), std::time::SystemTime::now()).certified(certified);
    let first = tokio::select! {
        biased;
        () = shared.shutdown.cancelled() => return close(&writer, None).await,
        r = tokio::time::timeout(shared.hello_timeout, reader.next()) => r,
    };
    let hello = match first {
        Err(_elapsed) => Err(Refusal::new(
            ErrorCode::HelloTimeout,
            format!(
                "no hello within {:?} of opening the stream",
                shared.hello_timeout
            ),
        )),
        Ok(None) => return close(&writer, None).await,
        Ok(Some(Err(e))) => match read_error(e, shared.max_frame_bytes) {
            End::Refused(r) => Err(r),
            _ => return,
        },
        Ok(Some(Ok(frame))) => match session.on_frame(frame.freeze()) {
            Ok(Output::Accepted(params)) => Ok(params),
            Ok(Output::Audio(_)) => Err(Refusal::new(
                ErrorCode::ExpectedHello,
                "the first message must be Hello",
            )),
            Err(r) => Err(r),
        },
    };
    let admitted = hello.and_then(|params| {
        let Ok(permit) = Arc::clone(&shared.sessions).try_acquire_owned() else {
            return Err(Refusal::new(
                ErrorCode::Overloaded,
                "ingest is at its session limit; retry later",
            ));
        };
        match shared.uids.try_take(&params.uid) {
            Ok(uid_slot) => Ok((params, permit, uid_slot)),
            Err(_) => Err(Refusal::new(
                ErrorCode::Overloaded,
                format!(
                    "uid {:?} already has its most sessions open (--max-sessions-per-uid); retry later",
                    params.uid
                ),
            )),
        }
    });
    let (params, _permit, _uid_slot) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            shared.metrics.refused(refusal.code);
            tracing::warn!(code = refusal.code.as_str_name(), message = %refusal.message, "stream refused before its session started");
            let _ = reader
                .get_mut()
                .stop(quinn::VarInt::from_u32(refusal.code as u32));
            return close(&writer, Some(refusal)).await;
        }
    };
    occupancy.started();
    shared.metrics.sessions_active.inc();
    run_session(reader, session, params, &writer, &shared).await;
    occupancy.ended();
}

/// Drives an accepted session until it ends.
async fn run_session(
    mut reader: Reader,
    mut session: Session,
    params: Params,
    writer: &Writer,
    shared: &Shared,
) {
    let fatal = CancellationToken::new();
    // A chunk travels with the budget reservation it was filled under; the reservation is
    // returned once the uploader has committed the chunk.
    let (chunk_tx, chunk_rx) = mpsc::channel::<(Chunk, Option<Reservation>)>(1);
    let mut reserved: Option<Reservation> = None;
    let mut fill = FillTimer::new(shared.chunk_fill_timeout);
    let alarm = tokio::time::sleep(shared.idle_timeout);
    tokio::pin!(alarm);
    // The idle clock runs while ingest waits for the device's next frame, from when it starts.
    let mut idle_at = tokio::time::Instant::now() + shared.idle_timeout;
    tracing::info!(uid = %params.uid, session = %params.session,
        sample_rate = params.sample_rate, "session accepted");
    let accepted = Kind::Accepted(Accepted {
        chunk_samples: params.chunk_samples,
        start_sample: params.start_sample,
        max_frame_bytes: u32::try_from(shared.max_frame_bytes).unwrap_or(u32::MAX),
    });
    let link = Link {
        forwarder: shared.forwarder.clone(),
        metrics: shared.metrics.clone(),
        abandon: shared.abandon.clone(),
        fatal: fatal.clone(),
        ack_timeout: shared.idle_timeout,
    };
    let sent = send(writer, accepted).await;
    let forwarding = Some(tokio::spawn(forward_loop(
        link,
        params,
        chunk_rx,
        Arc::clone(writer),
    )));

    let end = match sent {
        Err(e) => End::Transport(e.to_string()),
        Ok(()) => 'read: loop {
            // One timer for both deadlines (idle, chunk fill), re-armed only when it fires or a
            // deadline comes earlier: a frame costs a clock read, not a timer registration.
            let fill_at = fill.deadline().map(tokio::time::Instant::from_std);
            if let Some(d) = fill_at
                && d < alarm.deadline()
            {
                alarm.as_mut().reset(d);
            }
            let next = tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => break End::Shutdown,
                () = fatal.cancelled() => break End::ForwardFailed,
                () = &mut alarm => None,
                r = reader.next() => Some(r),
            };
            let frame = match next {
                None => {
                    let now = tokio::time::Instant::now();
                    if fill_at.is_some_and(|d| d <= now) {
                        break End::TooSlow;
                    }
                    if idle_at <= now {
                        break End::Idle;
                    }
                    alarm
                        .as_mut()
                        .reset(fill_at.map_or(idle_at, |d| d.min(idle_at)));
                    continue;
                }
                Some(None) => break End::Finished,
                Some(Some(Err(e))) => break read_error(e, shared.max_frame_bytes),
                Some(Some(Ok(frame))) => frame,
            };
            match session.on_frame(frame.freeze()) {
                Err(refusal) => break End::Refused(refusal),
                // The session already has its hello: a second one is refused by `Session`.
                Ok(Output::Accepted(_)) => {
                    break End::Refused(Refusal::new(
                        ErrorCode::UnexpectedHello,
                        "a second hello on the same stream",
                    ));
                }
                Ok(Output::Audio(pcm)) => {
                    shared.metrics.audio_bytes.inc_by(pcm.len() as u64);
                    let mut rest = &pcm[..];
                    let from = Budgeted {
                        budget: &shared.budget,
                        shutdown: &shared.shutdown,
                        fatal: &fatal,
                    };
                    while !rest.is_empty() {
                        let (taken, chunk) =
                            match feed::step(&mut session, rest, &mut reserved, &mut fill, &from)
                                .await
                            {
                                Ok(fed) => fed,
                                Err(Stopped::Shutdown) => break 'read End::Shutdown,
                                Err(Stopped::Fatal) => break 'read End::ForwardFailed,
                            };
                        rest = rest.get(taken..).unwrap_or_default();
                        if let Some(chunk) = chunk {
                            // Waits while the previous chunk is still being committed.
                            let waited = tokio::time::Instant::now();
                            tokio::select! {
                                r = chunk_tx.send(chunk) => if r.is_err() {
                                    break 'read End::ForwardFailed;
                                },
                                () = fatal.cancelled() => break 'read End::ForwardFailed,
                            }
                            fill.excuse(waited.elapsed());
                        }
                    }
                }
            }
            idle_at = tokio::time::Instant::now() + shared.idle_timeout;
        },
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
        End::TooSlow => Some(Refusal::new(
            ErrorCode::TooSlow,
            format!(
                "a chunk stayed open longer than {:?} (--chunk-fill-timeout: send at least {}% of real time); audio so far was flushed, resume to go on",
                fill.limit(),
                (100 * u128::from(shared.limits.chunk_seconds) * 1000)
                    .div_ceil(fill.limit().as_millis().max(1))
            ),
        )),
        End::Finished | End::ForwardFailed => None,
    };

    if matches!(
        end,
        End::Finished | End::Idle | End::Shutdown | End::TooSlow
    ) && let Some(flush) = session.finish()
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
    shared.metrics.session_ended(end.reason());
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
        // The receipt: the CRC32C the uploader committed, which the device checks against
        // what it sent. ingest checks it too: a difference means the bytes changed between
        // ingest and the uploader's disk.
        if response.crc32c != chunk.crc32c {
            tracing::error!(uid = %params.uid, session = %params.session, seq = chunk.seq,
                ours = format!("{:08x}", chunk.crc32c), committed = format!("{:08x}", response.crc32c),
                "the uploader committed other bytes than ingest sent");
        }
        let ack = Ack {
            seq: chunk.seq,
            first_sample: chunk.first_sample,
            end_sample: chunk.end_sample(),
            key: response.key,
            crc32c: Some(response.crc32c),
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
