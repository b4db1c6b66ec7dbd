"""Median per-frame planner overhead (ms) of the Uirapuru tile planner for depth-2 and depth-3 quad-trees.

Usage: python benchmarks/tiling_planner.py [--repeats N] [--objects N]

Synthetic 4-model family, a crowd of small objects plus scattered ones; reported per budget: the DP-DP
(adaptive) time including histograms/eAP, the uniform-plan time, and the whole ``TilePlanner.plan`` call.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fluxshard.tiling.planner import TilePlanner
from fluxshard.tiling.profile import synthetic_family


def _boxes(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.r_[rng.normal([w * 0.3, h * 0.7], [w * 0.08, h * 0.1], (n, 2)), rng.uniform([0, 0], [w, h], (n // 5, 2))]
    c = np.clip(c, 0, [w - 1, h - 1])
    wh = rng.uniform([w / 300, h / 80], [w / 120, h / 30], (len(c), 2))
    return np.c_[c - wh / 2, c + wh / 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--objects", type=int, default=300)
    args = ap.parse_args()
    fam = synthetic_family()
    cases = [("1080p", 1920, 1080, 2), ("4K", 3840, 2160, 3)]
    print(f"{'frame':6} {'depth':>5} {'nodes':>5} {'budget ms':>9} {'plan ms':>8} {'dpdp ms':>8} {'uniform ms':>10}"
          f" {'elected':>8} {'tiles':>5}")
    for label, w, h, depth in cases:
        boxes = _boxes(args.objects, w, h)
        planner = TilePlanner(fam, w, h, "conservative", max_depth=depth)
        for budget in (50.0, 200.0, 800.0):
            planner.plan(boxes, budget)  # warm-up
            total, dp, uni = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = planner.plan(boxes, budget)
                total.append(1e3 * (time.perf_counter() - t0))
                dp.append(res.timings_ms["adaptive"])
                uni.append(res.timings_ms["uniform"])
            print(f"{label:6} {depth:5d} {planner.tree.n_nodes:5d} {budget:9.0f} {np.median(total):8.2f} "
                  f"{np.median(dp):8.2f} {np.median(uni):10.2f} {res.plan.kind:>8} {len(res.plan.tiles):5d}")


if __name__ == "__main__":
    main()
