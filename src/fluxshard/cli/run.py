"""``fluxshard run``: the main job — incremental inference over a clip, optionally verified against dense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import emit_summary, err
from fluxshard.data.fetch import clip_path


def run(
    clip: Annotated[str, typer.Argument(help="Video file, URL, or a bundled clip name (bikes, vtest, cup).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    mode: Annotated[str, typer.Option(help="exact | fast")] = "exact",
    verify: Annotated[bool, typer.Option("--verify", help="Also run dense inference on every frame and report "
                                                          "parity, speedup and accuracy retention.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Overlay video: recomputed shards + boxes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
    factor: Annotated[int | None, typer.Option(help="Integer input reduction (default: fit 640 px).")] = None,
    thresholds: Annotated[Path | None, typer.Option(help="Fast-mode thresholds JSON (default: the model's "
                                                         "shipped profile).")] = None,
    tau_in: Annotated[float | None, typer.Option(help="Fast mode: input residual threshold (0..1).")] = None,
    tau: Annotated[float | None, typer.Option(help="Fast mode: truncation threshold for every layer.")] = None,
    refresh: Annotated[int | None, typer.Option(help="Dense refresh every N frames.", min=1)] = None,
    calibrate: Annotated[bool, typer.Option(help="Measure per-layer sparse/dense costs on the first frame "
                                                 "(~2 s once; picks better paths at this machine's thread count)."
                                            )] = True,
    guard: Annotated[bool, typer.Option(help="Cost guard: run frames dense while incremental frames cost more "
                                             "than dense ones, probing again after 8 frames, backing off to 32 "
                                             "(output is unaffected).")
                     ] = True,
) -> None:
    """Run MODEL over CLIP with the FluxShard engine (exact or fast mode)."""
    from fluxshard.engine import EngineConfig
    from fluxshard.engine.run import run_clip
    from fluxshard.video import VideoWriter, open_video
    from fluxshard.video.encode import OVERLAY_PRESET
    from fluxshard.viz import draw_results, tint_blocks

    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"--mode must be exact or fast, not {mode!r}")
    if mode == "exact" and (thresholds or tau_in is not None or tau is not None):
        raise typer.BadParameter("--thresholds/--tau-in/--tau only apply to --mode fast")
    over: dict[str, Any] = {"refresh_every": refresh, "calibrate": calibrate, "guard": guard}
    if mode == "fast":
        if tau_in is not None:
            over["tau_in"] = tau_in
        if tau is not None:
            over["default_threshold"] = tau
        from fluxshard.engine.engine import default_profile

        profile = thresholds or default_profile(model)
        cfg = (EngineConfig.from_file(profile, **over) if profile
               else EngineConfig(mode="fast", **{"tau_in": 0.02, "default_threshold": 0.1, **over}))
    else:
        cfg = EngineConfig(**over)
    path = clip_path(clip)
    total = open_video(path).info.frames_expected
    if max_frames is not None:
        total = min(total or max_frames, max_frames)
    writer = VideoWriter(out, fps=open_video(path).info.fps or 25, preset=OVERLAY_PRESET) if out is not None else None

    with Progress(TextColumn("[bold]run[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=as_json) as progress:
        task = progress.add_task(f"{Path(str(path)).name} ({mode})", total=total)

        def on_frame(_i: int, frame: Any, rec: dict[str, Any]) -> None:
            if writer is not None:
                rgb = frame.rgb
                st = rec["stats"]
                if st.recompute_map is not None:
                    m = _frame_mask(st.recompute_map, rgb.shape[:2], rec["recompute_scale"])
                    rgb = tint_blocks(rgb, m, 1, (255, 60, 60), 0.3)
                else:
                    rgb = tint_blocks(rgb, np.ones(rgb.shape[:2], bool), 1, (255, 60, 60), 0.3)
                rgb = draw_results(rgb, rec["detections"])
                writer.write(_even(rgb))
            progress.advance(task)

        try:
            summary = run_clip(path, model, cfg, verify=verify, max_frames=max_frames, factor=factor,
                               on_frame=on_frame)
        finally:
            if writer is not None:
                writer.close()
    data = summary.to_dict()
    if out is not None:
        data["overlay"] = str(out)
    emit_summary(f"run: {path}", data, as_json, summary.error)


def _frame_mask(mask: np.ndarray, hw: tuple[int, int], scale: int) -> np.ndarray:
    """First-conv recompute map (one cell = ``scale`` frame pixels) → frame-sized bool mask."""
    big = np.repeat(np.repeat(mask, scale, 0), scale, 1)
    out = np.zeros(hw, bool)
    hh, ww = min(hw[0], big.shape[0]), min(hw[1], big.shape[1])
    out[:hh, :ww] = big[:hh, :ww]
    return out


def _even(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return rgb[: h - h % 2, : w - w % 2]


def register(app: typer.Typer) -> None:
    app.command("run")(run)
