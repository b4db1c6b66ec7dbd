"""Sparse/dense time ratio of single layers (the per-layer crossover the engine's dense fallback needs).

Layers: every distinct Conv2d of the bundled NanoDet body on a 416×416 input (shapes from forward hooks),
its stem max-pool and PAN average pool, and a few generic shapes (640-px stem, depthwise, large 1×1).
For each layer and active tile fraction f, dense and each sparse path are timed alternately in one loop
(the machine drifts, only same-loop ratios mean anything); medians. Prints a table, the crossover per layer
(where the best sparse path reaches dense, linear interpolation) and per layer class, and the fitted
``a + b·f`` ratio model per class.

    python benchmarks/sparse_conv.py [--threads 2] [--reps 21] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.engine.sparse import (
    PlanCache,
    conv_geometry,
    default_costs,
    default_tile,
    pool_geometry,
    recomputed_mask,
    sparse_conv2d,
    sparse_pool2d,
)

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7)
CL = torch.channels_last


@dataclass
class Layer:
    name: str
    op: nn.Module
    shape: tuple[int, int, int, int]
    post: Callable[[torch.Tensor], torch.Tensor] | None
    count: int = 1

    @property
    def cls(self) -> str:
        op = self.op
        res = self.shape[-1] // (op.stride if isinstance(op.stride, int) else op.stride[0] or 1)
        if isinstance(op, nn.MaxPool2d | nn.AvgPool2d):
            return "pool"
        if self.shape[1] <= 4:
            return "stem"
        if op.groups == op.in_channels and op.groups > 1:
            return "depthwise"
        k = op.kernel_size[0]
        band = "≥104" if res >= 100 else "52" if res >= 40 else "≤26"
        return f"{k}x{k} @{band}"


def leaky(t: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(t, 0.1)


def nanodet_layers() -> list[Layer]:
    from fluxshard.models import load_model

    body = load_model("nanodet").body.to(memory_format=CL)
    seen: dict[tuple[Any, ...], Layer] = {}
    hooks = []
    for name, mod in body.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(m: nn.Module, args: tuple[torch.Tensor, ...], _out: Any, name: str = name) -> None:
                shape = tuple(args[0].shape)
                key = (shape, m.out_channels, m.kernel_size, m.stride, m.groups)
                if key in seen:
                    seen[key].count += 1
                else:  # every NanoDet conv but the PAN laterals and head outputs is followed by LeakyReLU
                    post = None if "lateral" in name or "head_out" in name else leaky
                    seen[key] = Layer(f"nanodet.{name}", m, shape, post)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        body(torch.rand(1, 3, 416, 416).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    layers = list(seen.values())
    layers.append(Layer("nanodet.stem_maxpool", nn.MaxPool2d(3, 2, 1), (1, 32, 208, 208), None))
    layers.append(Layer("nanodet.pan_avgpool", nn.AvgPool2d(2), (1, 128, 52, 52), None))
    return layers


def generic_layers() -> list[Layer]:
    def conv(cin: int, cout: int, k: int, s: int = 1, g: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, s, k // 2, groups=g).eval().to(memory_format=CL)

    return [
        Layer("gen.stem640 3→16 s2", conv(3, 16, 3, 2), (1, 3, 640, 640), F.silu),
        Layer("gen.dw3x3 96 @80", conv(96, 96, 3, 1, 96), (1, 96, 80, 80), F.silu),
        Layer("gen.dw3x3 32 @160", conv(32, 32, 3, 1, 32), (1, 32, 160, 160), F.silu),
        Layer("gen.1x1 48→64 @160", conv(48, 64, 1), (1, 48, 160, 160), F.silu),
        Layer("gen.3x3 64→64 @40", conv(64, 64, 3), (1, 64, 40, 40), F.silu),
        Layer("gen.3x3 128→128 @20", conv(128, 128, 3), (1, 128, 20, 20), F.silu),
    ]


def tile_masks(out_hw: tuple[int, int], tile: int, f: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    th, tw = min(tile, out_hw[0]), min(tile, out_hw[1])
    nty, ntx = -(-out_hw[0] // th), -(-out_hw[1] // tw)
    n = nty * ntx
    k = max(1, round(f * n))
    tm = np.zeros(n, bool)
    tm[rng.choice(n, k, replace=False)] = True
    return recomputed_mask(tm.reshape(nty, ntx), out_hw, tile), k / n


def bench_layer(layer: Layer, reps: int, fractions: tuple[float, ...]) -> dict[str, Any]:
    op, post = layer.op, layer.post
    is_pool = isinstance(op, nn.MaxPool2d | nn.AvgPool2d)
    x = torch.randn(layer.shape).contiguous(memory_format=CL)
    if is_pool:
        g, _ = pool_geometry(op, layer.shape[-2:])
        paths = ["batch", "hw"]
        fn = sparse_pool2d
    else:
        g = conv_geometry(op, layer.shape[-2:])
        paths = ["batch", "hw"] + (["gemm"] if op.groups == 1 else [])
        fn = sparse_conv2d
    tile = default_tile(g.out_hw)
    cache = PlanCache()

    def dense() -> torch.Tensor:
        y = op(x)
        return post(y) if post is not None else y

    rng = np.random.default_rng(0)
    rows: dict[str, list[float]] = {p: [] for p in paths}
    real_f: list[float] = []
    dense_all: list[float] = []
    with torch.no_grad():
        base = dense().contiguous(memory_format=CL)
        for f in fractions:
            masks = [tile_masks(g.out_hw, tile, f, rng) for _ in range(4)]  # a few masks, cycled
            real_f.append(masks[0][1])
            for p in paths:  # warm-up: plan tables, oneDNN primitives for these shapes
                for m, _ in masks:
                    fn(x, op, base, m, tile=tile, post=post, layout=p, plan_cache=cache)
            d_t: list[float] = []
            s_t: dict[str, list[float]] = {p: [] for p in paths}
            for r in range(reps):
                m = masks[r % len(masks)][0]
                t0 = time.perf_counter()
                dense()
                d_t.append(time.perf_counter() - t0)
                for p in paths:
                    t0 = time.perf_counter()
                    fn(x, op, base, m, tile=tile, post=post, layout=p, plan_cache=cache)
                    s_t[p].append(time.perf_counter() - t0)
            d = statistics.median(d_t)
            dense_all.append(d)
            for p in paths:
                rows[p].append(statistics.median(s_t[p]) / d)
    best = [min(rows[p][i] for p in paths) for i in range(len(fractions))]
    return {"name": layer.name, "class": layer.cls, "count": layer.count, "shape": list(layer.shape),
            "cout": getattr(op, "out_channels", layer.shape[1]), "tile": tile, "out_hw": list(g.out_hw),
            "dense_ms": statistics.median(dense_all) * 1e3, "fractions": real_f, "ratio": rows,
            "best": best, "crossover": crossover(real_f, best),
            "rule_crossover": None if is_pool else default_costs(
                g, op.in_channels, op.out_channels, op.groups, tile, op.groups == 1).crossover()}


def crossover(fs: list[float], ratio: list[float]) -> float:
    """Fraction where the ratio crosses 1 (linear interpolation, extrapolated from the last two points)."""
    for i in range(1, len(fs)):
        if ratio[i] >= 1.0 > ratio[i - 1]:
            return fs[i - 1] + (1.0 - ratio[i - 1]) * (fs[i] - fs[i - 1]) / (ratio[i] - ratio[i - 1])
    if ratio[0] >= 1.0:
        return 0.0
    slope = (ratio[-1] - ratio[-2]) / (fs[-1] - fs[-2])
    return min(1.0, fs[-1] + (1.0 - ratio[-1]) / slope) if slope > 0 else 1.0


def fit(fs: list[float], ratio: list[float]) -> tuple[float, float]:
    b, a = np.polyfit(fs, ratio, 1)
    return float(a), float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="NanoDet layers only, 7 reps")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 7 if args.quick else args.reps
    layers = nanodet_layers() + ([] if args.quick else generic_layers())
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{reps} reps, channels_last fp32")
    if os.getloadavg()[0] > (os.cpu_count() or 1) - args.threads + 0.5:
        print("WARNING: the machine is loaded; with several threads the OpenMP barriers wait for descheduled "
              "threads (8–16 ms steps) and the ratios below are not meaningful. Use --threads 1 or an idle box.")
    results = []
    head = "".join(f"{f:>7.2f}" for f in FRACTIONS)
    print(f"{'layer':34} {'in shape':>17} {'co':>4} {'T':>3} {'dense':>7} {'path':>5}{head}   xover  rule")
    for layer in layers:
        res = bench_layer(layer, reps, FRACTIONS)
        results.append(res)
        shape = "x".join(str(v) for v in res["shape"][1:])
        for i, (p, r) in enumerate(res["ratio"].items()):
            lead = (f"{res['name'][:34]:34} {shape:>17} {res['cout']:>4} {res['tile']:>3} {res['dense_ms']:7.2f}"
                    if i == 0 else " " * 69)
            vals = "".join(f"{v:7.2f}" for v in r)
            tail = ""
            if i == 0:
                rule = res["rule_crossover"]
                tail = f"   {res['crossover']:.2f}  " + ("  -" if rule is None else f"{rule:.2f}")
            print(f"{lead} {p:>5}{vals}{tail}")
    print("\nper class (best sparse path at each fraction; ratio = sparse/dense, medians over layers):")
    classes: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        classes.setdefault(r["class"], []).append(r)
    summary = {}
    for cls, rs in sorted(classes.items()):
        med = [statistics.median(r["best"][i] for r in rs) for i in range(len(FRACTIONS))]
        fs = [statistics.median(r["fractions"][i] for r in rs) for i in range(len(FRACTIONS))]
        wins: dict[str, int] = {}
        for r in rs:
            for i in range(len(FRACTIONS)):
                p = min(r["ratio"], key=lambda p, i=i: r["ratio"][p][i])
                wins[p] = wins.get(p, 0) + 1
        a, b = fit(fs, med)
        xo = statistics.median(r["crossover"] for r in rs)
        summary[cls] = {"ratio": med, "crossover": xo, "a": a, "b": b, "wins": wins}
        print(f"  {cls:14} n={len(rs):2}  " + " ".join(f"{v:5.2f}" for v in med)
              + f"   crossover {xo:.2f}   fit {a:.2f} + {b:.2f}·f   fastest path counts {wins}")
    if args.json:
        print(json.dumps({"layers": results, "classes": summary}, indent=1))


if __name__ == "__main__":
    main()
