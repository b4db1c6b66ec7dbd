"""Whole-clip motion analysis behind ``fluxshard motion``: fields, residual sets, timings, overlay."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.motion.accumulate import AccumulatedField
from fluxshard.motion.field import MotionField
from fluxshard.motion.residual import residual_blocks
from fluxshard.motion.stream import MotionStream, MVSource


@dataclass
class MotionSummary:
    path: str
    codec: str
    width: int
    height: int
    block: int
    tau: float
    refresh: int
    frames: int = 0
    mv_source: str = ""
    decode_fps: float = 0.0
    motion_fps: float = 0.0
    check_fps: float = 0.0
    motion_overhead: float = 0.0  # motion front-end CPU time / decoder CPU time
    residual_fraction_mv: float = 0.0
    residual_fraction_zero_mv: float = 0.0
    mean_motion_px: float = 0.0
    valid_fraction: float = 0.0
    filled_fraction: float = 0.0
    scene_cuts: int = 0
    frame_types: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


def analyze_motion(
    path: str | Path,
    block: int = 16,
    mv_source: MVSource = "auto",
    tau: float = 4.0,
    refresh: int = 1,
    max_frames: int | None = None,
    overlay: Path | None = None,
    on_frame: Callable[[int], None] | None = None,
) -> MotionSummary:
    """Run the motion front-end over a clip and measure the residual set with and without MV alignment.

    The reference is a cached frame refreshed every ``refresh`` frames (1 = the previous frame), aligned
    with the accumulated field: exactly what a FluxShard endpoint's dispatch layer sees. Scene cuts reset
    the cache. Decode errors are recorded in ``error`` after every decodable frame has been analysed.
    """
    stream = MotionStream(path, block=block, mv_source=mv_source, max_frames=max_frames, on_error="collect")
    info = stream.info
    s = MotionSummary(str(path), info.codec, info.width, info.height, block, tau, refresh)
    writer = None
    if overlay is not None:
        from fluxshard.video import VideoWriter
        from fluxshard.video.encode import OVERLAY_PRESET
        from fluxshard.viz import motion_overlay

        writer = VideoWriter(overlay, fps=info.fps or 25, preset=OVERLAY_PRESET)
    res_mv: list[float] = []
    res_zero: list[float] = []
    motion: list[float] = []
    valid: list[float] = []
    filled: list[float] = []
    types: Counter[str] = Counter()
    cache: np.ndarray | None = None
    acc: AccumulatedField | None = None
    check_time = 0.0
    try:
        for mf in stream:
            fr, fld = mf.frame, mf.field
            types[fr.pict_type] += 1
            s.scene_cuts += int(fld.scene_cut and fr.index > 0)
            t0 = time.thread_time()
            residual = None
            if cache is None or acc is None or cache.shape != fr.luma.shape:
                acc = AccumulatedField(fr.height, fr.width, block)
            else:
                aligned = acc.update(fld)
                residual, _ = residual_blocks(fr.luma, cache, aligned, tau)
                zero, _ = residual_blocks(fr.luma, cache, MotionField.zero(fr.height, fr.width, block), tau)
                res_mv.append(float(residual.mean()))
                res_zero.append(float(zero.mean()))
                valid.append(fld.valid_fraction)
                filled.append(float(fld.filled.mean()) if fld.filled is not None else 0.0)
                if fld.valid.any():
                    motion.append(fld.mean_motion_px())
            if cache is None or fld.scene_cut or acc.age >= refresh:
                cache = fr.luma.copy()
                acc.reset()
            check_time += time.thread_time() - t0
            if writer is not None:
                writer.write(motion_overlay(fr.rgb, fld, residual))
            if on_frame is not None:
                on_frame(fr.index)
    finally:
        if writer is not None:
            writer.close()
    t = stream.timings
    s.frames = t.frames
    s.mv_source = stream.mv_source
    s.decode_fps = t.frames / t.decode if t.decode > 0 else 0.0
    s.motion_fps = t.frames / t.motion if t.motion > 0 else 0.0
    s.check_fps = t.frames / check_time if check_time > 0 else 0.0
    s.motion_overhead = t.motion / t.decode if t.decode > 0 else 0.0
    s.residual_fraction_mv = float(np.mean(res_mv)) if res_mv else 0.0
    s.residual_fraction_zero_mv = float(np.mean(res_zero)) if res_zero else 0.0
    s.mean_motion_px = float(np.mean(motion)) if motion else 0.0
    s.valid_fraction = float(np.mean(valid)) if valid else 0.0
    s.filled_fraction = float(np.mean(filled)) if filled else 0.0
    s.frame_types = dict(sorted(types.items()))
    s.error = stream.video.problem_text() or None
    return s
