"""How fast can a pan be reused? Engine vs dense on virtual-PTZ pans of several speeds, measured in one run.

Why: a cache shifted by whole feature pixels is exact only where the pan moves a layer's content by a
multiple of its cumulative stride (the Receptive-Field Alignment Principle). A pan of V px/frame at the
engine's input is aligned for every stride S that divides V and misaligned for the others, and in a detector
with a top-down pyramid (NanoDet's PAN upsamples its stride-32 features into every head level) one
misaligned stride-32 layer reaches every output. This benchmark separates that limit from the engine's own
costs: for each pan speed it prints

* ``aligned`` — the strides that V is a multiple of;
* ``conv share`` — dense conv time at those strides / dense time (hooks on the dense body, same run): what
  aligned reuse could at most skip;
* ``bound`` — dense time / (dense time − aligned conv time): the speedup if every aligned conv were free and
  every misaligned one, and every non-conv op, ran dense;
* the engine's fast mode (shipped profile) and exact mode: speedup (median of per-frame thread-CPU times),
  active fraction and retention (mAP@0.5 against dense).

Clips are cut from ``vtest.avi`` at 640×480 (zoom 1 = 0.6 source px per output px), a 5-frame pause then the
pan back and forth inside the source, so every frame of a speed moves by exactly V output px. ``V = 0`` is the
same window held still (the static-camera reference with the same re-encoding). Usage::

    python benchmarks/pan_speed.py [--speeds 0,4,8,16,32] [--frames 60] [--modes fast,exact]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import make_ptz_clip
from fluxshard.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from engine import load_frames, run_mode

#: Source px of horizontal travel left to the 640×480 window at zoom 1 inside 768×576 vtest (384 px window).
TRAVEL_SRC_PX = 768 - 640 * 0.6


def trajectory(v: int, frames: int) -> str:
    """A 5-frame pause, then a pan of ``v`` output px per frame back and forth, legs short enough that the
    window never reaches the source border (where the clamp would stop it)."""
    if v == 0:
        return f"pause:{frames}"
    leg = max(1, int(TRAVEL_SRC_PX // (v * 0.6)) - 1)
    parts, n, sign = ["pause:5"], 5, 1
    while n < frames:
        k = min(leg, frames - n)
        parts.append(f"pan:{sign * v}:{k}")
        n += k
        sign = -sign
    return ",".join(parts)


def stride_times(body: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[dict[int, float], float]:
    """Dense conv time per cumulative stride and the whole dense time (thread CPU, medians over repeats)."""
    h = x.shape[-2]
    per: dict[int, list[float]] = collections.defaultdict(list)
    acc: collections.Counter[int] = collections.Counter()
    starts: dict[int, float] = {}

    def pre(mod: torch.nn.Module, inp: object) -> None:
        starts[id(mod)] = time.thread_time()

    def post(mod: torch.nn.Module, inp: object, out: torch.Tensor) -> None:
        acc[h // out.shape[-2]] += time.thread_time() - starts[id(mod)]

    convs = [m for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [h_ for m in convs for h_ in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    totals = []
    try:
        with torch.inference_mode():
            body(x)
            for _ in range(repeats):
                acc.clear()
                t = time.thread_time()
                body(x)
                totals.append(time.thread_time() - t)
                for s, v in acc.items():
                    per[s].append(v)
    finally:
        for h_ in hooks:
            h_.remove()
    return {s: statistics.median(v) for s, v in per.items()}, statistics.median(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speeds", default="0,4,8,16,32", help="pan speeds, output px per frame")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--modes", default="fast,exact")
    ap.add_argument("--model", default="nanodet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    adapter = load_model(args.model)
    modes = args.modes.split(",")
    tmp = tempfile.TemporaryDirectory()
    print(f"threads 1 (thread CPU time), {args.frames} frames per clip, model {args.model}, vtest cut-outs at 640x480")
    print(f"{'V px/f':>7} {'aligned':<16}{'conv share':>11}{'bound':>7}  "
          + "".join(f"{m + ' speedup':>15}{'active':>8}{'ret@.5':>8}" for m in modes))
    for v in (int(s) for s in args.speeds.split(",")):
        clip = Path(tmp.name) / f"pan{v}.mp4"
        make_ptz_clip(clip_path("vtest"), clip, trajectory(v, args.frames), size=(640, 480))
        mapper, frames = load_frames(str(clip), args.frames, None)
        per, total = stride_times(adapter.body, frames[0][0].contiguous(memory_format=torch.channels_last))
        aligned = sorted(s for s in per if v % s == 0)
        share = sum(per[s] for s in aligned) / total
        row = f"{v:>7} {','.join(map(str, aligned)) or '-':<16}{share:>10.0%}{1 / (1 - share):>6.2f}×  "
        for m in modes:
            r = run_mode(adapter, mapper, frames, m, args.model)
            ret = r["retention_map50"]
            row += f"{r['speedup']:>14.2f}×{r['active']:>8.3f}{(ret if ret is not None else float('nan')):>8.3f}"
        print(row, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
