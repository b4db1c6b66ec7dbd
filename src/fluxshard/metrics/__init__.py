"""Accuracy metrics: COCO box / mask / keypoint AP (pycocotools) and accuracy retention vs a dense run."""

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
from fluxshard.metrics.retention import RetentionReport, accuracy_retention

__all__ = [
    "COCO_KPT_SIGMAS",
    "DENSE_REFERENCE",
    "GROUND_TRUTH",
    "APResult",
    "ReferenceFilter",
    "RetentionReport",
    "accuracy_retention",
    "average_precision",
    "iou_types_for",
    "to_coco",
]
