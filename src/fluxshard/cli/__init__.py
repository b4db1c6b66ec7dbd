"""The ``fluxshard`` command line: one typer app, one module per command group.

Every command turns :class:`~fluxshard.errors.FluxShardError` into a one-line ``error: ...`` on stderr and
a non-zero exit code, so scripts can rely on the exit status and users never see a traceback for bad input.
"""

from __future__ import annotations

import sys

import typer

from fluxshard.cli._common import CONTEXT, MARKUP
from fluxshard.errors import FluxShardError

app = typer.Typer(
    name="fluxshard",
    help="Motion-aware incremental CNN inference on video.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    rich_markup_mode=MARKUP,
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    # Bare `fluxshard` prints the help and succeeds: click's no_args_is_help exits 2, as for a usage error.
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def _register() -> None:
    # Imported here so that `fluxshard --help` stays fast and a broken optional part cannot break the rest.
    from fluxshard.cli import bench as bench_cmd
    from fluxshard.cli import data as data_cmd
    from fluxshard.cli import detect as detect_cmd
    from fluxshard.cli import motion as motion_cmd
    from fluxshard.cli import profile as profile_cmd
    from fluxshard.cli import run as run_cmd
    from fluxshard.cli import tile as tile_cmd

    app.add_typer(data_cmd.app, name="data")
    motion_cmd.register(app)
    detect_cmd.register(app)
    run_cmd.register(app)
    bench_cmd.register(app)
    profile_cmd.register(app)
    tile_cmd.register(app)


def main() -> None:
    from fluxshard import cpu

    try:
        cpu.configure()  # before anything imports torch: libgomp reads GOMP_SPINCOUNT once, when it loads
    except FluxShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    _register()
    try:
        app()
    except FluxShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
