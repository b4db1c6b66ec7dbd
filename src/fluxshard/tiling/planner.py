"""Per-frame tile planning (§3.2.2): quad-tree partition, eAP per node and model, DP-DP, plan election.

Problem. Choose a set of quad-tree nodes (tiles) and one model per chosen node maximising the plan's
estimated accuracy ``PeAP = sum_W eAP_W * lambda_W`` subject to the summed model latency fitting the inference
budget, with (C1) no chosen node having a chosen ancestor or descendant (tiles never overlap) and (C2) at most
one model per node. Chosen nodes need **not** cover the frame: regions with no expected objects add nothing to
PeAP and are skipped, which is the paper's "implicit skipping" and what makes adaptive plans cheap.

Decisions where the paper is vague (all tested in ``tests/test_tiling_planner.py``):

* **Object-to-node assignment.** An object belongs to the node containing its box centre (half-open cells),
  so at every depth each object is in exactly one node and C1 makes every object count at most once. Its
  relative size is taken w.r.t. that node (:func:`fluxshard.tiling.bins.relative_size`, longer node side).
* **Normalisation.** ``D_W`` is the node's bin histogram divided by its object count ``n_W`` and
  ``lambda_W = n_W / N`` (N = objects in the frame), so ``eAP_W * lambda_W = (counts_W . A_M) / N``: PeAP is
  the expected fraction of the frame's objects detected, in [0, 1], and additive over tiles (a knapsack value).
* **Max depth.** ``max_depth_for(w, h)`` = the largest d with ``max(w, h) / 2**d >= 384`` px, capped at 4:
  leaves stay at least 0.75x the paper's smallest input (EfficientDet-D0, 512), which gives the paper's 3 for
  4K (480-px leaves), 2 for 1080p, 1 for 768x576. Pass ``min_leaf`` to tie it to another family.
* **Budget discretisation.** Latencies are in units of ``step = budget / resolution`` (default resolution
  2048, i.e. 0.05 % of the budget; the paper uses a fixed 1-ms step, which is far too coarse for CPU models of a
  few ms). Model latencies are rounded **up** and the budget **down**, so every plan the DP returns also fits
  the real (continuous) budget: a conservative-mode guarantee must not be lost to rounding. The DP is exact for
  the rounded instance; the loss against the continuous optimum is at most one step per tile.
* **DP-DP** (numba kernel :func:`fluxshard.tiling._kernels.dpdp_forward`). Nodes are visited in depth-first
  post-order; ``dp_k[b]`` is the best value using only the first k nodes with total weight <= b. Choosing
  node v (model m) combines with the table from *before v's subtree started*, which holds exactly the nodes
  compatible with v (earlier subtrees of v's and its ancestors' siblings); not choosing v keeps
  ``dp_{k-1}`` (which includes v's descendants). This is O(#nodes * #models * resolution), the paper's bound,
  with no max-plus convolution of children.
* **Plan election.** One uniform plan per model: a ``ceil(W/in) x ceil(H/in)`` grid (tiles at about native
  resolution, every tile run with that model). The elected plan is the one with the higher PeAP; ties go to
  the plan covering more of the frame, then to the cheaper one. With no objects in view every PeAP is 0 and the
  cheapest fitting uniform plan is elected (never a plan that skips the whole frame).
* **Nothing fits.** If no plan fits the budget, the fastest model on the whole frame (down-sampling) is
  returned with ``fits=False``: a frame is never left unprocessed.
* **Modes.** ``conservative`` plans with p99 latencies (per-frame SLO), ``non-conservative`` with means.
  A plan's p99 is not the sum of its tiles' p99s when the profile has a plan tail model
  (:attr:`FamilyProfile.plan_tail`, a deployment profile): it is ``P(sum of tile means)``, the tail quantile
  (p99.9 by default, :data:`~fluxshard.tiling.profile.PLAN_TAIL_QUANTILE`) measured at profiling for plans of
  that mean duration. ``P`` is non-decreasing, so "``P(sum of means) <= budget``" is
  "``sum of means <= P^-1(budget)``": DP-DP runs on mean weights with capacity
  :meth:`FamilyProfile.mean_budget` and stays an exact additive knapsack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from fluxshard.tiling._kernels import dpdp_forward
from fluxshard.tiling.bins import N_BINS, bin_index, relative_size
from fluxshard.tiling.profile import MODES, FamilyProfile

MIN_LEAF_PX = 384
MAX_DEPTH_CAP = 4
DEFAULT_RESOLUTION = 2048


def max_depth_for(width: int, height: int, min_leaf: float = MIN_LEAF_PX, cap: int = MAX_DEPTH_CAP) -> int:
    """Largest depth whose leaves keep a long side >= ``min_leaf`` px (3 for 4K, see module docstring)."""
    long_side = max(width, height)
    d = 0
    while d < cap and long_side / 2 ** (d + 1) >= min_leaf:
        d += 1
    return d


@dataclass(frozen=True)
class QuadTree:
    """Quad-tree over a ``width x height`` frame; node 0 is the root, nodes stored level by level."""

    width: int
    height: int
    max_depth: int
    rects: np.ndarray  # (n, 4) float x0, y0, x1, y1
    depth: np.ndarray  # (n,) int
    children: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, width: int, height: int, max_depth: int) -> QuadTree:
        if max_depth < 0:
            raise ValueError("max_depth must be >= 0")
        rects, depth, children = [], [], []
        offset = 0
        for d in range(max_depth + 1):
            k = 2**d
            tw, th = width / k, height / k
            for r in range(k):
                for c in range(k):
                    rects.append((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                    depth.append(d)
                    if d < max_depth:
                        nxt = offset + k * k
                        kk = 2 * k
                        children.append(tuple(nxt + (2 * r + dr) * kk + 2 * c + dc for dr in (0, 1) for dc in (0, 1)))
                    else:
                        children.append(())
            offset += k * k
        return cls(width, height, max_depth, np.array(rects, dtype=np.float64), np.array(depth), tuple(children))

    @property
    def n_nodes(self) -> int:
        return len(self.children)

    def level_offset(self, d: int) -> int:
        return (4**d - 1) // 3


def _centres_in_frame(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)


def _as_boxes(boxes: ArrayLike) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if b.size and not np.all(np.isfinite(b)):
        raise ValueError("boxes must be finite")
    return b


def grid_histograms(boxes: ArrayLike, width: float, height: float, nx: int, ny: int) -> np.ndarray:
    """(ny*nx, 22) bin counts per cell of a uniform grid; objects go to the cell holding their centre."""
    b = _as_boxes(boxes)
    b = b[_centres_in_frame(b, width, height)]
    out = np.zeros((ny * nx, N_BINS), dtype=np.float64)
    if not len(b):
        return out
    tw, th = width / nx, height / ny
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    col = np.minimum((cx // tw).astype(np.intp), nx - 1)
    row = np.minimum((cy // th).astype(np.intp), ny - 1)
    bins = bin_index(relative_size(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], tw, th))
    np.add.at(out, (row * nx + col, bins), 1.0)
    return out


def node_histograms(tree: QuadTree, boxes: ArrayLike) -> np.ndarray:
    """(n_nodes, 22) object counts per node and relative-size bin (sizes relative to each node's side)."""
    parts = [grid_histograms(boxes, tree.width, tree.height, 2**d, 2**d) for d in range(tree.max_depth + 1)]
    return np.concatenate(parts, axis=0)


def count_objects(boxes: ArrayLike, width: float, height: float) -> int:
    b = _as_boxes(boxes)
    return int(_centres_in_frame(b, width, height).sum())


def eap_values(hist: np.ndarray, accuracy: np.ndarray, n_objects: int) -> np.ndarray:
    """(n_nodes, n_models) ``eAP_W * lambda_W = (counts_W . A_M) / N`` (0 when the frame has no objects)."""
    if n_objects <= 0:
        return np.zeros((hist.shape[0], accuracy.shape[0]))
    return hist @ accuracy.T / n_objects


# --------------------------------------------------------------------------------------------------- DP-DP


def _post_order(children: Sequence[Sequence[int]], root: int) -> tuple[list[int], dict[int, int]]:
    """Post-order node list and, per node, how many nodes precede its subtree in that order."""
    order: list[int] = []
    first: dict[int, int] = {}
    stack: list[tuple[int, bool]] = [(root, False)]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            order.append(v)
            continue
        first[v] = len(order)
        stack.append((v, True))
        for c in reversed(children[v]):
            stack.append((c, False))
    return order, first


def node_weights(weights: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    """Per-model (n_models,) or per-(node, model) weights as an (n_nodes, n_models) int64 array."""
    w = np.asarray(weights, dtype=np.int64)
    if w.ndim == 1:
        w = np.broadcast_to(w, shape)
    if w.shape != tuple(shape):
        raise ValueError(f"weights of shape {w.shape} do not match values {tuple(shape)}")
    return np.ascontiguousarray(w)


def dpdp(
    children: Sequence[Sequence[int]], values: np.ndarray, weights: ArrayLike, capacity: int, root: int = 0
) -> tuple[float, np.ndarray]:
    """Optimal node->model map on any rooted tree under C1, C2 and ``sum weights <= capacity``.

    ``values``: (n_nodes, n_models); ``weights``: positive integers per model, or per (node, model) when a
    tile's cost depends on its geometry. Returns the optimal value and an int array (-1 = node not chosen).
    Ties prefer not choosing a node (fewer, finer-evaluated tiles).
    """
    vals = np.asarray(values, dtype=np.float64)
    w = node_weights(weights, vals.shape)
    if np.any(w < 1):
        raise ValueError("DP weights must be positive integers")
    order, first = _post_order(children, root)
    assign = np.full(vals.shape[0], -1, dtype=np.int64)
    if capacity < 0:
        return 0.0, assign
    cap = capacity
    first_arr = np.zeros(vals.shape[0], dtype=np.int64)
    for v, f in first.items():
        first_arr[v] = f
    tables, choice = dpdp_forward(np.asarray(order, dtype=np.int64), first_arr, vals, w, cap)
    k, b = len(order), cap
    while k > 0:
        m = int(choice[k, b])
        if m < 0:
            k -= 1
            continue
        v = order[k - 1]
        assign[v] = m
        b -= int(w[v, m])
        k = first[v]
    return float(tables[len(order), cap]), assign


def enumerate_plans(children: Sequence[Sequence[int]], n_models: int, root: int = 0) -> Iterator[dict[int, int]]:
    """Every plan satisfying C1 and C2 (including the empty one) as {node: model}; exponential, tests only."""

    def sub(v: int) -> Iterator[dict[int, int]]:
        for m in range(n_models):
            yield {v: m}
        kids = list(children[v])

        def combine(i: int) -> Iterator[dict[int, int]]:
            if i == len(kids):
                yield {}
                return
            for left in sub(kids[i]):
                for rest in combine(i + 1):
                    yield {**left, **rest}

        yield from combine(0)

    yield from sub(root)


def brute_force(
    children: Sequence[Sequence[int]], values: np.ndarray, weights: ArrayLike, capacity: int, root: int = 0
) -> tuple[float, dict[int, int]]:
    """Reference optimum by enumerating all valid plans (small trees only)."""
    vals = np.asarray(values, dtype=np.float64)
    w = node_weights(weights, vals.shape)
    best, best_plan = 0.0, {}
    for plan in enumerate_plans(children, vals.shape[1], root):
        if sum(int(w[n, m]) for n, m in plan.items()) > capacity:
            continue
        v = float(sum(vals[n, m] for n, m in plan.items()))
        if v > best:
            best, best_plan = v, plan
    return best, best_plan


# ----------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Tile:
    """A frame region (float pixel bounds) and the index/name of the model that runs on it."""

    x0: float
    y0: float
    x1: float
    y1: float
    model: int
    name: str
    node: int | None = None


@dataclass(frozen=True)
class TilePlan:
    kind: str  # "adaptive" or "uniform"
    tiles: tuple[Tile, ...]
    value: float  # PeAP: expected fraction of the frame's objects detected
    latency_ms: float  # sum of the chosen models' latencies in the planning mode
    coverage: float  # fraction of the frame area inside some tile

    def sort_key(self) -> tuple[float, float, float]:
        return (round(self.value, 12), round(self.coverage, 12), -self.latency_ms)


@dataclass
class PlanResult:
    plan: TilePlan  # the elected plan
    adaptive: TilePlan
    uniform: TilePlan | None  # best fitting uniform plan, if any fits
    budget_ms: float
    fits: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


class TilePlanner:
    """Plans a frame of fixed size from boxes in frame coordinates (xyxy) under an inference budget (ms).

    A tile's latency is the profile's figure for its geometry (:meth:`FamilyProfile.tile_latencies`: a
    1280x960 tile letterboxed into 320 costs more than a 320x240 one), times ``load_factor`` - the online
    correction for machine load drifting since profiling (:class:`fluxshard.tiling.runtime.LoadTracker`)."""

    def __init__(
        self,
        family: FamilyProfile,
        width: int,
        height: int,
        mode: str = "conservative",
        max_depth: int | None = None,
        resolution: int = DEFAULT_RESOLUTION,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if resolution < 1:
            raise ValueError("resolution must be >= 1")
        self.family = family
        self.width, self.height = int(width), int(height)
        self.mode = mode
        self.resolution = resolution
        self.tree = QuadTree.build(self.width, self.height, max_depth_for(width, height) if max_depth is None
                                   else max_depth)
        self.load_factor = 1.0
        self.accuracy = family.accuracy_matrix()
        self._acc: dict[tuple[int, int], np.ndarray] = {}  # per grid: the geometry's accuracy vectors
        self.names = family.names
        self._grids = [(math.ceil(self.width / s), math.ceil(self.height / s)) for s in family.input_sizes()]
        self._uniform_tiles = [self._grid_tiles(m, nx, ny) for m, (nx, ny) in enumerate(self._grids)]
        # conservative with a plan tail model: knapsack over mean latencies, budget mapped through P^-1
        self.tail_model = mode == "conservative" and bool(family.plan_tail)
        lat_mode = "non-conservative" if self.tail_model else mode
        per_depth = [family.tile_latencies(lat_mode, self.width / 2**d, self.height / 2**d)
                     for d in range(self.tree.max_depth + 1)]
        self._node_latency = np.stack([per_depth[d] for d in self.tree.depth])  # (n_nodes, n_models)
        self._uniform_latency = np.array([nx * ny * family.tile_latencies(lat_mode, self.width / nx,
                                                                          self.height / ny)[m]
                                          for m, (nx, ny) in enumerate(self._grids)])

    def plan_latency(self, weight_ms: float | np.ndarray) -> np.ndarray:
        """A plan's latency in the planning mode from the sum of its knapsack weights (:attr:`node_latency`):
        the sum itself, or ``P(sum)`` with the plan tail model."""
        w = np.asarray(weight_ms, dtype=np.float64)
        return self.family.plan_p99(w) if self.tail_model else w

    def capacity_ms(self, budget_ms: float) -> float:
        """The knapsack capacity (in :attr:`node_latency` units) of a latency budget."""
        return self.family.mean_budget(budget_ms) if self.tail_model else float(budget_ms)

    @property
    def latency(self) -> np.ndarray:
        """(n_models,) latency of each member on the whole frame (one tile) in the planning mode,
        load-corrected."""
        return self.plan_latency(self._node_latency[0] * self.load_factor)

    @property
    def node_latency(self) -> np.ndarray:
        """(n_nodes, n_models) knapsack weight of each quad-tree node run with each member, load-corrected
        (the mode's per-tile latency, or the mean with the plan tail model)."""
        return self._node_latency * self.load_factor

    @property
    def uniform_latency(self) -> np.ndarray:
        """(n_models,) latency of each member's uniform plan in the planning mode, load-corrected."""
        return self.plan_latency(self._uniform_latency * self.load_factor)

    def _grid_tiles(self, m: int, nx: int, ny: int) -> tuple[Tile, ...]:
        tw, th = self.width / nx, self.height / ny
        return tuple(Tile(c * tw, r * th, (c + 1) * tw, (r + 1) * th, m, self.names[m])
                     for r in range(ny) for c in range(nx))

    def discretise(self, budget_ms: float) -> tuple[np.ndarray, int, float]:
        """(integer (n_nodes, n_models) weights, integer capacity, step ms): knapsack weights rounded up, the
        capacity (:meth:`capacity_ms` of the budget) down."""
        lat = self.node_latency
        budget_ms = self.capacity_ms(budget_ms)
        if not budget_ms > 0:
            return np.ones(lat.shape, dtype=np.int64), -1, 1.0
        step = budget_ms / self.resolution
        with np.errstate(over="ignore", divide="ignore"):
            units = np.minimum(lat / budget_ms * self.resolution, self.resolution + 1)  # > cap: unusable
        weights = np.maximum(1, np.ceil(units - 1e-9)).astype(np.int64)
        capacity = self.resolution  # floor(budget / step)
        return weights, capacity, step

    def grid_values(self, boxes: ArrayLike, nx: int, ny: int) -> np.ndarray:
        """(ny*nx, n_models) ``eAP_W * lambda_W`` of every cell of a uniform grid (the knapsack values);
        subclasses change the size model (e.g. Remix's absolute bins)."""
        hist = grid_histograms(boxes, self.width, self.height, nx, ny)
        acc = self._acc.get((nx, ny))
        if acc is None:
            acc = self._acc[(nx, ny)] = self.family.tile_accuracy(self.width / nx, self.height / ny)
        return eap_values(hist, acc, count_objects(boxes, self.width, self.height))

    def _coverage(self, rects: list[tuple[float, float, float, float]]) -> float:
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects)
        return float(area / (self.width * self.height))

    def adaptive(self, boxes: ArrayLike, budget_ms: float) -> TilePlan:
        """The DP-DP plan (optimal for the discretised budget)."""
        values = np.concatenate([self.grid_values(boxes, 2**d, 2**d) for d in range(self.tree.max_depth + 1)])
        weights, capacity, _ = self.discretise(budget_ms)
        value, assign = dpdp(self.tree.children, values, weights, capacity)
        lat = self.node_latency
        tiles = tuple(
            Tile(*(float(x) for x in self.tree.rects[v]), int(m), self.names[m], int(v))
            for v, m in enumerate(assign) if m >= 0
        )
        total = float(self.plan_latency(sum(lat[t.node, t.model] for t in tiles)))
        return TilePlan("adaptive", tiles, value, total, self._coverage([(t.x0, t.y0, t.x1, t.y1) for t in tiles]))

    def uniform_plans(self, boxes: ArrayLike) -> list[TilePlan]:
        """One uniform plan per model: a ceil(W/in) x ceil(H/in) grid, every tile with that model."""
        plans = []
        ulat = self.uniform_latency
        for m, (nx, ny) in enumerate(self._grids):
            value = float(self.grid_values(boxes, nx, ny)[:, m].sum())
            plans.append(TilePlan("uniform", self._uniform_tiles[m], value, float(ulat[m]), 1.0))
        return plans

    def plan(self, boxes: ArrayLike, budget_ms: float) -> PlanResult:
        """Adaptive vs best fitting uniform plan; the more accurate one is elected (ties: coverage, latency)."""
        t0 = time.perf_counter()
        adaptive = self.adaptive(boxes, budget_ms)
        t1 = time.perf_counter()
        fitting = [p for p in self.uniform_plans(boxes) if p.latency_ms <= budget_ms]
        uniform = max(fitting, key=TilePlan.sort_key) if fitting else None
        t2 = time.perf_counter()
        candidates = [p for p in (adaptive, uniform) if p is not None and (p.tiles or p is uniform)]
        fits = True
        if candidates:
            elected = max(candidates, key=TilePlan.sort_key)
        else:
            fits = False
            lat = self.latency
            m = int(np.argmin(lat))
            value = float(self.grid_values(boxes, 1, 1)[0, m])
            elected = TilePlan("uniform", (Tile(0.0, 0.0, float(self.width), float(self.height), m, self.names[m],
                                                0),), value, float(lat[m]), 1.0)
        if elected.latency_ms > budget_ms + 1e-9:
            fits = False
        return PlanResult(elected, adaptive, uniform, float(budget_ms), fits,
                          {"adaptive": 1e3 * (t1 - t0), "uniform": 1e3 * (t2 - t1)})
