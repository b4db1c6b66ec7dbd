#!/usr/bin/env bash
# Set up everything and run the main job on the bundled default clip.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
fs_venv base "$FS_ROOT/requirements/base.txt"
cd "$FS_ROOT"
mkdir -p out
# the main job: incremental inference of the bundled NanoDet over the surveillance clip, fast mode, checked
# against dense inference on every frame (parity, speedup, accuracy retention), overlay video written
fluxshard run vtest --mode fast --verify --max-frames 300 --out out/vtest_run.mp4 "$@"
