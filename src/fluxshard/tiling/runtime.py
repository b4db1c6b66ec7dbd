"""Per-frame glue of the runtime phase (§3.2): camera update -> local objects -> tile plan, plus the
bootstrap-time plan-runtime estimate (§3.1.3).

Why a separate module: frame inference, baselines and the CLI (later sessions) need one call per frame that
returns the plan with its timing breakdown (pre-processing = camera update + reprojection, DP-DP, uniform
plans), while the pieces stay individually testable.

Decisions: the inference budget is ``SLO - plan_runtime_ms`` of the family profile (§3.1.3); when the
profile's estimate is 0 (not measured yet) the planner sees the full SLO. The plan-runtime estimate times
:meth:`UirapuruPlanner.plan_frame` on the historical objects, i.e. it includes reprojection, not only DP-DP,
because both are paid inside the SLO.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

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
    ) -> None:
        self.family = family
        self.history = np.asarray(history_boxes, dtype=np.float64).reshape(-1, 4)
        self.width, self.height = int(width), int(height)
        self.tracker = CameraTracker(initial_view)
        self.planner = TilePlanner(family, width, height, mode=mode, max_depth=max_depth)

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
    probe = UirapuruPlanner(FamilyProfile(family.models), history_boxes, width, height, mode, max_depth=max_depth)
    probe.plan_frame(slo_ms)  # compile / warm caches outside the measurement
    times = [probe.plan_frame(slo_ms, view=v).timings_ms["total"] for v in views]
    return plan_runtime_estimate(times)
