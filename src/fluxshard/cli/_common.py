"""Output conventions shared by every command: one JSON object on stdout with ``--json``, else a table;
a recorded error becomes one ``error:`` line on stderr and exit code 1 after the summary is out."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)


def emit_summary(title: str, data: dict[str, Any], as_json: bool, error: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        table = Table(title=title, show_header=False)
        for k, v in data.items():
            table.add_row(k, str(v))
        Console().print(table)
    if error:
        err.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(1)
