"""Cost of the motion front-end relative to plain decoding, measured in one run (medians over repeats).

For each clip, three passes alternate ``--repeats`` times so machine noise hits them alike:

* ``plain``  — decode every frame (threading SLICE, no side data) and take its luma plane;
* ``plain+rgb`` — the same plus RGB conversion, what any analytics consumer does anyway;
* ``motion`` — decode with ``+export_mvs`` and build the sanitised per-block field (verification and
  fill included) for every frame: the whole motion front-end.

All passes use the same decoder settings (SLICE threading, frames decoded ahead on a worker thread, which
FFmpeg allows because it releases the GIL). Two costs are printed: wall-clock overhead = motion / plain − 1
(throughput a user sees; on two cores the front-end mostly overlaps decoding) and CPU overhead from
process CPU time, all threads summed (what the front-end costs an otherwise busy machine). Usage:
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


def plain(path: str, rgb: bool) -> tuple[int, float, float]:
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for f in open_video(path, export_mvs=False, on_error="collect"):
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
          f"{'wall ovh':>10}{'cpu ovh':>9}{'cpu ovh vs +rgb':>17}")
    for c in clips:
        wp, wr, wm, cp, cr, cm = [], [], [], [], [], []
        src = ""
        n = 0
        for _ in range(args.repeats):
            n, t, cpu = plain(c, rgb=False)
            wp.append(t)
            cp.append(cpu)
            _, t, cpu = plain(c, rgb=True)
            wr.append(t)
            cr.append(cpu)
            _, t, cpu, src = motion(c)
            wm.append(t)
            cm.append(cpu)
        med = statistics.median
        p, r, m = med(wp), med(wr), med(wm)
        codec = open_video(c).info.codec
        print(f"{Path(c).name:<16}{codec:<10}{src:<11}{n:>7}{n / p:>11.0f}{n / r:>10.0f}{n / m:>12.0f}"
              f"{m / p - 1:>10.1%}{med(cm) / med(cp) - 1:>9.1%}{(med(cm) - med(cp)) / med(cr):>17.1%}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
