"""The conservative plan latency model (plan tail: a plan's p99 from its summed means, measured per plan
duration at profiling), its use as a knapsack capacity in the planner and the baselines, and the comparison
rule of tile-bench (UC against baselines held to the same measured miss bar)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxshard.models.base import Detections
from fluxshard.tiling.baselines import plan_latencies
from fluxshard.tiling.evaluate import ClipResult, FrameRecord, comparison, summarise
from fluxshard.tiling.planner import TilePlanner, brute_force, enumerate_plans
from fluxshard.tiling.profile import FamilyProfile, ProfileError, load_profile, synthetic_family
from fluxshard.tiling.profiler import plan_tail_table


def test_plan_tail_table_exact_windows() -> None:
    # unit means; one slow run at the end. Quantile 100 = the worst window of each duration.
    rows = plan_tail_table([1, 1, 1, 3], [1, 1, 1, 1], durations=(1, 2, 4, 5), quantile=100)
    assert rows == [[1.0, 3.0], [2.0, 2.0], [4.0, 1.5]]  # 5: no window that long, dropped


def test_plan_tail_table_short_spikes_average_out_and_ratios_never_increase() -> None:
    rng = np.random.default_rng(0)
    mean = rng.choice([30.0, 50.0, 80.0, 110.0], 4000)
    ms = mean * rng.lognormal(0.0, 0.05, len(mean))
    ms[rng.random(len(ms)) < 0.03] *= 2.5  # isolated spikes of one tile
    rows = plan_tail_table(ms, mean)
    q = [r[1] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(q))
    assert q[0] > 2.0  # a one-tile plan's p99 is the spike
    assert q[-1] < 1.3  # a 1.6-s plan averages a few spikes
    assert min(q) >= 1.0


def test_plan_tail_round_trip_and_validation(tmp_path: Path) -> None:
    fam = dataclasses.replace(synthetic_family(), plan_tail=((50.0, 1.6), (400.0, 1.3), (1600.0, 1.2)))
    back = load_profile(fam.save(tmp_path / "p.json"))
    assert back.plan_tail == fam.plan_tail
    assert back.with_runtime(3.0).plan_tail == fam.plan_tail
    for bad in (((50.0, 1.2), (400.0, 1.3)), ((50.0, 0.9),), ((400.0, 1.3), (50.0, 1.2))):
        with pytest.raises(ProfileError, match="plan_tail"):
            dataclasses.replace(fam, plan_tail=bad)


tails = st.lists(st.tuples(st.floats(5, 3000), st.floats(1.0, 3.0)), min_size=1, max_size=8).map(
    lambda xs: tuple(zip(sorted({round(t, 3) for t, _ in xs}),
                         sorted((q for _, q in xs), reverse=True), strict=False)))


@settings(max_examples=150, deadline=None)
@given(tails, st.floats(1, 5000))
def test_mean_budget_inverts_plan_p99(tail: tuple[tuple[float, float], ...], budget: float) -> None:
    fam = dataclasses.replace(synthetic_family(), plan_tail=tail)
    t = fam.mean_budget(budget)
    assert float(fam.plan_p99(t)) <= budget * (1 + 1e-9)
    assert float(fam.plan_p99(t * 1.01 + 1e-6)) > budget * (1 - 1e-9)  # the largest such mean (to 1 %)
    grid = np.linspace(0, 4000, 200)
    assert np.all(np.diff(fam.plan_p99(grid)) >= -1e-9)  # a longer plan never has a smaller p99
    assert np.all(fam.plan_p99(grid) >= grid - 1e-9)


def _tail_family() -> FamilyProfile:
    # one tile's p99 is 1.6x its mean (as the per-tile figures say), a plan of >= 200 ms of tiles only 1.15x
    return dataclasses.replace(synthetic_family(p99_factor=1.6), plan_tail=((10.0, 1.6), (200.0, 1.15)))


def _crowd(seed: int = 3, n: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.uniform([0, 0], [1280, 960], (n, 2))
    return np.c_[c - 8, c + 8]


def test_conservative_planner_uses_the_plan_tail_and_stays_within_budget() -> None:
    fam = _tail_family()
    plain = dataclasses.replace(fam, plan_tail=())
    boxes = _crowd()
    for budget in (20.0, 60.0, 150.0, 300.0, 600.0):
        tail_res = TilePlanner(fam, 1280, 960, "conservative", max_depth=2).plan(boxes, budget)
        sum_res = TilePlanner(plain, 1280, 960, "conservative", max_depth=2).plan(boxes, budget)
        if tail_res.fits:
            means = sum(fam.tile_latencies("non-conservative", t.x1 - t.x0, t.y1 - t.y0)[t.model]
                        for t in tail_res.plan.tiles)
            assert float(fam.plan_p99(means)) <= budget + 1e-9
            assert tail_res.plan.latency_ms == pytest.approx(float(fam.plan_p99(means)))
        assert tail_res.plan.value >= sum_res.plan.value - 1e-9
    # with a thinner tail for long plans, a long budget buys strictly more than the sum of per-tile p99s
    big = TilePlanner(fam, 1280, 960, "conservative", max_depth=2).plan(boxes, 300.0)
    small = TilePlanner(plain, 1280, 960, "conservative", max_depth=2).plan(boxes, 300.0)
    assert sum(t.x1 - t.x0 for t in big.plan.tiles) > 0
    assert big.plan.value > small.plan.value


def test_conservative_tail_plan_is_optimal_for_its_discretised_instance() -> None:
    fam = _tail_family()
    planner = TilePlanner(fam, 1280, 960, "conservative", max_depth=1, resolution=64)
    boxes = _crowd(5, 30)
    for budget in (25.0, 50.0, 90.0):
        values = np.concatenate([planner.grid_values(boxes, 2**d, 2**d) for d in range(2)])
        weights, cap, step = planner.discretise(budget)
        assert cap * step == pytest.approx(fam.mean_budget(budget))
        ref, _ = brute_force(planner.tree.children, values, weights, cap)
        assert planner.adaptive(boxes, budget).value == pytest.approx(ref)
        # every plan the discretised instance admits fits the real p99 budget
        for plan in enumerate_plans(planner.tree.children, len(fam.models)):
            if sum(int(weights[n, m]) for n, m in plan.items()) <= cap:
                mean = sum(planner.node_latency[n, m] for n, m in plan.items())
                assert float(fam.plan_p99(mean)) <= budget + 1e-9


def test_baseline_conservative_latencies_follow_the_plan_tail() -> None:
    fam = _tail_family()
    ds_mean, ut_mean = plan_latencies(fam, 1280, 960)
    ds_c, ut_c = plan_latencies(fam, 1280, 960, "conservative")
    assert np.allclose(ds_c, fam.plan_p99(ds_mean)) and np.allclose(ut_c, fam.plan_p99(ut_mean))
    ds_p, _ = plan_latencies(dataclasses.replace(fam, plan_tail=()), 1280, 960, "conservative")
    assert np.allclose(ds_p, fam.latencies("conservative"))


# ----------------------------------------------------------------------------------------- comparison rule


class _Fam:
    names = ("m320", "m640")


def _dets(boxes: list[list[float]]) -> Detections:
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.9), np.zeros(len(b), dtype=np.int64), ("person",))


def _result(lat: dict[tuple[str, float | None], list[float]], hits: dict[tuple[str, float | None], int],
            n: int = 100) -> ClipResult:
    """n frames, one reference object each; a method finds it on its first ``hits`` frames."""
    obj = [[10.0, 10.0, 50.0, 90.0]]
    ref = [_dets(obj) for _ in range(n)]
    records, dets = [], {}
    for key, ms in lat.items():
        dets[key] = [_dets(obj) if i < hits[key] else _dets([]) for i in range(n)]
        for i in range(n):
            records.append(FrameRecord(i, key[0], key[1], ms[i], 0.0, ms[i], 0.0, 1, "uniform", "", True, 1))
    return ClipResult("c.mp4", (100, 100), n, "gt", 1, 0.0, 0, records, dets, ref, [])


def test_map_over_too_few_reference_objects_is_na_with_the_count() -> None:
    """5 reference objects: no mAP for any method (one miss would move it by 20 %), the count and the note, in
    the rows and the markdown report."""
    from fluxshard.tiling.report import markdown_tables

    slo = 100.0
    lat = {("uirapuru-c", slo): [50.0] * 5, ("ds-m320", None): [50.0] * 5, ("ut-m320", None): [50.0] * 5}
    hits = dict.fromkeys(lat, 3)
    mean = (np.array([40.0, 80.0]), np.array([60.0, 90.0]))
    rows = summarise(_result(lat, hits, n=5), _Fam(), [slo], mean, mean)  # type: ignore[arg-type]
    assert rows and all(r["map"] is None and r["map50"] is None and r["map_on_time"] is None for r in rows)
    assert all(r["reference_objects"] == 5 and r["map_note"] == "n/a (only 5 reference objects ≥ score 0.5)"
               for r in rows)
    assert "mAP n/a ('-' below): n/a (only 5 reference objects ≥ score 0.5)" in markdown_tables(rows)
    full = summarise(_result(lat | {k: [50.0] * 100 for k in lat}, hits, n=100), _Fam(), [slo], mean, mean)  # type: ignore[arg-type]
    assert all(r["map"] is not None and r["map_note"] is None and r["reference_objects"] == 100 for r in full)


def test_uc_is_compared_with_baselines_that_met_the_miss_bar() -> None:
    slo = 100.0
    fast, slow = [50.0] * 100, [150.0] * 5 + [50.0] * 95  # 0 % and 5 % misses at 100 ms
    lat = {("uirapuru-c", slo): fast, ("uirapuru-nc", slo): slow, ("remix", slo): slow, ("remix-c", slo): fast,
           ("ds-m320", None): fast, ("ds-m640", None): slow, ("ut-m320", None): fast, ("ut-m640", None): slow}
    hits = {("uirapuru-c", slo): 60, ("uirapuru-nc", slo): 80, ("remix", slo): 90, ("remix-c", slo): 50,
            ("ds-m320", None): 40, ("ds-m640", None): 95, ("ut-m320", None): 55, ("ut-m640", None): 99}
    res = _result(lat, hits)
    mean = (np.array([40.0, 80.0]), np.array([60.0, 90.0]))  # every member's profiled mean fits 100 ms
    rows = summarise(res, _Fam(), [slo], mean, mean)  # type: ignore[arg-type]
    by = {r["method"]: r for r in rows if r["slo_ms"] == slo}
    assert by["ds"]["source"] == "ds-m640" and by["ut"]["source"] == "ut-m640"  # mean fits: best mAP
    assert by["ds-c"]["source"] == "ds-m320" and by["ut-c"]["source"] == "ut-m320"  # 5 % misses excluded
    assert by["remix"]["meets_bar"] is False and by["remix-c"]["meets_bar"] is True
    assert by["remix"]["miss_rate"] == pytest.approx(0.05)
    # late frames count as empty: 5 of remix's 90 hits arrive after the SLO
    assert by["remix"]["map_on_time"] < by["remix"]["map"]
    assert by["uirapuru-c"]["map_on_time"] == by["uirapuru-c"]["map"]
    comp = {c["mode"]: c for c in comparison(rows)}
    uc = comp["uirapuru-c"]
    assert set(uc["baselines"]) == {"ds-c:ds-m320", "ut-c:ut-m320", "remix-c"}  # remix (5 % misses) left out
    assert uc["best_baseline"] == "ut-c:ut-m320" and uc["geq_all"]
    unc = comp["uirapuru-nc"]
    assert unc["best_baseline"] == "ut:ut-m640" and not unc["geq_all"]


def test_no_member_meets_the_bar_is_reported_not_counted() -> None:
    slo = 100.0
    slow = [150.0] * 100
    lat = {("uirapuru-c", slo): [50.0] * 100, ("ds-m320", None): [120.0] * 100, ("ds-m640", None): slow}
    hits = {("uirapuru-c", slo): 10, ("ds-m320", None): 90, ("ds-m640", None): 99}
    rows = summarise(_result(lat, hits), _Fam(), [slo], (np.array([40.0, 80.0]),) * 2)  # type: ignore[arg-type]
    dsc = next(r for r in rows if r["method"] == "ds-c")
    assert dsc["fits_slo"] is False and dsc["source"] == "ds-m320"  # the cheapest, marked
    uc = next(c for c in comparison(rows) if c["mode"] == "uirapuru-c")
    assert uc["geq_all"] and "ds-c:ds-m320" not in uc["baselines"]


# ------------------------------------------------------------------------------------ plan-level calibration


def _quadrant_views(n: int = 4) -> tuple[list[Detections], list[dict]]:
    """n 100x100 views, one 20-px object per quadrant; member 0 reproduces the reference, member 1 finds only
    the left half's objects."""
    refs, runs = [], []
    for v in range(n):
        o = 3.0 * v
        boxes = [[10 + o, 10, 30 + o, 30], [60 + o, 10, 80 + o, 30], [10 + o, 60, 30 + o, 80], [60 + o, 60, 80 + o, 80]]
        refs.append(_dets(boxes))
        vr = {}
        for nx in (1, 2):
            t = 100 / nx
            for r in range(nx):
                for c in range(nx):
                    rect = tuple(round(x, 3) for x in (c * t, r * t, (c + 1) * t, (r + 1) * t))
                    inside = [b for b in boxes if rect[0] <= (b[0] + b[2]) / 2 < rect[2]
                              and rect[1] <= (b[1] + b[3]) / 2 < rect[3]]
                    vr[(rect, 0)] = _dets(inside)
                    vr[(rect, 1)] = _dets([b for b in inside if b[0] < 50])
        runs.append(vr)
    return refs, runs


def test_plan_calibration_is_measured_over_estimated() -> None:
    from fluxshard.tiling.profiler import plan_calibration

    refs, runs = _quadrant_views()
    pooled = np.full((2, 22), 0.5)  # the accuracy model says every member finds half of everything
    cal = plan_calibration(refs, runs, 100, 100, [(1, 1), (2, 2), (2, 2)], {}, pooled)
    assert set(cal) == {"100x100", "50x50"}
    for g in cal:
        assert cal[g][0] == pytest.approx(2.0)  # measured 1.0 / estimated 0.5
        assert cal[g][1] == pytest.approx(1.0, abs=0.05)  # measured ~0.5 (half the objects) / 0.5
    # a geometry whose runs are missing for a member keeps factor 1
    for vr in runs:
        for k in [k for k in vr if k[1] == 1 and k[0][2] == 50.0]:
            del vr[k]
    assert plan_calibration(refs, runs, 100, 100, [(2, 2)], {}, pooled)["50x50"][1] == 1.0


def test_calibration_scales_the_planner_values_and_can_be_switched_off(tmp_path: Path) -> None:
    fam = synthetic_family()
    boxes = _crowd()
    cal = dataclasses.replace(fam, tile_calib={"1280x960": [2.0, 1.0, 0.5, 1.0]})
    base = TilePlanner(fam, 1280, 960, max_depth=1).grid_values(boxes, 1, 1)[0]
    scaled = TilePlanner(cal, 1280, 960, max_depth=1).grid_values(boxes, 1, 1)[0]
    assert np.allclose(scaled, base * [2.0, 1.0, 0.5, 1.0])
    assert np.allclose(cal.tile_accuracy(1280, 960, calibrated=False), fam.tile_accuracy(1280, 960))
    assert np.allclose(TilePlanner(cal, 1280, 960, max_depth=1).grid_values(boxes, 2, 2),
                       TilePlanner(fam, 1280, 960, max_depth=1).grid_values(boxes, 2, 2))  # other geometry: 1
    back = load_profile(cal.save(tmp_path / "c.json"))
    assert back.tile_calib == cal.tile_calib
    with pytest.raises(ProfileError, match="tile_calib"):
        dataclasses.replace(fam, tile_calib={"1280x960": [1.0, 0.0, 1.0, 1.0]})
