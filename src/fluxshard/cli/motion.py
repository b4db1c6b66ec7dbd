"""``fluxshard motion``: motion field, residual sets and an overlay video for one clip."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import Command, emit_summary, err
from fluxshard.data.fetch import clip_path
from fluxshard.motion.report import analyze_motion


def motion(
    clip: Annotated[str, typer.Argument(help="Video file, URL, or a bundled clip name (bikes, vtest, cup).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an overlay video (H.264).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    block: Annotated[int, typer.Option(help="Block size of the motion grid (16 or 8).")] = 16,
    source: Annotated[str, typer.Option(help="auto | codec | blockmatch")] = "auto",
    tau: Annotated[float, typer.Option(help="Residual threshold: mean |Δluma| per block.")] = 4.0,
    refresh: Annotated[int, typer.Option(help="Reference cache refreshed every N frames.")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
) -> None:
    """Decode CLIP with its motion field; report the residual set with and without MV alignment."""
    if source not in ("auto", "codec", "blockmatch"):
        raise typer.BadParameter(f"--source must be auto, codec or blockmatch, not {source!r}")
    from fluxshard.video import open_video

    path = clip_path(clip)
    total = open_video(path).info.frames_expected  # fails here, before any progress output, on bad input
    with Progress(
        TextColumn("[bold]motion[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=as_json,
    ) as progress:
        if max_frames is not None:
            total = min(total or max_frames, max_frames)
        task = progress.add_task(Path(str(path)).name, total=total)
        summary = analyze_motion(
            path, block=block, mv_source=source, tau=tau, refresh=refresh,  # type: ignore[arg-type]
            max_frames=max_frames, overlay=out, on_frame=lambda _i: progress.advance(task),
        )
    data = summary.to_dict()
    if out is not None:
        data["overlay"] = str(out)
    emit_summary(f"motion: {path}", data, as_json, summary.error)


def register(app: typer.Typer) -> None:
    app.command("motion", cls=Command)(motion)
