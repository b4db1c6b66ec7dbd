"""Alignment check: warp a reference frame block by block with a field and find the residual set.

This is the input-level residual set of seed 000 (Stage 2): blocks whose motion-aligned reference does not
reproduce the current frame. A block is residual when its vector is invalid, its source leaves the
reference frame, or the mean absolute luma difference after alignment exceeds ``tau``. The same check with
the zero field gives the residual set a static-camera (delta) method would have to recompute.
"""

from __future__ import annotations

import numpy as np

from fluxshard.motion import _kernels
from fluxshard.motion.field import MotionField


def warp_blocks(ref: np.ndarray, field: MotionField) -> np.ndarray:
    """Reference pixels moved onto the current grid: ``out[y, x] = ref[y + dy(b), x + dx(b)]``.

    Works for H×W or H×W×C arrays; samples outside the reference are clamped to its border (callers that
    need exactness use :meth:`MotionField.source_inside`).
    """
    h, w = ref.shape[:2]
    b = field.block
    hb, wb = field.shape
    yy = np.arange(hb * b).reshape(hb, b)[:, :, None] + field.dy[:, None, :]  # (hb, b, wb)
    xx = np.arange(wb * b).reshape(wb, b)[None, :, :] + field.dx[:, :, None]  # (hb, wb, b)
    yy = np.clip(yy, 0, h - 1)
    xx = np.clip(xx, 0, w - 1)
    # out[(i, r), (j, c)] = ref[yy[i, r, j], xx[i, j, c]]
    rows = yy.transpose(0, 2, 1)[:, :, :, None]  # (hb, wb, b, 1)
    cols = xx[:, :, None, :]  # (hb, wb, 1, b)
    out = ref[rows, cols]  # (hb, wb, b, b[, C])
    out = out.transpose(0, 2, 1, 3, *range(4, out.ndim)).reshape(hb * b, wb * b, *ref.shape[2:])
    return out[:h, :w]


def residual_blocks(
    cur: np.ndarray, ref: np.ndarray, field: MotionField, tau: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """Residual mask (Hb, Wb) and per-block MAD of luma ``cur`` against ``ref`` aligned with ``field``."""
    if cur.ndim != 2 or cur.shape != ref.shape:
        raise ValueError(f"residual_blocks needs two equal H×W luma frames, got {cur.shape} and {ref.shape}")
    pix = np.empty(cur.shape, np.float32)
    mad = np.empty(field.shape, np.float32)
    _kernels.shifted_diff(cur[:, :, None], ref[:, :, None], field.dy, field.dx, field.block, pix, mad)
    residual = ~field.valid | ~field.source_inside() | (mad > tau)
    return residual, mad
