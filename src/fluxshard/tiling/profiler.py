"""Bootstrap phase (§3.1): profile a detector family on this machine, extract historical objects.

**Latency** (§3.1.1). Each family member is timed as the runtime calls it (:meth:`DetectorFamily.run_tile`:
crop, letterbox, body, decode, per-tile NMS) on real tiles of the profiling frames, members interleaved
round-robin so machine noise hits all of them alike; mean and p99 (numpy linear interpolation) per member.
The load average is recorded in the profile's ``meta`` because the machine is shared.

**Accuracy** (§3.1.1). Profiling images = original frames plus uniformly partitioned sub-images: for every
member input size ``s`` the ``ceil(W/s) x ceil(H/s)`` grid (the paper's "for each available model
resolution") and the grid of ``s/2`` cells (objects as a 2x zoom shows them, so the upper bins get data;
at most ``max_cells`` cells of each fine grid per frame, spread evenly). No ground truth: each original
frame's *reference* objects are uniform tiling with the most accurate member
(:attr:`DetectorFamily.reference_model`: the network's trained input size, else the largest), score >= 0.5
(the paper's historical-object extraction, the same confident-output rule as :mod:`fluxshard.metrics`). In a
sub-image, a reference box at least 70 % inside is an object (clipped); one partly inside is an ``iscrowd``
region, so detections of its visible part are neither rewarded nor punished. Every member runs on every
image; the accuracy of bin k is COCO AP@[.5:.95] (pycocotools, unchanged) restricted to objects whose
relative size (``bins.relative_size`` w.r.t. the image) is in bin k - COCOeval's own area-range mechanism,
with ``area = (1000 * relative size)^2``. Bins with fewer than ``MIN_BIN_OBJECTS`` reference objects are
filled: linear interpolation between measured neighbours, 0 below the smallest measured bin (a detector
never gets better on smaller objects), the last measured value above the largest.

The same pass yields the **Remix baseline's absolute profile**: 12 bins over the object side in *model-input*
pixels (``[0, 8)``, ten uniform bins up to 196, ``>= 196``; Remix's bins with its scaling correction for
tiles), stored in ``meta["remix"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.cpu import cpu_name
from fluxshard.files import cache_root
from fluxshard.models.base import Detections
from fluxshard.tiling.bins import EDGES, N_BINS, REMIX_EDGES_PX
from fluxshard.tiling.infer import DetectorFamily, TileRun, merge, reference_grid, uniform_grid
from fluxshard.tiling.profile import (
    PLAN_TAIL_DURATIONS,  # noqa: F401  (re-exported: the plan tail model moved to profile.py)
    PLAN_TAIL_QUANTILE,
    FamilyProfile,
    ModelProfile,
    ProfileError,
    geometry_key,
    load_profile,
    plan_tail_table,
)

REFERENCE_MIN_SCORE = 0.5
VISIBLE_OBJECT = 0.7
MIN_BIN_OBJECTS = 3
AREA_UNIT = 1000.0
REMIX_EDGES: np.ndarray = np.asarray(REMIX_EDGES_PX, dtype=np.float64)  # 11 interior edges -> 12 bins
SHIPPED_DIR = Path(__file__).with_name("profiles")

Progress = Callable[[str, int, int], None]


def machine_key() -> str:
    """CPU model, logical CPUs and torch threads: what the latencies depend on."""
    import torch

    return f"{cpu_name()} x{os.cpu_count()} t{torch.get_num_threads()}"


def cache_dir() -> Path:
    return cache_root() / "tiling"


def cache_path(family: DetectorFamily) -> Path:
    import hashlib

    m = hashlib.sha256(machine_key().encode()).hexdigest()[:10]
    return cache_dir() / f"{family.model}-{family.weights_hash()}-{m}.json"


def shipped_profile_path(model: str = "nanodet") -> Path:
    return SHIPPED_DIR / f"{model}.json"


# ----------------------------------------------------------------------------------------- reference objects


def reference_detections(family: DetectorFamily, rgb: np.ndarray, model: int | None = None,
                         overlap: bool = False) -> Detections:
    """Uniform tiling of the frame with one member (default: the reference member), merged with NMS;
    ``overlap`` adds the half-cell-shifted cells (:func:`fluxshard.tiling.infer.reference_grid`)."""
    m = family.reference_model if model is None else model
    h, w = rgb.shape[:2]
    runs = [family.run_tile(rgb, rect, m) for rect in reference_grid(w, h, family.sizes[m], overlap)]
    return merge([r.detections for r in runs])


def extract_history(family: DetectorFamily, frames: Sequence[np.ndarray], min_score: float = REFERENCE_MIN_SCORE,
                    progress: Progress | None = None, scale: float = 1.0) -> tuple[np.ndarray, list[float]]:
    """§3.1.2: historical objects (global-view xyxy, pooled over frames) and the merge times (ms) seen.

    ``scale`` > 1 runs the uniform tiling at that many input px per global-view px (grid cells of
    ``input / scale`` global px, up-sampled): the pixel scale at which the camera will see the scene."""
    boxes, merge_ms = [], []
    for i, rgb in enumerate(frames):
        m = family.reference_model
        h, w = rgb.shape[:2]
        runs = [family.run_tile(rgb, rect, m) for rect in uniform_grid(w, h, family.sizes[m] / max(scale, 1.0))]
        t0 = time.perf_counter()
        det = merge([r.detections for r in runs])
        merge_ms.append(1e3 * (time.perf_counter() - t0))
        boxes.append(det.boxes[det.scores >= min_score])
        if progress:
            progress("history", i + 1, len(frames))
    return (np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4))), merge_ms


# ------------------------------------------------------------------------------------------------ accuracy


def _cells(w: int, h: int, cell: float, max_cells: int | None) -> list[tuple[int, int, int, int]]:
    nx, ny = max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))
    if nx == 1 and ny == 1:
        return []
    rects = [(round(c * w / nx), round(r * h / ny), round((c + 1) * w / nx), round((r + 1) * h / ny))
             for r in range(ny) for c in range(nx)]
    if max_cells is not None and len(rects) > max_cells:
        idx = np.linspace(0, len(rects) - 1, max_cells).round().astype(int)
        rects = [rects[i] for i in idx]
    return rects


def sub_images(w: int, h: int, sizes: Sequence[int], max_cells: int = 4) -> list[tuple[int, int, int, int]]:
    """The original frame plus the distinct partition cells used for profiling (see module docstring)."""
    out = [(0, 0, w, h)]
    for s in sorted(set(sizes)):
        out += _cells(w, h, s, None)
        out += _cells(w, h, s / 2, max_cells)
    seen, uniq = set(), []
    for r in out:
        if r not in seen:
            seen.add(r)
            uniq.append(r)
    return uniq


def _clip_reference(ref: Detections, rect: tuple[int, int, int, int]) -> list[tuple[np.ndarray, int, bool]]:
    """(clipped box in sub-image px, class, is_crowd) for reference boxes overlapping the sub-image."""
    x0, y0, x1, y1 = rect
    out = []
    for b, c in zip(ref.boxes.astype(np.float64), ref.class_ids, strict=True):
        area = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
        cb = np.array([max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1)])
        inter = max(cb[2] - cb[0], 0) * max(cb[3] - cb[1], 0)
        if area <= 0 or inter <= 0:
            continue
        out.append((cb - [x0, y0, x0, y0], int(c), inter / area < VISIBLE_OBJECT))
    return out


def _bin_ap(images: list[dict[str, Any]], gts: list[list[tuple[np.ndarray, int, bool]]],
            dets: list[Detections], size_of: Callable[[np.ndarray, dict[str, Any]], np.ndarray],
            edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP@[.5:.95] per size bin (NaN where empty) and reference-object counts per bin."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_bins = len(edges) + 1
    lo = np.concatenate([[0.0], edges])
    hi = np.concatenate([edges, [1e9]])
    cats = sorted({c for g in gts for _, c, _ in g} | {int(c) for d in dets for c in d.class_ids})
    anns, res, counts = [], [], np.zeros(n_bins)
    for i, (img, g, d) in enumerate(zip(images, gts, dets, strict=True)):
        if g:
            gb = np.array([b for b, _, _ in g])
            gs = size_of(gb, img)
            for (b, c, crowd), s in zip(g, gs, strict=True):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "iscrowd": int(crowd),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float((AREA_UNIT * s) ** 2)})
                if not crowd:
                    counts[int(np.searchsorted(edges, s, side="right"))] += 1
        if len(d):
            ds = size_of(d.boxes.astype(np.float64), img)
            for b, sc, c, s in zip(d.boxes, d.scores, d.class_ids, ds, strict=True):
                res.append({"id": len(res) + 1, "image_id": i + 1, "category_id": int(c), "score": float(sc),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "area": float((AREA_UNIT * s) ** 2), "iscrowd": 0})
    ap = np.full(n_bins, np.nan)
    if not anns or not res:
        return (np.where(counts > 0, 0.0, np.nan) if anns else ap), counts
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "width": im["w"], "height": im["h"]} for i, im in enumerate(images)],
                      "annotations": anns, "categories": [{"id": c} for c in cats]}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "annotations": res, "categories": gt.dataset["categories"]}
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.areaRng = [[float((AREA_UNIT * a) ** 2), float((AREA_UNIT * b) ** 2)] for a, b in zip(lo, hi,
                                                                                                        strict=True)]
        ev.params.areaRngLbl = [f"b{k}" for k in range(n_bins)]
        ev.params.maxDets = [100]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, :, 0]  # T x R x K x A
    for k in range(n_bins):
        p = prec[:, :, :, k]
        v = p[p > -1]
        if counts[k] > 0:
            ap[k] = float(v.mean()) if v.size else 0.0
    return ap, counts


def fill_bins(ap: np.ndarray, counts: np.ndarray, min_objects: int = MIN_BIN_OBJECTS) -> np.ndarray:
    """Empty / thin bins: interpolate between measured neighbours, 0 below, last measured value above."""
    ok = (counts >= min_objects) & np.isfinite(ap)
    out = np.zeros(len(ap))
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    x = np.arange(len(ap))
    out = np.interp(x, idx, ap[idx])
    out[x < idx[0]] = 0.0
    return np.clip(out, 0.0, 1.0)


def _rel_size(boxes: np.ndarray, img: dict[str, Any]) -> np.ndarray:
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)) / max(
        img["w"], img["h"])


def profile_family(
    family: DetectorFamily,
    frames: Sequence[np.ndarray],
    *,
    latency_runs: int = 100,
    max_cells: int = 4,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> FamilyProfile:
    """Measure latency (mean, p99) and the 22-bin (and Remix 12-bin) accuracy vectors of every member."""
    import torch

    if not frames:
        raise ValueError("profiling needs at least one frame")
    family.warmup()
    load_before = os.getloadavg()
    images, gts, dets_per_model = [], [], [[] for _ in family.sizes]
    n_images = sum(len(sub_images(f.shape[1], f.shape[0], family.sizes, max_cells)) for f in frames)
    total = len(frames) + n_images * len(family.sizes)
    done = 0
    refs = []
    for rgb in frames:
        refs.append(reference_detections(family, rgb).filter(REFERENCE_MIN_SCORE))
        done += 1
        if progress:
            progress("reference", done, total)
    for fi, rgb in enumerate(frames):
        for rect in sub_images(rgb.shape[1], rgb.shape[0], family.sizes, max_cells):
            x0, y0, x1, y1 = rect
            crop = rgb[y0:y1, x0:x1]
            images.append({"w": x1 - x0, "h": y1 - y0})
            gts.append(_clip_reference(refs[fi], rect))
            for m in range(len(family.sizes)):
                det, _ = family.run_crop(crop, m)
                dets_per_model[m].append(det)
                done += 1
                if progress:
                    progress("accuracy", done, total)
    acc, remix_acc, counts_rel, counts_abs = [], [], None, []
    for m, s in enumerate(family.sizes):
        ap, counts_rel = _bin_ap(images, gts, dets_per_model[m], _rel_size, EDGES)
        acc.append(fill_bins(ap, counts_rel))
        rap, rc = _bin_ap(images, gts, dets_per_model[m], lambda b, img, s=s: _rel_size(b, img) * s / AREA_UNIT,
                          REMIX_EDGES / AREA_UNIT)
        remix_acc.append(fill_bins(rap, rc))
        counts_abs.append(rc.tolist())
    times = measure_latency(family, frames, latency_runs, progress)
    models = []
    for m, s in enumerate(family.sizes):
        t = np.asarray(times[m])
        models.append(ModelProfile(family.names[m], int(s), float(t.mean()), float(np.percentile(t, 99)),
                                   tuple(float(a) for a in acc[m])))
    info = {
        "model": family.model,
        "weights_hash": family.weights_hash(),
        "machine": machine_key(),
        "threads": torch.get_num_threads(),
        "memory_format": "channels_last" if family.fmt == torch.channels_last else "nchw",
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "latency_runs": latency_runs,
        "latency_median_ms": [round(float(np.median(t)), 3) for t in times],
        "profiling_frames": len(frames),
        "profiling_images": len(images),
        "bin_objects": [int(c) for c in (counts_rel if counts_rel is not None else [])],
        "accuracy_metric": "COCO AP@[.5:.95] per relative-size bin vs uniform tiling with the reference member",
        "reference_model": family.names[family.reference_model],
        "remix": {"edges_px": [float(e) for e in REMIX_EDGES],
                  "accuracy": {family.names[m]: [float(a) for a in remix_acc[m]] for m in range(len(family.sizes))},
                  "bin_objects": counts_abs},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(meta or {}),
    }
    return FamilyProfile(tuple(models), 0.0, info)


def measure_latency(family: DetectorFamily, frames: Sequence[np.ndarray], runs: int = 100,
                    progress: Progress | None = None) -> list[list[float]]:
    """Per member, ``runs`` timings (ms) of :meth:`DetectorFamily.run_tile` on random quad-tree cells (depth
    0-2) of the frames, members interleaved round-robin."""
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[] for _ in family.sizes]
    for r in range(runs):
        rgb = frames[int(rng.integers(len(frames)))]
        h, w = rgb.shape[:2]
        n = 2 ** int(rng.integers(0, 3))
        c, q = int(rng.integers(n)), int(rng.integers(n))
        rect = (c * w / n, q * h / n, (c + 1) * w / n, (q + 1) * h / n)
        for m in range(len(family.sizes)):
            times[m].append(family.run_tile(rgb, rect, m).ms)
        if progress:
            progress("latency", r + 1, runs)
    return times


def remeasure_latency(profile: FamilyProfile, family: DetectorFamily, frames: Sequence[np.ndarray],
                      runs: int = 100, progress: Progress | None = None) -> FamilyProfile:
    """The same profile with latencies measured again now (accuracy does not depend on machine load)."""
    family.warmup()
    before = os.getloadavg()
    times = measure_latency(family, frames, runs, progress)
    models = tuple(ModelProfile(m.name, m.input_size, float(np.mean(t)), float(np.percentile(t, 99)), m.accuracy)
                   for m, t in zip(profile.models, times, strict=True))
    meta = {**profile.meta, "loadavg_before": [round(v, 2) for v in before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "latency_runs": runs,
            "latency_median_ms": [round(float(np.median(t)), 3) for t in times], "machine": machine_key(),
            "latency_measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return dataclasses.replace(profile, models=models, meta=meta)


def profiling_frames(clips: Sequence[tuple[str, int, int, int]]) -> list[np.ndarray]:
    """Frames ``(clip, start, stop, step)`` decoded as RGB (the profiling data set)."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.video import open_video

    out = []
    for clip, start, stop, step in clips:
        for f in open_video(clip_path(clip), export_mvs=False, max_frames=stop):
            if f.index >= start and (f.index - start) % step == 0:
                out.append(np.ascontiguousarray(f.rgb))
    return out


# vtest frames the PTZ benchmark clips (source frames 0..~200) never show, plus two other scenes.
DEFAULT_PROFILING_SET: tuple[tuple[str, int, int, int], ...] = (
    ("vtest", 300, 795, 55), ("bikes", 10, 250, 60), ("cup", 5, 217, 50),
)


def remix_accuracy(profile: FamilyProfile) -> tuple[np.ndarray, np.ndarray]:
    """(edges_px, (n_models, 12) accuracy) of the Remix absolute-size profile stored in ``meta``."""
    r = profile.meta.get("remix")
    if not isinstance(r, dict) or "accuracy" not in r:
        raise ProfileError("profile has no Remix absolute-size accuracy (meta.remix); re-profile the family")
    acc = np.array([r["accuracy"][n] for n in profile.names], dtype=np.float64)
    return np.asarray(r["edges_px"], dtype=np.float64), acc


def get_profile(family: DetectorFamily, path: str | Path | None = None, *, refresh: bool = False,
                progress: Progress | None = None) -> tuple[FamilyProfile, Path, bool]:
    """(profile, path, measured_now): an explicit file, else the cache for this model + machine (profiled
    and written on first use). ``path='shipped'`` selects the profile shipped in the package."""
    if path is not None:
        p = shipped_profile_path(family.model) if str(path) == "shipped" else Path(path)
        prof = load_profile(p)
        _check_names(prof, family, p)
        return prof, p, False
    p = cache_path(family)
    if p.exists() and not refresh:
        prof = load_profile(p)
        _check_names(prof, family, p)
        return prof, p, False
    prof = profile_family(family, profiling_frames(DEFAULT_PROFILING_SET), progress=progress)
    prof.save(p)
    return prof, p, True


def _check_names(prof: FamilyProfile, family: DetectorFamily, path: Path) -> None:
    if prof.names != family.names:
        raise ProfileError(f"{path}: profile is for {prof.names}, the family is {family.names}")


def profile_summary(prof: FamilyProfile) -> dict[str, Any]:
    return {"models": [{"name": m.name, "input": m.input_size, "mean_ms": round(m.mean_ms, 2),
                        "p99_ms": round(m.p99_ms, 2)} for m in prof.models],
            "machine": prof.meta.get("machine"), "loadavg": prof.meta.get("loadavg_before")}


def dumps(prof: FamilyProfile) -> str:
    return json.dumps(prof.to_json(), indent=1)


# ---------------------------------------------------------------------------------------- deployment profile

DEPLOY_ZOOM_SPAN = 2.0
DEPLOY_TIMING_ROUNDS = 60


def render_views(frames: Sequence[np.ndarray], meta: dict[str, Any], n_views: int,
                 zoom_span: float = DEPLOY_ZOOM_SPAN, seed: int = 0) -> list[np.ndarray]:
    """Global-view frames seen through seeded random virtual-PTZ windows at the camera's output size:
    zoom log-uniform in ``[zoom_min, zoom_span * zoom_min]`` (the widest view up to ``zoom_span`` x
    magnification), window centre uniform over the positions that keep the window inside the source."""
    from fluxshard.data.ptz import resample

    if not frames:
        raise ValueError("rendering views needs at least one global-view frame")
    rng = np.random.default_rng(seed)
    w, h = int(meta["size"][0]), int(meta["size"][1])
    base = float(meta["base_scale"])
    z0 = float(meta["zoom_limits"][0])
    out = []
    for i in range(n_views):
        src = frames[i % len(frames)]
        sh, sw = src.shape[:2]
        z = z0 * float(np.exp(rng.uniform(0.0, np.log(max(zoom_span, 1.0)))))
        sc = base / z
        hx, hy = sc * (w - 1) / 2, sc * (h - 1) / 2
        cx = float(rng.uniform(hx, sw - 1 - hx)) if sw - 1 - hx > hx else (sw - 1) / 2
        cy = float(rng.uniform(hy, sh - 1 - hy)) if sh - 1 - hy > hy else (sh - 1) / 2
        out.append(resample(src, [[sc, 0.0, cx - hx], [0.0, sc, cy - hy]], (w, h)))
    return out


def planner_geometries(width: int, height: int, depth: int, sizes: Sequence[int]) -> list[tuple[float, float]]:
    """Distinct tile sizes the planner and the baselines can run: quad-tree levels and every uniform grid."""
    geo = [(width / 2**d, height / 2**d) for d in range(depth + 1)]
    for s in sizes:
        nx, ny = math.ceil(width / s), math.ceil(height / s)
        geo.append((width / nx, height / ny))
    seen, out = set(), []
    for g in geo:
        if geometry_key(*g) not in seen:
            seen.add(geometry_key(*g))
            out.append(g)
    return out


def _tile_truth(ref: Detections, rect: Sequence[float]) -> list[tuple[np.ndarray, int, bool]]:
    """Reference objects of a planner tile: boxes whose centre is in the tile (whole: padding and the merge
    keep boxes whole, and the planner assigns objects to tiles by centre); boxes overlapping the tile with
    their centre outside are ``iscrowd`` (their detections in the padding band are neither TP nor FP)."""
    x0, y0, x1, y1 = rect
    out = []
    for b, c in zip(ref.boxes.astype(np.float64), ref.class_ids, strict=True):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside = x0 <= cx < x1 and y0 <= cy < y1
        if inside:
            out.append((b, int(c), False))
        elif b[2] > x0 and b[0] < x1 and b[3] > y0 and b[1] < y1:
            out.append((b, int(c), True))
    return out


def _in_tile(det: Detections, rect: Sequence[float]) -> Detections:
    if not len(det):
        return det
    cx = (det.boxes[:, 0] + det.boxes[:, 2]) / 2
    cy = (det.boxes[:, 1] + det.boxes[:, 3]) / 2
    k = (cx >= rect[0]) & (cx < rect[2]) & (cy >= rect[1]) & (cy < rect[3])
    return Detections(det.boxes[k], det.scores[k], det.class_ids[k], det.class_names)


def geometry_accuracy(ap: np.ndarray, counts: np.ndarray, pooled: np.ndarray,
                      min_objects: int = MIN_BIN_OBJECTS) -> np.ndarray:
    """A member's accuracy on one tile geometry: the geometry's own AP in bins with at least ``min_objects``
    reference objects, the member's pooled (all geometries) vector elsewhere."""
    own = (counts >= min_objects) & np.isfinite(ap)
    return np.clip(np.where(own, np.nan_to_num(ap), pooled), 0.0, 1.0)


def tile_latency_table(samples: dict[tuple[str, int], list[float]], n_models: int,
                       ) -> tuple[dict[str, list[list[float]]], float]:
    """``{geometry: [[mean, p99] per model]}`` from timed runs, and the pooled median of ``t / mean``.

    The mean is per (geometry, member). The p99 is ``mean * q`` with ``q`` the 99th percentile of every run's
    ``t / mean`` pooled over all cells: a dozen runs per cell say little about its own tail, while the tail's
    *shape* (load spikes hit every member alike) is shared. A cell's p99 is never below its own maximum."""
    means = {k: float(np.mean(v)) for k, v in samples.items() if v}
    ratios = np.concatenate([np.asarray(v) / means[k] for k, v in samples.items() if v])
    q99 = float(np.percentile(ratios, 99))
    table: dict[str, list[list[float]]] = {}
    for g in sorted({k[0] for k in means}):
        if all((g, m) in means for m in range(n_models)):
            table[g] = [[round(means[(g, m)], 3), round(max(means[(g, m)] * q99, max(samples[(g, m)])), 3)]
                        for m in range(n_models)]
    return table, float(np.median(ratios))


CALIB_CLAMP = (0.5, 2.0)
CALIB_MIN_ESTIMATE = 0.02


def plan_calibration(refs: Sequence[Detections], runs: Sequence[dict[tuple[tuple[float, ...], int], Detections]],
                     width: int, height: int, grids: Sequence[tuple[int, int]], tile_acc: dict[str, list[list[float]]],
                     pooled: np.ndarray, clamp: tuple[float, float] = CALIB_CLAMP) -> dict[str, list[float]]:
    """Plan-level calibration of the accuracy model, per tile geometry and member.

    For each ``(nx, ny)`` grid in ``grids`` and member ``m``, the plan "every cell of the grid run with ``m``" is
    evaluated on the deployment views: its measured COCO AP@[.5:.95] (the cells' detections merged with NMS,
    against each view's reference, as the benchmark scores a plan) over its estimated PeAP (the planner's
    value, object-weighted over the views, with the view's own reference objects as the distribution - so
    only the accuracy model is tested, not the history). The factor is ``measured / estimated`` clamped to
    ``clamp``; 1 when the estimate is below :data:`CALIB_MIN_ESTIMATE` or nothing was measured. What it
    corrects: per-tile AP is scored tile by tile (objects by centre, cut ones ignored), so it misses what
    the merge does across tiles (duplicates of cut objects, score ranking across tiles and members) and how
    closely a member's boxes match the reference's - measured on wide_a without calibration, UT-416 scored
    0.95 where its estimate said 0.84, DS-416 0.22 for 0.34 (ratios 0.6-1.13 across the eight fixed
    configurations).
    ``runs[v][(rect rounded to 3 decimals, m)]``: the tile's detections in view px."""
    from fluxshard.metrics.coco import DENSE_REFERENCE, average_precision
    from fluxshard.tiling.planner import count_objects, grid_histograms

    n_models = len(pooled)
    out: dict[str, list[float]] = {}
    for nx, ny in grids:
        tw, th = width / nx, height / ny
        g = geometry_key(tw, th)
        if g in out:
            continue
        acc = np.array(tile_acc[g], dtype=np.float64) if g in tile_acc else np.asarray(pooled, dtype=np.float64)
        cells = [tuple(round(v, 3) for v in (c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                 for r in range(ny) for c in range(nx)]
        n_obj = sum(count_objects(ref.boxes, width, height) for ref in refs)
        hist = sum(grid_histograms(ref.boxes, width, height, nx, ny).sum(axis=0) for ref in refs)
        row = []
        for m in range(n_models):
            est = float(np.asarray(hist) @ acc[m]) / n_obj if n_obj else 0.0
            preds = []
            for vr in runs:
                if not all((c, m) in vr for c in cells):
                    preds = []
                    break
                preds.append(merge([vr[(c, m)] for c in cells]))
            real = average_precision(preds, list(refs), "bbox", DENSE_REFERENCE).map if preds else float("nan")
            ok = est >= CALIB_MIN_ESTIMATE and np.isfinite(real)
            row.append(round(float(np.clip(real / est, *clamp)), 4) if ok else 1.0)
        out[g] = row
    return out


def deployment_profile(
    family: DetectorFamily,
    base: FamilyProfile,
    views: Sequence[np.ndarray],
    depth: int,
    *,
    timing_rounds: int = DEPLOY_TIMING_ROUNDS,
    overlap_reference: bool = True,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> FamilyProfile:
    """The family profiled on the deployment's own images and tiles (§3.1.1 with a per-deployment data set).

    ``views``: global-view frames at the camera's output size and pixel scale (:func:`render_views`). Each
    member runs on every quad-tree node (depth 0..``depth``) and on its own uniform grid, exactly as the
    runtime runs tiles (:meth:`DetectorFamily.run_tile`, padded); its accuracy over the 22 relative-size bins
    (and Remix's 12 absolute ones) is COCO AP against the reference of the view (uniform tiling with the
    reference member, ``overlap_reference`` as the evaluation), objects assigned to tiles by centre and sized
    w.r.t. the tile, as the planner does. Latency: every run above plus ``timing_rounds`` rounds of one random
    tile of one planner geometry run by all members, tabulated per geometry (:func:`tile_latency_table`)."""
    if not views:
        raise ValueError("a deployment profile needs at least one view")
    family.warmup()
    h, w = views[0].shape[:2]
    n_models = len(family.sizes)
    geos = planner_geometries(w, h, depth, family.sizes)
    samples: dict[tuple[str, int], list[float]] = {}
    sequence: list[tuple[tuple[str, int], float]] = []  # every timed run in order (the plan tail model)
    per_model: list[tuple[list[dict[str, Any]], list[Any], list[Detections]]] = [([], [], []) for _ in family.sizes]
    from fluxshard.tiling.planner import QuadTree

    tree = QuadTree.build(w, h, depth)
    quad = [(tuple(float(v) for v in rect), m) for rect in tree.rects for m in range(n_models)]
    for m, s in enumerate(family.sizes):
        quad += [(r, m) for r in uniform_grid(w, h, s)]
    total = len(views) * len(quad) + timing_rounds
    done = 0
    load_before = os.getloadavg()

    def timed(run: TileRun) -> TileRun:
        key = (geometry_key(run.rect[2] - run.rect[0], run.rect[3] - run.rect[1]), run.model)
        samples.setdefault(key, []).append(run.ms)
        sequence.append((key, run.ms))
        return run

    refs: list[Detections] = []
    view_runs: list[dict[tuple[tuple[float, ...], int], Detections]] = []
    for view in views:
        ref = reference_detections(family, view, overlap=overlap_reference).filter(REFERENCE_MIN_SCORE)
        refs.append(ref)
        view_runs.append({})
        seen: set[tuple[tuple[float, ...], int]] = set()
        for rect, m in quad:
            key = (tuple(round(v, 3) for v in rect), m)
            done += 1
            if key in seen:
                continue
            seen.add(key)
            run = timed(family.run_tile(view, rect, m))
            view_runs[-1][key] = run.detections
            imgs, gts, dets = per_model[m]
            imgs.append({"w": rect[2] - rect[0], "h": rect[3] - rect[1]})
            gts.append(_tile_truth(ref, rect))
            dets.append(_in_tile(run.detections, rect))
            if progress:
                progress("deployment accuracy", done, total)
    rng = np.random.default_rng(1)
    for r in range(timing_rounds):
        view = views[int(rng.integers(len(views)))]
        gw, gh = geos[r % len(geos)]
        nx, ny = round(w / gw), round(h / gh)
        c, q = int(rng.integers(nx)), int(rng.integers(ny))
        rect = (c * gw, q * gh, (c + 1) * gw, (q + 1) * gh)
        for m in range(n_models):
            timed(family.run_tile(view, rect, m))
        done += 1
        if progress:
            progress("deployment latency", done, total)
    acc, remix_acc, counts_rel, counts_abs = [], {}, None, []
    per_geo: dict[str, list[list[float]]] = {}
    for m, s in enumerate(family.sizes):
        imgs, gts, dets = per_model[m]
        ap, counts_rel = _bin_ap(imgs, gts, dets, _rel_size, EDGES)
        pooled = fill_bins(ap, counts_rel)
        acc.append(pooled)
        rap, rc = _bin_ap(imgs, gts, dets, lambda b, img, s=s: _rel_size(b, img) * s / AREA_UNIT,
                          REMIX_EDGES / AREA_UNIT)
        remix_acc[family.names[m]] = [float(a) for a in fill_bins(rap, rc)]
        counts_abs.append(rc.tolist())
        for g in {geometry_key(im["w"], im["h"]) for im in imgs}:
            k = [i for i, im in enumerate(imgs) if geometry_key(im["w"], im["h"]) == g]
            gap, gc = _bin_ap([imgs[i] for i in k], [gts[i] for i in k], [dets[i] for i in k], _rel_size, EDGES)
            per_geo.setdefault(g, [list(map(float, v)) for v in [[np.nan] * N_BINS] * n_models])
            per_geo[g][m] = [float(v) for v in geometry_accuracy(gap, gc, pooled)]
    tile_acc = {g: [[float(np.round(v, 4)) for v in (row if np.all(np.isfinite(row)) else acc[m])]
                    for m, row in enumerate(rows)] for g, rows in per_geo.items()}
    grids = [(2**d, 2**d) for d in range(depth + 1)] + [(math.ceil(w / s), math.ceil(h / s)) for s in family.sizes]
    calib = plan_calibration(refs, view_runs, w, h, grids, tile_acc, np.array(acc))
    table, ratio_median = tile_latency_table(samples, n_models)
    means = {k: float(np.mean(v)) for k, v in samples.items()}
    runs = [(round(ms, 3), round(means[k], 3)) for k, ms in sequence]
    tail = plan_tail_table([o for o, _ in runs], [m for _, m in runs])
    models = tuple(ModelProfile(b.name, b.input_size, b.mean_ms, b.p99_ms, tuple(float(a) for a in acc[m]))
                   for m, b in enumerate(base.models))
    info = {
        **base.meta,
        "deployment": {"views": len(views), "size": [w, h], "depth": depth, "geometries": list(table),
                       "tiles_per_view": len(quad), "timing_rounds": timing_rounds,
                       "overlap_reference": overlap_reference, "bin_objects": [int(c) for c in counts_rel],
                       "ratio_median": round(ratio_median, 4), "timed_runs": len(sequence),
                       "plan_tail_quantile": PLAN_TAIL_QUANTILE,
                       "loadavg_before": [round(v, 2) for v in load_before],
                       "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})},
        "remix": {"edges_px": [float(e) for e in REMIX_EDGES], "accuracy": remix_acc, "bin_objects": counts_abs},
    }
    return FamilyProfile(models, 0.0, info, table, tile_acc, tuple((float(d), float(q)) for d, q in tail), calib,
                         tuple(runs))


def deployment_cached(family: DetectorFamily, base: FamilyProfile, history_frames: Sequence[np.ndarray],
                      meta: dict[str, Any] | None, n_views: int, depth: int, *, overlap_reference: bool = True,
                      history_desc: str = "", progress: Progress | None = None) -> tuple[FamilyProfile, str]:
    """:func:`deployment_profile` on views of the historical frames (rendered through the camera's zoom
    range with a virtual-PTZ JSON, else the frames themselves), cached beside the family profiles under a key
    of everything it depends on. Returns (profile, description)."""
    import hashlib

    if meta is not None:
        views = render_views(history_frames, meta, n_views)
        scene = {k: meta.get(k) for k in ("source", "size", "base_scale", "zoom_limits")}
    else:
        views = list(history_frames[:n_views])
        scene = {"size": list(views[0].shape[1::-1]) if views else None}
    key = json.dumps({"format": 4, "family": family.weights_hash(), "machine": machine_key(), "scene": scene,
                      "history": history_desc, "views": n_views, "depth": depth, "span": DEPLOY_ZOOM_SPAN,
                      "overlap": overlap_reference, "rounds": DEPLOY_TIMING_ROUNDS, "base": base.names},
                     sort_keys=True)
    path = cache_dir() / f"deploy-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        prof = load_profile(path)
        if prof.names == base.names:
            return prof, f"deployment profile {path} (cached)"
    prof = deployment_profile(family, base, views, depth, overlap_reference=overlap_reference, progress=progress,
                              meta={"key": json.loads(key)})
    prof.save(path)
    return prof, f"deployment profile {path} (measured now)"


__all__ = ["N_BINS", "deployment_profile", "extract_history", "get_profile", "profile_family", "profiling_frames",
           "remix_accuracy", "render_views"]
