"""Frame inference (§3.2.3): slice the frame into the plan's tiles, letterbox each into its model's square
input, run, map boxes back to frame pixels and merge all tiles' boxes with NMS.

The model family is one fully convolutional detector (NanoDet) run at several square input sizes: one body,
shared weights, ``nanodet320`` ... ``nanodet640``. Each family member is "crop + letterbox + body + decode +
per-tile NMS" and that whole call is what the profile's latencies measure, so the planner's
``sum of tile latencies`` is the real cost of a plan (plus the final merge, paid inside the plan runtime).

Decisions where the paper is vague:

* **Uniform padding.** Every tile is grown by ``pad = max(8, 5 % of its longer side)`` px on all four sides
  (clipped at the frame border) before cropping, so an object cut by a tile edge is still seen whole by at
  least one tile when it is smaller than the padding band; the padded crop is what is letterboxed.
* **Letterbox, not stretch.** The crop is resized (aspect kept) so its longer side equals the model input,
  placed top-left on a mid-grey ``s x s`` canvas. Square inputs give each model one latency whatever the
  tile's aspect, and the object's share of the input side is ``sqrt(w h) / longer side`` - exactly the
  relative size the 22 bins use (:mod:`fluxshard.tiling.bins`).
* **Resampling.** Bilinear with half-pixel centres (the adapter's own resize) when up-sampling; bilinear with
  antialiasing when down-sampling (a 1280-px frame into a 320 input otherwise aliases small objects away).
* **Back-mapping.** Input px -> frame px by ``/ scale + crop origin``, clipped to the crop. Boxes found in the
  padding band are kept: the merge removes duplicates, and the band can hold objects no tile covers.
* **Merge.** Class-aware greedy NMS at the detector's own IoU threshold (0.6), using the package's
  :func:`fluxshard.models.batched_nms` (pure torch; the base install has no torchvision and no
  ``supervision``). It is the same routine every NanoDet frame already goes through and is tested against
  a brute-force reference in ``tests/test_tiling_infer.py``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluxshard.models.base import Detections, batched_nms

DEFAULT_SIZES = (320, 416, 512, 640)
PAD_FRACTION = 0.05
MIN_PAD_PX = 8
CANVAS_VALUE = 0.5  # mid-grey letterbox fill (inputs are RGB / 255)
MERGE_IOU = 0.6


def padded_crop(rect: Sequence[float], width: int, height: int, pad_fraction: float = PAD_FRACTION,
                min_pad: int = MIN_PAD_PX) -> tuple[int, int, int, int]:
    """Integer crop ``(x0, y0, x1, y1)`` of a float tile rect grown by the uniform padding, inside the frame."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"empty tile {rect}")
    pad = max(float(min_pad), pad_fraction * max(x1 - x0, y1 - y0)) if pad_fraction > 0 or min_pad > 0 else 0.0
    cx0 = max(0, math.floor(x0 - pad))
    cy0 = max(0, math.floor(y0 - pad))
    cx1 = min(int(width), math.ceil(x1 + pad))
    cy1 = min(int(height), math.ceil(y1 + pad))
    return cx0, cy0, cx1, cy1


def letterbox(crop: np.ndarray, size: int) -> tuple[torch.Tensor, float]:
    """uint8 h x w x 3 -> (1 x 3 x size x size float in [0, 1], scale); the crop sits top-left."""
    h, w = crop.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    canvas = torch.full((1, 3, size, size), CANVAS_VALUE)
    canvas[:, :, :nh, :nw] = x / 255.0
    return canvas, scale


def map_back(boxes: np.ndarray, scale: float, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Boxes in letterboxed-input px -> frame px, clipped to the crop."""
    x0, y0, x1, y1 = crop
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale
    b[:, [0, 2]] = np.clip(b[:, [0, 2]] + x0, x0, x1)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]] + y0, y0, y1)
    return b


def merge(parts: Sequence[Detections], iou_threshold: float = MERGE_IOU) -> Detections:
    """All tiles' detections (frame px) -> one set, duplicates removed by class-aware NMS."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    boxes = np.concatenate([p.boxes for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    cids = np.concatenate([p.class_ids for p in parts])
    if len(parts) == 1:
        return Detections(boxes, scores, cids, parts[0].class_names)
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cids),
                       iou_threshold).numpy()
    return Detections(boxes[keep], scores[keep], cids[keep], parts[0].class_names)


@dataclass(frozen=True)
class TileRun:
    rect: tuple[float, float, float, float]
    model: int
    detections: Detections
    ms: float


class DetectorFamily:
    """The bundled detector at several square input sizes, each a family member named ``<model><size>``."""

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, model: str = "nanodet", channels_last: bool = True):
        from fluxshard.models import load_model

        sizes = tuple(int(s) for s in sizes)
        if not sizes or any(s <= 0 or s % 32 for s in sizes):
            raise ValueError(f"input sizes must be positive multiples of 32, got {sizes}")
        self.adapter = load_model(model)
        if not hasattr(self.adapter, "postprocess_input"):
            raise ValueError(f"model {model!r} cannot run at arbitrary input sizes")
        self.sizes = sizes
        self.model = model
        self.names = [f"{self.adapter.name}{s}" for s in sizes]
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.adapter.body.to(memory_format=self.fmt)

    @property
    def reference_model(self) -> int:
        """The "most accurate model" of §3.1.2 for this one-network family: the member at the network's own
        (trained) input size when the family has it, else the largest input. Uniform tiling with it sees every
        object at native pixel size, at the scale the weights were trained for. (Measured on vtest_ptz: NanoDet
        at 640 gives fewer confident boxes than at 416 on the same frames, 2.1 vs 3.75 per frame >= 0.5.)"""
        native = getattr(self.adapter, "input_size", None)
        if native is not None and native[0] == native[1] and int(native[0]) in self.sizes:
            return self.sizes.index(int(native[0]))
        return int(np.argmax(self.sizes))

    def weights_hash(self) -> str:
        """sha256 (first 16 hex) of the weights file plus the sizes: the profile cache key's model part."""
        h = hashlib.sha256()
        w = getattr(self.adapter, "weights", None)
        if w is not None and Path(w).is_file():
            h.update(Path(w).read_bytes())
        h.update(f"{self.adapter.name}:{self.sizes}".encode())
        return h.hexdigest()[:16]

    def warmup(self, repeats: int = 2) -> None:
        with torch.inference_mode():
            for s in self.sizes:
                x = torch.zeros(1, 3, s, s).contiguous(memory_format=self.fmt)
                for _ in range(repeats):
                    self.adapter.body(x)

    def run_crop(self, crop: np.ndarray, model: int) -> tuple[Detections, float]:
        """Detections in crop px of one crop run with family member ``model`` (letterbox, body, decode)."""
        s = self.sizes[model]
        x, scale = letterbox(crop, s)
        with torch.inference_mode():
            out = self.adapter.body(x.contiguous(memory_format=self.fmt))
        det = self.adapter.postprocess_input(out, (s, s))
        boxes = map_back(det.boxes, scale, (0, 0, crop.shape[1], crop.shape[0]))
        return Detections(boxes, det.scores, det.class_ids, det.class_names), scale

    def run_tile(self, rgb: np.ndarray, rect: Sequence[float], model: int, pad: bool = True) -> TileRun:
        """One tile, timed end to end (crop, letterbox, body, decode, per-tile NMS, back-mapping)."""
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        crop = padded_crop(rect, w, h) if pad else padded_crop(rect, w, h, 0.0, 0)
        x0, y0, x1, y1 = crop
        det, _ = self.run_crop(rgb[y0:y1, x0:x1], model)
        det.boxes[:, [0, 2]] += x0
        det.boxes[:, [1, 3]] += y0
        ms = 1e3 * (time.perf_counter() - t0)
        return TileRun(tuple(float(v) for v in rect), int(model), det, ms)

    def run_plan(self, rgb: np.ndarray, tiles: Sequence[tuple[Sequence[float], int]],
                 ) -> tuple[Detections, list[TileRun], float]:
        """Every (rect, model) of a plan, then the merge; returns (merged, per-tile runs, merge ms)."""
        runs = [self.run_tile(rgb, rect, m) for rect, m in tiles]
        t0 = time.perf_counter()
        merged = merge([r.detections for r in runs])
        return merged, runs, 1e3 * (time.perf_counter() - t0)


def uniform_grid(width: int, height: int, input_size: float) -> list[tuple[float, float, float, float]]:
    """The ``ceil(W/s) x ceil(H/s)`` grid of a uniform plan for input size ``s`` (row-major rects)."""
    nx, ny = math.ceil(width / input_size), math.ceil(height / input_size)
    tw, th = width / nx, height / ny
    return [(c * tw, r * th, (c + 1) * tw, (r + 1) * th) for r in range(ny) for c in range(nx)]


def reference_grid(width: int, height: int, input_size: float, overlap: bool = True,
                   ) -> list[tuple[float, float, float, float]]:
    """The evaluation / profiling reference's tiles: the uniform grid of :func:`uniform_grid`, plus (``overlap``)
    the same cells shifted by half a cell on every interior grid line, so every object cut by a grid line is
    seen whole by some tile. No plan can contain the shifted cells, so no method reproduces the reference
    by construction (with the plain grid, uniform tiling with the reference member *is* the reference)."""
    rects = uniform_grid(width, height, input_size)
    if not overlap:
        return rects
    nx, ny = math.ceil(width / input_size), math.ceil(height / input_size)
    if nx == 1 and ny == 1:
        return rects
    tw, th = width / nx, height / ny
    xs = [(c + 0.5) * tw for c in range(nx - 1)] if nx > 1 else [0.0]
    ys = [(r + 0.5) * th for r in range(ny - 1)] if ny > 1 else [0.0]
    return rects + [(x, y, x + tw, y + th) for y in ys for x in xs]
