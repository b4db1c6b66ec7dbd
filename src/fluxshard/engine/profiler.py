"""Truncation profiler (seed 000 §II-C and its truncation policy): per motion bin, the largest per-layer
thresholds that keep accuracy retention ≥ a target against dense inference, maximising reuse.

Decisions (the seed gives the idea, not the numbers; see docs/design.md):

* **Motion bins** — mean |MV| over the frame's valid blocks, in engine-input px/frame, upper edges
  ``DEFAULT_BINS`` = 0.5 (static), 2, 6, ∞ (fast pans). Fast motion moves more content through block
  boundaries and RFAP-failing windows, so its caches carry more approximation and want tighter thresholds.
* **Schedule** — one parameter per bin: τ^l = α · σ_l, where σ_l is the standard deviation of layer l's
  dense output over the profiling frames. Deep layers with large activations get proportionally larger
  thresholds; a single α keeps the search one-dimensional and monotone.
* **Search** — α over a fixed ascending grid; every clip is run once per α with that α in every bin, and
  each bin keeps the largest α before its retention first drops below the target. A bin's retention is the
  *worst* of mAP@0.5 on its frames pooled over all clips and on its frames of each clip that has at least
  ``MIN_BIN_FRAMES`` of them: the target holds per clip, not only on average (pooling let an easy clip
  hide a hard one: 0.972 on the PTZ clip under a profile whose pooled bins all met 0.99).
  Bins with too few frames take the smallest α of the measured bins (and follow them down in the repairs
  below), and so do bins whose frames hold too few reference objects: a retention over fewer than
  ``metrics.MIN_REFERENCE_OBJECTS`` dense detections is undefined (one miss would move it by more than the
  1 % a 0.99 target allows), so such frames never certify a bin — a clip's per-bin value is left out of the
  bin's worst, and a bin whose pooled frames are that sparse is unmeasured. Every bin records its count
  (``reference_objects``, ``per_clip_reference_objects``).
  A bin whose retention is below the target even at the first (tightest) α cannot reach it with this τ_in
  (zero-motion baselines on slow pans: τ_in lets a block whose content slid by 1 px count as unchanged, and
  no τ^l undoes that). Such a bin keeps α = 0 and its τ_in steps down ``TAU_IN_STEPS`` (÷2, ÷4, then 0 =
  every changed block is residual) in the final pass below until the target holds; the JSON gives each
  bin's ``tau_in``. Only a bin still short at τ_in = 0 and α = 0 says ``target_met: false``.
  Frames of one bin are affected by the caches earlier frames left, so a final pass with the chosen per-bin
  thresholds measures what the profile actually achieves; that is what the JSON records. When that mix
  misses the target in a bin (pooled or in one clip), or on one clip over all its frames, the offending
  bin — for a whole-clip miss, that clip's bin with the lowest retention — steps one value tighter (α down
  the grid; at α = 0, τ_in down its steps), and the mix is measured again.
* **Path regimes** — the final pass measures the mix under ``PATH_REGIMES``: the calibrated path choices,
  and the choices made with fast mode's compiled path priced at ½× and 2× its measured cost
  (``Engine.share_calibration(pgemm_scale=...)``); every retention is the worst of the three. The paths
  differ in float summation order, a truncation test that flips on 1e-6 changes what later frames recompute,
  and calibration on this shared machine varies 2–3× between runs: a delta profile certified
  at 1.000 on bikes in its 2–6 px bin under one calibration, measured 0.87–0.95 under others. A profile must
  hold on the paths a user's run will take, not only on the ones the profiling run happened to take.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fluxshard.engine import calibration
from fluxshard.engine.engine import Engine, EngineConfig, bin_of, field_motion
from fluxshard.engine.inputs import InputMapper, choose_factor
from fluxshard.errors import FluxShardError

DEFAULT_BINS = (0.5, 2.0, 6.0, math.inf)
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.65, 1.0, 1.5, 2.2, 3.0, 4.5, 6.5, 10.0)
MIN_BIN_FRAMES = 5
TAU_IN_STEPS = (0.5, 0.25, 0.0)  # fractions of the profile's τ_in tried, in order, by a bin short at α = 0
PATH_REGIMES = (1.0, 0.5, 2.0)  # compiled-path price factors the final pass certifies under (see above)


@dataclass
class Clip:
    path: str
    mapper: InputMapper
    frames: list[tuple[torch.Tensor, Any]]
    motion: list[float]
    dense_dets: list[Any]
    skip: int = 0  # frames decoded and left out before the profiled ones


def model_hash(body: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(body.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


METHODS = ("fluxshard-fast", "delta", "global-warp")


def load_clip(path: str, adapter: Any, max_frames: int, factor: int | None = None,
              method: str = "fluxshard-fast", skip: int = 0) -> Clip:
    """Frames, fields and dense detections of ``path`` (``max_frames`` of them after the first ``skip``: a
    profile made on other footage of the same camera than the footage it is evaluated on). ``method`` replaces
    the field as the bench harness does for that baseline (``delta``: zero motion, ``global-warp``: one
    global transform), so a baseline can get its own thresholds at the same retention target; the motion bins
    stay those of the codec field."""
    from fluxshard.engine.baselines import FIELD_FOR
    from fluxshard.motion import MotionStream

    if method not in METHODS:
        raise FluxShardError(f"unknown profiling method {method!r}; choose from {', '.join(METHODS)}")
    remap = FIELD_FOR.get(method)

    stream = MotionStream(path, block=16, max_frames=skip + max_frames)
    mapper = InputMapper((stream.info.height, stream.info.width),
                         factor or choose_factor((stream.info.height, stream.info.width)))
    frames, motion, dets = [], [], []
    with torch.inference_mode():
        for i, mf in enumerate(stream):
            if i < skip:
                continue
            x = mapper.tensor(mf.frame.rgb)
            f = mapper.field(mf.field)
            motion.append(field_motion(f) if not f.scene_cut else math.inf)
            frames.append((x, remap(f) if remap is not None else f))
            dets.append(adapter.postprocess_input(adapter.body(x.contiguous(memory_format=torch.channels_last)),
                                                  mapper.input_hw))
    if len(frames) < 2:
        raise FluxShardError(f"{path}: fewer than 2 frames decoded after skipping {skip}, nothing to profile")
    return Clip(path, mapper, frames, motion, dets, skip)


def layer_scales(adapter: Any, clips: Sequence[Clip], frames_per_clip: int = 4) -> dict[str, float]:
    """σ_l: standard deviation of each convolution's dense output (post-activation when fused)."""
    acc: dict[str, list[float]] = {}
    for c in clips:
        eng = Engine(adapter.body, c.mapper.input_hw, EngineConfig(mode="fast"))
        for x, _ in c.frames[:frames_per_clip]:
            eng.step(x, None)  # no field: a dense frame that fills every cache
            for name in eng.info.convs:  # caches also hold fast mode's row ops, which take no threshold
                acc.setdefault(name, []).append(float(eng._caches[name].float().std()))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _retention(cand: list[Any], ref: list[Any]) -> float | None:
    """mAP@0.5 of ``cand`` against ``ref``; None when ``ref`` holds fewer than ``MIN_REFERENCE_OBJECTS``
    confident detections (false positives on frames without reference objects are not counted as a failure
    any more: a value over so few objects is noise, and would certify or fail a bin by chance)."""
    from fluxshard.metrics import accuracy_retention

    return accuracy_retention(cand, ref, iou_types=["bbox"]).value("bbox", "map50")


def reference_objects(ref: Sequence[Any]) -> int:
    """Dense detections a retention over ``ref`` is scored against (score ≥ the dense reference's minimum)."""
    from fluxshard.metrics import DENSE_REFERENCE
    from fluxshard.models.base import Detections

    return sum(int(np.count_nonzero(r.scores >= DENSE_REFERENCE.min_score)) for r in ref if isinstance(r, Detections))


_CALIBRATED: dict[tuple[int, tuple[int, int]], tuple[Any, Engine]] = {}


def _calibrated(adapter: Any, clip: Clip) -> Engine:
    """An engine calibrated (as ``fluxshard run`` and ``bench`` calibrate) on ``clip``'s first frame, once per
    model and input size, not once per α."""
    key = (id(adapter.body), clip.mapper.input_hw)
    donor = _CALIBRATED.get(key)
    if donor is None or donor[0] is not adapter.body:
        # the stored calibration `fluxshard run` uses on this machine: the first regime is its path choice
        eng = Engine(adapter.body, clip.mapper.input_hw, EngineConfig(mode="fast", calibrate=True,
                                                                      calibration_dir=str(calibration.default_dir())))
        with torch.inference_mode():
            eng.step(clip.frames[0][0], None)  # a dense frame: calibrates every layer
        donor = _CALIBRATED[key] = (adapter.body, eng)
    return donor[1]


def run_config(adapter: Any, clip: Clip, cfg: EngineConfig,
               pgemm_scale: float = 1.0) -> tuple[list[Any], list[float], list[bool]]:
    """Detections, active fraction and dense flag per frame of ``clip`` under ``cfg`` (thresholds chosen by
    the frame's codec-field motion, whatever field the method feeds the engine), on the calibrated paths —
    or, with ``pgemm_scale``, on those chosen with the compiled path priced that many times its cost (see
    ``PATH_REGIMES``)."""
    eng = Engine(adapter.body, clip.mapper.input_hw, dataclasses.replace(cfg, calibrate=True))
    eng.share_calibration(_calibrated(adapter, clip), pgemm_scale)
    dets, active, dense = [], [], []
    with torch.inference_mode():
        for (x, f), m in zip(clip.frames, clip.motion, strict=True):
            out, st = eng.step(x, f, motion=m if math.isfinite(m) else None)
            dets.append(adapter.postprocess_input(out, clip.mapper.input_hw))
            active.append(st.active_fraction)
            dense.append(st.dense)
    return dets, active, dense


def per_bin(clips: Sequence[Clip], runs: Sequence[tuple[list[Any], list[float], list[bool]]],
            bins: Sequence[float]) -> list[dict[str, Any]]:
    """Retention and reuse per bin over the incrementally computed frames of all clips. ``retention_map50``
    is the worst of the pooled value and each clip's own (clips with at least ``MIN_BIN_FRAMES`` frames in
    the bin); ``pooled`` and ``per_clip`` (every clip with a frame in the bin) give the parts, None where the
    frames hold too few reference objects (counts in ``reference_objects`` and ``per_clip_reference_objects``)."""
    out = []
    for b in range(len(bins)):
        cand, ref, act = [], [], []
        worst: float | None = None
        per_clip: list[float | None] = []
        per_clip_n: list[int] = []
        for c, (dets, active, dense) in zip(clips, runs, strict=True):
            idx = [i for i, m in enumerate(c.motion) if not dense[i] and bin_of(m, bins) == b]
            cand += [dets[i] for i in idx]
            ref += [c.dense_dets[i] for i in idx]
            act += [active[i] for i in idx]
            own = _retention([dets[i] for i in idx], [c.dense_dets[i] for i in idx]) if idx else None
            per_clip.append(own)
            per_clip_n.append(reference_objects([c.dense_dets[i] for i in idx]))
            if own is not None and len(idx) >= MIN_BIN_FRAMES:
                worst = own if worst is None else min(worst, own)
        pooled = _retention(cand, ref) if cand else None
        if pooled is not None:
            worst = pooled if worst is None else min(worst, pooled)
        out.append({"frames": len(cand), "retention_map50": worst, "pooled": pooled, "per_clip": per_clip,
                    "reference_objects": reference_objects(ref), "per_clip_reference_objects": per_clip_n,
                    "reuse": float(1.0 - np.mean(act)) if act else None})
    return out


def _measurable(stats: dict[str, Any]) -> bool:
    """A bin the search may certify or fail: enough frames, and a defined retention (enough reference objects)."""
    return stats["frames"] >= MIN_BIN_FRAMES and stats["retention_map50"] is not None


def _worst(values: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Elementwise minimum over regimes (None where no regime measured the entry)."""
    out: list[float | None] = []
    for vs in zip(*values, strict=True):
        known = [v for v in vs if v is not None]
        out.append(min(known) if known else None)
    return out


def _worst_bins(by_regime: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """:func:`per_bin` results of several regimes merged bin by bin: the worst retention (pooled, per clip and
    the bin's deciding value), frames and reuse of the first regime (the calibrated paths)."""
    out = []
    for stats in zip(*by_regime, strict=True):
        merged = dict(stats[0])
        for k in ("retention_map50", "pooled"):
            merged[k] = _worst([[s.get(k)] for s in stats])[0]
        if "per_clip" in merged:
            merged["per_clip"] = _worst([s["per_clip"] for s in stats])
        out.append(merged)
    return out


def per_clip(clips: Sequence[Clip], runs: Sequence[tuple[list[Any], list[float], list[bool]]]) -> list[float | None]:
    """Each clip's retention over all its incrementally computed frames (what ``fluxshard bench`` reports)."""
    return [_retention([d for d, dn in zip(r[0], r[2], strict=True) if not dn],
                       [d for d, dn in zip(c.dense_dets, r[2], strict=True) if not dn])
            for c, r in zip(clips, runs, strict=True)]


def profile(adapter: Any, model: str, clips: Sequence[Clip], target: float = 0.99, tau_in: float = 0.02,
            bins: Sequence[float] = DEFAULT_BINS, alphas: Sequence[float] = ALPHAS,
            progress: Callable[[str], None] | None = None, method: str = "fluxshard-fast",
            carry_tolerance: float = 0.0, zero_rescue: float | None = None) -> dict[str, Any]:
    """Search α per bin (see module docstring) and return the profile as a JSON-ready dict.
    ``carry_tolerance`` and ``zero_rescue`` (default: the engine's for fluxshard-fast, off for the baselines,
    whose fields are not the codec's) are profiled as given (see ``EngineConfig``) and recorded."""
    if zero_rescue is None:
        zero_rescue = EngineConfig.zero_rescue if method == "fluxshard-fast" else -1.0
    t0 = time.perf_counter()
    sigma = layer_scales(adapter, clips)
    best: list[float | None] = [None] * len(bins)
    failed = [False] * len(bins)
    tried: list[dict[str, Any]] = []
    for a in alphas:
        th = {k: a * v for k, v in sigma.items()}
        cfg = EngineConfig(mode="fast", tau_in=tau_in, thresholds=th, carry_tolerance=carry_tolerance,
                           zero_rescue=zero_rescue)
        runs = [run_config(adapter, c, cfg) for c in clips]
        stats = per_bin(clips, runs, bins)
        tried.append({"alpha": a, "bins": stats})
        for b, s in enumerate(stats):
            if failed[b] or not _measurable(s):
                continue
            if s["retention_map50"] >= target:
                best[b] = a
            else:
                failed[b] = True
        if progress is not None:
            progress(f"alpha {a:g}: " + ", ".join(
                f"bin{b} ret {s['retention_map50'] if s['retention_map50'] is None else round(s['retention_map50'], 3)}"
                for b, s in enumerate(stats)))
        if all(failed[b] or (best[b] is None and not _measurable(stats[b])) for b in range(len(bins))):
            break
    # a bin that failed at the very first (tightest) alpha cannot meet the target with this tau_in: it gets
    # that tightest alpha (and says so), never a looser neighbour's, and the final pass tightens its tau_in;
    # bins with too few frames borrow the smallest measured alpha
    unreachable = [failed[b] and best[b] is None for b in range(len(bins))]
    for b in range(len(bins)):
        if unreachable[b]:
            best[b] = alphas[0]
    measured = [x is not None for x in best]
    known = [x for b, x in enumerate(best) if x is not None and not unreachable[b]]
    fallback = min(known) if known else alphas[0]
    alpha = [x if x is not None else fallback for x in best]
    tau_step = [-1] * len(bins)  # per bin, index into TAU_IN_STEPS (-1: the profile's own tau_in)

    def bin_tau(b: int) -> float:
        return tau_in if tau_step[b] < 0 else tau_in * TAU_IN_STEPS[tau_step[b]]

    def steppable(b: int) -> bool:
        return alpha[b] > alphas[0] or (bin_tau(b) > 0.0 and tau_step[b] + 1 < len(TAU_IN_STEPS))

    # The search runs one alpha for every bin; the profile mixes them, and frames of one bin inherit caches
    # left by another's. So the mix is measured, and a bin that misses the target in it steps tighter
    # until the mix holds or the bin is at α = 0 and τ_in = 0.
    repairs: list[dict[str, Any]] = []
    while True:
        tau_ins = [bin_tau(b) for b in range(len(bins))]
        final_cfg = EngineConfig(mode="fast", tau_in=tau_in, motion_bins=tuple(bins), carry_tolerance=carry_tolerance,
                                 zero_rescue=zero_rescue,
                                 bin_thresholds=tuple(({k: a * v for k, v in sigma.items()}, 0.0) for a in alpha),
                                 bin_tau_in=tuple(tau_ins) if any(t != tau_in for t in tau_ins) else ())
        regimes = [[run_config(adapter, c, final_cfg, s) for c in clips] for s in PATH_REGIMES]
        runs = regimes[0]
        by_regime = [per_bin(clips, r, bins) for r in regimes]
        final = _worst_bins(by_regime)
        clip_ret = _worst([per_clip(clips, r) for r in regimes])

        can = [final[b]["frames"] >= MIN_BIN_FRAMES and steppable(b) for b in range(len(bins))]
        short = [b for b in range(len(bins)) if can[b]
                 and final[b]["retention_map50"] is not None and final[b]["retention_map50"] < target]
        if not short:  # every bin holds: a clip may still miss over all its frames
            for ci, r in enumerate(clip_ret):
                if r is None or r >= target:
                    continue
                own = [(final[b]["per_clip"][ci], b) for b in range(len(bins))
                       if can[b] and final[b]["per_clip"][ci] is not None]
                if own:
                    b = min(own)[1]
                    if b not in short:
                        short.append(b)
        if not short:
            break
        repairs.append({"alpha": list(alpha), "tau_in": list(tau_ins),
                        "retention": [f["retention_map50"] for f in final], "clip_retention": clip_ret})
        for b in short:
            if alpha[b] > alphas[0]:
                alpha[b] = max(a for a in alphas if a < alpha[b])
            else:
                tau_step[b] += 1
        tightened = [alpha[b] for b in range(len(bins)) if measured[b] and not unreachable[b]]
        for b in range(len(bins)):  # an unmeasured bin follows the measured ones as they tighten
            if not measured[b] and tightened:
                alpha[b] = min(alpha[b], min(tightened))
        if progress is not None:
            progress("mix below target in bin(s) " + ", ".join(map(str, short))
                     + f": alpha now {alpha}, tau_in {[bin_tau(b) for b in range(len(bins))]}")
    overall = _retention([d for r in runs for d, dn in zip(r[0], r[2], strict=True) if not dn],
                         [d for c, r in zip(clips, runs, strict=True)
                          for d, dn in zip(c.dense_dets, r[2], strict=True) if not dn])
    return {
        "model": model,
        "model_hash": model_hash(adapter.body),
        "method": method,
        "target_retention": target,
        "tau_in": tau_in,
        "accumulate": final_cfg.accumulate,
        "carry_tolerance": carry_tolerance,
        "zero_rescue": zero_rescue,
        "clip_retention_map50": clip_ret,
        "schedule": "tau_l = alpha * sigma_l; sigma_l = std of conv l's dense output over the profiling frames",
        "motion_unit": "mean |MV| over valid blocks, engine-input px/frame",
        "sigma": sigma,
        "bins": [
            {"max_motion": (edge if math.isfinite(edge) else 1e9), "alpha": a, "tau_in": t, "measured": m,
             # a bin short of the target at the profile's τ_in is met only if tightening τ_in measured it so
             "target_met": (not u or t < tau_in) and (f["retention_map50"] is None or f["retention_map50"] >= target),
             "thresholds": {k: a * v for k, v in sigma.items()}, "default_threshold": 0.0, **f}
            for edge, a, t, m, u, f in zip(bins, alpha, tau_ins, measured, unreachable, final, strict=True)
        ],
        "retention_map50_all": overall,
        "path_regimes": {"pgemm_scale": list(PATH_REGIMES),
                         "retention_map50": [[f["retention_map50"] for f in r] for r in by_regime]},
        "search": tried,
        "repairs": repairs,
        "clips": [{"path": c.path, "skip": c.skip, "frames": len(c.frames), "input_hw": list(c.mapper.input_hw)}
                  for c in clips],
        "seconds": round(time.perf_counter() - t0, 1),
    }
