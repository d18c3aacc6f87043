//! `cargo xtask`: Spillway's commands over the test kit (`spillway-kit`, in `xtask/kit`).
//!
//! - [`up`]: `cargo xtask up`, a cluster with simulated devices.
//! - [`chaos`]: `cargo xtask chaos`, failure scenarios against a cluster, audited.
//! - [`attack`]: `cargo xtask attack`, attacks beside honest devices, measured.
//! - [`bench`]: `cargo xtask bench`, figures against same-run baselines.
//! - [`deploy_check`]: `cargo xtask deploy-check`, the Kubernetes manifests validated offline.
//! - [`report`]: the one Markdown table renderer their records share.

pub mod attack;
pub mod bench;
pub mod chaos;
pub mod deploy_check;
pub mod report;
pub mod up;
