"""Per-endpoint dispatch layers (seed 000 §III-B): an input cache and the motion field that aligns it with now.

Each endpoint (edge, cloud) keeps the input of its last inference and an accumulated motion field from that
input to the present frame. Every frame's field is folded into both layers; the endpoint chosen for a frame
replaces its cache and resets its field, the other keeps accumulating. The edge holds both layers: its own and
an exact mirror of the cloud's, so it knows, without asking, what the server's receive layer will rebuild.

**Cache form.** The cache is the engine input in a lossless *integer* form from which the engine's float input
is a deterministic function, computed identically on both sides (:func:`input_tensor`): for a reduction factor
``f`` of 1, or a mapper that floors the f×f mean (``integer``), the uint8 pixel values; otherwise the uint16
f×f box sums (≤ 255·f², so f ≤ 16). ``input_tensor(mapper, integer_input(mapper, rgb))`` equals
``mapper.tensor(rgb)`` bit for bit (the mapper sums in float32, exact below 2^24, then applies one scale).

**Residual test.** A block is residual when, against the cache shifted by the block's accumulated vector, the
mean over the block of the max-over-channels absolute difference, in engine input units (integer difference ×
``unit``), exceeds ``tau_in`` — the engine's fast-mode test (``EngineConfig.tau_in``) up to float rounding;
``tau_in = 0`` (exact) = any difference at all. Blocks whose source leaves the frame are residual. Blocks without
a valid vector are tried at zero motion, as the engine does (static background the codec intra-coded): where the
unshifted cache passes the same test they become valid zero-motion blocks of the *effective* field, the field
that is sent and that the receive layer applies. The engine's zero-shift rescue of valid moved blocks is not
mirrored (it changes which vector the engine uses, not which pixels are sent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fluxshard.engine.inputs import InputMapper
from fluxshard.motion.accumulate import AccumulatedField
from fluxshard.motion.field import MotionField, grid_shape
from fluxshard.motion.residual import warp_blocks


def input_dtype(mapper: InputMapper) -> np.dtype:
    """uint8 when the engine input is a whole grey level per pixel, uint16 box sums otherwise."""
    if mapper.factor == 1 or mapper.integer:
        return np.dtype(np.uint8)
    if 255 * mapper.factor ** 2 > np.iinfo(np.uint16).max:
        raise ValueError(f"reduction factor {mapper.factor} too large for uint16 box sums (at most 16)")
    return np.dtype(np.uint16)


def input_unit(mapper: InputMapper) -> float:
    """Engine input units per integer level of the cache (what one step of the integer form is worth)."""
    if mapper.factor == 1 or mapper.integer:
        return float(mapper.scale)
    return float(mapper.scale) / mapper.factor ** 2


def integer_input(mapper: InputMapper, rgb: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 decoded frame → the engine input in integer form, (h_in, w_in, 3), C-contiguous."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or tuple(rgb.shape[:2]) != tuple(mapper.frame_hw) or rgb.shape[2] != 3:
        raise ValueError(f"frame must be uint8 {mapper.frame_hw[0]}x{mapper.frame_hw[1]}x3, "
                         f"got {rgb.dtype} {'x'.join(map(str, rgb.shape))}")
    dtype = input_dtype(mapper)
    f = mapper.factor
    h, w = mapper.scaled_hw
    hp, wp = mapper.input_hw
    top, left = mapper.offset
    out = np.zeros((hp, wp, 3), dtype)
    src = rgb[: h * f, : w * f]
    if f == 1:
        out[top:top + h, left:left + w] = src
    else:
        s = src.reshape(h, f, w, f, 3).sum(axis=(1, 3), dtype=np.uint32)
        if mapper.integer:
            s //= f * f
        out[top:top + h, left:left + w] = s
    return out


def input_tensor(mapper: InputMapper, arr: np.ndarray) -> torch.Tensor:
    """Integer-form input → the engine's float32 1×3×h×w channels-last tensor, equal to ``mapper.tensor``."""
    hp, wp = mapper.input_hw
    if arr.shape != (hp, wp, 3) or arr.dtype != input_dtype(mapper):
        raise ValueError(f"integer input must be {input_dtype(mapper)} {hp}x{wp}x3, "
                         f"got {arr.dtype} {'x'.join(map(str, arr.shape))}")
    out = torch.empty((1, hp, wp, 3), dtype=torch.float32)
    dst = out.numpy()[0]
    f = mapper.factor
    if f == 1 or mapper.integer:
        np.multiply(arr, np.float32(mapper.scale), out=dst)
    else:  # the mapper's float32 box sum is exact, so the same sum times the same constant gives the same float
        np.multiply(arr, np.float32(mapper.scale / (f * f)), out=dst)
    if mapper.shift:
        dst += np.float32(mapper.shift)
    return out.permute(0, 3, 1, 2)


def to_blocks(arr: np.ndarray, block: int) -> np.ndarray:
    """H×W×C → (Hb·Wb, B, B, C) blocks in row-major grid order (a copy; partial edge blocks zero-padded)."""
    h, w, c = arr.shape
    hb, wb = grid_shape(h, w, block)
    pad = np.zeros((hb * block, wb * block, c), arr.dtype)
    pad[:h, :w] = arr
    return pad.reshape(hb, block, wb, block, c).transpose(0, 2, 1, 3, 4).reshape(hb * wb, block, block, c)


def from_blocks(blocks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`to_blocks`: (Hb·Wb, B, B, C) → H×W×C (C-contiguous)."""
    n, b, _, c = blocks.shape
    hb, wb = grid_shape(height, width, b)
    if n != hb * wb:
        raise ValueError(f"{n} blocks do not tile {width}x{height} in blocks of {b}")
    full = blocks.reshape(hb, wb, b, b, c).transpose(0, 2, 1, 3, 4).reshape(hb * b, wb * b, c)
    return np.ascontiguousarray(full[:height, :width])


def block_difference(cur: np.ndarray, ref: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: the sum over its pixels of the max-over-channels |cur − ref| (integer levels, int64) and its
    pixel count (partial edge blocks count only their pixels)."""
    d = np.abs(cur.astype(np.int32) - ref.astype(np.int32)).max(axis=2)
    h, w = d.shape
    hb, wb = grid_shape(h, w, block)
    pad = np.zeros((hb * block, wb * block), np.int64)
    pad[:h, :w] = d
    sums = pad.reshape(hb, block, wb, block).sum(axis=(1, 3))
    rows = np.minimum(np.arange(1, hb + 1) * block, h) - np.arange(hb) * block
    cols = np.minimum(np.arange(1, wb + 1) * block, w) - np.arange(wb) * block
    return sums, rows[:, None] * cols[None, :]


@dataclass
class Alignment:
    """One endpoint's view of the current frame: the effective field (invalid blocks that match unshifted
    become valid zero-motion blocks) and the residual block mask against the shifted cache."""

    field: MotionField
    residual: np.ndarray  # bool (Hb, Wb)

    @property
    def active_fraction(self) -> float:
        return float(self.residual.mean()) if self.residual.size else 0.0


class DispatchLayer:
    """Input cache + accumulated field of one endpoint. ``tau_in`` in engine input units (0 = exact);
    ``unit`` = engine input units per integer level (see :func:`input_unit`)."""

    def __init__(self, input_hw: tuple[int, int], block: int, dtype: np.dtype | type = np.uint8, *,
                 tau_in: float = 0.0, unit: float = 1 / 255) -> None:
        if block < 1:
            raise ValueError(f"block size must be a positive integer, got {block}")
        if not tau_in >= 0.0:  # also NaN
            raise ValueError(f"tau_in must be ≥ 0, got {tau_in}")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.block = int(block)
        self.dtype = np.dtype(dtype)
        self.tau_in = float(tau_in)
        self.unit = float(unit)
        self.cache: np.ndarray | None = None
        self.seq: int | None = None  # frame number of the cached input, when the caller numbers frames
        self._acc = AccumulatedField(self.input_hw[0], self.input_hw[1], self.block, strict=True)

    @classmethod
    def for_mapper(cls, mapper: InputMapper, tau_in: float = 0.0) -> DispatchLayer:
        """A layer for the engine input this mapper produces (its block, size, integer form and unit)."""
        return cls(mapper.input_hw, mapper.input_block, input_dtype(mapper), tau_in=tau_in, unit=input_unit(mapper))

    @property
    def field(self) -> MotionField:
        """Accumulated field from the present frame to the cached input (current → cache convention)."""
        return self._acc.field

    @property
    def age(self) -> int:
        """Frames folded in since the cache was last replaced."""
        return self._acc.age

    def fold(self, step: MotionField) -> MotionField:
        """Fold in one frame's field (current → previous frame, at engine input resolution)."""
        return self._acc.update(step)

    def update(self, new_input: np.ndarray, seq: int | None = None) -> None:
        """This endpoint ran on ``new_input`` (frame ``seq``): it becomes the cache (a private copy), the field
        resets."""
        self._check(new_input)
        self.cache = np.array(new_input, copy=True, order="C")
        self.seq = seq
        self._acc.reset()

    def align(self, current: np.ndarray) -> Alignment:
        """Effective field and residual block mask of ``current`` against the shifted cache (no cache: all
        blocks residual, zero field)."""
        self._check(current)
        h, w = self.input_hw
        if self.cache is None:
            fld = MotionField.invalid(h, w, self.block, source="accumulated")
            return Alignment(fld, np.ones(fld.shape, bool))
        fld = self.field.copy()
        limit = self.tau_in / self.unit  # per-pixel mean threshold in integer levels
        sums, counts = block_difference(current, warp_blocks(self.cache, fld), self.block)
        residual = ~fld.valid | ~fld.source_inside() | (sums > limit * counts)
        invalid = ~fld.valid
        if invalid.any():  # invalid blocks: try them at zero motion, as the engine does
            zs, _ = block_difference(current, self.cache, self.block)
            rescued = invalid & ~(zs > limit * counts)
            fld.valid[rescued] = True
            fld.dy[rescued] = 0
            fld.dx[rescued] = 0
            residual &= ~rescued
        return Alignment(fld, residual)

    def residual(self, current: np.ndarray) -> np.ndarray:
        """Residual block mask (Hb, Wb) of ``current`` against this endpoint's aligned cache."""
        return self.align(current).residual

    def _check(self, arr: np.ndarray) -> None:
        h, w = self.input_hw
        if arr.ndim != 3 or arr.shape[:2] != (h, w) or arr.dtype != self.dtype:
            raise ValueError(f"input must be {self.dtype} {h}x{w}xC, got {arr.dtype} {'x'.join(map(str, arr.shape))}")
