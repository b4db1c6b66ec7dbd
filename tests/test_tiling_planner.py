"""DP-DP against brute force, planner decisions (assignment, normalisation, discretisation, election, modes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxshard.tiling.bins import N_BINS, bin_index, relative_size
from fluxshard.tiling.planner import (
    QuadTree,
    TilePlanner,
    brute_force,
    count_objects,
    dpdp,
    eap_values,
    enumerate_plans,
    grid_histograms,
    max_depth_for,
    node_histograms,
)
from fluxshard.tiling.profile import FamilyProfile, ModelProfile, synthetic_family


def _ancestors(children: list[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> dict[int, set[int]]:
    parent = {c: v for v, kids in enumerate(children) for c in kids}
    out: dict[int, set[int]] = {}
    for v in range(len(children)):
        anc, u = set(), v
        while u in parent:
            u = parent[u]
            anc.add(u)
        out[v] = anc
    return out


def _check_plan(children: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], assign: np.ndarray,
                weights: np.ndarray, capacity: int, values: np.ndarray, value: float) -> None:
    chosen = {int(v) for v in np.flatnonzero(assign >= 0)}
    anc = _ancestors(children)
    for v in chosen:  # C1 (C2 holds by construction: one model index per node)
        assert not anc[v] & chosen
    w = np.broadcast_to(np.asarray(weights), values.shape)
    assert sum(int(w[v, assign[v]]) for v in chosen) <= max(capacity, 0)
    assert sum(values[v, assign[v]] for v in chosen) == pytest.approx(value, abs=1e-9)


@st.composite
def random_tree(draw: st.DrawFn) -> list[tuple[int, ...]]:
    """Random rooted tree (arity 0-4, depth <= 3, <= 12 nodes), nodes numbered in creation order."""
    children: list[list[int]] = [[]]
    frontier = [(0, 0)]
    while frontier and len(children) < 12:
        v, d = frontier.pop(0)
        if d >= 3:
            continue
        for _ in range(draw(st.integers(0, 4))):
            if len(children) >= 12:
                break
            children.append([])
            children[v].append(len(children) - 1)
            frontier.append((len(children) - 1, d + 1))
    return [tuple(c) for c in children]


@settings(max_examples=150, deadline=None)
@given(random_tree(), st.data())
def test_dpdp_equals_brute_force_on_random_trees(children: list[tuple[int, ...]], data: st.DataObject) -> None:
    n_models = data.draw(st.integers(1, 3))
    n_plans = sum(1 for _ in enumerate_plans(children, n_models))
    if n_plans > 20000:
        return
    vals = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(children) * n_models,
                                       max_size=len(children) * n_models))).reshape(len(children), n_models)
    weights = np.array(data.draw(st.lists(st.integers(1, 9), min_size=n_models, max_size=n_models)))
    capacity = data.draw(st.integers(-1, 40))
    best, assign = dpdp(children, vals, weights, capacity)
    ref, _ = brute_force(children, vals, weights, capacity)
    assert best == pytest.approx(ref, abs=1e-9)
    _check_plan(children, assign, weights, capacity, vals, best)


@st.composite
def planning_instance(draw: st.DrawFn) -> tuple[FamilyProfile, np.ndarray, float]:
    """Random family (monotone or not), random boxes in a 4K frame and a random budget."""
    n_models = draw(st.integers(1, 3))
    models = []
    for i in range(n_models):
        mean = draw(st.floats(1, 50))
        acc = draw(st.lists(st.floats(0, 1), min_size=N_BINS, max_size=N_BINS))
        models.append(ModelProfile(f"m{i}", draw(st.sampled_from([320, 512, 640, 1280])), mean,
                                   mean * draw(st.floats(1, 2)), tuple(acc)))
    n = draw(st.integers(0, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    centre = rng.uniform([0, 0], [3840, 2160], (n, 2))
    # clustered or spread, tiny to frame-sized objects
    wh = np.exp(rng.uniform(np.log(4), np.log(2500), (n, 2)))
    boxes = np.c_[centre - wh / 2, centre + wh / 2]
    return FamilyProfile(tuple(models)), boxes, draw(st.floats(0, 200))


@settings(max_examples=120, deadline=None)
@given(planning_instance(), st.sampled_from(["conservative", "non-conservative"]))
def test_dpdp_equals_brute_force_on_quadtree_plans(inst: tuple[FamilyProfile, np.ndarray, float],
                                                    mode: str) -> None:
    family, boxes, budget = inst
    planner = TilePlanner(family, 3840, 2160, mode=mode, max_depth=1, resolution=64)
    tree = planner.tree
    values = eap_values(node_histograms(tree, boxes), family.accuracy_matrix(), count_objects(boxes, 3840, 2160))
    weights, capacity, _ = planner.discretise(budget)
    best, assign = dpdp(tree.children, values, weights, capacity)
    ref, _ = brute_force(tree.children, values, weights, capacity)
    assert best == pytest.approx(ref, abs=1e-9)
    _check_plan(tree.children, assign, weights, capacity, values, best)
    plan = planner.adaptive(boxes, budget)
    assert plan.value == pytest.approx(best, abs=1e-12)
    assert plan.latency_ms <= budget + 1e-9  # rounding up latencies keeps the real budget
    assert 0 <= plan.value <= 1 + 1e-9


def test_dpdp_equals_brute_force_depth2_quadtree() -> None:
    tree = QuadTree.build(1920, 1080, 2)
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 1, (tree.n_nodes, 1)) * (rng.uniform(size=(tree.n_nodes, 1)) < 0.6)
    for capacity in (0, 3, 7, 12, 40):
        best, assign = dpdp(tree.children, values, [2], capacity)
        ref, _ = brute_force(tree.children, values, [2], capacity)
        assert best == pytest.approx(ref)
        _check_plan(tree.children, assign, np.array([2]), capacity, values, best)


def test_max_depth_rule() -> None:
    assert max_depth_for(3840, 2160) == 3  # the paper's 4K depth
    assert max_depth_for(1920, 1080) == 2
    assert max_depth_for(768, 576) == 1
    assert max_depth_for(7680, 4320) == 4
    assert max_depth_for(15360, 8640) == 4  # capped
    assert max_depth_for(300, 200) == 0
    assert max_depth_for(3840, 2160, min_leaf=0.75 * 320) == 4


def test_quadtree_children_partition_parent() -> None:
    tree = QuadTree.build(3840, 2160, 3)
    assert tree.n_nodes == 85 and tree.level_offset(3) == 21
    for v, kids in enumerate(tree.children):
        if not kids:
            assert tree.depth[v] == 3
            continue
        r = tree.rects[list(kids)]
        area = ((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])).sum()
        assert area == pytest.approx((tree.rects[v, 2] - tree.rects[v, 0]) * (tree.rects[v, 3] - tree.rects[v, 1]))
        assert r[:, 0].min() == tree.rects[v, 0] and r[:, 2].max() == tree.rects[v, 2]
        assert r[:, 1].min() == tree.rects[v, 1] and r[:, 3].max() == tree.rects[v, 3]
        assert all(tree.depth[k] == tree.depth[v] + 1 for k in kids)


def test_objects_assigned_by_centre_and_sized_per_node() -> None:
    tree = QuadTree.build(800, 400, 1)
    boxes = np.array([
        [390, 90, 410, 110],  # centre (400, 100): on the vertical split -> right quadrant
        [10, 10, 30, 50],  # 20x40 in the top-left quadrant
        [-50, 10, -10, 30],  # centre outside the frame: ignored
    ])
    hist = node_histograms(tree, boxes)
    assert hist[0].sum() == 2 and hist[1:].sum(axis=1).tolist() == [1, 1, 0, 0]
    # size relative to the node's longer side: root 800, quadrant 400
    k_root = bin_index(relative_size(20, 40, 800, 400))
    k_quad = bin_index(relative_size(20, 40, 400, 200))
    assert hist[0, k_root] >= 1 and hist[1, k_quad] == 1 and k_quad > k_root
    assert count_objects(boxes, 800, 400) == 2


def test_peap_matches_paper_normalisation() -> None:
    """eAP_W = D_W . A_M with D_W normalised by n_W; PeAP = sum eAP_W * lambda_W with lambda_W = n_W / N."""
    rng = np.random.default_rng(0)
    fam = synthetic_family()
    c = rng.uniform([0, 0], [1920, 1080], (40, 2))
    boxes = np.c_[c - 15, c + 15]
    planner = TilePlanner(fam, 1920, 1080, max_depth=1)
    hist = node_histograms(planner.tree, boxes)
    vals = eap_values(hist, fam.accuracy_matrix(), 40)
    for v in range(1, 5):
        n_w = hist[v].sum()
        if n_w:
            d_w = hist[v] / n_w
            assert vals[v, 2] == pytest.approx((d_w @ fam.accuracy_matrix()[2]) * n_w / 40)
    # the four quadrants with one model sum to the expected detected fraction of all objects
    assert vals[1:5, 3].sum() == pytest.approx(np.mean(fam.accuracy_matrix()[3][bin_index(
        relative_size(np.full(40, 30.0), np.full(40, 30.0), 960, 540))]))


def _crowd(seed: int = 1, n: int = 300) -> np.ndarray:
    """Small people crowded in the lower-left of a 4K frame, a few elsewhere."""
    rng = np.random.default_rng(seed)
    c = np.r_[rng.normal([900, 1600], [300, 200], (n, 2)), rng.uniform([0, 0], [3840, 2160], (n // 10, 2))]
    c = np.clip(c, 0, [3839, 2159])
    wh = rng.uniform([12, 30], [30, 70], (len(c), 2))
    return np.c_[c - wh / 2, c + wh / 2]


def test_more_budget_never_hurts_and_modes_order() -> None:
    fam = synthetic_family()
    boxes = _crowd()
    cons = TilePlanner(fam, 3840, 2160, "conservative")
    nonc = TilePlanner(fam, 3840, 2160, "non-conservative")
    prev = -1.0
    for budget in (5, 10, 20, 40, 80, 160, 320, 640):
        rc, rn = cons.plan(boxes, budget), nonc.plan(boxes, budget)
        assert rc.plan.value >= prev - 1e-9
        prev = rc.plan.value
        assert rn.plan.value >= rc.plan.value - 1e-9  # mean latencies allow at least as much
        if rc.fits:
            assert rc.plan.latency_ms <= budget
            p99 = sum(fam.models[t.model].p99_ms for t in rc.plan.tiles)
            assert p99 <= budget
        for t in rc.plan.tiles:
            assert 0 <= t.x0 < t.x1 <= 3840 and 0 <= t.y0 < t.y1 <= 2160


def test_adaptive_focuses_on_the_crowd() -> None:
    planner = TilePlanner(synthetic_family(), 3840, 2160, "conservative")
    res = planner.plan(_crowd(), 900.0)  # det320 uniform (84 tiles, 840 ms) fits
    assert res.plan.kind == "adaptive" and res.uniform is not None
    assert res.plan.value > res.uniform.value
    assert res.plan.coverage < 1.0  # empty regions are skipped
    assert sum(1 for t in res.plan.tiles if t.x1 <= 1920 and t.y0 >= 1080) >= len(res.plan.tiles) // 2


def test_election_prefers_uniform_when_better() -> None:
    # The adaptive search space is the root only (down-sampling); native-resolution 2x2 uniform wins.
    fam = FamilyProfile((synthetic_family().models[3],))  # det640
    rng = np.random.default_rng(2)
    c = rng.uniform(0, 1280, (50, 2))
    boxes = np.c_[c - 10, c + 10]  # 20 px: bin 1 on the whole frame, bin 2 in a 640-px tile
    planner = TilePlanner(fam, 1280, 1280, max_depth=0)
    res = planner.plan(boxes, 4 * fam.models[0].p99_ms + 1)
    assert res.plan.kind == "uniform" and len(res.plan.tiles) == 4
    assert res.plan.value > res.adaptive.value


def test_no_objects_elects_cheapest_uniform_and_nothing_fits_falls_back() -> None:
    fam = synthetic_family()
    planner = TilePlanner(fam, 1920, 1080)
    res = planner.plan(np.zeros((0, 4)), 1000.0)
    assert res.adaptive.tiles == () and res.plan.kind == "uniform" and res.plan.coverage == 1.0
    assert res.plan.latency_ms == min(p.latency_ms for p in planner.uniform_plans(np.zeros((0, 4))))
    tiny = planner.plan(_crowd(), 1.0)
    assert not tiny.fits and len(tiny.plan.tiles) == 1 and tiny.plan.tiles[0].name == "det320"


def test_discretisation_is_conservative() -> None:
    fam = synthetic_family()
    planner = TilePlanner(fam, 3840, 2160, "conservative", resolution=16)
    weights, capacity, step = planner.discretise(100.0)
    assert capacity == 16 and step == pytest.approx(6.25)
    assert np.all(weights * step >= planner.latency)
    assert np.all((weights - 1) * step < planner.latency)
    assert planner.discretise(0.0)[1] == -1
    with pytest.raises(ValueError):
        TilePlanner(fam, 100, 100, mode="fast")


def test_grid_histograms_uniform_grid() -> None:
    boxes = np.array([[0, 0, 10, 10], [630, 630, 650, 650], [1270, 1270, 1280, 1280]])
    h = grid_histograms(boxes, 1280, 1280, 2, 2)
    assert h.sum(axis=1).tolist() == [1, 0, 0, 2]
    assert math.isclose(h.sum(), 3)


def _convolution_reference(children: tuple[tuple[int, ...], ...], values: np.ndarray, weights: np.ndarray,
                           capacity: int, v: int = 0) -> np.ndarray:
    """Independent exact tree knapsack: best[b] = max(node alone with a model, max-plus product of children)."""
    neg = np.full(capacity + 1, -np.inf)
    kids = np.zeros(capacity + 1)  # choosing nothing is always allowed
    for c in children[v]:
        sub = _convolution_reference(children, values, weights, capacity, c)
        merged = neg.copy()
        for b in range(capacity + 1):
            merged[b] = np.max(kids[: b + 1] + sub[b::-1])
        kids = merged
    best = kids
    for m, wm in enumerate(weights):
        if wm <= capacity:
            alone = np.r_[np.full(wm, -np.inf), np.full(capacity + 1 - wm, values[v, m])]
            best = np.maximum(best, alone)
    return np.maximum.accumulate(best)


@pytest.mark.parametrize("depth", [2, 3])
def test_dpdp_matches_convolution_reference_on_full_quadtrees(depth: int) -> None:
    tree = QuadTree.build(3840, 2160, depth)
    rng = np.random.default_rng(depth)
    for trial in range(4):
        values = rng.uniform(0, 1, (tree.n_nodes, 3)) * (rng.uniform(size=(tree.n_nodes, 1)) < 0.7)
        weights = rng.integers(1, 12, 3)
        capacity = int(rng.integers(0, 80))
        best, assign = dpdp(tree.children, values, weights, capacity)
        ref = _convolution_reference(tree.children, values, weights, capacity)[capacity]
        assert best == pytest.approx(ref), trial
        _check_plan(tree.children, assign, weights, capacity, values, best)
