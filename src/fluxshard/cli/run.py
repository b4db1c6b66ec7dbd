"""``fluxshard run``: the main job — incremental inference over a clip, optionally verified against dense."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxshard.cli._common import Command, emit_summary, err
from fluxshard.data.fetch import clip_path

if TYPE_CHECKING:
    from fluxshard.engine import EngineConfig


def run(
    clip: Annotated[str, typer.Argument(help="Video file, URL, or a bundled clip name (bikes, vtest, cup).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (nanodet).")] = "nanodet",
    mode: Annotated[str, typer.Option(help="fast (thresholded reuse, the shipped profile's retention target) | "
                                           "exact (output equals dense inference: for verification).")] = "fast",
    verify: Annotated[bool, typer.Option("--verify", help="Also run dense inference on every frame and report "
                                                          "parity, speedup and accuracy retention.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Overlay video: recomputed shards + boxes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.", min=1)] = None,
    factor: Annotated[int | None, typer.Option(help="Integer input reduction (default: fit 640 px).")] = None,
    thresholds: Annotated[Path | None, typer.Option(help="Fast-mode thresholds JSON (default: the model's "
                                                         "shipped profile).")] = None,
    tau_in: Annotated[float | None, typer.Option(help="Fast mode: input residual threshold (0..1) in every motion "
                                                      "bin (default: the profile's per-bin value).", min=0.0)] = None,
    tau: Annotated[float | None, typer.Option(help="Fast mode: truncation threshold for every layer in every "
                                                   "motion bin (default: the profile's per-layer, per-bin values).",
                                              min=0.0)] = None,
    refresh: Annotated[int | None, typer.Option(help="Dense refresh every N frames (default: only when needed — "
                                                     "first frame, shape change, cost guard).", min=1)] = None,
    calibrate: Annotated[bool, typer.Option(help="Pick each layer's executor path from per-layer costs measured "
                                                 "on the first frame (~2 s once per machine, model, input size "
                                                 "and thread count; stored in $FLUXSHARD_CACHE/calibration and "
                                                 "reused, so fast-mode outputs repeat from run to run).")] = True,
    recalibrate: Annotated[bool, typer.Option("--recalibrate", help="Measure the per-layer costs again, "
                                                                    "replacing the stored ones.")] = False,
    guard: Annotated[bool, typer.Option(help="Cost guard: run frames dense while incremental frames cost more "
                                             "than dense ones, probing again after 8 frames, backing off to 32. "
                                             "Exact mode decides from measured times (output unaffected); fast "
                                             "mode from the work done (mean active fraction above 0.75), so "
                                             "its output does not depend on timing.")
                     ] = True,
) -> None:
    """Run MODEL over CLIP with the FluxShard engine (fast mode by default; --mode exact for verification)."""
    from fluxshard.engine.run import run_clip
    from fluxshard.video import VideoWriter, open_video
    from fluxshard.video.encode import OVERLAY_PRESET
    from fluxshard.viz import RECOMPUTED, RUN_LEGEND, draw_results, tint_blocks

    cfg = engine_config(model, mode, thresholds=thresholds, tau_in=tau_in, tau=tau, refresh=refresh,
                        calibrate=calibrate, guard=guard, recalibrate=recalibrate)
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
                    rgb = tint_blocks(rgb, m, 1, RECOMPUTED, 0.3)
                else:
                    rgb = tint_blocks(rgb, np.ones(rgb.shape[:2], bool), 1, RECOMPUTED, 0.3)
                rgb = draw_results(rgb, rec["detections"], legend=RUN_LEGEND)
                writer.write(_even(rgb))
            progress.advance(task)

        try:
            summary = run_clip(path, model, cfg, verify=verify, max_frames=max_frames, factor=factor,
                               on_frame=on_frame)
        finally:
            if writer is not None:
                writer.close()
    data = summary.to_dict() if as_json else summary.display_dict()  # table: an n/a retention shows its reason
    if out is not None:
        data["overlay"] = str(out)
    emit_summary(f"run: {path}", data, as_json, summary.error)


def engine_config(model: str, mode: str, *, thresholds: Path | None = None, tau_in: float | None = None,
                  tau: float | None = None, refresh: int | None = None, calibrate: bool = True,
                  guard: bool = True, recalibrate: bool = False) -> EngineConfig:
    """The engine configuration `fluxshard run` uses: fast mode from ``thresholds`` or the model's shipped
    profile, with ``tau_in`` / ``tau`` replacing the profile's values in every motion bin."""
    from fluxshard.engine import EngineConfig

    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"--mode must be fast or exact, not {mode!r}")
    if mode == "exact" and (thresholds or tau_in is not None or tau is not None):
        raise typer.BadParameter("--thresholds/--tau-in/--tau only apply to --mode fast")
    from fluxshard.engine import calibration

    cal_dir = calibration.default_dir()
    if recalibrate:
        calibration.clear(cal_dir)
    over: dict[str, Any] = {"refresh_every": refresh, "calibrate": calibrate, "guard": guard,
                            "calibration_dir": str(cal_dir) if calibrate else None}
    if mode == "exact":
        return EngineConfig(**over)
    if tau_in is not None:
        over["tau_in"] = tau_in
    if tau is not None:
        over["default_threshold"] = tau
    from fluxshard.engine.engine import default_profile

    # no shipped profile (movenet): flat thresholds tight enough to keep 0.99 of the dense poses on vtest
    # (OKS ≥ 0.5 for 0.992 of 132, mean OKS 0.988, 150 frames; 0.02 / 0.1 kept 0.970); the summary says so
    profile = thresholds or default_profile(model)
    cfg = (EngineConfig.from_file(profile, **over) if profile
           else EngineConfig(mode="fast", **{"tau_in": 0.01, "default_threshold": 0.05, **over}))
    if tau is not None:  # a profile's per-layer, per-bin thresholds would otherwise win over default_threshold
        cfg = dataclasses.replace(cfg, thresholds={}, bin_thresholds=tuple(({}, tau) for _ in cfg.motion_bins))
    return cfg


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
    app.command("run", cls=Command)(run)
