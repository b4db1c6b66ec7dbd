"""``fluxshard data``: fetch the verified test clips and render virtual PTZ clips from them.

Paths go to stdout (one per line, so scripts can capture them); progress goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fluxshard.cli._common import Command, group
from fluxshard.errors import DataError

app = group("Test data: fetch sha256-verified real clips; make virtual pan-tilt-zoom clips with exact motion.")

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True)


@app.command(cls=Command)
def fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Clip names (default: all).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Download missing clips into the cache and verify every clip's sha256."""
    from fluxshard.data.fetch import fetch as do_fetch

    for name, path in do_fetch(names or None, progress=not quiet).items():
        typer.echo(f"{name}\t{path}")


@app.command(cls=Command)
def path(name: Annotated[str, typer.Argument(help="Clip name.")]) -> None:
    """Print the cached path of a clip (fetching it first if needed)."""
    from fluxshard.data.fetch import CLIPS, clip_path

    if name not in CLIPS:
        raise DataError(f"unknown clip {name!r}; known clips: {', '.join(CLIPS)}")
    typer.echo(clip_path(name, progress=True))


@app.command("list", cls=Command)
def list_clips() -> None:
    """List known clips, their files, sizes and whether they are in the cache."""
    from fluxshard.data.fetch import CLIPS, cache_dir

    table = Table(title=f"clips in {cache_dir()}", title_justify="left")
    for col in ("name", "file", "size", "cached", "source", "content"):
        table.add_column(col, overflow="fold")  # a narrow terminal wraps cells instead of cutting them with "…"
    for spec in CLIPS.values():
        p = cache_dir() / spec.filename
        size = f"{p.stat().st_size / 1e6:.1f} MB" if p.is_file() else "-"
        table.add_row(spec.name, spec.filename, size, "yes" if p.is_file() else "no", spec.package,
                      spec.description)
    _out.print(table)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 384x288") from None
    return w, h


@app.command(cls=Command)
def ptz(
    src: Annotated[str, typer.Argument(help="Source video: a clip name (e.g. vtest), file or URL.")],
    out: Annotated[Path, typer.Argument(help="Output video (.mp4); ground truth goes to the .json beside.")],
    trajectory: Annotated[
        str, typer.Option("--trajectory", "-t", help="'random' or e.g. 'pause:10,pan:+3:30,zoom:1.02:25'.")
    ] = "random",
    seed: Annotated[int, typer.Option(help="Seed for --trajectory random.")] = 0,
    size: Annotated[str, typer.Option(help="Output size WIDTHxHEIGHT (even).")] = "384x288",
    frames: Annotated[
        int | None, typer.Option(help="Number of frames (default: script length, or 250 for random).")
    ] = None,
    still: Annotated[bool, typer.Option("--still", help="Use only the first source frame.")] = False,
    crf: Annotated[int, typer.Option(help="x264 constant rate factor.")] = 18,
    bframes: Annotated[int | None, typer.Option(help="x264 max consecutive B-frames (default: x264's).")] = (
        None
    ),
    fps: Annotated[float | None, typer.Option(help="Output frame rate (default: the source's).")] = None,
) -> None:
    """Render a virtual pan-tilt-zoom clip and its exact per-frame camera transform (JSON)."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.data.ptz import make_ptz_clip, parse_trajectory

    wh = _parse_size(size)
    if trajectory.strip().lower() != "random":
        parse_trajectory(trajectory)  # fail before any fetching or progress output
    options = {"bf": str(bframes)} if bframes is not None else None
    source = clip_path(src, progress=True)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_err, transient=True) as bar:
        task = bar.add_task(f"ptz {out.name}", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        meta = make_ptz_clip(source, out, trajectory, size=wh, frames=frames, seed=seed,
                             fps=fps, crf=crf, codec_options=options, still=still, progress=tick)
    typer.echo(str(out))
    typer.echo(str(meta))
