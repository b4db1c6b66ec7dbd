"""`fluxshard bench`: every method in one harness on a short virtual-PTZ clip (pause, then a 4 px/frame pan)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.bench.harness import METHODS, _SceneReuse, parse_methods
from fluxshard.bench.plots import MARKER_SIZE, PLOT_NAMES, dodge, plot_tradeoff, tradeoff_figure
from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import make_ptz_clip
from fluxshard.errors import FluxShardError

FRAMES = 12


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[dict[str, str]]]:
    d = tmp_path_factory.mktemp("bench")
    clip = d / "pan.mp4"
    make_ptz_clip(clip_path("vtest"), clip, "pause:3,pan:4:8", size=(320, 256), crf=14)
    out = d / "out"
    r = subprocess.run([sys.executable, "-m", "fluxshard", "bench", str(clip), "--max-frames", str(FRAMES),
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # one JSON object, nothing else on stdout
    data = json.loads(lines[0])
    with (out / "frames.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return out, data, rows


def _summary(data: dict[str, Any], method: str) -> dict[str, Any]:
    (s,) = [s for s in data["summary"] if s["method"] == method]
    return s


def test_csv_has_every_method_and_frame(bench_run: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    _, data, rows = bench_run
    assert data["methods"] == list(METHODS)
    frames = sorted({int(r["frame"]) for r in rows})
    assert frames == list(range(FRAMES))
    assert {(r["method"], int(r["frame"])) for r in rows} == {(m, f) for m in METHODS for f in frames}
    assert len(rows) == len(METHODS) * FRAMES
    fast = [r for r in rows if r["method"] == "fluxshard-fast" and r["dense"] == "0"]
    assert fast and all(len(json.loads(r["layer_active"])) > 10 for r in fast)  # one entry per convolution


def test_dense_and_exact_retention(bench_run: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    _, data, _ = bench_run
    dense = _summary(data, "dense")
    exact = _summary(data, "fluxshard-exact")
    assert dense["max_abs_diff"] == 0.0
    n = dense["retention_reference_objects"]
    for s in (dense, exact):  # 1.0 against itself, or n/a with the count when the clip holds too few objects
        assert s["retention_reference_objects"] == n
        if n >= 100:
            assert s["retention_map50"] == 1.0 and s["retention_map"] == 1.0 and s["retention_note"] is None
        else:
            assert s["retention_map50"] is None and s["retention_map"] is None
            assert s["retention_note"] == f"n/a (only {n} reference objects ≥ score 0.5)"
    assert exact["max_abs_diff"] <= 1e-4
    assert exact["dense_frames"] >= 1 and exact["frames"] == FRAMES
    assert dense["retention_reference"] == "dense_outputs"
    for s in data["summary"]:
        assert s["speedup"] is not None and s["speedup"] > 0
        assert 0.0 <= s["hit_ratio"] <= 1.0
    # fast mode truncates: it must reuse something on this clip, unlike dense
    assert _summary(data, "fluxshard-fast")["hit_ratio"] > 0.1 and dense["hit_ratio"] == 0.0


def test_mv_alignment_shrinks_input_residual(bench_run: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    _, _, rows = bench_run

    def residual(method: str) -> dict[int, tuple[float, float]]:
        return {int(r["frame"]): (float(r["motion_px"]), float(r["input_residual_fraction"]))
                for r in rows if r["method"] == method and r["dense"] == "0"}

    delta, fast = residual("delta"), residual("fluxshard-fast")
    panning = [f for f, (px, _) in fast.items() if px > 1.0]
    assert len(panning) >= 5, panning
    for f in panning:
        assert delta[f][1] > fast[f][1] + 0.1, (f, delta[f], fast[f])


def test_report_and_plots(bench_run: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, data, _ = bench_run
    report = (out / "report.md").read_text()
    assert "| clip (input) | method |" in report and "hit ratio" in report and "dense outputs" in report
    for m in METHODS:
        assert f"| {m} |" in report, m
    for name in PLOT_NAMES:
        p = out / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(Path(p).name for p in data["plots"]) == sorted(PLOT_NAMES)
    assert "By motion bin" in report
    (pan,) = [b for b in data["motion_bins"] if b["motion_bin"] == "2-4"]  # the 4 px/frame pan
    assert pan["frames"] >= 5 and pan["residual_without_mv"] > pan["residual_with_mv"]


def test_parse_methods() -> None:
    assert parse_methods("fluxshard-fast,delta") == ["dense", "delta", "fluxshard-fast"]  # dense is the reference
    assert parse_methods(None) == list(METHODS)
    with pytest.raises(FluxShardError, match="unknown method"):
        parse_methods("dense,turbo")


def test_scene_reuse_test() -> None:
    calls: list[int] = []

    def compute() -> tuple[Any, Any]:
        calls.append(1)
        return len(calls), f"dets{len(calls)}"

    sr = _SceneReuse(threshold=1.5, k=8)
    a = np.full((64, 64), 100, np.uint8)
    assert sr.step(a, compute)[2] is False  # first frame: computed
    assert sr.step(a + 1, compute)[1:] == ("dets1", True)  # mean |Δ| = 1 < 1.5: reused
    assert sr.step(a + 2, compute)[2] is False  # compared with the last *computed* frame: 2 ≥ 1.5
    assert len(calls) == 2


def test_table_marks_retention_below_the_target() -> None:
    """A method below the profiles' retention target is marked, with a note that its speed is not comparable;
    the target comes from the profile the harness ran."""
    from fluxshard.bench.harness import _target_of
    from fluxshard.bench.report import markdown_table
    from fluxshard.engine.engine import default_profile

    row = {"clip": "c", "input_hw": (4, 8), "frames": 3, "speedup": 1.2, "ms_median": 9.0, "retention_map": 0.9,
           "hit_ratio": 0.5, "input_residual_fraction": 0.1, "dense_frames": 1, "max_abs_diff": 0.1}
    rows = [{**row, "method": "delta", "retention_map50": 0.967}, {**row, "method": "fast", "retention_map50": 0.995}]
    marked = markdown_table(rows, 0.99)
    assert "| 0.967 † |" in marked and "| 0.995 |" in marked and "† below the profiles' retention target" in marked
    assert "†" not in markdown_table(rows) and "†" not in markdown_table(rows[1:], 0.99)
    assert _target_of(default_profile("nanodet")) == 0.99 and _target_of(None) is None


def test_too_few_reference_objects_read_na_with_the_count(tmp_path: Path) -> None:
    """A clip whose dense run holds 5 confident objects: the table, the summary CSV and the means over clips
    give no retention for it, only the count and the reason."""
    import csv as csv_mod

    from fluxshard.bench.report import markdown_table, mean_retention, write_summary_csv

    row = {"input_hw": (4, 8), "frames": 100, "speedup": 1.2, "ms_median": 9.0, "hit_ratio": 0.5,
           "input_residual_fraction": 0.1, "dense_frames": 1, "max_abs_diff": 0.1, "method": "fluxshard-fast"}
    few = {**row, "clip": "handheld", "retention_map50": None, "retention_map": None,
           "retention_reference_objects": 5, "retention_note": "n/a (only 5 reference objects ≥ score 0.5)"}
    ok = {**row, "clip": "vtest", "retention_map50": 0.98, "retention_map": 0.9, "retention_reference_objects": 812,
          "retention_note": None}
    table = markdown_table([few, ok])
    assert "| n/a (only 5 reference objects ≥ score 0.5) | n/a | 5 |" in table
    assert "| 0.980 | 0.900 | 812 |" in table and "fewer than 100 detections with score ≥ 0.5" in table
    assert "fewer than" not in markdown_table([ok])
    assert mean_retention([few, ok], "fluxshard-fast") == pytest.approx(0.98)  # skipped, not averaged as 0
    assert mean_retention([few], "fluxshard-fast") is None
    with write_summary_csv([few, ok], tmp_path / "summary.csv").open() as fh:
        rows = list(csv_mod.DictReader(fh))
    assert (rows[0]["retention_map50"], rows[0]["retention_reference_objects"]) == ("n/a", "5")
    assert rows[0]["retention_note"].startswith("n/a (only 5")
    assert (rows[1]["retention_map50"], rows[1]["retention_reference_objects"]) == ("0.98", "812")


def _trade_summaries() -> list[dict[str, Any]]:
    # dense, scene-reuse and exact coincide at (1.0, 1.0) on a static clip; one method without a retention
    rows = [("a", "dense", 1.0, 1.0), ("a", "scene-reuse", 1.0, 1.0), ("a", "fluxshard-exact", 1.001, 1.0),
            ("a", "fluxshard-fast", 1.6, 0.96), ("b", "dense", 1.0, 1.0), ("b", "fluxshard-fast", 1.4, 0.97),
            ("b", "naive-mv", 1.5, None)]
    return [{"clip": c, "method": m, "speedup": x, "retention_map50": y, "hit_ratio": 0.5} for c, m, x, y in rows]


def test_tradeoff_plot_legend_target_and_distinct_points(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    fig = tradeoff_figure(_trade_summaries(), target=0.95)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(t.strip() and not t.startswith("_") for t in texts), texts
    # only what is drawn: naive-mv has no retention, delta was not run
    assert texts == ["retention target 0.95", "dense", "scene-reuse", "fluxshard-exact", "fluxshard-fast", "a", "b"]
    assert any(list(ln.get_ydata()) == [0.95, 0.95] for ln in ax.get_lines())
    pts = np.vstack([c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections
                     if isinstance(c, PathCollection) and len(c.get_offsets())])
    assert len(pts) == 6
    diameter = np.sqrt(MARKER_SIZE) * fig.dpi / 72
    gaps = np.abs(pts[:, None, :] - pts[None, :, :]).max(axis=2) + np.eye(len(pts)) * 1e9
    assert gaps.min() >= diameter, gaps.min()  # no marker covers another
    notes = " ".join(t.get_text() for t in ax.texts)
    assert "b: naive-mv" in notes and "spread sideways" in notes  # what is not drawn, and what was moved, is said
    plt.close(fig)
    no_target = tradeoff_figure(_trade_summaries())
    assert "retention target" not in " ".join(t.get_text() for t in no_target.axes[0].get_legend().get_texts())
    plt.close(no_target)
    out = plot_tradeoff(_trade_summaries(), tmp_path / "t.png", 0.95)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dodge_spreads_only_close_points() -> None:
    pts = np.array([[100.0, 50.0], [101.0, 50.0], [300.0, 50.0], [100.0, 200.0]])
    out = dodge(pts, 10.0)
    assert np.allclose(out[2:], pts[2:])  # far points stay where they are
    assert out[1, 0] - out[0, 0] == pytest.approx(10.0) and out[0, 1] == out[1, 1] == 50.0
    assert out[:2, 0].mean() == pytest.approx(100.5)
    chain = dodge(np.array([[0.0, 0.0], [8.0, 0.0], [16.0, 0.0]]), 10.0)  # spreading one pair hits the third
    d = np.abs(chain[:, None, 0] - chain[None, :, 0]) + np.eye(3) * 1e9
    assert d.min() >= 10.0 - 1e-9


def test_make_plots_passes_the_profile_target_to_the_tradeoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              recwarn: pytest.WarningsRecorder) -> None:
    import fluxshard.bench.plots as plots
    from fluxshard.bench.harness import ClipResult

    seen: list[float | None] = []
    real = plots.plot_tradeoff
    monkeypatch.setattr(plots, "plot_tradeoff", lambda s, p, t=None: (seen.append(t), real(s, p, t))[1])
    results = [ClipResult("a", "a.mp4", (64, 64), 1, "codec", {"target_retention": 0.95})]
    paths = plots.make_plots(results, _trade_summaries(), tmp_path)
    assert seen == [0.95] and all(p.is_file() for p in paths)
    assert not [w for w in recwarn if "legend" in str(w.message)]  # no empty legend on a plot without data
