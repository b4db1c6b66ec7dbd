"""``fluxshard profile``: per-motion-bin truncation thresholds for a model (the fast mode's profile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard import cpu
from fluxshard.cli._common import Command
from fluxshard.data.fetch import clip_path


def profile(
    clips: Annotated[list[str], typer.Argument(help="Video files or bundled clip names (bikes, vtest, cup).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    target_retention: Annotated[float, typer.Option(help="Minimum mAP@0.5 retention against dense per bin.",
                                                    min=0.0, max=1.0)] = 0.99,
    max_frames: Annotated[int, typer.Option(help="Frames per clip.", min=2)] = 60,
    skip: Annotated[int, typer.Option(help="Leave out each clip's first N frames (profile on footage other than "
                                           "the footage you evaluate on).", min=0)] = 0,
    tau_in: Annotated[float, typer.Option(help="Input residual threshold (0..1).", min=0.0)] = 0.02,
    carry: Annotated[float, typer.Option(help="Carried sub-stride remainder tolerance, fraction of each stride "
                                              "(0 = off; fluxshard-fast only).", min=0.0, max=0.5)] = 0.0,
    zero_rescue: Annotated[float | None, typer.Option(help="Zero-shift rescue, fraction of tau_in (< 0 = off; "
                                                           "default: the engine's for fluxshard-fast, off for "
                                                           "the baselines).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Profile JSON (default: MODEL_profile.json).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the profile summary as one JSON object.")]
    = False,
    method: Annotated[str, typer.Option(help="Field the engine gets: fluxshard-fast (codec field), delta (zero "
                                             "motion) or global-warp (one global transform) — baselines get "
                                             "their own thresholds at the same target.")] = "fluxshard-fast",
) -> None:
    """Search the largest per-layer truncation thresholds per motion bin that keep retention ≥ target."""
    import torch

    from fluxshard.engine.profiler import ALPHAS, METHODS, load_clip
    from fluxshard.engine.profiler import profile as run_profile
    from fluxshard.models import load_model

    if method not in METHODS:
        raise typer.BadParameter(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cpu.settle()  # one thread-count decision (CLI's auto policy), then fixed: the profiler prices paths with it
    adapter = load_model(model)
    if not hasattr(adapter, "postprocess_input"):
        raise typer.BadParameter(f"model {model!r} cannot be profiled (the engine needs postprocess_input)")
    console = Console(stderr=True, quiet=as_json)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        t = bar.add_task("decoding + dense reference", total=len(clips))
        loaded = []
        for c in clips:
            loaded.append(load_clip(clip_path(c), adapter, max_frames, method=method, skip=skip))
            bar.advance(t)
        t2 = bar.add_task("threshold search (alpha grid)", total=len(ALPHAS) + 1)

        def step(msg: str) -> None:
            bar.advance(t2)
            console.log(msg)

        if carry and method != "fluxshard-fast":
            raise typer.BadParameter("--carry applies to the fluxshard-fast method only")
        prof = run_profile(adapter, model, loaded, target=target_retention, tau_in=tau_in, progress=step,
                           method=method, carry_tolerance=carry, zero_rescue=zero_rescue)
        bar.update(t2, completed=len(ALPHAS) + 1)
    suffix = "" if method == "fluxshard-fast" else f".{method}"
    path = out or Path(f"{model}{suffix}_profile.json")
    path.write_text(json.dumps(prof, indent=1))
    summary = {"profile": str(path), "model": model, "method": method, "target_retention": target_retention,
               "seconds": prof["seconds"], "retention_map50_all": prof["retention_map50_all"],
               "clip_retention_map50": prof["clip_retention_map50"],
               "bins": [{k: b[k] for k in ("max_motion", "alpha", "measured", "frames", "retention_map50", "reuse")}
                        for b in prof["bins"]]}
    if as_json:
        print(json.dumps(summary))
    else:
        Console().print_json(json.dumps(summary))


def register(app: typer.Typer) -> None:
    app.command("profile", cls=Command)(profile)
