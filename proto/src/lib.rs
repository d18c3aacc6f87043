//! Spillway's wire contracts.
//!
//! - [`device`]: the QUIC device protocol (ALPN [`ALPN`]), length-delimited protobuf frames.
//! - [`uploader`]: the ingest → uploader gRPC service (`PutChunk`).
//! - [`validate`]: the rules both daemons apply to identifiers and audio parameters, written once.
//! - [`framing`]: the length-delimited codec both ends of a device stream use.

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

pub mod framing;
#[cfg(feature = "ops")]
pub mod ops;
pub mod validate;

/// ALPN protocol identifier of the device protocol, version 1.
pub const ALPN: &[u8] = b"spillway/1";

/// Bytes per sample: PCM signed 16-bit, mono.
pub const BYTES_PER_SAMPLE: usize = 2;
