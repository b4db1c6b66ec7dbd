"""Hierarchical block matching (seed 001 §4.1) for streams and frames without codec vectors.

Used for HEVC/VP9/raw video and cameras, for I-frames of codec-vector streams, and for MPEG-4 Part 2
B-frames. Coarse-to-fine on a luma pyramid (2×2 mean): an exhaustive search of ±``search`` coarse pixels
at the coarsest level, then ±1 refinement of the doubled vector at each finer level, with the zero vector
also tried at full resolution so static blocks never drift. The matching cost is the seed's mean absolute
difference D; a block whose best D exceeds ``tau`` (new or occluded content), or whose source would leave
the frame, is invalid. The per-level search is a numba kernel (``_kernels.match_level``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion import _kernels
from fluxshard.motion.field import MotionField, grid_shape


@dataclass(frozen=True)
class BlockMatchConfig:
    block: int = 16
    levels: int = 3  # pyramid levels including full resolution (3 → coarsest is 1/4)
    search: int = 6  # exhaustive radius at the coarsest level, in coarse pixels (±24 px at full res)
    tau: float = 12.0  # mean |Δluma| above which the best match is rejected
    predictor_min_valid: float = 0.6
    predictor_good: float = 1.0  # predictor search: stop at the first candidate with mean |Δ| ≤ this (0 = off)


def _down2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    a = img[:h, :w]
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def block_match(
    cur: np.ndarray,
    ref: np.ndarray,
    config: BlockMatchConfig | None = None,
    frame_type: str = "?",
    predictor: MotionField | None = None,
) -> MotionField:
    """Integer field of ``cur`` into ``ref`` (both uint8 H×W luma) by hierarchical block matching.

    With a ``predictor`` (the previous frame's field: motion is temporally coherent) only the predicted
    vector ±1 and zero are tried at full resolution on a 2-pixel sampling grid — seed 001's MV-guided
    search neighbourhood, ~10× cheaper; if that leaves more than ``1 - predictor_min_valid`` of the blocks
    unmatched, the full hierarchical search runs instead.
    """
    cfg = config or BlockMatchConfig()
    b = cfg.block
    height, width = cur.shape
    hb, wb = grid_shape(height, width, b)
    if predictor is not None and predictor.shape == (hb, wb) and predictor.block == b:
        pdy = np.where(predictor.valid, predictor.dy, 0).astype(np.int32, copy=False)
        pdx = np.where(predictor.valid, predictor.dx, 0).astype(np.int32, copy=False)
        dy, dx = np.empty_like(pdy), np.empty_like(pdx)
        cost = np.empty((hb, wb), np.float32)
        _kernels.match_level(cur, ref, b, pdy, pdx, 1, True, 2, dy, dx, cost, cfg.predictor_good)
        # Valid blocks lie inside the reference: the search only admits candidates whose block stays inside
        # (``MotionField.source_inside``), and a block without one has cost +inf.
        f = MotionField(dy, dx, cost <= cfg.tau, b, height, width, frame_type, source="blockmatch")
        if f.valid_fraction >= cfg.predictor_min_valid:
            return f
    levels = max(1, min(cfg.levels, int(np.log2(b)) - 1))  # keep ≥ 4-pixel blocks at the coarsest level
    pyr_c = [cur.astype(np.float32)]
    pyr_r = [ref.astype(np.float32)]
    for _ in range(levels - 1):
        pyr_c.append(_down2(pyr_c[-1]))
        pyr_r.append(_down2(pyr_r[-1]))
    dy = np.zeros((hb, wb), np.int32)
    dx = np.zeros((hb, wb), np.int32)
    cost = np.zeros((hb, wb), np.float32)
    for lvl in range(levels - 1, -1, -1):
        top = lvl == levels - 1
        pdy, pdx = (dy, dx) if top else (dy * 2, dx * 2)
        ndy, ndx = np.empty_like(dy), np.empty_like(dx)
        # Full resolution on the planes themselves: integer costs, equal to those of the float copies.
        c_l, r_l = (cur, ref) if lvl == 0 and cur.dtype == np.uint8 == ref.dtype else (pyr_c[lvl], pyr_r[lvl])
        _kernels.match_level(c_l, r_l, b >> lvl, pdy, pdx, cfg.search if top else 1, lvl == 0, 1, ndy, ndx, cost)
        dy, dx = ndy, ndx
    f = MotionField(dy, dx, cost <= cfg.tau, b, height, width, frame_type, source="blockmatch")  # inside: see above
    return f
