"""Adapter interface: preprocessing -> convolutional body (plain ``nn.Module``) -> postprocessing.

The engine runs :attr:`ModelAdapter.body` incrementally, so a body only uses standard NCHW float32 torch
ops (conv2d with folded BN, activations, add, cat, interpolate, pooling). Everything that is not a dense
convolutional map (box decoding, NMS, argmax/gather over heatmaps) lives in :meth:`ModelAdapter.postprocess`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip

# Limb pairs (indices into COCO_KEYPOINTS) for drawing skeletons.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (1, 3), (2, 4), (5, 6), (5, 7), (7, 9), (6, 8), (8, 10), (5, 11), (6, 12),
    (11, 12), (11, 13), (13, 15), (12, 14), (14, 16),
)  # fmt: skip


@dataclass
class Detections:
    """Boxes in original-frame pixels (``xyxy``, float32 N×4), scores (N), class ids (int64 N)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: tuple[str, ...] = COCO_CLASSES

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        if not (len(self.boxes) == len(self.scores) == len(self.class_ids)):
            raise ValueError("boxes, scores and class_ids must have the same length")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def labels(self) -> list[str]:
        return [self.class_names[int(c)] for c in self.class_ids]

    def filter(self, min_score: float = 0.0, class_name: str | None = None) -> Detections:
        keep = self.scores >= min_score
        if class_name is not None:
            keep &= self.class_ids == self.class_names.index(class_name)
        return Detections(self.boxes[keep], self.scores[keep], self.class_ids[keep], self.class_names)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "class_id": int(c),
             "class": self.class_names[int(c)]}
            for b, s, c in zip(self.boxes, self.scores, self.class_ids, strict=True)
        ]


@dataclass
class Segmentations(Detections):
    """Detections plus one boolean full-frame mask per instance (``masks`` N×H×W, original-frame pixels)."""

    masks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=bool))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 3 or len(self.masks) != len(self.scores):
            raise ValueError(f"masks must be N×H×W with N={len(self.scores)}, got {self.masks.shape}")

    def filter(self, min_score: float = 0.0, class_name: str | None = None) -> Segmentations:
        keep = self.scores >= min_score
        if class_name is not None:
            keep &= self.class_ids == self.class_names.index(class_name)
        return Segmentations(self.boxes[keep], self.scores[keep], self.class_ids[keep], self.class_names,
                             self.masks[keep])

    def to_json(self) -> list[dict[str, Any]]:
        """Masks as COCO RLE (``size`` [h, w], ``counts`` string), the compact form every COCO tool reads."""
        from pycocotools import mask as mask_utils

        out = super().to_json()
        for d, m in zip(out, self.masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            d["mask"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        return out


@dataclass
class Keypoints:
    """Pose instances: ``keypoints`` N×K×3 (x, y, score) in original-frame pixels, instance ``scores`` (N),
    and ``boxes`` N×4 xyxy enclosing the keypoints whose score ≥ ``box_min_score``."""

    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    names: tuple[str, ...] = COCO_KEYPOINTS
    skeleton: tuple[tuple[int, int], ...] = field(default=COCO_SKELETON)

    def __post_init__(self) -> None:
        self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, len(self.names), 3)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.keypoints)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"keypoints": [[round(float(v), 2) for v in kp] for kp in inst], "score": round(float(s), 4),
             "box": [round(float(v), 2) for v in b]}
            for inst, s, b in zip(self.keypoints, self.scores, self.boxes, strict=True)
        ]


Results = Detections | Segmentations | Keypoints


class ModelAdapter(ABC):
    """A model split into ``preprocess`` -> ``body`` (incrementally runnable) -> ``postprocess``."""

    name: str
    task: str  # "detect" | "segment" | "pose"
    input_size: tuple[int, int]  # (height, width) of the body input
    body: nn.Module

    @abstractmethod
    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        """``rgb``: uint8 H×W×3 frame. Returns the body input (1×3×h×w float32) and a meta dict that
        :meth:`postprocess` needs to map outputs back to frame pixels."""

    @abstractmethod
    def postprocess(self, outputs: Sequence[torch.Tensor], meta: dict[str, Any]) -> Results:
        """Raw body outputs -> typed results in original-frame pixels."""

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray) -> Results:
        x, meta = self.preprocess(rgb)
        return self.postprocess(self.body(x), meta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, input_size={self.input_size})"


def check_frame(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 H×W×3 frame, got {rgb.dtype} {tuple(rgb.shape)}")
    return rgb


def resize_bilinear(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 H×W×3 -> float32 1×3×h×w (values 0..255), bilinear with half-pixel centres, no antialias
    (same sampling as OpenCV's ``INTER_LINEAR`` that NanoDet/MoveNet were trained with)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix between xyxy boxes a (N×4) and b (M×4)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; returns kept indices sorted by decreasing score (ties: lower index first)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order]).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS: boxes of different classes never suppress each other (coordinate-offset trick)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    offset = class_ids.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


WEIGHTS_DIR = __import__("pathlib").Path(__file__).with_name("weights")


def load_npz_weights(module: nn.Module, path, arch: str) -> dict[str, np.ndarray]:
    """Load an fp16/fp32 ``.npz`` (keys = ``module.state_dict()`` names) into ``module`` as float32.

    Returns the extra (non-parameter) arrays, e.g. decoding constants. Raises ``ValueError`` on mismatch.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    found = str(arrays.pop("__model__", arch))
    if found != arch:
        raise ValueError(f"weights are for {found!r}, not {arch!r}")
    state = module.state_dict()
    missing = sorted(set(state) - set(arrays))
    if missing:
        raise ValueError(f"missing {len(missing)} tensors (first: {missing[0]})")
    new = {}
    for k, v in state.items():
        a = arrays.pop(k)
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"{k}: shape {tuple(a.shape)} != expected {tuple(v.shape)}")
        new[k] = torch.from_numpy(a.astype(np.float32))
    module.load_state_dict(new)
    return arrays
