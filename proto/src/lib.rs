//! Spillway's wire contracts.
//!
//! - [`device`]: the QUIC device protocol (ALPN [`ALPN`]), length-delimited protobuf frames.
//! - [`uploader`]: the ingest → uploader gRPC service (`PutChunk`).
//! - [`validate`]: the rules both daemons apply to identifiers and audio parameters, written once.
//! - [`checksum`]: CRC32C, the checksum a chunk carries end to end.
//! - [`framing`]: the length-delimited codec both ends of a device stream use.
//! - [`split`]: encoding a message whose large `bytes` field is written out on its own.
//! - [`link`]: the ingest → uploader link's mutual TLS: both ends built from the same flags
//!   (feature `flags`), so the link's security is part of its contract.
//!
//! The daemons' operational surface (`/metrics`, `/healthz`, `/readyz`, logging, signals) is
//! `spillway-ops` (`proto/ops/`), not a contract.

#![allow(clippy::doc_markdown)]

/// Generated types of `proto/device.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod device {
    include!(concat!(env!("OUT_DIR"), "/spillway.device.v1.rs"));
}

/// Generated types and gRPC stubs of `proto/uploader.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod uploader {
    include!(concat!(env!("OUT_DIR"), "/spillway.uploader.v1.rs"));
}

pub mod checksum;
pub mod framing;
pub mod link;
pub mod split;
pub mod validate;

/// ALPN protocol identifier of the device protocol, version 1.
pub const ALPN: &[u8] = b"spillway/1";

/// Bytes per sample: PCM signed 16-bit, mono.
pub const BYTES_PER_SAMPLE: usize = 2;

/// HTTP/2 flow-control windows of the ingest → uploader channel, both ends. A chunk is one
/// message of up to a few MB; with HTTP/2's default 64 KiB windows each one crawls through
/// dozens of WINDOW_UPDATE round trips. A stream window holds a 60 s chunk at 48 kHz; the
/// connection window a few of them in flight at once. Memory they allow is bounded by the
/// number of connections (one per ingest and uploader pair).
pub const GRPC_STREAM_WINDOW: u32 = 8 << 20;
/// See [`GRPC_STREAM_WINDOW`].
pub const GRPC_CONNECTION_WINDOW: u32 = 32 << 20;
