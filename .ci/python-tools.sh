#!/usr/bin/env bash
# A Python with the packages the tests use beside Rust, pinned: `cryptography`, for the
# independent check of uploader::seal against Omi's encryption (uploader/tests/seal_python.rs),
# and `websockets`, for the independent listen client (xtask/kit/tests/omi_listen.py, driven by
# xtask/kit/tests/omi_python.rs). Makes a venv under the target directory when it is missing,
# installs what it lacks or holds at another version, and prints its interpreter's path on the
# last line:
#     export SPILLWAY_PYTHON=$(.ci/python-tools.sh | tail -1)
set -euo pipefail

CRYPTOGRAPHY_VERSION=48.0.0
WEBSOCKETS_VERSION=17.4
venv="${CARGO_TARGET_DIR:-$HOME/.cache/spillway-target}/tools/py"
python="$venv/bin/python"
# The pins the venv lacks, as pip requirements (empty when it has them all).
missing() {
    [ -x "$python" ] || { echo "cryptography==$CRYPTOGRAPHY_VERSION websockets==$WEBSOCKETS_VERSION"; return; }
    "$python" - "$CRYPTOGRAPHY_VERSION" "$WEBSOCKETS_VERSION" <<'PY'
import importlib, sys
want = {"cryptography": sys.argv[1], "websockets": sys.argv[2]}
out = []
for name, version in want.items():
    try:
        ok = importlib.import_module(name).__version__ == version
    except ImportError:
        ok = False
    if not ok:
        out.append(f"{name}=={version}")
print(" ".join(out))
PY
}
need="$(missing)"
if [ -n "$need" ]; then
    echo "python-tools: installing $need in $venv" >&2
    [ -x "$python" ] || python3 -m venv "$venv" >&2
    # shellcheck disable=SC2086 # one requirement per word
    "$python" -m pip install --quiet --disable-pip-version-check $need >&2
    need="$(missing)"
    [ -z "$need" ] || { echo "python-tools: $python still lacks $need" >&2; exit 1; }
fi
echo "$python"
