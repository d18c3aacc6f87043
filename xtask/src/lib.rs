//! `cargo xtask`: local orchestration of Spillway, plus the harness its end-to-end tests use.
//!
//! - [`s3`]: an S3-compatible server embedded on loopback (s3s + s3s-fs).
//! - [`pipeline`]: the whole pipeline in one process, on ephemeral ports (tests).
//! - [`sim`]: simulated devices and byte-for-byte verification of what reached the store.
//! - [`chaos`]: `cargo xtask chaos`, failure scenarios against a cluster, audited.
//! - [`cluster`]: the daemons as separate processes on fixed loopback ports.
//! - [`up`]: `cargo xtask up`, a cluster with simulated devices.
//! - [`bench`]: `cargo xtask bench`, figures against same-run baselines.
//! - [`metrics`]: reading the daemons' Prometheus text (`/metrics`).
//! - [`deploy_check`]: `cargo xtask deploy-check`, the Kubernetes manifests validated offline.
//! - [`unused_deps`]: `cargo xtask unused-deps`, every declared dependency used.

pub mod attack;
pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod deploy_check;
pub mod metrics;
pub mod pipeline;
pub mod pki;
pub mod report;
pub mod rogue;
pub mod s3;
pub mod sim;
pub mod unused_deps;
pub mod up;
