"""Run the engine over a clip: decode + motion front-end → input mapping → engine → detections, with an
optional dense twin per frame (``verify``) for parity, speedup and accuracy retention measured in one run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fluxshard import cpu
from fluxshard.engine.engine import Engine, EngineConfig, default_profile
from fluxshard.engine.inputs import InputMapper, mapper_for
from fluxshard.errors import FluxShardError
from fluxshard.models import load_model
from fluxshard.models.base import Detections, Keypoints, Results
from fluxshard.motion import MotionStream


@dataclass
class RunSummary:
    path: str
    model: str
    mode: str
    frames: int = 0
    input_hw: tuple[int, int] = (0, 0)
    factor: int = 1
    mv_source: str = ""
    engine_ms_median: float = 0.0
    dense_ms_median: float | None = None
    speedup: float | None = None  # median dense ms / median engine ms
    speedup_total: float | None = None  # summed dense time / summed engine time (throughput, probes included)
    active_fraction_mean: float = 0.0  # over all frames (dense frames count as 1.0)
    incremental_active_fraction_mean: float | None = None  # over incrementally computed frames only
    dense_frames: int = 0
    guard_frames: int = 0  # dense frames the cost guard chose (incremental did not pay)
    max_abs_diff: float | None = None
    retention_map50: float | None = None  # None: not verified, too few reference objects, or a pose model
    retention_map: float | None = None
    retention_reference: str | None = None
    retention_reference_objects: int | None = None  # dense detections ≥ the reference score behind the retention
    retention_note: str | None = None  # why a retention is n/a
    # pose models (metrics.oks): mean OKS of the engine's poses against dense, the fraction with OKS ≥ 0.5
    oks_mean: float | None = None
    oks_retention: float | None = None
    oks_persons: int | None = None
    oks_note: str | None = None  # why oks_retention is n/a
    fast_thresholds: str | None = None  # fast mode: where the truncation thresholds came from
    barriers: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 5)
        d["input_hw"] = list(self.input_hw)
        return d

    def display_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for the table: an undefined retention reads as its reason ("n/a (only 5 reference
        objects ≥ score 0.5)") instead of None; JSON keeps null and the reason in ``*_note``."""
        d = self.to_dict()
        for k, note in (("retention_map50", self.retention_note), ("retention_map", self.retention_note),
                        ("oks_retention", self.oks_note)):
            if d[k] is None and note:
                d[k] = note
        if self.oks_persons is None:  # not a verified pose run: no OKS rows
            for k in ("oks_mean", "oks_retention", "oks_persons", "oks_note"):
                d.pop(k)
        return d


def run_clip(
    path: str,
    model: str = "nanodet",
    config: EngineConfig | None = None,
    verify: bool = False,
    max_frames: int | None = None,
    factor: int | None = None,
    on_frame: Callable[[int, Any, Any], None] | None = None,
) -> RunSummary:
    """Incremental inference over ``path``; ``on_frame(index, frame_rgb_getter, record)`` is called per
    frame with a dict holding the detections (frame pixels), the step stats and the engine's first-conv
    recompute map, for overlays and JSON lines."""
    cfg = config or EngineConfig()
    adapter = load_model(model)
    if not hasattr(adapter, "postprocess_input"):
        raise FluxShardError(f"model {model!r} cannot run at native input resolution (engine needs "
                             f"postprocess_input); available for: nanodet, movenet")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # fast mode's outputs depend on the thread count (oneDNN rounds differently at 1 and 2 threads, and a
    # truncation test can flip on that): one decision now, for the whole run, so identical runs repeat
    fixed_threads = cfg.mode == "fast"
    if fixed_threads:
        cpu.settle()
    stream = MotionStream(path, block=16, max_frames=max_frames, on_error="collect")
    fh, fw = stream.info.height, stream.info.width
    try:
        mapper = mapper_for(adapter, (fh, fw), factor)
    except ValueError as exc:
        raise FluxShardError(f"--factor {factor}: {exc}") from exc
    engine = Engine(adapter.body, mapper.input_hw, cfg)
    s = RunSummary(str(path), model, cfg.mode, input_hw=mapper.input_hw, factor=mapper.factor,
                   barriers=engine.barriers, fast_thresholds=thresholds_source(model, cfg))
    first = engine.info.convs[0] if engine.info.convs else None
    recompute_scale = mapper.factor * (engine.info.geoms[first].S if first else 1)
    eng_ms: list[float] = []
    dense_ms: list[float] = []
    active: list[float] = []
    inc_active: list[float] = []
    diffs: list[float] = []
    cand: list[Results] = []
    ref: list[Results] = []
    with torch.inference_mode():
        for mf in stream:
            if not fixed_threads:
                cpu.tick()  # thread count follows the CPU left free by other processes (auto policy)
            x = mapper.tensor(mf.frame.rgb)
            fld = mapper.field(mf.field)
            t0 = time.perf_counter()
            out, st = engine.step(x, fld)
            dets = results_to_frame(adapter.postprocess_input(out, mapper.input_hw), mapper)
            eng_ms.append((time.perf_counter() - t0) * 1e3)
            active.append(st.active_fraction)
            s.guard_frames += st.reason == "cost guard"
            if not st.dense:
                inc_active.append(st.active_fraction)
            record: dict[str, Any] = {"detections": dets, "stats": st, "recompute_scale": recompute_scale}
            if verify:
                t0 = time.perf_counter()
                dense_out = adapter.body(x.contiguous(memory_format=torch.channels_last))  # dense at its best
                dense_dets = results_to_frame(adapter.postprocess_input(dense_out, mapper.input_hw), mapper)
                dense_ms.append((time.perf_counter() - t0) * 1e3)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                refs = dense_out if isinstance(dense_out, (tuple, list)) else (dense_out,)
                diffs.append(max(float((a - b).abs().max()) for a, b in zip(outs, refs, strict=True)))
                cand.append(dets)
                ref.append(dense_dets)
                record["dense_detections"] = dense_dets
            if on_frame is not None:
                on_frame(mf.index, mf.frame, record)
    s.frames = len(eng_ms)
    s.mv_source = stream.mv_source
    s.dense_frames = sum(1 for a in active if a == 1.0)
    s.engine_ms_median = float(np.median(eng_ms)) if eng_ms else 0.0
    s.active_fraction_mean = float(np.mean(active)) if active else 0.0
    s.incremental_active_fraction_mean = float(np.mean(inc_active)) if inc_active else None
    if verify and dense_ms:
        s.dense_ms_median = float(np.median(dense_ms))
        s.speedup = s.dense_ms_median / s.engine_ms_median if s.engine_ms_median else None
        s.speedup_total = sum(dense_ms[1:]) / sum(eng_ms[1:]) if len(eng_ms) > 1 else None  # first: warm-up
        s.max_abs_diff = float(max(diffs))
        score_accuracy(s, cand, ref)
    s.error = stream.video.problem_text() or None
    return s


def score_accuracy(s: RunSummary, cand: list[Results], ref: list[Results]) -> None:
    """Retention against dense: box mAP for detectors, OKS for pose models; n/a with a note (and the count)
    when the reference holds too few objects to mean anything (metrics.retention.MIN_REFERENCE_OBJECTS)."""
    from fluxshard.metrics import accuracy_retention, keypoint_similarity

    s.retention_reference = "dense_outputs"
    if ref and isinstance(ref[0], Keypoints):
        rep = keypoint_similarity(cand, ref)  # type: ignore[arg-type]
        s.oks_mean, s.oks_retention, s.oks_persons = rep.oks_mean, rep.oks_retention, rep.persons
        s.oks_note = rep.note
        s.retention_note = (f"n/a for a pose model: see oks_mean / oks_retention (share of dense poses kept at OKS "
                            f"≥ {rep.threshold:g})")
        return
    rep = accuracy_retention(cand, ref, iou_types=["bbox"])
    s.retention_reference = rep.reference
    s.retention_map50 = rep.value("bbox", "map50")
    s.retention_map = rep.value("bbox", "map")
    s.retention_reference_objects = rep.reference_objects.get("bbox")
    s.retention_note = rep.notes.get("bbox")


def thresholds_source(model: str, cfg: EngineConfig) -> str | None:
    """Fast mode: "profile" when per-layer or per-bin thresholds are set, else a note that the run uses flat,
    uncertified thresholds (no shipped profile, e.g. movenet: `fluxshard profile` makes one)."""
    if cfg.mode != "fast":
        return None
    if cfg.thresholds or cfg.motion_bins:
        return "profile"
    shipped = default_profile(model) is not None
    return (f"flat τ_in {cfg.tau_in:g}, τ^l {cfg.default_threshold:g} in every layer, not certified by the profiler"
            + ("" if shipped else f" (no profile shipped for {model!r})"))


def results_to_frame(d: Results, mapper: InputMapper) -> Results:
    """Results in engine-input pixels → frame pixels (what every report and overlay uses)."""
    if isinstance(d, Keypoints):
        kp = d.keypoints.copy()
        kp[..., :2] = mapper.points_to_frame(kp[..., :2])
        return Keypoints(kp, d.scores, mapper.boxes_to_frame(d.boxes) if len(d) else d.boxes, d.names, d.skeleton)
    boxes = mapper.boxes_to_frame(d.boxes) if len(d) else d.boxes
    return Detections(boxes, d.scores, d.class_ids, d.class_names)
