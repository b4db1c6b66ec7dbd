"""The command line as a whole: help on every command, usage lines, bad --max-frames, table and text output."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from fluxshard.cli._common import emit_summary, print_text
from synth import SynthClip

COMMANDS = [("motion", "CLIP"), ("detect", "CLIP"), ("run", "CLIP"), ("bench", "CLIPS..."),
            ("profile", "CLIPS..."), ("tile", "CLIP"), ("tile-bench", "CLIPS..."), ("data", "COMMAND [ARGS]..."),
            ("data fetch", "[NAMES]..."), ("data path", "NAME"), ("data list", ""), ("data ptz", "SRC OUT")]


def fluxshard(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fluxshard", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": str(columns)})


@pytest.mark.parametrize("command, args", COMMANDS)
def test_short_help_on_every_command(command: str, args: str) -> None:
    r = fluxshard(*command.split(), "-h")
    assert r.returncode == 0, r.stderr
    usage = r.stdout.splitlines()[0]  # "Usage: python -m fluxshard run [OPTIONS] CLIP" (run as a module here)
    assert f"fluxshard {command} [OPTIONS]" in usage and usage.rstrip().endswith(args)
    assert "{" not in usage  # typer's `{clip}` for a required argument
    assert "-h, --help" in r.stdout


@pytest.mark.parametrize("group", ["", "data"])
def test_bare_group_prints_help_and_succeeds(group: str) -> None:
    r = fluxshard(*group.split())
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("Usage: ") and "Commands:" in r.stdout


def test_run_help_states_defaults_in_a_wide_column() -> None:
    r = fluxshard("run", "-h", columns=80)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    text = "".join(r.stdout.split())  # wrapped lines joined back (hyphenated words stay whole)
    assert "[default:fast]" in text and "exact(outputequalsdenseinference:forverification)" in text
    assert "--tau-in<floatrange>Fastmode:inputresidualthreshold(0..1)ineverymotionbin(default:theprofile's" \
           "per-binvalue)." in text
    assert "(default:theprofile'sper-layer,per-binvalues)" in text  # --tau
    assert "(default:onlywhenneeded" in text  # --refresh
    # the description column starts early enough to keep at least 44 of the 80 columns
    starts = [ln.index("Fast mode") for ln in lines if ln.lstrip().startswith("--tau")]
    assert starts and max(starts) <= 36


@pytest.mark.parametrize("value", ["0", "-5"])
@pytest.mark.parametrize("command", [["motion", "vtest"], ["detect", "vtest"], ["run", "vtest"],
                                     ["tile", "vtest", "--slo", "50"], ["bench", "vtest"],
                                     ["tile-bench", "vtest", "--slo", "50"], ["profile", "vtest"]])
def test_max_frames_must_be_positive(command: list[str], value: str) -> None:
    r = fluxshard(*command, "--max-frames", value)
    assert r.returncode == 2 and r.stdout == ""
    assert "Invalid value for '--max-frames'" in r.stderr and "greater than or equal to" in r.stderr


def test_summary_table_keeps_long_values_whole(capsys: pytest.CaptureFixture[str]) -> None:
    path = "/very/long/directory/name/that/does/not/fit/" + "x" * 90 + "/clip-with-[brackets].mp4"
    emit_summary("run: clip", {"path": path, "frames": [640, 480]}, as_json=False)
    out = capsys.readouterr().out
    assert "…" not in out
    cells = "".join(re.sub(r"[\s│┃┌┐└┘─┬┴├┤┼]", "", ln) for ln in out.splitlines())
    assert path in cells and "[640,480]" in cells  # folded onto further lines, nothing cut, markup shown as is
    emit_summary("run: clip", {"path": path}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"path": path}


def test_print_text_does_not_wrap(capsys: pytest.CaptureFixture[str]) -> None:
    """bench / tile-bench print their markdown tables with this: one table row per line, whatever the width."""
    row = "| " + " | ".join(f"method-{i}" for i in range(20)) + " |"
    print_text(f"{row}\n{row}")
    assert capsys.readouterr().out == f"{row}\n{row}\n"


def test_bench_markdown_is_not_wrapped_when_piped(clip_p: SynthClip, tmp_path: Path) -> None:
    r = fluxshard("bench", str(clip_p.path), "--methods", "dense", "--max-frames", "2", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert len(rows) >= 3 and all(ln.endswith("|") for ln in rows)  # header, rule, one row per method
    assert max(len(ln) for ln in rows) > 80  # wider than the 80 columns rich assumed for a pipe


def test_tile_stages_end_finished() -> None:
    """Stages closes each progress bar at the count it reached: none is left part-way."""
    from fluxshard.cli.tile import Stages

    progress = Progress(console=Console(file=io.StringIO()))
    tick = Stages(progress, "clip")
    total = 10
    for i in range(1, 4):  # the profiler's stages share one counter: the first stops at 3 of 10
        tick("deployment accuracy", i, total)
    for i in range(4, 11):
        tick("deployment latency", i, total)
    tick("frames", 2, 0)  # an unknown total
    tick.finish()
    done = {t.description: (t.completed, t.total) for t in progress.tasks}
    assert done == {"clip · deployment accuracy": (3, 3), "clip · deployment latency": (10, 10),
                    "clip · frames": (2, 2)}
    assert all(t.finished for t in progress.tasks)
