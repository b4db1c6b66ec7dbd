#!/usr/bin/env bash
# Set up everything (venv, test clips) and run the linter and the test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
fs_venv base "$FS_ROOT/requirements/base.txt"
cd "$FS_ROOT"
fluxshard data fetch
ruff check .
python -m pytest -q "$@"
