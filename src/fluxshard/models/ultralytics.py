"""Adapter for ultralytics YOLO detect / segment / pose models (optional extra ``fluxshard[yolo]``).

The user's ``yolo11n.pt`` (or a YAML such as ``yolo11n-seg.yaml``: random weights, for tests) is loaded
with ultralytics, Conv+BN are fused, and the network is split the way the engine needs it:

* :meth:`UltralyticsAdapter.preprocess` — ultralytics' predictor preprocessing: ``LetterBox`` (``auto``
  minimal-rectangle padding to a stride multiple, as ``model.predict`` uses for PyTorch models), pad 114,
  ``cv2.resize`` bilinear, /255. Frames are RGB here, so no channel flip is needed (the predictor flips BGR).
* :class:`UltralyticsBody` — the layers up to and including the head's convolutions; returns raw per-level
  maps (box distribution, class logits, mask coefficients or keypoints, mask prototypes). No anchors, no
  shape-dependent Python, so it can be traced with ``torch.fx`` and run incrementally.
* :meth:`UltralyticsAdapter.postprocess` — the head's decoding (DFL, anchors, sigmoid, keypoint decoding)
  and the predictor's postprocessing (NMS, ``scale_boxes``, ``process_mask``, ``scale_coords``),
  re-implemented here on the raw maps; ``tests/test_models_ultralytics.py`` checks it against
  ``model.predict``.

Importing this module does not import ultralytics (the default install has neither it nor torchvision).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.base import (
    COCO_KEYPOINTS,
    COCO_SKELETON,
    Detections,
    Keypoints,
    ModelAdapter,
    Results,
    Segmentations,
    batched_nms,
    check_frame,
)
from fluxshard.models.registry import ModelError, _available_line, register_suffix

MAX_WH = 7680  # ultralytics' class offset for class-aware NMS
MAX_NMS = 30000  # boxes kept (by score) before NMS, as in ultralytics


def _import_ultralytics() -> Any:
    # Never let ultralytics reach the network: no connectivity probe, no asset downloads at predict time.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import ultralytics
    except ImportError:
        raise ModelError("ultralytics models need the optional extra: pip install 'fluxshard[yolo]' "
                         f"(ultralytics, torchvision); {_available_line()}") from None
    return ultralytics


class UltralyticsBody(nn.Module):
    """Input 1×3×h×w (RGB in [0, 1], letterboxed) -> raw head maps, per level ``i``:
    ``box_i`` (4·reg_max ch), ``cls_i`` (nc logits), then ``coef_i`` (segment: mask coefficients) or
    ``kpt_i`` (pose: raw keypoints); a segment model appends the mask prototypes (stride 4) last."""

    def __init__(self, det_model: nn.Module) -> None:
        super().__init__()
        layers = list(det_model.model)
        head = layers[-1]
        self.layers = nn.ModuleList(layers[:-1])
        self.froms: list[int | list[int]] = [m.f for m in layers[:-1]]
        self.save = sorted(int(i) for i in det_model.save)
        self.head_from: list[int] = list(head.f)
        self.box = head.cv2
        self.cls = head.cv3
        self.extra = getattr(head, "cv4", None)
        self.proto = getattr(head, "proto", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y: list[Any] = []
        for i, (m, f) in enumerate(zip(self.layers, self.froms, strict=True)):
            if f != -1:
                x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
            x = m(x)
            y.append(x if i in self.save else None)
        feats = [x if j == -1 else y[j] for j in self.head_from]
        outs: list[torch.Tensor] = []
        for i, feat in enumerate(feats):
            outs += [self.box[i](feat), self.cls[i](feat)]
            if self.extra is not None:
                outs.append(self.extra[i](feat))
        if self.proto is not None:
            outs.append(self.proto(feats[0]))
        return tuple(outs)


def letterbox_params(frame_hw: tuple[int, int], imgsz: tuple[int, int], stride: int, auto: bool
                     ) -> dict[str, Any]:
    """ultralytics ``LetterBox.get_params`` (scaleup, centred): resized size, padding, input shape."""
    h, w = frame_hw
    r = min(imgsz[0] / h, imgsz[1] / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = imgsz[1] - new_w, imgsz[0] - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return {"frame_hw": (h, w), "resized_hw": (new_h, new_w), "top": top, "left": left,
            "input_hw": (new_h + top + bottom, new_w + left + right)}


def letterbox(rgb: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    new_h, new_w = params["resized_hw"]
    img = rgb
    if rgb.shape[:2] != (new_h, new_w):
        try:
            import cv2  # what ultralytics uses: bit-exact preprocessing
            img = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        except ImportError:  # same sampling, float rounding may differ by one grey level
            t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
            img = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    ih, iw = params["input_hw"]
    out = np.full((ih, iw, 3), 114, dtype=np.uint8)
    top, left = params["top"], params["left"]
    out[top:top + new_h, left:left + new_w] = img
    return out


def make_anchors(shapes: Sequence[tuple[int, int]], strides: Sequence[float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (N×2, grid units, row-major per level) and their strides (N×1)."""
    points, stride_t = [], []
    for (h, w), s in zip(shapes, strides, strict=True):
        sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                                torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s)))
    return torch.cat(points), torch.cat(stride_t)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, cls: torch.Tensor, iou: float) -> torch.Tensor:
    try:  # torchvision comes with ultralytics; base.batched_nms is the same greedy rule in O(N²) memory
        import torchvision

        return torchvision.ops.nms(boxes + cls[:, None] * MAX_WH, scores, iou)
    except ImportError:
        return batched_nms(boxes, scores, cls.long(), iou)


def process_mask(protos: torch.Tensor, coefs: torch.Tensor, boxes: torch.Tensor, shape: tuple[int, int]
                 ) -> torch.Tensor:
    """ultralytics ``process_mask(upsample=True)``: coefficients @ prototypes, bilinear to the input size,
    binarise at logit 0, zero outside each (input-pixel) box. Returns N×h×w uint8."""
    c, mh, mw = protos.shape
    masks = (coefs @ protos.float().view(c, -1)).view(-1, mh, mw)
    masks = F.interpolate(masks[None], shape, mode="bilinear")[0]
    masks = masks.gt_(0.0).byte()
    h, w = shape
    x1, y1, x2, y2 = torch.chunk(boxes[:, :, None], 4, 1)
    r = torch.arange(w, dtype=x1.dtype)[None, None, :]
    cidx = torch.arange(h, dtype=x1.dtype)[None, :, None]
    masks *= (r >= x1) * (r < x2)
    masks *= (cidx >= y1) * (cidx < y2)
    return masks


def masks_to_frame(masks: torch.Tensor, meta: dict[str, Any], chunk: int = 32) -> np.ndarray:
    """ultralytics ``scale_masks``: crop the letterbox padding, bilinear to the frame size, threshold 0.5."""
    fh, fw = meta["frame_hw"]
    top, left = meta["top"], meta["left"]
    nh, nw = meta["resized_hw"]
    out = np.zeros((len(masks), fh, fw), dtype=bool)
    for i in range(0, len(masks), chunk):  # bounded memory: N×H×W float32 can be hundreds of MB
        m = masks[i:i + chunk, top:top + nh, left:left + nw].float()[None]
        out[i:i + chunk] = (F.interpolate(m, (fh, fw), mode="bilinear")[0] > 0.5).numpy()
    return out


def scale_xy(xy: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Input-pixel x, y (last dim pairs) -> frame pixels, clipped (``scale_boxes`` / ``scale_coords``)."""
    fh, fw = meta["frame_hw"]
    nh, nw = meta["resized_hw"]
    xy = xy.clone()
    xy[..., 0::2] = ((xy[..., 0::2] - meta["left"]) / (nw / fw)).clamp(0, fw)
    xy[..., 1::2] = ((xy[..., 1::2] - meta["top"]) / (nh / fh)).clamp(0, fh)
    return xy


class UltralyticsAdapter(ModelAdapter):
    """A YOLO detect / segment / pose model as preprocess -> :class:`UltralyticsBody` -> postprocess.

    ``input_size`` is the nominal (square) ``imgsz``; with ``auto`` letterboxing the body input is the
    smallest stride multiple that holds the frame (e.g. 480×640 for a 4:3 frame), see :meth:`input_shape`.
    """

    def __init__(self, det_model: nn.Module, name: str, imgsz: int = 640, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300, auto: bool = True) -> None:
        head = list(det_model.model)[-1]
        kind = type(head).__name__
        if kind not in ("Detect", "Segment", "Pose") or getattr(head, "one2one_cv2", None) is not None:
            raise ModelError(f"{name}: head {kind} is not supported (detect, segment and pose heads with NMS are)")
        self.name = name
        self.task = {"Detect": "detect", "Segment": "segment", "Pose": "pose"}[kind]
        self.stride = int(max(int(det_model.stride.max()), 32))
        imgsz = int(np.ceil(imgsz / self.stride) * self.stride)
        self.input_size = (imgsz, imgsz)
        self.auto = auto
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.nc = int(head.nc)
        self.reg_max = int(head.reg_max)
        self.strides = [float(s) for s in head.stride]
        self.nm = int(getattr(head, "nm", 0))
        self.kpt_shape = tuple(int(v) for v in getattr(head, "kpt_shape", (0, 0)))
        names = getattr(det_model, "names", None) or {i: str(i) for i in range(self.nc)}
        self.class_names = tuple(str(names[i]) for i in range(self.nc))
        self.body = UltralyticsBody(det_model).eval()
        for p in self.body.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_yolo(cls, yolo: Any, name: str | None = None, **kwargs: Any) -> UltralyticsAdapter:
        """From an ``ultralytics.YOLO`` (or its ``nn.Module``): a fused, eval-mode deep copy, so the caller's
        model is left as it was."""
        det_model = getattr(yolo, "model", yolo)
        if not isinstance(det_model, nn.Module):
            raise ModelError(f"{name or yolo!r}: not an ultralytics model")
        det_model = copy.deepcopy(det_model).float().eval()
        if hasattr(det_model, "fuse"):
            det_model = det_model.fuse(verbose=False)
        return cls(det_model, name or str(getattr(yolo, "ckpt_path", None) or "yolo"), **kwargs)

    def input_shape(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """Body input (h, w) for frames of this size."""
        return letterbox_params(frame_hw, self.input_size, self.stride, self.auto)["input_hw"]

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        rgb = check_frame(rgb)
        meta = letterbox_params(rgb.shape[:2], self.input_size, self.stride, self.auto)
        img = letterbox(rgb, meta)
        x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        return x.contiguous(), meta

    def decode(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Head inference: (boxes xywh in input pixels 4×N, class probabilities nc×N, extra E×N or None)."""
        per = 2 + (self.task != "detect")
        nl = len(self.strides)
        levels = [outputs[per * i: per * i + per] for i in range(nl)]
        shapes = [tuple(lv[0].shape[2:]) for lv in levels]
        box = torch.cat([lv[0].float().reshape(4 * self.reg_max, -1) for lv in levels], 1)
        cls = torch.cat([lv[1].float().reshape(self.nc, -1) for lv in levels], 1).sigmoid()
        anchors, strides = make_anchors(shapes, self.strides)
        anchors, strides = anchors.T, strides.T  # 2×N, 1×N
        if self.reg_max > 1:  # DFL: expectation of the softmax over reg_max bins
            proj = torch.arange(self.reg_max, dtype=torch.float32)
            box = (box.view(4, self.reg_max, -1).softmax(1) * proj[None, :, None]).sum(1)
        lt, rb = box[:2], box[2:]
        x1y1, x2y2 = anchors - lt, anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1)) * strides
        extra = None
        if self.task != "detect":
            extra = torch.cat([lv[2].float().reshape(lv[2].shape[1], -1) for lv in levels], 1)
        if self.task == "pose":
            ndim = self.kpt_shape[1]
            extra = extra.clone()
            if ndim == 3:
                extra[2::ndim] = extra[2::ndim].sigmoid()
            extra[0::ndim] = (extra[0::ndim] * 2.0 + (anchors[0] - 0.5)) * strides
            extra[1::ndim] = (extra[1::ndim] * 2.0 + (anchors[1] - 0.5)) * strides
        return xywh, cls, extra

    def postprocess(self, outputs: Sequence[torch.Tensor], meta: dict[str, Any]) -> Results:
        xywh, cls, extra = self.decode(outputs)
        # ultralytics non_max_suppression (best class per box, class-aware, top MAX_NMS, max_det)
        cand = cls.amax(0) > self.conf
        xywh, cls = xywh[:, cand].T, cls[:, cand].T
        extra = extra[:, cand].T if extra is not None else None
        boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        conf, j = cls.max(1)
        keep = conf > self.conf
        boxes, conf, j = boxes[keep], conf[keep], j[keep]
        extra = extra[keep] if extra is not None else None
        if len(conf) > MAX_NMS:
            top = conf.argsort(descending=True)[:MAX_NMS]
            boxes, conf, j = boxes[top], conf[top], j[top]
            extra = extra[top] if extra is not None else None
        i = _nms(boxes, conf, j.float(), self.iou)[: self.max_det] if len(conf) else torch.zeros(0, dtype=torch.long)
        boxes, conf, j = boxes[i], conf[i], j[i]
        extra = extra[i] if extra is not None else None
        if self.task == "segment":
            protos = outputs[-1][0]
            masks = process_mask(protos, extra, boxes, meta["input_hw"]) if len(conf) else \
                torch.zeros((0, *meta["input_hw"]), dtype=torch.uint8)
            nonempty = masks.amax((-2, -1)) > 0
            if not bool(nonempty.all()):
                boxes, conf, j, masks = boxes[nonempty], conf[nonempty], j[nonempty], masks[nonempty]
            return Segmentations(scale_xy(boxes, meta).numpy(), conf.numpy(), j.numpy(), self.class_names,
                                 masks_to_frame(masks, meta))
        if self.task == "pose":
            kpts = extra.reshape(len(conf), *self.kpt_shape)
            xy = scale_xy(kpts[..., :2].reshape(len(conf), -1), meta).reshape(len(conf), -1, 2)
            vis = kpts[..., 2:3] if self.kpt_shape[1] == 3 else torch.ones_like(xy[..., :1])
            names = COCO_KEYPOINTS if self.kpt_shape[0] == 17 else tuple(str(k) for k in range(self.kpt_shape[0]))
            skeleton = COCO_SKELETON if self.kpt_shape[0] == 17 else ()
            return Keypoints(torch.cat((xy, vis), -1).numpy(), conf.numpy(), scale_xy(boxes, meta).numpy(),
                             names, skeleton)
        return Detections(scale_xy(boxes, meta).numpy(), conf.numpy(), j.numpy(), self.class_names)


def load_ultralytics(path: Path, **kwargs: Any) -> UltralyticsAdapter:
    """``.pt`` weights file, or a YAML path / bundled YAML name (``yolo11n-seg.yaml``, random weights)."""
    _import_ultralytics()
    from ultralytics import YOLO

    try:
        yolo = YOLO(str(path))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{path}: unreadable ultralytics model ({type(exc).__name__}: {msg}); "
                         f"{_available_line()}") from None
    imgsz = kwargs.pop("imgsz", None)
    if imgsz is None:
        args = getattr(yolo.model, "args", None) or {}
        imgsz = args.get("imgsz", 640) if isinstance(args, dict) else 640
        imgsz = imgsz if isinstance(imgsz, int) else 640
    return UltralyticsAdapter.from_yolo(yolo, name=Path(path).name, imgsz=imgsz, **kwargs)


for _suffix in (".pt", ".yaml", ".yml"):
    register_suffix(_suffix, load_ultralytics, accepts_names=_suffix != ".pt")
