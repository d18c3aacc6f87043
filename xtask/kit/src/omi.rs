//! A stand-in for Omi's `listen` service: the pusher protocol's client side, over a real
//! WebSocket, for the tests of ingest's Omi front end.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One listen connection to the pusher route.
pub struct Listen {
    ws: Ws,
}

/// What the server sent, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A binary message: its opcode and its JSON payload.
    Json(u32, serde_json::Value),
    /// The close frame's code.
    Closed(u16),
}

fn message(op: u32, payload: &[u8]) -> Message {
    let mut m = op.to_le_bytes().to_vec();
    m.extend_from_slice(payload);
    Message::Binary(Bytes::from(m))
}

impl Listen {
    /// Opens `ws://{addr}/v1/trigger/listen?{query}`, with `Authorization: Bearer {token}` when
    /// given. An HTTP refusal (a 401) is an error naming its status.
    pub async fn connect(
        addr: SocketAddr,
        query: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut request = format!("ws://{addr}/v1/trigger/listen?{query}").into_client_request()?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("opening the listen WebSocket")?;
        Ok(Self { ws })
    }

    pub async fn raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self
            .ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await?)
    }

    /// 103: the audio that follows belongs to `id`.
    pub async fn conversation(&mut self, id: &str) -> anyhow::Result<()> {
        Ok(self.ws.send(message(103, id.as_bytes())).await?)
    }

    /// 101: `pcm` whose first sample was captured at Unix time `ts`.
    pub async fn audio(&mut self, ts: f64, pcm: &[u8]) -> anyhow::Result<()> {
        let mut payload = ts.to_le_bytes().to_vec();
        payload.extend_from_slice(pcm);
        Ok(self.ws.send(message(101, &payload)).await?)
    }

    /// 104 for `id`.
    pub async fn process(&mut self, id: &str) -> anyhow::Result<()> {
        let json = serde_json::json!({ "conversation_id": id, "language": "en" }).to_string();
        Ok(self.ws.send(message(104, json.as_bytes())).await?)
    }

    /// Any opcode with any payload.
    pub async fn op(&mut self, op: u32, payload: &[u8]) -> anyhow::Result<()> {
        Ok(self.ws.send(message(op, payload)).await?)
    }

    /// The next binary message or close frame (pings and pongs skipped).
    pub async fn next(&mut self) -> anyhow::Result<Reply> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    let Some((op, json)) = b.split_first_chunk::<4>() else {
                        bail!("a binary message of {} bytes", b.len());
                    };
                    return Ok(Reply::Json(
                        u32::from_le_bytes(*op),
                        serde_json::from_slice(json).context("a reply that is not JSON")?,
                    ));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Reply::Closed(frame.map_or(1005, |f| u16::from(f.code))));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(t))) => bail!("a text message: {t}"),
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the connection ended without a close frame"),
            }
        }
    }

    /// Closes normally and waits for the server's close.
    pub async fn close(mut self) -> anyhow::Result<u16> {
        self.ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await?;
        loop {
            match self.next().await {
                Ok(Reply::Closed(code)) => return Ok(code),
                Ok(Reply::Json(..)) => {}
                Err(e) => return Err(e),
            }
        }
    }
}
