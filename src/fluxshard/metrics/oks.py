"""Object keypoint similarity (OKS) of a candidate pose run against a reference run (dense inference).

Per reference person, ``OKS = mean over its visible keypoints of exp(−d² / (2 · s² · (2σ)²))`` — COCO's
definition, with pycocotools' per-keypoint σ (``COCO_KPT_SIGMAS``) and its ``area + eps`` — where ``d`` is the
distance between the reference and the candidate keypoint and ``s²`` the object scale. The reference here is
a model's output, not an annotation, so there is no segment area: ``s²`` is the area of the box around the
reference's visible keypoints (tighter than a person box, so this OKS is, if anything, strict). Visible =
keypoint score ≥ 0.3 (the keypoint filter of the AP metrics' dense reference); a reference person is a pose
whose visible keypoints span a box of positive area (at least two, not on one line: with a zero scale the
similarity degenerates to exact-or-nothing). No instance-score filter by default (``POSE_REFERENCE``): a
single-pose model's instance score is the mean of all 17 keypoint scores, which for small or partly hidden
people sits well below the 0.5 the box metrics use (MoveNet on vtest: 0.15–0.46 for clearly placed
pedestrians), so that filter would leave no reference at all.

Candidates are matched to reference persons per frame, greedily by OKS (highest first); an unmatched
reference person scores 0. Two figures:

* ``oks_mean`` — mean OKS over reference persons: how closely the candidate keeps the dense poses.
* ``oks_retention`` — the fraction of reference persons with OKS ≥ 0.5 (COCO's loosest keypoint-AP
  threshold): the share of poses kept. Chosen over AP@OKS0.5 because single-pose models give exactly one
  instance per frame in both runs: AP would then rank frames by the model's confidence, mixing the score into
  what should measure agreement, while the fraction is the AP@0.5 recall without that ranking and reads
  directly as "poses kept". Like every retention it is undefined (None, with a note) below
  ``MIN_REFERENCE_OBJECTS`` reference persons; ``oks_mean`` is always given with the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fluxshard.metrics.coco import COCO_KPT_SIGMAS, DENSE_REFERENCE, ReferenceFilter
from fluxshard.metrics.retention import MIN_REFERENCE_OBJECTS
from fluxshard.models.base import Keypoints

OKS_THRESHOLD = 0.5
POSE_REFERENCE = ReferenceFilter(min_score=0.0, min_kpt_score=DENSE_REFERENCE.min_kpt_score)


def reference_area(ref: np.ndarray, min_kpt_score: float = DENSE_REFERENCE.min_kpt_score) -> float:
    """Object scale s²: area of the box around the visible keypoints of one K×3 (x, y, score) pose."""
    vis = ref[ref[:, 2] >= min_kpt_score]
    if not len(vis):
        return 0.0
    return float(np.ptp(vis[:, 0]) * np.ptp(vis[:, 1]))


def oks(pred: np.ndarray, ref: np.ndarray, area: float | None = None, sigmas: np.ndarray | None = None,
        min_kpt_score: float = DENSE_REFERENCE.min_kpt_score) -> float:
    """OKS of one candidate pose (K×2 or K×3, x y first) against one reference pose (K×3 x, y, score) over the
    reference's visible keypoints; NaN when it has none. ``area`` defaults to :func:`reference_area`."""
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    k = np.asarray(COCO_KPT_SIGMAS if sigmas is None else sigmas, np.float64)
    if pred.shape[0] != ref.shape[0] or ref.shape[0] != len(k):
        raise ValueError(f"poses of {pred.shape[0]} and {ref.shape[0]} keypoints, {len(k)} sigmas")
    vis = ref[:, 2] >= min_kpt_score
    if not vis.any():
        return float("nan")
    s2 = reference_area(ref, min_kpt_score) if area is None else float(area)
    d2 = (pred[:, 0] - ref[:, 0]) ** 2 + (pred[:, 1] - ref[:, 1]) ** 2
    e = d2 / (2.0 * k) ** 2 / (s2 + np.spacing(1)) / 2.0  # pycocotools' computeOks, term for term
    return float(np.exp(-e[vis]).mean())


@dataclass
class OKSReport:
    """Agreement of a candidate pose run with a reference run (see the module docstring)."""

    frames: int
    persons: int  # reference persons (score ≥ min_score, visible keypoints spanning a positive area)
    oks_mean: float | None
    oks_retention: float | None  # fraction of reference persons with OKS ≥ threshold; None below the minimum
    threshold: float = OKS_THRESHOLD
    note: str | None = None  # why oks_retention is None
    per_frame: list[list[float]] = field(default_factory=list, repr=False)  # OKS of each reference person

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(float(v), 6)

        return {"frames": self.frames, "persons": self.persons, "oks_mean": r(self.oks_mean),
                "oks_retention": r(self.oks_retention), "threshold": self.threshold, "note": self.note}


def _match(cand: Keypoints, ref: np.ndarray, ref_filter: ReferenceFilter, sigmas: np.ndarray | None) -> list[float]:
    """OKS per reference pose of one frame after greedy one-to-one matching (unmatched: 0)."""
    if not len(ref):
        return []
    m = np.array([[oks(c[:, :2], r, sigmas=sigmas, min_kpt_score=ref_filter.min_kpt_score) for c in cand.keypoints]
                  for r in ref]).reshape(len(ref), len(cand))
    out = [0.0] * len(ref)
    m = np.nan_to_num(m, nan=-1.0)
    while m.size and m.max() >= 0:
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        out[i] = float(m[i, j])
        m[i, :] = -1.0
        m[:, j] = -1.0
    return out


def keypoint_similarity(candidate: Sequence[Keypoints], reference: Sequence[Keypoints],
                        ref_filter: ReferenceFilter = POSE_REFERENCE, threshold: float = OKS_THRESHOLD,
                        min_reference: int = MIN_REFERENCE_OBJECTS, sigmas: np.ndarray | None = None) -> OKSReport:
    """Mean OKS and OKS retention of ``candidate`` against ``reference`` (per-frame lists of the same length)."""
    if len(candidate) != len(reference):
        raise ValueError(f"candidate has {len(candidate)} frames, reference has {len(reference)}")
    per_frame = []
    for c, r in zip(candidate, reference, strict=True):
        keep = [kp for kp, s in zip(r.keypoints, r.scores, strict=True)
                if s >= ref_filter.min_score and reference_area(kp, ref_filter.min_kpt_score) > 0]
        per_frame.append(_match(c, np.asarray(keep, np.float64).reshape(-1, r.keypoints.shape[1], 3), ref_filter,
                                sigmas))
    vals = [v for f in per_frame for v in f]
    n = len(vals)
    mean = float(np.mean(vals)) if vals else None
    if n < min_reference:
        cond = f"score ≥ {ref_filter.min_score:g}, " if ref_filter.min_score else ""
        note = f"n/a (only {n} reference persons: {cond}keypoints ≥ score {ref_filter.min_kpt_score:g})"
        return OKSReport(len(reference), n, mean, None, threshold, note, per_frame)
    return OKSReport(len(reference), n, mean, float(np.mean([v >= threshold for v in vals])), threshold, None,
                     per_frame)
