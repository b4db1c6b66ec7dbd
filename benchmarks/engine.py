"""Engine vs dense inference, per clip × model × mode, measured in one run (issue: core engine).

Frames and motion fields are decoded once per clip and kept in memory, so only inference is timed. For every
mode the engine and the dense body run on the same frame back to back (the machine is shared: only same-loop
ratios mean anything); medians over the clip (the dense first frame excluded from the engine's median).

Printed per row: dense ms, engine ms, speedup = dense / engine (of the two medians), ``paired`` = the median of
the per-frame ratios dense / engine (each pair timed back to back on the same frame, so drift of the shared
machine within a run cancels; the two agree on a quiet machine), active fraction (mean share of conv output
positions recomputed), efficiency = speedup × active fraction (1.0 = the engine costs exactly its share of
dense work), retention (mAP@0.5 of the engine's detections against dense detections), max |Δ| of the raw
outputs. The first engine of each engine mode (exact, fast) calibrates its executor's per-layer costs on its
first (dense) frame, at the run's thread count; the clip's later rows of that mode share them, so rows differ
by what they reuse, not by calibration noise (``--no-calibrate``: the default cost rule). ``fast-zero-mv``
runs fast mode with a zero field
(the DeltaCNN assumption, with the delta baseline's own profile when shipped — same retention target — and
the bin of the frame's real motion): on moving clips MV alignment must give a smaller active set than zero
motion. ``+guard`` runs a mode with the engine's cost guard (frames run dense while incremental frames cost
more than dense ones, probing after 8 frames, backing off to 32 — what ``fluxshard run`` does); ``total`` =
summed dense time / summed engine time over the clip (throughput, probes and guard frames included),
``guard`` = frames the guard ran dense. ``--profile`` replaces the shipped fluxshard-fast
profile (e.g. one made with ``fluxshard profile --target-retention 0.95``). ``fast-site`` runs fast mode with a
per-camera profile, as a deployment would make one for its own camera: ``benchmarks/profiles/{model}_{clip}_r95.json``,
made with ``fluxshard profile CLIP --skip 300 --max-frames 200 --target-retention 0.95`` — on frames 300–499, so
disjoint from the frames benchmarked here (from 0, up to 300 frames); clips without one print no row.
At ``--threads 1`` every time is
the thread's CPU time (nothing runs in parallel then: equal to wall time on a quiet machine, and other jobs on
a shared one do not land in whichever side was running); otherwise wall time. The header names the timer.

    python benchmarks/engine.py [CLIP ...] [--frames 60] [--factor 1,2] [--threads 2] [--modes exact,fast,...]

Default clips: vtest, cup, bikes and a virtual-PTZ pan clip cut from vtest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxshard.data.fetch import clip_path
from fluxshard.engine.baselines import zero_field
from fluxshard.engine.engine import Engine, EngineConfig, default_profile, field_motion
from fluxshard.engine.inputs import InputMapper, choose_factor
from fluxshard.metrics import accuracy_retention
from fluxshard.models import load_model
from fluxshard.motion import MotionStream

MODES = ("exact", "exact+guard", "fast", "fast+guard", "fast-zero-mv", "fast-site")
SITE_PROFILES = Path(__file__).parent / "profiles"


def load_frames(path: str, frames: int, factor: int | None) -> tuple[InputMapper, list[tuple[torch.Tensor, Any]]]:
    stream = MotionStream(path, block=16, max_frames=frames)
    mapper = InputMapper((stream.info.height, stream.info.width),
                         factor or choose_factor((stream.info.height, stream.info.width)))
    out = [(mapper.tensor(mf.frame.rgb), mapper.field(mf.field)) for mf in stream]
    return mapper, out


def site_profile(model: str, clip: str) -> Path | None:
    """The per-camera 0.95 profile of ``clip`` (see the module docstring), if one was made."""
    p = SITE_PROFILES / f"{model}_{Path(clip).stem}_r95.json"
    return p if p.exists() else None


def config_for(mode: str, model: str, calibrate: bool, guard: bool = False, profile: str | None = None,
               ) -> EngineConfig:
    if mode == "exact":
        return EngineConfig(mode="exact", calibrate=calibrate, guard=guard)
    # zero motion gets the delta baseline's own thresholds (same retention target) when shipped: the
    # fluxshard profile is tuned for aligned caches and far too loose for unaligned ones
    prof = ((default_profile(model, "delta") if mode == "fast-zero-mv" else profile)
            or default_profile(model))
    return (EngineConfig.from_file(prof, calibrate=calibrate, guard=guard) if prof
            else EngineConfig(mode="fast", calibrate=calibrate, guard=guard))


def run_mode(adapter: Any, mapper: InputMapper, frames: list, mode: str, model: str,
             calibrate: bool = True, profile: str | None = None,
             calibrated: dict[str, Engine] | None = None) -> dict[str, Any]:
    """One mode over the frames. ``calibrated`` (per clip and input size, filled as modes run): engines of the
    same engine mode share the first one's measured cost model, so modes differ by what they reuse, not by
    calibration noise (each engine measuring its own on this shared host can pick other paths)."""
    guard = mode.endswith("+guard")
    base = mode.removesuffix("+guard")
    cfg = config_for(base, model, calibrate, guard, profile)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    eng = Engine(adapter.body, mapper.input_hw, cfg)
    if calibrated is not None and calibrate:
        if cfg.mode in calibrated:
            eng.share_calibration(calibrated[cfg.mode])
        else:
            calibrated[cfg.mode] = eng
    body = adapter.body
    eng_ms: list[float] = []
    dense_ms: list[float] = []
    pair: list[float] = []  # per-frame dense / engine, the two timed back to back on the same frame
    active: list[float] = []
    guarded = 0
    diffs: list[float] = []
    cand, ref = [], []
    with torch.inference_mode():
        for i, (x, f) in enumerate(frames):
            fld = zero_field(f) if mode.startswith("fast-zero-mv") else f
            t0 = clock()
            out, st = eng.step(x, fld, motion=field_motion(f))  # thresholds by the frame's real motion
            t1 = clock()
            xd = x.contiguous(memory_format=torch.channels_last)
            t2 = clock()
            dense = body(xd)
            t3 = clock()
            if i > 0:
                eng_ms.append((t1 - t0) * 1e3)
                active.append(1.0 if st.dense else st.active_fraction)
                pair.append((t3 - t2) / (t1 - t0))
            dense_ms.append((t3 - t2) * 1e3)
            guarded += st.reason == "cost guard"
            outs = out if isinstance(out, (tuple, list)) else (out,)
            refs = dense if isinstance(dense, (tuple, list)) else (dense,)
            diffs.append(max(float((a - b).abs().max()) for a, b in zip(outs, refs, strict=True)))
            cand.append(adapter.postprocess_input(out, mapper.input_hw))
            ref.append(adapter.postprocess_input(dense, mapper.input_hw))
    rep = accuracy_retention(cand, ref, iou_types=["bbox"])
    d, e = statistics.median(dense_ms), statistics.median(eng_ms)
    af = float(np.mean(active))
    total = sum(dense_ms[1:]) / sum(eng_ms)  # throughput over the clip (guard probes included)
    return {"mode": mode, "dense_ms": d, "engine_ms": e, "speedup": d / e, "speedup_total": total,
            "speedup_paired": statistics.median(pair),
            "guard_frames": guarded, "active": af,
            "efficiency": d / e * af, "retention_map50": rep.retention.get("bbox", {}).get("map50"),
            "max_abs_diff": max(diffs), "frames": len(frames)}


def print_layer_costs(adapter: Any, mapper: InputMapper, frames: list) -> None:
    """Per conv signature: dense ms and the best sparse path's ``a + b·f`` from the executor's calibration on
    this machine; ``dense/b`` is the per-position efficiency of sparse work (1.0 = a recomputed position costs
    what it costs in the dense op), ``crossover`` the active fraction above which dense wins."""
    eng = Engine(adapter.body, mapper.input_hw, EngineConfig(calibrate=True))
    with torch.inference_mode():
        eng.step(*frames[0])
    assert eng._plans is not None
    print(f"  {'input':>18} {'k':>6} {'s':>3} {'cout':>5} {'dense ms':>9} {'best path':>10} {'a ms':>6} {'b ms':>7}"
          f" {'dense/b':>8} {'crossover':>9}")
    tot_dense = tot_a = 0.0
    for sig, lc in eng._plans.costs.items():
        if not lc.measured:
            continue
        path, (a, b) = min(lc.paths.items(), key=lambda kv: kv[1][0] + kv[1][1] * 0.2)
        tot_dense += lc.dense
        tot_a += a
        print(f"  {'x'.join(map(str, sig[0][1:])):>18} {'x'.join(map(str, sig[2])):>6} {sig[3][0]:>3} {sig[1]:>5}"
              f" {lc.dense:>9.3f} {path:>10} {a:>6.3f} {b:>7.3f} {lc.dense / b:>8.2f} {lc.crossover():>9.2f}")
    print(f"  sum: dense {tot_dense:.2f} ms, fixed sparse cost {tot_a:.2f} ms (best path at f = 0.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="*")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--factor", default="auto", help="input reduction(s), comma-separated; auto = fit 640 px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--model", default="nanodet")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per row")
    ap.add_argument("--layers", action="store_true", help="also print each conv's calibrated costs: dense ms and, "
                    "per sparse path, fixed ms + ms per unit active fraction (what bounds the engine's efficiency)")
    ap.add_argument("--no-calibrate", action="store_true", help="use the executor's default cost rule instead of "
                    "measuring each layer on the first frame")
    ap.add_argument("--profile", help="fluxshard-fast profile JSON instead of the shipped one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    clips = [clip_path(c) for c in args.clips] if args.clips else None
    if clips is None:
        from fluxshard.data.ptz import make_ptz_clip

        ptz = Path(tmp.name) / "vtest_ptz_pan.mp4"
        make_ptz_clip(clip_path("vtest"), ptz, "pause:5,pan:4:60,tilt:-2:30", size=(640, 480))
        clips = [clip_path(c) for c in ("vtest", "cup", "bikes")] + [str(ptz)]
    adapter = load_model(args.model)
    factors = [None if f == "auto" else int(f) for f in args.factor.split(",")]
    modes = args.modes.split(",")
    timer = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"
    print(f"threads {args.threads} ({timer}), {args.frames} frames per clip, model {args.model}, "
          f"profile {args.profile or default_profile(args.model)}")
    print(f"{'clip':<18}{'input':>10} {'mode':<14}{'dense ms':>9}{'engine ms':>10}{'speedup':>8}{'paired':>7}"
          f"{'total':>7}"
          f"{'guard':>6}{'active':>8}"
          f"{'effic.':>7}{'ret@.5':>8}{'max|Δ|':>9}")
    rows = []
    for c in clips:
        for fac in factors:
            mapper, frames = load_frames(c, args.frames, fac)
            calibrated: dict[str, Engine] = {}
            for m in modes:
                prof = args.profile
                if m == "fast-site":
                    site = site_profile(args.model, c)
                    if site is None:
                        continue
                    prof = str(site)
                r = run_mode(adapter, mapper, frames, m, args.model, not args.no_calibrate, prof, calibrated)
                r.update(clip=Path(c).name, input_hw=list(mapper.input_hw))
                rows.append(r)
                ret = r["retention_map50"]
                print(f"{r['clip']:<18}{'x'.join(map(str, mapper.input_hw[::-1])):>10} {m:<14}{r['dense_ms']:>9.1f}"
                      f"{r['engine_ms']:>10.1f}{r['speedup']:>7.2f}×{r['speedup_paired']:>6.2f}×"
                      f"{r['speedup_total']:>6.2f}×{r['guard_frames']:>6}"
                      f"{r['active']:>8.3f}{r['efficiency']:>7.2f}"
                      f"{(ret if ret is not None else float('nan')):>8.3f}{r['max_abs_diff']:>9.2g}", flush=True)
                if args.json:
                    print(json.dumps(r))
            if args.layers:
                print_layer_costs(adapter, mapper, frames)
    tmp.cleanup()


if __name__ == "__main__":
    main()
