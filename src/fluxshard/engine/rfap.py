"""Receptive-Field Alignment Principle, strict form: which output positions of a layer may be taken from
its motion-shifted cache without changing a single value (seed 000 §IV).

Output position ``o`` of a node with geometry ``g`` (see :mod:`fluxshard.engine.graph`) is reusable iff

1. its receptive field ``[o·S − lo, o·S + hi]`` (per axis, clipped to the image) carries **one**
   displacement ``d`` — every pixel of it belongs to a block with the same valid vector;
2. ``d`` is a multiple of the node's equivariance stride ``E`` (so the shifted network computes the same
   function, and ``o + d/S`` is an integer position of the cached map);
3. the window holds **no residual pixel** (pixels where the motion-aligned cached input differs from the
   current input, plus every pixel of an invalid block);
4. padding is touched the same way: per axis, ``d`` is zero there, or the window lies inside the image both at
   ``o`` and at its source ``o + d``.

All four are evaluated for every position of every layer in one pass per distinct geometry, with integral
images of the displacement, its square and the residual mask (uniformity ⇔ zero variance, exact in int64):
linear in the number of positions, whatever the receptive-field size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.engine.graph import BIG, Geom
from fluxshard.motion.field import MotionField


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out


@dataclass
class PixelMaps:
    """Per-pixel displacement and residual maps of one frame, as integral images."""

    height: int
    width: int
    dy: np.ndarray  # int32 H×W
    dx: np.ndarray
    residual: np.ndarray  # bool H×W
    valid: np.ndarray  # bool H×W: the pixel's block has a valid vector
    i_dy: np.ndarray
    i_dx: np.ndarray
    i_dy2: np.ndarray
    i_dx2: np.ndarray
    i_res: np.ndarray
    i_one: np.ndarray

    @classmethod
    def build(cls, field: MotionField, residual: np.ndarray) -> PixelMaps:
        h, w = residual.shape
        b = field.block
        dy = np.repeat(np.repeat(field.dy, b, 0), b, 1)[:h, :w].astype(np.int64)
        dx = np.repeat(np.repeat(field.dx, b, 0), b, 1)[:h, :w].astype(np.int64)
        valid = np.repeat(np.repeat(field.valid, b, 0), b, 1)[:h, :w]
        res = residual | ~valid
        return cls(h, w, dy.astype(np.int32), dx.astype(np.int32), res, valid,
                   _integral(dy), _integral(dx), _integral(dy * dy), _integral(dx * dx),
                   _integral(res.astype(np.int64)), _integral(np.ones((h, w), np.int64)))


def _box(ii: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Sum over rows [y0, y1) × cols [x0, x1) for broadcastable index arrays."""
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def reuse_mask(maps: PixelMaps, g: Geom, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reusable mask (Ho×Wo bool) and, for reusable positions, the shift in output pixels (sy, sx)."""
    ho, wo = out_hw
    h, w = maps.height, maps.width
    zeros = np.zeros((ho, wo), np.int32)
    if g.lo_y >= BIG or g.lo_x >= BIG or g.E >= BIG:  # whole-image dependence: only "nothing moved or changed"
        ok = not maps.residual.any() and not maps.dy.any() and not maps.dx.any()
        return np.full((ho, wo), ok), zeros, zeros.copy()
    oy = np.arange(ho)[:, None] * g.S
    ox = np.arange(wo)[None, :] * g.S
    wy0, wy1 = oy - g.lo_y, oy + g.hi_y + 1  # window, half-open
    wx0, wx1 = ox - g.lo_x, ox + g.hi_x + 1
    cy0, cy1 = np.clip(wy0, 0, h), np.clip(wy1, 0, h)
    cx0, cx1 = np.clip(wx0, 0, w), np.clip(wx1, 0, w)
    n = _box(maps.i_one, cy0, cy1, cx0, cx1)
    nz = np.maximum(n, 1)
    res = _box(maps.i_res, cy0, cy1, cx0, cx1)
    sdy, sdx = _box(maps.i_dy, cy0, cy1, cx0, cx1), _box(maps.i_dx, cy0, cy1, cx0, cx1)
    uniform = (_box(maps.i_dy2, cy0, cy1, cx0, cx1) * n == sdy * sdy) & (
        _box(maps.i_dx2, cy0, cy1, cx0, cx1) * n == sdx * sdx
    )
    dy = sdy // nz  # exact where uniform
    dx = sdx // nz
    divisible = (dy % g.E == 0) & (dx % g.E == 0)
    inside_y = (wy0 >= 0) & (wy1 <= h)
    inside_x = (wx0 >= 0) & (wx1 <= w)
    border = ((dy == 0) | (inside_y & (wy0 + dy >= 0) & (wy1 + dy <= h))) & (
        (dx == 0) | (inside_x & (wx0 + dx >= 0) & (wx1 + dx <= w))
    )
    ok = (n > 0) & (res == 0) & uniform & divisible & border
    sy = np.where(ok, dy // g.S, 0).astype(np.int32)
    sx = np.where(ok, dx // g.S, 0).astype(np.int32)
    # the source position must exist in the cached map (it does when the window test passed, but the output
    # grid can be one row shorter than the window arithmetic suggests at the far edge)
    src_ok = (np.arange(ho)[:, None] + sy >= 0) & (np.arange(ho)[:, None] + sy < ho) & (
        np.arange(wo)[None, :] + sx >= 0) & (np.arange(wo)[None, :] + sx < wo)
    ok &= src_ok
    return ok, np.where(ok, sy, 0), np.where(ok, sx, 0)
