"""Cost of the motion front-end relative to plain decoding, measured in one run (medians over repeats).

For each clip, four passes run ``--repeats`` times, their order rotated every repeat so machine noise and
drift hit them alike:

* ``plain``  — decode every frame (threading SLICE, no side data) and take its luma plane;
* ``plain+rgb`` — the same plus RGB conversion, what any analytics consumer does anyway;
* ``export`` — decode with ``+export_mvs`` and take the luma plane, side data left unread: what libavcodec
  itself spends producing the vectors (attribution only: it is part of the front-end's cost);
* ``motion`` — decode with ``+export_mvs`` and build the sanitised per-block field (verification, fill and
  block matching of I-frames included) for every frame: the whole motion front-end.

All passes use the same decoder settings (SLICE threading, frames decoded ahead on a worker thread, which
FFmpeg allows because it releases the GIL). Overheads are medians of the per-repeat ratios (each ratio
pairs passes run back to back). Printed: wall-clock overhead = motion / plain − 1 (throughput a user sees;
on two cores the front-end partly overlaps decoding), CPU overhead from process CPU time, all threads summed
(what the front-end costs an otherwise busy machine), the part of that CPU overhead spent inside the
decoder's vector export, and the front-end's CPU time per frame.

On a shared machine, whole passes drift with the other jobs' load. A fifth, *interleaved* measurement is
robust to that: a plain decoder and the motion front-end advance one frame each, alternately, on one
thread (no decode-ahead), and their process CPU times are summed separately: ``cpu ovh (interleaved)``.
It is a pessimistic CPU figure (every frame's front-end work starts with caches the decoder just
flushed) and it cannot show wall-clock overlap. Usage:
``python benchmarks/motion_frontend.py [CLIP ...] [--repeats 5]`` (default: the bundled clips + a PTZ clip).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fluxshard.data.fetch import clip_path
from fluxshard.motion import MotionStream
from fluxshard.video import open_video


def plain(path: str, rgb: bool = False, export: bool = False) -> tuple[int, float, float]:
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for f in open_video(path, export_mvs=export, on_error="collect"):
        _ = f.rgb if rgb else f.luma
        n += 1
    return n, time.perf_counter() - t, time.process_time() - c


def motion(path: str) -> tuple[int, float, float, str]:
    t, c = time.perf_counter(), time.process_time()
    ms = MotionStream(path, on_error="collect")
    n = 0
    for mf in ms:
        _ = mf.field
        n += 1
    return n, time.perf_counter() - t, time.process_time() - c, ms.mv_source


def interleaved(path: str) -> tuple[float, float]:
    """Process CPU seconds of plain decoding and of the motion front-end, advanced frame by frame in turn."""
    plain_it = iter(open_video(path, export_mvs=False, on_error="collect", prefetch=0))
    ms = MotionStream(path, on_error="collect")
    ms.video.prefetch = 0
    motion_it = iter(ms)
    clock = time.process_time
    tp = tm = 0.0
    while True:
        c0 = clock()
        f = next(plain_it, None)
        if f is None:
            break
        _ = f.luma
        c1 = clock()
        if next(motion_it, None) is None:
            break
        tm += clock() - c1
        tp += c1 - c0
    for _ in motion_it:
        pass
    return tp, tm


def ratio(a: dict[str, list[float]], k: str, base: str = "plain") -> float:
    """Median over repeats of a[k] / a[base] − 1 (passes of one repeat ran back to back)."""
    return statistics.median(x / y for x, y in zip(a[k], a[base], strict=True)) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="*")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    clips = [clip_path(c) for c in (args.clips or ["bikes", "cup", "vtest"])]
    tmp = tempfile.TemporaryDirectory()
    if not args.clips:
        from fluxshard.data.ptz import make_ptz_clip

        ptz = Path(tmp.name) / "vtest_ptz.mp4"
        make_ptz_clip(clip_path("vtest"), ptz, "pan:4:40,zoom:1.01:30,tilt:-3:30,pause:10", size=(640, 480))
        clips.append(str(ptz))
    motion(clips[0])  # load the compiled kernels outside the timings
    print(f"{'clip':<16}{'codec':<10}{'src':<11}{'frames':>7}{'plain fps':>11}{'+rgb fps':>10}{'motion fps':>12}"
          f"{'wall ovh':>10}{'cpu ovh':>9}{'(export)':>10}{'cpu ovh vs +rgb':>17}{'µs/frame':>10}"
          f"{'cpu ovh (interleaved)':>23}")
    for c in clips:
        passes = {
            "plain": lambda c=c: plain(c),
            "rgb": lambda c=c: plain(c, rgb=True),
            "export": lambda c=c: plain(c, export=True),
            "motion": lambda c=c: motion(c)[:3],
            "interleaved": lambda c=c: (0, *interleaved(c)),
        }
        names = list(passes)
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        n = 0
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[: r % len(names)]:
                m, t, u = passes[k]()
                n = m or n
                wall[k].append(t)  # for "interleaved": plain CPU seconds
                cpu[k].append(u)  # for "interleaved": motion CPU seconds
        src = motion(c)[3]
        med = statistics.median
        extra_vs_rgb = med((m - p) / r for m, p, r in zip(cpu["motion"], cpu["plain"], cpu["rgb"], strict=True))
        per_frame = med((m - p) / n * 1e6 for m, p in zip(cpu["motion"], cpu["plain"], strict=True))
        codec = open_video(c).info.codec
        print(f"{Path(c).name:<16}{codec:<10}{src:<11}{n:>7}{n / med(wall['plain']):>11.0f}"
              f"{n / med(wall['rgb']):>10.0f}{n / med(wall['motion']):>12.0f}{ratio(wall, 'motion'):>10.1%}"
              f"{ratio(cpu, 'motion'):>9.1%}{ratio(cpu, 'export'):>10.1%}{extra_vs_rgb:>17.1%}{per_frame:>10.0f}"
              f"{med(m / p for p, m in zip(wall['interleaved'], cpu['interleaved'], strict=True)) - 1:>23.1%}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
