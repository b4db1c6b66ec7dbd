#!/usr/bin/env bash
# Set up everything (venvs, test clips) and run the linter and the test suite.
# Stage 1: the base venv (no ultralytics, no torchvision) runs everything except `-m yolo` tests.
# Stage 2: the yolo venv (requirements/yolo.txt: ultralytics + the torch build torchvision needs; cached like
# the base one, built on first use) runs only the `-m yolo` tests. FLUXSHARD_SKIP_YOLO=1 skips stage 2.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# pytest imports torch itself, so the CLI's CPU policy (fluxshard.cpu) never runs in it: give its OpenMP
# threads the same short spin, so a loaded CI machine does not turn every barrier into a 3 ms busy wait
export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-3000}
fs_venv base "$FS_ROOT/requirements/base.txt"
cd "$FS_ROOT"
fluxshard data fetch
ruff check .
fs_pytest() {  # pytest, where "no tests selected" (exit 5, e.g. a path argument with no yolo tests) is fine
  local rc=0
  python -m pytest -q "$@" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then return "$rc"; fi
}
fs_pytest -m "not yolo" "$@"
if [ "${FLUXSHARD_SKIP_YOLO:-0}" != 1 ]; then
  fs_venv yolo "$FS_ROOT/requirements/yolo.txt"
  YOLO_OFFLINE=1 FLUXSHARD_REQUIRE_YOLO=1 fs_pytest -m yolo "$@"
fi
