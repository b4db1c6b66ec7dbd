"""Per-frame glue of the runtime phase (§3.2): camera update -> local objects -> tile plan, plus the
bootstrap-time plan-runtime estimate (§3.1.3).

Why a separate module: frame inference, baselines and the CLI (later sessions) need one call per frame that
returns the plan with its timing breakdown (pre-processing = camera update + reprojection, DP-DP, uniform
plans), while the pieces stay individually testable.

Decisions: the inference budget is ``SLO - plan_runtime_ms`` of the family profile (§3.1.3); when the
profile's estimate is 0 (not measured yet) the planner sees the full SLO. The plan-runtime estimate times
:meth:`UirapuruPlanner.plan_frame` on the historical objects, i.e. it includes reprojection, not only DP-DP,
because both are paid inside the SLO.

**Online latency correction** (:class:`LoadTracker`, not in the paper). On a shared machine the load drifts
after profiling, and a p99 measured in one window is not the p99 ten minutes later. The runtime times every
tile it runs anyway, so each run gives ``ratio = observed / profiled mean`` of its (geometry, member); the
planner's latencies (p99 or mean, per mode) are multiplied by ``median(last 32 ratios) / median ratio at
profiling``, clamped to [0.5, 4]. The median keeps the tail's shape from the profile (the p99 still comes
from there) and moves only its scale, and one slow tile cannot swing it; until 8 ratios are seen the
factor is 1. Re-profiling instead would cost minutes of model runs per drift and still lag the load.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fluxshard.motion import MotionField
from fluxshard.tiling.camera import CameraTracker, Similarity
from fluxshard.tiling.planner import PlanResult, TilePlanner
from fluxshard.tiling.profile import FamilyProfile, plan_runtime_estimate


@dataclass
class FramePlan:
    result: PlanResult
    local_boxes: np.ndarray  # historical objects reprojected into this frame (xyxy, clipped)
    fit: Similarity | None  # the motion-vector fit when the camera was estimated from a field
    timings_ms: dict[str, float]


LOAD_WINDOW = 32
LOAD_MIN_SAMPLES = 8
LOAD_CLAMP = (0.5, 4.0)


class LoadTracker:
    """Online scale of the latency model: ``median(recent observed / profiled mean) / baseline``."""

    def __init__(self, baseline: float = 1.0, window: int = LOAD_WINDOW, min_samples: int = LOAD_MIN_SAMPLES,
                 clamp: tuple[float, float] = LOAD_CLAMP) -> None:
        if not baseline > 0:
            raise ValueError("baseline ratio must be > 0")
        self.baseline = float(baseline)
        self.ratios: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples
        self.clamp = clamp

    def observe(self, observed_ms: float, predicted_ms: float) -> None:
        if predicted_ms > 0 and observed_ms >= 0:
            self.ratios.append(float(observed_ms) / float(predicted_ms))

    @property
    def factor(self) -> float:
        if len(self.ratios) < self.min_samples:
            return 1.0
        return float(np.clip(np.median(self.ratios) / self.baseline, *self.clamp))


class UirapuruPlanner:
    """Historical objects (global view) + camera tracker + tile planner for one stream."""

    def __init__(
        self,
        family: FamilyProfile,
        history_boxes: ArrayLike,
        width: int,
        height: int,
        mode: str = "conservative",
        initial_view: ArrayLike | None = None,
        max_depth: int | None = None,
        online: bool = True,
    ) -> None:
        self.family = family
        self.online = online
        dep = family.meta.get("deployment")
        # conservative: the correction may only raise the profiled p99 (the guarantee's basis), never lower it
        self.load = LoadTracker(float(dep.get("ratio_median", 1.0)) if isinstance(dep, dict) else 1.0,
                                clamp=(1.0 if mode == "conservative" else LOAD_CLAMP[0], LOAD_CLAMP[1]))
        self.history = np.asarray(history_boxes, dtype=np.float64).reshape(-1, 4)
        self.width, self.height = int(width), int(height)
        self.tracker = CameraTracker(initial_view)
        self.planner = TilePlanner(family, width, height, mode=mode, max_depth=max_depth)

    def observe(self, runs: Sequence[Any]) -> None:
        """Feed the tiles just run (``.rect``, ``.model``, ``.ms``) to the online latency correction."""
        if not self.online:
            return
        for r in runs:
            x0, y0, x1, y1 = r.rect
            self.load.observe(r.ms, float(self.family.tile_latencies("non-conservative", x1 - x0, y1 - y0)[r.model]))
        self.planner.load_factor = self.load.factor

    def plan_frame(
        self,
        slo_ms: float,
        *,
        delta: ArrayLike | None = None,
        view: ArrayLike | None = None,
        field: MotionField | None = None,
    ) -> FramePlan:
        """Advance the camera by one of ``view`` (global->frame map), ``delta`` (previous->current) or
        ``field`` (estimated), or keep it when none is given; then plan within ``SLO - plan runtime``."""
        if sum(x is not None for x in (delta, view, field)) > 1:
            raise ValueError("give at most one of delta, view, field")
        t0 = time.perf_counter()
        fit = None
        if view is not None:
            self.tracker.matrix = np.asarray(view, dtype=np.float64).copy()
        elif delta is not None:
            self.tracker.update(delta)
        elif field is not None:
            fit = self.tracker.update_from_field(field)
        local, _ = self.tracker.reproject(self.history, self.width, self.height)
        t1 = time.perf_counter()
        result = self.planner.plan(local, self.family.inference_budget(slo_ms))
        timings = {"preprocess": 1e3 * (t1 - t0), **result.timings_ms}
        timings["total"] = 1e3 * (time.perf_counter() - t0)
        return FramePlan(result, local, fit, timings)


def measure_plan_runtime(
    family: FamilyProfile, history_boxes: ArrayLike, views: Iterable[ArrayLike], width: int, height: int,
    slo_ms: float, mode: str = "conservative", max_depth: int | None = None,
) -> float:
    """§3.1.3: time planning at ``slo_ms`` over the given views of the history; p99 + 10 %."""
    probe = UirapuruPlanner(family.with_runtime(0.0), history_boxes, width, height, mode, max_depth=max_depth)
    probe.plan_frame(slo_ms)  # compile / warm caches outside the measurement
    times = [probe.plan_frame(slo_ms, view=v).timings_ms["total"] for v in views]
    return plan_runtime_estimate(times)
