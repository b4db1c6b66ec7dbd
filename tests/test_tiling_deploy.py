"""Per-geometry latencies (profile, planner, DP-DP with node weights), the online load correction, the
overlapping reference grid and the deployment profile's building blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxshard.models.base import Detections
from fluxshard.tiling.baselines import fitting_plans, plan_latencies
from fluxshard.tiling.bins import N_BINS
from fluxshard.tiling.infer import reference_grid, uniform_grid
from fluxshard.tiling.planner import QuadTree, TilePlanner, brute_force, dpdp
from fluxshard.tiling.profile import FamilyProfile, ProfileError, geometry_key, load_profile, synthetic_family
from fluxshard.tiling.profiler import (
    _in_tile,
    _tile_truth,
    geometry_accuracy,
    planner_geometries,
    render_views,
    tile_latency_table,
)
from fluxshard.tiling.runtime import LoadTracker, UirapuruPlanner


def _with_table(fam: FamilyProfile, table: dict[str, list[list[float]]]) -> FamilyProfile:
    return FamilyProfile(fam.models, fam.plan_runtime_ms, dict(fam.meta), table)


def _n_plans(children: list[list[int]] | tuple[tuple[int, ...], ...], v: int, n_models: int) -> int:
    prod = 1
    for c in children[v]:
        prod *= _n_plans(children, c, n_models)
    return n_models + prod


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10 ** 6), min_size=0, max_size=10), st.integers(1, 3), st.data())
def test_dpdp_equals_brute_force_with_node_weights(parents: list[int], n_models: int, data: st.DataObject) -> None:
    children: list[list[int]] = [[]]
    for p in parents:  # node k+1 hangs under a random earlier node
        children[p % len(children)].append(len(children))
        children.append([])
    n = len(children)
    if _n_plans(children, 0, n_models) > 20000:
        return
    vals = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n * n_models, max_size=n * n_models)))
    vals = vals.reshape(n, n_models)
    w = np.array(data.draw(st.lists(st.integers(1, 9), min_size=n * n_models, max_size=n * n_models)))
    w = w.reshape(n, n_models)
    cap = data.draw(st.integers(-1, 40))
    best, assign = dpdp(children, vals, w, cap)
    ref, _ = brute_force(children, vals, w, cap)
    assert best == pytest.approx(ref, abs=1e-9)
    chosen = np.flatnonzero(assign >= 0)
    assert sum(int(w[v, assign[v]]) for v in chosen) <= max(cap, 0)
    assert sum(vals[v, assign[v]] for v in chosen) == pytest.approx(best, abs=1e-9)


def test_dpdp_rejects_mismatched_weights() -> None:
    tree = QuadTree.build(64, 48, 1)
    with pytest.raises(ValueError, match="shape"):
        dpdp(tree.children, np.ones((5, 2)), np.ones((4, 2), dtype=int), 10)


def test_tile_latency_table_round_trip_and_lookup(tmp_path: Path) -> None:
    fam = synthetic_family()
    table = {"640x480": [[10.0, 20.0], [12.0, 25.0], [14.0, 30.0], [20.0, 40.0]]}
    p = _with_table(fam, table)
    assert p.tile_latencies("conservative", 640.2, 479.8).tolist() == [20.0, 25.0, 30.0, 40.0]
    assert p.tile_latencies("non-conservative", 640, 480).tolist() == [10.0, 12.0, 14.0, 20.0]
    assert np.array_equal(p.tile_latencies("conservative", 320, 240), fam.latencies("conservative"))
    back = load_profile(p.save(tmp_path / "p.json"))
    assert back.tile_ms == table
    bad = {"640x480": [[10.0, 5.0]] * 4}
    with pytest.raises(ProfileError, match="tile_ms"):
        _with_table(fam, bad)
    with pytest.raises(ProfileError, match="tile_ms"):
        _with_table(fam, {"640x480": [[10.0, 20.0]] * 3})


def test_planner_uses_each_geometry_latency() -> None:
    fam = synthetic_family()
    lat = fam.latencies("conservative")
    table = {geometry_key(1280, 960): [[3 * v, 3 * v] for v in lat],  # whole frame: 3x dearer
             geometry_key(640, 480): [[v, v] for v in lat]}
    pl = TilePlanner(_with_table(fam, table), 1280, 960, max_depth=2)
    assert np.allclose(pl.node_latency[0], 3 * lat)
    assert np.allclose(pl.node_latency[1:5], lat)
    assert np.allclose(pl.node_latency[5:], lat)  # 320x240 not in the table: the models' own figures
    boxes = np.array([[600.0, 400, 640, 480]])  # one object; the whole frame is too dear, a quadrant is not
    plan = pl.adaptive(boxes, budget_ms=2 * lat[0])
    assert plan.tiles and all(t.node != 0 for t in plan.tiles)
    assert plan.latency_ms == pytest.approx(sum(pl.node_latency[t.node, t.model] for t in plan.tiles))


def test_load_factor_scales_latencies_and_refits_plans() -> None:
    fam = synthetic_family()
    pl = TilePlanner(fam, 1280, 960, max_depth=1)
    boxes = np.array([[100.0, 100, 140, 180], [900, 600, 940, 680]])
    budget = float(pl.uniform_latency.min()) * 1.01
    assert pl.plan(boxes, budget).fits
    pl.load_factor = 2.0
    assert np.allclose(pl.node_latency, 2 * pl._node_latency)
    res = pl.plan(boxes, budget)
    assert res.plan.latency_ms <= budget or not res.fits
    assert res.uniform is None or res.uniform.latency_ms <= budget


def test_load_tracker() -> None:
    t = LoadTracker(baseline=0.9, window=16, min_samples=4, clamp=(0.5, 4.0))
    for _ in range(3):
        t.observe(20.0, 10.0)
    assert t.factor == 1.0  # too few samples: trust the profile
    t.observe(20.0, 10.0)
    assert t.factor == pytest.approx(2.0 / 0.9)
    for _ in range(16):
        t.observe(1000.0, 1.0)
    assert t.factor == 4.0  # clamped; the window forgot the older ratios
    with pytest.raises(ValueError):
        LoadTracker(baseline=0.0)


def test_runtime_feeds_observed_tiles_to_the_planner() -> None:
    fam = synthetic_family()
    up = UirapuruPlanner(fam, np.array([[10.0, 10, 30, 50]]), 640, 480, max_depth=1)

    class Run:
        def __init__(self, ms: float) -> None:
            self.rect, self.model, self.ms = (0.0, 0.0, 640.0, 480.0), 0, ms

    up.observe([Run(3 * fam.models[0].mean_ms)] * 10)
    assert up.planner.load_factor == pytest.approx(3.0)
    off = UirapuruPlanner(fam, np.zeros((0, 4)), 640, 480, online=False)
    off.observe([Run(3 * fam.models[0].mean_ms)] * 10)
    assert off.planner.load_factor == 1.0


def test_reference_grid_overlap_covers_interior_lines() -> None:
    plain = reference_grid(1280, 960, 416, overlap=False)
    assert plain == uniform_grid(1280, 960, 416)
    ov = reference_grid(1280, 960, 416)
    assert len(ov) == 12 + 3 * 2
    extra = ov[12:]
    for x in (320.0, 640.0, 960.0):  # every interior vertical line crosses a shifted cell's middle
        assert any(abs((r[0] + r[2]) / 2 - x) < 1e-9 for r in extra)
    assert all(r[0] >= 0 and r[2] <= 1280 and r[1] >= 0 and r[3] <= 960 for r in ov)
    assert reference_grid(400, 300, 416) == [(0.0, 0.0, 400.0, 300.0)]
    assert len(reference_grid(832, 300, 416)) == 2 + 1  # one axis split: shifted along it only


def test_plan_latencies_and_fitting() -> None:
    fam = synthetic_family()
    table = {"640x480": [[v, v] for v in 2 * fam.latencies("non-conservative")]}
    ds, ut = plan_latencies(_with_table(fam, table), 640, 480)
    assert np.allclose(ds, 2 * fam.latencies("non-conservative"))
    assert ut[0] == pytest.approx(4 * fam.latencies("non-conservative")[0])  # 2x2 grid of 320x240
    assert fitting_plans([5.0, 9.0, 20.0], 10.0) == [0, 1]
    assert fitting_plans([15.0, 12.0], 10.0) == [1]


def test_tile_latency_table() -> None:
    rng = np.random.default_rng(0)
    samples = {(g, m): list(rng.uniform(9, 11, 30) * (m + 1)) for g in ("320x240", "640x480") for m in range(2)}
    samples[("640x480", 1)].append(200.0)  # one spike
    table, med = tile_latency_table(samples, 2)
    assert set(table) == {"320x240", "640x480"}
    for g, row in table.items():
        for m, (mean, p99) in enumerate(row):
            assert mean == pytest.approx(np.mean(samples[(g, m)]), rel=1e-3)
            assert p99 >= max(samples[(g, m)]) - 1e-3 and p99 >= mean
    assert 0.9 < med < 1.1
    partial, _ = tile_latency_table({("a", 0): [1.0, 2.0]}, 2)
    assert partial == {}  # a geometry needs every member


def test_tile_truth_and_detections_by_centre() -> None:
    ref = Detections(np.array([[10.0, 10, 30, 30], [90, 10, 130, 30], [300, 300, 310, 310]]), np.ones(3),
                     np.zeros(3, dtype=np.int64))
    gt = _tile_truth(ref, (0.0, 0.0, 100.0, 100.0))
    assert [(c, crowd) for _, c, crowd in gt] == [(0, False), (0, True)]  # centre 110 outside: crowd
    assert np.array_equal(gt[0][0], ref.boxes[0])  # kept whole, not clipped
    kept = _in_tile(ref, (0.0, 0.0, 100.0, 100.0))
    assert len(kept) == 1 and np.array_equal(kept.boxes[0], ref.boxes[0])


def test_planner_geometries() -> None:
    g = planner_geometries(1280, 960, 2, [320, 416, 512, 640])
    keys = [geometry_key(*x) for x in g]
    assert keys == ["1280x960", "640x480", "320x240", "320x320", "427x480"]


def test_render_views_follow_the_camera_geometry() -> None:
    src = np.zeros((60, 80, 3), dtype=np.uint8)
    src[..., 0] = np.arange(80)[None, :]
    src[..., 1] = np.arange(60)[:, None]
    meta = {"size": [40, 30], "base_scale": 1.0, "zoom_limits": [0.5, 4.0]}
    one = render_views([src], meta, 3, zoom_span=1.0)
    assert [v.shape for v in one] == [(30, 40, 3)] * 3
    # zoom_min = 0.5 with base 1 -> 2 source px per output px: the widest view is the whole source
    # (the window spans 78 of the 79 px, so its centre has 1 px of play)
    assert all(int(v[0, 0, 0]) <= 1 and int(v[-1, -1, 0]) >= 78 and int(v[-1, -1, 1]) >= 58 for v in one)
    many = render_views([src], meta, 6, zoom_span=2.0, seed=3)
    assert any(int(v[..., 0].max()) - int(v[..., 0].min()) < 70 for v in many)  # some zoomed-in windows
    assert all(int(v[..., 0].max()) <= 79 and int(v[..., 1].max()) <= 59 for v in many)
    assert all(np.array_equal(a, b) for a, b in zip(many, render_views([src], meta, 6, zoom_span=2.0, seed=3),
                                                     strict=True))


def test_geometry_accuracy_tables(tmp_path: Path) -> None:
    fam = synthetic_family()
    pooled = fam.accuracy_matrix()
    own = np.full((4, N_BINS), 0.9)
    p = FamilyProfile(fam.models, 0.0, {}, {}, {"320x320": own.tolist()})
    assert np.array_equal(p.tile_accuracy(320, 320), own)
    assert np.array_equal(p.tile_accuracy(640, 480), pooled)
    assert load_profile(p.save(tmp_path / "a.json")).tile_acc == p.tile_acc
    with pytest.raises(ProfileError, match="tile_acc"):
        FamilyProfile(fam.models, 0.0, {}, {}, {"320x320": [[1.5] * N_BINS] * 4})
    ap = np.array([0.2, np.nan, 0.8] + [0.5] * (N_BINS - 3))
    counts = np.array([5, 0, 2] + [3] * (N_BINS - 3))
    out = geometry_accuracy(ap, counts, pooled[0])
    assert out[0] == 0.2 and out[1] == pooled[0, 1] and out[2] == pooled[0, 2] and out[3] == 0.5


def test_planner_values_use_the_tile_geometry_accuracy() -> None:
    fam = synthetic_family()
    ones = np.ones((4, N_BINS))
    p = FamilyProfile(fam.models, 0.0, {}, {}, {"320x320": ones.tolist()})
    pl = TilePlanner(p, 640, 640, max_depth=1)
    boxes = np.array([[10.0, 10, 40, 60], [400, 400, 430, 470]])
    assert np.allclose(pl.grid_values(boxes, 2, 2).sum(axis=0), 1.0)  # 320x320 cells: every object found
    base = TilePlanner(fam, 640, 640, max_depth=1)
    assert np.allclose(pl.grid_values(boxes, 1, 1), base.grid_values(boxes, 1, 1))  # 640x640: pooled


def test_conservative_correction_never_lowers_the_profiled_p99() -> None:
    fam = synthetic_family()

    class Run:
        rect, model, ms = (0.0, 0.0, 640.0, 480.0), 0, 0.3 * fam.models[0].mean_ms

    uc = UirapuruPlanner(fam, np.zeros((0, 4)), 640, 480, mode="conservative")
    unc = UirapuruPlanner(fam, np.zeros((0, 4)), 640, 480, mode="non-conservative")
    uc.observe([Run()] * 10)
    unc.observe([Run()] * 10)
    assert uc.planner.load_factor == 1.0 and unc.planner.load_factor == pytest.approx(0.5)
