"""Dense CPU latency of each bundled model's body: median of N runs after warm-up.

    python tools/bench_models.py [--threads 2] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxshard.models import available_models, load_model


def bench(body: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            body(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            body(x)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in available_models():
        m = load_model(name)
        h, w = m.input_size
        x = torch.rand(1, 3, h, w)
        nchw = bench(m.body, x, args.runs)
        m.body.to(memory_format=torch.channels_last)
        cl = bench(m.body, x.contiguous(memory_format=torch.channels_last), args.runs)
        print(f"{name:8s} {h}x{w}: NCHW {nchw:7.1f} ms   channels_last {cl:7.1f} ms")


if __name__ == "__main__":
    main()
