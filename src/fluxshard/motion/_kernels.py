"""Compiled (numba) per-frame kernels of the motion front-end.

Why numba: the front-end must cost a small fraction of decoding (≈1–2 ms per frame at 640×360), and the
work — rasterising ~1k vectors, a per-block majority vote, a few sampled-pixel checks per block — is a set
of short loops that NumPy can only express as dozens of array passes. Compiled once per machine and
cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fluxshard.video.sidedata import mv_rows

CELL = 4


@njit(cache=True, nogil=True, inline="always")
def _round_half_away(v: float) -> int:
    if v >= 0:
        return int(np.floor(v + 0.5))
    return -int(np.floor(-v + 0.5))


def _sad_grid(rows: int, width: int, pos: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """An intrinsic summing |cur − prev| over a grid of byte samples in one vector pass: ``rows`` sample rows,
    in each the bytes at offsets ``pos`` of a ``width``-byte load (``rows · len(pos)`` a multiple of 16). It
    takes each plane's address of the first sample row's load and the byte distance between sample rows.
    Compiled code only; the caller guarantees every byte loaded lies inside the planes. Sums of 16 samples
    at a time (≤ 16·255, exact in 16 bits) map to the CPU's sum-of-absolute-differences instruction."""
    n = len(pos)

    @intrinsic
    def sad(typingctx, cur, cur_row, prev, prev_row):  # type: ignore[no-untyped-def]
        sig = types.int64(types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            i32, i64 = ir.IntType(32), ir.IntType(64)
            row_t = ir.VectorType(ir.IntType(8), width)
            v16 = ir.VectorType(ir.IntType(16), 16)

            def chunks(addr, row):  # type: ignore[no-untyped-def]
                """The samples, 16 per vector."""
                vs = []
                for a in range(rows):
                    r = builder.load(builder.inttoptr(builder.add(addr, builder.mul(row, ir.Constant(i64, a))),
                                                      row_t.as_pointer()), align=1)
                    vs.append(builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(i32, n), list(pos))))
                size = n
                while size < 16:  # concatenate neighbours
                    cat = ir.Constant(ir.VectorType(i32, 2 * size), list(range(2 * size)))
                    vs = [builder.shuffle_vector(vs[k], vs[k + 1], cat) for k in range(0, len(vs), 2)]
                    size *= 2
                return [builder.zext(v, v16) for v in vs]

            add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(16), [v16]),
                                                 "llvm.vector.reduce.add.v16i16")
            zero = ir.Constant(v16, [0] * 16)
            acc = ir.Constant(i64, 0)
            for c, p in zip(chunks(args[0], args[1]), chunks(args[2], args[3]), strict=True):
                d = builder.sub(c, p)
                absd = builder.select(builder.icmp_signed("<", d, zero), builder.sub(zero, d), d)
                acc = builder.add(acc, builder.zext(builder.call(add, [absd]), i64))
            return acc

        return sig, codegen

    return sad


# The codec field's 4×4 sample grids (step = block / 4, first sample at step / 2) and block matching's
# 16×16 blocks, full (step 1) or on every other pixel (step 2).
_sad16 = _sad_grid(4, 16, (2, 6, 10, 14))
_sad8 = _sad_grid(4, 8, (1, 3, 5, 7))
_sad_full16 = _sad_grid(16, 16, tuple(range(16)))
_sad_half16 = _sad_grid(8, 16, tuple(range(0, 16, 2)))


@intrinsic
def _prefetch(typingctx, addr):  # type: ignore[no-untyped-def]
    """A hint to fetch the cache line at address ``addr`` (no effect on results; never faults)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _byte_plane(img):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_byte_plane)
def _byte_plane_impl(img):
    """True for a uint8 plane whose pixels are contiguous within a row (the vector paths' input)."""
    if img.dtype == types.uint8:
        return lambda img: img.strides[1] == 1
    return lambda img: False


@njit(cache=True, nogil=True, inline="always")
def _sampled_mad(cur, prev, y0, x0, block, height, width, dy, dx, beat=np.inf, margin=0.0, cap=np.inf) -> float:
    """Mean |Δluma| over a 4×4 grid of samples of one block, every sample clamped to the frame.

    Samples sit at ``o + k·step`` (step = block / 4, o = step / 2) in both directions. Blocks of 8 or 16
    pixels of byte planes whose samples all lie inside the frame, unclamped (nearly all of them), take a
    vector path: the 16 samples of each plane in one gather and one sum of absolute differences
    (``_sad_grid``, a few instructions, no branches). The others take the scalar path below: branch-free
    clamps, inlined into the callers (measured: a separate edge loop was ~2× slower per block, and a
    fallback *call* taking the planes makes numba keep reference counts alive across the caller).

    Partial distortion elimination (scalar path): after each sample row, the evaluation stops (returning the
    partial mean, already a lower bound that decides the comparison) once the candidate can no longer be
    chosen — its mean plus ``margin`` reaches ``beat`` (the cost it must beat), or its mean exceeds ``cap``
    (a limit above which no caller accepts it). Exact: the tests are the callers' own comparisons on a lower
    bound. The vector path always returns the full mean, which decides every caller's comparisons the same
    way (each caller only uses a returned value above ``cap`` or not below ``beat − margin`` to reject it).
    """
    step = block >> 2
    o = step >> 1
    w1 = width - 1
    h1 = height - 1
    if (_byte_plane(cur) and _byte_plane(prev)
            and (block == 16 or block == 8) and y0 + o + 3 * step <= h1 and x0 + block <= width
            and y0 + o + dy >= 0 and y0 + o + 3 * step + dy <= h1 and x0 + dx >= 0 and x0 + dx + block <= width):
        cs = cur.strides[0]
        ps = prev.strides[0]
        ca = np.int64(cur.ctypes.data) + (y0 + o) * cs + x0
        pa = np.int64(prev.ctypes.data) + (y0 + o + dy) * ps + x0 + dx
        if block == 16:
            return _sad16(ca, step * cs, pa, step * ps) / 16.0
        return _sad8(ca, step * cs, pa, step * ps) / 16.0
    xa = min(x0 + o, w1)
    xb = min(x0 + o + step, w1)
    xc = min(x0 + o + 2 * step, w1)
    xd = min(x0 + o + 3 * step, w1)
    ra = min(max(xa + dx, 0), w1)
    rb = min(max(xb + dx, 0), w1)
    rc = min(max(xc + dx, 0), w1)
    rd = min(max(xd + dx, 0), w1)
    acc = 0
    for a in range(4):
        y = min(y0 + o + a * step, h1)
        ry = min(max(y + dy, 0), h1)
        acc += (abs(np.int32(cur[y, xa]) - np.int32(prev[ry, ra])) + abs(np.int32(cur[y, xb]) - np.int32(prev[ry, rb]))
                + abs(np.int32(cur[y, xc]) - np.int32(prev[ry, rc]))
                + abs(np.int32(cur[y, xd]) - np.int32(prev[ry, rd])))
        m = acc / 16.0
        if m + margin >= beat or m > cap:
            return m
    return acc / 16.0


VALID = 1
COVERED = 2
FILLED = 4
#: Empty cell of the rasteriser's key grid (a NaN bit pattern: no vector can produce it).
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)


#: Side-data records ahead of the one being read whose cache line is requested early (the decoder wrote them
#: on another core: more lines in flight than the hardware prefetcher's short ramp on a ~40 KB stream gives).
PREFETCH_ROWS = 32

#: Leading entries of a :func:`codec_field_at` state array holding the float64 parameters (bit patterns).
STATE_PARAMS = 16


@njit(cache=True, nogil=True)
def codec_field_at(frame_obj, get_fn, prior, state, cur, prev, out, flags, slot) -> int:
    """:func:`codec_field` on the vectors of the PyAV frame object ``frame_obj`` (its ``id``), read in place
    from the decoder's side data (``fluxshard.video.sidedata``); returns −1 when the frame has none.

    The per-frame call of a stream, with few array arguments (each costs numba's dispatcher an unboxing, and
    after a decode the dispatcher runs with cold caches): ``state`` (uint64) holds the parameters' float64 bit
    patterns in its first :data:`STATE_PARAMS` entries (the prior span is passed apart and written there) and
    the cell grid after them; the results go to ``out[slot]`` and ``flags[slot]`` (stacks of per-frame
    arrays, handed out to fields one slot at a time)."""
    params = state[:STATE_PARAMS].view(np.float64)
    params[11] = prior
    rows = mv_rows(frame_obj, get_fn)
    if rows.shape[0] == 0:
        return -1
    return codec_field(rows, params, cur, prev, out[slot], flags[slot], state[STATE_PARAMS:])


@njit(cache=True, nogil=True)
def codec_field(rows, params, cur, prev, out, flags, keys) -> int:
    """Rasterise, pool, resolve the reference span, verify and (optionally) fill one frame's vectors.

    ``rows`` is the side data's AVMotionVector records as an ``int32`` (n, 10) array (40-byte records: int32
    source; uint8 w, h; int16 src_x, src_y, dst_x, dst_y; uint64 flags; int32 motion_x, motion_y; uint16
    motion_scale), read in place. ``params`` packs height, width,
    block, check_all, verify, max_span, tau, margin, good, fill, fill_tau, prior (few arguments keep numba's
    dispatch cheap). Results go to ``out`` (int32, 3 × Hb × Wb: dy, dx, flags with VALID | COVERED |
    FILLED bits) and the bool maps ``flags[0]`` (valid) / ``flags[1]`` (filled). ``keys`` (uint64, flat, at
    least Hc × Wc for 4-px cells) is scratch for the cell grid, row-major with the row length of the cell size
    in use (contiguous, so an 8-px grid touches a quarter of the memory); its float32 view holds, per cell, the
    float32 pair (vx, vy) of the last past vector drawn on it, so one 64-bit compare tests two vectors for
    equality (float32 bit equality is value equality here: no NaN, no −0) and an all-ones key marks an empty
    cell. Returning arrays from numba costs ~7 µs each, more than most of the work. Cells are 8 px when no
    partition is smaller (H.264 exports 8×8 at least), 4 px otherwise. Returns the number of covered blocks.
    See ``codec.py`` for the rules.
    """
    valid = flags[0]
    filled = flags[1]
    kf = keys.view(np.float32)
    b8 = rows.view(np.uint8)  # per-byte view for the uint8 w, h fields (any byte order)
    b16 = rows.view(np.int16)
    height = int(params[0])
    width = int(params[1])
    block = int(params[2])
    shift = 3 if block % 8 == 0 else 2
    nmv = rows.shape[0]
    rbase = np.int64(rows.ctypes.data)
    rstride = np.int64(rows.strides[0])
    if shift == 3:
        for r in range(nmv):
            _prefetch(rbase + (r + PREFETCH_ROWS) * rstride)
            if b8[r, 4] < 8 or b8[r, 5] < 8:
                shift = 2
                break
    cell = 1 << shift
    hc = (height + cell - 1) >> shift
    wc = (width + cell - 1) >> shift
    check_all = params[3] != 0  # verify unambiguous vectors too
    verify = params[4] != 0
    max_span = int(params[5])
    tau = params[6]
    margin = params[7]
    good = params[8]
    fill = params[9] != 0
    fill_tau = params[10]
    prior = max(int(params[11]), 1)
    for cy in range(hc):
        for cx in range(wc):
            keys[cy * wc + cx] = EMPTY
    last_sc = -1
    s = 1.0
    inv = 1.0  # 1 / s when s is a power of two (then x * inv == x / s exactly), else 0
    for r in range(nmv):
        _prefetch(rbase + (r + PREFETCH_ROWS) * rstride)
        if rows[r, 0] >= 0:  # source: future reference
            continue
        sc = np.int32(np.uint16(b16[r, 16]))  # motion_scale (4 for H.264 throughout: divisions only once)
        if sc != last_sc:
            last_sc = sc
            s = float(sc) if sc != 0 else 1.0
            inv = 1.0 / s if (sc & (sc - 1)) == 0 else 0.0
        if inv != 0.0:
            vx = np.float32(float(rows[r, 6]) * inv)
            vy = np.float32(float(rows[r, 7]) * inv)
        else:
            vx = np.float32(float(rows[r, 6]) / s)
            vy = np.float32(float(rows[r, 7]) / s)
        w = np.int32(b8[r, 4])
        h = np.int32(b8[r, 5])
        cx0 = (np.int32(b16[r, 5]) - (w >> 1)) >> shift  # dst_x; arithmetic shift: floor division by the cell
        cy0 = (np.int32(b16[r, 6]) - (h >> 1)) >> shift  # dst_y
        cy1 = min(cy0 + max(h >> shift, 1), hc)
        cx1 = min(cx0 + max(w >> shift, 1), wc)
        for cy in range(max(cy0, 0), cy1):
            for cx in range(max(cx0, 0), cx1):
                kf[2 * (cy * wc + cx)] = vx
                kf[2 * (cy * wc + cx) + 1] = vy

    hb = out.shape[1]
    wb = out.shape[2]
    k = block >> shift
    ks = np.empty(k * k, np.uint64)
    pos = np.empty(k * k, np.int64)
    n_covered = 0
    for i in range(hb):
        y0 = i * block
        ka = min(k, hc - i * k)
        for j in range(wb):
            x0 = j * block
            out[0, i, j] = 0
            out[1, i, j] = 0
            out[2, i, j] = 0
            valid[i, j] = False
            filled[i, j] = False
            # --- pool the block's cells: majority vector, covered, coherent
            kb = min(k, wc - j * k)
            if ka == 2 and kb == 2:  # 8-px cells in a 16-px block (H.264 at b = 16): four keys, unrolled
                cy = i * 2
                cx = j * 2
                c00 = cy * wc + cx
                k00 = keys[c00]
                k01 = keys[c00 + 1]
                k10 = keys[c00 + wc]
                k11 = keys[c00 + wc + 1]
                if k00 == EMPTY or k01 == EMPTY or k10 == EMPTY or k11 == EMPTY:
                    continue
                out[2, i, j] = COVERED
                n_covered += 1
                if not (k00 == k01 and k00 == k10 and k00 == k11):
                    # majority vote, first of the most frequent in raster order; fewer than 2 of 4 → incoherent
                    c0 = 1 + (k01 == k00) + (k10 == k00) + (k11 == k00)
                    c1 = 1 + (k00 == k01) + (k10 == k01) + (k11 == k01)
                    c2 = 1 + (k00 == k10) + (k01 == k10) + (k11 == k10)
                    c3 = 1 + (k00 == k11) + (k01 == k11) + (k10 == k11)
                    best_c = c0
                    if c1 > best_c:
                        best_c = c1
                        cx += 1
                    if c2 > best_c:
                        best_c = c2
                        cy = i * 2 + 1
                        cx = j * 2
                    if c3 > best_c:
                        best_c = c3
                        cy = i * 2 + 1
                        cx = j * 2 + 1
                    if 2 * best_c < 4:
                        continue
                fy = kf[2 * (cy * wc + cx) + 1]
                fx = kf[2 * (cy * wc + cx)]
            else:
                n = 0
                cov = True
                for a in range(ka):
                    cy = i * k + a
                    for b in range(kb):
                        cx = j * k + b
                        key = keys[cy * wc + cx]
                        if key == EMPTY:
                            cov = False
                            break
                        ks[n] = key
                        pos[n] = cy * wc + cx
                        n += 1
                    if not cov:
                        break
                if not cov or n == 0:
                    continue
                out[2, i, j] = COVERED
                n_covered += 1
                best = 0
                best_c = n
                k0 = ks[0]
                for p in range(1, n):
                    if ks[p] != k0:
                        best_c = 0
                        break
                if best_c == 0:  # partitions disagree: majority vote
                    for p in range(n):
                        c = 0
                        for q in range(n):
                            if ks[p] == ks[q]:
                                c += 1
                        if c > best_c:
                            best_c = c
                            best = p
                    if 2 * best_c < n:
                        continue  # incoherent
                fy = kf[2 * pos[best] + 1]
                fx = kf[2 * pos[best]]
            if prior == 1:
                by = _round_half_away(np.float64(fy))
                bx = _round_half_away(np.float64(fx))
            else:  # without verification the expected span is taken as exact
                by = _round_half_away(fy / prior)
                bx = _round_half_away(fx / prior)
            ambiguous = verify
            if verify and not check_all:
                # A vector every span rounds to the same displacement (|v| small) needs no span resolution:
                # trusted as it is, like the single-reference codecs' vectors (no sampled check).
                # round(v / k) is monotone in k: all spans 1..max_span agree iff the two ends do.
                ambiguous = (_round_half_away(np.float64(fy)) != by or _round_half_away(np.float64(fx)) != bx
                             or _round_half_away(fy / max_span) != by or _round_half_away(fx / max_span) != bx)
            if ambiguous:
                # Candidates in order: the frame's expected span (distance to the previous anchor in display
                # order), then one frame, then the other spans. The first is the baseline; a later one must
                # beat it by ``margin``; stop as soon as the best explains the block (``good``).
                best_cost = _sampled_mad(cur, prev, y0, x0, block, height, width, by, bx)
                if best_cost > good:
                    for span in range(1, max_span + 1):
                        if span == prior:
                            continue
                        cy = _round_half_away(fy / span)
                        cx = _round_half_away(fx / span)
                        if cy == by and cx == bx:
                            continue
                        c = _sampled_mad(cur, prev, y0, x0, block, height, width, cy, cx, best_cost, margin)
                        if c + margin < best_cost:
                            best_cost = c
                            by = cy
                            bx = cx
                        if best_cost <= good:
                            break
                if best_cost > tau:
                    continue
            out[0, i, j] = by
            out[1, i, j] = bx
            out[2, i, j] = COVERED | VALID
            valid[i, j] = True

    if fill:
        # A fill candidate is only accepted at mean ≤ fill_tau, and only the early exit looks at costs up to
        # ``good``: above both, a candidate's exact cost changes nothing (the minimum is then rejected anyway).
        cap = max(fill_tau, good)
        for i in range(hb):
            y0 = i * block
            for j in range(wb):
                if out[2, i, j] & VALID:
                    continue
                x0 = j * block
                # MV-guided candidates: zero motion and the (originally) valid 4-neighbours' vectors.
                best_cost = _sampled_mad(cur, prev, y0, x0, block, height, width, 0, 0, np.inf, 0.0, cap)
                by = 0
                bx = 0
                n_tried = 0  # neighbours' vectors tried so far (a repeated candidate cannot win: skipped)
                t0y = t0x = t1y = t1x = t2y = t2x = 0
                for nb in range(4):  # up, down, left, right
                    if best_cost <= good:
                        break
                    ni = i - 1 if nb == 0 else (i + 1 if nb == 1 else i)
                    nj = j - 1 if nb == 2 else (j + 1 if nb == 3 else j)
                    if ni < 0 or nj < 0 or ni >= hb or nj >= wb or out[2, ni, nj] & (VALID | FILLED) != VALID:
                        continue
                    ny = out[0, ni, nj]
                    nx = out[1, ni, nj]
                    if ((ny == 0 and nx == 0) or (n_tried > 0 and ny == t0y and nx == t0x)
                            or (n_tried > 1 and ny == t1y and nx == t1x) or (n_tried > 2 and ny == t2y and nx == t2x)):
                        continue
                    if n_tried == 0:
                        t0y = ny
                        t0x = nx
                    elif n_tried == 1:
                        t1y = ny
                        t1x = nx
                    else:
                        t2y = ny
                        t2x = nx
                    n_tried += 1
                    c = _sampled_mad(cur, prev, y0, x0, block, height, width, ny, nx, best_cost, 0.0, cap)
                    if c < best_cost:
                        best_cost = c
                        by = ny
                        bx = nx
                if best_cost <= fill_tau:
                    # VALID | FILLED at once: neighbours test for VALID without FILLED, so a filled block never
                    # serves as a candidate (only originally valid vectors do)
                    out[0, i, j] = by
                    out[1, i, j] = bx
                    out[2, i, j] |= FILLED | VALID
                    filled[i, j] = True
                    valid[i, j] = True
    return n_covered


@njit(cache=True, nogil=True)
def _histogram32(img, out) -> None:
    # Four interleaved sub-histograms: neighbouring pixels usually fall into the same bin, and one counter
    # per bin would serialise the increments through memory.
    sub = np.zeros((4, 32), np.int64)
    w = img.shape[1]
    for y in range(0, img.shape[0], 2):
        x = 0
        while x + 6 < w:
            sub[0, img[y, x] >> 3] += 1
            sub[1, img[y, x + 2] >> 3] += 1
            sub[2, img[y, x + 4] >> 3] += 1
            sub[3, img[y, x + 6] >> 3] += 1
            x += 8
        while x < w:
            sub[0, img[y, x] >> 3] += 1
            x += 2
    for k in range(32):
        out[k] = sub[0, k] + sub[1, k] + sub[2, k] + sub[3, k]


@njit(cache=True, nogil=True)
def luma_histograms(a, b, ha, hb) -> None:
    """32-bin histograms (``v >> 3``) of every other pixel of every other row of ``a`` and ``b``, into the
    int64 arrays ``ha`` / ``hb`` (the scene-cut test of I-frames)."""
    _histogram32(a, ha)
    _histogram32(b, hb)


def _sad_zero(img):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_sad_zero)
def _sad_zero_impl(img):
    """The accumulator's zero: integer for integer images (exact, 1-cycle adds), float64 otherwise."""
    if isinstance(img.dtype, types.Integer):
        return lambda img: np.int64(0)
    return lambda img: 0.0


#: "No candidate yet" for integer sums (far above any real sum, and exact in float64).
_INT_NONE = 1 << 62


def _sad_none(img):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_sad_none)
def _sad_none_impl(img):
    """Initial best sum (no candidate yet), in the accumulator's type."""
    if isinstance(img.dtype, types.Integer):
        return lambda img: np.int64(_INT_NONE)
    return lambda img: np.inf


def _row_zero(img):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_row_zero)
def _row_zero_impl(img):
    """A row accumulator's zero: int32 for integer images (a row of ≤ 16 |Δ| ≤ 255 cannot overflow, and
    narrow lanes vectorise better), float64 otherwise."""
    if isinstance(img.dtype, types.Integer):
        return lambda img: np.int32(0)
    return lambda img: 0.0


def _absdiff(a, b):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_absdiff)
def _absdiff_impl(a, b):
    """|a − b| without wrap-around: in int32 for integer pixels, float32 for the pyramid levels."""
    if isinstance(a, types.Integer):
        return lambda a, b: abs(np.int32(a) - np.int32(b))
    return lambda a, b: abs(np.float32(a) - np.float32(b))


@njit(cache=True, nogil=True, inline="always")
def _block_sad(cur, ref, y0, x0, bh, bw, dy, dx, step, limit):
    """Sum of |Δ| over the sampled pixels of a block displaced by (dy, dx); stops after the first sample row
    that reaches ``limit`` (the candidate can no longer win, the partial sum is returned). Integer sums for
    uint8 planes, float64 for the float pyramid: both exact (see :func:`match_level`)."""
    acc = _sad_zero(cur)
    for y in range(y0, y0 + bh, step):
        for x in range(x0, x0 + bw, step):  # 2-D indexing: row views would be reference-counted objects
            acc += _absdiff(cur[y, x], ref[y + dy, x + dx])
        if acc >= limit:
            break
    return acc


@njit(cache=True, nogil=True, inline="always")
def _grid_sad(cur, ref, y0, x0, dy, dx, limit, n, step):
    """:func:`_block_sad` for a full block sampled on an ``n`` × ``n`` grid: inlined with literal ``n`` and
    ``step``, so the compiler unrolls/vectorises the fixed-length rows (measured ~2-3× faster)."""
    acc = _sad_zero(cur)
    for a in range(n):
        y = y0 + a * step
        row = _row_zero(cur)
        for b in range(n):
            x = x0 + b * step
            row += _absdiff(cur[y, x], ref[y + dy, x + dx])
        acc += row
        if acc >= limit:
            break
    return acc


@njit(cache=True, nogil=True)
def match_level(cur, ref, block, pred_dy, pred_dx, radius: int, try_zero: bool, step: int, out_dy, out_dx,
                out_cost, good: float = 0.0) -> None:
    """One level of hierarchical block matching: for every block, search ``pred ± radius`` (and the zero
    vector when asked) for the least mean absolute difference; candidates whose displaced block leaves the
    frame are skipped. The prediction is evaluated first and a candidate must be strictly better to win, so
    ties keep the prediction (then zero). Blocks with no admissible candidate get cost +inf. ``step`` > 1
    evaluates the cost on every step-th pixel in each direction. With ``good`` > 0 the search of a block stops
    as soon as a candidate's mean cost is ≤ ``good`` (early exit: that candidate explains the block)."""
    height, width = cur.shape
    hb, wb = out_dy.shape
    side = 2 * radius + 1
    vector = _byte_plane(cur) and _byte_plane(ref)
    ky0 = (side * side // 2) // side
    kx0 = (side * side // 2) % side
    cbase = np.int64(cur.ctypes.data)
    rbase = np.int64(ref.ctypes.data)
    cstride = np.int64(cur.strides[0])
    rstride = np.int64(ref.strides[0])
    for i in range(hb):
        y0 = i * block
        bh = min(block, height - y0)
        for j in range(wb):
            x0 = j * block
            bw = min(block, width - x0)
            py = pred_dy[i, j]
            px = pred_dx[i, j]
            # Costs are compared as sums over the same samples (the mean's divisor is common to all candidates,
            # and the sums are exact: uint8 luma or pyramid levels in multiples of 1/16), which lets a
            # candidate stop as soon as its partial sum reaches the best (partial distortion elimination):
            # same winner, same cost as evaluating every candidate in full.
            n_samples = ((bh + step - 1) // step) * ((bw + step - 1) // step)
            good_sum = good * n_samples
            best_sad = _sad_none(cur)
            by = 0
            bx = 0
            # spiral-free order: the prediction first (the square's centre cell k0), then the square's other
            # cells in raster order from k0 + 1 round to k0 − 1; (ky, kx) = divmod(k, side), stepped
            # incrementally (no integer divisions per candidate)
            ky = ky0
            kx = kx0
            for n in range(-1 if try_zero else 0, side * side):
                if n < 0:
                    cy = 0
                    cx = 0
                else:
                    cy = py + ky - radius
                    cx = px + kx - radius
                    kx += 1
                    if kx == side:
                        kx = 0
                        ky = ky + 1 if ky + 1 < side else 0
                    if try_zero and cy == 0 and cx == 0:
                        continue  # already evaluated first; an equal cost never wins
                if y0 + cy < 0 or x0 + cx < 0 or y0 + bh + cy > height or x0 + bw + cx > width:
                    continue
                if vector and block == 16 and bh == 16 and bw == 16 and step <= 2:
                    # Byte planes, b = 16, full resolution or predictor mode: one vector pass over the
                    # block, no partial exit (its full sum decides every comparison the same way).
                    ca = cbase + y0 * cstride + x0
                    ra = rbase + (y0 + cy) * rstride + x0 + cx
                    if step == 2:
                        sad = _sad_half16(ca, 2 * cstride, ra, 2 * rstride)
                    else:
                        sad = _sad_full16(ca, cstride, ra, rstride)
                elif block == 16 and bh == 16 and bw == 16 and step == 2:  # predictor mode at b = 16
                    sad = _grid_sad(cur, ref, y0, x0, cy, cx, best_sad, 8, 2)
                elif block == 16 and bh == 16 and bw == 16 and step == 1:  # full resolution, b = 16
                    sad = _grid_sad(cur, ref, y0, x0, cy, cx, best_sad, 16, 1)
                else:
                    sad = _block_sad(cur, ref, y0, x0, bh, bw, cy, cx, step, best_sad)
                if sad < best_sad:
                    best_sad = sad
                    by = cy
                    bx = cx
                    if best_sad <= good_sum:
                        break
            out_dy[i, j] = by
            out_dx[i, j] = bx
            out_cost[i, j] = np.inf if best_sad == _sad_none(cur) else best_sad / n_samples


@njit(cache=True, nogil=True)
def block_diff_sum(cur, ref, y0: int, y1: int, x0: int, x1: int, oy: int, ox: int, out_pix) -> float:
    """Sum over the block [y0, y1) × [x0, x1) of max over channels |cur − ref shifted by (oy, ox)| (source
    clamped to the frame); the per-pixel values also go to ``out_pix`` unless it is empty (0×0)."""
    height, width, nc = cur.shape
    write = out_pix.shape[0] > 0
    acc = 0.0
    for y in range(y0, y1):
        ry = min(max(y + oy, 0), height - 1)
        for x in range(x0, x1):
            rx = min(max(x + ox, 0), width - 1)
            m = 0.0
            for c in range(nc):
                d = abs(np.float32(cur[y, x, c]) - np.float32(ref[ry, rx, c]))
                if d > m:
                    m = d
            if write:
                out_pix[y, x] = m
            acc += m
    return acc


@njit(cache=True, nogil=True)
def shifted_diff(cur, ref, dy, dx, block: int, out_pix, out_mad) -> None:
    """Per pixel: max over channels of |cur − ref shifted by its block's (dy, dx)| (source clamped to the
    frame) into ``out_pix`` (H×W float32); per block: the mean of that into ``out_mad``. ``cur``/``ref`` are
    H×W×C views (channels-last tensors as numpy, or luma planes with a trailing axis). One pass, no index
    maps, nothing warped materialised."""
    height, width, _ = cur.shape
    hb, wb = dy.shape
    for i in range(hb):
        y0 = i * block
        y1 = min(y0 + block, height)
        for j in range(wb):
            x0 = j * block
            x1 = min(x0 + block, width)
            acc = block_diff_sum(cur, ref, y0, y1, x0, x1, dy[i, j], dx[i, j], out_pix)
            out_mad[i, j] = acc / ((y1 - y0) * (x1 - x0))

