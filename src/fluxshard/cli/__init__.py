"""The ``fluxshard`` command line: one typer app, one module per command group.

Every command turns :class:`~fluxshard.errors.FluxShardError` into a one-line ``error: ...`` on stderr and
a non-zero exit code, so scripts can rely on the exit status and users never see a traceback for bad input.
"""

from __future__ import annotations

import sys

from fluxshard.cli._common import group
from fluxshard.errors import FluxShardError

app = group("Motion-aware incremental CNN inference on video.", name="fluxshard")


def _register() -> None:
    # Imported here so that `fluxshard --help` stays fast and a broken optional part cannot break the rest.
    from fluxshard.cli import bench as bench_cmd
    from fluxshard.cli import data as data_cmd
    from fluxshard.cli import detect as detect_cmd
    from fluxshard.cli import edge as edge_cmd
    from fluxshard.cli import motion as motion_cmd
    from fluxshard.cli import profile as profile_cmd
    from fluxshard.cli import run as run_cmd
    from fluxshard.cli import serve as serve_cmd
    from fluxshard.cli import tile as tile_cmd

    app.add_typer(data_cmd.app, name="data")
    motion_cmd.register(app)
    detect_cmd.register(app)
    run_cmd.register(app)
    serve_cmd.register(app)
    edge_cmd.register(app)
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
