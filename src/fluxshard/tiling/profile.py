"""Model-family profiles for the tile planner (§3.1.1, §3.1.3).

A profile holds, per model, its square input size, mean and p99 latency on this machine and its accuracy
over the 22 relative-size bins of :mod:`fluxshard.tiling.bins`; plus the plan-runtime estimate that is
subtracted from the SLO before planning. Profiles are written as JSON and validated on load, because a
profile measured once is reused across runs and a silently wrong one would make every plan wrong.

Decisions:

* ``plan_runtime_ms = p99(planner times) * 1.1`` (§3.1.3), computed with numpy's linear-interpolation
  percentile; an empty list of times is an error (no estimate without measurements).
* Accuracies are fractions in ``[0, 1]`` (AP over the bin's objects); latencies are milliseconds, must be
  positive and ``p99 >= mean``. Model names are unique. The bin edges are stored in the file and must equal
  the current :data:`~fluxshard.tiling.bins.EDGES`, so a profile made under other bins is rejected rather
  than misread.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.errors import FluxShardError
from fluxshard.files import write_text_atomic
from fluxshard.tiling.bins import EDGES, N_BINS

FORMAT = "fluxshard-tiling-profile"
VERSION = 1
PLAN_RUNTIME_MARGIN = 0.10
MODES = ("conservative", "non-conservative")
#: Quantile (percent) of the conservative plan latency model. The contract is "at most 1 % of
#: frames late" per clip and SLO; a plan filled up to its p99 misses ~1 % of frames whenever the load matches
#: the profile and more when it drifts, so the model targets the 99.9th percentile (design.md, Uirapuru
#: tiling, *Conservative quantile*).
PLAN_TAIL_QUANTILE = 99.9
PLAN_TAIL_DURATIONS = (25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0, 1600.0)


class ProfileError(FluxShardError):
    """A model-family profile is missing, unreadable or malformed (the message names file and field)."""


@dataclass(frozen=True)
class ModelProfile:
    """One model: square input side, latency (ms) and accuracy per relative-size bin."""

    name: str
    input_size: int
    mean_ms: float
    p99_ms: float
    accuracy: tuple[float, ...]

    def latency(self, mode: str) -> float:
        """p99 in conservative mode (per-frame guarantee), mean in non-conservative mode (average)."""
        if mode == "conservative":
            return self.p99_ms
        if mode == "non-conservative":
            return self.mean_ms
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class FamilyProfile:
    """The models the planner may choose from, and the planner's own runtime estimate (ms)."""

    models: tuple[ModelProfile, ...]
    plan_runtime_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    #: Per tile geometry ``"WxH"`` (unpadded tile px, rounded): ``[[mean, p99] per model]`` in ms, measured on
    #: that geometry (a deployment profile); geometries not listed use the models' own mean / p99.
    tile_ms: dict[str, list[list[float]]] = field(default_factory=dict)
    #: Per tile geometry ``"WxH"``: ``[22-bin accuracy vector per model]`` measured on that geometry (a
    #: deployment profile); geometries not listed use the models' own (pooled) vectors.
    tile_acc: dict[str, list[list[float]]] = field(default_factory=dict)
    #: Conservative plan latency model (a deployment profile): ``[[plan mean ms, p99 / mean], ...]``, durations
    #: increasing, ratios >= 1 and non-increasing - the :data:`PLAN_TAIL_QUANTILE` (99.9th, or the quantile in
    #: ``meta["plan_tail_quantile"]``) percentile of ``observed / profiled mean`` over runs of consecutive tiles
    #: totalling that mean duration (:func:`plan_tail_table`). The name ``p99`` in :meth:`plan_p99` is
    #: historical: it is the conservative estimate at that quantile. Empty: a plan's conservative latency is
    #: the sum of its tiles' p99s.
    plan_tail: tuple[tuple[float, float], ...] = ()
    #: Plan-level calibration per tile geometry ``"WxH"``: one factor per model, ``measured AP / estimated PeAP``
    #: of the plan "every tile of that geometry run with that model" on the deployment views
    #: (:func:`fluxshard.tiling.profiler.plan_calibration`); the geometry's accuracy vectors are multiplied by it.
    #: Geometries not listed: factor 1.
    tile_calib: dict[str, list[float]] = field(default_factory=dict)
    #: The profiling run's timed tiles in the order they ran, ``[[observed ms, profiled mean ms], ...]`` (a
    #: deployment profile): :attr:`plan_tail` can be recomputed at another quantile from it
    #: (:meth:`with_tail_quantile`) without re-profiling. Empty: the tail is fixed.
    plan_runs: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        _validate(self.models, self.plan_runtime_ms, "<memory>")
        _validate_tile_ms(self.tile_ms, len(self.models), "<memory>")
        _validate_tile_acc(self.tile_acc, len(self.models), "<memory>")
        _validate_plan_tail(self.plan_tail, "<memory>")
        _validate_tile_calib(self.tile_calib, len(self.models), "<memory>")
        _validate_plan_runs(self.plan_runs, "<memory>")

    def with_tail_quantile(self, quantile: float) -> FamilyProfile:
        """The profile with :attr:`plan_tail` recomputed at ``quantile`` (percent) from :attr:`plan_runs`
        (:func:`plan_tail_table`); the quantile is recorded in ``meta["plan_tail_quantile"]``. A profile
        without recorded runs is returned unchanged (its tail, if any, keeps the quantile it was made with)."""
        if not self.plan_runs:
            return self
        if not 50.0 <= float(quantile) <= 100.0:
            raise ValueError(f"tail quantile must be in [50, 100] percent, got {quantile!r}")
        runs = np.asarray(self.plan_runs, dtype=np.float64)
        tail = plan_tail_table(runs[:, 0], runs[:, 1], quantile=float(quantile))
        return dataclasses.replace(self, plan_tail=tuple((float(d), float(q)) for d, q in tail),
                                   meta={**self.meta, "plan_tail_quantile": float(quantile)})

    def plan_p99(self, mean_ms: float | np.ndarray) -> np.ndarray:
        """p99 latency of a plan whose tiles' means sum to ``mean_ms``: ``max over T <= mean_ms of T * q(T)``
        (:attr:`plan_tail`, log-linear in T between entries, end values outside), so it never decreases with
        the plan's mean. Requires a non-empty :attr:`plan_tail`."""
        return plan_p99(self.plan_tail, mean_ms)

    def mean_budget(self, p99_budget_ms: float) -> float:
        """The largest plan mean ``T`` whose :meth:`plan_p99` fits ``p99_budget_ms`` (the conservative
        budget as a knapsack capacity over mean tile latencies)."""
        return mean_budget(self.plan_tail, p99_budget_ms)

    def tile_accuracy(self, tile_w: float, tile_h: float, calibrated: bool = True) -> np.ndarray:
        """(n_models, 22) accuracy vectors for a ``tile_w x tile_h`` tile: the geometry's own, else pooled;
        times the geometry's plan-level calibration (:attr:`tile_calib`) unless ``calibrated`` is false."""
        key = geometry_key(tile_w, tile_h)
        rows = self.tile_acc.get(key)
        acc = self.accuracy_matrix() if rows is None else np.array(rows, dtype=np.float64)
        cal = self.tile_calib.get(key) if calibrated else None
        return acc if cal is None else acc * np.asarray(cal, dtype=np.float64)[:, None]

    def tile_latencies(self, mode: str, tile_w: float, tile_h: float) -> np.ndarray:
        """(n_models,) latency of a ``tile_w x tile_h`` tile: the measured entry for that geometry, else the
        models' geometry-free figures."""
        row = self.tile_ms.get(geometry_key(tile_w, tile_h))
        if row is None:
            return self.latencies(mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return np.array([r[1] if mode == "conservative" else r[0] for r in row], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def accuracy_matrix(self) -> np.ndarray:
        """(n_models, 22) accuracy vectors."""
        return np.array([m.accuracy for m in self.models], dtype=np.float64)

    def latencies(self, mode: str) -> np.ndarray:
        return np.array([m.latency(mode) for m in self.models], dtype=np.float64)

    def input_sizes(self) -> np.ndarray:
        return np.array([m.input_size for m in self.models], dtype=np.int64)

    def inference_budget(self, slo_ms: float) -> float:
        """Latency left for model inference once planning is paid for (never negative)."""
        return max(0.0, float(slo_ms) - self.plan_runtime_ms)

    def with_plan_runtime(self, planner_times_ms: Sequence[float]) -> FamilyProfile:
        return dataclasses.replace(self, plan_runtime_ms=plan_runtime_estimate(planner_times_ms),
                                   meta=dict(self.meta))

    def with_runtime(self, plan_runtime_ms: float) -> FamilyProfile:
        return dataclasses.replace(self, plan_runtime_ms=float(plan_runtime_ms), meta=dict(self.meta))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "bin_edges": [float(e) for e in EDGES],
            "plan_runtime_ms": self.plan_runtime_ms,
            "meta": self.meta,
            "tile_ms": self.tile_ms,
            "tile_acc": self.tile_acc,
            "plan_tail": [list(p) for p in self.plan_tail],
            "tile_calib": self.tile_calib,
            "plan_runs": [list(p) for p in self.plan_runs],
            "models": [
                {"name": m.name, "input_size": m.input_size, "mean_ms": m.mean_ms, "p99_ms": m.p99_ms,
                 "accuracy": list(m.accuracy)}
                for m in self.models
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Atomic write (a crash never leaves half a profile that would later fail to load)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")


def geometry_key(tile_w: float, tile_h: float) -> str:
    return f"{round(float(tile_w))}x{round(float(tile_h))}"


def _validate_tile_ms(tile_ms: Any, n_models: int, src: str) -> None:
    if not isinstance(tile_ms, dict):
        raise _fail(src, "tile_ms", "must be an object")
    for key, row in tile_ms.items():
        where = f"tile_ms[{key!r}]"
        if not isinstance(row, list) or len(row) != n_models:
            raise _fail(src, where, f"needs one [mean, p99] per model ({n_models})")
        for k, pair in enumerate(row):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise _fail(src, f"{where}[{k}]", "must be [mean_ms, p99_ms]")
            mean = _number(src, f"{where}[{k}][0]", pair[0], positive=True)
            p99 = _number(src, f"{where}[{k}][1]", pair[1], positive=True)
            if p99 < mean:
                raise _fail(src, f"{where}[{k}]", f"p99 {p99} is below mean {mean}")


def _validate_tile_acc(tile_acc: Any, n_models: int, src: str) -> None:
    if not isinstance(tile_acc, dict):
        raise _fail(src, "tile_acc", "must be an object")
    for key, rows in tile_acc.items():
        where = f"tile_acc[{key!r}]"
        if not isinstance(rows, list) or len(rows) != n_models:
            raise _fail(src, where, f"needs one accuracy vector per model ({n_models})")
        for k, row in enumerate(rows):
            if not isinstance(row, list | tuple) or len(row) != N_BINS:
                raise _fail(src, f"{where}[{k}]", f"needs {N_BINS} values")
            for j, a in enumerate(row):
                _number(src, f"{where}[{k}][{j}]", a, lo=0.0, hi=1.0)


def _validate_tile_calib(calib: Any, n_models: int, src: str) -> None:
    if not isinstance(calib, dict):
        raise _fail(src, "tile_calib", "must be an object")
    for key, row in calib.items():
        where = f"tile_calib[{key!r}]"
        if not isinstance(row, list | tuple) or len(row) != n_models:
            raise _fail(src, where, f"needs one factor per model ({n_models})")
        for k, v in enumerate(row):
            _number(src, f"{where}[{k}]", v, positive=True)


def _validate_plan_tail(tail: Any, src: str) -> None:
    if not isinstance(tail, list | tuple):
        raise _fail(src, "plan_tail", "must be a list of [mean_ms, ratio]")
    prev_t, prev_q = 0.0, math.inf
    for k, pair in enumerate(tail):
        where = f"plan_tail[{k}]"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _fail(src, where, "must be [mean_ms, ratio]")
        t = _number(src, f"{where}[0]", pair[0], positive=True)
        q = _number(src, f"{where}[1]", pair[1], lo=1.0)
        if t <= prev_t:
            raise _fail(src, where, "durations must increase")
        if q > prev_q + 1e-12:
            raise _fail(src, where, "ratios must not increase with the duration")
        prev_t, prev_q = t, q


def _validate_plan_runs(runs: Any, src: str) -> None:
    if not isinstance(runs, list | tuple):
        raise _fail(src, "plan_runs", "must be a list of [observed_ms, mean_ms]")
    for k, pair in enumerate(runs):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _fail(src, f"plan_runs[{k}]", "must be [observed_ms, mean_ms]")
        _number(src, f"plan_runs[{k}][0]", pair[0], lo=0.0)
        _number(src, f"plan_runs[{k}][1]", pair[1], positive=True)


def plan_tail_table(ms: Sequence[float], mean: Sequence[float], durations: Sequence[float] = PLAN_TAIL_DURATIONS,
                    quantile: float = PLAN_TAIL_QUANTILE) -> list[list[float]]:
    """The conservative plan latency model: for each duration ``T``, the ``quantile`` of
    ``sum(observed) / sum(profiled mean)`` over every run of consecutive timed tiles (in the order they ran)
    whose means first reach ``T`` - what a plan of ``T`` ms of tiles would have measured at profiling.

    Why not the sum of the tiles' p99s: a load spike shorter than the plan slows some of its tiles, not all,
    so the tail of a plan's total shrinks as the plan gets longer (measured on this machine under load 2-4:
    one tile's p99 is ~1.4-1.8x its mean, a 12-tile plan's frame maximum ~1.3-1.5x its median). Ratios are made
    non-increasing in ``T`` by a running maximum from the long end (a longer plan is never credited a thinner
    tail than a shorter one measured with fewer windows), never below 1; durations with no window (the
    profiling run was shorter) are dropped. The quantile uses numpy's linear interpolation; the default is
    :data:`PLAN_TAIL_QUANTILE` (99.9)."""
    t = np.asarray(ms, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    if t.shape != m.shape or t.ndim != 1 or not np.all(m > 0):
        raise ValueError("plan_tail_table needs matching 1-D observed and positive mean times")
    ct = np.concatenate([[0.0], np.cumsum(t)])
    cm = np.concatenate([[0.0], np.cumsum(m)])
    rows = []
    for d in durations:
        end = np.searchsorted(cm, cm[:-1] + d, side="left")  # first end with sum(mean) >= d
        ok = end < len(cm)
        if not ok.any():
            continue
        start = np.flatnonzero(ok)
        ratio = (ct[end[ok]] - ct[start]) / (cm[end[ok]] - cm[start])
        rows.append([float(d), float(np.percentile(ratio, quantile))])
    q = 1.0
    for r in reversed(rows):
        q = max(q, r[1])
        r[1] = round(q, 4)
    return rows


def _tail_curve(tail: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(durations, running-max p99) on a dense log grid spanning the table, for :func:`plan_p99`."""
    if not tail:
        raise ValueError("the profile has no plan_tail (conservative plan latency model)")
    t = np.array([p[0] for p in tail], dtype=np.float64)
    q = np.array([p[1] for p in tail], dtype=np.float64)
    if len(t) == 1:
        return t, t * q
    grid = np.exp(np.linspace(np.log(t[0]), np.log(t[-1]), 512))
    p99 = grid * np.interp(np.log(grid), np.log(t), q)
    return grid, np.maximum.accumulate(p99)


def plan_p99(tail: Sequence[Sequence[float]], mean_ms: float | np.ndarray) -> np.ndarray:
    """See :meth:`FamilyProfile.plan_p99`."""
    grid, curve = _tail_curve(tail)
    m = np.asarray(mean_ms, dtype=np.float64)
    q0, q1 = float(tail[0][1]), float(tail[-1][1])
    inside = np.interp(m, grid, curve)
    # below the table: the shortest plans' ratio; above: the longest plans' ratio, never below the table's end
    return np.where(m <= grid[0], m * q0, np.where(m >= grid[-1], np.maximum(m * q1, curve[-1]), inside))


def mean_budget(tail: Sequence[Sequence[float]], p99_budget_ms: float) -> float:
    """See :meth:`FamilyProfile.mean_budget`."""
    b = float(p99_budget_ms)
    if not b > 0:
        return 0.0
    grid, curve = _tail_curve(tail)
    q0, q1 = float(tail[0][1]), float(tail[-1][1])
    if b <= grid[0] * q0:
        return b / q0
    if b >= curve[-1]:
        return b / q1
    k = int(np.searchsorted(curve, b, side="right"))  # curve[k-1] <= b < curve[k]
    lo, hi = grid[k - 1], grid[k]
    c0, c1 = curve[k - 1], curve[k]
    return float(lo if c1 <= c0 else lo + (hi - lo) * (b - c0) / (c1 - c0))


def plan_runtime_estimate(planner_times_ms: Sequence[float]) -> float:
    """§3.1.3: p99 of the measured planner times plus a 10 % safety margin."""
    t = np.asarray(list(planner_times_ms), dtype=np.float64)
    if t.size == 0 or not np.all(np.isfinite(t)) or t.min() < 0:
        raise ValueError("plan runtime estimate needs at least one finite, non-negative planner time")
    return float(np.percentile(t, 99) * (1 + PLAN_RUNTIME_MARGIN))


def _fail(src: str, where: str, problem: str) -> ProfileError:
    return ProfileError(f"{src}: {where}: {problem}")


def _number(src: str, where: str, v: Any, *, positive: bool = False, lo: float | None = None,
            hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(src, where, f"must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _fail(src, where, f"must be > 0, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(src, where, f"must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def _validate(models: Sequence[ModelProfile], plan_runtime_ms: Any, src: str) -> None:
    if not models:
        raise _fail(src, "models", "a family needs at least one model")
    seen: set[str] = set()
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(m.name, str) or not m.name:
            raise _fail(src, f"{where}.name", "must be a non-empty string")
        if m.name in seen:
            raise _fail(src, f"{where}.name", f"duplicate model name {m.name!r}")
        seen.add(m.name)
        if isinstance(m.input_size, bool) or not isinstance(m.input_size, int) or m.input_size <= 0:
            raise _fail(src, f"{where}.input_size", f"must be a positive integer, got {m.input_size!r}")
        _number(src, f"{where}.mean_ms", m.mean_ms, positive=True)
        _number(src, f"{where}.p99_ms", m.p99_ms, positive=True)
        if m.p99_ms < m.mean_ms:
            raise _fail(src, f"{where}.p99_ms", f"{m.p99_ms} is below mean_ms {m.mean_ms}")
        if len(m.accuracy) != N_BINS:
            raise _fail(src, f"{where}.accuracy", f"needs {N_BINS} values, got {len(m.accuracy)}")
        for k, a in enumerate(m.accuracy):
            _number(src, f"{where}.accuracy[{k}]", a, lo=0.0, hi=1.0)
    _number(src, "plan_runtime_ms", plan_runtime_ms, lo=0.0)


def load_profile(path: str | Path) -> FamilyProfile:
    """Read and validate a profile JSON; every problem is a :class:`ProfileError` naming file and field."""
    p = Path(path)
    src = str(p)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{src}: no such profile file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{src}: cannot read profile ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _fail(src, "format", f"not a tiling profile (expected format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise _fail(src, "version", f"unsupported version {raw.get('version')!r} (this build reads {VERSION})")
    edges = raw.get("bin_edges")
    if not isinstance(edges, list) or len(edges) != len(EDGES) or not np.allclose(
        np.asarray([_number(src, "bin_edges", e) for e in edges]), EDGES, rtol=0, atol=1e-12
    ):
        raise _fail(src, "bin_edges", "made with different size bins; re-profile the family")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list):
        raise _fail(src, "models", "must be a list")
    models = []
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(m, dict):
            raise _fail(src, where, "must be an object")
        for key in ("name", "input_size", "mean_ms", "p99_ms", "accuracy"):
            if key not in m:
                raise _fail(src, f"{where}.{key}", "missing")
        if not isinstance(m["accuracy"], list):
            raise _fail(src, f"{where}.accuracy", "must be a list")
        models.append(ModelProfile(m["name"], m["input_size"], m["mean_ms"], m["p99_ms"], tuple(m["accuracy"])))
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(src, "meta", "must be an object")
    runtime = raw.get("plan_runtime_ms", 0.0)
    tile_ms = raw.get("tile_ms", {})
    tile_acc = raw.get("tile_acc", {})
    tail = raw.get("plan_tail", [])
    calib = raw.get("tile_calib", {})
    runs = raw.get("plan_runs", [])
    _validate(models, runtime, src)  # first with the file name, so errors point at it
    _validate_tile_ms(tile_ms, len(models), src)
    _validate_tile_acc(tile_acc, len(models), src)
    _validate_plan_tail(tail, src)
    _validate_tile_calib(calib, len(models), src)
    _validate_plan_runs(runs, src)
    return FamilyProfile(tuple(models), float(runtime), meta,
                         {k: [list(map(float, p)) for p in v] for k, v in tile_ms.items()},
                         {k: [list(map(float, r)) for r in v] for k, v in tile_acc.items()},
                         tuple((float(t), float(q)) for t, q in tail),
                         {k: [float(x) for x in v] for k, v in calib.items()},
                         tuple((float(o), float(m)) for o, m in runs))


def synthetic_family(
    sizes: Sequence[int] = (320, 416, 512, 640), base_ms: float = 8.0, p99_factor: float = 1.25
) -> FamilyProfile:
    """A plausible family for tests and planning experiments, no model runs needed.

    Latency grows with input area; accuracy is a smooth bump over relative size (tiny objects are missed,
    objects larger than the input degrade), larger inputs shifting the bump to smaller objects and raising it.
    So latency and accuracy are both monotone in input size, the regime where planning is a real trade-off.
    """
    from fluxshard.tiling.bins import bin_bounds

    centres = np.array([(lo + (hi if math.isfinite(hi) else 1.2)) / 2 for lo, hi in bin_bounds()])
    big = max(sizes)
    models = []
    for s in sorted(sizes):
        mean = base_ms * (s / sizes[0]) ** 2
        # Objects are resolved once they span ~12 px of input: the half-point in relative size.
        half = 12.0 / s
        ramp = 1 / (1 + (half / np.maximum(centres, 1e-6)) ** 2.5)
        peak = 0.55 + 0.3 * (s / big)
        tail = np.where(centres > 0.8, np.clip(1 - (centres - 0.8), 0.3, 1), 1.0)
        acc = np.clip(peak * ramp * tail, 0, 1)
        models.append(ModelProfile(f"det{s}", int(s), float(mean), float(mean * p99_factor),
                                   tuple(float(a) for a in acc)))
    return FamilyProfile(tuple(models))
