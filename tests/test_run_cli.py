"""`fluxshard run`: the main job, end to end on a real (virtual-PTZ) clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import make_ptz_clip
from fluxshard.video import open_video


@pytest.fixture(scope="module")
def ptz_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "pan.mp4"
    make_ptz_clip(clip_path("vtest"), out, "pause:3,pan:4:6", size=(320, 256), crf=14)
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fluxshard", "run", *args], capture_output=True, text=True,
                          timeout=600)


def test_run_exact_verify_matches_dense(ptz_clip: Path, tmp_path: Path) -> None:
    ov = tmp_path / "ov.mp4"
    r = run_cli(str(ptz_clip), "--verify", "--json", "--out", str(ov))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for k in ("frames", "mode", "dense_ms_median", "engine_ms_median", "speedup", "active_fraction_mean",
              "max_abs_diff", "retention_map50"):
        assert k in s, k
    assert s["frames"] == 10 and s["mode"] == "exact"
    # equal to dense up to float summation order (the sparse GEMM path sums in a different order)
    assert s["max_abs_diff"] <= 1e-4
    assert s["retention_map50"] in (1.0, None)  # None only if the dense model found nothing at all
    assert s["retention_reference"] == "dense_outputs"
    assert s["dense_frames"] >= 1 and s["incremental_active_fraction_mean"] is not None
    assert len(list(open_video(ov))) == 10


def test_run_fast_reports_retention(ptz_clip: Path) -> None:
    r = run_cli(str(ptz_clip), "--mode", "fast", "--verify", "--json", "--max-frames", "6")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["mode"] == "fast" and s["frames"] == 6 and s["max_abs_diff"] is not None


def test_run_rejects_bad_options(ptz_clip: Path) -> None:
    r = run_cli(str(ptz_clip), "--mode", "turbo")
    assert r.returncode != 0 and "exact or fast" in r.stderr
    r = run_cli(str(ptz_clip), "--tau", "0.1")
    assert r.returncode != 0 and "only apply to --mode fast" in r.stderr
    r = run_cli(str(ptz_clip.with_name("missing.mp4")))
    assert r.returncode != 0 and "missing.mp4: no such file" in r.stderr
