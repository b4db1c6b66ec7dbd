"""Per-frame mask kernels of the engine (numba, compiled once and cached on disk).

Fast mode moves one boolean *change mask* per node through the graph and, per convolution, turns its input's
mask into the set of output positions to recompute and the executor's tile selection. Done with a handful of
torch ops per layer this cost ~0.3 ms per convolution on this CPU (more than many sparse convolutions
themselves); one compiled pass per layer costs a few microseconds.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def window_any(m_in, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, dh: int, dw: int, extra, out,
               th: int, tw: int, tiles) -> int:
    """``out[i, j]`` = any changed input in the window of output (i, j) (kernel, stride, top/left padding,
    dilation), or ``extra[i, j]`` when ``extra`` has the output's shape; ``tiles[i // th, j // tw]`` is set for
    every true output when ``tiles`` is not empty. Returns the number of true outputs.

    Separable: a horizontal pass ORs each input row over the kernel's columns at the output columns, then a
    vertical pass ORs those rows over the kernel's rows (kh + kw reads per output instead of kh · kw). Both
    passes are branch-free byte ORs over row slices indexed from 0: numba checks every index that may be
    negative for wrap-around, which kept the loops scalar (~10 ns per output; ~1 ns now)."""
    h, w = m_in.shape
    ho, wo = out.shape
    use_extra = extra.shape[0] == ho and extra.shape[1] == wo
    use_tiles = tiles.shape[0] > 0
    mi = m_in.view(np.uint8)
    hrow = np.zeros((h, wo), np.uint8)
    for b in range(kw):
        off = b * dw - pl  # input column of output column j for this tap: j · sw + off
        j0 = 0
        while j0 < wo and j0 * sw + off < 0:
            j0 += 1
        j1 = wo
        while j1 > j0 and (j1 - 1) * sw + off >= w:
            j1 -= 1
        n = j1 - j0
        if n <= 0:
            continue
        base = j0 * sw + off
        for y in range(h):
            src = mi[y, base:]
            dst = hrow[y, j0:j1]
            if sw == 1:
                for k in range(n):
                    dst[k] |= src[k]
            else:
                for k in range(n):
                    dst[k] |= src[k * sw]
    ou = out.view(np.uint8)
    count = 0
    for i in range(ho):
        oi = ou[i]
        if use_extra:
            ei = extra[i].view(np.uint8)
            for j in range(wo):
                oi[j] = ei[j]
        else:
            for j in range(wo):
                oi[j] = 0
        for a in range(kh):
            y = i * sh - pt + a * dh
            if y >= 0 and y < h:
                hr = hrow[y]
                for j in range(wo):
                    oi[j] |= hr[j]
        c = 0
        for j in range(wo):
            c += oi[j]
        count += c
        if use_tiles and c:
            ti = i // th
            for j in range(wo):
                if oi[j]:
                    tiles[ti, j // tw] = True
    return count


@njit(cache=True, nogil=True)
def window_positions(m_in, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, dh: int, dw: int, extra, out,
                     th: int, tw: int, tiles, positions) -> int:
    """:func:`window_any`, then the flat indices of the true outputs in ``positions`` (row-major): the fast
    pgemm path's recompute set in one call."""
    count = window_any(m_in, kh, kw, sh, sw, pt, pl, dh, dw, extra, out, th, tw, tiles)
    ho, wo = out.shape
    ou = out.view(np.uint8)
    q = 0
    for i in range(ho):  # branch-free compaction: write every index, advance past the true ones
        oi = ou[i]
        base = i * wo
        for j in range(wo):
            positions[q] = base + j
            q += oi[j]
    return count


@njit(cache=True, nogil=True, inline="always")
def _write_row(yr, i: int, orows, r: int, act: int, slope) -> float:
    """``orows[r] = act(yr[i])``; returns max over channels of |new − old|. ``act``: 0 none, 1 ReLU, 2 leaky
    ReLU with float32 ``slope`` (PyTorch's formula: ``x if x > 0 else x · slope``, in float32)."""
    m = np.float32(0.0)
    for k in range(yr.shape[1]):
        v = yr[i, k]
        if act == 1:
            if v <= 0:  # NaN stays NaN, as in torch.relu
                v = np.float32(0.0)
        elif act == 2 and not v > 0:
            v = v * slope
        m = max(m, abs(v - orows[r, k]))
        orows[r, k] = v
    return m


@njit(cache=True, nogil=True)
def finish_rows(yr, positions, orows, tau: float, acc, use_acc: bool, changed, written, act: int = 0,
                slope: float = 0.0) -> None:
    """The fast pgemm path's write-back in one pass: ``orows[positions[i]] = act(yr[i])`` (the convolution's
    fused ReLU / leaky ReLU applied here, saving a pass over the rows), the written mask, and the truncation
    test on ``max_c |new − old|`` (accumulated in ``acc`` when ``use_acc``, see :func:`accumulate_rows`; else
    against τ^l alone)."""
    s32 = np.float32(slope)
    for i in range(yr.shape[0]):
        r = positions[i]
        m = _write_row(yr, i, orows, r, act, s32)
        written[r] = True
        if use_acc:
            a = acc[r] + m
            if a > tau:
                changed[r] = True
                acc[r] = 0.0
            else:
                acc[r] = a
        elif m > tau:
            changed[r] = True


@njit(cache=True, nogil=True)
def integral_bool(m, out) -> None:
    """``out`` ((H+1)×(W+1) int32) = the integral image of the bool mask ``m``, zero first row and column: one
    pass (a running row sum plus the row above), where a conversion and two cumulative sums took three."""
    h, w = m.shape
    mu = m.view(np.uint8)
    for j in range(w + 1):
        out[0, j] = 0
    for i in range(h):
        prev = out[i]
        cur = out[i + 1]
        row = mu[i]
        cur[0] = 0
        run = 0
        for j in range(w):
            run += row[j]
            cur[j + 1] = prev[j + 1] + run


@njit(cache=True, nogil=True)
def mask_tiles(mask, th: int, tw: int, tiles) -> int:
    """``tiles[i // th, j // tw]`` |= ``mask[i, j]``; returns the number of true positions."""
    ho, wo = mask.shape
    count = 0
    for i in range(ho):
        for j in range(wo):
            if mask[i, j]:
                count += 1
                tiles[i // th, j // tw] = True
    return count


@njit(cache=True, nogil=True)
def block_residual(cur, ref, nc: int, dy, dx, valid, block: int, tau: float, out_bad, out_upd,
                   rescue: float) -> None:
    """Fast-mode input residual per block: mean over the block of max-over-channels |cur − ref shifted by the
    block's vector|. ``cur``, ``ref`` and ``out_upd`` are (H, W·nc) rows of interleaved channels (numpy views of
    channels-last tensors): every inner loop runs over a 0-based row slice, so the differences and copies
    vectorise (numba tests any index that may be negative for wrap-around, per element; 0.56 → 0.44 ms at
    384×288 RGB measured). Invalid blocks are tried at zero motion (static background the codec intra-coded);
    ``out_bad`` = the block is residual (mean above ``tau``, source outside the frame, or invalid and not
    static). ``dy``/``dx``/``valid`` are updated in place: rescued blocks become valid zero-motion blocks.
    ``out_upd`` (empty = skip) receives fast mode's *updated input* (seed 000 Stage 4) in the same pass: per
    block, the cached input shifted by the block's vector, or the current frame where the block is residual.
    ``rescue`` ≥ 0 (zero-shift rescue): a valid block with a non-zero vector whose *unshifted* cache differs
    by at most ``rescue`` becomes a zero-motion block — it is then aligned at every stride, where its vector
    (a 1 px shake, say) would be aligned at none past the first."""
    height = cur.shape[0]
    width = cur.shape[1] // nc
    hb, wb = dy.shape
    upd = out_upd.shape[0] > 0
    d = np.empty(block * nc, np.float32)
    for i in range(hb):
        y0 = i * block
        y1 = min(y0 + block, height)
        for j in range(wb):
            x0 = j * block
            x1 = min(x0 + block, width)
            n = (x1 - x0) * nc
            if rescue >= 0.0 and valid[i, j] and (dy[i, j] != 0 or dx[i, j] != 0):
                limit = rescue * ((y1 - y0) * (x1 - x0))
                z = 0.0
                for y in range(y0, y1):
                    z += _row_maxabs(cur[y, x0 * nc:x1 * nc], ref[y, x0 * nc:x1 * nc], n, nc, d)
                    if z > limit:  # content that really moved fails within a row or two: stop reading
                        break
                if z <= limit:
                    dy[i, j] = 0
                    dx[i, j] = 0
            oy = dy[i, j] if valid[i, j] else 0
            ox = dx[i, j] if valid[i, j] else 0
            if y0 + oy < 0 or y1 + oy > height or x0 + ox < 0 or x1 + ox > width:
                out_bad[i, j] = True
                if upd:
                    _copy_rows(cur, y0, y1, x0 * nc, n, out_upd)
                continue
            acc = 0.0
            for y in range(y0, y1):
                r = ref[y + oy, (x0 + ox) * nc:(x1 + ox) * nc]
                acc += _row_maxabs(cur[y, x0 * nc:x1 * nc], r, n, nc, d)
                if upd:  # the shifted cache, overwritten below if the block is residual
                    u = out_upd[y, x0 * nc:x1 * nc]
                    for k in range(n):
                        u[k] = r[k]
            bad = acc / ((y1 - y0) * (x1 - x0)) > tau
            if not valid[i, j] and not bad:
                valid[i, j] = True
                dy[i, j] = 0
                dx[i, j] = 0
            out_bad[i, j] = bad or not valid[i, j]
            if upd and out_bad[i, j]:
                _copy_rows(cur, y0, y1, x0 * nc, n, out_upd)


@njit(cache=True, nogil=True)
def block_residual_inplace(cur, ref, nc: int, dy, dx, valid, block: int, tau: float, out_bad, side,
                           rescue: float) -> None:
    """:func:`block_residual` with the updated input written into ``ref`` itself: only blocks that move or are
    residual are written; a still, unchanged block — most of a static camera's frame — is not touched.

    Why: the two-buffer variant streams three full planes (``cur``, ``ref``, and ``out_upd``, whose every line
    is also read for ownership before it is written): ~0.85 ms per 384×288 RGB frame with cold caches, against
    0.44 ms warm — memory-bound. Here a first pass only reads and decides; the shifted sources of the moving,
    non-residual blocks are then packed into ``side`` (flat, ≥ H·W·nc floats) before any block is written, so
    a block's write can never clobber what another block still has to read."""
    # decide (and rescue) every block exactly as the two-buffer kernel does, writing nothing
    block_residual(cur, ref, nc, dy, dx, valid, block, tau, out_bad, np.empty((0, 1), np.float32), rescue)
    height = cur.shape[0]
    width = cur.shape[1] // nc
    hb, wb = dy.shape
    # pack the sources of the moving blocks that are reused
    o = 0
    for i in range(hb):
        y0 = i * block
        y1 = min(y0 + block, height)
        for j in range(wb):
            if out_bad[i, j] or (dy[i, j] == 0 and dx[i, j] == 0):
                continue
            x0 = j * block
            n = (min(x0 + block, width) - x0) * nc
            c0 = (x0 + dx[i, j]) * nc
            for y in range(y0, y1):
                r = ref[y + dy[i, j], c0:c0 + n]
                sd = side[o:o + n]
                for k in range(n):
                    sd[k] = r[k]
                o += n
    # write: moving blocks from the packed sources, residual blocks from the frame
    o = 0
    for i in range(hb):
        y0 = i * block
        y1 = min(y0 + block, height)
        for j in range(wb):
            x0 = j * block
            n = (min(x0 + block, width) - x0) * nc
            if out_bad[i, j]:
                _copy_rows(cur, y0, y1, x0 * nc, n, ref)
            elif dy[i, j] != 0 or dx[i, j] != 0:
                for y in range(y0, y1):
                    u = ref[y, x0 * nc:x0 * nc + n]
                    sd = side[o:o + n]
                    for k in range(n):
                        u[k] = sd[k]
                    o += n


@njit(cache=True, nogil=True, inline="always")
def _row_maxabs(c, r, n: int, nc: int, d) -> float:
    """Sum over one row's pixels of max-over-channels |c − r| (``n`` = pixels × ``nc`` interleaved values;
    ``d`` scratch). The difference runs as one flat loop so it vectorises."""
    for k in range(n):
        d[k] = abs(c[k] - r[k])
    acc = 0.0
    if nc == 3:
        for p in range(n // 3):
            acc += max(d[3 * p], max(d[3 * p + 1], d[3 * p + 2]))
    else:
        for p in range(n // nc):
            m = d[p * nc]
            for q in range(1, nc):
                m = max(m, d[p * nc + q])
            acc += m
    return acc


@njit(cache=True, nogil=True, inline="always")
def _copy_rows(src, y0: int, y1: int, c0: int, n: int, out) -> None:
    for y in range(y0, y1):
        s = src[y, c0:c0 + n]
        u = out[y, c0:c0 + n]
        for k in range(n):
            u[k] = s[k]


@njit(cache=True, nogil=True)
def changed_dense(y, cache, sy, sx, tau: float, out) -> None:
    """Fast mode, a layer that ran dense: ``out[i, j] = max_c |y[i, j] − cache[i + sy, j + sx]| > tau``.

    ``y`` and ``cache`` are (H, W, C) channels-last views. Reading the old cache at its shifted position
    replaces moving the whole cache (a full gather) and three full-tensor passes (subtract, abs, max)."""
    h, w, c = y.shape
    for i in range(h):
        for j in range(w):
            si = i + sy[i, j]
            sj = j + sx[i, j]
            if si < 0 or si >= h or sj < 0 or sj >= w:  # no source inside the map: changed
                out[i, j] = True
                continue
            m = np.float32(0.0)
            for k in range(c):
                m = max(m, abs(y[i, j, k] - cache[si, sj, k]))
            out[i, j] = m > tau


@njit(cache=True, nogil=True)
def changed_dense_acc(y, cache, sy, sx, tau: float, acc_old, acc_new, out) -> None:
    """:func:`changed_dense` with accumulated truncation: ``a = acc_old[i + sy, j + sx] + max_c |Δ|``; a
    position is changed when ``a > tau`` (then ``acc_new`` = 0, the change propagates) and otherwise carries
    ``a`` on, so changes that stay under τ^l frame after frame still propagate once they add up."""
    h, w, c = y.shape
    for i in range(h):
        for j in range(w):
            si = i + sy[i, j]
            sj = j + sx[i, j]
            if si < 0 or si >= h or sj < 0 or sj >= w:
                out[i, j] = True
                acc_new[i, j] = 0.0
                continue
            m = np.float32(0.0)
            for k in range(c):
                m = max(m, abs(y[i, j, k] - cache[si, sj, k]))
            a = acc_old[si, sj] + m
            if a > tau:
                out[i, j] = True
                acc_new[i, j] = 0.0
            else:
                out[i, j] = False
                acc_new[i, j] = a


@njit(cache=True, nogil=True)
def accumulate_rows(rows, delta, tau: float, acc, changed) -> None:
    """Accumulated truncation for written rows (flat indices): ``a = acc[r] + delta``; changed and reset when
    ``a > tau``, else carried. The bound this keeps: what downstream layers last consumed at a position
    differs from its current value by at most τ^l summed over the frames since (never more than τ^l
    unpropagated), where plain truncation compares with the previous frame only and can drift without bound."""
    for i in range(rows.shape[0]):
        r = rows[i]
        a = acc[r] + delta[i]
        if a > tau:
            changed[r] = True
            acc[r] = 0.0
        else:
            acc[r] = a


@njit(cache=True, nogil=True)
def write_rows(yr, dst, orows, delta) -> None:
    """``orows[dst[i]] = yr[i]`` and ``delta[i] = max_c |yr[i] − old orows[dst[i]]|`` in one pass: the sparse
    executor's scatter and fast mode's truncation input (was gather + subtract + abs + max + scatter)."""
    for i in range(yr.shape[0]):
        delta[i] = _write_row(yr, i, orows, dst[i], 0, np.float32(0.0))


@njit(cache=True, nogil=True)
def im2col_rows(xrows, table, valid, positions, fill: float, out) -> None:
    """The pgemm path's im2col in one pass: ``out[i, t·C:(t+1)·C] = xrows[table[positions[i], t]]`` for every
    kernel tap ``t``, or ``fill`` where the tap falls in the padding (``valid`` is empty when no window reaches
    it). Replaces an index build, ``index_select`` and ``index_fill_`` (three calls and two temporaries)."""
    n = positions.shape[0]
    k = table.shape[1]
    c = xrows.shape[1]
    check = valid.shape[0] > 0
    for i in range(n):
        p = positions[i]
        orow = out[i]
        for t in range(k):
            o = t * c
            if c >= 8:  # 0-based slices: the copy vectorises (~20 % faster at 58 channels; slower at 3)
                d = orow[o:o + c]
                if check and not valid[p, t]:
                    for ch in range(c):
                        d[ch] = fill
                else:
                    s = xrows[table[p, t]]
                    for ch in range(c):
                        d[ch] = s[ch]
            elif check and not valid[p, t]:
                for ch in range(c):
                    orow[o + ch] = fill
            else:
                r = table[p, t]
                for ch in range(c):
                    orow[o + ch] = xrows[r, ch]


@njit(cache=True, nogil=True)
def pool_rows(xrows, h: int, w: int, positions, wo: int, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int,
              dh: int, dw: int, is_max: bool, orows) -> None:
    """Max / average pooling of (H·W, C) rows at the flat output ``positions`` (output width ``wo``), written
    into ``orows``: padding counts as -inf for max and as zeros in the average (``count_include_pad``; the
    divisor is the whole window, as PyTorch uses when no padding is excluded). Fast mode's pooling row op:
    a gather-based executor pays ~1 ms for the tiles of NanoDet's stem pool, this pays per position."""
    c = xrows.shape[1]
    acc = np.empty(c, np.float32)
    for q in range(positions.shape[0]):
        o = positions[q]
        oy = o // wo
        ox = o - oy * wo
        if is_max:
            acc[:] = -np.inf
        else:
            acc[:] = 0.0
        for i in range(kh):
            y = oy * sh - pt + i * dh
            if y < 0 or y >= h:
                continue
            for j in range(kw):
                x = ox * sw - pl + j * dw
                if x < 0 or x >= w:
                    continue
                r = y * w + x
                if is_max:
                    for k in range(c):
                        v = xrows[r, k]
                        if v > acc[k]:
                            acc[k] = v
                else:
                    for k in range(c):
                        acc[k] += xrows[r, k]
        if is_max:
            orows[o, :] = acc
        else:
            orows[o, :] = acc / (kh * kw)


@njit(cache=True, nogil=True, inline="always")
def _block_at(i: int, S: int, size: int, block: int) -> int:
    """Motion block holding the centre of feature position ``i`` at stride ``S`` (clamped to the frame)."""
    return min(i * S + S // 2, size - 1) // block


@njit(cache=True, nogil=True)
def shift_map(dy, dx, valid, block: int, height: int, width: int, S: int, tol: int, notok, sy, sx) -> int:
    """Fast mode's per-shard displacement at a resolution of stride ``S``: each feature position takes its
    block's vector rounded to whole feature pixels (``sy``/``sx``, 0 where unusable); ``notok`` marks
    positions whose block is invalid, whose rounding error exceeds ``tol`` input px, or whose source
    leaves the map. Returns the number of positions that move. (~10 numpy passes per resolution before.)"""
    ho, wo = notok.shape
    moved = 0
    for i in range(ho):
        by = _block_at(i, S, height, block)
        for j in range(wo):
            bx = _block_at(j, S, width, block)
            vy = dy[by, bx]
            vx = dx[by, bx]
            qy = int(np.floor(abs(vy) / S + 0.5))
            qx = int(np.floor(abs(vx) / S + 0.5))
            if vy < 0:
                qy = -qy
            if vx < 0:
                qx = -qx
            ok = (valid[by, bx] and abs(vy - qy * S) <= tol and abs(vx - qx * S) <= tol
                  and 0 <= i + qy < ho and 0 <= j + qx < wo)
            notok[i, j] = not ok
            if ok:
                sy[i, j] = qy
                sx[i, j] = qx
                if qy != 0 or qx != 0:
                    moved += 1
            else:
                sy[i, j] = 0
                sx[i, j] = 0
    return moved


@njit(cache=True, nogil=True)
def shift_map_carry(dy, dx, valid, block: int, height: int, width: int, S: int, tol: float, ey0, ex0, fine_y,
                    fine_x, fs: int, notok, sy, sx, ey, ex) -> int:
    """:func:`shift_map` with carried sub-stride remainders. ``ey0``/``ex0`` hold, per position of the cache,
    how far (input px) its content sits from the position's true location; a position takes the cache
    position ``i + q`` that best cancels vector minus carried offset, and inherits the new offset
    ``S·q + e0[i + q] − v``. Positions whose offset would exceed ``tol`` px, whose block is invalid or whose
    source leaves the map are ``notok`` (recomputed): they restart from the offset of the finer resolution
    ``fine_*`` (stride ``fs``; the layer that recomputes them reads it), or 0 when ``fs`` is 0."""
    ho, wo = notok.shape
    hf, wf = fine_y.shape
    moved = 0
    for i in range(ho):
        by = _block_at(i, S, height, block)
        for j in range(wo):
            bx = _block_at(j, S, width, block)
            ok = valid[by, bx]
            qy = 0
            qx = 0
            oy = 0
            ox = 0
            if ok:
                vy = dy[by, bx]
                vx = dx[by, bx]
                # first guess from the vector and the offset carried at the rounded source; then the best of
                # the 3×3 sources around it by the offsets they actually carry (neighbours differ where some
                # positions were recomputed)
                gy = min(max(i + int(np.floor(vy / S + 0.5)), 0), ho - 1)
                gx = min(max(j + int(np.floor(vx / S + 0.5)), 0), wo - 1)
                cy = int(np.floor((vy - ey0[gy, gx]) / S + 0.5))
                cx = int(np.floor((vx - ex0[gy, gx]) / S + 0.5))
                best = -1
                for ay in range(cy - 1, cy + 2):
                    if not 0 <= i + ay < ho:
                        continue
                    for ax in range(cx - 1, cx + 2):
                        if not 0 <= j + ax < wo:
                            continue
                        ty = S * ay + ey0[i + ay, j + ax] - vy
                        tx = S * ax + ex0[i + ay, j + ax] - vx
                        m = max(abs(ty), abs(tx))
                        if best < 0 or m < best:
                            best, qy, qx, oy, ox = m, ay, ax, ty, tx
                ok = 0 <= best <= tol
            notok[i, j] = not ok
            if ok:
                sy[i, j] = qy
                sx[i, j] = qx
                ey[i, j] = oy
                ex[i, j] = ox
                if qy != 0 or qx != 0:
                    moved += 1
            else:
                sy[i, j] = 0
                sx[i, j] = 0
                if fs > 0:
                    fi = min(i * S // fs, hf - 1)
                    fj = min(j * S // fs, wf - 1)
                    ey[i, j] = fine_y[fi, fj]
                    ex[i, j] = fine_x[fi, fj]
                else:
                    ey[i, j] = 0
                    ex[i, j] = 0
    return moved


@njit(cache=True, nogil=True)
def take_rows(src, positions, out, col: int) -> None:
    """``out[q, col:col + C] = src[positions[q], :]`` — gathers rows of a (H·W, C) map (row-op inputs, or one
    input of a channel concat straight into its slot)."""
    c = src.shape[1]
    for q in range(positions.shape[0]):
        s = src[positions[q]]
        d = out[q, col:col + c]  # slices indexed from 0: no wrap-around test per element, the copy vectorises
        for k in range(c):
            d[k] = s[k]


@njit(cache=True, nogil=True)
def put_rows(src, positions, out) -> None:
    """``out[positions[q], :] = src[q, :]`` — the scatter half of a row op."""
    c = src.shape[1]
    for q in range(positions.shape[0]):
        r = positions[q]
        for k in range(c):
            out[r, k] = src[q, k]


@njit(cache=True, nogil=True)
def cat_rows(src, positions, out, col: int) -> None:
    """``out[positions[q], col:col + C] = src[positions[q], :]`` — one input of a channel concat, updated
    in place at the written positions only."""
    c = src.shape[1]
    for q in range(positions.shape[0]):
        r = positions[q]
        s = src[r]
        d = out[r, col:col + c]
        for k in range(c):
            d[k] = s[k]


@njit(cache=True, nogil=True)
def gather_shift(src, sy, sx, out) -> None:
    """``out[i·w + j, :] = src[(i + sy[i, j])·w + j + sx[i, j], :]`` for a (H·W, C) map of rows: a whole
    cache moved in one pass, without building index arrays (the torch route — non-zero rows, an index map,
    ``index_select`` — took ~3 ms for a 1×32×240×320 map against ~1.3 ms here). Raises on a source outside
    the map (the shift maps never produce one)."""
    h, w = sy.shape
    c = src.shape[1]
    for i in range(h):
        for j in range(w):
            si = i + sy[i, j]
            sj = j + sx[i, j]
            if si < 0 or si >= h or sj < 0 or sj >= w:
                raise IndexError("gather_shift: source outside the map")
            a = src[si * w + sj]
            d = out[i * w + j]
            for k in range(c):
                d[k] = a[k]


def warm() -> None:
    """Load the compiled kernels before the first timed frame."""
    b = np.zeros((4, 4), np.bool_)
    t = np.zeros((2, 2), np.bool_)
    window_any(b, 3, 3, 1, 1, 1, 1, 1, 1, np.zeros((0, 0), np.bool_), np.empty((4, 4), np.bool_), 2, 2, t)
    window_positions(b, 3, 3, 1, 1, 1, 1, 1, 1, b, np.empty((4, 4), np.bool_), 2, 2, t, np.empty(16, np.int64))
    r4 = np.zeros((1, 4), np.float32)
    finish_rows(r4, np.zeros(1, np.int64), r4.copy(), 0.0, np.zeros(1, np.float32), True, np.zeros(1, np.bool_),
                np.zeros(1, np.bool_), 2, 0.1)
    mask_tiles(b, 2, 2, t)
    img = np.zeros((16, 16, 3), np.float32)
    z = np.zeros((1, 1), np.int32)
    flat = img.reshape(16, 48)
    block_residual(flat, flat, 3, z, z.copy(), np.ones((1, 1), np.bool_), 16, 0.0, np.zeros((1, 1), np.bool_),
                   np.empty_like(flat), 0.0)
    block_residual_inplace(flat, flat.copy(), 3, z, z.copy(), np.ones((1, 1), np.bool_), 16, 0.0,
                           np.zeros((1, 1), np.bool_), np.empty(flat.size, np.float32), 0.0)
    o = np.empty((8, 8), np.int32)
    block_reuse(np.zeros((1, 1), np.bool_), z, z, 16, 16, 16, 2, 1, 1, 1, 1, np.empty((8, 8), np.bool_), o, o.copy())
    f = np.zeros((2, 2, 4), np.float32)
    z2 = np.zeros((2, 2), np.int32)
    changed_dense(f, f, z2, z2, 0.0, np.empty((2, 2), np.bool_))
    a2 = np.zeros((2, 2), np.float32)
    changed_dense_acc(f, f, z2, z2, 0.0, a2, a2.copy(), np.empty((2, 2), np.bool_))
    accumulate_rows(np.zeros(1, np.int64), np.zeros(1, np.float32), 0.0, np.zeros(4, np.float32),
                    np.zeros(4, np.bool_))
    r = np.zeros((2, 4), np.float32)
    write_rows(r, np.zeros(2, np.int64), r.copy(), np.empty(2, np.float32))
    im2col_rows(r, np.zeros((1, 2), np.int64), np.zeros((0, 0), np.bool_), np.zeros(1, np.int64), 0.0,
                np.empty((1, 8), np.float32))
    z1 = np.zeros((1, 1), np.int32)
    shift_map(z1, z1, np.ones((1, 1), np.bool_), 16, 16, 16, 2, 0, np.empty((8, 8), np.bool_),
              np.empty((8, 8), np.int32), np.empty((8, 8), np.int32))
    e8 = np.zeros((8, 8), np.int32)
    shift_map_carry(z1, z1, np.ones((1, 1), np.bool_), 16, 16, 16, 2, 0.0, e8, e8, e8, e8, 1,
                    np.empty((8, 8), np.bool_), e8.copy(), e8.copy(), e8.copy(), e8.copy())
    pos = np.zeros(1, np.int64)
    take_rows(r, pos, r.copy(), 0)
    z12 = np.zeros((1, 2), np.int32)
    gather_shift(r, z12, z12, r.copy())
    gather_shift(a2.reshape(4, 1), z2, z2, np.empty((4, 1), np.float32))
    put_rows(r, pos, r.copy())
    cat_rows(r, pos, r.copy(), 0)
    pool_rows(np.zeros((4, 4), np.float32), 2, 2, np.zeros(1, np.int64), 2, 3, 3, 1, 1, 1, 1, 1, 1, True,
              np.zeros((4, 4), np.float32))


@njit(cache=True, nogil=True)
def _accept(oy: int, ox: int, dy: int, dx: int, S: int, E: int, wy0: int, wy1: int, wx0: int, wx1: int,
            height: int, width: int, ok, sy, sx) -> None:
    """RFAP conditions 2 and 4 for a window that carries one displacement and no residual: ``d`` divisible
    by ``E``, padding touched alike (per axis ``d`` = 0 or the window inside the image at both ends), source
    inside the map; then mark the position reusable with its shift in output pixels."""
    ho, wo = ok.shape
    if dy % E != 0 or dx % E != 0:
        return
    if dy != 0 and not (wy0 >= 0 and wy1 <= height and wy0 + dy >= 0 and wy1 + dy <= height):
        return
    if dx != 0 and not (wx0 >= 0 and wx1 <= width and wx0 + dx >= 0 and wx1 + dx <= width):
        return
    ty = oy + dy // S
    tx = ox + dx // S
    if ty < 0 or ty >= ho or tx < 0 or tx >= wo:
        return
    ok[oy, ox] = True
    sy[oy, ox] = dy // S
    sx[oy, ox] = dx // S


@njit(cache=True, nogil=True)
def _spans(n_out: int, S: int, lo: int, hi: int, n: int, block: int):
    """Per output index along one axis: the window [w0, w1) in input pixels, its part inside the image
    [c0, c1) and the blocks it touches [b0, b1). Hoisted out of the per-position loops (integer divisions by
    run-time values dominated them)."""
    w0 = np.empty(n_out, np.int64)
    w1 = np.empty(n_out, np.int64)
    c0 = np.empty(n_out, np.int64)
    c1 = np.empty(n_out, np.int64)
    b0 = np.empty(n_out, np.int64)
    b1 = np.empty(n_out, np.int64)
    for o in range(n_out):
        w0[o] = o * S - lo
        w1[o] = o * S + hi + 1
        c0[o] = min(max(w0[o], 0), n)
        c1[o] = min(max(w1[o], 0), n)
        b0[o] = c0[o] // block
        b1[o] = max(c1[o] - 1, c0[o]) // block + 1
    return w0, w1, c0, c1, b0, b1


@njit(cache=True, nogil=True)
def strict_reuse(i_res, i_blk, block: int, height: int, width: int, S: int, E: int, lo_y: int, hi_y: int,
                 lo_x: int, hi_x: int, ok, sy, sx) -> None:
    """Strict RFAP test for every output position (see ``engine/rfap.py``): O(1) per position from the
    residual integral image (pixels) and the block-grid integrals of 1, dy, dy², dx, dx² (zero variance ⇔ one
    displacement, exact in int64)."""
    ho, wo = ok.shape
    ok[:] = False
    sy[:] = 0
    sx[:] = 0
    wy0, wy1, cy0, cy1, by0, by1 = _spans(ho, S, lo_y, hi_y, height, block)
    wx0, wx1, cx0, cx1, bx0, bx1 = _spans(wo, S, lo_x, hi_x, width, block)
    for oy in range(ho):
        y0, y1, k0, k1 = cy0[oy], cy1[oy], by0[oy], by1[oy]
        if y1 <= y0:
            continue
        for ox in range(wo):
            x0, x1, l0, l1 = cx0[ox], cx1[ox], bx0[ox], bx1[ox]
            if x1 <= x0:
                continue
            if i_res[y1, x1] - i_res[y0, x1] - i_res[y1, x0] + i_res[y0, x0] != 0:
                continue
            n = i_blk[0, k1, l1] - i_blk[0, k0, l1] - i_blk[0, k1, l0] + i_blk[0, k0, l0]
            s1 = i_blk[1, k1, l1] - i_blk[1, k0, l1] - i_blk[1, k1, l0] + i_blk[1, k0, l0]
            s2 = i_blk[2, k1, l1] - i_blk[2, k0, l1] - i_blk[2, k1, l0] + i_blk[2, k0, l0]
            t1 = i_blk[3, k1, l1] - i_blk[3, k0, l1] - i_blk[3, k1, l0] + i_blk[3, k0, l0]
            t2 = i_blk[4, k1, l1] - i_blk[4, k0, l1] - i_blk[4, k1, l0] + i_blk[4, k0, l0]
            if n <= 0 or s2 * n != s1 * s1 or t2 * n != t1 * t1:
                continue
            _accept(oy, ox, s1 // n, t1 // n, S, E, wy0[oy], wy1[oy], wx0[ox], wx1[ox], height, width, ok, sy, sx)


@njit(cache=True, nogil=True)
def block_reuse(bad, dy, dx, block: int, height: int, width: int, S: int, lo_y: int, hi_y: int, lo_x: int,
                hi_x: int, ok, sy, sx) -> None:
    """Strict RFAP when the residual set is whole blocks (fast mode): the test of :func:`strict_reuse` with
    equivariance stride ``S``, reading the (at most a few) blocks a window touches directly instead of
    integral images — nothing to build per frame. ``bad`` marks residual or invalid blocks.

    Everything that depends on one block (usable, displacement divisible by ``S``, shift in output pixels)
    is computed once per block, and everything that depends on one axis (window inside the image) once per
    row / column, so a position costs a few block reads (was ~50 ns per position with per-position integer
    divisions)."""
    ho, wo = ok.shape
    ok[:] = False
    sy[:] = 0
    sx[:] = 0
    hb, wb = bad.shape
    wy0, wy1, cy0, cy1, by0, by1 = _spans(ho, S, lo_y, hi_y, height, block)
    wx0, wx1, cx0, cx1, bx0, bx1 = _spans(wo, S, lo_x, hi_x, width, block)
    # per block: usable (not bad, displacement a multiple of S) and its shift in output pixels
    use = np.empty((hb, wb), np.bool_)
    qy = np.empty((hb, wb), np.int64)
    qx = np.empty((hb, wb), np.int64)
    for i in range(hb):
        for j in range(wb):
            a = dy[i, j]
            b = dx[i, j]
            use[i, j] = not bad[i, j] and a % S == 0 and b % S == 0
            qy[i, j] = a // S
            qx[i, j] = b // S
    # per axis: the window lies inside the image (a non-zero displacement must keep padding untouched)
    iny = np.empty(ho, np.bool_)
    inx = np.empty(wo, np.bool_)
    for o in range(ho):
        iny[o] = wy0[o] >= 0 and wy1[o] <= height
    for o in range(wo):
        inx[o] = wx0[o] >= 0 and wx1[o] <= width
    # horizontal pass, per block row and output column: the blocks the window spans along x are all usable
    # and carry one vector (whose block index along x is kept); the vertical pass then only compares the
    # block rows a window spans. ~5 ns per position instead of ~22 with the nested block loops.
    hu = np.zeros((hb, wo), np.bool_)
    for i in range(hb):
        for ox in range(wo):
            if cx1[ox] <= cx0[ox]:
                continue
            l0, l1 = bx0[ox], bx1[ox]
            if not use[i, l0]:
                continue
            d0 = dy[i, l0]
            e0 = dx[i, l0]
            same = True
            for j in range(l0 + 1, l1):
                if not use[i, j] or dy[i, j] != d0 or dx[i, j] != e0:
                    same = False
            hu[i, ox] = same
    for oy in range(ho):
        if cy1[oy] <= cy0[oy]:
            continue
        k0, k1 = by0[oy], by1[oy]
        ypad = iny[oy]
        ylo = wy0[oy]
        yhi = wy1[oy]
        huk = hu[k0]
        for ox in range(wo):
            if not huk[ox]:
                continue
            l0 = bx0[ox]
            d0 = dy[k0, l0]
            e0 = dx[k0, l0]
            same = True
            for i in range(k0 + 1, k1):
                if not hu[i, ox] or dy[i, l0] != d0 or dx[i, l0] != e0:
                    same = False
            if not same:
                continue
            if d0 != 0 and not (ypad and ylo + d0 >= 0 and yhi + d0 <= height):
                continue
            if e0 != 0 and not (inx[ox] and wx0[ox] + e0 >= 0 and wx1[ox] + e0 <= width):
                continue
            ty = oy + qy[k0, l0]
            tx = ox + qx[k0, l0]
            if ty < 0 or ty >= ho or tx < 0 or tx >= wo:
                continue
            ok[oy, ox] = True
            sy[oy, ox] = qy[k0, l0]
            sx[oy, ox] = qx[k0, l0]
