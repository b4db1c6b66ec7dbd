# Sourced by the other scripts: builds (once) and activates a venv cached outside the clone.
# The venv lives in $FLUXSHARD_CACHE/venvs/<name>-<hash>, where the hash covers the requirements file and
# the Python version, so a second run (or another clone) reuses it and a changed lock makes a new one.
set -euo pipefail
FS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export FLUXSHARD_CACHE=${FLUXSHARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fluxshard}
FS_PY=${PYTHON:-python3}
if ! command -v "$FS_PY" >/dev/null 2>&1; then
  echo "error: $FS_PY not found; install Python >= 3.11 (with venv) first" >&2; exit 1
fi
fs_venv() {  # fs_venv NAME REQUIREMENTS_FILE -> sets FS_VENV
  local name=$1 req=$2 key
  key=$({ cat "$req"; "$FS_PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
  FS_VENV=$FLUXSHARD_CACHE/venvs/$name-$key
  if [ ! -f "$FS_VENV/.complete" ]; then
    echo "[setup] building venv $FS_VENV (first run only)" >&2
    rm -rf "$FS_VENV"
    mkdir -p "$FLUXSHARD_CACHE/venvs"
    "$FS_PY" -m venv "$FS_VENV"
    "$FS_VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
    "$FS_VENV/bin/python" -m pip install -q -r "$req" >&2
    touch "$FS_VENV/.complete"
  fi
  # The package itself: editable, no deps (they come from the lock), so the clone's code is what runs.
  "$FS_VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$FS_ROOT" >&2 2>/dev/null \
    || "$FS_VENV/bin/python" -m pip install -q --no-deps -e "$FS_ROOT" >&2
  export PATH="$FS_VENV/bin:$PATH"
}
