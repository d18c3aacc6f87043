#!/usr/bin/env bash
# Every dependency a workspace member declares must be used by its code: `cargo xtask
# unused-deps` (cargo metadata, then a search of each member's sources for each dependency's
# crate name). cargo-machete and cargo-udeps are not in the offline registry, so the check is
# xtask's own. A dependency only generated code uses is listed, with the reason, under
# [package.metadata.unused-deps] ignored in its member's Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spillway-target}"
cargo xtask unused-deps
