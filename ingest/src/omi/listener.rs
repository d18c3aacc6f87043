//! The Omi front end's TCP accept loop under the connection caps QUIC has (`--max-connections`,
//! `--max-connections-per-ip`, one count for both front ends): a connection over a cap is
//! closed as it is accepted, before a byte of it is read, and counted in
//! `spillway_ingest_connections_refused_total`. Its slot is held until the connection closes.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::admission::{Connections, Full, Slot};
use crate::metrics::{EndLabel, Metrics};

pub(crate) struct Capped {
    pub inner: TcpListener,
    pub slots: Connections,
    pub metrics: Metrics,
}

/// An accepted connection and the slot it holds.
pub(crate) struct CappedIo {
    io: TcpStream,
    _slot: Slot<IpAddr>,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.slots.try_take(&addr.ip()) {
                Ok(slot) => return (CappedIo { io, _slot: slot }, addr),
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
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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
