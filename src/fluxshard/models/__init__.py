"""Model adapters: preprocessing, an incrementally runnable convolutional body, postprocessing."""

from fluxshard.models.base import (
    COCO_CLASSES,
    COCO_KEYPOINTS,
    COCO_SKELETON,
    Detections,
    Keypoints,
    ModelAdapter,
    Segmentations,
    batched_nms,
    box_iou,
    nms,
)
from fluxshard.models.registry import (
    DEFAULT_MODEL,
    ModelError,
    available_models,
    load_model,
    register,
    register_suffix,
)

# Importing the adapter modules registers them.
from fluxshard.models import movenet as _movenet  # noqa: F401  isort: skip
from fluxshard.models import nanodet as _nanodet  # noqa: F401  isort: skip
from fluxshard.models import ultralytics as _ultralytics  # noqa: F401  isort: skip

__all__ = [
    "COCO_CLASSES",
    "COCO_KEYPOINTS",
    "COCO_SKELETON",
    "DEFAULT_MODEL",
    "Detections",
    "Keypoints",
    "ModelAdapter",
    "ModelError",
    "Segmentations",
    "available_models",
    "batched_nms",
    "box_iou",
    "load_model",
    "nms",
    "register",
    "register_suffix",
]
