"""Uirapuru's 22 non-linear relative-size bins (§3.1.1).

Why relative sizes: under pan/tilt/zoom an object's pixel size changes every frame and a tile is resized to
its model's input, so what predicts a detector's accuracy is the object's size *relative to the image the
model sees*, not its absolute pixel count. One profile then serves every tile size and every view.

Decisions where the paper is vague (tested in ``tests/test_tiling_bins.py``):

* **Size measure.** ``relative_size = sqrt(w * h) / max(region_w, region_h)``: the geometric-mean side of the
  box over the longer side of the region (tile or frame) it is inferred in. The longer side because frame
  inference letterboxes a region into the square model input, so the box occupies exactly
  ``sqrt(w*h)/max(rw, rh)`` of the input side whatever the input size is. A linear (side) measure rather than an
  area fraction because the paper's bin 12 must end below bin 13's 20 %: Remix's last edge 196 px over the
  D6 input 1280 is 15.3 % as a side but 2.3 % as an area, which would leave a 2.3-20 % hole in area units.
* **Remix's absolute edges.** The paper states only Remix's first bin (0-64 px², i.e. side 0-8 px) and last
  bin (196² px²-inf) and calls them uniform. We take the first bin [0, 8) px and ten uniform-width bins in
  side length between 8 and 196 px (``linspace(8, 196, 11)``, step 18.8 px), then [196, inf): 12 bins.
* **Reference input.** Those pixel edges are divided by ``REFERENCE_INPUT = 1280`` (EfficientDet-D6, the
  paper's largest model), *fixed*, not by the largest input of whatever family is profiled: with a 640-px
  family 196/640 = 30.6 % would overlap bins 13-14 and the bins would stop being monotone, and fixed edges
  keep profiles of different families comparable. Remix's open last bin is closed at 20 % where bin 13 starts.
* **Upper bins.** 20-25 %, 25-30 %, then 30-40 %, ..., 90-100 % (seven) and ``>= 100 %`` (the eighth): 22.
* **Boundaries.** Bins are half-open ``[lo, hi)``; a size exactly on an edge goes to the upper bin; 0 is bin 0
  and everything ``>= 1`` (objects larger than the model input, which happen after a zoom) is bin 21.
  Negative or non-finite sizes are a ``ValueError`` (a bug upstream, never data to bin silently).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

N_BINS = 22
REFERENCE_INPUT = 1280
REMIX_EDGES_PX: tuple[float, ...] = tuple(float(v) for v in np.linspace(8.0, 196.0, 11))

#: The 21 interior edges (relative sizes) separating the 22 bins; bin k is [EDGES[k-1], EDGES[k]).
EDGES: np.ndarray = np.array(
    [e / REFERENCE_INPUT for e in REMIX_EDGES_PX] + [0.20, 0.25] + [round(0.3 + 0.1 * k, 10) for k in range(8)],
    dtype=np.float64,
)
EDGES.setflags(write=False)


def bin_bounds() -> list[tuple[float, float]]:
    """``(lo, hi)`` of every bin (hi = inf for the last), for reports and plots."""
    lo = np.concatenate([[0.0], EDGES])
    hi = np.concatenate([EDGES, [np.inf]])
    return [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]


def bin_labels() -> list[str]:
    """Short human-readable bin names (percent of the model input side)."""
    out = []
    for lo, hi in bin_bounds():
        out.append(f">={100 * lo:.3g}%" if np.isinf(hi) else f"{100 * lo:.3g}-{100 * hi:.3g}%")
    return out


def relative_size(box_w: ArrayLike, box_h: ArrayLike, region_w: float, region_h: float) -> np.ndarray:
    """``sqrt(w*h) / max(region_w, region_h)`` (see module docstring for why)."""
    side = max(float(region_w), float(region_h))
    if not side > 0:
        raise ValueError(f"region {region_w}x{region_h} must have a positive side")
    w = np.asarray(box_w, dtype=np.float64)
    h = np.asarray(box_h, dtype=np.float64)
    return np.sqrt(np.clip(w, 0, None) * np.clip(h, 0, None)) / side


def bin_index(sizes: ArrayLike) -> np.ndarray:
    """Bin (0..21) of each relative size; half-open bins, edges go up, ``>= 1`` is bin 21."""
    s = np.asarray(sizes, dtype=np.float64)
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("relative sizes must be finite and >= 0")
    return np.searchsorted(EDGES, s, side="right").astype(np.intp)


def histogram(sizes: ArrayLike) -> np.ndarray:
    """Object counts per bin (length 22, float64 so it can be weighted and normalised)."""
    idx = bin_index(sizes)
    return np.bincount(idx.ravel(), minlength=N_BINS).astype(np.float64)
