"""COCO-style AP for per-frame model results, computed by pycocotools' own ``COCOeval``.

Each frame is one COCO image. A reference (ground truth, or a dense model's outputs taken as ground truth)
and a set of predictions are both given as the typed results of :mod:`fluxshard.models.base`; they are
converted to COCO dictionaries here and evaluated with the reference implementation, so the numbers are
the ones every COCO paper reports (101-point interpolated AP, area range "all", the last ``maxDets``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fluxshard.models.base import Keypoints, Results, Segmentations

IouType = Literal["bbox", "segm", "keypoints"]

# COCO keypoint OKS sigmas (the values pycocotools uses by default for the 17 person keypoints).
COCO_KPT_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07,
                            0.87, 0.87, 0.89, 0.89]) / 10.0


@dataclass(frozen=True)
class ReferenceFilter:
    """How reference results become COCO ground truth.

    Ground-truth annotations pass with their scores ignored; when a *model's* outputs are the reference,
    only confident instances (``min_score``) and keypoints (``min_kpt_score``, else marked not visible)
    count as objects, otherwise every low-score guess would be an object the candidate must find.
    """

    min_score: float = 0.0
    min_kpt_score: float = 0.0


GROUND_TRUTH = ReferenceFilter()
DENSE_REFERENCE = ReferenceFilter(min_score=0.5, min_kpt_score=0.3)


def iou_types_for(results: Sequence[Results]) -> list[IouType]:
    """The COCO evaluations that make sense for this kind of result."""
    if not results:
        return ["bbox"]
    first = results[0]
    if isinstance(first, Keypoints):
        return ["keypoints"]
    if isinstance(first, Segmentations):
        return ["bbox", "segm"]
    return ["bbox"]


def _xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _kpt_triplets(kp: np.ndarray, min_kpt_score: float, as_gt: bool) -> tuple[list[float], int]:
    """COCO ``[x, y, v]*K``: for ground truth v=2 (visible) or 0 (not labelled); predictions keep score."""
    out: list[float] = []
    n_vis = 0
    for x, y, s in kp:
        if as_gt:
            vis = s >= min_kpt_score
            n_vis += int(vis)
            out += [float(x), float(y), 2.0] if vis else [0.0, 0.0, 0.0]
        else:
            out += [float(x), float(y), float(s)]
    return out, n_vis


def _instances(res: Results, iou_type: IouType) -> list[dict[str, Any]]:
    """One dict per instance with the COCO fields ``iou_type`` needs (score and category included)."""
    out = []
    if isinstance(res, Keypoints):
        if iou_type != "keypoints":
            raise ValueError(f"pose results support only iou_type 'keypoints', not {iou_type!r}")
        for kp, s, b in zip(res.keypoints, res.scores, res.boxes, strict=True):
            out.append({"category_id": 1, "score": float(s), "bbox": _xywh(b), "kp": kp})
        return out
    if iou_type == "keypoints":
        raise ValueError("iou_type 'keypoints' needs pose results (Keypoints)")
    if iou_type == "segm" and not isinstance(res, Segmentations):
        raise ValueError("iou_type 'segm' needs results with masks (Segmentations)")
    for i, (b, s, c) in enumerate(zip(res.boxes, res.scores, res.class_ids, strict=True)):
        d: dict[str, Any] = {"category_id": int(c) + 1, "score": float(s), "bbox": _xywh(b)}
        if iou_type == "segm":
            d["mask"] = res.masks[i]  # type: ignore[union-attr]
        out.append(d)
    return out


def _frame_hw(res: Results, fallback: tuple[int, int]) -> tuple[int, int]:
    if isinstance(res, Segmentations) and res.masks.shape[1] > 0:
        return int(res.masks.shape[1]), int(res.masks.shape[2])
    return fallback


def to_coco(
    predictions: Sequence[Results], references: Sequence[Results], iou_type: IouType,
    reference_filter: ReferenceFilter = GROUND_TRUTH,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(ground-truth dataset dict, detection list) in COCO format; image id = frame index."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted frames but {len(references)} reference frames")
    images, anns, dets = [], [], []
    cats: set[int] = set()
    for img_id, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        h, w = _frame_hw(ref, _frame_hw(pred, (1 << 16, 1 << 16)))
        images.append({"id": img_id, "height": h, "width": w})
        for inst in _instances(ref, iou_type):
            if inst["score"] < reference_filter.min_score:
                continue
            bw, bh = inst["bbox"][2:]
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": inst["category_id"], "iscrowd": 0,
                   "bbox": inst["bbox"], "area": bw * bh}
            if iou_type == "segm":
                ann["segmentation"] = _rle(inst["mask"])
                ann["area"] = float(inst["mask"].sum())
            elif iou_type == "keypoints":
                ann["keypoints"], ann["num_keypoints"] = _kpt_triplets(inst["kp"], reference_filter.min_kpt_score,
                                                                       as_gt=True)
            anns.append(ann)
            cats.add(inst["category_id"])
        for inst in _instances(pred, iou_type):
            det = {"image_id": img_id, "category_id": inst["category_id"], "score": inst["score"]}
            if iou_type == "bbox":
                det["bbox"] = inst["bbox"]
            elif iou_type == "segm":
                det["segmentation"] = _rle(inst["mask"])
            else:
                det["keypoints"], _ = _kpt_triplets(inst["kp"], 0.0, as_gt=False)
            dets.append(det)
            cats.add(inst["category_id"])
    categories = [{"id": c, "name": str(c)} for c in sorted(cats)]
    if iou_type == "keypoints":
        categories = [{"id": 1, "name": "person", "keypoints": [str(i) for i in range(17)], "skeleton": []}]
    return {"images": images, "annotations": anns, "categories": categories}, dets


@dataclass(frozen=True)
class APResult:
    """AP averaged over IoU (or OKS) thresholds 0.50:0.95 and at 0.50, plus what went into it."""

    iou_type: IouType
    map: float  # AP@[.50:.95]; NaN when the reference has no objects
    map50: float
    num_reference: int
    num_predictions: int

    def to_dict(self) -> dict[str, Any]:
        def r(v: float) -> float | None:
            return None if np.isnan(v) else round(float(v), 6)

        return {"iou_type": self.iou_type, "map": r(self.map), "map50": r(self.map50),
                "num_reference": self.num_reference, "num_predictions": self.num_predictions}


def average_precision(
    predictions: Sequence[Results], references: Sequence[Results], iou_type: IouType = "bbox",
    reference_filter: ReferenceFilter = GROUND_TRUTH, kpt_sigmas: np.ndarray | None = None,
) -> APResult:
    """COCO AP of ``predictions`` against ``references`` (per-frame lists of the same length)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, dets = to_coco(predictions, references, iou_type, reference_filter)
    n_ref = len(gt_dict["annotations"])
    if n_ref == 0:
        return APResult(iou_type, float("nan"), float("nan"), 0, len(dets))
    if not dets:
        return APResult(iou_type, 0.0, 0.0, n_ref, 0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step on stdout
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType=iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = COCO_KPT_SIGMAS if kpt_sigmas is None else np.asarray(kpt_sigmas)
        ev.evaluate()
        ev.accumulate()
    # Same reduction as COCOeval.summarize() (area "all", last maxDets), without its printing.
    prec = ev.eval["precision"][:, :, :, 0, -1]  # T × R × K
    iou_thrs = ev.params.iouThrs

    def mean_valid(p: np.ndarray) -> float:
        v = p[p > -1]
        return float(v.mean()) if v.size else float("nan")

    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    return APResult(iou_type, mean_valid(prec), mean_valid(prec[t50]), n_ref, len(dets))
