"""`fluxshard tile` / `tile-bench` end to end on a tiny virtual-PTZ clip (shipped profile, few frames)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import make_ptz_clip
from fluxshard.tiling.profile import load_profile
from fluxshard.tiling.profiler import shipped_profile_path


@pytest.fixture(scope="module")
def ptz_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tile") / "pz.mp4"
    make_ptz_clip(clip_path("vtest"), out, "pause:2,pan:4:3,zoom:1.03:3", size=(448, 336))
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fluxshard", *args], capture_output=True, text=True, timeout=900)


def test_shipped_profile_loads() -> None:
    prof = load_profile(shipped_profile_path("nanodet"))
    assert prof.names == ["nanodet320", "nanodet416", "nanodet512", "nanodet640"]
    assert "remix" in prof.meta and len(prof.meta["remix"]["accuracy"]["nanodet640"]) == 12


def test_tile_json(ptz_clip: Path, tmp_path: Path) -> None:
    ov = tmp_path / "ov.mp4"
    r = cli("tile", str(ptz_clip), "--slo", "150", "--json", "--profile", "shipped", "--history", "2",
            "--max-frames", "5", "--out", str(ov), "--views", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    for k in ("map", "map50", "latency_median_ms", "miss_rate", "overhead_share", "plan_types", "camera",
              "reprojection_error_px", "plan_runtime_ms", "quadtree_depth"):
        assert k in s, k
    assert s["frames"] == 5 and s["mode"] == "conservative" and s["camera"] == "ground-truth PTZ JSON"
    assert 0 <= s["miss_rate"] <= 1 and 0 <= s["overhead_share"] < 1
    assert sum(s["plan_types"].values()) == pytest.approx(1.0)
    assert s["reprojection_error_px"] is not None and s["reprojection_error_px"] < 10
    assert ov.exists() and ov.stat().st_size > 0


@pytest.mark.slow  # --views 1 measures a deployment profile (minutes; the tests' own cache is empty)
def test_tile_motion_vectors_without_json(ptz_clip: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.mp4"
    shutil.copy(ptz_clip, bare)  # no JSON beside it: camera from motion vectors, history from the clip
    r = cli("tile", str(bare), "--slo", "80", "--mode", "non-conservative", "--json", "--profile", "shipped",
            "--history", "2", "--max-frames", "4", "--views", "1")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["camera"] == "motion vectors" and s["reprojection_error_px"] is None and s["frames"] == 4


def test_ptz_sidecar_ignores_unrelated_json(ptz_clip: Path, tmp_path: Path) -> None:
    """A .json beside a clip that is not virtual-PTZ metadata (another tool's file) is ignored with a reason;
    only --camera gt, which needs the ground truth, fails on it. The PTZ JSON itself is readable by all."""
    from fluxshard.tiling.evaluate import TileBenchError, ptz_sidecar, run_clip

    meta, why = ptz_sidecar(ptz_clip)
    assert meta is not None and why is None
    assert stat.S_IMODE(ptz_clip.with_suffix(".json").stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    clip = tmp_path / "street.mp4"
    shutil.copy(ptz_clip, clip)
    assert ptz_sidecar(clip) == (None, None)
    clip.with_suffix(".json").write_text(json.dumps({"labels": ["car", "person"]}))
    meta, why = ptz_sidecar(clip)
    assert meta is None and why is not None and "not a PTZ metadata file" in why and "street.json" in why
    with pytest.raises(TileBenchError, match=r"--camera gt needs the virtual-PTZ JSON .*not a PTZ metadata file"):
        run_clip(clip, None, None, [50.0], camera="gt")  # type: ignore[arg-type]  # fails before any model runs


def test_tile_with_unrelated_json_warns_and_finishes_its_bars(ptz_clip: Path, tmp_path: Path) -> None:
    clip = tmp_path / "street.mp4"
    shutil.copy(ptz_clip, clip)
    clip.with_suffix(".json").write_text("[1, 2, 3]\n")
    r = cli("tile", str(clip), "--slo", "150", "--profile", "shipped", "--history", "1", "--max-frames", "2",
            "--views", "0")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "street.json" in warnings[0] and "motion vectors" in warnings[0]
    assert "motion vectors" in r.stdout and "…" not in r.stdout
    counts = re.findall(r"(\d+)/(\d+)", r.stderr)  # the bars as left on screen: every one finished
    assert counts and all(a == b for a, b in counts), r.stderr


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow  # --views 1 measures a deployment profile (minutes; the tests' own cache is empty)
def test_tile_bench_outputs(ptz_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "tb"
    r = cli("tile-bench", str(ptz_clip), "--slo", "60,200", "--json", "--profile", "shipped", "--history", "2",
            "--max-frames", "4", "--out", str(out), "--views", "1")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["slos"] == [60.0, 200.0]
    methods = {(row["method"], row["slo_ms"]) for row in data["summary"]}
    for slo in (60.0, 200.0):
        for m in ("uirapuru-c", "uirapuru-nc", "remix", "remix-c", "ds", "ut", "ds-c", "ut-c"):
            assert (m, slo) in methods
    for row in data["summary"]:
        if row["slo_ms"] is not None:
            assert row["meets_bar"] == (row["miss_rate"] <= 0.01)
            assert row["map_on_time"] is None or row["map"] is None or row["map_on_time"] <= row["map"] + 1e-9
    comp = {(c["mode"], c["slo_ms"]) for c in data["comparison"]}
    assert comp == {(m, s) for m in ("uirapuru-c", "uirapuru-nc") for s in (60.0, 200.0)}
    for name in ("ds-nanodet320", "ut-nanodet640"):
        assert (name, None) in methods
    ref = next(row for row in data["summary"] if row["method"] == "ut-nanodet416")  # the reference member
    # the plain reference is UT with the reference member itself; the overlapping one adds shifted cells
    assert ref["map_plain_ref"] == pytest.approx(1.0, abs=1e-6) or ref["map_plain_ref"] is None
    assert "deployment profile" in data["clips"][0]["profile"]
    assert "half-cell" in data["clips"][0]["reference"]
    for f in ("frames_csv", "summary_csv", "report"):
        assert Path(data[f]).exists()
    assert all(Path(p).exists() for p in data["plots"]) and len(data["plots"]) == 2
    with open(data["frames_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} >= {"uirapuru-c", "remix", "ds-nanodet416"}
    report = Path(data["report"]).read_text()
    assert "| SLO (ms) |" in report and "best baseline" in report


@pytest.mark.parametrize("args, needle", [
    (["tile", "/nonexistent/clip.mp4", "--slo", "50", "--profile", "shipped"], "/nonexistent/clip.mp4"),
    (["tile-bench", "vtest", "--slo", "fast", "--profile", "shipped"], "--slo"),
    (["tile", "vtest", "--slo", "50", "--profile", "/nonexistent/p.json"], "/nonexistent/p.json"),
    (["tile", "vtest", "--slo", "50", "--mode", "greedy"], "--mode"),
])
def test_errors_are_one_line(args: list[str], needle: str) -> None:
    r = cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
