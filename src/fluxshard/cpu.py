"""CPU policy: how many torch threads to run and how idle OpenMP threads wait — decided in this one place.

Why: edge devices share their CPU (a robot runs its other nodes beside the analytics). torch's OpenMP runtime
(libgomp in the CPU wheels) spins idle threads for ~3 ms at every barrier by default, and each parallel region
waits for its slowest thread; on 2 cores, beside one other torch process, a 2-thread ``detect`` frame went from
40 ms to 177 ms, and to 0.7–2 s beside several (other jobs on a shared host). Two measures fix it
(``benchmarks/contention.py``):

* a short spin: ``GOMP_SPINCOUNT=3000`` (libgomp's default is 300000, "~3 ms"; this is ~30 µs) — set in the
  environment before torch is first imported (libgomp reads it once, when it loads): an idle thread spins just
  long enough to catch the next parallel region of a quiet frame, then sleeps instead of stealing the core a
  preempted teammate needs. Measured on 2 cores (vtest): quiet as fast as the default spin, where
  ``OMP_WAIT_POLICY=PASSIVE`` (no spin at all) costs 10–20 % of the quiet frame time. :func:`prepare_env` does
  it; the CLI calls it first thing.
* a thread governor — every ``interval`` seconds it reads how much of this process's CPUs other processes used
  (``/proc/stat`` busy time of the affinity CPUs minus this process's own CPU time) and sets
  ``torch.set_num_threads`` to the cores left free (≥ 1), with hysteresis. Thread counts are per calling thread
  in OpenMP, so :func:`tick` must be called from the thread that runs inference (the frame loops do, per frame;
  it costs a clock read, and a ``/proc`` read at most every ``interval``).

``FLUXSHARD_THREADS`` selects the policy: ``auto`` (default: both measures), an integer ``N`` (N threads, the
short spin, no governor), or ``off`` (the package touches neither: torch's and libgomp's own defaults). A user's
own ``OMP_NUM_THREADS`` is an explicit thread count (no governor) and a user's ``OMP_WAIT_POLICY`` /
``GOMP_SPINCOUNT`` is kept as it is.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from fluxshard.errors import FluxShardError

ENV = "FLUXSHARD_THREADS"
SPINCOUNT = "3000"  # libgomp spins per idle wait before sleeping (its own estimate: ~100000 per ms)
INTERVAL_S = 0.5
MIN_WINDOW_S = 0.2  # shortest reading window worth deciding on (/proc/stat counts in 10 ms ticks)
# hysteresis, in cores' worth of CPU that other processes use: with k threads on n CPUs, drop to k - 1 once others
# use more than n - k + DROP cores, go back up only once they use less than n - k - 1 + RAISE (a competitor near
# one threshold then does not make the count flap)
DROP = 0.5
RAISE = 0.25


def cpu_name() -> str:
    """The CPU model as the kernel reports it (``platform.processor()`` is often empty on Linux): what
    measured costs are keyed by."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuPolicyError(FluxShardError):
    """A malformed ``FLUXSHARD_THREADS`` value."""


@dataclass(frozen=True)
class Policy:
    """What the package does about threads: ``mode`` is auto (governed), fixed or off; ``threads`` is the fixed
    count where the package sets one (None: torch's default, e.g. from the user's ``OMP_NUM_THREADS``)."""

    mode: str
    threads: int | None = None
    reason: str = "default"


def policy_from_env(environ: Mapping[str, str]) -> Policy:
    """The policy the environment asks for (explicit user choices win over the governor)."""
    raw = environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        if environ.get("OMP_NUM_THREADS", "").strip():
            return Policy("fixed", None, "OMP_NUM_THREADS is set")
        return Policy("auto", None, "default" if not raw else f"{ENV}=auto")
    if raw == "off":
        return Policy("off", None, f"{ENV}=off")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise CpuPolicyError(f"{ENV}={environ[ENV]!r}: expected auto, off or a thread count >= 1")
    return Policy("fixed", n, f"{ENV}={n}")


def prepare_env(environ: MutableMapping[str, str] | None = None) -> Policy:
    """Set the OpenMP wait (the short spin) for ``policy_from_env(environ)``; returns the policy. Must run before
    torch is first imported to have any effect (libgomp reads its environment once, when it loads)."""
    env = os.environ if environ is None else environ
    policy = policy_from_env(env)
    if policy.mode != "off" and "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = SPINCOUNT
    return policy


@dataclass(frozen=True)
class CpuSample:
    """One reading: wall clock, busy CPU seconds of the watched CPUs (all processes), this process's CPU seconds."""

    wall: float
    busy: float
    own: float


def _clk_tck() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def parse_proc_stat(text: str, cpus: Iterable[int], tick_hz: int = 100) -> float:
    """Busy seconds (user + nice + system + irq + softirq + steal) summed over ``cpus`` from /proc/stat text."""
    want = {f"cpu{c}" for c in cpus}
    busy = 0
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in want:
            f = [int(v) for v in parts[1:]]
            # fields: user nice system idle iowait irq softirq steal [guest guest_nice] (guest is inside user)
            busy += f[0] + f[1] + f[2] + sum(f[5:8])
    return busy / tick_hz


def read_sample(cpus: Iterable[int]) -> CpuSample | None:
    """A live reading, or None where /proc/stat is unavailable (not Linux): the governor then holds still."""
    try:
        with open("/proc/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return CpuSample(time.monotonic(), parse_proc_stat(text, cpus, _clk_tck()), time.process_time())


def others_cores(a: CpuSample, b: CpuSample) -> float | None:
    """Cores' worth of CPU that other processes used between two readings (None if no time passed)."""
    dt = b.wall - a.wall
    if dt <= 0:
        return None
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / dt)


def threads_for(others: float, ncpu: int, current: int, max_threads: int) -> int:
    """Thread count for ``others`` cores used by other processes on ``ncpu`` CPUs, moving from ``current`` with
    hysteresis (DROP / RAISE) so that a competitor near a threshold does not make the count flap."""
    free = ncpu - others
    down = max(1, min(max_threads, math.floor(free + 1 - DROP)))
    up = max(1, min(max_threads, math.floor(free + RAISE)))
    if down < current:
        return down
    if up > current:
        return up
    return current


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


class ThreadGovernor:
    """Re-decides the torch thread count from the CPU left free by other processes, at most every
    ``interval`` seconds; ``reader`` and the thread setter/getter are injectable for tests."""

    def __init__(self, max_threads: int | None = None, cpus: Iterable[int] | None = None,
                 reader: Callable[[], CpuSample | None] | None = None,
                 set_threads: Callable[[int], None] | None = None, get_threads: Callable[[], int] | None = None,
                 interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.cpus = list(cpus) if cpus is not None else _affinity()
        self._reader = reader or (lambda: read_sample(self.cpus))
        self._set = set_threads
        self._get = get_threads
        self.max_threads = max_threads
        self.interval = interval
        self._clock = clock
        self._last = self._reader()
        self._next = clock() + interval
        self.changes = 0
        self.others: float | None = None

    def _torch_threads(self) -> tuple[Callable[[int], None], Callable[[], int]]:
        if self._set is None or self._get is None:
            import torch

            self._set, self._get = torch.set_num_threads, torch.get_num_threads
        return self._set, self._get

    def tick(self, force: bool = False) -> int | None:
        """Re-decide if ``interval`` has passed (or ``force``); returns the new thread count when it changed."""
        if not force and self._clock() < self._next:
            return None
        self._next = self._clock() + self.interval
        now, prev = self._reader(), self._last
        if now is None or prev is None:
            self._last = now
            return None
        if now.wall - prev.wall < MIN_WINDOW_S:  # too short to tell (10 ms jiffies): keep the window growing
            return None
        self._last = now
        others = others_cores(prev, now)
        if others is None:
            return None
        self.others = others
        set_threads, get_threads = self._torch_threads()
        current = get_threads()
        if self.max_threads is None:
            self.max_threads = max(current, len(self.cpus))
        k = threads_for(others, len(self.cpus), current, self.max_threads)
        if k == current:
            return None
        set_threads(k)
        self.changes += 1
        return k


_policy: Policy | None = None
_governor: ThreadGovernor | None = None


def configure(environ: MutableMapping[str, str] | None = None) -> Policy:
    """The CLI's entry: the short spin into the environment (before torch loads) and, in auto mode, a governor
    whose first reading starts now, so the first frame already sees the load during start-up."""
    global _policy, _governor
    env = os.environ if environ is None else environ
    had = "GOMP_SPINCOUNT" in env
    _policy = prepare_env(env)
    _governor = ThreadGovernor() if _policy.mode == "auto" else None
    if not had and "GOMP_SPINCOUNT" in env and "torch" in sys.modules:
        print(f"warning: torch was imported before fluxshard.cpu.configure(): GOMP_SPINCOUNT={SPINCOUNT} comes too "
              "late to take effect", file=sys.stderr)
    return _policy


def reset() -> None:
    """Forget the configured policy: :func:`tick` goes back to a no-op (tests; code handing threads back)."""
    global _policy, _governor
    _policy, _governor = None, None


def policy() -> Policy | None:
    """The configured policy (None: :func:`configure` was not called, the package leaves threads alone)."""
    return _policy


def tick() -> None:
    """Per-frame hook for inference loops: applies a fixed count once, lets the governor re-decide in auto mode.
    A no-op unless :func:`configure` ran (library users and tests keep whatever threads they set)."""
    global _policy
    if _policy is None:
        return
    if _policy.mode == "fixed" and _policy.threads is not None:
        import torch

        torch.set_num_threads(_policy.threads)
        _policy = Policy("fixed", None, _policy.reason)  # applied: later ticks leave the count alone
    elif _governor is not None:
        _governor.tick()


def settle() -> None:
    """One decision now (from the load seen since :func:`configure`), then none until :func:`tick` is called
    again: for commands whose timings must come from one thread count (``bench`` picks its clock from it,
    ``profile`` prices paths with it)."""
    if _governor is not None and _policy is not None and _policy.mode == "auto":
        _governor.tick(force=True)
    else:
        tick()
