"""Baselines of §4.1: down-sampling, uniform tiling, and a Remix-like planner.

* **Down-sampling** (``ds-<member>``): the member on the whole frame (one tile, letterboxed).
* **Uniform tiling** (``ut-<member>``): the member on every cell of the ``ceil(W/s) x ceil(H/s)`` grid.
* At a given SLO, the DS/UT baseline is, among the members whose *profiled mean* plan latency fits the SLO,
  the one with the highest measured mAP on the clip (an oracle choice: the strongest baseline one could
  deploy at that SLO); if none fits, the fastest one (which then misses). :func:`pick_for_slo` is the
  a-priori variant (largest fitting input).
* **Remix-like** (:class:`RemixPlanner`): the historical objects seen from the camera's *initial* view, never
  re-projected (no camera tracking: Remix assumes a static camera), Remix's 12 absolute-size bins over the
  object side in model-input pixels (``[0, 8)``, ten uniform bins to 196 px, ``>= 196``: the scaling-factor
  correction for tiles is this rescaling to the input), mean latencies (Remix targets the average), the same
  quad-tree, DP-DP and plan election as Uirapuru (generous to Remix: its own search is heuristic). The plan
  is computed once per SLO, offline like Remix's, so it adds no per-frame planning time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from fluxshard.tiling.bins import N_BINS
from fluxshard.tiling.infer import uniform_grid
from fluxshard.tiling.planner import TilePlanner, _as_boxes, _centres_in_frame, count_objects
from fluxshard.tiling.profile import FamilyProfile, ModelProfile
from fluxshard.tiling.profiler import remix_accuracy

Rect = tuple[float, float, float, float]


def downsample_plan(width: int, height: int, model: int) -> list[tuple[Rect, int]]:
    return [((0.0, 0.0, float(width), float(height)), int(model))]


def uniform_plan(width: int, height: int, input_size: int, model: int) -> list[tuple[Rect, int]]:
    return [(r, int(model)) for r in uniform_grid(width, height, input_size)]


def tiles_per_frame(width: int, height: int, input_size: int) -> int:
    return math.ceil(width / input_size) * math.ceil(height / input_size)


def fitting(profile: FamilyProfile, slo_ms: float, n_tiles: Sequence[int]) -> list[int]:
    """Members whose profiled mean latency x tiles fits the SLO; if none, the cheapest alone."""
    return fitting_plans(profile.latencies("non-conservative") * np.asarray(n_tiles), slo_ms)


def fitting_plans(plan_ms: ArrayLike, slo_ms: float) -> list[int]:
    """Members whose plan latency (ms) fits the SLO; if none, the cheapest alone."""
    lat = np.asarray(plan_ms, dtype=np.float64)
    fits = [m for m in range(len(lat)) if lat[m] <= slo_ms]
    return fits or [int(np.argmin(lat))]


def plan_latencies(profile: FamilyProfile, width: int, height: int,
                   mode: str = "non-conservative") -> tuple[np.ndarray, np.ndarray]:
    """(down-sampling, uniform tiling) latency of every member, from the profile's per-geometry figures; in
    conservative mode with a plan tail model, the p99 of the plan's summed means (as the planner does)."""
    sizes = profile.input_sizes()
    tail = mode == "conservative" and bool(profile.plan_tail)
    lat_mode = "non-conservative" if tail else mode
    ds = profile.tile_latencies(lat_mode, width, height)
    ut = []
    for m, s in enumerate(sizes):
        nx, ny = math.ceil(width / s), math.ceil(height / s)
        ut.append(nx * ny * profile.tile_latencies(lat_mode, width / nx, height / ny)[m])
    ut_arr = np.array(ut)
    if tail:
        return profile.plan_p99(ds), profile.plan_p99(ut_arr)
    return ds, ut_arr


def pick_for_slo(profile: FamilyProfile, slo_ms: float, n_tiles: Sequence[int]) -> int:
    """Largest-input member whose profiled mean latency x tiles fits the SLO, else the fastest plan."""
    lat = profile.latencies("non-conservative") * np.asarray(n_tiles)
    fits = [m for m in range(len(lat)) if lat[m] <= slo_ms]
    if not fits:
        return int(np.argmin(lat))
    return max(fits, key=lambda m: profile.models[m].input_size)


class RemixPlanner(TilePlanner):
    """Tile planner whose values use Remix's absolute-size profile (see module docstring)."""

    def __init__(self, family: FamilyProfile, width: int, height: int, max_depth: int | None = None,
                 mode: str = "non-conservative") -> None:
        edges, acc = remix_accuracy(family)
        # The base class wants 22-bin accuracy vectors; Remix's values never use them (Remix keeps its pooled
        # absolute bins: no per-geometry accuracy).
        flat = FamilyProfile(tuple(ModelProfile(m.name, m.input_size, m.mean_ms, m.p99_ms, (0.0,) * N_BINS)
                                   for m in family.models), family.plan_runtime_ms, family.meta, family.tile_ms,
                             plan_tail=family.plan_tail)
        super().__init__(flat, width, height, mode=mode, max_depth=max_depth)
        self.remix_edges = edges
        self.remix_acc = acc
        self.sizes = family.input_sizes().astype(np.float64)

    def grid_values(self, boxes: ArrayLike, nx: int, ny: int) -> np.ndarray:
        b = _as_boxes(boxes)
        b = b[_centres_in_frame(b, self.width, self.height)]
        n = count_objects(b, self.width, self.height)
        out = np.zeros((nx * ny, len(self.sizes)))
        if n == 0:
            return out
        tw, th = self.width / nx, self.height / ny
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        cell = np.minimum((cy // th).astype(np.intp), ny - 1) * nx + np.minimum((cx // tw).astype(np.intp), nx - 1)
        side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)) / max(tw, th)
        for m, s in enumerate(self.sizes):
            bins = np.searchsorted(self.remix_edges, side * s, side="right")
            np.add.at(out[:, m], cell, self.remix_acc[m, bins])
        return out / n
