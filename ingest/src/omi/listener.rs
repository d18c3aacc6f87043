//! The Omi front end's TCP accept loop under the connection caps QUIC has (`--max-connections`,
//! `--max-connections-per-ip`, one count for both front ends): a connection over a cap is
//! closed as it is accepted, before a byte of it is read, and counted in
//! `spillway_ingest_connections_refused_total`. Its slot is held until the connection closes.
//!
//! Until it becomes a WebSocket a connection has `--hello-timeout` (QUIC's deadline for a hello)
//! from its accept: then its reads fail and it is closed, counted as
//! `spillway_ingest_omi_closes_total{code="upgrade_timeout"}`. So a stranger who connects and
//! sends nothing, trickles a request's headers, or idles after a refusal (a 401 leaves the
//! connection open for another request) holds a slot for that long, not for as long as it likes.
//! Once upgraded, the session's own deadlines apply (`--omi-receive-timeout`).

use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::admission::{Connections, Full, Slot};
use crate::metrics::{CodeLabel, EndLabel, Metrics};

pub(crate) struct Capped {
    pub inner: TcpListener,
    pub slots: Connections,
    pub metrics: Metrics,
    /// How long a connection may take to become a WebSocket (`--hello-timeout`).
    pub upgrade_within: Duration,
}

/// An accepted connection, the slot it holds, and its deadline until it is upgraded.
pub(crate) struct CappedIo {
    io: TcpStream,
    _slot: Slot<IpAddr>,
    upgraded: Upgraded,
    deadline: Pin<Box<tokio::time::Sleep>>,
    metrics: Metrics,
    expired: bool,
}

/// Set when the connection became a WebSocket: its upgrade deadline no longer applies. The
/// handler reaches it as connect info ([`axum::extract::ConnectInfo`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Upgraded(Arc<AtomicBool>);

impl Upgraded {
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Capped>> for Upgraded {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Capped>) -> Self {
        stream.io().upgraded.clone()
    }
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.slots.try_take(&addr.ip()) {
                Ok(slot) => {
                    let io = CappedIo {
                        io,
                        _slot: slot,
                        upgraded: Upgraded::default(),
                        deadline: Box::pin(tokio::time::sleep(self.upgrade_within)),
                        metrics: self.metrics.clone(),
                        expired: false,
                    };
                    return (io, addr);
                }
                Err(full) => {
                    let reason = match full {
                        Full::Total => "total",
                        Full::PerKey => "per_source",
                    };
                    self.metrics
                        .connections_refused
                        .get_or_create(&EndLabel { reason })
                        .inc();
                    tracing::debug!(%addr, reason, "Omi connection refused");
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.upgraded.is_set() && (this.expired || this.deadline.as_mut().poll(cx).is_ready()) {
            if !this.expired {
                this.expired = true;
                this.metrics
                    .omi_closes
                    .get_or_create(&CodeLabel {
                        code: "upgrade_timeout".into(),
                    })
                    .inc();
                tracing::debug!(
                    "Omi connection closed: no WebSocket upgrade within --hello-timeout"
                );
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no WebSocket upgrade within --hello-timeout",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
