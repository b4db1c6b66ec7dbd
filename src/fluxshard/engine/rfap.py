"""Receptive-Field Alignment Principle, strict form: which output positions of a layer may be taken from
its motion-shifted cache without changing a single value (seed 000 §IV).

Output position ``o`` of a node with geometry ``g`` (see :mod:`fluxshard.engine.graph`) is reusable iff

1. its receptive field ``[o·S − lo, o·S + hi]`` (per axis, clipped to the image) carries **one**
   displacement ``d`` — every block it touches has the same valid vector;
2. ``d`` is a multiple of the node's equivariance stride ``E`` (so the shifted network computes the same
   function, and ``o + d/S`` is an integer position of the cached map);
3. the window holds **no residual pixel** (pixels where the motion-aligned cached input differs from the
   current input, plus every pixel of an invalid block);
4. padding is touched the same way: per axis, ``d`` is zero there, or the window lies inside the image both at
   ``o`` and at its source ``o + d``.

All four are evaluated for every position of every layer in one pass per distinct geometry (a numba kernel,
``engine._kernels.strict_reuse``): uniformity from integral images of the vectors and their squares on the *block*
grid (the field is constant per block; zero variance ⇔ uniform, exact in integers), residual-freeness from
one integral image of the pixel mask. O(1) per position, whatever the receptive-field size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.engine import _kernels as _ek
from fluxshard.engine.graph import BIG, Geom
from fluxshard.motion.field import MotionField


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.int64)
    out[1:, 1:] = a.astype(np.int64).cumsum(0).cumsum(1)
    return out


@dataclass
class PixelMaps:
    """One frame's field (block grid) and residual mask (pixels), with the integral images RFAP needs."""

    height: int
    width: int
    block: int
    field: MotionField
    residual: np.ndarray  # bool H×W: residual pixels incl. every pixel of an invalid block
    i_res: np.ndarray | None  # (H+1)×(W+1) integral of ``residual`` (None for block-granular maps)
    i_blk: np.ndarray | None  # 5 × (Hb+1) × (Wb+1): integrals of 1, dy, dy², dx, dx² over the block grid
    bad: np.ndarray | None = None  # block-granular maps: residual or invalid blocks (Hb×Wb bool)

    @classmethod
    def build(cls, field: MotionField, residual: np.ndarray) -> PixelMaps:
        h, w = residual.shape
        b = field.block
        inv = ~field.valid
        res = residual
        if inv.any():
            res = residual | np.repeat(np.repeat(inv, b, 0), b, 1)[:h, :w]
        i_res = np.empty((h + 1, w + 1), np.int32)
        _ek.integral_bool(np.ascontiguousarray(res), i_res)
        dy = field.dy.astype(np.int64)
        dx = field.dx.astype(np.int64)
        i_blk = np.stack([_integral(a) for a in (np.ones_like(dy), dy, dy * dy, dx, dx * dx)])
        return cls(h, w, b, field, res, i_res, i_blk)

    @classmethod
    def blocks(cls, field: MotionField, bad: np.ndarray) -> PixelMaps:
        """Maps whose residual set is whole blocks (fast mode): no integral images; :func:`reuse_mask` reads
        the blocks a window touches directly."""
        h, w, b = field.height, field.width, field.block
        bad = bad | ~field.valid
        res = np.repeat(np.repeat(bad, b, 0), b, 1)[:h, :w] if bad.any() else np.zeros((h, w), np.bool_)
        return cls(h, w, b, field, res, None, None, bad)


def reuse_mask(maps: PixelMaps, g: Geom, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reusable mask (Ho×Wo bool) and, for reusable positions, the shift in output pixels (sy, sx)."""
    ho, wo = out_hw
    h, w, b = maps.height, maps.width, maps.block
    zeros = np.zeros((ho, wo), np.int32)
    f = maps.field
    if g.lo_y >= BIG or g.lo_x >= BIG or g.E >= BIG:  # whole-image dependence: only "nothing moved or changed"
        ok = not maps.residual.any() and not f.dy.any() and not f.dx.any()
        return np.full((ho, wo), ok), zeros, zeros.copy()
    ok = np.empty((ho, wo), np.bool_)
    sy = np.empty((ho, wo), np.int32)
    sx = np.empty((ho, wo), np.int32)
    if maps.i_res is None or maps.i_blk is None:
        assert maps.bad is not None
        if g.E != g.S:
            raise ValueError("block-granular maps support a layer's own equivariance only (E == S)")
        _ek.block_reuse(maps.bad, f.dy, f.dx, b, h, w, g.S, g.lo_y, g.hi_y, g.lo_x, g.hi_x, ok, sy, sx)
        return ok, sy, sx
    _ek.strict_reuse(maps.i_res, maps.i_blk, b, h, w, g.S, g.E, g.lo_y, g.hi_y, g.lo_x, g.hi_x, ok, sy, sx)
    return ok, sy, sx
