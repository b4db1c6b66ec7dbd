"""Baselines (down-sampling, uniform tiling, Remix-like planner) and the profiler's per-bin accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from fluxshard.models.base import Detections
from fluxshard.tiling.baselines import (
    RemixPlanner,
    downsample_plan,
    fitting,
    pick_for_slo,
    tiles_per_frame,
    uniform_plan,
)
from fluxshard.tiling.bins import EDGES, N_BINS
from fluxshard.tiling.profile import FamilyProfile, synthetic_family
from fluxshard.tiling.profiler import REMIX_EDGES, _bin_ap, _clip_reference, fill_bins, sub_images


def _with_remix(fam: FamilyProfile) -> FamilyProfile:
    """Remix accuracy: grows with the object side in input px, saturating at 100 px; larger inputs better."""
    centres = np.r_[4.0, (REMIX_EDGES[:-1] + REMIX_EDGES[1:]) / 2, 250.0]
    acc = {m.name: list(np.clip(centres / 100, 0, 1) * (0.6 + 0.4 * m.input_size / 640)) for m in fam.models}
    meta = {"remix": {"edges_px": list(REMIX_EDGES), "accuracy": acc}}
    return FamilyProfile(fam.models, fam.plan_runtime_ms, meta)


def test_fixed_plans() -> None:
    assert downsample_plan(640, 480, 2) == [((0.0, 0.0, 640.0, 480.0), 2)]
    ut = uniform_plan(1280, 960, 512, 1)
    assert len(ut) == tiles_per_frame(1280, 960, 512) == 3 * 2
    assert all(m == 1 for _, m in ut)
    assert sum((x1 - x0) * (y1 - y0) for (x0, y0, x1, y1), _ in ut) == pytest.approx(1280 * 960)


def test_pick_for_slo() -> None:
    fam = synthetic_family((320, 416, 512, 640), base_ms=10)  # means 10, 16.9, 25.6, 40
    ones = [1, 1, 1, 1]
    assert pick_for_slo(fam, 100, ones) == 3
    assert pick_for_slo(fam, 30, ones) == 2
    assert pick_for_slo(fam, 5, ones) == 0  # nothing fits: the fastest plan
    # uniform tiling: plan cost = tiles x mean = 40, 67.6, 51.2, 40 ms
    tiles = [4, 4, 2, 1]
    assert pick_for_slo(fam, 45, tiles) == 3  # 320 and 640 fit; the larger input wins
    assert pick_for_slo(fam, 55, tiles) == 3
    assert pick_for_slo(fam, 39, tiles) == 0  # nothing fits: the cheapest plan (first of the ties)
    assert fitting(fam, 45, tiles) == [0, 3] and fitting(fam, 39, tiles) == [0]


def test_remix_values_use_absolute_input_pixels() -> None:
    fam = _with_remix(synthetic_family())
    rp = RemixPlanner(fam, 640, 480, max_depth=1)
    box = np.array([[100.0, 100, 160, 200]])  # sqrt(60 * 100) = 77.5 px in the frame
    vals = rp.grid_values(box, 1, 1)
    for m, s in enumerate(fam.input_sizes()):
        side = np.sqrt(60 * 100) / 640 * s
        k = int(np.searchsorted(REMIX_EDGES, side, side="right"))
        assert vals[0, m] == pytest.approx(fam.meta["remix"]["accuracy"][fam.models[m].name][k])
    # in the top-left quadrant (320 x 240) the same object is twice as large relative to the tile
    q = rp.grid_values(box, 2, 2)
    assert q[1:].sum() == 0 and q[0, 0] >= vals[0, 0]


def test_remix_plan_ignores_camera_and_fits_budget() -> None:
    fam = _with_remix(synthetic_family())
    rp = RemixPlanner(fam, 1280, 960, max_depth=2)
    rng = np.random.default_rng(0)
    c = rng.uniform([0, 480], [640, 960], (40, 2))
    half = np.array([6.0, 15.0])
    boxes = np.c_[c - half, c + half]
    res = rp.plan(boxes, 60.0)
    assert res.fits and res.plan.latency_ms <= 60.0
    assert res.plan.tiles  # something is run
    # non-conservative (mean latencies) like Remix
    assert rp.mode == "non-conservative"


def test_fill_bins() -> None:
    ap = np.array([np.nan, np.nan, 0.2, np.nan, 0.6, 0.7, np.nan, np.nan])
    counts = np.array([0, 1, 5, 0, 4, 9, 0, 2])
    out = fill_bins(ap, counts)
    np.testing.assert_allclose(out, [0, 0, 0.2, 0.4, 0.6, 0.7, 0.7, 0.7])
    assert fill_bins(np.full(4, np.nan), np.zeros(4)).tolist() == [0, 0, 0, 0]


def test_sub_images_include_original_and_partitions() -> None:
    subs = sub_images(768, 576, (320, 640))
    assert subs[0] == (0, 0, 768, 576)
    assert (0, 0, 256, 288) in subs  # the 320 grid (3 x 2)
    assert (0, 0, 384, 576) in subs  # the 640 grid (2 x 1)
    assert len(subs) == len(set(subs))


def test_bin_ap_perfect_and_blind_detectors() -> None:
    rng = np.random.default_rng(1)
    images, gts, perfect, blind = [], [], [], []
    for _ in range(5):
        xy = rng.uniform(0, 300, (6, 2))
        wh = rng.uniform(10, 120, (6, 2))
        boxes = np.c_[xy, xy + wh]
        ref = Detections(boxes, np.ones(6), np.zeros(6, dtype=np.int64))
        images.append({"w": 400, "h": 400})
        gts.append(_clip_reference(ref, (0, 0, 400, 400)))
        perfect.append(Detections(boxes, np.linspace(0.9, 0.5, 6), np.zeros(6, dtype=np.int64)))
        blind.append(Detections(boxes + 500, np.full(6, 0.9), np.zeros(6, dtype=np.int64)))

    def size(b: np.ndarray, img: dict) -> np.ndarray:
        return np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / max(img["w"], img["h"])

    ap, counts = _bin_ap(images, gts, perfect, size, EDGES)
    assert counts.sum() == sum(1 for g in gts for _, _, crowd in g if not crowd)
    assert len(ap) == N_BINS
    assert np.allclose(ap[counts > 0], 1.0) and np.isnan(ap[counts == 0]).all()
    ap0, _ = _bin_ap(images, gts, blind, size, EDGES)
    assert np.allclose(ap0[counts > 0], 0.0)


def test_clip_reference_marks_cut_objects_crowd() -> None:
    ref = Detections(np.array([[10, 10, 50, 50], [90, 10, 130, 50], [200, 200, 220, 220]]), np.ones(3),
                     np.zeros(3, dtype=np.int64))
    g = _clip_reference(ref, (0, 0, 100, 100))
    assert len(g) == 2
    assert not g[0][2] and g[1][2]  # whole vs 25 % visible
    np.testing.assert_allclose(g[1][0], [90, 10, 100, 50])
