"""Compiled (numba) per-frame kernels of the motion front-end.

Why numba: the front-end must cost a small fraction of decoding (≈1–2 ms per frame at 640×360), and the
work — rasterising ~1k vectors, a per-block majority vote, a few sampled-pixel checks per block — is a set
of short loops that NumPy can only express as dozens of array passes. Compiled once per machine and
cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

CELL = 4


@njit(cache=True, nogil=True)
def _round_half_away(v: float) -> int:
    if v >= 0:
        return int(np.floor(v + 0.5))
    return -int(np.floor(-v + 0.5))


@njit(cache=True, nogil=True)
def _sampled_mad(cur, prev, y0, x0, block, height, width, dy, dx) -> float:
    """Mean |Δluma| over a 4×4 grid of samples of one block (clamped to the frame)."""
    step = block // 4 if block >= 4 else 1
    acc = 0
    n = 0
    for sy in range(step // 2, block, step):
        y = min(y0 + sy, height - 1)
        ry = min(max(y + dy, 0), height - 1)
        for sx in range(step // 2, block, step):
            x = min(x0 + sx, width - 1)
            rx = min(max(x + dx, 0), width - 1)
            acc += abs(np.int32(cur[y, x]) - np.int32(prev[ry, rx]))
            n += 1
    return acc / n


@njit(cache=True, nogil=True)
def codec_field(
    source, w, h, dst_x, dst_y, mx, my, mscale,
    height: int, width: int, block: int, cell: int,
    cur, prev,
    verify: bool, max_span: int, tau: float, margin: float, good: float,
    fill: bool, fill_tau: float,
):
    """Rasterise, pool, resolve the reference span, verify and (optionally) fill one frame's vectors.

    ``cell`` is the rasterisation grid (4, or 8 when no partition is smaller — H.264 exports 8×8 at least).
    Returns dy, dx (int32), valid, covered, filled (bool) on the block grid. See ``codec.py`` for rules.
    """
    hc = (height + cell - 1) // cell
    wc = (width + cell - 1) // cell
    cdy = np.zeros((hc, wc), np.float32)
    cdx = np.zeros((hc, wc), np.float32)
    have = np.zeros((hc, wc), np.bool_)
    for r in range(source.shape[0]):
        if source[r] >= 0:
            continue
        s = float(mscale[r]) if mscale[r] != 0 else 1.0
        vx = float(mx[r]) / s
        vy = float(my[r]) / s
        bw = max(int(w[r]) // cell, 1)
        bh = max(int(h[r]) // cell, 1)
        cx0 = (int(dst_x[r]) - int(w[r]) // 2) // cell
        cy0 = (int(dst_y[r]) - int(h[r]) // 2) // cell
        for cy in range(max(cy0, 0), min(cy0 + bh, hc)):
            for cx in range(max(cx0, 0), min(cx0 + bw, wc)):
                cdy[cy, cx] = vy
                cdx[cy, cx] = vx
                have[cy, cx] = True

    hb = (height + block - 1) // block
    wb = (width + block - 1) // block
    k = block // cell
    fy = np.zeros((hb, wb), np.float32)
    fx = np.zeros((hb, wb), np.float32)
    covered = np.zeros((hb, wb), np.bool_)
    coherent = np.zeros((hb, wb), np.bool_)
    vys = np.empty(k * k, np.float32)
    vxs = np.empty(k * k, np.float32)
    for i in range(hb):
        for j in range(wb):
            n = 0
            cov = True
            for a in range(k):
                cy = i * k + a
                if cy >= hc:
                    break
                for b in range(k):
                    cx = j * k + b
                    if cx >= wc:
                        break
                    if not have[cy, cx]:
                        cov = False
                    else:
                        vys[n] = cdy[cy, cx]
                        vxs[n] = cdx[cy, cx]
                        n += 1
            covered[i, j] = cov
            if n == 0:
                continue
            uniform = True
            for p in range(1, n):
                if vys[p] != vys[0] or vxs[p] != vxs[0]:
                    uniform = False
                    break
            if uniform:  # the common case: one partition covers the block
                fy[i, j] = vys[0]
                fx[i, j] = vxs[0]
                coherent[i, j] = True
                continue
            best = 0
            best_c = 0
            for p in range(n):
                c = 0
                for q in range(n):
                    if vys[p] == vys[q] and vxs[p] == vxs[q]:
                        c += 1
                if c > best_c:
                    best_c = c
                    best = p
            fy[i, j] = vys[best]
            fx[i, j] = vxs[best]
            coherent[i, j] = 2 * best_c >= n

    dy = np.zeros((hb, wb), np.int32)
    dx = np.zeros((hb, wb), np.int32)
    valid = np.zeros((hb, wb), np.bool_)
    for i in range(hb):
        for j in range(wb):
            if not (covered[i, j] and coherent[i, j]):
                continue
            by = _round_half_away(fy[i, j])
            bx = _round_half_away(fx[i, j])
            ok = True
            if verify:
                best_cost = _sampled_mad(cur, prev, i * block, j * block, block, height, width, by, bx)
                py = by
                px = bx
                for span in range(2, max_span + 1):
                    if best_cost <= good:  # the one-frame hypothesis already explains the block
                        break
                    cy = _round_half_away(fy[i, j] / span)
                    cx = _round_half_away(fx[i, j] / span)
                    if cy == py and cx == px:
                        continue
                    py = cy
                    px = cx
                    c = _sampled_mad(cur, prev, i * block, j * block, block, height, width, cy, cx)
                    if c + margin < best_cost:
                        best_cost = c
                        by = cy
                        bx = cx
                ok = best_cost <= tau
            if ok:
                dy[i, j] = by
                dx[i, j] = bx
                valid[i, j] = True

    filled = np.zeros((hb, wb), np.bool_)
    if fill:
        for i in range(hb):
            for j in range(wb):
                if valid[i, j]:
                    continue
                # MV-guided candidates: zero motion and the valid 4-neighbours' vectors.
                best_cost = _sampled_mad(cur, prev, i * block, j * block, block, height, width, 0, 0)
                by = 0
                bx = 0
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    if best_cost <= good:
                        break
                    ni = i + di
                    nj = j + dj
                    if ni < 0 or nj < 0 or ni >= hb or nj >= wb or not valid[ni, nj]:
                        continue
                    c = _sampled_mad(cur, prev, i * block, j * block, block, height, width,
                                     dy[ni, nj], dx[ni, nj])
                    if c < best_cost:
                        best_cost = c
                        by = dy[ni, nj]
                        bx = dx[ni, nj]
                if best_cost <= fill_tau:
                    dy[i, j] = by
                    dx[i, j] = bx
                    filled[i, j] = True
        for i in range(hb):
            for j in range(wb):
                if filled[i, j]:
                    valid[i, j] = True
    return dy, dx, valid, covered, filled


@njit(cache=True, nogil=True)
def aligned_block_mad(cur, ref, dy, dx, block: int):
    """Per-block mean |cur − ref shifted by the block's (dy, dx)| over all pixels of H×W luma.

    Also returns whether each displaced block lies inside ``ref``; outside samples are clamped to the
    border. Avoids materialising the warped frame: one pass over the current frame's pixels.
    """
    height = cur.shape[0]
    width = cur.shape[1]
    hb, wb = dy.shape
    mad = np.zeros((hb, wb), np.float32)
    inside = np.ones((hb, wb), np.bool_)
    for i in range(hb):
        y0 = i * block
        y1 = min(y0 + block, height)
        for j in range(wb):
            x0 = j * block
            x1 = min(x0 + block, width)
            oy = dy[i, j]
            ox = dx[i, j]
            if y0 + oy < 0 or x0 + ox < 0 or y1 + oy > height or x1 + ox > width:
                inside[i, j] = False
            acc = 0
            for y in range(y0, y1):
                ry = min(max(y + oy, 0), height - 1)
                for x in range(x0, x1):
                    rx = min(max(x + ox, 0), width - 1)
                    acc += abs(np.int32(cur[y, x]) - np.int32(ref[ry, rx]))
            mad[i, j] = acc / ((y1 - y0) * (x1 - x0))
    return mad, inside
