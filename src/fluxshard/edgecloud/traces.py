"""Link-capacity traces in the Mahimahi format, and the generators the emulated link uses.

A Mahimahi trace has one line per *delivery opportunity*: the link may deliver one 1500-byte packet at that
time (integer milliseconds since the trace starts). Repeated timestamps mean several packets in that
millisecond; the file wraps around at its end, so its last timestamp is the period (Mahimahi's own rule,
which also makes a trace whose last timestamp is 0 invalid). One line per millisecond is 12 Mbit/s.

Why this format: it is what Mahimahi, Pantheon and most cellular-trace collections use, so a user can pass a
recorded trace unchanged; a constant rate and the paper's three profiles are generated into the same form,
so the emulator has exactly one way to pace bytes.

The paper profiles (seed 001 §6.1: 130 / 56 / 25 Mbit/s, "Madrid LTE" traces applied with ``tc``) are not
shipped; :func:`paper_profile` generates LTE-like variability around each mean, seeded:

* the rate is piecewise constant over ``segment_ms`` (default 200 ms) segments;
* the segment multiplier follows a bounded, mean-reverting random walk (a discrete Ornstein–Uhlenbeck process):
  ``m[k+1] = clip(1 + revert·(m[k] − 1) + N(0, step), 1 − spread, 1 + spread)``, starting at 1, with
  ``revert`` 0.95 (a correlation time of about 4 s at 200 ms segments), ``step`` 0.08 and ``spread`` 0.4 by
  default, so the rate wanders between 0.6× and 1.4× the mean over seconds;
* the multipliers are then rescaled (and re-clipped, a few rounds) so that their mean is 1: the trace's mean
  rate equals the profile's to within one packet per period, and the trace lasts ``duration_s`` (default
  60 s) before it wraps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fluxshard.errors import FluxShardError
from fluxshard.files import write_text_atomic

PACKET_BYTES = 1500
"""Bytes per delivery opportunity (Mahimahi's MTU-sized packet, as the notes measure rates with)."""

MBPS_PER_PACKET_PER_MS = PACKET_BYTES * 8 / 1000.0
"""One opportunity per millisecond, in Mbit/s (12.0)."""

PAPER_PROFILES: dict[str, float] = {"paper-25": 25.0, "paper-56": 56.0, "paper-130": 130.0}


class TraceError(FluxShardError):
    """A trace file or trace spec is unusable (message names the file, line and problem)."""


class Trace:
    """Delivery opportunities over time, wrapping with period ``period_ms`` (the last timestamp).

    Opportunity ``i`` of repetition ``k`` happens at ``k * period_ms + times_ms[i]`` ms after the trace starts.
    """

    def __init__(self, times_ms: Sequence[int] | np.ndarray, name: str = "trace") -> None:
        t = np.asarray(times_ms, dtype=np.int64).reshape(-1)
        if t.size == 0:
            raise TraceError(f"{name}: a trace needs at least one delivery opportunity")
        if t[0] < 0:
            raise TraceError(f"{name}: negative timestamp {int(t[0])}")
        bad = np.flatnonzero(np.diff(t) < 0)
        if bad.size:
            i = int(bad[0]) + 1
            raise TraceError(f"{name}: timestamp {int(t[i])} at index {i} is before the previous {int(t[i - 1])}")
        if t[-1] <= 0:
            raise TraceError(f"{name}: the last timestamp must be > 0 (it is the period the trace wraps at)")
        self.times_ms = t
        self.times_ms.setflags(write=False)
        self.name = name

    @property
    def period_ms(self) -> int:
        return int(self.times_ms[-1])

    def __len__(self) -> int:
        return int(self.times_ms.size)

    def __repr__(self) -> str:
        return f"Trace({self.name!r}, {len(self)} opportunities / {self.period_ms} ms, {self.mean_mbps:.2f} Mbit/s)"

    @property
    def mean_mbps(self) -> float:
        """Mean capacity over one period."""
        return len(self) * PACKET_BYTES * 8 / (self.period_ms * 1000.0)

    def count_until(self, t_ms: float) -> int:
        """Opportunities at times ``<= t_ms`` since the start (wrapping)."""
        if t_ms < 0:
            return 0
        k, rem = divmod(t_ms, self.period_ms)
        return int(k) * len(self) + int(np.searchsorted(self.times_ms, rem, side="right"))

    def opportunities(self, t0_ms: float, t1_ms: float) -> int:
        """Opportunities in the half-open interval ``(t0_ms, t1_ms]``."""
        return max(0, self.count_until(t1_ms) - self.count_until(t0_ms))

    def next_opportunity(self, t_ms: float) -> float:
        """The time of the first opportunity strictly after ``t_ms``."""
        t_ms = max(t_ms, -1e-9)
        k, rem = divmod(t_ms, self.period_ms)
        i = int(np.searchsorted(self.times_ms, rem, side="right"))
        if i < len(self):
            return k * self.period_ms + float(self.times_ms[i])
        return (k + 1) * self.period_ms + float(self.times_ms[0])

    def mbps_between(self, t0_ms: float, t1_ms: float) -> float:
        """Capacity averaged over ``(t0_ms, t1_ms]`` in Mbit/s."""
        return self.opportunities(t0_ms, t1_ms) * PACKET_BYTES * 8 / ((t1_ms - t0_ms) * 1000.0)

    def to_text(self) -> str:
        return "\n".join(map(str, self.times_ms.tolist())) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the trace as a Mahimahi file (atomically)."""
        return write_text_atomic(path, self.to_text())


def parse(path: str | Path) -> Trace:
    """Read a Mahimahi trace file. Blank lines are ignored; anything else must be a non-negative integer,
    never smaller than the line before, and the last must be > 0."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{p}: cannot read trace file ({e})") from None
    values: list[int] = []
    prev = -1
    for lineno, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s:
            continue
        if not re.fullmatch(r"\d+", s):
            raise TraceError(f"{p}:{lineno}: not a non-negative integer millisecond timestamp: {s[:40]!r}")
        v = int(s)
        if v < prev:
            raise TraceError(f"{p}:{lineno}: timestamp {v} is before the previous line's {prev} (must not decrease)")
        values.append(v)
        prev = v
        last_line = lineno
    if not values:
        raise TraceError(f"{p}: empty trace file (no delivery opportunities)")
    if values[-1] == 0:
        raise TraceError(f"{p}:{last_line}: the last timestamp is 0; a trace must last > 0 ms (it wraps at its end)")
    return Trace(values, name=p.name)


def _spread(packets_per_ms: np.ndarray, name: str) -> Trace:
    """Turn a per-millisecond rate (packets/ms, for ms 1..N) into opportunities: a running credit emits a packet
    each time it crosses an integer, so the count over any window is within one packet of the rate's integral.
    The last millisecond always carries one opportunity, since the last timestamp is the period."""
    credit = np.cumsum(packets_per_ms)
    emitted = np.floor(credit + 1e-9).astype(np.int64)
    per_ms = np.diff(emitted, prepend=0)
    if per_ms[-1] == 0:
        per_ms[-1] = 1
    times = np.repeat(np.arange(1, per_ms.size + 1, dtype=np.int64), per_ms)
    return Trace(times, name=name)


def constant(mbps: float) -> Trace:
    """A constant rate. The period is the shortest of 12 × 10^j ms (j = 0..3) that holds a whole number of
    packets, so 25 Mbit/s is 25 packets every 12 ms, evenly spread."""
    if not math.isfinite(mbps) or mbps <= 0:
        raise TraceError(f"link rate must be a positive number of Mbit/s, got {mbps}")
    for scale in (1, 10, 100, 1000):
        n = mbps * scale
        if abs(n - round(n)) < 1e-6 or scale == 1000:
            break
    packets = max(1, round(n))
    period = 12 * scale
    # opportunity i at ceil((i + 1) * period / packets): evenly spread, the last exactly at the period
    times = -((-(np.arange(1, packets + 1, dtype=np.int64) * period)) // packets)
    return Trace(times, name=f"{mbps:g}mbps")


def step(from_mbps: float, to_mbps: float, at_s: float, hold_s: float = 60.0) -> Trace:
    """``from_mbps`` until ``at_s`` seconds, then ``to_mbps`` for ``hold_s`` seconds, then it wraps (a test's
    sudden rate drop, e.g. ``step(130, 2, 1.0)``)."""
    for v in (from_mbps, to_mbps):
        if not math.isfinite(v) or v <= 0:
            raise TraceError(f"link rate must be a positive number of Mbit/s, got {v}")
    if at_s <= 0 or hold_s <= 0:
        raise TraceError(f"step needs at_s > 0 and hold_s > 0, got {at_s}, {hold_s}")
    a, b = round(at_s * 1000), round(hold_s * 1000)
    rate = np.concatenate([np.full(a, from_mbps), np.full(b, to_mbps)]) / MBPS_PER_PACKET_PER_MS
    return _spread(rate, name=f"step-{from_mbps:g}-{to_mbps:g}@{at_s:g}s")


def paper_profile(
    mbps: float,
    seed: int | None = None,
    duration_s: float = 60.0,
    segment_ms: int = 200,
    spread: float = 0.4,
    step_sd: float = 0.08,
    revert: float = 0.95,
) -> Trace:
    """An LTE-like trace with mean ``mbps`` (see the module docstring for the model). ``seed`` defaults to
    ``int(mbps)``, so ``paper_profile(25)`` is the same trace everywhere."""
    if not math.isfinite(mbps) or mbps <= 0:
        raise TraceError(f"link rate must be a positive number of Mbit/s, got {mbps}")
    if not 0 <= spread < 1 or segment_ms < 1 or duration_s * 1000 < segment_ms:
        raise TraceError(f"bad profile parameters: spread {spread}, segment {segment_ms} ms, duration {duration_s} s")
    rng = np.random.default_rng(int(mbps) if seed is None else seed)
    n_seg = max(1, round(duration_s * 1000 / segment_ms))
    lo, hi = 1.0 - spread, 1.0 + spread
    m = np.empty(n_seg)
    x = 1.0
    for k in range(n_seg):
        m[k] = x
        x = float(np.clip(1.0 + revert * (x - 1.0) + rng.normal(0.0, step_sd), lo, hi))
    for _ in range(50):  # rescale to mean 1 while staying inside the bound (converges in a few rounds)
        m = np.clip(m / m.mean(), lo, hi)
        if abs(m.mean() - 1.0) < 1e-6:
            break
    m /= m.mean()
    rate = np.repeat(m * mbps / MBPS_PER_PACKET_PER_MS, segment_ms)
    return _spread(rate, name=f"paper-{mbps:g}-seed{int(mbps) if seed is None else seed}")


def write_paper_traces(directory: str | Path, duration_s: float = 60.0) -> list[Path]:
    """Write ``paper-25.trace``, ``paper-56.trace`` and ``paper-130.trace`` (Mahimahi files) into ``directory``."""
    d = Path(directory)
    return [paper_profile(v, duration_s=duration_s).write(d / f"{k}.trace") for k, v in PAPER_PROFILES.items()]


def from_spec(spec: str | float) -> Trace:
    """The CLI's ``TRACE_OR_MBPS``: a number is a constant rate in Mbit/s, ``paper-25|paper-56|paper-130`` a
    generated profile, anything else a Mahimahi trace file."""
    if isinstance(spec, int | float):
        return constant(float(spec))
    s = spec.strip()
    if s in PAPER_PROFILES:
        return paper_profile(PAPER_PROFILES[s])
    try:
        v = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(v) or v <= 0:
            raise TraceError(f"link rate must be a positive number of Mbit/s, got {s!r}")
        return constant(v)
    if s.startswith("paper-"):
        raise TraceError(f"unknown profile {s!r}: choose one of {', '.join(PAPER_PROFILES)}")
    return parse(s)
