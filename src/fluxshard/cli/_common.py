"""Output conventions shared by every command: one JSON object on stdout with ``--json``, else a table;
a recorded error becomes one ``error:`` line on stderr and exit code 1 after the summary is out.

Also the command-line look shared by every command: ``-h`` as well as ``--help``, plain (click-style) help
whose description column keeps most of an 80-column terminal, and usage lines that name arguments by their
metavar (``CLIP``) rather than typer's ``{clip}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand

err = Console(stderr=True)

#: ``context_settings`` for every typer app: subcommands inherit it from the root group's context.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

#: ``rich_markup_mode`` for every typer app: None = click's plain help layout (two columns instead of rich's
#: five, so descriptions are not squeezed to ~20 characters at 80 columns) and plain usage errors.
MARKUP: Any = None


def group(help_text: str, name: str | None = None) -> typer.Typer:
    """A command group that prints its help and succeeds when called bare (click's ``no_args_is_help`` exits
    2, as for a usage error), with the shared ``-h`` and help layout."""
    app = typer.Typer(name=name, help=help_text, add_completion=False, pretty_exceptions_enable=False,
                      context_settings=CONTEXT, rich_markup_mode=MARKUP)

    @app.callback(invoke_without_command=True)
    def _bare(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)

    return app


class Command(TyperCommand):
    """A typer command whose usage line names arguments ``CLIP`` / ``[NAMES]...`` (upper-case metavars).

    Recent typer writes a required argument as ``{clip}``, which reads like a set of choices."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "arg").upper()
                if not param.required:
                    name = f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def print_text(text: str) -> None:
    """Write ``text`` to stdout as it is: rich would hard-wrap it at 80 columns when stdout is not a terminal,
    which breaks markdown tables that users redirect into files."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def print_line(text: str) -> None:
    """One ``error:`` / ``warning:`` line on stderr, never wrapped (a rich console wraps at 80 columns when
    stderr is not a terminal, and scripts read the first line)."""
    sys.stderr.write(text.replace("\n", " ") + "\n")
    sys.stderr.flush()


def emit_summary(title: str, data: dict[str, Any], as_json: bool, error: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        table = Table(title=Text(title), show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # long paths wrap onto the next line instead of ending in "…"
        for k, v in data.items():
            table.add_row(Text(k), Text(str(v)))
        Console().print(table)
    if error:
        print_line(f"error: {error}")
        raise typer.Exit(1)
