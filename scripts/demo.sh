#!/usr/bin/env bash
# Set up everything and run the main job on the bundled default clip.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
fs_venv base "$FS_ROOT/requirements/base.txt"
cd "$FS_ROOT"
mkdir -p out
fluxshard motion bikes --out out/bikes_motion.mp4 "$@"
