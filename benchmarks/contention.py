"""Per-frame time with 0 and 1 competing busy processes: `fluxshard detect` and `fluxshard run` under the old
thread behaviour (FLUXSHARD_THREADS=off: libgomp's spinning waits, torch's static thread count) and the new one
(the default: a short OpenMP spin + the thread governor of ``fluxshard.cpu``), and optionally two halves of
it (``--variants old,passive,static,new``). Target: loaded ≤ 2.5× quiet.

    python benchmarks/contention.py --frames 40 --repeats 3 [--nice -10] [--quiet-below 0.3 --max-wait 60]

Each cell is the median over ``--repeats`` of each run's median per-frame ms (detect: ms_per_frame_median; run:
engine_ms_median). Runs are interleaved (repeat-major) so that slow drifts of the machine's background load hit
every cell alike; ``bg`` is the other processes' CPU use (cores) measured for 1 s before each run, printed so a
noisy neighbour shows. A competitor is ``python -c 'while True: pass'``, started 1 s before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

# old: the package leaves threads alone (libgomp's ~3 ms spin, torch's one thread per core); passive: no spin at all
# (OMP_WAIT_POLICY=PASSIVE), one thread per core; static: the new short spin, one thread per core (no governor);
# new: the default policy (short spin + the governor)
_NCPU = str(len(os.sched_getaffinity(0)))
VARIANTS = {"old": {"FLUXSHARD_THREADS": "off"},
            "passive": {"FLUXSHARD_THREADS": _NCPU, "OMP_WAIT_POLICY": "PASSIVE"},
            "static": {"FLUXSHARD_THREADS": _NCPU},
            "passive-gov": {"OMP_WAIT_POLICY": "PASSIVE"},  # the governor with no spin at all
            "new": {}}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "FLUXSHARD_THREADS")
TARGET = 2.5


def _busy_cores(seconds: float) -> float:
    """Cores' worth of CPU used by all processes over ``seconds`` (this script sleeps meanwhile)."""

    def busy() -> float:
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
        return (f[0] + f[1] + f[2] + sum(f[5:8])) / os.sysconf("SC_CLK_TCK")

    b0, t0 = busy(), time.monotonic()
    time.sleep(seconds)
    return (busy() - b0) / (time.monotonic() - t0)


def _command(cmd: str, clip: str, frames: int) -> list[str]:
    base = [sys.executable, "-m", "fluxshard"]
    if cmd == "detect":
        return [*base, "detect", clip, "--max-frames", str(frames), "--json"]
    return [*base, "run", clip, "--mode", "fast", "--max-frames", str(frames), "--json"]


def _ms(cmd: str, data: dict[str, Any]) -> float:
    return float(data["ms_per_frame_median"] if cmd == "detect" else data["engine_ms_median"])


def _wait_quiet(below: float, max_wait: float) -> float:
    """Background load (cores), after waiting up to ``max_wait`` s for it to fall below ``below``."""
    t_end = time.monotonic() + max_wait
    bg = _busy_cores(1.0)
    while bg >= below and time.monotonic() < t_end:
        bg = _busy_cores(1.0)
    return bg


TORCH_LOOP = ("import torch\nimport torch.nn.functional as F\nx = torch.randn(1, 32, 96, 96)\n"
              "w = torch.randn(32, 32, 3, 3)\nwhile True:\n    F.conv2d(x, w, padding=1)")


def _competitor(duty: float, kind: str = "python") -> list[str]:
    """A busy process: ``duty`` of every 100 ms spinning, the rest asleep (1.0: always busy); ``kind`` torch: a
    convolution loop at torch's default threads and OpenMP waits (another inference node on the robot)."""
    if kind == "torch":
        return [sys.executable, "-c", TORCH_LOOP]
    if duty >= 1.0:
        return [sys.executable, "-c", "while True: pass"]
    busy, idle = 0.1 * duty, 0.1 * (1 - duty)
    code = (f"import time\nwhile True:\n    t = time.perf_counter() + {busy}\n    while time.perf_counter() < t: pass\n"
            f"    time.sleep({idle})")
    return [sys.executable, "-c", code]


def measure(cmd: str, variant: str, competitors: int, clip: str, frames: int, timeout: float, nice: int = 0,
            quiet_below: float = 99.0, max_wait: float = 0.0, duty: float = 1.0, kind: str = "python",
            ) -> dict[str, Any]:
    """One run of ``cmd`` beside ``competitors`` busy processes (each killed by its own pid afterwards); both
    run at niceness ``nice`` (< 0 needs root: shields the pair from a noisy shared machine, the contention
    between them stays as it is)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(VARIANTS[variant])
    bg = _wait_quiet(quiet_below, max_wait)

    def renice() -> None:
        if nice:
            os.nice(nice)

    plain = {k: v for k, v in os.environ.items() if k not in CLEARED}
    procs = [subprocess.Popen(_competitor(duty, kind), env=plain, preexec_fn=renice)
             for _ in range(competitors)]
    try:
        if procs:
            time.sleep(1.0)
        t0 = time.monotonic()
        out = subprocess.run(_command(cmd, clip, frames), env=env, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=renice)
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise SystemExit(f"error: {cmd} ({variant}, {competitors} competitors) failed: {out.stderr.strip()[-500:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"cmd": cmd, "variant": variant, "competitors": competitors, "ms": _ms(cmd, data), "wall_s": wall,
            "threads": data.get("threads"), "bg_cores": round(bg, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default="vtest")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commands", default="detect,run")
    ap.add_argument("--variants", default="old,new")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--competitors", default="0,1", help="competitor counts to run (0 is the quiet reference)")
    ap.add_argument("--competitor", choices=("python", "torch"), default="python",
                    help="python: a pure-Python busy loop; torch: a convolution loop at torch's defaults")
    ap.add_argument("--duty", type=float, default=1.0, help="fraction of the time each competitor is busy")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the runs and their competitors (e.g. -10 "
                    "as root on a machine others are using)")
    ap.add_argument("--quiet-below", type=float, default=99.0, help="before each run, wait for the other "
                    "processes' CPU use to fall below this many cores ...")
    ap.add_argument("--max-wait", type=float, default=0.0, help="... for at most this many seconds")
    ap.add_argument("--json", type=str, default=None, help="also write every run to this JSON file")
    a = ap.parse_args()
    cmds = [c for c in a.commands.split(",") if c]
    variants = [v for v in a.variants.split(",") if v]
    for c in cmds:
        if c not in ("detect", "run"):
            raise SystemExit(f"error: --commands: unknown command {c!r} (detect, run)")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"error: --variants: unknown variant {v!r} ({', '.join(VARIANTS)})")
    counts = sorted({0, *(int(c) for c in a.competitors.split(",") if c)})
    print(f"cpus {len(os.sched_getaffinity(0))}, frames {a.frames}, repeats {a.repeats}, clip {a.clip}, "
          f"nice {a.nice}, competitor {a.competitor} duty {a.duty}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for r in range(a.repeats):
        for cmd in cmds:
            for v in variants:
                for n in counts:
                    m = measure(cmd, v, n, a.clip, a.frames, a.timeout, a.nice, a.quiet_below, a.max_wait, a.duty,
                                a.competitor)
                    runs.append(m)
                    print(f"[{r + 1}/{a.repeats}] {cmd:6s} {v:3s} competitors={n}: {m['ms']:8.1f} ms/frame "
                          f"(threads at end {m['threads']}, bg {m['bg_cores']} cores, {m['wall_s']:.1f} s)",
                          file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(runs, fh, indent=1)
    def cell(cmd: str, v: str, n: int) -> float:
        return statistics.median(m["ms"] for m in runs if (m["cmd"], m["variant"], m["competitors"]) == (cmd, v, n))

    loaded = [n for n in counts if n]
    head = "".join(f" {n} competitor{'s' * (n > 1)} ms | ratio | ≤ {TARGET}× | / old quiet |" for n in loaded)
    print(f"| command | policy | quiet ms/frame |{head}")
    print("|---|---|---:|" + "---:|---:|:---:|---:|" * len(loaded))
    for cmd in cmds:
        for v in variants:
            q = cell(cmd, v, 0)
            row = f"| {cmd} | {v} | {q:.1f} |"
            for n in loaded:
                ld = cell(cmd, v, n)
                vs_old = f"{ld / cell(cmd, 'old', 0):.2f}×" if "old" in variants else "-"
                row += f" {ld:.1f} | {ld / q:.2f}× | {'yes' if ld / q <= TARGET else 'no'} | {vs_old} |"
            print(row)
    bg = [m["bg_cores"] for m in runs]
    print(f"\nbackground CPU before runs (other processes, cores): median {statistics.median(bg):.2f}, "
          f"max {max(bg):.2f}")


if __name__ == "__main__":
    main()
