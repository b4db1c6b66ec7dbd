"""Accuracy metrics: COCO box / mask / keypoint AP (pycocotools), accuracy retention vs a dense run, and OKS
agreement of pose runs."""

from fluxshard.metrics.coco import (
    COCO_KPT_SIGMAS,
    DENSE_REFERENCE,
    GROUND_TRUTH,
    APResult,
    ReferenceFilter,
    average_precision,
    iou_types_for,
    to_coco,
)
from fluxshard.metrics.oks import OKS_THRESHOLD, OKSReport, keypoint_similarity, oks
from fluxshard.metrics.retention import MIN_REFERENCE_OBJECTS, RetentionReport, accuracy_retention, too_few_note

__all__ = [
    "COCO_KPT_SIGMAS",
    "DENSE_REFERENCE",
    "GROUND_TRUTH",
    "MIN_REFERENCE_OBJECTS",
    "OKS_THRESHOLD",
    "APResult",
    "OKSReport",
    "ReferenceFilter",
    "RetentionReport",
    "accuracy_retention",
    "average_precision",
    "iou_types_for",
    "keypoint_similarity",
    "oks",
    "to_coco",
    "too_few_note",
]
