"""One pass over a clip, every method a mode of the same loop (issue 5, item 2).

Why one loop: decode and the motion front-end run once per frame and every method sees the same input
tensor, the same field, the same model adapter and the same timer, so differences between rows are the
methods' own. The per-frame method order rotates, so no method always runs first on a cold cache.

Methods (all NanoDet through ``adapter.body``; detections via ``adapter.postprocess_input``):

* ``dense`` — the body on every frame (channels-last input); the reference for retention and max |Δ|.
* ``scene-reuse`` — SPINN/COACH-style whole-scene cache: luma downsampled 8× (block mean) is compared with
  that of the last *computed* frame; if the mean |Δ| is below ``scene_threshold`` grey levels the previous
  result is reused as a whole, else the frame is recomputed densely.
* ``delta`` — fast engine fed a zero field (DeltaCNN: no motion, deltas with truncation).
* ``global-warp`` — fast engine fed one RANSAC similarity for the whole frame (MotionDeltaCNN).
* ``fluxshard-exact`` — exact engine with the per-block field.
* ``fluxshard-fast`` — fast engine (shipped profile) with the per-block field.
* ``naive-mv`` — ``fluxshard-fast`` without RFAP at the first convolution.

``delta`` and ``global-warp`` use their own shipped profiles (same profiler, same retention target: thresholds
tuned for MV-aligned caches would be far too loose for unaligned ones); ``naive-mv`` uses ``fluxshard-fast``'s,
so only the motion handling differs. The timer covers the method's per-frame work: field conversion
(baselines), the similarity test, the body or engine step, and postprocessing to frame-pixel detections. At
one torch thread it reads the thread's CPU time (nothing runs in parallel then, so it equals wall time on a
quiet machine, and other jobs on a shared one do not land in whichever method was running); with more
threads, wall time. The report names the timer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxshard import cpu
from fluxshard.engine import baselines, calibration
from fluxshard.engine.engine import Engine, EngineConfig, StepStats, default_profile, field_motion
from fluxshard.engine.inputs import InputMapper, choose_factor
from fluxshard.errors import FluxShardError
from fluxshard.models import load_model
from fluxshard.models.base import Detections
from fluxshard.motion import MotionStream
from fluxshard.motion.field import MotionField

METHODS: tuple[str, ...] = ("dense", "scene-reuse", "delta", "global-warp", "fluxshard-exact", "fluxshard-fast",
                            "naive-mv")
ENGINE_METHODS = frozenset({"delta", "global-warp", "fluxshard-exact", "fluxshard-fast", "naive-mv"})

# Fallback when the model ships no profile: the flat thresholds `fluxshard run` falls back to (uncertified).
FALLBACK_FAST = {"tau_in": 0.01, "default_threshold": 0.05}


@dataclass
class FrameRow:
    """One method on one frame: what the CSV holds (detections stay in memory for retention)."""

    clip: str
    method: str
    frame: int
    motion_px: float  # mean |MV| of the frame-level field over valid blocks (px/frame, frame pixels)
    input_residual_fraction: float  # engine methods: StepStats; scene-reuse: 0 reused / 1 computed; dense: 1
    active_fraction: float  # mean over convolutions of positions recomputed (1.0 = dense frame)
    layer_active: list[float]  # per-conv active fraction, in execution order ([] on a dense frame)
    ms: float
    dense: bool  # the method computed this frame densely (first frame, cut, refresh, scene-reuse miss, dense)
    reason: str
    max_abs_diff: float  # max |body output − dense body output| on this frame
    n_dets: int
    detections: Detections | None = field(default=None, repr=False)

    def csv_dict(self) -> dict[str, Any]:
        la = self.layer_active
        return {
            "clip": self.clip, "method": self.method, "frame": self.frame,
            "motion_px": round(self.motion_px, 4),
            "input_residual_fraction": round(self.input_residual_fraction, 6),
            "active_fraction": round(self.active_fraction, 6),
            "layer_active_mean": round(float(np.mean(la)), 6) if la else "",
            "layer_active_first": round(la[0], 6) if la else "",
            "layer_active_last": round(la[-1], 6) if la else "",
            "layer_active": "[" + ",".join(f"{v:.4f}" for v in la) + "]",
            "ms": round(self.ms, 3), "dense": int(self.dense), "reason": self.reason,
            "max_abs_diff": f"{self.max_abs_diff:.6g}", "n_dets": self.n_dets,
        }


@dataclass
class ClipResult:
    clip: str
    path: str
    input_hw: tuple[int, int]
    factor: int
    mv_source: str
    fast_config: dict[str, Any]
    rows: list[FrameRow] = field(default_factory=list)
    error: str | None = None
    timer: str = "wall"

    def by_method(self, method: str) -> list[FrameRow]:
        return [r for r in self.rows if r.method == method]


@dataclass
class BenchConfig:
    model: str = "nanodet"
    methods: Sequence[str] = METHODS
    max_frames: int | None = None
    factor: int | None = None
    scene_threshold: float = 1.5  # scene-reuse: mean |Δ| of 8×-downsampled luma, grey levels (0..255)
    scene_downsample: int = 8
    fast_profile: str | Path | None = None  # default: the model's shipped profile


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """Validated method list in canonical order; ``dense`` is always run because it is the reference."""
    if spec is None:
        return list(METHODS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise FluxShardError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    want = set(names) | {"dense"}
    return [m for m in METHODS if m in want]


def fast_config(model: str, profile: str | Path | None = None) -> EngineConfig:
    p = profile or default_profile(model)
    return EngineConfig.from_file(p) if p else EngineConfig(mode="fast", **FALLBACK_FAST)  # type: ignore[arg-type]


def _target_of(profile: str | Path | None) -> float | None:
    """The retention target a profile was made for (None: not a `fluxshard profile` output)."""
    if not profile:
        return None
    try:
        t = json.loads(Path(profile).read_text()).get("target_retention")
    except (OSError, ValueError, AttributeError):
        return None
    return float(t) if isinstance(t, (int, float)) else None


def _downsampled_luma(luma: np.ndarray, k: int) -> np.ndarray:
    """k×k block means of the luma plane (float32): cheap, and insensitive to single-pixel codec noise."""
    h, w = (luma.shape[0] // k) * k, (luma.shape[1] // k) * k
    return luma[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_diff(a: Any, b: Any) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True))


def _to_frame(d: Detections, mapper: InputMapper) -> Detections:
    boxes = mapper.boxes_to_frame(d.boxes) if len(d) else d.boxes
    return Detections(boxes, d.scores, d.class_ids, d.class_names)


class _SceneReuse:
    """Whole-result cache keyed by a global similarity test against the last computed frame."""

    def __init__(self, threshold: float, k: int) -> None:
        self.threshold, self.k = threshold, k
        self.ref: np.ndarray | None = None
        self.out: Any = None
        self.dets: Detections | None = None

    def step(self, luma: np.ndarray, compute: Callable[[], tuple[Any, Detections]]) -> tuple[Any, Detections, bool]:
        small = _downsampled_luma(luma, self.k)
        if (self.ref is not None and self.ref.shape == small.shape and self.dets is not None
                and float(np.abs(small - self.ref).mean()) < self.threshold):
            return self.out, self.dets, True
        self.out, self.dets = compute()
        self.ref = small
        return self.out, self.dets, False


def bench_clip(path: str | Path, cfg: BenchConfig | None = None, clip: str | None = None,
               on_frame: Callable[[int], None] | None = None) -> ClipResult:
    """Run every method of ``cfg.methods`` over one clip; ``on_frame(i)`` after each decoded frame."""
    cfg = cfg or BenchConfig()
    methods = parse_methods(cfg.methods)
    adapter = load_model(cfg.model)
    if not hasattr(adapter, "postprocess_input"):
        raise FluxShardError(f"model {cfg.model!r} cannot run at native input resolution (needs postprocess_input)")
    stream = MotionStream(path, block=16, max_frames=cfg.max_frames, on_error="collect")
    fh, fw = stream.info.height, stream.info.width
    mapper = InputMapper((fh, fw), cfg.factor or choose_factor((fh, fw)))
    # every engine method calibrates its executor on its first (dense) frame, at this run's thread count
    cal_dir = str(calibration.default_dir())  # the stored per-machine costs `fluxshard run` uses too
    fast = dataclasses.replace(fast_config(cfg.model, cfg.fast_profile), calibrate=True, calibration_dir=cal_dir)
    # baselines get their own profiles (same target retention) when shipped: truncation tuned for
    # MV-aligned caches would be far too loose for caches that are not aligned at all
    own = {m: dataclasses.replace(EngineConfig.from_file(p), calibrate=True)
           for m in ("delta", "global-warp") if (p := default_profile(cfg.model, m)) and cfg.fast_profile is None}
    # the baselines' fields are theirs alone: no zero-shift rescue (a FluxShard input-stage step) for them
    base = {m: dataclasses.replace(own.get(m, fast), zero_rescue=-1.0) for m in ("delta", "global-warp")}
    configs = {
        "delta": base["delta"], "global-warp": base["global-warp"], "fluxshard-fast": fast,
        "fluxshard-exact": EngineConfig(calibrate=True, calibration_dir=cal_dir),
        # no RFAP at all: no strict mask at the first conv, and shard shifts rounded to each layer's stride
        # however misaligned (RFAP's "displacement divisible by the stride" condition dropped)
        "naive-mv": dataclasses.replace(fast, rfap=False, shift_tolerance=1 << 20, carry_tolerance=0.0),
    }
    engines = {m: Engine(adapter.body, mapper.input_hw, configs[m]) for m in methods if m in ENGINE_METHODS}
    # one measured cost model for every fast-mode method (the first to run a frame calibrates it): path choices
    # then differ only by the methods' active sets, not by calibration noise (separately calibrated engines on
    # this shared host can price the same layer differently and pick different paths for it)
    fast_engines = [e for e in engines.values() if e.config.mode == "fast"]
    for e in fast_engines[1:]:
        e.share_calibration(fast_engines[0])
    scene = _SceneReuse(cfg.scene_threshold, cfg.scene_downsample)
    name = clip or Path(str(path)).stem
    res = ClipResult(name, str(path), mapper.input_hw, mapper.factor, "", {
        "tau_in": fast.tau_in, "default_threshold": fast.default_threshold, "thresholds": dict(fast.thresholds),
        "motion_bins": list(fast.motion_bins),
        "bin_alpha_tau_mean": [float(np.mean(list(th.values()))) if th else d for th, d in fast.bin_thresholds],
        "own_profiles": {m: [float(np.mean(list(th.values()))) if th else d for th, d in c.bin_thresholds]
                         for m, c in own.items()},
        "target_retention": _target_of(cfg.fast_profile or default_profile(cfg.model)),  # marks † in the report
        # τ_in per bin: a profile tightens τ_in in a bin it cannot hold at τ^l = 0 (EngineConfig.bin_tau_in)
        "own_tau_in": {m: list(c.bin_tau_in) if c.bin_tau_in else [c.tau_in]
                       for m, c in {"fluxshard-fast": fast, **own}.items()}})
    body = adapter.body.eval()
    hw = mapper.input_hw

    def dense_once(x: torch.Tensor) -> tuple[Any, Detections]:
        out = body(x.contiguous(memory_format=torch.channels_last))
        return out, _to_frame(adapter.postprocess_input(out, hw), mapper)

    cpu.settle()  # one thread-count decision per clip (CLI's auto policy): the clock below must hold for all frames
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    res.timer = "thread CPU" if torch.get_num_threads() == 1 else "wall"
    with torch.inference_mode():
        dense_once(mapper.tensor(np.zeros((fh, fw, 3), np.uint8)))  # warm-up outside the timer
        for i, mf in enumerate(stream):
            x = mapper.tensor(mf.frame.rgb)
            fld = mapper.field(mf.field)
            motion = mf.field.mean_motion_px()
            fld_motion = field_motion(fld)  # the profile's bin for every engine method (same thresholds)
            luma = mf.frame.luma
            k = i % len(methods)
            outs: dict[str, Any] = {}
            for m in methods[k:] + methods[:k]:
                t0 = clock()
                st: StepStats | None = None
                reused = False
                if m == "dense":
                    out, dets = dense_once(x)
                elif m == "scene-reuse":
                    out, dets, reused = scene.step(luma, lambda: dense_once(x))  # noqa: B023 (called at once)
                else:
                    f: MotionField = fld
                    if m == "delta":
                        f = baselines.zero_field(fld)
                    elif m == "global-warp":
                        f = baselines.global_field(fld)
                    out, st = engines[m].step(x, f, motion=fld_motion)
                    dets = _to_frame(adapter.postprocess_input(out, hw), mapper)
                ms = (clock() - t0) * 1e3
                outs[m] = out
                if st is not None:
                    row = FrameRow(name, m, mf.index, motion, st.input_residual_fraction, st.active_fraction,
                                   [s.active_fraction for s in st.layers], ms, st.dense, st.reason, 0.0,
                                   len(dets), dets)
                else:
                    dense = not reused
                    row = FrameRow(name, m, mf.index, motion, 1.0 if dense else 0.0, 1.0 if dense else 0.0, [],
                                   ms, dense, "reused" if reused else "dense", 0.0, len(dets), dets)
                res.rows.append(row)
            for r in res.rows[-len(methods):]:
                r.max_abs_diff = 0.0 if r.method == "dense" else _max_diff(outs[r.method], outs["dense"])
            if on_frame is not None:
                on_frame(i)
    res.mv_source = stream.mv_source
    res.error = stream.video.problem_text() or None
    order = {m: j for j, m in enumerate(METHODS)}
    res.rows.sort(key=lambda r: (r.frame, order[r.method]))
    return res
