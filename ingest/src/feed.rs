//! Feeding a session's audio into its chunk under the memory budget: the one loop both front
//! ends (QUIC and the Omi WebSocket) run, over the sans-IO state each keeps ([`Session`],
//! [`OmiStream`]).
//!
//! Invariant: a chunk never holds a byte its reservation does not cover. Memory is reserved in
//! steps (16 KiB, then the rest of the chunk; [`spillway_core::reserve`]) before bytes are
//! taken; waiting for the budget stops reading the transport, so its flow control slows the
//! device, and the wait is not held against the chunk's fill deadline.

use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, Reservation};
use crate::fill::FillTimer;
use crate::session::Session;
use spillway_core::omi::timeline::{OmiChunk, OmiStream};

/// What a front end's sans-IO state offers the loop.
pub(crate) trait Fill {
    type Chunk;
    /// More bytes to reserve before feeding, given `held` reserved; `None` while there is room.
    fn reservation_needed(&self, held: usize) -> Option<usize>;
    /// Grows the chunk buffer to the `held` bytes reserved.
    fn ensure_capacity(&mut self, held: usize);
    /// Bytes fed and not yet in a finished chunk.
    fn pending_bytes(&self) -> usize;
    /// Feeds up to the end of the chunk being filled: bytes taken, and the chunk they finished.
    fn feed(&mut self, pcm: &[u8]) -> (usize, Option<Self::Chunk>);
}

impl Fill for Session {
    type Chunk = crate::chunker::Chunk;
    fn reservation_needed(&self, held: usize) -> Option<usize> {
        Session::reservation_needed(self, held)
    }
    fn ensure_capacity(&mut self, held: usize) {
        Session::ensure_capacity(self, held);
    }
    fn pending_bytes(&self) -> usize {
        Session::pending_bytes(self)
    }
    fn feed(&mut self, pcm: &[u8]) -> (usize, Option<Self::Chunk>) {
        Session::feed(self, pcm)
    }
}

impl Fill for OmiStream {
    type Chunk = OmiChunk;
    fn reservation_needed(&self, held: usize) -> Option<usize> {
        OmiStream::reservation_needed(self, held)
    }
    fn ensure_capacity(&mut self, held: usize) {
        OmiStream::ensure_capacity(self, held);
    }
    fn pending_bytes(&self) -> usize {
        OmiStream::pending_bytes(self)
    }
    fn feed(&mut self, pcm: &[u8]) -> (usize, Option<Self::Chunk>) {
        OmiStream::feed(self, pcm)
    }
}

/// Why feeding stopped before the bytes were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Ingest is shutting down.
    Shutdown,
    /// The session's forwarding failed for good.
    Fatal,
}

/// Where a session's memory comes from and what interrupts a wait for it.
pub(crate) struct Budgeted<'a> {
    pub budget: &'a Budget,
    pub shutdown: &'a CancellationToken,
    pub fatal: &'a CancellationToken,
}

/// Takes what it can of `pcm` into `state`: first reserves memory when the chunk needs more,
/// then feeds up to the reserved room. Returns how many bytes were taken and, when they
/// finished a chunk, the chunk with the reservation it was filled under (`reserved` is then
/// empty). Call again with the rest.
pub(crate) async fn step<F: Fill>(
    state: &mut F,
    pcm: &[u8],
    reserved: &mut Option<Reservation>,
    fill: &mut FillTimer,
    from: &Budgeted<'_>,
) -> Result<(usize, Option<(F::Chunk, Option<Reservation>)>), Stopped> {
    let held = reserved.as_ref().map_or(0, Reservation::bytes);
    if let Some(more) = state.reservation_needed(held) {
        let waited = tokio::time::Instant::now();
        let step = tokio::select! {
            biased;
            () = from.fatal.cancelled() => return Err(Stopped::Fatal),
            r = from.budget.reserve(more, from.shutdown) => r.ok_or(Stopped::Shutdown)?,
        };
        fill.excuse(waited.elapsed());
        match reserved {
            Some(r) => r.merge(step),
            None => *reserved = Some(step),
        }
        state.ensure_capacity(held + more);
    }
    let room = reserved
        .as_ref()
        .map_or(0, Reservation::bytes)
        .saturating_sub(state.pending_bytes());
    let (taken, chunk) = state.feed(pcm.get(..room.min(pcm.len())).unwrap_or_default());
    fill.fed(
        std::time::Instant::now(),
        chunk.is_some(),
        state.pending_bytes(),
    );
    Ok((taken, chunk.map(|c| (c, reserved.take()))))
}
