//! The test kit: everything the end-to-end tests, `cargo xtask` chaos, attack and bench share to
//! run Spillway for real on loopback. Commands live in `xtask`; this crate holds no command.
//!
//! - [`s3`]: an S3-compatible server embedded on loopback (s3s + s3s-fs).
//! - [`pipeline`]: the whole pipeline in one process, on ephemeral ports (tests).
//! - [`cluster`]: the daemons as separate processes on fixed loopback ports (chaos, bench, up).
//! - [`sim`]: simulated devices and byte-for-byte verification of what reached the store.
//! - [`pki`]: a throwaway CA and the internal link's certificates.
//! - [`rogue`]: a device that speaks the protocol badly on purpose.
//! - [`omi`]: a stand-in for Omi's listen service, the pusher WebSocket's client side.
//! - [`omi_sim`]: simulated Omi listen sessions and the audit of what they stored.
//! - [`metrics`]: reading the daemons' Prometheus text (`/metrics`).
//! - [`damage`]: a stopped spool damaged the way a bad disk does.

pub mod cluster;
pub mod damage;
pub mod metrics;
pub mod omi;
pub mod omi_sim;
pub mod pipeline;
pub mod pki;
pub mod rogue;
pub mod s3;
pub mod sim;
