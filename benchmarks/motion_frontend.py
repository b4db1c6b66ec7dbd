"""Cost of the motion front-end relative to plain decoding, measured in one run (medians over repeats).

For each clip, three passes alternate ``--repeats`` times so machine noise hits them alike:

* ``plain``  — decode every frame (threading SLICE, no side data) and take its luma plane;
* ``plain+rgb`` — the same plus RGB conversion, what any analytics consumer does anyway;
* ``motion`` — decode with ``+export_mvs`` and build the sanitised per-block field (verification and
  fill included) for every frame: the whole motion front-end.

Prints fps and overhead = motion / plain − 1 (and relative to plain+rgb). Usage:
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


def plain(path: str, rgb: bool) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    for f in open_video(path, export_mvs=False, on_error="collect"):
        _ = f.rgb if rgb else f.luma
        n += 1
    return n, time.perf_counter() - t


def motion(path: str) -> tuple[int, float, str]:
    t = time.perf_counter()
    ms = MotionStream(path, on_error="collect")
    n = 0
    for mf in ms:
        _ = mf.field
        n += 1
    return n, time.perf_counter() - t, ms.mv_source


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
          f"{'overhead':>10}{'vs +rgb':>9}")
    for c in clips:
        tp, tr, tm = [], [], []
        src = ""
        n = 0
        for _ in range(args.repeats):
            n, t = plain(c, rgb=False)
            tp.append(t)
            _, t = plain(c, rgb=True)
            tr.append(t)
            _, t, src = motion(c)
            tm.append(t)
        p, r, m = statistics.median(tp), statistics.median(tr), statistics.median(tm)
        codec = open_video(c).info.codec
        print(f"{Path(c).name:<16}{codec:<10}{src:<11}{n:>7}{n / p:>11.0f}{n / r:>10.0f}{n / m:>12.0f}"
              f"{m / p - 1:>10.1%}{(m - p) / r:>9.1%}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
