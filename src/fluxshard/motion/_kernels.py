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
def codec_field(mvs, params, cur, prev):
    """Rasterise, pool, resolve the reference span, verify and (optionally) fill one frame's vectors.

    ``mvs`` is the side data's AVMotionVector record array, read in place (no column copies). ``params``
    packs height, width, block, cell, verify, max_span, tau, margin, good, fill, fill_tau, prior (few arguments
    keep numba's per-call dispatch cheap). ``cell`` is the rasterisation grid (4, or 8 when no partition
    is smaller — H.264 exports 8×8 at least). Returns dy, dx (int32), valid, covered, filled (bool) on the
    block grid. See ``codec.py`` for the rules.
    """
    height = int(params[0])
    width = int(params[1])
    block = int(params[2])
    cell = int(params[3])
    verify = params[4] != 0
    max_span = int(params[5])
    tau = params[6]
    margin = params[7]
    good = params[8]
    fill = params[9] != 0
    fill_tau = params[10]
    prior = max(int(params[11]), 1)
    hc = (height + cell - 1) // cell
    wc = (width + cell - 1) // cell
    cdy = np.zeros((hc, wc), np.float32)
    cdx = np.zeros((hc, wc), np.float32)
    have = np.zeros((hc, wc), np.bool_)
    for r in range(mvs.shape[0]):
        row = mvs[r]
        if row.source >= 0:  # future reference
            continue
        s = float(row.motion_scale) if row.motion_scale != 0 else 1.0
        vx = float(row.motion_x) / s
        vy = float(row.motion_y) / s
        w = int(row.w)
        h = int(row.h)
        bw = max(w // cell, 1)
        bh = max(h // cell, 1)
        cx0 = (int(row.dst_x) - w // 2) // cell
        cy0 = (int(row.dst_y) - h // 2) // cell
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
                # Candidates in order: the frame's expected span (distance to the previous anchor in display
                # order), then one frame, then the other spans. The first is the baseline; a later one must
                # beat it by ``margin``; stop as soon as the best explains the block (``good``).
                best_cost = 1e30
                for n_try in range(max_span + 1):
                    if n_try == 0:
                        span = prior
                    elif n_try == 1:
                        span = 1
                        if prior == 1:
                            continue
                    else:
                        span = n_try
                        if span == prior or span == 1:
                            continue
                    if span > max_span and n_try > 0:
                        break
                    cy = _round_half_away(fy[i, j] / span)
                    cx = _round_half_away(fx[i, j] / span)
                    if n_try > 0 and cy == by and cx == bx:
                        continue
                    c = _sampled_mad(cur, prev, i * block, j * block, block, height, width, cy, cx)
                    if n_try == 0 or c + margin < best_cost:
                        best_cost = c
                        by = cy
                        bx = cx
                    if best_cost <= good:
                        break
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
