"""``fluxshard detect``: dense (every frame, full model) inference on a clip — the reference the engine is
measured against: per-frame results as JSON lines, an annotated video and a latency summary."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard import cpu
from fluxshard.cli._common import Command, emit_summary, err
from fluxshard.data.fetch import clip_path
from fluxshard.errors import FluxShardError, VideoError


class DetectError(FluxShardError):
    """Bad ``detect`` arguments (e.g. a start frame past the end of the clip)."""


def _even(rgb: np.ndarray) -> np.ndarray:
    """H.264 4:2:0 needs even sizes: repeat the last row/column of odd-sized frames."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return rgb


def _frame_record(index: int, time_s: float | None, ms: float, task: str, results: Any) -> dict[str, Any]:
    return {"frame": index, "time": None if time_s is None else round(time_s, 4), "ms": round(ms, 2),
            "task": task, "instances": results.to_json()}


def _persons(results: Any, min_score: float = 0.5) -> int:
    from fluxshard.models.base import Detections, Keypoints

    if isinstance(results, Keypoints):
        return int((results.scores >= min_score).sum())
    if isinstance(results, Detections) and "person" in results.class_names:
        return len(results.filter(min_score, "person"))
    return 0


def detect(
    clip: Annotated[str, typer.Argument(help="Video file, URL, or a bundled clip name (bikes, vtest, cup).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet, movenet) or weights path "
                                       "(.npz; .pt/.yaml with the yolo extra).")] = "nanodet",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an annotated video (H.264).")] = None,
    jsonl: Annotated[Path | None, typer.Option("--jsonl", help="Write per-frame results, one JSON per line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
    start: Annotated[int, typer.Option(help="Skip the first N frames (decoded, not run).", min=0)] = 0,
    min_score: Annotated[float, typer.Option(help="Draw instances scoring at least this.")] = 0.3,
    channels_last: Annotated[bool, typer.Option(help="Run the body with channels_last tensors.")] = True,
) -> None:
    """Run MODEL on every frame of CLIP (dense inference); summary with ms/frame."""
    import torch

    from fluxshard.models import load_model
    from fluxshard.video import VideoWriter, open_video
    from fluxshard.video.encode import OVERLAY_PRESET
    from fluxshard.viz import draw_results

    adapter = load_model(model)  # unknown name / unreadable weights fail here, before any output
    path = clip_path(clip)
    # problems are collected, not raised: the frames decoded before damage still get their summary
    source = open_video(path, export_mvs=False, max_frames=None if max_frames is None else start + max_frames,
                        on_error="collect")
    info = source.info
    total = info.frames_expected
    if total is not None and start >= total:
        raise DetectError(f"--start {start} is past the end of {path} ({total} frames)")
    if total is not None:
        total -= start
        if max_frames is not None:
            total = min(total, max_frames)
    elif max_frames is not None:
        total = max_frames
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    adapter.body.to(memory_format=fmt)
    writer = VideoWriter(out, fps=info.fps, preset=OVERLAY_PRESET) if out is not None else None
    lines = jsonl.open("w") if jsonl is not None else None
    times: list[float] = []
    persons: list[int] = []
    instances = 0
    t_wall = time.perf_counter()
    try:
        with Progress(
            TextColumn("[bold]detect[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"), console=err, transient=as_json,
        ) as progress:
            task = progress.add_task(f"{Path(str(path)).name} · {adapter.name}", total=total, rate="")
            with torch.inference_mode():
                for frame in source:
                    if frame.index < start:
                        continue
                    rgb = frame.rgb
                    cpu.tick()  # thread count follows the CPU left free by other processes (auto policy)
                    t0 = time.perf_counter()
                    x, meta = adapter.preprocess(rgb)
                    results = adapter.postprocess(adapter.body(x.contiguous(memory_format=fmt)), meta)
                    ms = (time.perf_counter() - t0) * 1000
                    times.append(ms)
                    persons.append(_persons(results))
                    instances += len(results)
                    if lines is not None:
                        lines.write(json.dumps(_frame_record(frame.index, frame.time, ms, adapter.task, results))
                                    + "\n")
                    if writer is not None:
                        writer.write(_even(draw_results(rgb, results, min_score, legend=())))
                    progress.update(task, advance=1, rate=f"{statistics.median(times):.0f} ms/frame")
    finally:
        if writer is not None:
            writer.close()
        if lines is not None:
            lines.close()
    error = source.problem_text() or None
    if not times:
        if error:
            raise VideoError(error, frames_decoded=source.frames_decoded)
        raise DetectError(f"{path}: no frames to run (start {start})")
    p = np.asarray(persons)
    summary: dict[str, Any] = {
        "clip": str(path),
        "model": adapter.name,
        "task": adapter.task,
        "frames": len(times),
        "first_frame": start,
        "frame_size": [info.width, info.height],
        "input_size": list(x.shape[2:]),
        "memory_format": "channels_last" if channels_last else "nchw",
        "threads": torch.get_num_threads(),
        "ms_per_frame_median": round(statistics.median(times), 2),
        "ms_per_frame_mean": round(statistics.fmean(times), 2),
        "wall_seconds": round(time.perf_counter() - t_wall, 2),
        "instances": instances,
        "persons_ge_0.5": {"mean": round(float(p.mean()), 3), "min": int(p.min()), "max": int(p.max()),
                           "frames_with_4_or_more": int((p >= 4).sum())},
    }
    if out is not None:
        summary["out"] = str(out)
    if jsonl is not None:
        summary["jsonl"] = str(jsonl)
    if error:
        summary["error"] = error
    emit_summary(f"detect: {path}", summary, as_json, error)


def register(app: typer.Typer) -> None:
    app.command("detect", cls=Command)(detect)
