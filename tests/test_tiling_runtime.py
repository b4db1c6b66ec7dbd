"""Runtime glue on a virtual-PTZ clip: local objects follow the camera, plans follow the objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import load_ptz_meta, make_ptz_clip
from fluxshard.tiling.camera import ptz_delta, ptz_global_to_view
from fluxshard.tiling.profile import synthetic_family
from fluxshard.tiling.runtime import UirapuruPlanner, measure_plan_runtime


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: Path = tmp_path_factory.mktemp("tiling_rt") / "clip.mp4"
    return load_ptz_meta(make_ptz_clip(clip_path("vtest"), out, "pan:4:10,zoom:1.05:10", still=True,
                                       size=(640, 480)))


def _history(meta: dict[str, Any]) -> np.ndarray:
    """People-sized boxes crowded in the right half of the 768x576 global view."""
    rng = np.random.default_rng(0)
    c = rng.uniform([400, 150], [760, 560], (120, 2))
    half = np.array([6.0, 14.0])
    return np.c_[c - half, c + half]


def test_plans_follow_the_camera(meta: dict[str, Any]) -> None:
    fam = synthetic_family()
    w, h = meta["size"]
    hist = _history(meta)
    up = UirapuruPlanner(fam, hist, w, h, initial_view=ptz_global_to_view(meta, 0), max_depth=2)
    sizes, counts = [], []
    for t in range(1, len(meta["frames"])):
        fp = up.plan_frame(60.0, delta=ptz_delta(meta, t))
        assert np.allclose(up.tracker.matrix, ptz_global_to_view(meta, t))
        counts.append(len(fp.local_boxes))
        if len(fp.local_boxes):
            sizes.append(np.median(fp.local_boxes[:, 3] - fp.local_boxes[:, 1]))
        res = fp.result
        assert res.fits and res.plan.latency_ms <= 60.0
        # every chosen adaptive tile holds at least one local object centre
        if res.plan.kind == "adaptive":
            b = fp.local_boxes
            c = np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]
            for tile in res.plan.tiles:
                assert np.any((c[:, 0] >= tile.x0) & (c[:, 0] < tile.x1) & (c[:, 1] >= tile.y0) & (c[:, 1] < tile.y1))
        assert {"preprocess", "adaptive", "uniform", "total"} <= set(fp.timings_ms)
    assert counts[9] > counts[0]  # panning right brings the crowd into view
    assert sizes[-1] > 1.5 * sizes[9]  # zooming in enlarges the objects


def test_view_and_field_inputs_and_plan_runtime(meta: dict[str, Any]) -> None:
    fam = synthetic_family()
    w, h = meta["size"]
    views = [ptz_global_to_view(meta, t) for t in range(len(meta["frames"]))]
    est = measure_plan_runtime(fam, _history(meta), views, w, h, slo_ms=60.0, max_depth=2)
    assert 0 < est < 60.0
    fam2 = fam.with_plan_runtime([est / 1.1])
    up = UirapuruPlanner(fam2, _history(meta), w, h)
    fp = up.plan_frame(60.0, view=views[5])
    assert fp.result.budget_ms == pytest.approx(60.0 - fam2.plan_runtime_ms)
    with pytest.raises(ValueError):
        up.plan_frame(60.0, view=views[1], delta=np.eye(3))
