//! The Spillway device client, in a crate of its own so that a device gateway depends on it
//! alone (not on ingest's server): used by `ingest stream`, `cargo xtask up` to simulate devices
//! and the tests, and an example for gateway authors.
//!
//! Two levels: [`Device`] with [`SessionWriter`]/[`SessionReader`] speak the protocol frame by
//! frame over one stream; [`stream_resuming`] is what a real device wants: it keeps audio until
//! it is acknowledged (bounded by [`ResumeConfig::max_unacked_bytes`]), reconnects with jittered
//! backoff when the connection or ingest goes away, and resumes where the acks left off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use spillway_proto::device::{
    Ack, Audio, ClientMessage, ErrorCode, Hello, ServerMessage, client_message::Kind,
    server_message,
};
use tokio::sync::mpsc;

use spillway_core::outbox::Outbox;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

pub mod tls;

/// Frames up to this size are accepted from ingest by the client.
const CLIENT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// One QUIC connection to ingest; open a session per audio stream.
#[derive(Debug)]
pub struct Device {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// Whether the endpoint carries other devices' connections too ([`Device::connect_on`]).
    shared: bool,
}

impl Device {
    /// Connects to `server`, trusting the DER certificate `trusted` (ingest's self-signed one
    /// for local use).
    pub async fn connect(
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
    ) -> anyhow::Result<Self> {
        Self::connect_with_alpn(server, server_name, trusted, spillway_proto::ALPN).await
    }

    /// Like [`Device::connect`], presenting `identity` (the device's client certificate, for an
    /// ingest running `--auth mtls`).
    pub async fn connect_as(
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
        identity: &crate::tls::TlsMaterial,
    ) -> anyhow::Result<Self> {
        let config = client_config_with(
            trusted,
            spillway_proto::ALPN,
            Duration::from_secs(30),
            Some(identity),
        )?;
        Self::connect_own(server, server_name, config).await
    }

    /// Like [`Device::connect`] with another ALPN (tests use it to check refusal).
    pub async fn connect_with_alpn(
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
        alpn: &[u8],
    ) -> anyhow::Result<Self> {
        Self::connect_with(server, server_name, trusted, alpn, Duration::from_secs(30)).await
    }

    /// Connects with an idle timeout: how long a silent server (a killed ingest, say) goes
    /// unnoticed.
    pub async fn connect_with(
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
        alpn: &[u8],
        idle_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::connect_own(
            server,
            server_name,
            client_config(trusted, alpn, idle_timeout)?,
        )
        .await
    }

    /// Connects from a UDP socket of its own with `config`.
    async fn connect_own(
        server: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> anyhow::Result<Self> {
        // The unspecified address of the server's family: the kernel picks the route, so a
        // remote ingest is reachable (a loopback socket can only reach loopback).
        let bind: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
        let conn = endpoint
            .connect_with(config, server, server_name)?
            .await
            .with_context(|| format!("connecting to ingest at {server}"))?;
        Ok(Self {
            endpoint,
            conn,
            shared: false,
        })
    }

    /// Connects through `endpoint`, a client endpoint other devices may share (one UDP socket
    /// for many connections, as a gateway in front of many devices has; load generators use it
    /// so that thousands of simulated devices do not each run a socket and its driver).
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
    ) -> anyhow::Result<Self> {
        let config = client_config(trusted, spillway_proto::ALPN, Duration::from_secs(30))?;
        let conn = endpoint
            .connect_with(config, server, server_name)?
            .await
            .with_context(|| format!("connecting to ingest at {server}"))?;
        Ok(Self {
            endpoint: endpoint.clone(),
            conn,
            shared: true,
        })
    }

    /// Opens a stream for one session. Nothing is sent yet; start with [`SessionWriter::hello`].
    pub async fn open(&self) -> anyhow::Result<(SessionWriter, SessionReader)> {
        let (tx, rx) = self.conn.open_bi().await.context("opening a stream")?;
        Ok((
            SessionWriter {
                inner: FramedWrite::new(tx, spillway_proto::framing::codec(CLIENT_MAX_FRAME)),
            },
            SessionReader {
                inner: FramedRead::new(rx, spillway_proto::framing::codec(CLIENT_MAX_FRAME)),
            },
        ))
    }

    /// Closes the connection gracefully and waits until the peer has seen it.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        if self.shared {
            // The endpoint's other connections are not ours to wait for.
            self.conn.closed().await;
        } else {
            self.endpoint.wait_idle().await;
        }
    }
}

/// Ack-eliciting packets a device asks ingest to receive before it must acknowledge.
pub const ACK_EVERY: u32 = 10;

/// The device side's QUIC configuration: trusts `trusted`, offers `alpn`, keeps the connection
/// alive well inside `idle_timeout`.
fn client_config(
    trusted: &[u8],
    alpn: &[u8],
    idle_timeout: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    client_config_with(trusted, alpn, idle_timeout, None)
}

fn client_config_with(
    trusted: &[u8],
    alpn: &[u8],
    idle_timeout: Duration,
    identity: Option<&crate::tls::TlsMaterial>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut config = crate::tls::client_config_with(&[trusted], alpn, identity)?;
    let mut transport = quinn::TransportConfig::default();
    // A device only sends: ingest's ACKs are nearly all it hears back. By default ingest would
    // acknowledge every second packet, and sending those ACKs took a quarter of its CPU at full
    // speed; the ACK frequency extension (which ingest, as any quinn endpoint, supports) asks
    // it to acknowledge every `ACK_EVERY`th packet, or after its max ACK delay.
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_EVERY - 1));
    transport
        .keep_alive_interval(Some((idle_timeout / 3).max(Duration::from_millis(100))))
        .max_idle_timeout(Some(idle_timeout.try_into()?))
        .ack_frequency_config(Some(ack_frequency));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The sending half of a session.
#[derive(Debug)]
pub struct SessionWriter {
    inner: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
}

impl SessionWriter {
    pub async fn hello(&mut self, hello: Hello) -> anyhow::Result<()> {
        self.message(Kind::Hello(hello)).await
    }

    pub async fn audio(&mut self, pcm: Bytes) -> anyhow::Result<()> {
        self.message(Kind::Audio(Audio { pcm })).await
    }

    async fn message(&mut self, kind: Kind) -> anyhow::Result<()> {
        let msg = ClientMessage { kind: Some(kind) };
        self.frame(Bytes::from(msg.encode_to_vec())).await
    }

    /// Sends one length-prefixed frame holding arbitrary bytes.
    pub async fn frame(&mut self, frame: Bytes) -> anyhow::Result<()> {
        self.inner.send(frame).await.context("sending a frame")
    }

    /// Writes bytes with no framing at all.
    pub async fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.inner
            .get_mut()
            .write_all(bytes)
            .await
            .context("writing raw bytes")
    }

    /// Ends the session: ingest flushes the final chunk and acks it.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.finish_sending()
    }

    /// Like [`SessionWriter::finish`], keeping the writer.
    pub fn finish_sending(&mut self) -> anyhow::Result<()> {
        self.inner
            .get_mut()
            .finish()
            .context("finishing the stream")
    }
}

/// The receiving half of a session.
#[derive(Debug)]
pub struct SessionReader {
    inner: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
}

impl SessionReader {
    /// The next message from ingest, or `None` once ingest finished its side.
    pub async fn next(&mut self) -> anyhow::Result<Option<ServerMessage>> {
        match self.inner.next().await {
            None => Ok(None),
            Some(frame) => {
                let frame = frame.context("reading from ingest")?;
                Ok(Some(
                    ServerMessage::decode(frame).context("decoding a ServerMessage")?,
                ))
            }
        }
    }

    /// Every message until ingest finishes its side.
    pub async fn collect(mut self) -> anyhow::Result<Vec<ServerMessage>> {
        let mut all = Vec::new();
        while let Some(m) = self.next().await? {
            all.push(m);
        }
        Ok(all)
    }
}

/// How a resuming session connects, and how much audio it may hold.
#[derive(Debug, Clone)]
pub struct ResumeConfig {
    pub server: SocketAddr,
    pub server_name: String,
    /// DER certificate to trust (ingest's self-signed one for local use).
    pub trusted: Vec<u8>,
    /// Most unacknowledged audio held; the producer waits beyond it.
    pub max_unacked_bytes: usize,
    /// Audio bytes per frame sent.
    pub frame_bytes: usize,
    /// Reconnect backoff bounds (exponential; each delay gets a random jitter of up to itself, so
    /// a delay lies in [d, 2d) and the ceiling reaches twice `max_backoff`).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// A silent connection is given up after this long.
    pub idle_timeout: Duration,
    /// Give up when no audio was acknowledged for this long (`None`: never).
    pub give_up_after: Option<Duration>,
}

impl ResumeConfig {
    /// Defaults for a device talking to a local ingest.
    pub fn local(server: SocketAddr, trusted: Vec<u8>) -> Self {
        Self {
            server,
            server_name: "localhost".into(),
            trusted,
            max_unacked_bytes: 8 * 1024 * 1024,
            frame_bytes: 16 * 1024,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            give_up_after: None,
        }
    }
}

/// What a resuming session saw.
#[derive(Debug, Clone, Default)]
pub struct ResumeReport {
    pub chunk_samples: u64,
    /// Every ack, in order: contiguous from sample 0 to the end of the audio.
    pub acks: Vec<Ack>,
    /// Every error ingest sent (the ones that made it reconnect included).
    pub errors: Vec<spillway_proto::device::Error>,
    /// Connections made after the first.
    pub reconnects: u32,
    /// Acks whose receipt (CRC32C) did not match the audio sent; that audio was resent.
    pub receipt_mismatches: u32,
    /// When each ack of `acks` arrived, since the session started.
    pub acked_at: Vec<Duration>,
}

enum StreamEnd {
    /// Everything was acknowledged and ingest finished its side.
    Done,
    /// The stream or connection went away; reconnect and resume.
    Retry(String),
    /// Ingest refused the session for good, or broke the protocol.
    Fatal(anyhow::Error),
}

/// Streams one session's audio from `audio` until the channel closes and every sample is
/// acknowledged, reconnecting and resuming as often as needed. Holds at most
/// `max_unacked_bytes` of audio: when that much is unacknowledged it stops taking from `audio`,
/// which holds the producer back.
pub async fn stream_resuming(
    config: ResumeConfig,
    hello: Hello,
    mut audio: mpsc::Receiver<Bytes>,
) -> anyhow::Result<ResumeReport> {
    use backon::BackoffBuilder;
    let mut state = Driver {
        outbox: Outbox::new(config.max_unacked_bytes),
        pending: None,
        input_open: true,
        report: ResumeReport::default(),
        started: Instant::now(),
    };
    let new_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(config.min_backoff)
            .with_max_delay(config.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    let mut last_progress = (Instant::now(), state.outbox.resume_from());
    loop {
        match state.stream(&config, &hello, &mut audio).await {
            StreamEnd::Done => return Ok(state.report),
            StreamEnd::Fatal(e) => return Err(e),
            StreamEnd::Retry(why) => {
                if state.outbox.resume_from() != last_progress.1 {
                    last_progress = (Instant::now(), state.outbox.resume_from());
                    backoff = new_backoff();
                }
                if let Some(limit) = config.give_up_after
                    && last_progress.0.elapsed() > limit
                {
                    anyhow::bail!("no audio acknowledged for {limit:?}; last problem: {why}");
                }
                let delay = backoff.next().unwrap_or(config.max_backoff);
                tracing::info!(uid = %hello.uid, session = %hello.session, reason = %why,
                    resume_from = state.outbox.resume_from(), retry_in = ?delay, "reconnecting");
                tokio::time::sleep(delay).await;
                state.report.reconnects += 1;
            }
        }
    }
}

struct Driver {
    outbox: Outbox,
    /// Audio taken from the producer that did not fit in the outbox yet.
    pending: Option<Bytes>,
    input_open: bool,
    report: ResumeReport,
    started: Instant,
}

impl Driver {
    /// Moves producer audio into the outbox without waiting.
    fn fill(&mut self, audio: &mut mpsc::Receiver<Bytes>) {
        loop {
            if let Some(mut p) = self.pending.take() {
                let n = self.outbox.push(&p);
                if n < p.len() {
                    self.pending = Some(p.split_off(n));
                    return;
                }
            }
            if !self.input_open {
                // Everything the producer gave is in the outbox.
                self.outbox.finish();
                return;
            }
            match audio.try_recv() {
                Ok(b) => self.pending = Some(b),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => self.input_open = false,
            }
        }
    }

    /// Handles one message (`None`: ingest finished its side or the stream failed).
    fn on_message(&mut self, message: Option<ServerMessage>) -> Option<StreamEnd> {
        let Some(message) = message else {
            return Some(if self.outbox.is_done() {
                StreamEnd::Done
            } else {
                StreamEnd::Retry("ingest ended the stream".into())
            });
        };
        match message.kind {
            Some(server_message::Kind::Ack(ack)) => {
                match self
                    .outbox
                    .on_ack(ack.first_sample, ack.end_sample, ack.crc32c)
                {
                    Ok(()) => {}
                    // Committed, but not what was sent: keep it, say so, resend from there.
                    Err(e @ spillway_core::outbox::OutboxError::ReceiptMismatch { .. }) => {
                        tracing::error!(error = %e, "receipt mismatch");
                        self.report.errors.push(spillway_proto::device::Error {
                            code: ErrorCode::Unspecified as i32,
                            message: e.to_string(),
                        });
                        self.report.receipt_mismatches += 1;
                        return Some(StreamEnd::Retry(e.to_string()));
                    }
                    Err(e) => return Some(StreamEnd::Fatal(e.into())),
                }
                self.report.acks.push(ack);
                self.report.acked_at.push(self.started.elapsed());
                None
            }
            Some(server_message::Kind::Error(e)) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                self.report.errors.push(e.clone());
                match code {
                    // Ingest goes on to finish its side; the stream end triggers the reconnect.
                    ErrorCode::ShuttingDown
                    | ErrorCode::IdleTimeout
                    | ErrorCode::TooSlow
                    | ErrorCode::Overloaded
                    | ErrorCode::OddTrailingByte => None,
                    _ => Some(StreamEnd::Fatal(anyhow::anyhow!(
                        "ingest refused the session: {}: {}",
                        code.as_str_name(),
                        e.message
                    ))),
                }
            }
            Some(server_message::Kind::Accepted(_)) | None => Some(StreamEnd::Fatal(
                anyhow::anyhow!("ingest sent an unexpected message mid-stream"),
            )),
        }
    }

    async fn stream(
        &mut self,
        config: &ResumeConfig,
        hello: &Hello,
        audio: &mut mpsc::Receiver<Bytes>,
    ) -> StreamEnd {
        let connected = Device::connect_with(
            config.server,
            &config.server_name,
            &config.trusted,
            spillway_proto::ALPN,
            config.idle_timeout,
        )
        .await;
        let device = match connected {
            Ok(d) => d,
            Err(e) => return StreamEnd::Retry(format!("{e:#}")),
        };
        let (mut tx, mut rx) = match device.open().await {
            Ok(s) => s,
            Err(e) => return StreamEnd::Retry(format!("{e:#}")),
        };
        let mut h = hello.clone();
        h.resume_from = self.outbox.resume_from();
        if let Err(e) = tx.hello(h).await {
            return StreamEnd::Retry(format!("{e:#}"));
        }
        let (msg_tx, mut msgs) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let m = rx.next().await.ok().flatten();
                let end = m.is_none();
                if msg_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let end = self.drive(config, &mut tx, &mut msgs, audio).await;
        reader.abort();
        // Dropping the connection closes it; no need to wait for the peer.
        drop(device);
        end
    }

    async fn drive(
        &mut self,
        config: &ResumeConfig,
        tx: &mut SessionWriter,
        msgs: &mut mpsc::UnboundedReceiver<Option<ServerMessage>>,
        audio: &mut mpsc::Receiver<Bytes>,
    ) -> StreamEnd {
        match msgs.recv().await.flatten().and_then(|m| m.kind) {
            Some(server_message::Kind::Accepted(a)) => {
                if let Err(e) = self.outbox.on_accepted(a.start_sample) {
                    return StreamEnd::Fatal(e.into());
                }
                self.report.chunk_samples = a.chunk_samples;
            }
            Some(server_message::Kind::Error(e)) => {
                let end = self.on_message(Some(ServerMessage {
                    kind: Some(server_message::Kind::Error(e)),
                }));
                return end.unwrap_or_else(|| StreamEnd::Retry("refused for now".into()));
            }
            _ => return StreamEnd::Retry("no answer to hello".into()),
        }
        let mut sent_finish = false;
        loop {
            while let Ok(m) = msgs.try_recv() {
                if let Some(end) = self.on_message(m) {
                    return end;
                }
            }
            self.fill(audio);
            if let Some(frame) = self.outbox.next_frame(config.frame_bytes) {
                let n = frame.len();
                if let Err(e) = tx.audio(frame).await {
                    return StreamEnd::Retry(format!("{e:#}"));
                }
                self.outbox.on_sent(n);
                continue;
            }
            if self.outbox.is_finished() && !sent_finish {
                if let Err(e) = tx.finish_sending() {
                    return StreamEnd::Retry(format!("{e:#}"));
                }
                sent_finish = true;
            }
            let want_input = self.input_open && self.pending.is_none() && self.outbox.room() > 0;
            // Connected but nothing acknowledged for too long (the uploader refusing, say):
            // reconnecting lets the caller's give-up limit apply.
            let stalled = config.give_up_after.unwrap_or(Duration::MAX);
            tokio::select! {
                () = tokio::time::sleep(stalled), if config.give_up_after.is_some() && !self.outbox.is_done() => {
                    return StreamEnd::Retry("nothing acknowledged while connected".into());
                }
                m = msgs.recv() => {
                    if let Some(end) = self.on_message(m.flatten()) {
                        return end;
                    }
                }
                b = audio.recv(), if want_input => match b {
                    Some(b) => self.pending = Some(b),
                    None => self.input_open = false,
                },
            }
        }
    }
}
