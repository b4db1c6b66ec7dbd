"""``fluxshard bench``: every method of the harness over one or more clips → CSV, PNG plots, markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import Command, err, print_line, print_text
from fluxshard.data.fetch import clip_path


def bench(
    clips: Annotated[list[str], typer.Argument(help="Video files, URLs, or bundled clip names (bikes, vtest, cup).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (CSV, plots, report.md).")] = Path(
        "bench_out"),
    max_frames: Annotated[int | None, typer.Option(help="Stop each clip after N frames.", min=1)] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated subset of: dense, scene-reuse, delta, "
                                                     "global-warp, fluxshard-exact, fluxshard-fast, naive-mv "
                                                     "(dense always runs: it is the reference).")] = None,
    scene_threshold: Annotated[float, typer.Option(help="scene-reuse: mean |Δ| of 8×-downsampled luma (grey "
                                                        "levels) below which the last result is reused.")] = 1.5,
    factor: Annotated[int | None, typer.Option(help="Integer input reduction (default: fit 640 px).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON summary object on stdout.")] = False,
) -> None:
    """Benchmark dense, the baselines and FluxShard on CLIP... in one harness (same decoder, model, metric, timer)."""
    from fluxshard.bench.harness import BenchConfig, bench_clip, parse_methods
    from fluxshard.bench.plots import make_plots
    from fluxshard.bench.report import markdown_table, motion_bin_table, summarize, write_csv, write_report
    from fluxshard.video import open_video

    cfg = BenchConfig(model=model, methods=parse_methods(methods), max_frames=max_frames, factor=factor,
                      scene_threshold=scene_threshold)
    paths = [clip_path(c) for c in clips]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    errors: list[str] = []
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=as_json) as progress:
        for p in paths:
            total = open_video(p).info.frames_expected
            if max_frames is not None:
                total = min(total or max_frames, max_frames)
            task = progress.add_task(f"{Path(str(p)).name} ({len(cfg.methods)} methods)", total=total)
            res = bench_clip(p, cfg, on_frame=lambda _i, t=task: progress.advance(t))
            progress.update(task, total=len(res.by_method("dense")), completed=len(res.by_method("dense")))
            if res.error:
                errors.append(f"{res.clip}: {res.error}")
            results.append(res)
    _unique_names(results)
    summaries = [s for r in results for s in summarize(r)]
    csv_path = write_csv([row for r in results for row in r.rows], out / "frames.csv")
    plots = make_plots(results, summaries, out)
    report = write_report(results, summaries, plots, out / "report.md", scene_threshold, model)
    data: dict[str, Any] = {
        "model": model, "out": str(out), "csv": str(csv_path), "report": str(report),
        "plots": [str(p) for p in plots], "methods": list(cfg.methods),
        "clips": [{"clip": r.clip, "path": r.path, "input_hw": list(r.input_hw), "factor": r.factor,
                   "mv_source": r.mv_source, "frames": len(r.by_method("dense"))} for r in results],
        "fast_config": results[0].fast_config if results else {}, "summary": summaries,
        "motion_bins": motion_bin_table(results),
    }
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        target = results[0].fast_config.get("target_retention") if results else None
        print_text(markdown_table(summaries, target))
        print_text(f"wrote {csv_path}, {report} and {len(plots)} plots")
    if errors:
        print_line("error: " + "; ".join(errors))
        raise typer.Exit(1)


def _unique_names(results: list[Any]) -> None:
    """Two clips with the same file stem (e.g. two ``pan.mp4``) get distinct labels in the CSV and report."""
    seen: dict[str, int] = {}
    for r in results:
        n = seen.get(r.clip, 0)
        seen[r.clip] = n + 1
        if n:
            new = f"{r.clip}#{n + 1}"
            r.clip = new
            for row in r.rows:
                row.clip = new


def register(app: typer.Typer) -> None:
    app.command("bench", cls=Command)(bench)
