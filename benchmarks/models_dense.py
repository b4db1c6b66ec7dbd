"""Dense CPU latency per frame of the models the engine will run incrementally (the baseline it must beat).

For each model: the body alone on its input tensor and the whole frame pipeline (preprocess + body +
postprocess on a real vtest frame), median of N runs after warm-up, NCHW vs channels_last weights/input.
NanoDet-416 and MoveNet-256 always; YOLO11n-640 (detect, random weights from the bundled YAML) when
ultralytics is importable (the yolo venv).

    python benchmarks/models_dense.py [--threads 2] [--runs 30] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fluxshard.models import ModelAdapter, load_model


def timings_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) in ms; the min is the better estimate when other processes share the 2 cores."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times)


def vtest_frame() -> np.ndarray:
    from fluxshard.data.fetch import clip_path
    from fluxshard.video import open_video

    for i, f in enumerate(open_video(clip_path("vtest"), export_mvs=False)):
        if i == 100:
            return f.rgb
    raise RuntimeError("vtest has fewer than 101 frames")


def bench_model(label: str, m: ModelAdapter, frame: np.ndarray, runs: int) -> list[dict[str, Any]]:
    x, _ = m.preprocess(frame)
    rows = []
    for fmt in ("nchw", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        m.body.to(memory_format=mf)
        xf = x.contiguous(memory_format=mf)
        with torch.inference_mode():
            body, body_min = timings_ms(lambda xf=xf: m.body(xf), runs)

            def pipeline(mf=mf) -> None:
                xi, mi = m.preprocess(frame)
                m.postprocess(m.body(xi.contiguous(memory_format=mf)), mi)

            full, full_min = timings_ms(pipeline, runs)
        rows.append({"model": label, "input": "x".join(map(str, x.shape[2:])), "format": fmt,
                     "body_ms": round(body, 1), "frame_ms": round(full, 1), "body_ms_min": round(body_min, 1),
                     "frame_ms_min": round(full_min, 1)})
    m.body.to(memory_format=torch.contiguous_format)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frame = vtest_frame()
    rows = []
    rows += bench_model("NanoDet-416", load_model("nanodet"), frame, args.runs)
    rows += bench_model("MoveNet-256", load_model("movenet"), frame, args.runs)
    if importlib.util.find_spec("ultralytics") is not None:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        torch.manual_seed(0)
        yolo = load_model("yolo11n.yaml")
        square = load_model("yolo11n.yaml")
        square.auto = False  # fixed 640×640 letterbox, the nominal YOLO11n-640
        rows += bench_model("YOLO11n-640", square, frame, args.runs)
        rows += bench_model("YOLO11n-640 (auto)", yolo, frame, args.runs)
    else:
        rows.append({"model": "YOLO11n-640", "skipped": "ultralytics not importable (run in the yolo venv)"})
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "runs": args.runs, "frame": "vtest #100 (768x576)"}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}))
        return
    try:
        load = f" load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    print(f"torch {info['torch']}, {info['threads']} threads, median (min) of {args.runs}, {info['frame']};{load}")
    print(f"{'model':20s} {'input':>8s} {'format':>14s} {'body ms':>15s} {'frame ms':>15s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:20s} skipped: {r['skipped']}")
        else:
            print(f"{r['model']:20s} {r['input']:>8s} {r['format']:>14s} {r['body_ms']:7.1f} ({r['body_ms_min']:5.1f}) "
                  f"{r['frame_ms']:7.1f} ({r['frame_ms_min']:5.1f})")


if __name__ == "__main__":
    main()
