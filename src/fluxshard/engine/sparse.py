"""Tile-sparse execution of one convolution / pooling layer: recompute only the active output tiles.

The engine keeps each layer's previous output (shifted by motion) as ``base`` and knows which output
positions must be recomputed (``active``). :func:`sparse_conv2d` gathers the input windows (tile + halo) of
the active tiles with ``index_select`` on the pixel-row view of the channels_last input, runs the stock
PyTorch op on them with padding 0, and writes the results back with ``index_copy_`` on the pixel-row view of
``base``. The layer's own padding is reproduced by the gather tables: zero padding by filling the gathered
rows that fall outside the image (only for selected border tiles), reflect / replicate / circular padding by
remapping the source index. No padded copy of the input is ever made.

Tiles are ``T×T`` output blocks on a grid of step ``T``; the last row / column of tiles is shifted inward
to end at the border (``start = min(i·T, Ho - T)``), so every tile is full-size, every computed output is a
real output and no output filtering is needed. A tile is recomputed iff any active position lies in its
grid cell; the recomputed set is the union of the selected tiles (see :func:`recomputed_mask`).

Paths (``SparseStats.path``):

* ``"batch"``: windows stacked along the batch dimension, one conv (seed 001's batch layout).
* ``"hw"``: windows packed side by side in one image (slots padded to a multiple of the stride), one conv,
  valid outputs picked with ``index_select`` (seed 001's H-W layout).
* ``"gemm"``: im2col by ``index_select`` (rows ordered position, ky, kx) and one ``F.linear``; for
  ``groups == 1`` only. For 1×1 convs this is a plain pixel gather with no halo.
* ``"pgemm"``: the same GEMM on exactly the caller's active positions (``positions=``) instead of whole
  tiles — no rounding up to tiles, so its cost follows the position fraction; the engine's default for
  sparse masks at low resolution where one tile is already several receptive-field steps wide.
* ``"dense"``: the active tile fraction is above the layer's crossover: dense op (+ ``post``) and the fresh
  dense tensor is returned (``base`` is not touched, no copy).
* ``"skip"``: nothing active; ``base`` is returned as is.

``layout="auto"`` picks the path from a cost model ``ms ≈ a + b·f`` per path (``f`` = active tile
fraction): measured per layer signature by :meth:`PlanCache.calibrate` when the engine calls it, otherwise
from the rule in :func:`default_costs`, fitted on ``benchmarks/sparse_conv.py`` (NanoDet body, 2 threads).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxshard.engine import _kernels as _ek

__all__ = [
    "LayerCost",
    "PlanCache",
    "SparseStats",
    "WindowGeom",
    "conv_geometry",
    "default_costs",
    "default_tile",
    "pool_geometry",
    "recomputed_mask",
    "sparse_conv2d",
    "sparse_pool2d",
    "tile_mask",
]

PATHS = ("batch", "hw", "gemm", "pgemm")
_CL = torch.channels_last


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class WindowGeom:
    """Spatial geometry of a sliding-window op on a given input size; the key of the index tables (channels
    and weights do not matter for indices, so layers with the same geometry share tables)."""

    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int  # padding top / bottom / left / right (asymmetric for padding='same')
    pb: int
    pl: int
    pr: int
    mode: str = "zeros"  # zeros | reflect | replicate | circular | fill (pool: value given at run time)
    ceil_mode: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return (_out_size(self.h, self.kh, self.sh, self.dh, self.pt, self.pb, self.ceil_mode),
                _out_size(self.w, self.kw, self.sw, self.dw, self.pl, self.pr, self.ceil_mode))

    @property
    def padded(self) -> bool:
        return bool(self.pt or self.pb or self.pl or self.pr)


def _out_size(n: int, k: int, s: int, d: int, p0: int, p1: int, ceil_mode: bool) -> int:
    span = n + p0 + p1 - d * (k - 1) - 1
    if span < 0:
        raise ValueError(f"window {k} (dilation {d}) larger than padded input {n + p0 + p1}")
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + p0:  # PyTorch: the last window must start inside the input or left padding
        out -= 1
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_geometry(conv: nn.Conv2d, hw: tuple[int, int]) -> WindowGeom:
    """Geometry of a stock ``nn.Conv2d`` on an input of size ``hw``; raises ``NotImplementedError`` for what
    the gather tables cannot reproduce."""
    if type(conv) is not nn.Conv2d and not isinstance(conv, nn.Conv2d):
        raise NotImplementedError(f"sparse_conv2d needs an nn.Conv2d, got {type(conv).__name__}")
    if conv.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise NotImplementedError(f"sparse_conv2d: padding_mode={conv.padding_mode!r} is not supported")
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    dh, dw = _pair(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pt = pb = pl = pr = 0
        elif conv.padding == "same":  # PyTorch: total d·(k-1), the odd extra pixel goes bottom / right
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pt, pl = th // 2, tw // 2
            pb, pr = th - pt, tw - pl
        else:
            raise NotImplementedError(f"sparse_conv2d: padding={conv.padding!r} is not supported")
    else:
        ph, pw = _pair(conv.padding)
        pt = pb = ph
        pl = pr = pw
    h, w = hw
    if conv.padding_mode in ("reflect", "circular") and (max(pt, pb) >= h + (conv.padding_mode == "circular")
                                                         or max(pl, pr) >= w + (conv.padding_mode == "circular")):
        raise NotImplementedError(f"sparse_conv2d: {conv.padding_mode} padding wider than the input")
    return WindowGeom(h, w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, conv.padding_mode)


def pool_geometry(pool: nn.MaxPool2d | nn.AvgPool2d, hw: tuple[int, int]) -> tuple[WindowGeom, float]:
    """Geometry of a max / average pool and the value its padding acts as (-inf for max, 0 for average with
    ``count_include_pad``); raises ``NotImplementedError`` for variants whose divisor depends on position."""
    kh, kw = _pair(pool.kernel_size)
    sh, sw = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    ph, pw = _pair(pool.padding)
    h, w = hw
    if isinstance(pool, nn.MaxPool2d):
        if pool.return_indices:
            raise NotImplementedError("sparse_pool2d: MaxPool2d(return_indices=True) is not supported")
        dh, dw = _pair(pool.dilation)
        return WindowGeom(h, w, kh, kw, sh, sw, dh, dw, ph, ph, pw, pw, "fill", pool.ceil_mode), -math.inf
    if isinstance(pool, nn.AvgPool2d):
        if pool.divisor_override is not None:
            raise NotImplementedError("sparse_pool2d: AvgPool2d(divisor_override=...) is not supported")
        if (ph or pw) and not pool.count_include_pad:
            raise NotImplementedError("sparse_pool2d: AvgPool2d(count_include_pad=False) with padding is not "
                                      "supported (the divisor varies at the border)")
        g = WindowGeom(h, w, kh, kw, sh, sw, 1, 1, ph, ph, pw, pw, "fill", pool.ceil_mode)
        if pool.ceil_mode and g.out_hw != WindowGeom(h, w, kh, kw, sh, sw, 1, 1, ph, ph, pw, pw, "fill").out_hw:
            raise NotImplementedError("sparse_pool2d: AvgPool2d(ceil_mode=True) with partial windows")
        return g, 0.0
    raise NotImplementedError(f"sparse_pool2d needs nn.MaxPool2d or nn.AvgPool2d, got {type(pool).__name__}")


def default_tile(out_hw: tuple[int, int]) -> int:
    """Tile edge by output resolution (calibration notes: 16 at ≥ 120 px, 8 at 30–119, 4 below)."""
    m = max(out_hw)
    return 16 if m >= 120 else 8 if m >= 30 else 4


# ------------------------------------------------------------------------------------------------- tables


def _map_coords(v: np.ndarray, n: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinate → (in-range coordinate, valid). Padding modes other than zero/fill are pure remaps."""
    valid = (v >= 0) & (v < n)
    if mode == "replicate":
        return np.clip(v, 0, n - 1), np.ones_like(valid)
    if mode == "reflect":
        r = np.where(v < 0, -v, v)
        return np.where(r >= n, 2 * (n - 1) - r, r), np.ones_like(valid)
    if mode == "circular":
        return np.mod(v, n), np.ones_like(valid)
    return np.clip(v, 0, n - 1), valid


class _Plan:
    """Index tables for one (geometry, tile): built lazily per path, reused across frames and layers."""

    def __init__(self, g: WindowGeom, tile: int) -> None:
        self.g = g
        self.tile = tile
        self.ho, self.wo = g.out_hw
        self.th, self.tw = min(tile, self.ho), min(tile, self.wo)
        self.nty, self.ntx = -(-self.ho // self.th), -(-self.wo // self.tw)
        self.ntiles = self.nty * self.ntx
        self.row_cells = np.arange(self.nty) * self.th  # grid cells for the any-reduction
        self.col_cells = np.arange(self.ntx) * self.tw
        self.oy0 = np.minimum(self.row_cells, self.ho - self.th)  # tile starts (last one shifted inward)
        self.ox0 = np.minimum(self.col_cells, self.wo - self.tw)
        self.ith = (self.th - 1) * g.sh + (g.kh - 1) * g.dh + 1  # input window of one tile
        self.itw = (self.tw - 1) * g.sw + (g.kw - 1) * g.dw + 1
        dst = ((self.oy0[:, None, None, None] + np.arange(self.th)[None, None, :, None]) * self.wo
               + self.ox0[None, :, None, None] + np.arange(self.tw)[None, None, None, :])
        self.dst = dst.reshape(self.ntiles, -1)
        self._tables: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        self._hw_src: dict[int, tuple[int, int, Tensor]] = {}
        self._pos: tuple[np.ndarray, np.ndarray | None] | None = None

    def table(self, kind: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(source row index per tile, valid mask per tile or None, border-tile flags or None)."""
        if kind not in self._tables:
            self._tables[kind] = self._build(kind)
        return self._tables[kind]

    def _build(self, kind: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        g = self.g
        if kind in ("win", "hw"):
            ry = self.oy0[:, None] * g.sh - g.pt + np.arange(self.ith)[None, :]  # (nty, ith)
            rx = self.ox0[:, None] * g.sw - g.pl + np.arange(self.itw)[None, :]
            if kind == "hw":  # slots padded to a multiple of the stride; padding rows are never read by
                # valid outputs, so they just repeat the last row (garbage allowed, no fill needed)
                sy, sx = -(-self.ith // g.sh) * g.sh, -(-self.itw // g.sw) * g.sw
                ry = np.concatenate([ry, np.repeat(ry[:, -1:], sy - self.ith, axis=1)], axis=1)
                rx = np.concatenate([rx, np.repeat(rx[:, -1:], sx - self.itw, axis=1)], axis=1)
            my, vy = _map_coords(ry, g.h, g.mode)
            mx, vx = _map_coords(rx, g.w, g.mode)
            idx = my[:, None, :, None] * g.w + mx[None, :, None, :]
            valid = vy[:, None, :, None] & vx[None, :, None, :]
        elif kind == "col":  # im2col rows ordered (i, j, ky, kx)
            ry = ((self.oy0[:, None, None] + np.arange(self.th)[None, :, None]) * g.sh - g.pt
                  + np.arange(g.kh)[None, None, :] * g.dh)  # (nty, th, kh)
            rx = ((self.ox0[:, None, None] + np.arange(self.tw)[None, :, None]) * g.sw - g.pl
                  + np.arange(g.kw)[None, None, :] * g.dw)
            my, vy = _map_coords(ry, g.h, g.mode)
            mx, vx = _map_coords(rx, g.w, g.mode)
            idx = my[:, None, :, None, :, None] * g.w + mx[None, :, None, :, None, :]
            valid = vy[:, None, :, None, :, None] & vx[None, :, None, :, None, :]
        else:
            raise ValueError(kind)
        idx = np.ascontiguousarray(idx.reshape(self.ntiles, -1), dtype=np.int64)
        valid = valid.reshape(self.ntiles, -1)
        border = ~valid.all(axis=1)
        if not border.any():
            return idx, None, None
        return idx, valid, border

    def pos_table(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Per output position, the source pixel row of each kernel tap (ky, kx order; clamped in range) and
        which taps are real (None when no window reaches the padding): the ``"pgemm"`` path's im2col."""
        if self._pos is None:
            g = self.g
            ry = np.arange(self.ho)[:, None] * g.sh - g.pt + np.arange(g.kh)[None, :] * g.dh  # (ho, kh)
            rx = np.arange(self.wo)[:, None] * g.sw - g.pl + np.arange(g.kw)[None, :] * g.dw  # (wo, kw)
            my, vy = _map_coords(ry, g.h, g.mode)
            mx, vx = _map_coords(rx, g.w, g.mode)
            idx = my[:, None, :, None] * g.w + mx[None, :, None, :]  # (ho, wo, kh, kw)
            valid = vy[:, None, :, None] & vx[None, :, None, :]
            k = g.kh * g.kw
            v = valid.reshape(self.ho * self.wo, k)
            self._pos = (np.ascontiguousarray(idx.reshape(self.ho * self.wo, k), dtype=np.int64),
                         None if v.all() else v)
        return self._pos

    def hw_grid(self, n: int) -> tuple[int, int, Tensor]:
        """(rows, cols, output-row index of the valid outputs in tile order) for ``n`` packed tiles."""
        if n not in self._hw_src:
            g = self.g
            cols = math.ceil(math.sqrt(n))
            rows = -(-n // cols)
            sy, sx = -(-self.ith // g.sh), -(-self.itw // g.sw)  # slot size in outputs
            yw = (cols * sx * g.sw - (g.kw - 1) * g.dw - 1) // g.sw + 1
            k = np.arange(n)
            r, c = k // cols, k % cols
            src = ((r[:, None, None] * sy + np.arange(self.th)[None, :, None]) * yw
                   + c[:, None, None] * sx + np.arange(self.tw)[None, None, :])
            self._hw_src[n] = (rows, cols, torch.from_numpy(src.reshape(-1).astype(np.int64)))
        return self._hw_src[n]


# --------------------------------------------------------------------------------------------- cost model


@dataclass
class LayerCost:
    """``ms ≈ a + b·f`` per sparse path and the dense ms, for one layer signature."""

    dense: float
    paths: dict[str, tuple[float, float]] = field(default_factory=dict)
    measured: bool = False

    def choose(self, f: float, fp: float | None = None) -> str:
        """Cheapest path at tile fraction ``f`` (position fraction ``fp`` for ``"pgemm"``; without it that path
        is not available)."""
        best, best_ms = "dense", self.dense
        for p, (a, b) in self.paths.items():
            if p == "pgemm" and fp is None:
                continue
            ms = a + b * (fp if p == "pgemm" else f)
            if ms < best_ms:
                best, best_ms = p, ms
        return best

    def crossover(self, path: str | None = None) -> float:
        """Tile fraction above which dense wins (for ``path``, or the best sparse path at each fraction)."""
        fs = np.linspace(0.0, 1.0, 201)
        for f in fs:
            ms = (min(a + b * f for a, b in self.paths.values()) if path is None
                  else self.paths[path][0] + self.paths[path][1] * f)
            if ms >= self.dense:
                return float(f)
        return 1.0


def default_costs(g: WindowGeom, cin: int, cout: int, groups: int, tile: int, gemm_ok: bool,
                  threads: int | None = None) -> LayerCost:
    """Cost rule (ms) used when a layer is not calibrated: ``path ms = a + b·f·dense_ms``.

    Fitted on ``benchmarks/sparse_conv.py`` (NanoDet body + generic shapes, channels_last fp32, 1 thread;
    the 2-thread run was unusable on the shared, loaded machine). ``a`` is the per-call overhead (Python,
    dispatch, index build, oneDNN call on a small batch), ``b`` the marginal cost per unit of active tile
    fraction relative to dense (halo + gather + scatter + less efficient small GEMMs): im2col-GEMM has the
    smallest overhead, batch stacking the smallest slope at large fractions, H-W packing pays for the
    outputs wasted between slots. Dense time is estimated from MACs with per-class throughput."""
    ho, wo = g.out_hw
    k = g.kh * g.kw
    macs = ho * wo * cout * (cin // groups) * k
    depthwise = groups == cin and cin > 1
    rate = 9e6 if cin <= 4 else 8e6 if depthwise else 25e6 if k == 1 else 40e6  # MAC per ms, 1 thread
    t = torch.get_num_threads() if threads is None else threads
    dense = (0.015 + macs / rate) / (1.0 + 0.7 * (min(t, 2) - 1))
    lc = LayerCost(dense)
    if depthwise or (groups > 1 and not gemm_ok):
        lc.paths["batch"] = (0.30, 2.1 * dense)
        lc.paths["hw"] = (0.21, 3.0 * dense)
        return lc
    one = k == 1
    lc.paths["batch"] = ((0.12, 2.4 * dense) if one else (0.40, 1.8 * dense))
    lc.paths["hw"] = ((0.10, 2.8 * dense) if one else (0.25, 2.8 * dense))
    if gemm_ok:
        lc.paths["gemm"] = ((0.06, 2.1 * dense) if one else ((0.25, 2.5 * dense) if cin <= 4 else (0.20, 2.3 * dense)))
        lc.paths["pgemm"] = lc.paths["gemm"]  # the same GEMM on exactly the active positions (no tile rounding)
    return lc


# -------------------------------------------------------------------------------------------------- cache


class PlanCache:
    """Index tables per (geometry, tile) and cost models per layer signature; share one per engine (or per
    stream: tables are read-only after build, so sharing across streams is fine too)."""

    def __init__(self) -> None:
        self.plans: dict[tuple[WindowGeom, int], _Plan] = {}
        self.costs: dict[tuple[Any, ...], LayerCost] = {}
        self._gemm_w: dict[tuple[int, int, int], Tensor] = {}
        self._geoms: dict[tuple[int, int, int], tuple[weakref.ref[nn.Module], WindowGeom]] = {}
        # per (module, input size, tile): geometry, plan and cost model, so a repeated call skips hashing
        # the geometry and building the signature (~40 µs of Python per call)
        self._calls: dict[tuple[int, int, int, int | None], tuple[weakref.ref[nn.Module], WindowGeom, _Plan,
                                                                   LayerCost]] = {}

    def conv_geometry(self, conv: nn.Conv2d, hw: tuple[int, int]) -> WindowGeom:
        """:func:`conv_geometry`, memoised per module and input size (it is ~20 µs of the per-call cost)."""
        key = (id(conv), *hw)
        hit = self._geoms.get(key)
        if hit is not None and hit[0]() is conv:
            return hit[1]
        g = conv_geometry(conv, hw)
        self._geoms[key] = (weakref.ref(conv), g)
        return g

    def layer(self, conv: nn.Conv2d, hw: tuple[int, int], tile: int | None) -> tuple[WindowGeom, _Plan, LayerCost]:
        """Geometry, plan and cost model of ``conv`` on an input of size ``hw``, memoised per (module, size,
        tile): repeated calls skip hashing the geometry and building the signature (~40 µs of Python)."""
        key = (id(conv), hw[0], hw[1], tile)
        hit = self._calls.get(key)
        if hit is not None and hit[0]() is conv:
            return hit[1], hit[2], hit[3]
        g = self.conv_geometry(conv, hw)
        plan = self.plan(g, tile or default_tile(g.out_hw))
        sig = ((1, conv.in_channels, *hw), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.groups, conv.padding_mode, plan.tile)
        lc = self.cost(sig, lambda: default_costs(g, conv.in_channels, conv.out_channels, conv.groups, plan.tile,
                                                  conv.groups == 1))
        self._calls[key] = (weakref.ref(conv), g, plan, lc)
        return g, plan, lc

    def plan(self, g: WindowGeom, tile: int) -> _Plan:
        key = (g, tile)
        p = self.plans.get(key)
        if p is None:
            p = self.plans[key] = _Plan(g, tile)
        return p

    def gemm_weight(self, conv: nn.Conv2d) -> Tensor:
        """Conv weight as (Cout, kh·kw·Cin) matching the im2col row order; rebuilt if the weight changes."""
        w = conv.weight
        key = (id(conv), w.data_ptr(), w._version)
        m = self._gemm_w.get(key)
        if m is None:
            m = w.detach().permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
            self._gemm_w = {k: v for k, v in self._gemm_w.items() if k[0] != id(conv)}
            self._gemm_w[key] = m
        return m

    def set_cost(self, sig: tuple[Any, ...], lc: LayerCost) -> None:
        """Install a cost model (e.g. a stored calibration) for a layer signature."""
        self.costs[sig] = lc
        self._calls.clear()

    def cost(self, sig: tuple[Any, ...], make: Callable[[], LayerCost]) -> LayerCost:
        c = self.costs.get(sig)
        if c is None:
            c = self.costs[sig] = make()
        return c

    def calibrate(self, x: Tensor, conv: nn.Conv2d, *, tile: int | None = None,
                  post: Callable[[Tensor], Tensor] | None = None, fractions: tuple[float, float] = (0.05, 0.4),
                  reps: int = 5, paths: tuple[str, ...] = PATHS) -> LayerCost:
        """Measure dense and every applicable sparse path of this layer at two tile fractions (medians,
        timed alternately) and store ``ms = a + b·f`` for ``layout="auto"``. Costs ~(2·paths+1)·reps layer
        runs; call it once per layer signature, e.g. on the engine's first (dense) frame."""
        x = _as_cl(x)
        g = conv_geometry(conv, tuple(x.shape[-2:]))
        tile = tile or default_tile(g.out_hw)
        plan = self.plan(g, tile)
        ok = [p for p in paths if p not in ("gemm", "pgemm") or conv.groups == 1]
        with torch.no_grad():
            base = _as_cl(conv(x))
            rng = np.random.default_rng(0)
            masks = []
            for f in fractions:
                tm = np.zeros(plan.ntiles, bool)
                tm[rng.choice(plan.ntiles, max(1, round(f * plan.ntiles)), replace=False)] = True
                masks.append(recomputed_mask(tm.reshape(plan.nty, plan.ntx), g.out_hw, tile))
            times: dict[tuple[str, int], list[float]] = {}
            dense: list[float] = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                y = conv(x)
                if post is not None:
                    post(y)
                dense.append(time.perf_counter() - t0)
                for p in ok:
                    for i, m in enumerate(masks):
                        t0 = time.perf_counter()
                        sparse_conv2d(x, conv, base, m, tile=tile, post=post, layout=p, plan_cache=self,
                                      positions=np.flatnonzero(m) if p == "pgemm" else None)
                        times.setdefault((p, i), []).append(time.perf_counter() - t0)
        lc = LayerCost(statistics.median(dense[1:]) * 1e3, measured=True)
        tile_f = [float(plan_tile_fraction(plan, m)) for m in masks]
        pos_f = [float(m.mean()) for m in masks]
        for p in ok:
            real_f = pos_f if p == "pgemm" else tile_f
            m0, m1 = (statistics.median(times[(p, i)][1:]) * 1e3 for i in range(2))
            b = (m1 - m0) / max(1e-6, real_f[1] - real_f[0])
            lc.paths[p] = (m0 - b * real_f[0], b)
        self.costs[_signature(x, conv, tile)] = lc
        self._calls.clear()
        return lc


def _signature(x: Tensor, conv: nn.Conv2d, tile: int) -> tuple[Any, ...]:
    return (tuple(x.shape), conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.padding_mode, tile)


_DEFAULT_CACHE = PlanCache()


# ------------------------------------------------------------------------------------------------- masks


def _to_numpy_mask(active: Tensor | np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    a = active.detach().cpu().numpy() if isinstance(active, Tensor) else np.asarray(active)
    a = a.reshape(a.shape[-2:]) if a.ndim > 2 else a
    if a.shape != hw:
        raise ValueError(f"active map {a.shape} does not match the output size {hw}")
    return a.astype(bool, copy=False)


def _tile_any(a: np.ndarray, plan: _Plan) -> np.ndarray:
    r = np.logical_or.reduceat(a, plan.row_cells, axis=0)
    return np.logical_or.reduceat(r, plan.col_cells, axis=1)


def tile_mask(active: Tensor | np.ndarray, tile: int) -> np.ndarray:
    """(ceil(Ho/T), ceil(Wo/T)) bool: grid cells containing an active position (T clipped to the map)."""
    a = _to_numpy_mask(active, tuple(np.shape(active)[-2:]))
    ho, wo = a.shape
    th, tw = min(tile, ho), min(tile, wo)
    r = np.logical_or.reduceat(a, np.arange(-(-ho // th)) * th, axis=0)
    return np.logical_or.reduceat(r, np.arange(-(-wo // tw)) * tw, axis=1)


def recomputed_mask(tiles: Tensor | np.ndarray, out_hw: tuple[int, int], tile: int) -> np.ndarray:
    """(Ho, Wo) bool: positions written by the sparse paths for a tile mask from :func:`tile_mask` (the last
    tile row / column is shifted inward, so it may also cover part of its neighbour)."""
    t = np.asarray(tiles, bool)
    ho, wo = out_hw
    th, tw = min(tile, ho), min(tile, wo)
    out = np.zeros(out_hw, bool)
    for ty, tx in zip(*np.nonzero(t), strict=True):
        y0, x0 = min(ty * th, ho - th), min(tx * tw, wo - tw)
        out[y0:y0 + th, x0:x0 + tw] = True
    return out


def plan_tile_fraction(plan: _Plan, active: Tensor | np.ndarray) -> float:
    return float(_tile_any(_to_numpy_mask(active, (plan.ho, plan.wo)), plan).mean())


# ----------------------------------------------------------------------------------------------- executor


@dataclass
class SparseStats:
    """What one sparse call did: ``fraction`` = active tiles / tiles, ``path`` one of skip / dense / batch /
    hw / gemm, ``ms`` wall time of the call."""

    path: str
    tiles: int
    total_tiles: int
    tile: int
    ms: float
    rows: Tensor | None = None  # with ``track``: output rows written by a sparse path (pixel-row index)
    delta: Tensor | None = None  # with ``track``: per written row, max over channels of |new − base|

    @property
    def fraction(self) -> float:
        return self.tiles / self.total_tiles if self.total_tiles else 0.0


def _as_cl(t: Tensor) -> Tensor:
    return t if t.is_contiguous(memory_format=_CL) else t.contiguous(memory_format=_CL)


_NO_VALID = np.zeros((0, 0), np.bool_)


def _rows(t: Tensor) -> Tensor | None:
    """(H·W, C) view of a (1, C, H, W) channels_last tensor, or None if it is not viewable."""
    try:
        return t.permute(0, 2, 3, 1).view(-1, t.shape[1])
    except RuntimeError:
        return None


def _gather(xrows: Tensor, plan: _Plan, kind: str, sel: np.ndarray, fill: float,
            order: Callable[[np.ndarray], np.ndarray] | None = None) -> Tensor:
    """Rows of the selected tiles' windows (in ``order``), with out-of-image rows set to ``fill``."""
    idx, valid, border = plan.table(kind)
    ix = idx[sel]
    if order is not None:
        ix = order(ix)
    g = xrows.index_select(0, torch.from_numpy(ix.reshape(-1)))
    if border is not None:
        b = border[sel]
        if b.any():
            if order is None:
                slots = np.flatnonzero(b)
                r, c = np.nonzero(~valid[sel[slots]])
                zr = slots[r] * idx.shape[1] + c
            else:
                zr = np.flatnonzero(order(~valid[sel]))
            g.index_fill_(0, torch.from_numpy(zr.astype(np.int64, copy=False)), fill)
    return g


def _run(x: Tensor, base: Tensor, active: Tensor | np.ndarray, g: WindowGeom, cout: int, tile: int | None,
         layout: str, plan_cache: PlanCache | None, fill: float, window_op: Callable[[Tensor], Tensor],
         dense_op: Callable[[Tensor], Tensor], post: Callable[[Tensor], Tensor] | None,
         gemm: Callable[[Tensor], Tensor] | None, cost: Callable[[_Plan], LayerCost], inplace: bool,
         crossover: float | None, tiles: np.ndarray | None = None, track: bool = False,
         positions: np.ndarray | None = None, plan: _Plan | None = None) -> tuple[Tensor, SparseStats]:
    t0 = time.perf_counter()
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) input, got {tuple(x.shape)}")
    if plan is None:
        cache = plan_cache if plan_cache is not None else _DEFAULT_CACHE
        plan = cache.plan(g, tile or default_tile(g.out_hw))
    tile = plan.tile
    if tuple(base.shape) != (1, cout, plan.ho, plan.wo):
        raise ValueError(f"base {tuple(base.shape)} does not match the output (1, {cout}, {plan.ho}, {plan.wo})")
    if tiles is None:
        tm = _tile_any(_to_numpy_mask(active, (plan.ho, plan.wo)), plan).reshape(-1)
    else:
        if tiles.shape != (plan.nty, plan.ntx):
            raise ValueError(f"tile mask {tiles.shape} does not match the tile grid {(plan.nty, plan.ntx)}")
        tm = tiles.reshape(-1)
    sel = np.flatnonzero(tm)
    n = len(sel)
    if n == 0:
        return base, SparseStats("skip", 0, plan.ntiles, tile, (time.perf_counter() - t0) * 1e3)
    f = n / plan.ntiles
    fp = len(positions) / (plan.ho * plan.wo) if positions is not None and gemm is not None else None
    if layout == "auto":
        lc = cost(plan)
        if crossover is None:
            path = lc.choose(f, fp)
        else:
            path = "dense" if f > crossover else min(
                (p for p in lc.paths if p != "pgemm" or fp is not None),
                key=lambda p: lc.paths[p][0] + lc.paths[p][1] * (fp if p == "pgemm" else f))  # type: ignore[operator]
    elif layout in ("dense", "batch", "hw", "gemm", "pgemm"):
        path = layout
    else:
        raise ValueError(f"layout must be auto, batch, hw, gemm, pgemm or dense, got {layout!r}")
    if path in ("gemm", "pgemm") and gemm is None:
        raise ValueError(f"the {path} path needs a conv with groups == 1")
    if path == "pgemm" and positions is None:
        raise ValueError("the pgemm path needs the active output positions")
    if path == "dense":
        y = dense_op(x)
        if post is not None:
            y = post(y)
        return y, SparseStats("dense", n, plan.ntiles, tile, (time.perf_counter() - t0) * 1e3)

    xrows = _rows(x)  # NCHW inputs give a strided row view: gathering from it beats a full layout copy
    if xrows is None:
        xrows = _rows(x.contiguous(memory_format=_CL))
    out = base if inplace else base.clone(memory_format=_CL)
    orows = _rows(out)
    if orows is None:  # e.g. a non-contiguous view: work on a channels_last copy and return that
        out = out.contiguous(memory_format=_CL)
        orows = _rows(out)
    assert xrows is not None and orows is not None
    c = x.shape[1]
    if path == "batch":
        gr = _gather(xrows, plan, "win", sel, fill)
        y = window_op(gr.view(n, plan.ith, plan.itw, c).permute(0, 3, 1, 2))
        if post is not None:
            y = post(y)
        yr = y.permute(0, 2, 3, 1).reshape(-1, cout)
    elif path == "gemm":
        gr = _gather(xrows, plan, "col", sel, fill)
        yr = gemm(gr.view(n * plan.th * plan.tw, -1))
        if post is not None:
            yr = post(yr)
    elif path == "pgemm":  # exactly the active positions: no tile rounding, no halo
        assert positions is not None
        table, valid = plan.pos_table()
        if xrows.dtype == torch.float32 and xrows.is_contiguous():
            buf = np.empty((len(positions), table.shape[1] * c), np.float32)
            _ek.im2col_rows(xrows.numpy(), table, _NO_VALID if valid is None else valid, positions, fill, buf)
            gr = torch.from_numpy(buf)
        else:
            gr = xrows.index_select(0, torch.from_numpy(table[positions].reshape(-1)))
            if valid is not None:
                off = np.flatnonzero(~valid[positions])
                if off.size:
                    gr.index_fill_(0, torch.from_numpy(off), fill)
        yr = gemm(gr.view(len(positions), -1))
        if post is not None:
            yr = post(yr)
    else:  # hw
        rows, cols, src = plan.hw_grid(n)
        sy = -(-plan.ith // g.sh) * g.sh
        sx = -(-plan.itw // g.sw) * g.sw
        pad = rows * cols - n

        def order(t: np.ndarray) -> np.ndarray:
            if pad:
                t = np.concatenate([t, np.repeat(t[:1], pad, axis=0)])
            return t.reshape(rows, cols, sy, sx).transpose(0, 2, 1, 3)

        gr = _gather(xrows, plan, "hw", sel, fill, order)
        y = window_op(gr.view(1, rows * sy, cols * sx, c).permute(0, 3, 1, 2))
        yr = y.permute(0, 2, 3, 1).reshape(-1, cout).index_select(0, src)
        if post is not None:
            yr = post(yr)
    dst = torch.from_numpy(positions if path == "pgemm" else plan.dst[sel].reshape(-1))
    delta = None
    if track and yr.dtype == orows.dtype == torch.float32:
        # how much each row moves (the engine's truncation test), measured as it is written
        d = np.empty(len(dst), np.float32)
        _ek.write_rows(yr.numpy(), dst.numpy(), orows.numpy(), d)
        delta = torch.from_numpy(d)
    elif track:
        delta = (yr - orows.index_select(0, dst)).abs().amax(1)
        orows.index_copy_(0, dst, yr)
    else:
        orows.index_copy_(0, dst, yr)
    if path == "pgemm":  # report the work as its tile-equivalent fraction
        n = max(1, round(len(positions) / (plan.ho * plan.wo) * plan.ntiles))  # type: ignore[arg-type]
    return out, SparseStats(path, n, plan.ntiles, tile, (time.perf_counter() - t0) * 1e3, dst if track else None,
                            delta)


def sparse_conv2d(x: Tensor, conv: nn.Conv2d, base: Tensor, active: Tensor | np.ndarray, *, tile: int | None = None,
                  post: Callable[[Tensor], Tensor] | None = None, layout: str = "auto",
                  plan_cache: PlanCache | None = None, inplace: bool = True,
                  crossover: float | None = None, tiles: np.ndarray | None = None,
                  track: bool = False, positions: np.ndarray | None = None) -> tuple[Tensor, SparseStats]:
    """``post(conv(x))`` recomputed on the tiles of ``active`` (bool (Ho, Wo)); elsewhere ``base``.

    Returns ``(out, stats)``. Sparse paths write into ``base`` in place and return it (``inplace=False``
    clones it first; NCHW works too, but channels_last ``x`` and ``base`` are several times faster). The
    dense path returns a fresh tensor and leaves ``base`` alone; "skip" returns ``base``. Always use the
    returned tensor. ``post`` must be elementwise (it sees 4-D tiles or 2-D (pixels, C) rows). ``base``
    must hold post-activation values. ``layout``: auto | batch | hw | gemm | dense; forced sparse layouts
    are obeyed at any fraction; with ``auto``, ``crossover`` (tile fraction) overrides the cost model's dense
    decision. ``tiles`` (bool tile grid, as :func:`tile_mask` gives) replaces ``active`` when the caller already
    reduced its mask to tiles (``active`` is then ignored). ``track`` returns, for sparse paths, the recomputed rows
    and their change against ``base`` in the stats (fast mode's truncation test). ``positions`` (int64 flat
    output indices, sorted, a subset of the selected tiles) enables the ``"pgemm"`` path: im2col + GEMM on
    exactly those positions, written back there (``groups == 1`` only).
    """
    cache = plan_cache if plan_cache is not None else _DEFAULT_CACHE
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"input has {x.shape[1]} channels, conv expects {conv.in_channels}")
    g, plan, lc = cache.layer(conv, (int(x.shape[-2]), int(x.shape[-1])), tile)
    w, b = conv.weight, conv.bias

    def window_op(t: Tensor) -> Tensor:
        return F.conv2d(t, w, b, conv.stride, 0, conv.dilation, conv.groups)

    gemm = None
    if conv.groups == 1:
        def gemm(t: Tensor) -> Tensor:
            return F.linear(t, cache.gemm_weight(conv), b)

    return _run(x, base, active, g, conv.out_channels, tile, layout, plan_cache, 0.0, window_op, conv,
                post, gemm, lambda _: lc, inplace, crossover, tiles, track, positions, plan)


def choose_path(x: Tensor, conv: nn.Conv2d, tiles: np.ndarray, positions: np.ndarray | None, *,
                tile: int | None = None, plan_cache: PlanCache | None = None) -> str:
    """The path ``sparse_conv2d(..., layout="auto")`` would take for this tile grid and position set, without
    running it: callers skip preparing ``base`` (moving a cache) when the answer is ``"dense"``."""
    cache = plan_cache if plan_cache is not None else _DEFAULT_CACHE
    _, plan, lc = cache.layer(conv, (int(x.shape[-2]), int(x.shape[-1])), tile)
    n = int(np.count_nonzero(tiles))
    if n == 0:
        return "skip"
    fp = len(positions) / (plan.ho * plan.wo) if positions is not None and conv.groups == 1 else None
    return lc.choose(n / plan.ntiles, fp)


def sparse_pool2d(x: Tensor, pool: nn.MaxPool2d | nn.AvgPool2d, base: Tensor, active: Tensor | np.ndarray, *,
                  tile: int | None = None, post: Callable[[Tensor], Tensor] | None = None, layout: str = "auto",
                  plan_cache: PlanCache | None = None, inplace: bool = True,
                  crossover: float | None = None, tiles: np.ndarray | None = None,
                  track: bool = False) -> tuple[Tensor, SparseStats]:
    """:func:`sparse_conv2d` for ``nn.MaxPool2d`` (padding acts as -inf, dilation, ceil_mode) and
    ``nn.AvgPool2d`` (padding only with ``count_include_pad``); same contract. Paths: batch / hw / dense."""
    g, fill = pool_geometry(pool, (int(x.shape[-2]), int(x.shape[-1])))
    c = x.shape[1]
    if isinstance(pool, nn.MaxPool2d):
        def window_op(t: Tensor) -> Tensor:
            return F.max_pool2d(t, pool.kernel_size, pool.stride, 0, pool.dilation)
    else:
        def window_op(t: Tensor) -> Tensor:
            return F.avg_pool2d(t, pool.kernel_size, pool.stride, 0)

    def cost(plan: _Plan) -> LayerCost:
        # pools are memory-bound (~4e6 window-elements per ms); sparse costs a fixed ~0.1 ms plus ~2.3–2.9× dense
        # per unit fraction (benchmarks/sparse_conv.py: crossover ~0.37 for NanoDet's stem max-pool, never
        # worth it for its 0.07 ms PAN avg-pool)
        ho, wo = g.out_hw
        t = min(torch.get_num_threads(), 2)
        dense = (0.01 + ho * wo * c * g.kh * g.kw / 4e6) / (1.0 + 0.7 * (t - 1))
        return LayerCost(dense, {"batch": (0.12, 2.3 * dense), "hw": (0.10, 2.9 * dense)})

    if layout == "gemm":
        raise ValueError("pooling has no gemm path")
    return _run(x, base, active, g, c, tile, layout, plan_cache, fill, window_op, pool, post, None, cost,
                inplace, crossover, tiles, track)
