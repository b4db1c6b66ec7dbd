"""From decoded frames and their motion fields to the body's input, without resampling artefacts.

Why not the adapter's own resize: a motion-shifted cache is only meaningful if shifting the frame shifts the
network input by a whole number of pixels. An arbitrary resize (e.g. 768×576 → 416×416) breaks that, so the
engine feeds the body the frame itself, optionally reduced by an integer factor ``f`` (f×f box average, so a
shift by a multiple of ``f`` pixels stays an exact shift), zero-padded at the right/bottom to a multiple of
the network's largest stride. Fully convolutional bodies (NanoDet, YOLO) accept any such size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fluxshard.motion.field import MotionField, grid_shape


def choose_factor(frame_hw: tuple[int, int], max_side: int = 640) -> int:
    """Smallest integer reduction that brings the longer side to at most ``max_side``."""
    return max(1, -(-max(frame_hw) // max_side))


@dataclass(frozen=True)
class InputMapper:
    frame_hw: tuple[int, int]
    factor: int = 1
    multiple: int = 32
    block: int = 16  # block size of the frame-level motion field

    def __post_init__(self) -> None:
        if self.block % self.factor:
            raise ValueError(f"reduction factor {self.factor} must divide the motion block size {self.block}")

    @property
    def scaled_hw(self) -> tuple[int, int]:
        return self.frame_hw[0] // self.factor, self.frame_hw[1] // self.factor

    @property
    def input_hw(self) -> tuple[int, int]:
        h, w = self.scaled_hw
        m = self.multiple
        return -(-h // m) * m, -(-w // m) * m

    def tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 H×W×3 frame → float32 1×3×h×w in [0, 1], reduced by ``factor`` and zero-padded; channels-last
        (the layout the engine and the dense body run fastest in here: no per-frame re-layout on either side)."""
        f = self.factor
        h, w = self.scaled_hw
        hp, wp = self.input_hw
        out = torch.zeros((1, hp, wp, 3), dtype=torch.float32)  # allocated N×H×W×C: strides torch reads as NHWC
        dst = out.numpy()[0, :h, :w]
        src = rgb[: h * f, : w * f]
        if f == 1:
            np.multiply(src, np.float32(1 / 255), out=dst)
        else:
            # f×f box sum as f² strided adds (exact: integers below 2^24), then one scale: ~10× faster than
            # ``reshape(h, f, w, f, 3).mean(axis=(1, 3))`` (~25 ms for a 768×576 frame on this CPU)
            np.copyto(dst, src[0::f, 0::f])
            for i in range(f):
                for j in range(f):
                    if i or j:
                        np.add(dst, src[i::f, j::f], out=dst)
            dst *= np.float32(1 / (255 * f * f))
        return out.permute(0, 3, 1, 2)

    def field(self, fld: MotionField) -> MotionField:
        """The frame field at input resolution: blocks of ``block / factor`` pixels, vectors divided by the
        factor (blocks whose vector is not a multiple of it become invalid: they would not be whole-pixel
        shifts), extended over the padding with valid zero vectors."""
        f = self.factor
        b = self.block // f
        hp, wp = self.input_hw
        out = MotionField.zero(hp, wp, b, frame_type=fld.frame_type, source=fld.source, scene_cut=fld.scene_cut)
        hb, wb = grid_shape(*self.scaled_hw, b)
        hb, wb = min(hb, fld.shape[0]), min(wb, fld.shape[1])
        dy, dx = fld.dy[:hb, :wb], fld.dx[:hb, :wb]
        ok = fld.valid[:hb, :wb] & (dy % f == 0) & (dx % f == 0)
        out.dy[:hb, :wb] = np.where(ok, dy // f, 0)
        out.dx[:hb, :wb] = np.where(ok, dx // f, 0)
        out.valid[:hb, :wb] = ok
        if fld.scene_cut:
            out.valid[:] = False
        return out

    def boxes_to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in input pixels → frame pixels (clipped to the frame)."""
        b = np.asarray(boxes, np.float32) * self.factor
        h, w = self.frame_hw
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        return b
