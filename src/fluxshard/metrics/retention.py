"""Accuracy retention: how much of the dense model's accuracy a candidate (e.g. incremental) run keeps.

With ground truth: ``retention = AP(candidate, gt) / AP(dense, gt)``. Without: the dense model's confident
outputs are the reference, so ``retention = AP(candidate, dense)`` (the dense run scores 1.0 against itself
by construction). Every report carries ``reference`` so the two are never confused.

A retention needs enough reference objects to mean anything: below ``MIN_REFERENCE_OBJECTS`` (100) it is
undefined (NaN here, ``null`` in JSON, "n/a (only N reference objects ≥ score s)" in tables) and the report
says how many there were. Why 100: one missed object among N lowers the recall ceiling, and so AP@0.5, by
about 1/N, and one confident false positive ranked above the true matches costs about as much; with fewer
than 100 objects a single such event moves the number by more than the 1 % loss the profiles' 0.99 target
allows, so the value cannot tell a run that meets the target from one that misses it (a handheld clip with
5 reference objects gave 0.178, 0.129 and 1.0 on three runs of the same command).
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

#: Fewest reference objects (per evaluation type) for which a retention is reported (see the module docstring).
MIN_REFERENCE_OBJECTS = 100


def too_few_note(n: int, min_score: float | None, what: str = "reference objects") -> str:
    """The table text for a retention left undefined: ``n/a (only N reference objects ≥ score s)``."""
    cond = f" ≥ score {min_score:g}" if min_score else ""
    return f"n/a (only {n} {what}{cond})"


def _ratio(a: float, b: float) -> float:
    if np.isnan(a) or np.isnan(b) or b <= 0:
        return float("nan")
    return a / b


@dataclass
class RetentionReport:
    """Per COCO evaluation type: candidate AP, dense AP (ground-truth mode only) and their ratio, with the
    number of reference objects behind them; ``notes`` says why a retention is undefined (NaN)."""

    reference: Reference
    frames: int
    candidate: dict[str, APResult] = field(default_factory=dict)
    dense: dict[str, APResult] = field(default_factory=dict)
    retention: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_objects: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    min_reference_objects: int = MIN_REFERENCE_OBJECTS

    def value(self, iou_type: str, key: str = "map50") -> float | None:
        """One retention as a float, or None where it is undefined."""
        v = self.retention.get(iou_type, {}).get(key)
        return None if v is None or not np.isfinite(v) else float(v)

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: None if np.isnan(v) else round(float(v), 6) for k, v in d.items()}

        return {
            "reference": self.reference,
            "frames": self.frames,
            "retention": {k: clean(v) for k, v in self.retention.items()},
            "reference_objects": dict(self.reference_objects),
            "min_reference_objects": self.min_reference_objects,
            "notes": dict(self.notes),
            "candidate": {k: v.to_dict() for k, v in self.candidate.items()},
            "dense": {k: v.to_dict() for k, v in self.dense.items()},
        }


def accuracy_retention(
    candidate: Sequence[Results], dense: Sequence[Results], ground_truth: Sequence[Results] | None = None,
    iou_types: Sequence[IouType] | None = None, dense_reference: ReferenceFilter = DENSE_REFERENCE,
    min_reference: int = MIN_REFERENCE_OBJECTS,
) -> RetentionReport:
    """Retention of ``candidate`` w.r.t. ``dense`` for every applicable COCO metric (per-frame lists); NaN with
    a note where the reference holds fewer than ``min_reference`` objects."""
    if len(candidate) != len(dense):
        raise ValueError(f"candidate has {len(candidate)} frames, dense has {len(dense)}")
    types = list(iou_types) if iou_types is not None else iou_types_for(dense)
    if ground_truth is not None:
        if len(ground_truth) != len(dense):
            raise ValueError(f"ground truth has {len(ground_truth)} frames, dense has {len(dense)}")
        rep = RetentionReport("ground_truth", len(dense), min_reference_objects=min_reference)
        for t in types:
            c = average_precision(candidate, ground_truth, t, GROUND_TRUTH)
            d = average_precision(dense, ground_truth, t, GROUND_TRUTH)
            rep.candidate[t], rep.dense[t] = c, d
            rep.retention[t] = {"map": _ratio(c.map, d.map), "map50": _ratio(c.map50, d.map50)}
            _require(rep, t, d.num_reference, None, "ground-truth objects")
        return rep
    rep = RetentionReport("dense_outputs", len(dense), min_reference_objects=min_reference)
    for t in types:
        c = average_precision(candidate, dense, t, dense_reference)
        rep.candidate[t] = c
        rep.retention[t] = {"map": c.map, "map50": c.map50}
        _require(rep, t, c.num_reference, dense_reference.min_score, "reference objects")
    return rep


def _require(rep: RetentionReport, t: str, n: int, min_score: float | None, what: str) -> None:
    """Record the reference count; below the minimum the retention becomes undefined and a note says why."""
    rep.reference_objects[t] = n
    if n < rep.min_reference_objects:
        rep.retention[t] = {k: float("nan") for k in rep.retention[t]}
        rep.notes[t] = too_few_note(n, min_score, what)
