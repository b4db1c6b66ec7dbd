"""fluxshard.data.ptz: rendered frames are what the JSON affine says; the displacement ground truth is exact.

Frames are checked against torch ``grid_sample`` (an implementation independent of ``ptz.resample``) driven
only by the JSON, so a wrong pixel-centre convention or an off-by-one frame would show up as a large error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import (
    ZOOM_MAX,
    Geometry,
    Segment,
    load_ptz_meta,
    make_ptz_clip,
    parse_trajectory,
    plan_trajectory,
    ptz_displacement,
    resample,
)
from fluxshard.errors import DataError
from fluxshard.video import VideoWriter, open_video

SIZE = (384, 288)
SCRIPT = "pause:4,pan:+3:8,tilt:-2:8,zoom:1.03:8,zoom:0.98:5,move:-1.5:+1:1.01:6"  # 1 + 39 = 40 frames


@pytest.fixture(scope="module")
def vtest() -> str:
    return clip_path("vtest")


@pytest.fixture(scope="module")
def vtest_first(vtest: str) -> np.ndarray:
    return next(iter(open_video(vtest, export_mvs=False, max_frames=1))).rgb


@pytest.fixture(scope="module")
def still_clip(vtest: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ptz") / "still.mp4"
    meta_path = make_ptz_clip(vtest, out, SCRIPT, size=SIZE, still=True, codec_options={"bf": "0"})
    assert meta_path == out.with_suffix(".json")
    return out, load_ptz_meta(meta_path)


def _grid_sample(src: np.ndarray, affine: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """Reference sampler: integer pixel centres ⇔ ``align_corners=True`` normalisation."""
    h_src, w_src = src.shape[:2]
    a = np.asarray(affine, dtype=np.float64)
    xs, ys = np.meshgrid(np.arange(size[0], dtype=np.float64), np.arange(size[1], dtype=np.float64))
    sx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    sy = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    grid = np.stack([2 * sx / (w_src - 1) - 1, 2 * sy / (h_src - 1) - 1], axis=-1)[None]
    img = torch.from_numpy(src).permute(2, 0, 1)[None].double()
    out = torch.nn.functional.grid_sample(img, torch.from_numpy(grid), mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()


def test_clip_matches_json_affine(still_clip: tuple[Path, dict[str, Any]], vtest_first: np.ndarray) -> None:
    out, meta = still_clip
    assert meta["source_size"] == [768, 576] and meta["size"] == list(SIZE)
    assert len(meta["frames"]) == 40 and parse_trajectory(meta["script"]) == parse_trajectory(SCRIPT)
    decoded = list(open_video(out))
    assert len(decoded) == 40
    assert {(f.width, f.height) for f in decoded} == {SIZE}
    assert {f.pict_type for f in decoded} <= {"I", "P"}
    for f in decoded:
        rec = meta["frames"][f.index]
        assert rec["index"] == f.index and rec["source_frame"] == 0
        got = f.rgb.astype(np.float64)
        err = np.abs(got - _grid_sample(vtest_first, rec["affine"], SIZE)).mean()
        assert err < 4, (f.index, err)
        if rec["action"] in ("pan", "tilt", "zoom") and f.index > 0:
            # The previous frame's transform must be clearly worse: the check can tell frames apart.
            prev = meta["frames"][f.index - 1]["affine"]
            wrong = np.abs(got - _grid_sample(vtest_first, prev, SIZE)).mean()
            assert wrong > err + 1.5, (f.index, err, wrong)


def test_pixel_centre_convention(still_clip: tuple[Path, dict[str, Any]], vtest_first: np.ndarray) -> None:
    """Decoded frames fit the JSON affine better than the same affine shifted by half a pixel either way."""
    out, meta = still_clip
    for f in open_video(out):
        if f.index not in (0, 12, 22, 39):
            continue
        a = np.asarray(meta["frames"][f.index]["affine"])
        errs = {}
        for dx, dy in ((0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)):
            shifted = a + np.array([[0, 0, dx], [0, 0, dy]])
            errs[dx, dy] = np.abs(f.rgb - _grid_sample(vtest_first, shifted.tolist(), SIZE)).mean()
        best = errs.pop((0, 0))
        assert best < 0.75 * min(errs.values()), (f.index, best, errs)


def test_scripted_trajectory_is_clamped_to_the_source() -> None:
    geom = Geometry(768, 576, *SIZE)
    _, recs = plan_trajectory("pan:+50:20,zoom:0.8:10,tilt:-40:20,zoom:1.5:10", geom)
    for rec in recs:
        a = np.asarray(rec["affine"])
        x0, y0 = a[:, 2]
        x1, y1 = a @ [SIZE[0] - 1, SIZE[1] - 1, 1]
        assert min(x0, y0) >= -1e-9 and x1 <= 767 + 1e-9 and y1 <= 575 + 1e-9, rec
    assert recs[20]["cx"] == pytest.approx(767 - (SIZE[0] - 1) / 2)  # stopped at the right border
    assert recs[30]["zoom"] == pytest.approx(geom.zoom_min) and recs[-1]["zoom"] == ZOOM_MAX
    meta = {"frames": recs}
    np.testing.assert_allclose(ptz_displacement(meta, 20, np.array([[9.0, 9.0]])), 0, atol=1e-9)


def test_resample_equals_reference_sampler(vtest_first: np.ndarray, still_clip: tuple[Path, Any]) -> None:
    meta = still_clip[1]
    for rec in meta["frames"][::7]:
        ours = resample(vtest_first, rec["affine"], SIZE).astype(np.float64)
        assert np.abs(ours - _grid_sample(vtest_first, rec["affine"], SIZE)).max() <= 0.51


def test_json_fields_are_consistent(still_clip: tuple[Path, dict[str, Any]]) -> None:
    meta = still_clip[1]
    w, h = meta["source_size"]
    f = meta["focal_px"]
    assert f == pytest.approx((w / 2) / math.tan(math.radians(30)))
    assert meta["base_scale"] == pytest.approx(1.0)
    assert json.loads(json.dumps(meta)) == meta
    start = meta["frames"][0]
    assert (start["cx"], start["cy"], start["zoom"], start["pan_deg"]) == ((w - 1) / 2, (h - 1) / 2, 1.0, 0.0)
    for rec in meta["frames"]:
        s = rec["scale"]
        assert s == pytest.approx(meta["base_scale"] / rec["zoom"])
        assert rec["affine"] == [
            [s, 0.0, pytest.approx(rec["cx"] - s * (SIZE[0] - 1) / 2)],
            [0.0, s, pytest.approx(rec["cy"] - s * (SIZE[1] - 1) / 2)],
        ]
        assert math.radians(rec["pan_deg"]) == pytest.approx(math.atan((rec["cx"] - (w - 1) / 2) / f))
        assert math.radians(rec["tilt_deg"]) == pytest.approx(math.atan((rec["cy"] - (h - 1) / 2) / f))
    last = meta["frames"][-1]
    assert last["zoom"] == pytest.approx(1.03**8 * 0.98**5 * 1.01**6)
    assert last["pan_deg"] > 0 and last["tilt_deg"] < 0


def test_displacement_ground_truth(still_clip: tuple[Path, dict[str, Any]]) -> None:
    meta = still_clip[1]
    rng = np.random.default_rng(0)
    pts = rng.uniform([0, 0], [SIZE[0] - 1, SIZE[1] - 1], size=(50, 2))
    centre = np.array([(SIZE[0] - 1) / 2, (SIZE[1] - 1) / 2])
    expect = {"pause": (0.0, 0.0), "pan": (3.0, 0.0), "tilt": (0.0, -2.0)}
    seen = set()
    for rec in meta["frames"][1:]:
        t, action = rec["index"], rec["action"]
        d = ptz_displacement(meta, t, pts)
        assert d.shape == pts.shape
        if action in expect:
            np.testing.assert_allclose(d, np.broadcast_to(expect[action], d.shape), atol=1e-9)
        elif action == "zoom":
            factor = 1.03 if rec["segment"] == 3 else 0.98
            np.testing.assert_allclose(d, (pts - centre) * (1 / factor - 1), atol=1e-9)
        # Round trip: going back and forth returns to the start point.
        back = ptz_displacement(meta, t - 1, pts + d, ref=t)
        np.testing.assert_allclose(pts + d + back, pts, atol=1e-9)
        seen.add(action)
    assert seen == {"pause", "pan", "tilt", "zoom", "move"}
    with pytest.raises(IndexError):
        ptz_displacement(meta, 0, pts)


def _warp(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples (N×3) of an output frame at output coordinates ``pts`` (N×2)."""
    h, w = img.shape[:2]
    g = np.stack([2 * pts[:, 0] / (w - 1) - 1, 2 * pts[:, 1] / (h - 1) - 1], -1)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    grid = torch.from_numpy(g)[None, None]
    out = torch.nn.functional.grid_sample(t, grid, mode="bilinear", align_corners=True)
    return out[0, :, 0].T.numpy()


def test_displacement_matches_pixels(
    still_clip: tuple[Path, dict[str, Any]], vtest_first: np.ndarray
) -> None:
    """Frame t-1 sampled at p + displacement predicts frame t (static scene); the opposite sign does not."""
    meta = still_clip[1]
    xs, ys = np.meshgrid(np.arange(SIZE[0]), np.arange(SIZE[1]))
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    for t in (10, 18, 25, 36):
        d = ptz_displacement(meta, t, pts)
        q = pts + d
        inside = (q[:, 0] >= 0) & (q[:, 0] <= SIZE[0] - 1) & (q[:, 1] >= 0) & (q[:, 1] <= SIZE[1] - 1)
        prev = resample(vtest_first, meta["frames"][t - 1]["affine"], SIZE)
        cur = resample(vtest_first, meta["frames"][t]["affine"], SIZE).reshape(-1, 3).astype(np.float64)
        err = np.abs(_warp(prev, q) - cur)[inside].mean()
        flipped = np.abs(_warp(prev, pts - d) - cur)[inside].mean()
        assert err < 3 and flipped > err + 3, (t, err, flipped)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    src=st.sampled_from([(768, 576), (640, 272), (1920, 1080), (400, 300)]),
    n=st.integers(1, 400),
)
def test_random_trajectory_deterministic_and_in_bounds(seed: int, src: tuple[int, int], n: int) -> None:
    geom = Geometry(src[0], src[1], *SIZE)
    segs, recs = plan_trajectory("random", geom, n, seed)
    assert plan_trajectory("random", geom, n, seed) == (segs, recs)
    assert len(recs) == n and sum(s.frames for s in segs) == n - 1
    w, h = SIZE
    for rec in recs:
        a = np.asarray(rec["affine"])
        corners = a @ np.array([[0, 0, 1], [w - 1, h - 1, 1]], dtype=np.float64).T
        assert corners[0].min() >= -1e-9 and corners[0].max() <= src[0] - 1 + 1e-9
        assert corners[1].min() >= -1e-9 and corners[1].max() <= src[1] - 1 + 1e-9
        assert geom.zoom_min - 1e-12 <= rec["zoom"] <= ZOOM_MAX + 1e-12
    # The recorded script replays exactly, and actuations were never clamped (motion is as scripted).
    script = ",".join(s.text() for s in segs) or "pause:1"
    if segs:
        assert plan_trajectory(script, geom, n, seed)[1] == recs
    meta = {"frames": recs}
    for rec in recs[1:]:
        seg = segs[rec["segment"]]
        if seg.action in ("pan", "tilt", "pause"):
            d = ptz_displacement(meta, rec["index"], np.array([[5.0, 7.0]]))[0]
            np.testing.assert_allclose(d, [seg.vx, seg.vy], atol=1e-6)


def test_random_trajectory_varies_with_seed() -> None:
    geom = Geometry(768, 576, *SIZE)
    scripts = {",".join(s.text() for s in plan_trajectory("random", geom, 300, seed)[0]) for seed in range(6)}
    assert len(scripts) == 6
    actions = {a.split(":")[0] for s in scripts for a in s.split(",")}
    assert actions == {"pause", "pan", "tilt", "zoom"}


@pytest.mark.parametrize(
    "bad",
    ["", ",,", "pan:3", "pan:x:3", "pan:3:0", "wobble:1", "zoom:0:5", "zoom:-1:3", "pause:2.5", "tilt:nan:4"],
)
def test_bad_trajectories(bad: str) -> None:
    with pytest.raises(DataError, match="trajectory"):
        parse_trajectory(bad)


def test_segment_text_round_trips() -> None:
    segs = parse_trajectory("pause:3, pan:+2.5:4,tilt:-1:2,zoom:1.0123:5,move:0.1:-0.2:0.99:7")
    assert [s.action for s in segs] == ["pause", "pan", "tilt", "zoom", "move"]
    assert parse_trajectory(",".join(s.text() for s in segs)) == segs
    assert segs[-1] == Segment("move", 7, 0.1, -0.2, 0.99)


def test_source_frames_advance_and_loop(tmp_path: Path) -> None:
    src = tmp_path / "src.mp4"
    rng = np.random.default_rng(1)
    with VideoWriter(src, fps=10) as wr:
        for _ in range(5):
            wr.write(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    meta = load_ptz_meta(make_ptz_clip(src, tmp_path / "o.mp4", "pan:+1:3", size=(64, 48), frames=12))
    assert [r["source_frame"] for r in meta["frames"]] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert meta["script"] == "pan:+1.0:3,pause:8" and meta["fps"] == 10
    assert len(list(open_video(tmp_path / "o.mp4"))) == 12
    meta = load_ptz_meta(make_ptz_clip(src, tmp_path / "o.mp4", "pan:+1:30", size=(64, 48), frames=4))
    assert meta["script"] == "pan:+1.0:3" and len(meta["frames"]) == 4


def test_make_ptz_clip_rejects_bad_input(tmp_path: Path, vtest: str) -> None:
    with pytest.raises(DataError, match="even"):
        make_ptz_clip(vtest, tmp_path / "a.mp4", "pause:2", size=(101, 80))
    with pytest.raises(DataError, match="video suffix"):
        make_ptz_clip(vtest, tmp_path / "a.json", "pause:2")
    with pytest.raises(DataError, match="no such PTZ metadata"):
        load_ptz_meta(tmp_path / "missing.mp4")


def test_cli_ptz(tmp_path: Path) -> None:
    from fluxshard.cli.data import app

    out = tmp_path / "cli.mp4"
    args = ["ptz", "vtest", str(out), "--seed", "3", "--frames", "12", "--size", "192x144", "--bframes", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(out), str(out.with_suffix(".json"))]
    meta = load_ptz_meta(out)
    assert meta["trajectory"] == "random" and meta["seed"] == 3 and meta["size"] == [192, 144]
    assert meta["codec_options"] == {"bf": "2"} and meta["crf"] == 18
    assert [r["source_frame"] for r in meta["frames"]] == list(range(12))
    assert len(list(open_video(out))) == 12
    res = CliRunner().invoke(app, ["ptz", "vtest", str(out), "-t", "pan:fast:3"])
    assert isinstance(res.exception, DataError) and "pan:fast:3" in str(res.exception)
    res = CliRunner().invoke(app, ["ptz", "vtest", str(out), "--size", "big"])
    assert isinstance(res.exception, DataError) and "WIDTHxHEIGHT" in str(res.exception)


def test_main_entry_reports_errors_in_one_line(tmp_path: Path) -> None:
    """Through ``python -m fluxshard``: bad input is an ``error:`` line and exit status 2, no traceback."""
    import os
    import subprocess
    import sys

    src_dir = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src_dir), os.environ.get("PYTHONPATH", "")])}
    out = str(tmp_path / "x.mp4")
    cmd = [sys.executable, "-m", "fluxshard", "data", "ptz", "vtest", out, "-t", "zoom:0:3"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: trajectory segment 'zoom:0:3': zoom factor must be > 0"
    assert not (tmp_path / "x.mp4").exists()
