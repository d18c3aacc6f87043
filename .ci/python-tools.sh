#!/usr/bin/env bash
# A Python with the packages the tests use beside Rust: `cryptography` (pinned), for the
# independent check of uploader::seal against Omi's encryption (uploader/tests/seal_python.rs).
# Makes a venv under the target directory when it is missing or holds another version, and
# prints its interpreter's path on the last line:
#     export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)
set -euo pipefail

CRYPTOGRAPHY_VERSION=48.0.0
venv="${CARGO_TARGET_DIR:-$HOME/.cache/spillway-target}/tools/py"
python="$venv/bin/python"
has() {
    [ -x "$python" ] && [ "$("$python" -c 'import cryptography; print(cryptography.__version__)' 2>/dev/null)" = "$CRYPTOGRAPHY_VERSION" ]
}
if ! has; then
    echo "python-tools: installing cryptography==$CRYPTOGRAPHY_VERSION in $venv" >&2
    [ -x "$python" ] || python3 -m venv "$venv" >&2
    "$python" -m pip install --quiet --disable-pip-version-check \
        "cryptography==$CRYPTOGRAPHY_VERSION" >&2
    has || { echo "python-tools: $python still lacks cryptography $CRYPTOGRAPHY_VERSION" >&2; exit 1; }
fi
echo "$python"
