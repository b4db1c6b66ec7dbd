"""``fluxshard serve``: the cloud endpoint of the edge–cloud runtime (see :mod:`fluxshard.edgecloud.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fluxshard.cli._common import Command


def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 = any free port (the one chosen is printed).",
                                      min=0, max=65535)] = 50051,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    mode: Annotated[str, typer.Option(help="Engine modes served: exact, fast, or any (what each edge asks "
                                           "for).")] = "any",
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC (no TLS): loopback and tests "
                                                              "only.")] = False,
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token edges must send "
                                                         "(health checks need none).")] = None,
    max_streams: Annotated[int, typer.Option(help="Video streams served at once (each holds an engine).",
                                             min=1)] = 8,
    idle_timeout: Annotated[float, typer.Option(help="Seconds after which an idle stream's state is evicted.",
                                                min=0.001)] = 60.0,
) -> None:
    """Serve MODEL to edges over gRPC (TLS + token, or --insecure) until SIGTERM/SIGINT."""
    from fluxshard.edgecloud.auth import read_token
    from fluxshard.edgecloud.server import MODES, CloudServer
    from fluxshard.errors import FluxShardError

    if mode not in (*MODES, "any"):
        raise typer.BadParameter(f"--mode must be exact, fast or any, not {mode!r}")
    if not insecure and not (tls_cert and tls_key):
        raise FluxShardError("TLS needs both --tls-cert and --tls-key (or --insecure for plaintext)")
    from fluxshard.cli.run import engine_config

    modes = MODES if mode == "any" else (mode,)
    server = CloudServer(
        model, host=host, port=port, modes=modes, engine_config=lambda m: engine_config(model, m),
        tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None,
        token=read_token(token_file) if token_file else None, insecure=insecure, max_streams=max_streams,
        idle_timeout_s=idle_timeout,
    )

    def ready(h: str, p: int) -> None:
        typer.echo(f"listening on {h}:{p}")  # typer.echo flushes

    server.serve_forever(on_ready=ready)


def register(app: typer.Typer) -> None:
    app.command("serve", cls=Command)(serve)
