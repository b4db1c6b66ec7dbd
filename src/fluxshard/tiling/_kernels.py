"""Numba kernel of the DP-DP forward pass (cached on disk), ~10x faster than the equivalent numpy loop.

Why a kernel: the per-node work is a handful of length-``capacity`` vector operations per model, so in numpy the
call overhead dominates (about 60 us per node on a 4K depth-3 tree); the loop itself is ~1 M flops.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def dpdp_forward(
    order: np.ndarray, first: np.ndarray, vals: np.ndarray, w: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """tables[k, b]: best value over the first k post-order nodes within budget b; choice[k, b]: model or -1.
    ``w[v, m]``: integer weight of node v run with model m (a tile's cost depends on its geometry)."""
    n = order.shape[0]
    n_models = vals.shape[1]
    tables = np.zeros((n + 1, cap + 1))
    choice = np.full((n + 1, cap + 1), -1, dtype=np.int32)
    for k in range(1, n + 1):
        v = order[k - 1]
        f = first[v]
        for b in range(cap + 1):
            tables[k, b] = tables[k - 1, b]
        for m in range(n_models):
            g = vals[v, m]
            wm = w[v, m]
            if g <= 0.0 or wm > cap:
                continue
            for b in range(wm, cap + 1):
                c = tables[f, b - wm] + g
                if c > tables[k, b]:
                    tables[k, b] = c
                    choice[k, b] = m
    return tables, choice
