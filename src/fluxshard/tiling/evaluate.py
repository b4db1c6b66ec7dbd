"""One evaluation loop for Uirapuru and the baselines on a clip (``fluxshard tile`` / ``tile-bench``).

Bootstrap (once per clip): historical objects from global-view frames (uniform tiling with the reference
member, :attr:`DetectorFamily.reference_model`), the plan-runtime estimate (§3.1.3) and the merge estimate.
Then per frame: camera transform (from the virtual-PTZ JSON beside the clip, or estimated from motion
vectors), every method's plan, its tiles and the NMS merge; mAP against the reference (uniform tiling
with the reference member on the same frame).

Decisions:

* **Historical frames.** With a virtual-PTZ JSON the global view is the source clip: ``history`` frames of it
  evenly spread over the source frames the PTZ clip does *not* show (all of them if it shows every one).
  Without a JSON the camera is assumed at rest for the clip's first ``history`` frames, which are the global
  view (initial transform = identity; those frames are evaluated too).
* **History pixel scale.** A virtual-PTZ view shows the source up-sampled by ``zoom / base_scale`` output px
  per source px, at least ``zoom_min / base_scale`` (its widest view). The historical objects are extracted
  at that widest-view scale (uniform-tiling cells of ``input / scale`` source px), so the history sees the
  scene at the pixel scale the camera does; extracted at source scale it missed the far, small people
  every up-sampled view shows (1280x960 clips: 1.67 output px per source px at the widest zoom).
* **Deployment profile** (``deploy_views`` > 0, default). The generic profile's accuracy vectors come from
  768x576 frames where every member sees people at about the reference's own scale, so on 1280x960 views
  it rated down-sampling with NanoDet-640 (0.71 PeAP) above uniform tiling with the reference member (0.68)
  while they measured 0.31 and 1.0: its estimates did not rank plans. The accuracy vectors and the
  per-tile-geometry latencies are therefore re-measured per deployment on views of the historical frames
  rendered at the camera's output size and zoom range, on the planner's own tiles
  (:func:`fluxshard.tiling.profiler.deployment_profile`), cached per scene.
* **Reference.** Uniform tiling with the reference member *plus* half-cell-shifted cells
  (:func:`fluxshard.tiling.infer.reference_grid`), unless ``overlap_reference=False``: with the plain grid the
  reference is exactly the UT baseline with that member, which then scores 1.0 by construction and no
  estimate-driven method can match it except by electing that very plan. mAP against the plain grid is
  reported too (``map_plain_ref``).
* **Plan-level calibration** (``calibrate``, default on): the deployment profile's per-geometry accuracy
  vectors are scaled by ``measured AP / estimated PeAP`` of the plan "every cell of that geometry with that
  member" on the deployment views (:func:`fluxshard.tiling.profiler.plan_calibration`).
* **Online latency correction** (``online``): each Uirapuru planner feeds its own tile times to
  :class:`fluxshard.tiling.runtime.LoadTracker`, which rescales the planner's latencies for the next frame.
* **Overhead budget.** ``SLO - plan_runtime`` is the inference budget; ``plan_runtime`` = p99 of the planner
  call on the historical objects (30 timings) + p99 of the merge times seen during history extraction, each
  + 10 % (§3.1.3 covers planning; the merge is the other per-frame cost outside the tiles).
* **Shared tile runs.** Within a frame, each distinct (tile, member) runs once and its measured time is
  charged to every method whose plan contains it (methods are modes of one loop, like ``fluxshard bench``);
  a method's frame latency = its planning time + its tiles' measured times + its own merge.
* **Stride.** ``stride > 1`` evaluates every stride-th frame (the camera is still tracked on every frame):
  a benchmark-time saving on two cores, not part of the method.
* **Comparison at an SLO** (:func:`summarise`). Baselines are fixed configurations (DS and UT with each member)
  and the Remix-like planner, planned with means (``remix``) and with the conservative latency model
  (``remix-c``). UNC, which plans to the mean, is compared with ``ds``/``ut`` = the best member (by measured
  mAP, an oracle pick) whose *profiled mean* latency fits, and ``remix``. UC, which promises a per-frame
  SLO, is compared with the baselines that *kept the same promise on the clip*: ``ds-c``/``ut-c`` = the best
  member (by measured mAP) whose *measured* miss rate at this SLO is <= :data:`MISS_BAR` (1 %, the bar UC is
  held to), and ``remix``/``remix-c`` when their measured miss rate is within it. Measured, not profiled,
  eligibility is a hindsight choice that favours the baselines (they need no latency model at all). A
  baseline over the bar is reported with its miss rate and marked, not counted: at that SLO it is not a
  configuration one could deploy. Every SLO row also carries ``map_on_time``: mAP with the frames that
  missed the SLO counted as empty (a late result is a dropped one), one number that charges misses to
  every method alike.
* **Camera for Uirapuru.** ``camera="auto"``: ground truth when the JSON exists, else motion vectors. With
  both available the motion-vector tracker also runs and the mean box-centre distance between the historical
  boxes reprojected by it and by the ground truth is reported (boxes kept by both).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.data.ptz import load_ptz_meta
from fluxshard.errors import DataError, FluxShardError
from fluxshard.metrics.coco import DENSE_REFERENCE, average_precision
from fluxshard.metrics.retention import MIN_REFERENCE_OBJECTS, too_few_note
from fluxshard.models.base import Detections
from fluxshard.tiling.baselines import RemixPlanner, downsample_plan, plan_latencies, uniform_plan
from fluxshard.tiling.camera import CameraTracker, ptz_global_to_view, reproject_boxes
from fluxshard.tiling.infer import DetectorFamily, TileRun, merge, reference_grid, uniform_grid
from fluxshard.tiling.planner import max_depth_for
from fluxshard.tiling.profile import PLAN_RUNTIME_MARGIN, PLAN_TAIL_QUANTILE, FamilyProfile, plan_runtime_estimate
from fluxshard.tiling.profiler import deployment_cached, extract_history
from fluxshard.tiling.runtime import UirapuruPlanner

MODE_SHORT = {"conservative": "uirapuru-c", "non-conservative": "uirapuru-nc"}
MISS_BAR = 0.01  # the conservative mode's per-clip SLO miss-rate bar; baselines are held to it for UC
Progress = Callable[[str, int, int], None]
Key = tuple[str, float | None]
FrameCallback = Callable[[int, np.ndarray, dict[Key, Detections], dict[Key, list[TileRun]]], None]


class TileBenchError(FluxShardError):
    """A clip cannot be evaluated (no frames, unreadable metadata, ...)."""


@dataclass
class FrameRecord:
    frame: int
    method: str
    slo: float | None
    latency_ms: float
    plan_ms: float
    infer_ms: float
    merge_ms: float
    n_tiles: int
    kind: str
    models: str
    fits: bool
    detections: int
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass
class ClipResult:
    clip: str
    size: tuple[int, int]
    frames: int
    camera: str
    history_objects: int
    plan_runtime_ms: float
    max_depth: int
    records: list[FrameRecord]
    detections: dict[tuple[str, float | None], list[Detections]]
    reference: list[Detections]
    reprojection_px: list[float]
    reference_plain: list[Detections] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _history_frames(meta: dict[str, Any] | None, clip: Path, n: int) -> tuple[list[np.ndarray], str]:
    from fluxshard.video import open_video

    if meta is not None:
        src = Path(meta["source"])
        used = {int(f.get("source_frame", i)) for i, f in enumerate(meta["frames"])}
        probe = open_video(src, export_mvs=False)
        total = probe.info.frames_expected
        if total is None:
            total = max(used) + 1
        free = [k for k in range(total) if k not in used] or list(range(total))
        want = set(np.asarray(free)[np.linspace(0, len(free) - 1, min(n, len(free))).round().astype(int)].tolist())
        out = [np.ascontiguousarray(f.rgb) for f in open_video(src, export_mvs=False) if f.index in want]
        return out, f"{src.name} frames {min(want)}..{max(want)} ({len(out)})"
    out = [np.ascontiguousarray(f.rgb) for f in open_video(clip, export_mvs=False, max_frames=n)]
    return out, f"{clip.name} frames 0..{len(out) - 1} (camera assumed at rest)"


def _centres(b: np.ndarray) -> np.ndarray:
    return np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]


def reprojection_error(history: np.ndarray, est: np.ndarray, truth: np.ndarray, w: int, h: int) -> float | None:
    """Mean distance (px) between box centres reprojected by ``est`` and ``truth`` (boxes kept by both)."""
    a, ia = reproject_boxes(history, est, w, h)
    b, ib = reproject_boxes(history, truth, w, h)
    _, ka, kb = np.intersect1d(ia, ib, return_indices=True)
    if not len(ka):
        return None
    return float(np.linalg.norm(_centres(a[ka]) - _centres(b[kb]), axis=1).mean())


def ptz_sidecar(clip: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The virtual-PTZ ground truth beside ``clip`` (its ``.json``): ``(meta, None)``; ``(None, None)`` when
    there is no ``.json``; ``(None, why)`` when the ``.json`` is not PTZ metadata (any other tool's file may sit
    beside a clip): callers then ignore it and estimate the camera from motion vectors, as without one."""
    side = Path(clip).with_suffix(".json")
    if not side.exists():
        return None, None
    try:
        return load_ptz_meta(side), None
    except DataError as exc:
        return None, str(exc)


def run_clip(
    clip: str | Path,
    family: DetectorFamily,
    profile: FamilyProfile,
    slos: Sequence[float],
    *,
    modes: Sequence[str] = ("conservative", "non-conservative"),
    baselines: bool = True,
    camera: str = "auto",
    history: int = 20,
    max_frames: int | None = None,
    max_depth: int | None = None,
    stride: int = 1,
    deploy_views: int = 24,
    overlap_reference: bool = True,
    online: bool = True,
    calibrate: bool = True,
    tail_quantile: float = PLAN_TAIL_QUANTILE,
    progress: Progress | None = None,
    on_frame: FrameCallback | None = None,
) -> ClipResult:
    from fluxshard.motion import MotionStream

    path = Path(clip)
    if not path.exists():
        raise TileBenchError(f"{path}: no such clip")
    meta, sidecar_note = ptz_sidecar(path)
    if camera not in ("auto", "gt", "mv"):
        raise TileBenchError(f"camera must be auto, gt or mv, got {camera!r}")
    if camera == "gt" and meta is None:
        why = f" ({sidecar_note})" if sidecar_note else ""
        raise TileBenchError(f"{path}: --camera gt needs the virtual-PTZ JSON {path.with_suffix('.json')}{why}")
    use_gt = meta is not None and camera != "mv"
    family.warmup()

    # ------------------------------------------------------------------ bootstrap
    hist_frames, hist_desc = _history_frames(meta, path, history)
    if not hist_frames:
        raise TileBenchError(f"{path}: no historical frames could be decoded")
    hist_scale = 1.0
    if meta is not None and "base_scale" in meta and "zoom_limits" in meta:
        hist_scale = max(1.0, float(meta["zoom_limits"][0]) / float(meta["base_scale"]))
    hist_boxes, merge_times = extract_history(family, hist_frames, progress=progress, scale=hist_scale)
    width, height = (int(meta["size"][0]), int(meta["size"][1])) if meta else hist_frames[0].shape[1::-1]
    depth = max_depth_for(width, height, min_leaf=0.75 * min(family.sizes)) if max_depth is None else max_depth
    deploy_desc = "generic profile"
    if deploy_views > 0:
        profile, deploy_desc = deployment_cached(family, profile, hist_frames, meta, deploy_views, depth,
                                                 overlap_reference=overlap_reference, history_desc=hist_desc,
                                                 progress=progress)
    if profile.plan_runs:
        profile = profile.with_tail_quantile(tail_quantile)
        deploy_desc += f" (plan tail at p{tail_quantile:g})"
    if not calibrate and profile.tile_calib:
        profile = dataclasses.replace(profile, tile_calib={})
        deploy_desc += " (plan-level calibration off)"
    initial = ptz_global_to_view(meta, 0) if meta is not None else np.eye(3)
    probe = UirapuruPlanner(profile.with_runtime(0.0), hist_boxes, width, height, "conservative",
                            initial_view=initial, max_depth=depth, online=False)
    probe.plan_frame(max(slos), view=initial)
    plan_times = [probe.plan_frame(max(slos), view=initial).timings_ms["total"] for _ in range(30)]
    merge_est = float(np.percentile(merge_times, 99)) * (1 + PLAN_RUNTIME_MARGIN) if merge_times else 0.0
    runtime = plan_runtime_estimate(plan_times) + merge_est
    prof = profile.with_runtime(runtime)

    # ------------------------------------------------------------------ methods
    planners: dict[tuple[str, float], UirapuruPlanner] = {}
    for mode in modes:
        for slo in slos:
            planners[(MODE_SHORT[mode], float(slo))] = UirapuruPlanner(prof, hist_boxes, width, height, mode,
                                                                      initial_view=initial, max_depth=depth,
                                                                      online=online)
    fixed: dict[tuple[str, float | None], list[tuple[tuple[float, float, float, float], int]]] = {}
    sizes = [int(s) for s in family.sizes]
    ds_lat, ut_lat = plan_latencies(prof, width, height)
    ds_p99, ut_p99 = plan_latencies(prof, width, height, "conservative")
    remix_plans: dict[float, Any] = {}
    if baselines:
        for m, s in enumerate(sizes):
            fixed[(f"ds-{family.names[m]}", None)] = downsample_plan(width, height, m)
            fixed[(f"ut-{family.names[m]}", None)] = uniform_plan(width, height, s, m)
        local0, _ = reproject_boxes(hist_boxes, initial, width, height)
        for name, rmode in (("remix", "non-conservative"), ("remix-c", "conservative")):
            remix = RemixPlanner(prof, width, height, max_depth=depth, mode=rmode)
            for slo in slos:
                res = remix.plan(local0, max(0.0, float(slo) - merge_est))
                remix_plans[(name, float(slo))] = res
                fixed[(name, float(slo))] = [((t.x0, t.y0, t.x1, t.y1), t.model) for t in res.plan.tiles]
    best = family.reference_model

    # ------------------------------------------------------------------ frames
    records: list[FrameRecord] = []
    dets: dict[tuple[str, float | None], list[Detections]] = {k: [] for k in [*planners, *fixed]}
    reference: list[Detections] = []
    reference_plain: list[Detections] = []
    reproj: list[float] = []
    mv_tracker = CameraTracker(initial)
    n_total = max_frames or (len(meta["frames"]) if meta else None) or 0
    n_total = -(-n_total // stride)
    if stride < 1:
        raise TileBenchError(f"stride must be >= 1, got {stride}")
    need_mv = (not use_gt) or meta is not None
    stream = MotionStream(path, max_frames=max_frames)
    n_done = 0
    for mf in stream:
        t = mf.frame.index
        rgb = np.ascontiguousarray(mf.frame.rgb)
        if rgb.shape[:2] != (height, width):
            raise TileBenchError(f"{path}: frame {t} is {rgb.shape[1]}x{rgb.shape[0]}, expected {width}x{height}")
        cache: dict[tuple[tuple[float, ...], int], TileRun] = {}

        def run(tiles: Sequence[tuple[Sequence[float], int]], cache=cache, rgb=rgb) -> list[TileRun]:
            out = []
            for rect, m in tiles:
                key = (tuple(round(float(v), 3) for v in rect), int(m))
                if key not in cache:
                    cache[key] = family.run_tile(rgb, rect, m)
                out.append(cache[key])
            return out

        mv_ms = 0.0
        truth = None
        if need_mv and t > 0:
            t0 = time.perf_counter()
            mv_tracker.update_from_field(mf.field)
            mv_ms = 1e3 * (time.perf_counter() - t0)
        if meta is not None and t < len(meta["frames"]):
            truth = ptz_global_to_view(meta, t)
            if need_mv:
                e = reprojection_error(hist_boxes, mv_tracker.matrix, truth, width, height)
                if e is not None:
                    reproj.append(e)
        view = truth if use_gt and truth is not None else mv_tracker.matrix
        if t % stride:
            continue  # camera tracked on every frame, methods evaluated on every ``stride``-th
        # reference
        ref_runs = run([(r, best) for r in reference_grid(width, height, sizes[best], overlap_reference)])
        reference.append(merge([r.detections for r in ref_runs]))
        n_plain = len(uniform_grid(width, height, sizes[best]))
        reference_plain.append(merge([r.detections for r in ref_runs[:n_plain]]))
        frame_dets: dict[tuple[str, float | None], Detections] = {}
        frame_runs: dict[tuple[str, float | None], list[TileRun]] = {}
        for key, up in planners.items():
            fp = up.plan_frame(key[1], view=view)
            plan = fp.result.plan
            runs = run([((tl.x0, tl.y0, tl.x1, tl.y1), tl.model) for tl in plan.tiles])
            up.observe(runs)
            t0 = time.perf_counter()
            d = merge([r.detections for r in runs])
            merge_ms = 1e3 * (time.perf_counter() - t0)
            plan_ms = fp.timings_ms["total"] + (0.0 if use_gt else mv_ms)
            infer = sum(r.ms for r in runs)
            kind = plan.kind if fp.result.fits else "fallback"
            br = {"preprocess": fp.timings_ms["preprocess"] + (0.0 if use_gt else mv_ms),
                  "dpdp": fp.timings_ms.get("adaptive", 0.0), "uniform": fp.timings_ms.get("uniform", 0.0),
                  "inference": infer, "merge": merge_ms}
            records.append(FrameRecord(t, key[0], key[1], plan_ms + infer + merge_ms, plan_ms, infer, merge_ms,
                                       len(runs), kind, _models(family, runs), fp.result.fits, len(d), br))
            dets[key].append(d)
            frame_dets[key] = d
            frame_runs[key] = runs
        for key, tiles in fixed.items():
            runs = run(tiles)
            t0 = time.perf_counter()
            d = merge([r.detections for r in runs])
            merge_ms = 1e3 * (time.perf_counter() - t0)
            infer = sum(r.ms for r in runs)
            kind = "downsample" if key[0].startswith("ds-") else "uniform" if key[0].startswith("ut-") else (
                remix_plans[key].plan.kind)
            records.append(FrameRecord(t, key[0], key[1], infer + merge_ms, 0.0, infer, merge_ms, len(runs), kind,
                                       _models(family, runs), True, len(d),
                                       {"preprocess": 0.0, "dpdp": 0.0, "uniform": 0.0, "inference": infer,
                                        "merge": merge_ms}))
            dets[key].append(d)
            frame_dets[key] = d
            frame_runs[key] = runs
        if on_frame is not None:
            on_frame(t, rgb, frame_dets, frame_runs)
        n_done += 1
        if progress:
            progress("frames", n_done, n_total)
    if n_done == 0:
        raise TileBenchError(f"{path}: no frames decoded")
    res = ClipResult(str(path), (width, height), n_done,
                     ("ground-truth PTZ JSON" if use_gt else "motion vectors"), len(hist_boxes), runtime, depth,
                     records, dets, reference, reproj, reference_plain=reference_plain)
    res.summary = summarise(res, family, slos, (ds_lat, ut_lat), (ds_p99, ut_p99))
    res.info = {"history": hist_desc, "profile": deploy_desc,
                "reference": f"uniform tiling with {family.names[best]}"
                             + (" + half-cell-shifted cells" if overlap_reference else ""),
                "latency_factor_final": {f"{k[0]}@{k[1]:g}": round(up.load.factor, 3) for k, up in planners.items()},
                "history_scale": round(hist_scale, 3), "plan_runtime_ms": round(runtime, 3),
                "merge_estimate_ms": round(merge_est, 3),
                "remix_plans": {f"{k[0]}@{k[1]:g}": f"{v.plan.kind}:{len(v.plan.tiles)} tiles"
                                for k, v in remix_plans.items()}}
    if sidecar_note:
        res.info["ignored_sidecar"] = sidecar_note
    return res


def _models(family: DetectorFamily, runs: Sequence[TileRun]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[family.names[r.model]] = counts.get(family.names[r.model], 0) + 1
    return ";".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def _empty_like(d: Detections) -> Detections:
    return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), d.class_names)


def _row(res: ClipResult, name: str, key: tuple[str, float | None], slo: float | None) -> dict[str, Any]:
    recs = [r for r in res.records if (r.method, r.slo) == key]
    lat = np.array([r.latency_ms for r in recs])
    ap = average_precision(res.detections[key], res.reference, "bbox", DENSE_REFERENCE)
    on_time = None
    if slo is not None:
        late = lat > slo
        dets = [_empty_like(d) if x else d for d, x in zip(res.detections[key], late, strict=True)]
        v = average_precision(dets, res.reference, "bbox", DENSE_REFERENCE).map if late.any() else ap.map
        on_time = None if np.isnan(v) else round(float(v), 4)
    plain = (average_precision(res.detections[key], res.reference_plain, "bbox", DENSE_REFERENCE).map
             if res.reference_plain else float("nan"))
    row: dict[str, Any] = {
        "clip": Path(res.clip).name, "method": name, "source": key[0], "slo_ms": slo,
        "map": None if np.isnan(ap.map) else round(ap.map, 4),
        "map50": None if np.isnan(ap.map50) else round(ap.map50, 4),
        "map_plain_ref": None if np.isnan(plain) else round(float(plain), 4),
        "latency_median_ms": round(float(np.median(lat)), 2), "latency_mean_ms": round(float(lat.mean()), 2),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "miss_rate": None if slo is None else round(float((lat > slo).mean()), 4),
        "meets_bar": None if slo is None else bool((lat > slo).mean() <= MISS_BAR),
        "map_on_time": on_time,
        "overhead_ms": round(float(np.mean([r.plan_ms for r in recs])), 3),
        "overhead_share": round(float(np.mean([r.plan_ms for r in recs]) / max(lat.mean(), 1e-9)), 4),
        "adaptive_share": round(float(np.mean([r.kind == "adaptive" for r in recs])), 4),
        "uniform_share": round(float(np.mean([r.kind == "uniform" for r in recs])), 4),
        "fallback_share": round(float(np.mean([r.kind == "fallback" for r in recs])), 4),
        "tiles_mean": round(float(np.mean([r.n_tiles for r in recs])), 2),
        "reference_objects": ap.num_reference, "map_note": None,
    }
    if ap.num_reference < MIN_REFERENCE_OBJECTS:  # mAP against a near-empty reference is noise: n/a, with the count
        row.update(map=None, map50=None, map_plain_ref=None, map_on_time=None,
                   map_note=too_few_note(ap.num_reference, DENSE_REFERENCE.min_score))
    for part in ("preprocess", "dpdp", "uniform", "inference", "merge"):
        row[f"{part}_ms"] = round(float(np.mean([r.breakdown.get(part, 0.0) for r in recs])), 3)
    return row


def summarise(res: ClipResult, family: DetectorFamily, slos: Sequence[float],
              mean_lat: tuple[np.ndarray, np.ndarray], p99_lat: tuple[np.ndarray, np.ndarray] | None = None,
              ) -> list[dict[str, Any]]:
    """One row per (method, SLO): Uirapuru modes, Remix (both latency modes), and the DS/UT member picked for
    that SLO; plus one row per DS/UT member with no SLO (the fixed configurations themselves). ``mean_lat`` /
    ``p99_lat``: each member's profiled (DS, UT) plan latency, mean / conservative model (reported as
    ``profiled_mean_ms`` / ``profiled_p99_ms``). ``ds``/``ut`` pick among members whose profiled mean fits
    (the comparison for UNC), ``ds-c``/``ut-c`` among those whose *measured* miss rate at the SLO is within
    :data:`MISS_BAR` (the comparison for UC; see the module docstring). ``fits_slo`` says whether the pick
    qualified (false: none did, the cheapest is shown and does not count as a baseline at that SLO)."""
    rows = []
    keys = {k for k in res.detections}
    fixed_rows = {k[0]: _row(res, k[0], k, None) for k in keys if k[1] is None}
    fixed_lat = {k[0]: np.array([r.latency_ms for r in res.records if (r.method, r.slo) == k])
                 for k in keys if k[1] is None}

    def score(name: str) -> float:
        v = fixed_rows[name]["map"]
        return -1.0 if v is None else float(v)

    for slo in slos:
        slo = float(slo)
        for short in MODE_SHORT.values():
            if (short, slo) in keys:
                rows.append(_row(res, short, (short, slo), slo))
        for name in ("remix", "remix-c"):
            if (name, slo) in keys:
                rows.append(_row(res, name, (name, slo), slo))
        for label, prefix, c in (("ds", "ds", False), ("ut", "ut", False), ("ds-c", "ds", True),
                                 ("ut-c", "ut", True)):
            lat = mean_lat[prefix == "ut"]
            cands = [m for m in range(len(family.names)) if f"{prefix}-{family.names[m]}" in fixed_rows]
            if not cands:
                continue
            if c:
                ok = [m for m in cands if (fixed_lat[f"{prefix}-{family.names[m]}"] > slo).mean() <= MISS_BAR]
            else:
                ok = [m for m in cands if lat[m] <= slo]
            pick = max(ok, key=lambda m: score(f"{prefix}-{family.names[m]}")) if ok else min(
                cands, key=lambda m: float(np.median(fixed_lat[f"{prefix}-{family.names[m]}"])))
            best = f"{prefix}-{family.names[pick]}"
            row = _row(res, label, (best, None), slo)
            row["profiled_mean_ms"] = round(float(lat[pick]), 2)
            if p99_lat is not None:
                row["profiled_p99_ms"] = round(float(p99_lat[prefix == "ut"][pick]), 2)
            row["fits_slo"] = bool(ok)
            rows.append(row)
    rows += [fixed_rows[n] for n in sorted(fixed_rows)]
    return rows


def comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (clip, SLO): each Uirapuru mode against the baselines it is compared with (module docstring) -
    the best qualifying baseline's mAP, the margin, and whether the mode is >= all of them."""
    out = []
    get = {(r["clip"], r["method"], r["slo_ms"]): r for r in rows if r["slo_ms"] is not None}
    for clip, slo in dict.fromkeys((r["clip"], r["slo_ms"]) for r in rows if r["slo_ms"] is not None):
        for mode, rivals in (("uirapuru-c", ("ds-c", "ut-c", "remix", "remix-c")),
                             ("uirapuru-nc", ("ds", "ut", "remix"))):
            me = get.get((clip, mode, slo))
            if me is None:
                continue
            counted = {}
            for name in rivals:
                r = get.get((clip, name, slo))
                if r is None or r["map"] is None or r.get("fits_slo") is False:
                    continue
                if mode == "uirapuru-c" and name.startswith("remix") and not r["meets_bar"]:
                    continue
                counted[name if name.startswith("remix") else f"{name}:{r['source']}"] = r["map"]
            best = max(counted.values()) if counted else None
            mine = me["map"] if me["map"] is not None else 0.0
            out.append({"clip": clip, "slo_ms": slo, "mode": mode, "map": me["map"], "miss_rate": me["miss_rate"],
                        "best_baseline": max(counted, key=counted.get) if counted else None,
                        "best_baseline_map": best, "margin": None if best is None else round(mine - best, 4),
                        "geq_all": best is None or mine >= best, "baselines": counted})
    return out
