"""Profile the bundled detector family (NanoDet at 320/416/512/640) on this machine and cache it.

Usage: python benchmarks/tiling_profile.py [--threads N] [--latency-only] [--runs N] [--ship]

Accuracy (22 relative-size bins + Remix's 12 absolute bins) is measured once on the default profiling set;
``--latency-only`` re-times the members into the cached profile (load changes latency, not accuracy).
``--ship`` also copies the result to the package's shipped profile. Prints the profile summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

from fluxshard.tiling.infer import DetectorFamily
from fluxshard.tiling.profile import load_profile
from fluxshard.tiling.profiler import (
    DEFAULT_PROFILING_SET,
    cache_path,
    get_profile,
    profile_summary,
    profiling_frames,
    remeasure_latency,
    shipped_profile_path,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--ship", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fam = DetectorFamily()
    last = [0.0]

    def tick(stage: str, i: int, n: int) -> None:
        if time.time() - last[0] > 15 or i == n:
            last[0] = time.time()
            print(time.strftime("%H:%M:%S"), stage, i, n, flush=True)

    path = cache_path(fam)
    if args.latency_only:
        src = path if path.exists() else shipped_profile_path(fam.model)  # accuracy does not depend on threads
        prof = remeasure_latency(load_profile(src), fam, profiling_frames(DEFAULT_PROFILING_SET), args.runs, tick)
        prof = type(prof)(prof.models, prof.plan_runtime_ms, {**prof.meta, "threads": args.threads})
        prof.save(path)
    else:
        prof, path, _ = get_profile(fam, refresh=True, progress=tick)
    if args.ship:
        shutil.copy(path, shipped_profile_path(fam.model))
    print(json.dumps({"path": str(path), **profile_summary(prof), "loadavg_after": prof.meta.get("loadavg_after")}))


if __name__ == "__main__":
    main()
