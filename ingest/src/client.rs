//! A reference device client for the Spillway protocol: used by `cargo xtask up` to simulate
//! devices, by the tests, and as an example for gateway authors.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use spillway_proto::device::{Audio, ClientMessage, Hello, ServerMessage, client_message::Kind};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Frames up to this size are accepted from ingest by the client.
const CLIENT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// One QUIC connection to ingest; open a session per audio stream.
#[derive(Debug)]
pub struct Device {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
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

    /// Like [`Device::connect`] with another ALPN (tests use it to check refusal).
    pub async fn connect_with_alpn(
        server: SocketAddr,
        server_name: &str,
        trusted: &[u8],
        alpn: &[u8],
    ) -> anyhow::Result<Self> {
        let bind: SocketAddr = if server.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
        let mut config = crate::tls::client_config(&[trusted], alpn)?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
        config.transport_config(Arc::new(transport));
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(server, server_name)?
            .await
            .with_context(|| format!("connecting to ingest at {server}"))?;
        Ok(Self { endpoint, conn })
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
        self.endpoint.wait_idle().await;
    }
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
