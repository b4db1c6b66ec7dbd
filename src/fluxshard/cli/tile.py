"""``fluxshard tile`` (Uirapuru on one clip under a latency SLO) and ``fluxshard tile-bench`` (Uirapuru vs
down-sampling, uniform tiling and a Remix-like planner over clips x SLOs -> CSV, plots, markdown report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import Command, emit_summary, err, print_line, print_text
from fluxshard.data.fetch import clip_path
from fluxshard.errors import FluxShardError
from fluxshard.tiling.profile import PLAN_TAIL_QUANTILE

MODES = ("conservative", "non-conservative")
CAMERAS = ("auto", "gt", "mv")

# options shared by `tile` and `tile-bench`
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Detector of the family.")]
SizesOpt = Annotated[str, typer.Option(help="Family input sizes.")]
ProfileOpt = Annotated[str | None, typer.Option(help="Profile JSON, or 'shipped' (default: this machine's "
    "cached profile, measured on first use).")]
CameraOpt = Annotated[str, typer.Option(help="auto (PTZ JSON if present, else motion vectors), gt, mv.")]
HistoryOpt = Annotated[int, typer.Option(help="Historical global-view frames.", min=1)]
ViewsOpt = Annotated[int, typer.Option(help="Deployment profile: global-view images rendered at the camera's "
    "size and zoom range to re-measure accuracy and per-tile-geometry latency (0 = the generic profile).", min=0)]
ReferenceOpt = Annotated[str, typer.Option(help="Evaluation/profiling reference: 'overlap' (uniform tiling with the "
    "reference member plus half-cell-shifted cells) or 'plain' (the grid alone).")]
OnlineOpt = Annotated[bool, typer.Option("--online/--no-online", help="Correct the latency model online from "
    "observed tile times (load drift).")]
CalibrateOpt = Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Scale the deployment profile's "
    "accuracy vectors by the plan-level calibration measured on the deployment views.")]
TailOpt = Annotated[float, typer.Option("--tail-quantile", help="Quantile (percent) of the conservative plan "
    "latency model, recomputed from the deployment profile's recorded runs (the <= 1 % miss contract needs "
    "margin: default 99.9).", min=50.0, max=100.0)]
ThreadsOpt = Annotated[int, typer.Option(help="torch threads (the profile is cached per thread count; on a "
    "loaded machine 1 thread has far smaller p99 latency).", min=1)]


class TileCliError(FluxShardError):
    """Bad ``tile`` / ``tile-bench`` arguments."""


def parse_slos(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TileCliError(f"--slo {text!r}: expected milliseconds, e.g. 60 or 40,60,90") from None
    if not vals or any(not v > 0 for v in vals):
        raise TileCliError(f"--slo {text!r}: every SLO must be > 0 ms")
    return sorted(set(vals))


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TileCliError(f"--sizes {text!r}: expected input sizes, e.g. 320,416,512,640") from None
    if not sizes or any(s <= 0 or s % 32 for s in sizes):
        raise TileCliError(f"--sizes {text!r}: sizes must be positive multiples of 32")
    return sizes


def _reference(text: str) -> bool:
    if text not in ("overlap", "plain"):
        raise TileCliError(f"--reference {text!r}: expected overlap or plain")
    return text == "overlap"


def _progress(as_json: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=as_json)


def _setup(model: str, sizes: str, profile: str | None, progress: Progress, threads: int,
           ) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    from fluxshard.tiling.infer import DetectorFamily
    from fluxshard.tiling.profiler import get_profile

    torch.set_num_threads(threads)
    family = DetectorFamily(_parse_sizes(sizes), model=model)
    tick = Stages(progress, "profile")
    prof, path, measured = get_profile(family, profile, progress=tick)
    tick.finish()
    info = {"path": str(path), "measured_now": measured, "machine": prof.meta.get("machine"),
            "loadavg": prof.meta.get("loadavg_before"), "threads": threads,
            "models": [{"name": m.name, "input": m.input_size, "mean_ms": round(m.mean_ms, 2),
                        "p99_ms": round(m.p99_ms, 2)} for m in prof.models]}
    return family, prof, info


class Stages:
    """A ``(stage, done, total)`` progress callback that gives each stage its own bar and leaves every bar
    finished: a stage is closed at the count it reached when the next one starts, and all of them by
    :meth:`finish` (the profiler's stages share one counter and skipped items do not tick, so without this
    their bars stayed part-way after the command had finished)."""

    def __init__(self, progress: Progress, name: str) -> None:
        self.progress = progress
        self.name = name
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, i: int, n: int) -> None:
        if stage not in self.tasks:
            self.finish()
            self.tasks[stage] = self.progress.add_task(f"{self.name} · {stage}", total=n or None)
        self.progress.update(self.tasks[stage], completed=i, total=n or None)

    def finish(self) -> None:
        ids = set(self.tasks.values())
        for task in self.progress.tasks:
            if task.id in ids and not task.finished:
                self.progress.update(task.id, total=task.completed)


def _clip_ticker(progress: Progress, name: str) -> Stages:
    return Stages(progress, name)


def _warn_sidecar(path: Path, camera: str) -> None:
    """A ``.json`` beside the clip that is not virtual-PTZ metadata is ignored (``--camera gt`` fails on it)."""
    from fluxshard.tiling.evaluate import ptz_sidecar

    _, why = ptz_sidecar(path)
    if why and camera != "gt":
        print_line(f"warning: {why}; ignored, the camera is estimated from motion vectors")


def _draw(rgb: np.ndarray, det: Any, runs: list[Any], names: list[str], min_score: float) -> np.ndarray:
    from PIL import Image, ImageDraw

    from fluxshard.viz import TILE, TILE_LEGEND, draw_results

    img = Image.fromarray(np.ascontiguousarray(rgb))
    d = ImageDraw.Draw(img)
    for r in runs:  # tiles first: boxes, labels and the legend stay on top
        x0, y0, x1, y1 = r.rect
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=TILE, width=2)
        d.text((x0 + 4, y0 + 2), names[r.model], fill=TILE)
    out = draw_results(np.asarray(img), det, min_score, legend=TILE_LEGEND)
    h, w = out.shape[:2]
    if h % 2 or w % 2:
        out = np.pad(out, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return out


def tile(
    clip: Annotated[str, typer.Argument(help="Video (a virtual-PTZ clip's JSON beside it gives the camera).")],
    slo: Annotated[float, typer.Option("--slo", help="Per-frame latency SLO (ms).", min=0.001)],
    mode: Annotated[str, typer.Option("--mode", help="conservative (plan latency at its tail "
                                      "quantile, p99.9 by default, per-frame SLO) or "
                                      "non-conservative (mean latencies).")] = "conservative",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an annotated video (tiles + boxes).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    model: ModelOpt = "nanodet",
    sizes: SizesOpt = "320,416,512,640",
    profile: ProfileOpt = None,
    camera: CameraOpt = "auto",
    history: HistoryOpt = 20,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
    min_score: Annotated[float, typer.Option(help="Draw boxes scoring at least this.")] = 0.3,
    views: ViewsOpt = 24,
    reference: ReferenceOpt = "overlap",
    online: OnlineOpt = True,
    calibrate: CalibrateOpt = True,
    tail_quantile: TailOpt = PLAN_TAIL_QUANTILE,
    threads: ThreadsOpt = 2,
) -> None:
    """Uirapuru on CLIP: camera-tracked historical objects -> DP-DP tile plan per frame within the SLO."""
    from fluxshard.metrics.coco import DENSE_REFERENCE, average_precision
    from fluxshard.tiling.evaluate import MODE_SHORT, run_clip
    from fluxshard.video import VideoWriter, open_video
    from fluxshard.video.encode import OVERLAY_PRESET

    if mode not in MODES:
        raise TileCliError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if camera not in CAMERAS:
        raise TileCliError(f"--camera {camera!r}: expected one of {', '.join(CAMERAS)}")
    path = Path(clip_path(clip))
    if not path.exists():
        raise TileCliError(f"{path}: no such clip")
    _warn_sidecar(path, camera)
    writer = None
    key = (MODE_SHORT[mode], float(slo))
    fps = open_video(path, export_mvs=False).info.fps or 25.0
    try:
        with _progress(as_json) as progress:
            family, prof, pinfo = _setup(model, sizes, profile, progress, threads)

            def on_frame(t: int, rgb: np.ndarray, dets: dict, runs: dict) -> None:
                nonlocal writer
                if out is None:
                    return
                if writer is None:
                    writer = VideoWriter(out, fps=fps, preset=OVERLAY_PRESET)
                writer.write(_draw(rgb, dets[key], runs[key], family.names, min_score))

            ticker = _clip_ticker(progress, path.name)
            res = run_clip(path, family, prof, [slo], modes=[mode], baselines=False, camera=camera,
                           history=history, max_frames=max_frames, deploy_views=views,
                           overlap_reference=_reference(reference), online=online, calibrate=calibrate,
                           tail_quantile=tail_quantile, progress=ticker, on_frame=on_frame)
            ticker.finish()
    finally:
        if writer is not None:
            writer.close()
    recs = [r for r in res.records if (r.method, r.slo) == key]
    lat = np.array([r.latency_ms for r in recs])
    ap = average_precision(res.detections[key], res.reference, "bbox", DENSE_REFERENCE)
    kinds = {k: round(float(np.mean([r.kind == k for r in recs])), 4) for k in ("adaptive", "uniform", "fallback")}
    summary: dict[str, Any] = {
        "clip": str(path), "size": list(res.size), "frames": res.frames, "slo_ms": slo, "mode": mode,
        "camera": res.camera, "quadtree_depth": res.max_depth, "history_objects": res.history_objects,
        "plan_runtime_ms": round(res.plan_runtime_ms, 3),
        "map": None if np.isnan(ap.map) else round(ap.map, 4),
        "map50": None if np.isnan(ap.map50) else round(ap.map50, 4),
        "reference": f"{res.info.get('reference')} (score >= 0.5)", "profile_used": res.info.get("profile"),
        "latency_median_ms": round(float(np.median(lat)), 2), "latency_mean_ms": round(float(lat.mean()), 2),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "miss_rate": round(float((lat > slo).mean()), 4),
        "overhead_share": round(float(np.mean([r.plan_ms for r in recs]) / lat.mean()), 4),
        "plan_types": kinds,
        "tiles_mean": round(float(np.mean([r.n_tiles for r in recs])), 2),
        "reprojection_error_px": round(float(np.mean(res.reprojection_px)), 3) if res.reprojection_px else None,
        "profile": pinfo["path"],
    }
    if out is not None:
        summary["out"] = str(out)
    emit_summary(f"tile: {path}", summary, as_json)


def tile_bench(
    clips: Annotated[list[str], typer.Argument(help="Videos (virtual-PTZ JSON beside each gives the camera).")],
    slo: Annotated[str, typer.Option("--slo", help="Comma-separated SLOs in ms, e.g. 40,60,90,140.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (CSV, plots, report.md).")] = Path(
        "tile_bench_out"),
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    model: ModelOpt = "nanodet",
    sizes: SizesOpt = "320,416,512,640",
    profile: ProfileOpt = None,
    camera: CameraOpt = "auto",
    history: HistoryOpt = 20,
    max_frames: Annotated[int | None, typer.Option(help="Stop each clip after N frames.", min=1)] = None,
    stride: Annotated[int, typer.Option(help="Evaluate every N-th frame (camera tracked on all).", min=1)] = 1,
    views: ViewsOpt = 24,
    reference: ReferenceOpt = "overlap",
    online: OnlineOpt = True,
    calibrate: CalibrateOpt = True,
    tail_quantile: TailOpt = PLAN_TAIL_QUANTILE,
    threads: ThreadsOpt = 2,
) -> None:
    """Uirapuru (both modes) vs down-sampling, uniform tiling and Remix-like planning over CLIP... x SLOs."""
    from fluxshard.tiling.evaluate import comparison, run_clip
    from fluxshard.tiling.report import make_plots, markdown_tables, write_frames_csv, write_report, write_summary_csv

    slos = parse_slos(slo)
    if camera not in CAMERAS:
        raise TileCliError(f"--camera {camera!r}: expected one of {', '.join(CAMERAS)}")
    paths = [Path(clip_path(c)) for c in clips]
    for p in paths:
        if not p.exists():
            raise TileCliError(f"{p}: no such clip")
        _warn_sidecar(p, camera)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with _progress(as_json) as progress:
        family, prof, pinfo = _setup(model, sizes, profile, progress, threads)
        for p in paths:
            ticker = _clip_ticker(progress, p.name)
            results.append(run_clip(p, family, prof, slos, camera=camera, history=history, max_frames=max_frames,
                                    stride=stride, deploy_views=views, overlap_reference=_reference(reference),
                                    online=online, calibrate=calibrate, tail_quantile=tail_quantile,
                                    progress=ticker))
            ticker.finish()
    rows = [r for res in results for r in res.summary]
    frames_csv = write_frames_csv(results, out / "frames.csv")
    summary_csv = write_summary_csv(rows, out / "summary.csv")
    plots = make_plots(rows, out)
    report = write_report(results, rows, plots, out / "report.md", pinfo)
    data: dict[str, Any] = {
        "out": str(out), "frames_csv": str(frames_csv), "summary_csv": str(summary_csv), "report": str(report),
        "plots": [str(p) for p in plots], "slos": slos, "profile": pinfo,
        "clips": [{"clip": r.clip, "size": list(r.size), "frames": r.frames, "camera": r.camera,
                   "quadtree_depth": r.max_depth, "history_objects": r.history_objects, **r.info,
                   "reprojection_error_px": round(float(np.mean(r.reprojection_px)), 3) if r.reprojection_px
                   else None} for r in results],
        "summary": rows,
        "comparison": comparison(rows),
    }
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        print_text(markdown_tables(rows))
        print_text(f"wrote {frames_csv}, {summary_csv}, {report} and {len(plots)} plots")


def register(app: typer.Typer) -> None:
    app.command("tile", cls=Command)(tile)
    app.command("tile-bench", cls=Command)(tile_bench)
