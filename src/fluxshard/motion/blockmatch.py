"""Hierarchical block matching (seed 001 §4.1) for streams without codec vectors (HEVC, raw, cameras).

Coarse-to-fine on a luma pyramid: an exhaustive search of ±``search`` pixels at the coarsest level
(cheap: a few thousand pixels per candidate, evaluated for every block at once by shifting the whole
image), then ±1 refinement of the doubled vector at each finer level, with the zero vector kept as a
candidate at full resolution so static blocks never drift. The matching cost is the mean absolute
difference D of the seed; a block whose best D exceeds ``tau`` is invalid (new or occluded content).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion.field import MotionField, grid_shape


@dataclass(frozen=True)
class BlockMatchConfig:
    block: int = 16
    levels: int = 3  # pyramid levels including full resolution (3 → coarsest is 1/4)
    search: int = 6  # exhaustive radius at the coarsest level, in coarse pixels (±24 px at full res)
    tau: float = 12.0  # mean |Δluma| above which the best match is rejected


def _down2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    a = img[:h, :w].astype(np.float32)
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def _pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1])), mode="edge")


def _block_sums(diff: np.ndarray, hb: int, wb: int, b: int) -> np.ndarray:
    return diff.reshape(hb, b, wb, b).sum(axis=(1, 3))


def _coarse_search(cur: np.ndarray, ref: np.ndarray, b: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive ±r search for every block of size b at once; ties prefer the smaller vector."""
    h, w = cur.shape
    hb, wb = h // b, w // b
    cur = cur[: hb * b, : wb * b]
    refp = np.pad(ref, r, mode="edge")
    best = np.full((hb, wb), np.inf, np.float32)
    by = np.zeros((hb, wb), np.int32)
    bx = np.zeros((hb, wb), np.int32)
    cands = sorted(((y, x) for y in range(-r, r + 1) for x in range(-r, r + 1)), key=lambda v: abs(v[0]) + abs(v[1]))
    for y, x in cands:
        shifted = refp[r + y : r + y + hb * b, r + x : r + x + wb * b]
        cost = _block_sums(np.abs(shifted - cur), hb, wb, b)
        better = cost < best - 1e-3
        best = np.where(better, cost, best)
        by = np.where(better, y, by)
        bx = np.where(better, x, bx)
    return by, bx


def _refine(
    cur: np.ndarray, ref: np.ndarray, b: int, dy: np.ndarray, dx: np.ndarray, extra_zero: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """±1 refinement around per-block predictions; returns dy, dx and the best mean |Δ|."""
    hb, wb = dy.shape
    m = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0))) + 2
    refp = np.pad(ref, m, mode="edge")
    curb = cur[: hb * b, : wb * b].reshape(hb, b, wb, b).transpose(0, 2, 1, 3)
    oy = (np.arange(hb) * b)[:, None, None, None] + np.arange(b)[None, None, :, None]
    ox = (np.arange(wb) * b)[None, :, None, None] + np.arange(b)[None, None, None, :]
    cands = [(0, 0)] + [(y, x) for y in (-1, 0, 1) for x in (-1, 0, 1) if (y, x) != (0, 0)]
    best = np.full((hb, wb), np.inf, np.float32)
    by, bx = dy.copy(), dx.copy()
    trials = [(dy + y, dx + x) for y, x in cands]
    if extra_zero:
        trials.append((np.zeros_like(dy), np.zeros_like(dx)))
    for ty, tx in trials:
        patch = refp[oy + m + ty[:, :, None, None], ox + m + tx[:, :, None, None]]
        cost = np.abs(patch - curb).mean(axis=(2, 3))
        better = cost < best - 1e-3
        best = np.where(better, cost, best)
        by = np.where(better, ty, by)
        bx = np.where(better, tx, bx)
    return by, bx, best


def block_match(
    cur: np.ndarray, ref: np.ndarray, config: BlockMatchConfig | None = None, frame_type: str = "?"
) -> MotionField:
    """Integer field of ``cur`` into ``ref`` (both uint8 H×W luma) by hierarchical block matching."""
    cfg = config or BlockMatchConfig()
    b = cfg.block
    height, width = cur.shape
    hb, wb = grid_shape(height, width, b)
    levels = max(1, min(cfg.levels, int(np.log2(b)) - 1))  # keep ≥ 4-pixel blocks at the coarsest level
    ph, pw = hb * b, wb * b
    pyr_c = [_pad_to(cur, ph, pw).astype(np.float32)]
    pyr_r = [_pad_to(ref, ph, pw).astype(np.float32)]
    for _ in range(levels - 1):
        pyr_c.append(_down2(pyr_c[-1]))
        pyr_r.append(_down2(pyr_r[-1]))
    top = levels - 1
    dy, dx = _coarse_search(pyr_c[top], pyr_r[top], b >> top, cfg.search)
    cost = np.zeros((hb, wb), np.float32)
    for lvl in range(top - 1, -1, -1):
        dy, dx, cost = _refine(pyr_c[lvl], pyr_r[lvl], b >> lvl, dy * 2, dx * 2, extra_zero=lvl == 0)
    if top == 0:
        dy, dx, cost = _refine(pyr_c[0], pyr_r[0], b, dy, dx, extra_zero=True)
    f = MotionField(dy.astype(np.int32), dx.astype(np.int32), cost <= cfg.tau, b, height, width, frame_type,
                    source="blockmatch")
    f.valid &= f.source_inside()
    return f
