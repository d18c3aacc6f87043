//! The device side of resuming, sans-IO: the audio a device holds until ingest acknowledges it,
//! and where to (re)start sending after a reconnect. The async client in `spillway_ingest::client`
//! drives it; its tests here need no network and no clock.
//!
//! Invariants:
//! - Audio leaves the outbox only through an `Ack` covering it: nothing unacknowledged is ever
//!   forgotten, whatever happens to connections.
//! - The outbox never holds more than `max_bytes`: [`Outbox::push`] takes only what fits, so the
//!   producer is held back (memory is bounded by configuration, not by the length of an outage).
//! - After a reconnect, sending restarts at the resume point ingest announced, which is always
//!   inside what the outbox still holds.

use bytes::{Buf, Bytes, BytesMut};
use spillway_proto::BYTES_PER_SAMPLE;

/// A protocol violation by ingest: the client must not trust the stream any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    #[error("ingest asked to start at sample {start}, but the device holds samples {held:?}")]
    StartOutside {
        start: u64,
        held: std::ops::Range<u64>,
    },
    #[error("ack for samples [{first}, {end}) does not continue from sample {expected}")]
    AckOutOfOrder { first: u64, end: u64, expected: u64 },
    #[error("ack up to sample {end} covers audio never sent (sent up to sample {sent})")]
    AckBeyondSent { end: u64, sent: u64 },
    /// The receipt does not match what the device sent: the audio is kept and resent.
    #[error(
        "ack for samples [{first}, {end}) has receipt crc32c {committed:08x}, but the device sent {sent:08x}: kept for resending"
    )]
    ReceiptMismatch {
        first: u64,
        end: u64,
        committed: u32,
        sent: u32,
    },
}

/// Unacknowledged audio of one session.
#[derive(Debug)]
pub struct Outbox {
    /// Session byte offset of `buf[0]`; always a whole sample.
    base: u64,
    buf: BytesMut,
    /// Session byte offset up to which bytes went out on the current stream.
    sent: u64,
    max_bytes: usize,
    finished: bool,
}

impl Outbox {
    /// An empty outbox holding at most `max_bytes` (at least one sample).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            base: 0,
            buf: BytesMut::new(),
            sent: 0,
            max_bytes: max_bytes.max(BYTES_PER_SAMPLE),
            finished: false,
        }
    }

    /// Bytes that may still be pushed.
    pub fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.buf.len())
    }

    /// Bytes held (sent or not) that are not yet acknowledged.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Takes as much of `pcm` as fits; returns how many bytes were taken.
    pub fn push(&mut self, pcm: &[u8]) -> usize {
        let take = self.room().min(pcm.len());
        self.buf.extend_from_slice(&pcm[..take]);
        take
    }

    /// The producer has no more audio.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The resume point to put in the next hello: the first unacknowledged sample.
    pub fn resume_from(&self) -> u64 {
        self.base / BYTES_PER_SAMPLE as u64
    }

    /// A new stream was accepted starting at `start_sample`: sending restarts there.
    pub fn on_accepted(&mut self, start_sample: u64) -> Result<(), OutboxError> {
        let start = start_sample.saturating_mul(BYTES_PER_SAMPLE as u64);
        let end = self.base + self.buf.len() as u64;
        if start < self.base || start > end {
            return Err(OutboxError::StartOutside {
                start: start_sample,
                held: self.resume_from()..end / BYTES_PER_SAMPLE as u64,
            });
        }
        self.sent = start;
        Ok(())
    }

    /// The next bytes to send on the current stream, at most `max` of them.
    pub fn next_frame(&self, max: usize) -> Option<Bytes> {
        let from = usize::try_from(self.sent - self.base).ok()?;
        if from >= self.buf.len() {
            return None;
        }
        let to = self.buf.len().min(from.saturating_add(max.max(1)));
        Some(Bytes::copy_from_slice(&self.buf[from..to]))
    }

    /// `n` bytes from [`Outbox::next_frame`] went out.
    pub fn on_sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    /// True once everything held went out on the current stream.
    pub fn all_sent(&self) -> bool {
        self.sent >= self.base + self.buf.len() as u64
    }

    /// Ingest acknowledged samples `[first, end)` with receipt `crc32c` (the CRC32C of the bytes
    /// committed; `None` from an ingest that sends none). They are durable and, when the receipt
    /// matches what was sent, the outbox forgets them; on a mismatch it keeps them and answers
    /// [`OutboxError::ReceiptMismatch`]: the caller reconnects and resends from `first`.
    pub fn on_ack(&mut self, first: u64, end: u64, crc32c: Option<u32>) -> Result<(), OutboxError> {
        let expected = self.resume_from();
        if first != expected || end < first {
            return Err(OutboxError::AckOutOfOrder {
                first,
                end,
                expected,
            });
        }
        let end_byte = end.saturating_mul(BYTES_PER_SAMPLE as u64);
        if end_byte > self.sent {
            return Err(OutboxError::AckBeyondSent {
                end,
                sent: self.sent / BYTES_PER_SAMPLE as u64,
            });
        }
        let n = (end_byte - self.base) as usize;
        if let Some(committed) = crc32c {
            let sent = spillway_proto::checksum::crc32c(&self.buf[..n]);
            if sent != committed {
                return Err(OutboxError::ReceiptMismatch {
                    first,
                    end,
                    committed,
                    sent,
                });
            }
        }
        self.buf.advance(n);
        self.base = end_byte;
        Ok(())
    }

    /// True when the producer is done and every whole sample is acknowledged (a dangling odd
    /// byte can never be, and ingest reports it).
    pub fn is_done(&self) -> bool {
        self.finished && self.buf.len() < BYTES_PER_SAMPLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(o: &mut Outbox, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(f) = o.next_frame(max) {
            o.on_sent(f.len());
            out.extend_from_slice(&f);
        }
        out
    }

    #[test]
    fn holds_audio_until_acked_and_resends_from_the_resume_point() {
        let mut o = Outbox::new(100);
        assert_eq!(o.push(&[1; 60]), 60);
        assert_eq!(o.push(&[2; 60]), 40, "bounded: only what fits is taken");
        assert_eq!(o.room(), 0);
        o.on_accepted(0).unwrap();
        assert_eq!(drain(&mut o, 7).len(), 100);
        o.on_ack(0, 30, None).unwrap();
        assert_eq!((o.held(), o.room(), o.resume_from()), (40, 60, 30));

        // The connection dies; ingest accepts the new stream at the resume point.
        o.on_accepted(o.resume_from()).unwrap();
        let resent = drain(&mut o, 1000);
        assert_eq!(resent.len(), 40, "everything unacknowledged goes out again");
        assert_eq!(resent[..], [[1u8; 0].as_slice(), &[2; 40]].concat()[..]);
        o.on_ack(30, 50, None).unwrap();
        o.finish();
        assert!(o.is_done());
    }

    #[test]
    fn refuses_what_a_correct_ingest_never_says() {
        let mut o = Outbox::new(100);
        o.push(&[0; 20]);
        assert!(matches!(
            o.on_accepted(11),
            Err(OutboxError::StartOutside { .. })
        ));
        o.on_accepted(0).unwrap();
        o.on_sent(10);
        assert!(matches!(
            o.on_ack(0, 6, None),
            Err(OutboxError::AckBeyondSent { .. })
        ));
        assert!(matches!(
            o.on_ack(1, 2, None),
            Err(OutboxError::AckOutOfOrder { .. })
        ));
        o.on_ack(0, 5, None).unwrap();
        assert!(matches!(
            o.on_accepted(0),
            Err(OutboxError::StartOutside { .. }),
        ));
    }

    #[test]
    fn a_dangling_byte_does_not_keep_a_finished_session_open() {
        let mut o = Outbox::new(100);
        o.push(&[0; 5]);
        o.finish();
        o.on_accepted(0).unwrap();
        drain(&mut o, 100);
        assert!(!o.is_done());
        o.on_ack(0, 2, None).unwrap();
        assert!(o.is_done());
    }

    #[test]
    fn audio_is_freed_only_when_the_receipt_matches_what_was_sent() {
        let mut o = Outbox::new(100);
        let pcm: Vec<u8> = (0..40u8).collect();
        o.push(&pcm);
        o.on_accepted(0).unwrap();
        drain(&mut o, 100);
        let good = spillway_proto::checksum::crc32c(&pcm[..20]);
        // The uploader committed other bytes: nothing is forgotten, the error says so.
        let err = o.on_ack(0, 10, Some(good ^ 1)).unwrap_err();
        assert!(
            matches!(
                err,
                OutboxError::ReceiptMismatch {
                    first: 0,
                    end: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!((o.held(), o.resume_from()), (40, 0), "kept for resending");
        // Resent and committed right: freed.
        o.on_accepted(o.resume_from()).unwrap();
        drain(&mut o, 100);
        o.on_ack(0, 10, Some(good)).unwrap();
        assert_eq!((o.held(), o.resume_from()), (20, 10));
    }
}
