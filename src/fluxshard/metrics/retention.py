"""Accuracy retention: how much of the dense model's accuracy a candidate (e.g. incremental) run keeps.

With ground truth: ``retention = AP(candidate, gt) / AP(dense, gt)``. Without: the dense model's confident
outputs are the reference, so ``retention = AP(candidate, dense)`` (the dense run scores 1.0 against itself
by construction). Every report carries ``reference`` so the two are never confused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fluxshard.metrics.coco import (
    DENSE_REFERENCE,
    GROUND_TRUTH,
    APResult,
    IouType,
    ReferenceFilter,
    average_precision,
    iou_types_for,
)
from fluxshard.models.base import Results

Reference = Literal["ground_truth", "dense_outputs"]


def _ratio(a: float, b: float) -> float:
    if np.isnan(a) or np.isnan(b) or b <= 0:
        return float("nan")
    return a / b


@dataclass
class RetentionReport:
    """Per COCO evaluation type: candidate AP, dense AP (ground-truth mode only) and their ratio."""

    reference: Reference
    frames: int
    candidate: dict[str, APResult] = field(default_factory=dict)
    dense: dict[str, APResult] = field(default_factory=dict)
    retention: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: None if np.isnan(v) else round(float(v), 6) for k, v in d.items()}

        return {
            "reference": self.reference,
            "frames": self.frames,
            "retention": {k: clean(v) for k, v in self.retention.items()},
            "candidate": {k: v.to_dict() for k, v in self.candidate.items()},
            "dense": {k: v.to_dict() for k, v in self.dense.items()},
        }


def accuracy_retention(
    candidate: Sequence[Results], dense: Sequence[Results], ground_truth: Sequence[Results] | None = None,
    iou_types: Sequence[IouType] | None = None, dense_reference: ReferenceFilter = DENSE_REFERENCE,
) -> RetentionReport:
    """Retention of ``candidate`` w.r.t. ``dense`` for every applicable COCO metric (per-frame lists)."""
    if len(candidate) != len(dense):
        raise ValueError(f"candidate has {len(candidate)} frames, dense has {len(dense)}")
    types = list(iou_types) if iou_types is not None else iou_types_for(dense)
    if ground_truth is not None:
        if len(ground_truth) != len(dense):
            raise ValueError(f"ground truth has {len(ground_truth)} frames, dense has {len(dense)}")
        rep = RetentionReport("ground_truth", len(dense))
        for t in types:
            c = average_precision(candidate, ground_truth, t, GROUND_TRUTH)
            d = average_precision(dense, ground_truth, t, GROUND_TRUTH)
            rep.candidate[t], rep.dense[t] = c, d
            rep.retention[t] = {"map": _ratio(c.map, d.map), "map50": _ratio(c.map50, d.map50)}
        return rep
    rep = RetentionReport("dense_outputs", len(dense))
    for t in types:
        c = average_precision(candidate, dense, t, dense_reference)
        rep.candidate[t] = c
        rep.retention[t] = {"map": c.map, "map50": c.map50}
    return rep
