"""Cost of the motion front-end relative to plain decoding, measured in one run (medians over repeats).

For each clip, five passes run ``--repeats`` times, their order rotated every repeat so machine noise and
drift hit them alike:

* ``plain``  — decode every frame (threading SLICE, no side data) and take its luma plane: the denominator;
* ``plain+rgb`` — the same plus RGB conversion, what any analytics consumer does anyway;
* ``export`` — decode with ``+export_mvs`` and take the luma plane, vectors left unread: what libavcodec
  itself spends producing the vectors (part of the front-end's cost);
* ``motion`` — decode with ``+export_mvs`` and build the sanitised per-block field (vector read, span
  resolution, fill, block matching of I-frames) for every frame: the whole motion front-end;
* ``interleaved`` — a plain decoder and the motion front-end advance one frame each, alternately, on one
  thread (no decode-ahead); their process CPU times are summed separately.

All decoding passes use the same settings (SLICE threading, frames decoded ahead on a worker thread, which
FFmpeg allows because it releases the GIL). Every overhead is the median over repeats of a ratio of passes
of the same repeat, relative to ``plain``. Columns:

* ``wall`` = motion / plain wall-clock time − 1: the throughput a user sees (on two cores the front-end
  partly overlaps decoding), but on a shared machine whole passes drift with the other jobs' load;
* ``cpu`` = the same on process CPU time (all threads): what the front-end costs an otherwise busy machine;
  still exposed to drift between passes (cache and core sharing vary with the other jobs);
* ``export`` = the decoding thread's extra CPU time with ``+export_mvs`` (export pass − plain pass, thread
  CPU time inside demux + decode: ``VideoSource.decode_seconds``) / plain CPU time: libavcodec's part;
* ``own`` = the front-end's own CPU time (thread CPU time of the consuming thread inside the front-end,
  summed over frames: ``MotionStream.timings``) / plain CPU time;
* ``own+dec`` = ``own`` plus the decoding thread's extra CPU time in the motion pass (vector export and any
  slowdown the front-end causes it) over plain: the whole front-end from per-thread CPU times, which do not
  count time spent waiting for a core, so load drift largely cancels — the robust estimate of ``cpu``;
* ``interleaved`` = front-end CPU / plain-decoder CPU when both advance frame by frame on one thread: cancels
  drift too, but pessimistic (every frame's front-end work starts with caches the decoder just flushed, and
  nothing overlaps).

The last lines name the worst H.264 clip for each measure and give the verdict against the 10 % budget on
``interleaved``: the only measure that covers the whole front-end (vector export included) *and* cancels the
host's drift; ``wall``, ``cpu`` and ``own+dec`` swing by ±8 points between runs on this shared machine
(session 9: bikes ``cpu`` 7.8 / 10.9 / 15.8 % in three runs, ``interleaved`` 8.8 % in all three). Usage:
``python benchmarks/motion_frontend.py [CLIP ...] [--repeats 7]`` (default: the bundled clips + a PTZ clip).
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

Result = tuple[int, float, float, float, float]  # frames, wall s, process CPU s, front-end CPU s, decoder CPU s


def plain(path: str, rgb: bool = False, export: bool = False) -> Result:
    t, c = time.perf_counter(), time.process_time()
    n = 0
    video = open_video(path, export_mvs=export, on_error="collect")
    for f in video:
        _ = f.rgb if rgb else f.luma
        n += 1
    return n, time.perf_counter() - t, time.process_time() - c, 0.0, video.decode_seconds


def motion(path: str) -> Result:
    t, c = time.perf_counter(), time.process_time()
    ms = MotionStream(path, on_error="collect")
    n = 0
    for mf in ms:
        _ = mf.field
        n += 1
    return n, time.perf_counter() - t, time.process_time() - c, ms.timings.motion, ms.video.decode_seconds


def interleaved(path: str) -> Result:
    """Process CPU seconds of plain decoding and of the motion front-end, advanced frame by frame in turn
    (returned in the wall and CPU slots)."""
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
    return 0, tp, tm, 0.0, 0.0


def ovh(a: list[float], b: list[float]) -> float:
    """Median over repeats of a / b − 1 (the passes of one repeat ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True)) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="*")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    clips = [clip_path(c) for c in (args.clips or ["bikes", "cup", "vtest"])]
    tmp = tempfile.TemporaryDirectory()
    if not args.clips:
        from fluxshard.data.ptz import make_ptz_clip

        ptz = Path(tmp.name) / "vtest_ptz.mp4"
        make_ptz_clip(clip_path("vtest"), ptz, "pan:4:40,zoom:1.01:30,tilt:-3:30,pause:10", size=(640, 480))
        clips.append(str(ptz))
    motion(clips[0])  # load the compiled kernels outside the timings
    cols = ["plain fps", "+rgb fps", "motion fps", "wall", "cpu", "export", "own", "own+dec", "interleaved",
            "µs/frame"]
    print(f"{'clip':<16}{'codec':<10}{'src':<11}{'frames':>7}" + "".join(f"{c:>{max(len(c) + 2, 9)}}" for c in cols))
    worst: dict[str, tuple[float, str]] = {}
    for c in clips:
        passes = {
            "plain": lambda c=c: plain(c),
            "rgb": lambda c=c: plain(c, rgb=True),
            "export": lambda c=c: plain(c, export=True),
            "motion": lambda c=c: motion(c),
            "interleaved": lambda c=c: interleaved(c),
        }
        names = list(passes)
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        dec: dict[str, list[float]] = {k: [] for k in names}
        own: list[float] = []
        n = 0
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[: r % len(names)]:
                m, t, u, o, d = passes[k]()
                n = m or n
                wall[k].append(t)  # for "interleaved": plain CPU seconds
                cpu[k].append(u)  # for "interleaved": motion CPU seconds
                dec[k].append(d)
                if k == "motion":
                    own.append(o)
        src = MotionStream(c).mv_source
        med = statistics.median
        pc = cpu["plain"]
        row = {
            "wall": ovh(wall["motion"], wall["plain"]),
            "cpu": ovh(cpu["motion"], pc),
            "export": med((e - d) / p for e, d, p in zip(dec["export"], dec["plain"], pc, strict=True)),
            "own": med(o / p for o, p in zip(own, pc, strict=True)),
            "own+dec": med((o + m - d) / p for o, m, d, p in zip(own, dec["motion"], dec["plain"], pc, strict=True)),
            "interleaved": ovh(cpu["interleaved"], wall["interleaved"]),
        }
        codec = open_video(c).info.codec
        print(f"{Path(c).name:<16}{codec:<10}{src:<11}{n:>7}{n / med(wall['plain']):>11.0f}"
              f"{n / med(wall['rgb']):>10.0f}{n / med(wall['motion']):>12.0f}"
              + "".join(f"{row[k]:>{max(len(k) + 2, 9)}.1%}" for k in row)
              + f"{med(own) / n * 1e6:>10.0f}", flush=True)
        if codec == "h264":
            for k, v in row.items():
                if k != "export" and v > worst.get(k, (-1.0, ""))[0]:
                    worst[k] = (v, Path(c).name)
    if worst:
        print("worst H.264 clip: " + ", ".join(f"{k} {v:.1%} ({name})" for k, (v, name) in worst.items()))
        v, name = worst["interleaved"]
        # the verdict uses the one measure that covers the whole front-end (vector export included) and cancels
        # the shared host's drift between passes; it is also the pessimistic one (no overlap, cold caches)
        print(f"front-end cost on H.264 (interleaved: whole front-end incl. vector export, drift-free): worst "
              f"{v:.1%} ({name}) -> {'within' if v <= 0.10 else 'OVER'} the 10 % budget")
    tmp.cleanup()


if __name__ == "__main__":
    main()
