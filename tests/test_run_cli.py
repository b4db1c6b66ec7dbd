"""`fluxshard run`: the main job, end to end on a real (virtual-PTZ) clip."""

from __future__ import annotations

import json
import os
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
    r = run_cli(str(ptz_clip), "--mode", "exact", "--verify", "--json", "--out", str(ov))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for k in ("frames", "mode", "dense_ms_median", "engine_ms_median", "speedup", "active_fraction_mean",
              "max_abs_diff", "retention_map50"):
        assert k in s, k
    assert s["frames"] == 10 and s["mode"] == "exact"
    # equal to dense up to float summation order (the sparse GEMM path sums in a different order)
    assert s["max_abs_diff"] <= 1e-4
    # 1.0 against itself, or n/a with the count and the reason when the clip holds too few objects
    if s["retention_reference_objects"] >= 100:
        assert s["retention_map50"] == 1.0 and s["retention_note"] is None
    else:
        assert s["retention_map50"] is None and s["retention_note"].startswith("n/a (only")
    assert s["retention_reference"] == "dense_outputs"
    assert s["dense_frames"] >= 1 and s["incremental_active_fraction_mean"] is not None
    assert len(list(open_video(ov))) == 10


def test_run_fast_is_the_default_and_reports_retention(ptz_clip: Path) -> None:
    r = run_cli(str(ptz_clip), "--verify", "--json", "--max-frames", "6")  # no --mode: fast
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["mode"] == "fast" and s["frames"] == 6 and s["max_abs_diff"] is not None


def test_run_rejects_bad_options(ptz_clip: Path) -> None:
    r = run_cli(str(ptz_clip), "--mode", "turbo")
    assert r.returncode != 0 and "fast or exact" in r.stderr
    r = run_cli(str(ptz_clip), "--mode", "exact", "--tau", "0.1")
    assert r.returncode != 0 and "only apply to --mode fast" in r.stderr
    r = run_cli(str(ptz_clip.with_name("missing.mp4")))
    assert r.returncode != 0 and "missing.mp4: no such file" in r.stderr


def test_run_summary_gives_no_retention_over_too_few_reference_objects() -> None:
    """5 confident dense detections in 100 frames (issue 18's handheld clip): retention n/a, the count and
    the reason — null in JSON, the reason in the table."""
    from fluxshard.engine.run import RunSummary, score_accuracy
    from fluxshard.models.base import Detections

    def det(score: float) -> Detections:
        return Detections([[10, 10, 60, 90]], [score], [0])

    ref = [det(0.9) if i < 5 else det(0.3) for i in range(100)]
    s = RunSummary("clip.mp4", "nanodet", "fast")
    score_accuracy(s, [det(0.8) for _ in range(100)], ref)
    d = s.to_dict()
    assert d["retention_map50"] is None and d["retention_map"] is None
    assert d["retention_reference_objects"] == 5
    assert d["retention_note"] == "n/a (only 5 reference objects ≥ score 0.5)"
    shown = s.display_dict()
    assert "oks_mean" not in shown and "oks_mean" in d
    assert shown["retention_map50"] == shown["retention_map"] == "n/a (only 5 reference objects ≥ score 0.5)"
    many = RunSummary("clip.mp4", "nanodet", "fast")
    score_accuracy(many, [det(0.9) for _ in range(100)], [det(0.9) for _ in range(100)])
    assert many.retention_map50 == pytest.approx(1.0) and many.retention_reference_objects == 100
    assert many.retention_note is None and many.display_dict()["retention_map50"] == many.retention_map50


def test_run_table_shows_the_reason_for_an_undefined_retention(ptz_clip: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fluxshard", "run", str(ptz_clip), "--mode", "exact", "--verify",
                        "--max-frames", "3"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "200"})  # one table row per line
    assert r.returncode == 0, r.stderr
    assert "oks_" not in r.stdout  # a detector: no pose rows
    assert "retention_reference_objects" in r.stdout
    assert "n/a (only" in r.stdout and "reference objects ≥ score 0.5)" in r.stdout  # 3 frames: far below 100


@pytest.mark.slow
def test_run_movenet_fast_reports_oks(tmp_path: Path) -> None:
    """The bundled pose model in the engine (letterboxed into its 256² input), fast mode without a shipped
    profile: the summary says where the thresholds came from and gives OKS against dense."""
    r = run_cli("vtest", "--model", "movenet", "--mode", "fast", "--verify", "--max-frames", "20", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["frames"] == 20 and s["input_hw"] == [256, 256] and s["factor"] == 3 and s["barriers"] == []
    assert "not certified" in s["fast_thresholds"] and "no profile shipped for 'movenet'" in s["fast_thresholds"]
    assert 0 < s["oks_persons"] <= 20 and 0.0 < s["oks_mean"] <= 1.0
    assert s["oks_retention"] is None and s["oks_note"].startswith(f"n/a (only {s['oks_persons']} reference persons")
    assert s["retention_map50"] is None and "pose model" in s["retention_note"]
    r = run_cli("vtest", "--model", "movenet", "--mode", "exact", "--verify", "--max-frames", "3", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["max_abs_diff"] <= 1e-3 and s["oks_mean"] == pytest.approx(1.0)  # exact: the dense poses


def test_engine_config_overrides_apply_in_every_bin() -> None:
    """`--tau` / `--tau-in` replace the shipped profile's per-layer, per-bin values (unset: the profile's)."""
    from fluxshard.cli.run import engine_config

    prof = engine_config("nanodet", "fast")
    assert prof.mode == "fast" and prof.bin_thresholds and prof.guard and prof.calibrate
    assert any(prof.thresholds_for(m)[0] for m in (0.0, 1.0, 4.0, 100.0))  # per-layer values from the profile
    cfg = engine_config("nanodet", "fast", tau=0.25, tau_in=0.03, refresh=5)
    for m in (0.0, 1.0, 4.0, 100.0):
        assert cfg.thresholds_for(m) == ({}, 0.25) and cfg.tau_in_for(m) == 0.03
    assert cfg.refresh_every == 5 and cfg.motion_bins == prof.motion_bins
    exact = engine_config("nanodet", "exact", guard=False)
    assert exact.mode == "exact" and not exact.guard and exact.tau_in == 0
