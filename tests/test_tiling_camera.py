"""Distribution controller: reprojection on virtual-PTZ ground truth, pinhole PTZ, similarity from motion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import load_ptz_meta, make_ptz_clip, ptz_affine, ptz_displacement
from fluxshard.motion import MotionField, MotionStream
from fluxshard.tiling.camera import (
    CameraTracker,
    PTZState,
    Similarity,
    estimate_transform,
    ptz_delta,
    ptz_global_to_view,
    reproject_boxes,
)

TRAJ = "pan:4:10,zoom:1.02:10"


@pytest.fixture(scope="module")
def ptz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tiling_ptz") / "clip.mp4"
    meta_path = make_ptz_clip(clip_path("vtest"), out, TRAJ, still=True, codec_options={"bf": "0"})
    return out, load_ptz_meta(meta_path)


def _global_boxes(meta: dict[str, Any], n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sw, sh = meta["source_size"]
    c = rng.uniform([0, 0], [sw, sh], (n, 2))
    wh = rng.uniform(8, 60, (n, 2))
    return np.c_[c - wh / 2, c + wh / 2]


def _centres(b: np.ndarray) -> np.ndarray:
    return np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]


def test_reprojection_round_trip_on_virtual_ptz(ptz: tuple[Path, dict[str, Any]]) -> None:
    _, meta = ptz
    w, h = meta["size"]
    boxes = _global_boxes(meta)
    kept_counts = []
    for t in range(len(meta["frames"])):
        view, idx = reproject_boxes(boxes, ptz_global_to_view(meta, t), w, h)
        kept_counts.append(len(idx))
        c = _centres(view)
        assert np.all((c >= 0) & (c < [w, h]))
        # everything dropped really has its centre outside the view
        dropped = np.setdiff1d(np.arange(len(boxes)), idx)
        a_inv = ptz_global_to_view(meta, t)
        dc = _centres(boxes[dropped]) @ a_inv[:2, :2].T + a_inv[:2, 2]
        assert np.all(np.any((dc < 0) | (dc >= [w, h]), axis=1))
        # back to the global view: unclipped boxes come back exactly
        inside = np.all((view[:, :2] > 0) & (view[:, 2:] < [w, h]), axis=1)
        back, _ = reproject_boxes(view[inside], ptz_affine(meta, t), *meta["source_size"])
        assert np.allclose(back, boxes[idx][inside], atol=1e-6)
        # sizes scale with the zoom: s = source px per output px
        s = meta["frames"][t]["scale"]
        assert np.allclose((view[inside, 2] - view[inside, 0]) * s, boxes[idx][inside, 2] - boxes[idx][inside, 0])
    assert 0 < min(kept_counts) < len(boxes)  # the window shows part of the global view
    assert kept_counts[-1] < kept_counts[10]  # zooming in drops objects


def test_accumulated_deltas_equal_direct_transform(ptz: tuple[Path, dict[str, Any]]) -> None:
    _, meta = ptz
    tracker = CameraTracker(ptz_global_to_view(meta, 0))
    for t in range(1, len(meta["frames"])):
        m = tracker.update(ptz_delta(meta, t))
        assert np.allclose(m, ptz_global_to_view(meta, t), atol=1e-9)
        # the delta agrees with the codec-convention ground truth of fluxshard.data.ptz
        p = np.array([[10.0, 20.0], [300.0, 250.0]])
        d = ptz_delta(meta, t)
        prev_pts = p + ptz_displacement(meta, t, p)
        assert np.allclose(prev_pts @ d[:2, :2].T + d[:2, 2], p)


def _field_from_truth(meta: dict[str, Any], t: int, block: int, outliers: float, seed: int) -> MotionField:
    w, h = meta["size"]
    f = MotionField.zero(h, w, block)
    hb, wb = f.shape
    x0, y0 = np.arange(wb) * block, np.arange(hb) * block
    cx = (x0 + np.minimum(x0 + block, w) - 1) / 2
    cy = (y0 + np.minimum(y0 + block, h) - 1) / 2
    pts = np.stack(np.meshgrid(cx, cy), axis=-1).reshape(-1, 2)
    d = np.rint(ptz_displacement(meta, t, pts)).astype(np.int32).reshape(hb, wb, 2)
    rng = np.random.default_rng(seed)
    bad = rng.random((hb, wb)) < outliers  # moving objects / bad matches
    d[bad] = rng.integers(-20, 21, (int(bad.sum()), 2))
    f.dx, f.dy = d[..., 0].copy(), d[..., 1].copy()
    f.valid = rng.random((hb, wb)) > 0.1
    return f


@pytest.mark.parametrize("outliers", [0.0, 0.3])
def test_estimate_transform_on_synthetic_fields(ptz: tuple[Path, dict[str, Any]], outliers: float) -> None:
    _, meta = ptz
    w, h = meta["size"]
    boxes = _global_boxes(meta, seed=1)
    tracker = CameraTracker(ptz_global_to_view(meta, 0))
    errs = []
    for t in range(1, len(meta["frames"])):
        fit = tracker.update_from_field(_field_from_truth(meta, t, 16, outliers, seed=t))
        truth = ptz_delta(meta, t)
        assert fit.ok and fit.inlier_fraction > 0.6 * (1 - outliers)
        assert fit.scale == pytest.approx(truth[0, 0], abs=2e-3)
        assert fit.tx == pytest.approx(truth[0, 2], abs=0.6) and fit.ty == pytest.approx(truth[1, 2], abs=0.6)
        est, idx = tracker.reproject(boxes, w, h)
        ref, ridx = reproject_boxes(boxes, ptz_global_to_view(meta, t), w, h)
        _, ia, ib = np.intersect1d(idx, ridx, return_indices=True)
        errs.append(np.linalg.norm(_centres(est[ia]) - _centres(ref[ib]), axis=1).mean())
    print(f"mean box-centre error after {len(errs)} frames of accumulated synthetic fits "
          f"({outliers:.0%} outliers): {np.mean(errs):.2f} px (last frame {errs[-1]:.2f} px)")
    assert np.mean(errs) < 1.5


def test_estimate_transform_from_codec_vectors(ptz: tuple[Path, dict[str, Any]]) -> None:
    """The real motion front-end on the rendered clip: reprojection close to the ground-truth transform."""
    clip, meta = ptz
    w, h = meta["size"]
    boxes = _global_boxes(meta, seed=2)
    tracker = CameraTracker(ptz_global_to_view(meta, 0))
    errs, fits = [], []
    for mf in MotionStream(clip):
        t = mf.frame.index
        if t == 0:
            continue
        fits.append(tracker.update_from_field(mf.field).ok)
        est, idx = tracker.reproject(boxes, w, h)
        ref, ridx = reproject_boxes(boxes, ptz_global_to_view(meta, t), w, h)
        _, ia, ib = np.intersect1d(idx, ridx, return_indices=True)
        errs.append(np.linalg.norm(_centres(est[ia]) - _centres(ref[ib]), axis=1).mean())
    print(f"codec MVs: {sum(fits)}/{len(fits)} fits ok, mean box-centre error {np.mean(errs):.2f} px, "
          f"last frame {errs[-1]:.2f} px over {len(errs)} frames")
    assert sum(fits) >= 0.8 * len(fits)
    assert np.mean(errs) < 4.0


def test_failed_fit_repeats_previous_delta() -> None:
    f = MotionField.invalid(64, 64, 16)
    assert estimate_transform(f) == Similarity(n_valid=0)
    tracker = CameraTracker()
    step = np.array([[1.0, 0, 3], [0, 1, -2], [0, 0, 1]])
    tracker.update(step)
    fit = tracker.update_from_field(f)
    assert not fit.ok and np.allclose(tracker.matrix, step @ step)
    noise = MotionField.zero(128, 128, 16)
    rng = np.random.default_rng(0)
    noise.dx = rng.integers(-30, 31, noise.shape).astype(np.int32)
    noise.dy = rng.integers(-30, 31, noise.shape).astype(np.int32)
    assert not estimate_transform(noise).ok  # no consistent camera motion


def test_pinhole_ptz_model() -> None:
    focal, gsize, vsize = 1000.0, (1921, 1081), (641, 361)
    g_centre = np.array([960.0, 540.0, 1.0])
    rest = PTZState().homography(focal, gsize, vsize)
    assert np.allclose(rest @ g_centre, [320, 180, 1])
    # pan right by atan(dx/f): the global point dx right of centre comes to the view centre
    state = PTZState().apply(d_pan=math.degrees(math.atan(200 / focal)))
    p = state.homography(focal, gsize, vsize) @ np.array([1160.0, 540.0, 1.0])
    assert np.allclose(p[:2] / p[2], [320, 180])
    # tilt down likewise; zoom 2 doubles offsets about the centre
    state = PTZState().apply(d_tilt=math.degrees(math.atan(100 / focal)))
    p = state.homography(focal, gsize, vsize) @ np.array([960.0, 640.0, 1.0])
    assert np.allclose(p[:2] / p[2], [320, 180])
    z = PTZState().apply(d_zoom=2.0).homography(focal, gsize, vsize) @ np.array([970.0, 545.0, 1.0])
    assert np.allclose(z[:2] / z[2], [340, 190])
    # accumulation of steps equals one big step
    s = PTZState()
    for _ in range(5):
        s = s.apply(1.0, -0.5, 1.1)
    assert s.pan_deg == pytest.approx(5) and s.tilt_deg == pytest.approx(-2.5) and s.zoom == pytest.approx(1.1**5)
    # boxes behind the camera or outside the view are dropped
    behind = PTZState(pan_deg=150).homography(focal, gsize, vsize)
    assert len(reproject_boxes([[950, 530, 970, 550]], behind, *vsize)[1]) == 0
    far = PTZState(pan_deg=40).homography(focal, gsize, vsize)
    assert len(reproject_boxes([[950, 530, 970, 550]], far, *vsize)[1]) == 0
