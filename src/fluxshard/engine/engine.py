"""The incremental engine: run an unmodified PyTorch body frame after frame, recomputing only what changed.

Per frame (seed 000 §III-B Stage 4, strict mode):

1. **Input residual set** — the cached input is shifted block by block with the motion field and compared
   with the current input; pixels differing by more than ``tau_in`` (0 = any change), and every pixel of an
   invalid block or of a block whose source leaves the frame, are residual.
2. **Reuse masks** — for every convolution, the strict RFAP mask (:mod:`fluxshard.engine.rfap`), from the
   input-level field and residual set only, in one pass per distinct geometry.
3. **Execution** — the traced graph runs node by node. A convolution starts from its cached output moved by
   the field (one displacement per shard, brought to the layer's resolution) and recomputes only positions
   outside its reuse mask (:func:`sparse_conv2d` when available, else dense + select); every other node runs
   densely on exact inputs, so dense barriers (global pooling, attention, unknown ops) stay correct.
   By induction every tensor equals dense inference; parity tests check it.
4. **Cache update** — each convolution's full output and the input become the new cache.

A dense refresh runs on the first frame, after :meth:`Engine.reset`, on scene cuts / fields with nothing
valid, on a shape change, and every ``refresh_every`` frames if set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fluxshard.engine import _kernels as _ek
from fluxshard.engine import calibration as _cal
from fluxshard.engine.graph import _POINTWISE_FUNCS, _POINTWISE_MODULES, GraphInfo, tensor_args, trace
from fluxshard.engine.rfap import PixelMaps, reuse_mask
from fluxshard.engine.sparse import LayerCost, PlanCache, _rows, choose_path, sparse_conv2d
from fluxshard.errors import FluxShardError
from fluxshard.motion import _kernels
from fluxshard.motion.field import MotionField


class EngineError(FluxShardError):
    """Wrong input to the engine (shape, field size) — the message names what was expected."""


@dataclass(frozen=True)
class EngineConfig:
    """``exact``: τ_in = 0, strict RFAP at every convolution, no truncation — output equals dense inference.
    ``fast``: RFAP at the first convolution only (seed 000's practical relaxation), changes propagated layer
    by layer and truncated where they stay under the layer's threshold τ^l (seed 000 Eq. 2–4)."""

    mode: Literal["exact", "fast"] = "exact"
    tau_in: float = 0.0  # fast mode: a block is residual if its mean |Δ| (max over channels) exceeds this
    thresholds: dict[str, float] = field(default_factory=dict)  # τ^l per conv node name (fast mode)
    default_threshold: float = 0.0  # τ^l for convs not in ``thresholds``
    refresh_every: int | None = None  # dense refresh period in frames (None = only when needed)
    sparse: bool = True  # use the tile-sparse executor when it is available
    tile: int | None = None  # executor tile size; None = one motion block per tile, 0 = the executor's default
    calibrate: bool = False  # measure each layer's sparse/dense costs on the first dense frame (~2 s for NanoDet)
    fuse: bool = True  # apply a convolution's sole following activation on its recomputed tiles only
    rfap: bool = True  # fast mode: strict RFAP at the first conv; False = naive MV reuse (a baseline, not exact)
    # fast mode: largest misalignment (input px) accepted when a block's vector is rounded to a layer's
    # stride; larger → those positions are recomputed (a misaligned cache is wrong whatever τ^l says)
    shift_tolerance: int = 0
    # fast mode: carried sub-stride remainders (> 0 turns them on; fraction of each resolution's stride). A
    # shard moves by the whole feature pixels that best cancel its vector *plus* the offset its cache content
    # already carries, and keeps the new offset; it is recomputed only when the carried offset exceeds
    # carry_tolerance × stride input px. A 4 px/frame pan then moves a stride-16 cache one position every
    # 4 frames instead of recomputing it every frame, and offsets never accumulate beyond the tolerance.
    carry_tolerance: float = 0.0
    # fast mode, zero-shift rescue (fraction of τ_in; < 0 = off): a block whose vector says it moved but whose
    # unshifted cached input differs by at most zero_rescue × τ_in becomes a zero-motion block. A handheld
    # camera's 1 px shake then leaves smooth background reused at every stride instead of misaligned past the
    # first (cup: active 0.55 → 0.43 at the same retention); stricter than τ_in because a slid texture is a
    # structured error, not noise (at 1.0 × τ_in cup fell to 0.979). See docs/design.md.
    zero_rescue: float = 0.5
    layout: str = "auto"  # executor path: auto (cost model) | batch | hw | gemm | pgemm | dense (tests, benchmarks)
    # truncation profile by motion (issue 5): upper bin edges in mean |MV| (engine-input px/frame) and, per
    # bin, (τ^l per conv, default τ); a frame uses the bin of its field's motion. Empty = ``thresholds``.
    motion_bins: tuple[float, ...] = ()
    bin_thresholds: tuple[tuple[dict[str, float], float], ...] = ()
    # per bin, τ_in (empty = ``tau_in`` in every bin): the profiler tightens τ_in in a bin that misses the
    # retention target even with τ^l = 0 (zero-motion baselines on slow pans: see docs/design.md)
    bin_tau_in: tuple[float, ...] = ()
    # cost guard: while incremental frames (median of the last few) cost more than dense ones, run frames
    # densely and probe the incremental path every ``guard_probe`` frames, the interval doubling after each
    # probe that still does not pay, up to ``guard_probe_max`` (see Engine._guard). Off by default so library
    # results do not depend on timing; ``fluxshard run`` and the benchmark turn it on.
    guard: bool = False
    guard_probe: int = 8
    guard_probe_max: int = 32
    # fast mode's cost guard decides from work, not time: an incremental frame "costs more than dense" when
    # its mean active fraction exceeds this (measured crossover: docs/design.md). Timed decisions differ
    # between identical runs, and in fast mode which frames run dense changes every later output.
    guard_active: float = 0.75
    # directory of persisted executor calibrations (engine/calibration.py): the first run on this machine
    # measures and stores, later runs read, so path choices (and fast-mode outputs) repeat exactly
    calibration_dir: str | None = None
    # fast mode: accumulated truncation — a recomputed position's change is added to what it accumulated
    # since it last propagated, so sub-τ^l changes that persist still reach downstream layers (bounded drift;
    # False = compare with the previous frame only, which drifted to 0.93 mAP@0.5 by frame 300 on vtest)
    accumulate: bool = True
    # fast mode: a conv that would recompute at least this fraction of its positions runs whole and marks
    # everything changed (no cache move, no change test; downstream layers then run whole too). Measured on
    # the PTZ pan, where every method recomputes 80–95 % of the deep positions (see docs/design.md).
    full_above: float = 0.8

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "fast"):
            raise EngineError(f"engine mode must be 'exact' or 'fast', not {self.mode!r}")
        if self.layout not in ("auto", "batch", "hw", "gemm", "pgemm", "dense"):
            raise EngineError(f"engine layout must be auto, batch, hw, gemm, pgemm or dense, not {self.layout!r}")
        if not 0.0 < self.full_above <= 1.0:
            raise EngineError(f"full_above is a fraction in (0, 1], got {self.full_above}")
        if not 0.0 <= self.carry_tolerance <= 0.5:
            raise EngineError(f"carry_tolerance is a fraction of the stride in [0, 0.5], got {self.carry_tolerance}")
        if not 0.0 < self.guard_active <= 1.0:
            raise EngineError(f"guard_active is a fraction in (0, 1], got {self.guard_active}")
        if self.guard_probe < 2:
            raise EngineError(f"guard_probe must be at least 2 frames, got {self.guard_probe}")
        if self.guard_probe_max < self.guard_probe:
            raise EngineError(f"guard_probe_max ({self.guard_probe_max}) must be at least guard_probe "
                              f"({self.guard_probe})")
        if len(self.motion_bins) != len(self.bin_thresholds):
            raise EngineError(f"{len(self.motion_bins)} motion bins but {len(self.bin_thresholds)} threshold sets")
        if self.bin_tau_in and len(self.bin_tau_in) != len(self.motion_bins):
            raise EngineError(f"{len(self.motion_bins)} motion bins but {len(self.bin_tau_in)} tau_in values")
        if any(not t >= 0.0 for t in (self.tau_in, *self.bin_tau_in)):  # also NaN
            raise EngineError(f"tau_in must be ≥ 0, got {[self.tau_in, *self.bin_tau_in]}")
        if list(self.motion_bins) != sorted(self.motion_bins):
            raise EngineError(f"motion bin edges must increase: {list(self.motion_bins)}")
        if self.mode == "exact" and (self.tau_in != 0 or self.thresholds or self.default_threshold != 0
                                     or not self.rfap or self.motion_bins or self.bin_tau_in):
            raise EngineError("exact mode takes no thresholds (tau_in = 0, no truncation) and always applies "
                              "RFAP; use mode='fast'")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Fast-mode thresholds from a JSON profile: ``{"tau_in": .., "default_threshold": ..,
        "thresholds": {"conv_node": τ, ...}}`` or a `fluxshard profile` output (``bins``, each with its τ^l and
        τ_in). ``overrides`` replace file values; a ``tau_in`` override replaces the per-bin τ_in too."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path}: cannot read engine thresholds ({exc})") from exc
        if not isinstance(data, dict):
            raise EngineError(f"{path}: engine thresholds must be a JSON object")
        if not any(k in data for k in ("thresholds", "bins", "tau_in", "default_threshold")):
            raise EngineError(f"{path}: no engine thresholds in this file (expected 'bins' — a `fluxshard profile` "
                              f"output — or 'thresholds', 'tau_in', 'default_threshold')")
        kw = {k: data[k] for k in ("tau_in", "default_threshold", "thresholds", "refresh_every", "shift_tolerance",
                                   "carry_tolerance", "guard", "guard_probe", "guard_probe_max", "accumulate",
                                   "zero_rescue")
              if k in data}
        try:
            for k in ("tau_in", "default_threshold", "carry_tolerance"):
                if k in kw:
                    kw[k] = float(kw[k])
                    if not kw[k] >= 0.0:  # also NaN
                        raise ValueError(f"{k} must be ≥ 0, got {kw[k]}")
            if "zero_rescue" in kw:
                kw["zero_rescue"] = float(kw["zero_rescue"])
                if kw["zero_rescue"] != kw["zero_rescue"]:
                    raise ValueError("zero_rescue must be a number (< 0 = off)")
            if "thresholds" in kw:
                if not isinstance(kw["thresholds"], dict):
                    raise TypeError("'thresholds' must map conv node names to numbers")
                kw["thresholds"] = {str(k): float(v) for k, v in kw["thresholds"].items()}
        except (TypeError, ValueError) as exc:
            raise EngineError(f"{path}: malformed engine thresholds ({exc})") from exc
        bins = data.get("bins")
        if bins:  # a profile from `fluxshard profile`
            try:
                kw["motion_bins"] = tuple(float(b["max_motion"]) for b in bins)
                kw["bin_thresholds"] = tuple(({str(k): float(v) for k, v in b["thresholds"].items()},
                                              float(b.get("default_threshold", 0.0))) for b in bins)
                taus = tuple(float(b.get("tau_in", kw.get("tau_in", 0.0))) for b in bins)
                if not all(t >= 0.0 for t in taus):  # also NaN
                    raise ValueError(f"a bin's tau_in must be ≥ 0, got {list(taus)}")
                # per-bin values only where some bin differs; an explicit tau_in override applies everywhere
                if any(t != kw.get("tau_in", 0.0) for t in taus) and "tau_in" not in overrides:
                    kw["bin_tau_in"] = taus
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise EngineError(f"{path}: malformed motion bins ({exc!r})") from exc
        return cls(mode="fast", **{**kw, **overrides})

    def _bin(self, motion: float) -> int:
        return bin_of(motion, self.motion_bins)

    def tau_in_for(self, motion: float) -> float:
        """τ_in for a frame whose mean |MV| is ``motion`` px (engine input)."""
        return self.bin_tau_in[self._bin(motion)] if self.bin_tau_in else self.tau_in

    def thresholds_for(self, motion: float) -> tuple[dict[str, float], float]:
        """(τ^l per conv, default τ) for a frame whose mean |MV| is ``motion`` px (engine input)."""
        if self.bin_thresholds:
            return self.bin_thresholds[self._bin(motion)]
        return self.thresholds, self.default_threshold


def bin_of(motion: float, bins: Sequence[float]) -> int:
    """The profile bin of ``motion``: the first whose upper edge exceeds it, else the last."""
    for i, edge in enumerate(bins):
        if motion < edge:
            return i
    return len(bins) - 1


def _guard_clock() -> float:
    """The cost guard's clock (seconds): thread CPU time when torch runs on this thread alone, else wall."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def field_motion(field: MotionField) -> float:
    """Mean displacement magnitude over valid blocks (px/frame): the motion measure the profile bins use."""
    v = field.valid
    if not v.any():
        return 0.0
    return float(np.hypot(field.dy[v], field.dx[v]).mean())


@dataclass
class LayerStats:
    name: str
    reuse_fraction: float
    active_fraction: float  # positions recomputed (required)
    ms: float
    path: str
    tile_fraction: float = 1.0  # tiles the executor recomputed (what the work actually is)


@dataclass
class StepStats:
    frame: int
    dense: bool
    reason: str
    input_residual_fraction: float
    ms: float
    layers: list[LayerStats] = field(default_factory=list)
    recompute_map: np.ndarray | None = None  # first convolution's recomputed positions (for overlays)

    @property
    def active_fraction(self) -> float:
        """Mean over convolutions of the fraction of output positions recomputed (1.0 for a dense frame)."""
        if self.dense or not self.layers:
            return 1.0
        return float(np.mean([s.active_fraction for s in self.layers]))


def _activation(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The elementwise activation ``node`` computes, as an in-place callable of one tensor, or None. The
    engine only applies it to fresh convolution outputs, so in place saves an allocation and a pass."""
    t = node.target
    if node.op == "call_function":
        if t in (F.relu, torch.relu, torch.ops.aten.relu.default):
            return torch.relu_
        if t in (F.silu, torch.ops.aten.silu.default):
            return _silu_
        if t in (torch.sigmoid, F.sigmoid, torch.ops.aten.sigmoid.default):
            return torch.sigmoid_
        if t in (F.relu6,):
            return _relu6_
        if t is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return lambda v, s=float(slope): F.leaky_relu_(v, s)
        return None
    if node.op == "call_module":
        m = gm.get_submodule(str(t))
        if type(m) is nn.ReLU:
            return torch.relu_
        if type(m) is nn.ReLU6:
            return _relu6_
        if type(m) is nn.SiLU:
            return _silu_
        if type(m) is nn.Sigmoid:
            return torch.sigmoid_
        if type(m) is nn.LeakyReLU:
            return lambda v, s=float(m.negative_slope): F.leaky_relu_(v, s)
        if type(m) is nn.Hardswish:
            return _hardswish_
    return None


def _act_code(gm: fx.GraphModule, node: fx.Node) -> tuple[int, float]:
    """The activation as the compiled write-back's code: (1, 0) ReLU, (2, slope) leaky ReLU, (0, 0) other
    (applied by its torch callable instead)."""
    t = node.target
    if node.op == "call_module":
        m = gm.get_submodule(str(t))
        if type(m) is nn.ReLU:
            return 1, 0.0
        if type(m) is nn.LeakyReLU:
            return 2, float(m.negative_slope)
        return 0, 0.0
    if node.op == "call_function":
        if t in (F.relu, torch.relu, torch.ops.aten.relu.default):
            return 1, 0.0
        if t is F.leaky_relu:
            return 2, float(node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01))
    return 0, 0.0


def _silu_(v: torch.Tensor) -> torch.Tensor:
    return F.silu(v, inplace=True)


def _relu6_(v: torch.Tensor) -> torch.Tensor:
    return F.hardtanh(v, 0.0, 6.0, inplace=True)


def _hardswish_(v: torch.Tensor) -> torch.Tensor:
    return F.hardswish(v, inplace=True)


def _find_fusions(gm: fx.GraphModule, info: GraphInfo) -> tuple[dict[str, Any], dict[str, fx.Node]]:
    """Convolutions whose only user is an elementwise activation: the activation runs on recomputed tiles
    inside the sparse call and the cache holds activated values, saving a dense pass per layer."""
    post: dict[str, Any] = {}
    fused_into: dict[str, fx.Node] = {}
    convs = set(info.convs)
    for node in gm.graph.nodes:
        if node.name not in convs or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        act = _activation(gm, user)
        if act is None or tensor_args(user)[:1] != [node] or len(tensor_args(user)) != 1:
            continue
        post[node.name] = act
        fused_into[user.name] = node
    return post, fused_into


PROFILES_DIR = Path(__file__).parent / "profiles"


def default_profile(model: str, method: str = "fluxshard-fast") -> Path | None:
    """The fast-mode thresholds shipped for a bundled model, if any; ``method`` = ``delta`` / ``global-warp``
    for the baselines' own profiles (``MODEL.METHOD.json``, same target retention)."""
    p = PROFILES_DIR / (f"{model}.json" if method == "fluxshard-fast" else f"{model}.{method}.json")
    return p if p.is_file() else None


def _warm_kernels() -> None:
    """Load the compiled input-stage kernels before the first timed frame."""
    z = np.zeros((2, 2), np.int32)
    img = torch.zeros(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0).numpy()
    _kernels.shifted_diff(img, img, z[:1, :1], z[:1, :1], 16, np.empty((16, 16), np.float32),
                          np.empty((1, 1), np.float32))
    _ek.strict_reuse(np.zeros((17, 17), np.int32), np.zeros((5, 2, 2), np.int64), 16, 16, 16, 2, 2, 1, 1,
                          1, 1, np.empty((8, 8), np.bool_), np.empty((8, 8), np.int32), np.empty((8, 8), np.int32))
    _ek.warm()


class Engine:
    """Incremental inference of one video stream with one model body; create one per stream."""

    def __init__(self, body: nn.Module, input_hw: tuple[int, int], config: EngineConfig | None = None,
                 in_channels: int = 3) -> None:
        self.config = config or EngineConfig()
        self.input_hw = tuple(input_hw)
        self.in_channels = in_channels
        body = body.eval()
        self.info: GraphInfo = trace(body, torch.zeros(1, in_channels, *self.input_hw))
        self.gm: fx.GraphModule = self.info.gm
        _warm_kernels()
        self._sparse = sparse_conv2d if self.config.sparse else None
        self._plans = PlanCache() if self._sparse is not None else None
        self._calibrated: set[str] = set()
        self._post, self._fused_into = _find_fusions(self.gm, self.info) if self.config.fuse \
            else ({}, {})
        # fused activations the compiled write-back applies itself (see _ek.finish_rows), per conv
        by_name = {n.name: n for n in self.gm.graph.nodes}
        self._post_act = {c.name: _act_code(self.gm, by_name[u]) for u, c in self._fused_into.items()}
        self._conv_nodes = _conv_nodes(self.gm, self.info)
        self._row_ops = _row_ops(self.gm, self.info, self._fused_into, self.input_hw) \
            if self.config.mode == "fast" and self.config.sparse else {}
        self._runner_obj: _Runner | None = None
        self._pgemm_layers: dict[tuple[int, ...], _PgemmLayer] = {}
        self._capture: fx.GraphModule | None = None
        self._tau: tuple[dict[str, float], float] = (self.config.thresholds, self.config.default_threshold)
        named = set(self.config.thresholds).union(*(th for th, _ in self.config.bin_thresholds))
        if named and not named & set(self._conv_nodes):
            some = ", ".join(sorted(named)[:3])
            raise EngineError(f"the thresholds name none of this model's convolutions ({some}, …): a profile made "
                              f"for another model? This one's first convolutions: "
                              f"{', '.join(list(self._conv_nodes)[:3])}")
        self._cal_saved = False
        if self.config.calibration_dir and self.config.calibrate and self._plans is not None:
            stored = _cal.load(self.config.calibration_dir, self.calibration_key())
            if stored is not None:
                self.load_calibration(stored)
        self.reset()

    def share_calibration(self, other: Engine, pgemm_scale: float = 1.0) -> None:
        """Use the executor costs ``other`` measured (same body, same input size) instead of measuring them
        again on this engine's first frame: the profiler runs one model a dozen times per clip.
        ``pgemm_scale`` ≠ 1 prices fast mode's compiled path that many times its measured cost (in copies;
        ``other`` keeps its own): the path choices a differently loaded machine would make, which the profiler
        certifies a profile under too (paths differ in float summation order, and a truncation test that
        flips on 1e-6 can change what later frames recompute)."""
        mods = {id(c.module) for c in self._conv_nodes.values()}
        if other.input_hw != self.input_hw or mods != {id(c.module) for c in other._conv_nodes.values()}:
            raise EngineError("share_calibration needs an engine of the same body and input size")
        if not pgemm_scale > 0.0:
            raise EngineError(f"pgemm_scale must be > 0, got {pgemm_scale}")
        self._plans, self._pgemm_layers, self._calibrated = other._plans, other._pgemm_layers, other._calibrated
        if pgemm_scale != 1.0:
            self._pgemm_layers = {
                k: dataclasses.replace(v, cost=None if v.cost is None else
                                       (v.cost[0] * pgemm_scale, v.cost[1] * pgemm_scale, v.cost[2]))
                for k, v in other._pgemm_layers.items()}

    def calibration_key(self) -> str:
        """File key of this engine's calibration: machine, model convolutions, input size, executor settings."""
        c = self.config
        convs = [(name, str(cn.module)) for name, cn in self._conv_nodes.items()]
        return _cal.key_of({**_cal.machine_key(), "input_hw": list(self.input_hw), "mode": c.mode,
                            "tile": c.tile, "layout": c.layout, "fuse": c.fuse, "convs": convs})

    def calibration(self) -> dict[str, Any]:
        """The executor costs this engine measured, as plain JSON-able data (see :meth:`load_calibration`)."""
        by_module = {id(cn.module): name for name, cn in self._conv_nodes.items()}
        plans = [] if self._plans is None else [
            {"sig": _cal.jsonable(sig), "dense": lc.dense, "paths": {p: list(ab) for p, ab in lc.paths.items()}}
            for sig, lc in self._plans.costs.items() if lc.measured]
        pgemm = {}
        for (mid, h, w), pg in self._pgemm_layers.items():
            name = by_module.get(mid)
            if name is not None and pg.cost is not None:
                pgemm[name] = {"in_hw": [h, w], "cost": list(pg.cost), "test_ms": pg.test_ms, "move_ms": pg.move_ms}
        return {"layers": sorted(self._calibrated), "plans": plans, "pgemm": pgemm}

    def load_calibration(self, data: dict[str, Any]) -> None:
        """Use stored executor costs instead of measuring them on the first frame. Malformed data is an error
        (a stored file is checked by key and version before it gets here)."""
        if self._plans is None:
            return
        try:
            for item in data["plans"]:
                lc = LayerCost(float(item["dense"]), {str(p): (float(ab[0]), float(ab[1]))
                                                      for p, ab in item["paths"].items()}, measured=True)
                self._plans.set_cost(_cal.tuplify(item["sig"]), lc)
            for name, d in data["pgemm"].items():
                cn = self._conv_nodes.get(name)
                if cn is None:
                    continue
                pg = self._pgemm_layer(cn, (int(d["in_hw"][0]), int(d["in_hw"][1])))
                a, b, dense = (float(v) for v in d["cost"])
                pg.cost, pg.test_ms, pg.move_ms = (a, b, dense), float(d["test_ms"]), float(d["move_ms"])
            self._calibrated = set(data["layers"]) & set(self._conv_nodes)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(f"malformed engine calibration ({exc!r})") from exc
        self._cal_saved = True  # nothing new to store

    def _store_calibration(self) -> None:
        """After the first frame measured every layer: store the costs for the next run (see calibration.py)."""
        if (self._cal_saved or not self.config.calibration_dir
                or len(self._calibrated) < len(self._conv_nodes)):
            return
        self._cal_saved = True
        with contextlib.suppress(OSError):  # a read-only cache costs the next run ~2 s of measuring, no more
            _cal.save(self.config.calibration_dir, self.calibration_key(), self.calibration(), _cal.machine_key())

    @property
    def barriers(self) -> list[str]:
        return list(self.info.barriers)

    def reset(self) -> None:
        self._x_cache: torch.Tensor | None = None
        self._upd_bufs: list[torch.Tensor] = getattr(self, "_upd_bufs", [])
        self._side: np.ndarray = getattr(self, "_side", np.empty(0, np.float32))  # moved blocks' packed sources
        self._rows_memo: dict[tuple[str, ...], tuple[torch.Tensor, np.ndarray | None]] = {}  # see _Runner._memo_rows
        self._caches: dict[str, torch.Tensor] = {}
        # per node, a former cache tensor no live cache shares memory with: the next whole-map move writes into
        # it (see _move) instead of allocating, which on this machine costs more than the copy (page faults)
        self._spare: dict[str, torch.Tensor] = {}
        self._acc: dict[str, np.ndarray] = {}  # fast mode, accumulated truncation: per conv, change carried
        self._prev_tau: dict[str, float] = {}  # τ^l of the previous incremental frame (see _Runner._sweep)
        # fast mode, carried remainders: per (stride, h, w), the offsets (y, x) of the caches' content, input px
        self._rem: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._tau_set = False
        self._tau_in = self.config.tau_in  # τ_in of the current frame's motion bin (see EngineConfig.bin_tau_in)
        self._frames = 0
        self._since_refresh = 0
        # cost guard: recent dense frame times (ms) and incremental/dense cost ratios, each incremental frame
        # against the dense frames of its own time (the machine's speed drifts), and incremental times that
        # ran before any dense reference existed
        self._dense_ms: collections.deque[float] = collections.deque(maxlen=5)
        self._ratios: collections.deque[float] = collections.deque(maxlen=5)
        self._pending_ms: collections.deque[float] = collections.deque(maxlen=5)
        self._timed_threads = 0  # torch threads the guard's times were taken at (see _time)
        self._since_probe = 0
        self._since_dense = 0  # incremental frames since the last timed dense frame (see _guard)
        self._probe_every = self.config.guard_probe  # current probe interval (backs off, see _guard)
        self._stale = False  # the caches are older than the last frame (a guarded frame skipped the capture)

    # -- public -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, x: torch.Tensor, field: MotionField | None, motion: float | None = None,
             ) -> tuple[Any, StepStats]:
        """Outputs of the body for input ``x`` (1×C×H×W) given the field from this frame to the previous one
        (at the input's resolution; ``None`` = unknown motion → dense). ``motion`` (mean |MV|, engine-input
        px) picks the profile's threshold bin; default: measured on ``field`` (baselines that replace the
        field pass the frame's real motion so every method truncates alike)."""
        t0 = time.perf_counter()
        c0 = _guard_clock()
        self._check(x, field)
        x = x.contiguous(memory_format=torch.channels_last)  # 2–4× faster convolutions on this CPU
        reason = self._dense_reason(field) or self._guard()
        if not reason and self._stale:
            reason = "stale caches"  # the guard turned incremental right after a frame that kept no caches
        if reason:
            timed = reason in ("cost guard", "periodic refresh") or (reason == "scene cut" and self._frames > 1)
            if reason == "cost guard" and self._since_probe + 1 < self._probe_every:
                # the next frame is no probe: plain inference, no cache capture (a guarded frame then costs
                # what dense costs); the frame before a probe captures, so probes find fresh caches
                out, self._stale = self.gm(x), True
            else:
                out, self._stale = self._run_dense(x), False
                # a guarded frame that captures every layer's output (the one before a probe) costs more than
                # plain inference: not the dense time the guard compares against
                timed = timed and reason != "cost guard"
            stats = StepStats(self._frames, True, reason, 1.0, 0.0)
            self._since_refresh = 0
        else:
            assert field is not None and self._x_cache is not None
            m = field_motion(field) if motion is None else motion
            self._prev_tau = {name: self._tau_now(name) for name in self._conv_nodes} if self._tau_set else {}
            self._tau = self.config.thresholds_for(m)
            self._tau_in = self.config.tau_in_for(m)
            self._tau_set = True
            maps, ref = self._input_maps(x, field)
            masks = self._exact_masks(maps) if self.config.mode == "exact" else {}
            try:
                out, layers, first = self._run_incremental(x, maps, masks)  # recomputed positions read the frame
            except BaseException:
                self.reset()  # caches are updated in place: after a failure only a dense frame is safe
                raise
            stats = StepStats(self._frames, False, "", float(maps.residual.mean()), 0.0, layers, first)
            self._since_refresh += 1
            timed = True
            x = ref  # the next frame's residual is measured against what the caches hold
        out = _own(out)
        self._x_cache = x
        self._frames += 1
        stats.ms = (time.perf_counter() - t0) * 1e3
        if self.config.mode == "fast":
            if not stats.dense:  # fast mode's guard: the work done, as a ratio to the crossover
                self._ratios.append(stats.active_fraction / self.config.guard_active)
        elif timed:  # first frames include calibration and warm-up: not a fair dense time
            self._time(stats.dense, (_guard_clock() - c0) * 1e3)
        return out, stats

    def _guard(self) -> str:
        """"cost guard" when this frame should run dense because incremental frames do not pay here.

        The signal is the median of the last 5 incremental frames' cost ratios to dense (a median, so one noisy
        frame does not flip it), with 5 % hysteresis:

        * exact mode: times this engine measured itself (thread CPU time at one torch thread, wall time
          otherwise), each incremental frame against the dense frames around it (:meth:`_time`); the dense
          reference is re-timed every ``guard_probe_max`` frames near parity, so one slow reference cannot keep
          a slower path running. Output is unaffected: a dense frame is exact.
        * fast mode: work, not time — the frame's mean active fraction over ``guard_active`` (the measured
          crossover). Which frames run dense changes every later fast-mode output (a dense frame resets the
          caches and the accumulated truncation), so a timed guard made identical runs differ (retention
          0.990–0.999 on four demo runs); a work signal makes the dense frames, and the outputs, repeat.

        While guarded, frames run plain dense inference (no cache capture, except on the frame before a probe)
        and a probe runs the incremental path again, so a scene that becomes static is picked up. Probes back
        off: the interval starts at ``guard_probe`` frames and doubles after each probe that still does not
        pay, up to ``guard_probe_max``; a probe that pays resets it. Worst case ≈ (p − 1 + r) / p of dense
        time for an incremental cost ratio r and the current interval p."""
        if not self.config.guard:
            return ""
        work = self.config.mode == "fast"  # decided from work (deterministic), see EngineConfig.guard_active
        if len(self._ratios) + len(self._pending_ms) < 3:
            return ""
        if not work and len(self._dense_ms) < 2:
            return "cost guard"  # measure dense before comparing
        self._since_probe += 1
        # 5 % hysteresis: near parity, noise would flip frames to dense for nothing
        ratio = statistics.median(self._ratios)
        if ratio <= 1.05:
            self._since_probe = 0
            self._probe_every = self.config.guard_probe
            self._since_dense += 1
            if not work and self._since_dense > self.config.guard_probe_max and ratio > 0.8:
                self._dense_ms.clear()  # re-time dense: this frame and the next run plain dense inference
                return "cost guard"
            return ""
        if self._since_probe >= self._probe_every:
            self._since_probe = 0
            self._probe_every = min(2 * self._probe_every, self.config.guard_probe_max)
            return ""
        return "cost guard"

    def _time(self, dense: bool, ms: float) -> None:
        """Record a frame's time for the cost guard. An incremental frame is kept as its ratio to the median
        of the last dense frames, so a machine that slows down or speeds up between the two kinds of frames
        (a shared host drifts by 1.5× within a minute) does not flip the decision; incremental frames timed
        before two dense frames exist are converted when they do. Times taken at another thread count (the
        CLI's thread governor follows the load) are dropped: they measure another machine, and another clock."""
        threads = torch.get_num_threads()
        if threads != self._timed_threads:
            self._timed_threads = threads
            self._dense_ms.clear()
            self._ratios.clear()
            self._pending_ms.clear()
        if dense:
            self._since_dense = 0
            self._dense_ms.append(ms)
            if len(self._dense_ms) >= 2 and self._pending_ms:
                ref = statistics.median(self._dense_ms)
                self._ratios.extend(m / ref for m in self._pending_ms)
                self._pending_ms.clear()
        elif len(self._dense_ms) >= 2:
            self._ratios.append(ms / statistics.median(self._dense_ms))
        else:
            self._pending_ms.append(ms)

    # -- checks and decisions ------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, field: MotionField | None) -> None:
        want = (1, self.in_channels, *self.input_hw)
        if tuple(x.shape) != want:
            raise EngineError(f"engine input must be {want}, got {tuple(x.shape)}")
        if field is not None and (field.height, field.width) != self.input_hw:
            raise EngineError(
                f"motion field is {field.width}x{field.height}, engine input is {self.input_hw[1]}x{self.input_hw[0]}"
            )

    def _dense_reason(self, field: MotionField | None) -> str:
        if self._x_cache is None:
            return "first frame"
        if field is None:
            return "no motion field"
        if field.scene_cut or not field.valid.any():
            return "scene cut"
        n = self.config.refresh_every
        if n is not None and self._since_refresh + 1 >= n:
            return "periodic refresh"
        return ""

    def _input_maps(self, x: torch.Tensor, field: MotionField) -> tuple[PixelMaps, torch.Tensor]:
        """The field actually used, the residual set, and the next input cache. Exact mode: every pixel where
        ``x`` differs at all from the block-shifted cached input; the next cache is ``x``. Fast mode:
        whole blocks whose mean difference (max over channels) exceeds τ_in (the seed's per-block residual
        set; per-pixel thresholds would scatter isolated noisy pixels over every tile); blocks the field leaves
        without a vector become zero-motion blocks when the unshifted cache matches them within τ_in (static
        background the codec happened to intra-code), and so do blocks *with* a vector when it matches them
        within ``zero_rescue`` × τ_in (zero-shift rescue: see EngineConfig). The next cache is the *updated
        input* of seed 000 Stage 4: the shifted cache with the residual blocks filled in from ``x`` (the network
        itself reads ``x``, fresh pixels for recomputed positions) — the next frame compares against what the
        caches actually hold, so changes below τ_in accumulate until they count instead of drifting unseen.
        Blocks whose source leaves the frame are residual in both modes."""
        assert self._x_cache is not None
        h, w = self.input_hw
        b = field.block
        cur = x[0].permute(1, 2, 0).numpy()  # H×W×C views of channels-last tensors
        ref = self._x_cache[0].permute(1, 2, 0).numpy()
        if self.config.mode == "fast":
            field = field.copy()  # rescued blocks become valid zero-motion blocks in the copy
            bad = np.zeros(field.shape, np.bool_)
            nc = cur.shape[2]  # rows of interleaved channels (views: both are channels-last)
            cur_rows = np.ascontiguousarray(cur).reshape(h, -1)
            ref_rows = np.ascontiguousarray(ref).reshape(h, -1)
            tau = float(self._tau_in)
            zr = self.config.zero_rescue
            rescue = tau * zr if zr >= 0.0 else -1.0
            # in place only on the engine's own buffer, read as a view (a copy would take the writes)
            if (ref.flags.c_contiguous and any(self._x_cache is u for u in self._upd_bufs)
                    and np.count_nonzero(((field.dy != 0) | (field.dx != 0)) & field.valid) <= field.valid.size // 4):
                # the cache is the engine's own buffer and most blocks stay put: update it in place (only
                # moved and residual blocks are written; see _kernels.block_residual_inplace)
                side = self._side
                if side.size < ref_rows.size:
                    side = self._side = np.empty(ref_rows.size, np.float32)
                _ek.block_residual_inplace(cur_rows, ref_rows, nc, field.dy, field.dx, field.valid, b, tau, bad, side,
                                           rescue)
                return PixelMaps.blocks(field, bad), self._x_cache
            upd = self._input_buffer(x)
            _ek.block_residual(cur_rows, ref_rows, nc, field.dy, field.dx, field.valid, b, tau, bad,
                               upd[0].permute(1, 2, 0).numpy().reshape(h, -1), rescue)
            return PixelMaps.blocks(field, bad), upd
        pix = np.empty((h, w), np.float32)
        _kernels.shifted_diff(cur, ref, field.dy, field.dx, b, pix, np.empty(field.shape, np.float32))
        bad = ~field.source_inside()
        residual = pix > 0
        if bad.any():
            residual |= np.repeat(np.repeat(bad, b, 0), b, 1)[:h, :w]
        return PixelMaps.build(field, residual), x

    def _input_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Where this frame's updated input goes: one of two channels-last buffers, never the one the input
        cache is now (it is read while the other is written). Measured: a fresh tensor per frame costs
        0.02–0.03 ms more (allocation and first touch of 1.3–3.7 MB) — small, but free to avoid."""
        bufs = self._upd_bufs
        if not bufs or bufs[0].shape != x.shape or bufs[0].dtype != x.dtype:
            n, c, h, w = x.shape
            bufs[:] = [torch.empty((n, h, w, c), dtype=x.dtype).permute(0, 3, 1, 2) for _ in range(2)]
        return bufs[1] if self._x_cache is bufs[0] else bufs[0]

    def _tau_now(self, name: str) -> float:
        per, default = self._tau
        return float(per.get(name, default))

    def _pgemm_layer(self, cn: _ConvNode, in_hw: tuple[int, int]) -> _PgemmLayer:
        """The fast pgemm path's tables for one convolution, built once per input size."""
        key = (id(cn.module), *in_hw)
        pg = self._pgemm_layers.get(key)
        if pg is None:
            conv = cn.module
            assert self._plans is not None and isinstance(conv, nn.Conv2d)
            _, plan, _ = self._plans.layer(conv, in_hw, None)
            table, valid = plan.pos_table()
            wt = self._plans.gemm_weight(conv).t().contiguous()
            bias = conv.bias.detach() if conv.bias is not None else None
            pg = self._pgemm_layers[key] = _PgemmLayer(table, _NO_EXTRA if valid is None else valid, wt, bias,
                                                       wt.shape[0])
        return pg

    def _calibrate_pgemm(self, name: str, cn: _ConvNode, x: torch.Tensor, y: torch.Tensor, post: Any,
                         reps: int = 5) -> None:
        """Fast mode's path choice for one convolution: the compiled per-position path (im2col + GEMM + write-
        back) against the stock dense convolution, each timed at the fraction it would run (minimum of
        ``reps``, interleaved; thread CPU time at one thread, so other jobs on a shared machine do not
        decide the path). Measured here: it ranges from 1.5× dense at 20 % of the positions (the 3-channel
        stem: im2col-bound) to 0.6× dense at 100 % (256-channel 9×12 maps, where oneDNN's direct conv is
        slow), so one global crossover would be wrong for most layers."""
        conv = cn.module
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or self._plans is None:
            return
        xrows = _rows_of(x)
        base = y.contiguous(memory_format=torch.channels_last).clone()
        orows = _rows_of(base)
        if xrows is None or orows is None or not xrows.is_contiguous() or xrows.dtype != torch.float32:
            return
        pg = self._pgemm_layer(cn, (int(x.shape[-2]), int(x.shape[-1])))
        act, slope = self._post_act.get(name, (0, 0.0))
        n = orows.shape[0]
        fr = (0.25, 1.0)
        rng = np.random.default_rng(0)
        pos = [np.sort(rng.choice(n, max(1, round(f * n)), replace=False)).astype(np.int64) for f in fr]
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        acc = np.zeros(n, np.float32)
        changed, written = np.zeros(n, np.bool_), np.zeros(n, np.bool_)
        orows_np = orows.numpy()
        td: list[float] = []
        tp: list[list[float]] = [[], []]
        for _ in range(reps):
            t0 = clock()
            _dense(conv, post, x)
            td.append(clock() - t0)
            for i, p in enumerate(pos):
                t0 = clock()
                pg.rows_each(xrows.numpy(), p, None if act else post, lambda yr, q: _ek.finish_rows(
                    yr, q, orows_np, 0.0, acc, True, changed, written, act, slope))
                tp[i].append(clock() - t0)
        m0, m1 = min(tp[0]) * 1e3, min(tp[1]) * 1e3
        b = max(0.0, (m1 - m0) / (fr[1] - fr[0]))
        pg.cost = (max(0.0, m0 - b * fr[0]), b, min(td) * 1e3)
        # what each path pays besides the convolution when only part of the layer recomputes: the dense path
        # tests every position against the (shifted) cache, the pgemm path first moves the cache with the
        # field (one compiled pass over the whole map into a spare when most of it moves, as on a pan: _move)
        yv = _hwc(base)
        if yv is not None:
            hw = yv.shape[:2]
            z = np.zeros(hw, np.int32)
            a0, a1, ob = np.zeros(hw, np.float32), np.empty(hw, np.float32), np.empty(hw, np.bool_)
            src_rows, dst_rows = orows.numpy(), np.empty(tuple(orows.shape), np.float32)
            tc, tm = [], []
            for _ in range(reps):
                t0 = clock()
                _ek.changed_dense_acc(yv, yv, z, z, 0.0, a0, a1, ob)
                tc.append(clock() - t0)
                t0 = clock()
                _ek.gather_shift(src_rows, z, z, dst_rows)
                tm.append(clock() - t0)
            pg.test_ms, pg.move_ms = min(tc) * 1e3, min(tm) * 1e3

    # -- execution -----------------------------------------------------------------------------------------
    def _runner(self, maps: PixelMaps | None) -> _Runner:
        """One interpreter per engine, re-armed per frame (building an ``fx.Interpreter`` walks every
        submodule, ~0.5 ms)."""
        r = self._runner_obj
        if r is None:
            r = self._runner_obj = _Runner(self)
        r.arm(maps)
        return r

    def _run_dense(self, x: torch.Tensor) -> Any:
        if self.config.calibrate and len(self._calibrated) < len(self._conv_nodes):
            runner = self._runner(None)  # the interpreter calibrates each layer's executor on the way
            out = runner.run(x)
            self._caches = runner.new_caches
            self._acc, self._rem = {}, {}
            self._store_calibration()
            return out
        self._acc, self._rem = {}, {}  # every cache is exact (and aligned) again
        if self._capture is None:
            self._capture = _capture_module(self.gm, [*self._conv_nodes, *self._row_ops], self._fused_into)
        out, caches = self._capture(x)
        self._caches = dict(caches)
        for name in self._row_ops:
            self._caches[name] = _row_cache(self._caches[name])
        return out

    def _exact_masks(self, maps: PixelMaps) -> dict[tuple[Any, ...], Any]:
        """Exact mode: the strict RFAP mask of every convolution geometry (~30 µs each), computed up front."""
        masks: dict[tuple[Any, ...], Any] = {}
        for name in self._conv_nodes:
            g = self.info.geoms[name]
            shape = self.info.shapes.get(name)
            if shape is None:
                continue
            hw = (int(shape[-2]), int(shape[-1]))
            key = (*g.key(), *hw)
            if key not in masks:
                ok, sy, sx = reuse_mask(maps, g, hw)
                masks[key] = (ok, sy, sx, _Moves(sy, sx, ok))
        return masks

    def _run_incremental(self, x: torch.Tensor, maps: PixelMaps, masks: dict[tuple[Any, ...], Any] | None = None,
                         ) -> tuple[Any, list[LayerStats], np.ndarray | None]:
        runner = self._runner(maps)
        if masks:
            runner._masks.update(masks)
        out = runner.run(x)
        self._recycle(self._caches, runner.new_caches)
        self._caches = runner.new_caches
        self._acc = runner.new_acc
        self._rem = runner.new_rem
        return out, runner.layer_stats, runner.first_recompute

    def _recycle(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """Keep the caches this frame replaced as spares for the next moves — only tensors whose memory no
        live cache uses (a node may alias another's output) and only one per memory block."""
        taken = {t.untyped_storage().data_ptr() for t in new.values()}
        taken.update(t.untyped_storage().data_ptr() for t in self._spare.values())
        for name, t in old.items():
            if new.get(name) is t:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in taken:
                taken.add(ptr)
                self._spare[name] = t


@dataclass(frozen=True)
class _ConvNode:
    """What a convolution node needs per frame, resolved once (module lookups cost ~50 µs each)."""

    module: nn.Module
    src: str
    first: bool
    S: int
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]


def _capture_module(gm: fx.GraphModule, convs: list[str], fused_into: dict[str, fx.Node]) -> fx.GraphModule:
    """The traced body as generated code that also returns the cache value of every convolution (its output,
    after the activation fused into it) and row op: dense frames leave a full set of caches at the cost of
    plain inference, with none of the interpreter's per-node overhead (~1–2 ms per NanoDet frame)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    act_of = {conv.name: name for name, conv in fused_into.items()}
    out_args: Any = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out_args = fx.map_arg(node.args[0], lambda n: env[n])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    cached = {c: by_name[act_of.get(c, c)] for c in convs}
    graph.output((out_args, cached))
    return fx.GraphModule(gm, graph)


def _conv_nodes(gm: fx.GraphModule, info: GraphInfo) -> dict[str, _ConvNode]:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.name in info.convs:
            src = tensor_args(n)[0]
            _, k, s, p, d = info.ops[n.name]
            out[n.name] = _ConvNode(gm.get_submodule(str(n.target)), src.name, info.ops.get(src.name) == ("input",),
                                    info.geoms[n.name].S, k, s, p, d)
    return out


@dataclass(frozen=True)
class _RowOp:
    """A non-conv node the fast-mode runner computes only where its inputs were written (see
    :meth:`_Runner._row_op`): pointwise / channel ops on gathered rows, pooling through :func:`sparse_pool2d`."""

    spatial: tuple[str, ...]  # tensor inputs with the output's spatial size (gathered per position)
    S: int
    hw: tuple[int, int]
    pool: nn.Module | None = None
    window: tuple[Any, ...] = ()
    cat: tuple[tuple[str, int], ...] = ()  # channel concat: (input, first output channel) per input
    # above this written fraction the dense op is cheaper: gathering rows from every input, computing and
    # scattering them costs ~3 passes over the positions against one pass over the map
    dense_above: float = 0.35


# ops that compute a fresh tensor position by position and channel-locally; pass-through ops (Identity,
# .contiguous(), .to(), clone, dropout) alias or copy their input and stay as they are
_ROW_METHODS = {"relu", "sigmoid", "tanh", "clamp", "add", "mul", "sub", "div", "neg", "exp", "abs"}
_ROW_FUNCS = (_POINTWISE_FUNCS - {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}) | {
    torch.cat, torch.concat}
_ROW_MODULES = tuple(m for m in _POINTWISE_MODULES if m not in (nn.Identity, nn.Dropout))


def _row_ops(gm: fx.GraphModule, info: GraphInfo, fused_into: dict[str, fx.Node],
             input_hw: tuple[int, ...]) -> dict[str, _RowOp]:
    """Nodes fast mode can update by rows. In-place ops (they would modify an upstream cache in dense
    inference), spatial concat / indexing, broadcasting along one spatial axis and unknown ops are left dense."""
    out: dict[str, _RowOp] = {}
    convs = set(info.convs)
    for n in gm.graph.nodes:
        op = info.ops.get(n.name)
        shape = info.shapes.get(n.name)
        if (op is None or n.name in convs or n.name in fused_into or shape is None or len(shape) != 4
                or n.kwargs.get("inplace") is True or any(a is True for a in n.args[1:])):
            continue
        hw = (int(shape[-2]), int(shape[-1]))
        S = _stride_of(input_hw, hw)
        if not S:
            continue
        if op[0] == "window":
            pool = _pool_module(gm, n)
            if pool is not None:
                out[n.name] = _RowOp((tensor_args(n)[0].name,), S, hw, pool, op[1:], 0.5)
            continue
        if op[0] != "pointwise":
            continue
        if n.op == "call_function":
            ok = n.target in _ROW_FUNCS
            if ok and n.target in (torch.cat, torch.concat):
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                ok = dim in (1, -3)
        elif n.op == "call_method":
            ok = n.target in _ROW_METHODS
        elif n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            ok = isinstance(m, _ROW_MODULES) and not getattr(m, "inplace", False)
        else:
            ok = False
        spatial = []
        for a in n.all_input_nodes:
            sa = info.shapes.get(a.name)
            if sa is None:
                ok = False
            elif len(sa) == 4 and tuple(sa[-2:]) == hw:
                spatial.append(a.name)
            elif len(sa) >= 2 and tuple(sa[-2:]) != (1, 1):
                ok = False  # broadcasting along one spatial axis: not expressible on a column of positions
        if ok and spatial:
            cat: tuple[tuple[str, int], ...] = ()
            if n.target in (torch.cat, torch.concat) and isinstance(n.args[0], (list, tuple)) \
                    and all(isinstance(a, fx.Node) and a.name in spatial for a in n.args[0]):
                offs = np.cumsum([0] + [int(info.shapes[a.name][1]) for a in n.args[0]])
                cat = tuple((a.name, int(o)) for a, o in zip(n.args[0], offs[:-1], strict=True))
            out[n.name] = _RowOp(tuple(spatial), S, hw, cat=cat)
    return out


def _pool_module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """An ``nn.MaxPool2d`` / ``nn.AvgPool2d`` equal to the pooling node, or None when it needs something
    :func:`sparse_pool2d` does not do (indices, ceil mode, a divisor override, padding excluded from averages)."""
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        return _pool_module_check(m) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) else None
    if n.op != "call_function" or n.target not in (F.max_pool2d, F.avg_pool2d):
        return None
    is_max = n.target is F.max_pool2d
    names = (["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"] if is_max
             else ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"])
    kw = dict(zip(names, n.args[1:], strict=False))
    kw.update(n.kwargs)
    if any(isinstance(v, fx.Node) for v in kw.values()):
        return None
    if kw.get("stride") in (None, [], ()):
        kw.pop("stride", None)
    try:
        m = nn.MaxPool2d(**kw) if is_max else nn.AvgPool2d(**kw)
    except TypeError:
        return None
    return _pool_module_check(m)


def _pool_module_check(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.MaxPool2d):
        return None if m.ceil_mode or m.return_indices else m
    assert isinstance(m, nn.AvgPool2d)
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    return None if m.ceil_mode or m.divisor_override is not None or (pad and not m.count_include_pad) else m


def _rows_of(t: torch.Tensor) -> torch.Tensor | None:
    """(H·W, C) view of a (1, C, H, W) tensor whose positions are rows (channels_last, or a channel slice of
    one), or None."""
    if t.dim() != 4 or t.shape[0] != 1:
        return None
    return _rows(t)


def _np_rows(t: torch.Tensor) -> np.ndarray | None:
    """Contiguous float32 (H·W, C) numpy view of a (1, C, H, W) channels-last tensor, or None."""
    if t.dim() != 4 or t.shape[0] != 1 or t.dtype != torch.float32 \
            or not t.is_contiguous(memory_format=torch.channels_last):
        return None
    a = t.numpy().transpose(0, 2, 3, 1)
    return a.reshape(-1, a.shape[3]) if a.flags.c_contiguous else None


def _row_cache(t: torch.Tensor) -> torch.Tensor:
    """A row op's cache in a layout whose positions are rows (copied once if the op produced NCHW)."""
    return t if _rows_of(t) is not None and t.is_contiguous(memory_format=torch.channels_last) \
        else t.contiguous(memory_format=torch.channels_last)


class _Runner(fx.Interpreter):
    """Executes the traced body. Exact mode: convolutions go through the cache with strict RFAP masks.
    Fast mode: every node also propagates a *change mask* (positions whose value differs from the motion-
    shifted cache; numpy bool), convolutions recompute the window-dilation of their input's mask and truncate.

    Caches are updated in place (moved rows, then recomputed tiles): ``Engine.step`` hands out copies of the
    outputs, so nothing outside the engine aliases a cache."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.gm)
        self.engine = engine
        self._convs = engine._conv_nodes
        self._args = {n.name: [a.name for a in tensor_args(n)] for n in engine.gm.graph.nodes}
        self._inputs = {n.name: {a.name: a for a in n.all_input_nodes} for n in engine.gm.graph.nodes}
        # the node order with the values each node is the last user of (freed right after it runs)
        self._order = [(n, tuple(self.user_to_last_uses.get(n, ()))) for n in engine.gm.graph.nodes]
        self.arm(None)

    def run(self, *args: Any, **_: Any) -> Any:  # type: ignore[override]
        """``fx.Interpreter.run`` without its per-node progress bar, debug logging and metadata context
        (~15 µs per node, ~1.5 ms per NanoDet frame measured — a tenth of a sparse frame's time)."""
        graph = self.graph
        self.env = env = {}
        self.args_iter = iter(graph.process_inputs(*args))
        for node, dead in self._order:
            try:
                env[node] = self.run_node(node)
            except Exception as e:
                e.add_note(f"(while the engine ran node {node.format_node()})")
                raise
            for d in dead:
                del env[d]
            if node.op == "output":
                return graph.process_outputs(env[node])
        raise EngineError("traced body has no output node")

    def _plain(self, n: fx.Node) -> Any:
        """One node as the stock interpreter would run it (without its debug context)."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return getattr(self, n.op)(n.target, args, kwargs)

    def arm(self, maps: PixelMaps | None) -> None:
        """Per-frame state: the input maps (None = dense frame) and fresh caches, masks and stats."""
        self.maps = maps
        self.fast = maps is not None and self.engine.config.mode == "fast"
        self.new_caches: dict[str, torch.Tensor] = {}
        self.layer_stats: list[LayerStats] = []
        self.changed: dict[str, np.ndarray] = {}
        # fast mode: positions whose value may differ from the node's motion-shifted cache (every recomputed
        # position, below τ^l or not); row ops recompute exactly these, so they stay exact w.r.t. their inputs
        self.written: dict[str, np.ndarray] = {}
        self.new_acc: dict[str, np.ndarray] = {}
        self.new_rem: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[tuple[Any, ...], Any] = {}
        self.first_recompute: np.ndarray | None = None

    def run_node(self, n: fx.Node) -> Any:
        cn = self._convs.get(n.name)
        if cn is not None:
            return self._conv(n, cn, self.env[n.args[0]])  # type: ignore[index]
        conv_node = self.engine._fused_into.get(n.name)
        if conv_node is not None:  # this activation was applied by the convolution it follows (fused)
            if self.fast and conv_node.name in self.changed:
                self.changed[n.name] = self.changed[conv_node.name]
                self.written[n.name] = self.written[conv_node.name]
            return self.env[conv_node]
        if not self.fast:
            return self._plain(n)
        ro = self.engine._row_ops.get(n.name)
        out = self._row_op(n, ro) if ro is not None else None
        if out is None:
            out = self._plain(n)
            self._propagate(n, out, self.written, written=True)
            if ro is not None:  # ran dense (too much changed, or a cache that is not row-addressable)
                self.new_caches[n.name] = _row_cache(out)
        self._propagate(n, out, self.changed)
        return out

    # -- fast mode: row ops (pointwise / channel ops and pooling on the positions that changed) -------------
    def _row_op(self, n: fx.Node, ro: _RowOp) -> torch.Tensor | None:
        """The node's cached output, moved with the field, recomputed only at the positions where an input was
        written (pointwise ops) or whose window touches one (pooling). None = run the node densely instead."""
        eng = self.engine
        cache = eng._caches.get(n.name)
        srcs = self._args[n.name]
        if cache is None or any(a not in self.written for a in ro.spatial):
            return None
        notok, sy, sx, moves = self._shift_map(ro.S, ro.hw)
        ho, wo = ro.hw
        if ro.pool is None:
            w = notok.copy()
            for a in ro.spatial:
                np.logical_or(w, self.written[a], out=w)
            count = int(np.count_nonzero(w))
        else:
            w = np.empty((ho, wo), np.bool_)
            k, s_, p, d = ro.window
            count = _ek.window_any(self.written[srcs[0]], k[0], k[1], s_[0], s_[1], p[0], p[1], d[0], d[1], notok,
                                   w, 1, 1, _NO_EXTRA)
        if count > ro.dense_above * ho * wo:
            return None
        base = _move(cache, sy, sx, moves, eng._spare, n.name)
        self.written[n.name] = w
        self.new_caches[n.name] = base
        if count == 0:
            return base
        # float32 (H·W, C) numpy views, remembered per tensor (the same caches recur every frame): a torch row
        # view costs ~10 µs each, several per row op
        on = self._memo_rows(("row", n.name), base)
        if on is None:  # not a float32 channels-last map: run the node densely
            return None
        if ro.pool is not None:
            x = self.env[n.args[0]]  # type: ignore[index]
            xrows = self._memo_rows(("pool", n.name), x)
            if xrows is None:
                return None
            k, s_, p, d = ro.window
            hi, wi = x.shape[-2:]
            _ek.pool_rows(xrows, hi, wi, np.flatnonzero(w), wo, k[0], k[1], s_[0], s_[1], p[0], p[1],
                          d[0], d[1], isinstance(ro.pool, nn.MaxPool2d), on)
            return base
        pos = np.flatnonzero(w)
        if ro.cat:  # each input's rows straight into its channel slot
            ins = self._inputs[n.name]
            for name, col in ro.cat:
                r = self._memo_rows(("cat", n.name, name), self.env[ins[name]])
                if r is None:
                    return None
                _ek.cat_rows(r, pos, on, col)
            return base
        sub: dict[fx.Node, Any] = {}
        for a in n.all_input_nodes:
            v = self.env[a]
            if a.name in ro.spatial:
                r = _rows_of(v)
                if r is None or r.dtype != torch.float32:
                    return None
                buf = torch.empty((len(pos), r.shape[1]), dtype=r.dtype)
                _ek.take_rows(r.numpy(), pos, buf.numpy(), 0)
                # (1, C, P, 1) in channels_last: positions as a column, so pointwise ops and the scatter stay dense
                sub[a] = buf.view(1, -1, 1, r.shape[1]).permute(0, 3, 1, 2)
            else:
                sub[a] = v
        args = fx.map_arg(n.args, lambda m: sub[m])
        kwargs = fx.map_arg(n.kwargs, lambda m: sub[m])
        r_out = getattr(self, n.op)(n.target, args, kwargs)
        yr = r_out.permute(0, 2, 3, 1).reshape(-1, r_out.shape[1])
        _ek.put_rows(yr.numpy() if yr.dtype == torch.float32 else yr.to(torch.float32).numpy(), pos, on)
        return base

    # -- exact + fast convolution ------------------------------------------------------------------------
    def _conv(self, n: fx.Node, cn: _ConvNode, x: torch.Tensor) -> torch.Tensor:
        eng = self.engine
        conv = cn.module
        cache = eng._caches.get(n.name)
        post = eng._post.get(n.name)
        if self.maps is None or cache is None:
            y = _dense(conv, post, x)
            self.new_caches[n.name] = y
            plans = eng._plans
            if eng.config.calibrate and plans is not None and n.name not in eng._calibrated:
                # per-layer cost model at this machine's thread count, for the executor's path choice
                plans.calibrate(x, conv, tile=self._tile(cn, tuple(y.shape[-2:])), post=post)
                if eng.config.mode == "fast":
                    eng._calibrate_pgemm(n.name, cn, x, y, post)
                eng._calibrated.add(n.name)
            return y
        t0 = time.perf_counter()
        ho, wo = cache.shape[-2:]
        tile = self._tile(cn, (ho, wo))
        th, tw = min(tile, ho), min(tile, wo)
        # fast mode: the measured compiled-path model (Engine._calibrate_pgemm), when calibrated; it picks
        # pgemm or dense, so no tile selection is needed then
        pg = eng._pgemm_layers.get((id(conv), int(x.shape[-2]), int(x.shape[-1]))) if self.fast else None
        modelled = pg is not None and pg.cost is not None and eng.config.layout == "auto"
        tiles = _NO_TILES if modelled else np.zeros((-(-ho // th), -(-wo // tw)), np.bool_)
        rec = np.empty((ho, wo), np.bool_)
        pos_buf = None
        if not self.fast or (cn.first and eng.config.rfap):
            ok, sy, sx, moves = self._strict(n.name, (ho, wo))  # exact mode, or the first conv in fast mode
            if not self.fast and self._dense_anyway(cn, x, moves.active(), tile):
                # lossy video often leaves a residual in most receptive fields: when even the optimistic
                # fraction (tiles no coarser than positions) is past the layer's crossover, skip the bookkeeping
                y = _dense(conv, post, x)
                self.new_caches[n.name] = y
                f = moves.active()
                self.layer_stats.append(LayerStats(n.name, 1.0 - f, f, (time.perf_counter() - t0) * 1e3, "dense"))
                if self.first_recompute is None:
                    self.first_recompute = ~ok
                return y
            np.logical_not(ok, out=rec)
            count = _ek.mask_tiles(rec, th, tw, tiles) if tiles.size else int(np.count_nonzero(rec))
        else:
            notok, sy, sx, moves = self._shift_map(cn.S, (ho, wo))
            pos_buf = np.empty(ho * wo, np.int64)
            count = _ek.window_positions(self.changed[cn.src], cn.k[0], cn.k[1], cn.s[0], cn.s[1], cn.p[0],
                                         cn.p[1], cn.d[0], cn.d[1], notok, rec, th, tw, tiles, pos_buf)
        active_fraction = count / (ho * wo)
        if self.first_recompute is None:
            self.first_recompute = rec
        tile_fraction = 1.0
        pg_path = pg.choose(active_fraction, moves.moved_fraction(), partial=True) if modelled else None
        if count == 0 and self.fast:  # nothing reaches this layer: its cache, moved, is its output
            y, path = _move(cache, sy, sx, moves, eng._spare, n.name), "skip"
            self.changed[n.name] = np.zeros((ho, wo), np.bool_)
            self.written[n.name] = np.zeros((ho, wo), np.bool_)
            if eng.config.accumulate:
                self._acc_moved(n.name, moves, (ho, wo))
            tile_fraction = 0.0
        elif self.fast and count >= eng.config.full_above * ho * wo:
            # (almost) everything recomputes: run the layer whole and let everything propagate — no cache move,
            # no change test, and the next layers see "all changed" and run whole too (conservative)
            y, path = None, "dense"
            if pg is not None and pg.choose(1.0) == "pgemm":
                y, path = self._pgemm_all(pg, x, (ho, wo), post), "pgemm"
            if y is None:
                y, path = _dense(conv, post, x), "dense"
            self.changed[n.name] = self.written[n.name] = np.ones((ho, wo), np.bool_)
            active_fraction = 1.0
        elif count == ho * wo and pg_path != "pgemm":
            y, path = _dense(conv, post, x), "dense"
            if self.fast:
                self.changed[n.name] = self.written[n.name] = np.ones((ho, wo), np.bool_)
        else:
            layout = eng.config.layout
            positions = pos_buf[:count] if pos_buf is not None else np.flatnonzero(rec)
            if pg_path is not None:
                layout = pg_path
            elif eng._sparse is not None and layout == "auto":
                layout = choose_path(x, conv, tiles, positions, tile=tile, plan_cache=eng._plans)
                layout = "auto" if layout == "skip" else layout
            if layout == "dense":  # decided before moving the cache: a dense layer never reads it
                y, path = _dense(conv, post, x), "dense"
                if self.fast:
                    self.changed[n.name] = self._changed_dense(n.name, y, cache, sy, sx, moves)
                    self.written[n.name] = np.ones((ho, wo), np.bool_)
            elif eng._sparse is not None:
                base = _move(cache, sy, sx, moves, eng._spare, n.name)
                if layout in ("gemm", "pgemm") and getattr(conv, "groups", 1) != 1:
                    layout = "batch"  # GEMM paths need groups == 1
                y = None
                if layout == "pgemm" and self.fast:
                    y = self._pgemm(n.name, cn, x, base, positions, moves, post)
                    path, tile_fraction = "pgemm", active_fraction
                if y is None:
                    if not tiles.size:  # the compiled path declined (layout): the executor needs tiles
                        tiles = np.zeros((-(-ho // th), -(-wo // tw)), np.bool_)
                        _ek.mask_tiles(rec, th, tw, tiles)
                    y, st = eng._sparse(x, conv, base, None, plan_cache=eng._plans, tile=tile, post=post,
                                        tiles=tiles, track=self.fast, positions=positions, layout=layout)
                    path = st.path
                    tile_fraction = st.fraction if path != "dense" else 1.0
                    if self.fast:
                        self.changed[n.name] = self._truncate(n.name, y, base, st, moves)
                        self.written[n.name] = _written(st, (ho, wo))
            else:
                base = _move(cache, sy, sx, moves, eng._spare, n.name)
                y = torch.where(torch.from_numpy(rec), _dense(conv, post, x), base)
                path = "dense+select"
                if self.fast:
                    self.changed[n.name] = self._truncate(n.name, y, base, None, moves)
                    self.written[n.name] = rec.copy()
        if self.fast and eng.config.accumulate and n.name in self.new_acc:
            self._sweep(n.name)
        self.new_caches[n.name] = y
        self.layer_stats.append(
            LayerStats(n.name, 1.0 - active_fraction, active_fraction, (time.perf_counter() - t0) * 1e3, path,
                       tile_fraction)
        )
        return y

    def _memo_rows(self, key: tuple[str, ...], t: torch.Tensor) -> np.ndarray | None:
        """:func:`_np_rows` of ``t``, remembered per (role, node): caches are updated in place, so most layers and
        row ops see the very same input and output tensors every frame (the view costs ~5 µs, twice per conv).
        An entry keeps its tensor alive, so a remembered view can never outlive its memory."""
        memo = self.engine._rows_memo
        hit = memo.get(key)
        if hit is not None and hit[0] is t:
            return hit[1]
        rows = _np_rows(t)
        memo[key] = (t, rows)
        return rows

    def _pgemm(self, name: str, cn: _ConvNode, x: torch.Tensor, base: torch.Tensor, positions: np.ndarray,
               moves: Any, post: Any) -> torch.Tensor | None:
        """Fast mode's per-position path without the generic executor's bookkeeping: im2col of exactly the
        recomputed positions, one GEMM, then activation, write-back, truncation test and written mask in one
        compiled pass (the generic path spends ~0.2 ms of Python per layer around the same GEMM; rows are
        addressed as numpy views, ~4× cheaper than torch view ops at this size).
        None = not applicable here (layout or dtype); the caller takes the generic path."""
        xrows, orows = self._memo_rows(("in", name), x), self._memo_rows(("out", name), base)
        if xrows is None or orows is None:
            return None
        eng = self.engine
        pg = eng._pgemm_layer(cn, (int(x.shape[-2]), int(x.shape[-1])))
        n = orows.shape[0]
        act, slope = eng._post_act.get(name, _NO_ACT)
        changed = np.zeros(n, np.bool_)
        written = np.zeros(n, np.bool_)
        ho, wo = base.shape[-2:]
        accumulate = eng.config.accumulate
        acc = self._acc_moved(name, moves, (ho, wo)).reshape(-1) if accumulate else _NO_ACC
        tau = self._tau_of(name)

        def finish(yr: np.ndarray, pos: np.ndarray) -> None:  # each chunk's write-back while it is in cache
            _ek.finish_rows(yr, pos, orows, tau, acc, accumulate, changed, written, act, slope)

        pg.rows_each(xrows, positions, None if act else post, finish)
        self.changed[name] = changed.reshape(ho, wo)
        self.written[name] = written.reshape(ho, wo)
        return base

    @staticmethod
    def _pgemm_all(pg: _PgemmLayer, x: torch.Tensor, hw: tuple[int, int], post: Any) -> torch.Tensor | None:
        """The whole layer through the compiled per-position path (cheaper than oneDNN's direct conv on some
        small deep maps), as a channels-last tensor; None when the input is not row-addressable."""
        xrows = _rows_of(x)
        if xrows is None or not xrows.is_contiguous() or xrows.dtype != torch.float32:
            return None
        yr = pg.rows(xrows, np.arange(hw[0] * hw[1], dtype=np.int64), post).contiguous()
        return yr.view(1, hw[0], hw[1], -1).permute(0, 3, 1, 2)

    def _dense_anyway(self, cn: _ConvNode, x: torch.Tensor, f: float, tile: int) -> bool:
        eng = self.engine
        if eng._plans is None or eng.config.layout != "auto" or not isinstance(cn.module, nn.Conv2d):
            return False
        lc = eng._plans.layer(cn.module, (int(x.shape[-2]), int(x.shape[-1])), tile)[2]
        return lc.choose(f, f) == "dense"

    def _truncate(self, name: str, y: torch.Tensor, base: torch.Tensor, st: Any, moves: Any = None) -> np.ndarray:
        """Fast mode: positions whose recomputed value moved by more than τ^l (max over channels) from the
        shifted cache — only these propagate (seed 000 Eq. 2–4). With ``accumulate``, the change is added to
        what the position carried since it last propagated."""
        tau = self._tau_of(name)
        ho, wo = y.shape[-2:]
        acc = self._acc_moved(name, moves, (ho, wo)) if self.engine.config.accumulate else None
        if st is not None and st.path == "skip":
            return np.zeros((ho, wo), np.bool_)
        if st is not None and st.rows is not None:
            changed = np.zeros(ho * wo, np.bool_)
            rows, delta = st.rows.numpy(), st.delta.numpy()  # numpy: ~3× cheaper than torch ops at these sizes
            if acc is None:
                changed[rows[delta > tau]] = True
            else:
                _ek.accumulate_rows(rows, delta, tau, acc.reshape(-1), changed)
            return changed.reshape(ho, wo)
        d = (y - base).abs().amax(1)[0].numpy()
        if acc is None:
            return d > tau
        acc += d
        changed = acc > tau
        acc[changed] = 0.0
        return changed

    def _sweep(self, name: str) -> None:
        """When this frame's τ^l is tighter than the last frame's (the motion bin changed), what positions
        carry above the new τ^l propagates now, recomputed or not: otherwise caches left within a loose bin's
        tolerance would stay that stale under the tight bin until something else touched them."""
        tau = self._tau_of(name)
        prev = self.engine._prev_tau.get(name)
        if prev is None or tau >= prev:
            return
        acc = self.new_acc[name]
        over = acc > tau
        if over.any():
            changed = self.changed[name]
            self.changed[name] = changed | over.reshape(changed.shape)
            acc[over] = 0.0

    def _acc_moved(self, name: str, moves: Any, hw: tuple[int, int]) -> np.ndarray:
        """This layer's accumulated change, moved with its cache (zeros after a dense frame)."""
        acc = self.engine._acc.get(name)
        if acc is None or acc.shape != hw:
            acc = np.zeros(hw, np.float32)
        elif moves is not None and 2 * moves.moved_fraction() >= 1.0:
            moved = np.empty_like(acc)
            _ek.gather_shift(acc.reshape(-1, 1), moves.sy, moves.sx, moved.reshape(-1, 1))
            acc = moved
        elif moves is not None and (r := moves.rows()) is not None:
            flat = acc.reshape(-1)
            flat[r[0].numpy()] = flat[r[1].numpy()]
        self.new_acc[name] = acc
        return acc

    def _tau_of(self, name: str) -> float:
        per, default = self.engine._tau
        return float(per.get(name, default))

    def _changed_dense(self, name: str, y: torch.Tensor, cache: torch.Tensor, sy: np.ndarray, sx: np.ndarray,
                       moves: Any) -> np.ndarray:
        """:meth:`_truncate` for a layer that ran dense, reading the old cache at its shifted positions instead
        of moving it (``y`` becomes the new cache; nothing else needs the moved one)."""
        views = [_hwc(t) for t in (y, cache)]
        if views[0] is None or views[1] is None:
            return self._truncate(name, y, _move(cache, sy, sx, moves), None, moves)
        out = np.empty(views[0].shape[:2], np.bool_)
        if not self.engine.config.accumulate:
            _ek.changed_dense(views[0], views[1], sy, sx, self._tau_of(name), out)
            return out
        old = self.engine._acc.get(name)
        if old is None or old.shape != out.shape:
            old = np.zeros(out.shape, np.float32)
        new = self.new_acc[name] = np.empty(out.shape, np.float32)
        _ek.changed_dense_acc(views[0], views[1], sy, sx, self._tau_of(name), old, new, out)
        return out

    def _tile(self, cn: _ConvNode, hw: tuple[int, int]) -> int:
        """Tiles the size of one motion block at this layer's resolution (at least 2 px): recompute sets follow
        the block grid, so larger tiles would mostly recompute positions that did not need it."""
        t = self.engine.config.tile
        if t:
            return t
        if t == 0:
            from fluxshard.engine.sparse import default_tile

            return default_tile(hw)
        block = self.maps.block if self.maps is not None else 16
        return max(2, block // cn.S)

    def _strict(self, name: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        assert self.maps is not None
        g = self.engine.info.geoms[name]
        if self.fast:  # first conv: equivariance of this layer alone
            g = type(g)(g.S, g.S, g.lo_y, g.hi_y, g.lo_x, g.hi_x, g.barrier)
        key = (*g.key(), *hw)
        if key not in self._masks:
            ok, sy, sx = reuse_mask(self.maps, g, hw)
            self._masks[key] = (ok, sy, sx, _Moves(sy, sx, ok))
        return self._masks[key]

    def _shift_map(self, S: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """Fast mode: one displacement per shard at this resolution, rounded to whole feature pixels; returns
        (not reusable, sy, sx, moved rows)."""
        key = ("shift", S, *hw)
        if key not in self._masks:
            assert self.maps is not None
            f = self.maps.field
            notok = np.empty(hw, np.bool_)
            sy = np.empty(hw, np.int32)
            sx = np.empty(hw, np.int32)
            carry = self.engine.config.carry_tolerance
            if carry > 0:
                moved = self._shift_carry(S, hw, carry * S, notok, sy, sx)
            else:
                moved = _ek.shift_map(f.dy, f.dx, f.valid, self.maps.block, self.maps.height, self.maps.width, S,
                                      self.engine.config.shift_tolerance, notok, sy, sx)
            self._masks[key] = (notok, sy, sx, _Moves(sy, sx, moved=moved))
        return self._masks[key]

    def _shift_carry(self, S: int, hw: tuple[int, int], tol: float, notok: np.ndarray, sy: np.ndarray,
                     sx: np.ndarray) -> int:
        """Shifts with carried remainders at stride ``S`` (see ``EngineConfig.carry_tolerance``): reads the
        offsets the caches at this stride carried from the last frame, stores this frame's in ``new_rem``.
        Recomputed positions restart from the offset of the nearest finer stride already shifted this frame
        (the layer that recomputes them reads that resolution), else 0."""
        assert self.maps is not None
        f = self.maps.field
        old = self.engine._rem.get((S, *hw))
        ey0, ex0 = old if old is not None else (np.zeros(hw, np.int32),) * 2
        finer = [k for k in self.new_rem if k[0] < S]
        fs, fine_y, fine_x = 0, _NO_REM, _NO_REM
        if finer:
            k = max(finer)
            fs, (fine_y, fine_x) = k[0], self.new_rem[k]
        ey = np.empty(hw, np.int32)
        ex = np.empty(hw, np.int32)
        moved = _ek.shift_map_carry(f.dy, f.dx, f.valid, self.maps.block, self.maps.height, self.maps.width, S,
                                    float(tol), ey0, ex0, fine_y, fine_x, fs, notok, sy, sx, ey, ex)
        self.new_rem[(S, *hw)] = (ey, ex)
        return moved

    # -- fast mode: change masks through non-conv nodes -------------------------------------------------
    def _propagate(self, n: fx.Node, out: Any, masks: dict[str, np.ndarray], written: bool = False) -> None:
        """Masks through a non-conv node that ran densely: ``changed`` (above-threshold changes, what the next
        convolution dilates) or, with ``written``, the positions whose value may differ from the node's shifted
        cache (conservative: positions whose shift is unusable at this resolution, and everything after a
        barrier)."""
        op = self.engine.info.ops.get(n.name)
        if op is None:
            return
        if op[0] == "input":
            assert self.maps is not None
            # the network reads the fresh frame everywhere: only convolutions may use the residual set
            masks[n.name] = np.ones(self.maps.residual.shape, np.bool_) if written else self.maps.residual
            return
        ins = [masks[a] for a in self._args[n.name] if a in masks]
        shape = self.engine.info.shapes.get(n.name)
        if not ins or shape is None or len(shape) != 4:
            if ins:
                acc = ins[0]
                for m in ins[1:]:
                    if m.shape == acc.shape:
                        acc = acc | m
                masks[n.name] = acc
            return
        hw = (int(shape[-2]), int(shape[-1]))
        if op[0] == "window":
            m = _window(ins[0], op[1], op[2], op[3], op[4], hw)
        elif op[0] == "resample":
            m = ins[0]
            if op[1] != "nearest":
                m = _window(m, (3, 3), (1, 1), (1, 1), (1, 1), m.shape)
            h, w = m.shape
            iy = np.minimum(np.arange(hw[0]) * h // hw[0], h - 1)
            ix = np.minimum(np.arange(hw[1]) * w // hw[1], w - 1)
            m = m[iy][:, ix]
        elif op[0] == "pointwise" and all(m.shape == hw for m in ins):
            m = ins[0]
            for x in ins[1:]:
                m = m | x
            if not written:
                masks[n.name] = m
                return
        else:  # barrier, or broadcasting across space: anything changed anywhere changes everything
            masks[n.name] = np.full(hw, written or any(bool(m.any()) for m in ins), np.bool_)
            return
        if written:
            S = _stride_of(self.engine.input_hw, hw)
            m = m | self._shift_map(S, hw)[0] if S else np.ones(hw, np.bool_)
        masks[n.name] = m


def _written(st: Any, hw: tuple[int, int]) -> np.ndarray:
    """Positions a sparse call wrote (whole tiles for the tile layouts, exactly the positions for pgemm)."""
    if st.path == "dense":
        return np.ones(hw, np.bool_)
    m = np.zeros(hw[0] * hw[1], np.bool_)
    if st.rows is not None:
        m[st.rows.numpy()] = True
    return m.reshape(hw)


def _stride_of(input_hw: tuple[int, ...], hw: tuple[int, int]) -> int:
    """The resolution stride of a feature map of size ``hw`` (0 when it does not divide the input evenly)."""
    sy, ry = divmod(int(input_hw[0]), hw[0])
    sx, rx = divmod(int(input_hw[1]), hw[1])
    return sy if sy == sx and ry == 0 and rx == 0 and sy > 0 else 0


_NO_EXTRA = np.zeros((0, 0), np.bool_)
_NO_TILES = _NO_EXTRA  # window kernels: no tile selection wanted (the same empty mask)
_NO_ACC = np.zeros(0, np.float32)
_NO_ACT = (0, 0.0)
_NO_REM = np.zeros((1, 1), np.int32)


@dataclass(eq=False)
class _PgemmLayer:
    """A convolution as im2col + GEMM: tap table, padding mask (empty = none), (K, N) weight, bias, and the
    measured cost model ``(a, b, dense)`` in ms — this path costs ``a + b·f`` at position fraction ``f``
    (None = not calibrated)."""

    table: np.ndarray
    valid: np.ndarray
    wt: torch.Tensor
    bias: torch.Tensor | None
    k: int
    cost: tuple[float, float, float] | None = None
    test_ms: float = 0.0  # a partial dense run's change test against the cache (measured)
    move_ms: float = 0.0  # moving the whole cache with the field before a partial pgemm run (measured)
    CHUNK_BYTES: ClassVar[int] = 1 << 19  # im2col bytes per chunk: well inside this CPU's 2 MiB L2 per core

    def rows(self, xrows: torch.Tensor, positions: np.ndarray, post: Any) -> torch.Tensor:
        """The layer's output (activation applied) at ``positions``, one row each."""
        return torch.from_numpy(self.rows_np(xrows.numpy(), positions, post))

    def rows_np(self, xrows: np.ndarray, positions: np.ndarray, post: Any) -> np.ndarray:
        """:meth:`rows` on numpy row views (the fast path's form)."""
        out = np.empty((len(positions), self.wt.shape[1]), np.float32)
        self._chunks(xrows, positions, post, None, out)
        return out

    def rows_each(self, xrows: np.ndarray, positions: np.ndarray, post: Any,
                  sink: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """:meth:`rows_np` handing each chunk's rows to ``sink(rows, positions)`` while they are still in cache
        (the caller's write-back) instead of returning them all."""
        self._chunks(xrows, positions, post, sink, None)

    def _chunks(self, xrows: np.ndarray, positions: np.ndarray, post: Any,
                sink: Callable[[np.ndarray, np.ndarray], None] | None, out: np.ndarray | None) -> None:
        """im2col + GEMM in chunks of :meth:`chunk_rows` positions: each chunk's im2col rows are multiplied
        while they are still in L2, instead of streaming the whole im2col matrix (K floats per position, 9×
        the input row for a 3×3 conv) through memory and back. Measured at 40 % of the positions of a 32→32
        3×3 conv on a 120×160 map: 2.00 → 1.46 ms; 128→128 at 60×80: 5.2 → 4.1 ms. Rows go to ``out`` when
        given, else through one chunk-sized buffer to ``sink``."""
        n = len(positions)
        cs = self.chunk_rows()
        g = np.empty((min(cs, n), self.k), np.float32)
        gt = torch.from_numpy(g)
        if out is None:
            out = np.empty((min(cs, n), self.wt.shape[1]), np.float32)
        ot = torch.from_numpy(out)
        for s in range(0, n, cs):
            p = positions[s:s + cs]
            m = len(p)
            _ek.im2col_rows(xrows, self.table, self.valid, p, 0.0, g[:m])
            yt = ot[:m] if sink is not None else ot[s:s + m]
            if self.bias is None:
                torch.mm(gt[:m], self.wt, out=yt)
            else:
                torch.addmm(self.bias, gt[:m], self.wt, out=yt)
            if post is not None:
                yt.copy_(post(yt))
            if sink is not None:
                sink(out[:m], p)

    def chunk_rows(self) -> int:
        """Positions per chunk: about ``CHUNK_BYTES`` of im2col rows (a power of two, 64–8192)."""
        return 1 << max(6, min(13, int(self.CHUNK_BYTES / (4 * self.k)).bit_length() - 1))

    def choose(self, f: float, moved: float = 0.0, partial: bool = False) -> str | None:
        """"pgemm" or "dense" at position fraction ``f`` by the measured model; None when not calibrated.
        ``partial``: the rest of the layer is reused, so dense also pays the change test and pgemm the cache
        move (``moved`` = fraction of positions the field shifts; fewer than half move in place, row by row)."""
        if self.cost is None:
            return None
        a, b, dense = self.cost
        if partial:
            return "pgemm" if a + b * f + self.move_ms * min(1.0, 2.0 * moved) < dense + self.test_ms else "dense"
        return "pgemm" if a + b * f < dense else "dense"


def _dense(conv: nn.Module, post: Any, x: torch.Tensor) -> torch.Tensor:
    return conv(x) if post is None else post(conv(x))


def _window(mask: np.ndarray, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], d: tuple[int, int],
            out_hw: tuple[int, ...]) -> np.ndarray:
    """Output positions whose window (kernel k, stride s, padding p, dilation d) touches a changed input."""
    out = np.empty((int(out_hw[-2]), int(out_hw[-1])), np.bool_)
    _ek.window_any(mask, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], _NO_EXTRA, out, 1, 1, _NO_EXTRA)
    return out


class _Moves:
    """(destination rows, source rows) of the positions whose shift is not zero, as pixel-row indices, and the
    mask's active fraction; built on first use (layers that run dense never need the rows)."""

    def __init__(self, sy: np.ndarray, sx: np.ndarray, ok: np.ndarray | None = None, moved: int = -1) -> None:
        self.sy, self.sx, self.ok = sy, sx, ok
        self._rows: tuple[torch.Tensor, torch.Tensor] | bool | None = None if moved == 0 else False
        self._active: float | None = None
        self._moved = moved

    def moved_fraction(self) -> float:
        """Fraction of positions whose shift is not zero."""
        if self._moved < 0:
            self._moved = int(np.count_nonzero((self.sy != 0) | (self.sx != 0)))
        return self._moved / self.sy.size

    def active(self) -> float:
        """Fraction of positions not reusable (strict masks; computed once per geometry and frame)."""
        if self._active is None:
            self._active = 1.0 - float(np.count_nonzero(self.ok)) / self.ok.size if self.ok is not None else 1.0
        return self._active

    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._rows is False:
            sy, sx = self.sy, self.sx
            moved = np.flatnonzero((sy != 0) | (sx != 0))
            if moved.size == 0:
                self._rows = None
            else:
                src = moved + sy.reshape(-1)[moved] * sy.shape[1] + sx.reshape(-1)[moved]
                self._rows = (torch.from_numpy(moved.astype(np.int64)), torch.from_numpy(src.astype(np.int64)))
        return self._rows  # type: ignore[return-value]


def _move(cache: torch.Tensor, sy: np.ndarray, sx: np.ndarray, lazy: _Moves,
          spares: dict[str, torch.Tensor] | None = None, name: str = "") -> torch.Tensor:
    """``out[..., i, j] = cache[..., i + sy[i, j], j + sx[i, j]]``. When few positions move, the moved rows
    are gathered first and written back into ``cache`` in place (a static camera with a few moving objects
    costs only those rows); when most move (a moving camera), one compiled pass writes them into
    ``spares[name]`` (taken out of ``spares`` only then: a tensor of the same layout that nothing else uses,
    see ``Engine._recycle``) or a new tensor. Measured on a 1×32×240×320 map:
    index arrays + ``index_select`` ~3 ms, the compiled pass ~1.3 ms into a spare; a fresh 10 MB tensor adds
    ~2–4 ms of page faults."""
    n, c, h, w = cache.shape
    if 2 * lazy.moved_fraction() >= 1.0 and (rows_in := _np_rows(cache)) is not None:
        spare = spares.pop(name, None) if spares is not None else None
        usable = (spare is not None and spare.shape == cache.shape and spare.stride() == cache.stride()
                  and spare.dtype == cache.dtype and spare.data_ptr() != cache.data_ptr())
        out = spare if usable else torch.empty_like(cache)  # type: ignore[assignment]  # channels_last too
        rows_out = _np_rows(out)
        if rows_out is not None:
            _ek.gather_shift(rows_in, sy, sx, rows_out)
            return out
    moves = lazy.rows()
    if moves is None:
        return cache
    dst, src = moves
    if cache.is_contiguous(memory_format=torch.channels_last):
        rows = cache.permute(0, 2, 3, 1).reshape(h * w, c)
        if 2 * dst.numel() < h * w:
            rows.index_copy_(0, dst, rows.index_select(0, src))
            return cache
        idx = torch.arange(h * w)
        idx[dst] = src
        return rows.index_select(0, idx).reshape(n, h, w, c).permute(0, 3, 1, 2)
    iy = np.arange(h)[:, None] + sy
    ix = np.arange(w)[None, :] + sx
    flat = cache.reshape(n, c, h * w)
    return flat.index_select(2, torch.from_numpy((iy * w + ix).reshape(-1).astype(np.int64))).reshape(n, c, h, w)


def _hwc(t: torch.Tensor) -> np.ndarray | None:
    """(H, W, C) numpy view of a (1, C, H, W) float32 channels_last tensor, or None."""
    if t.dtype != torch.float32 or not t.is_contiguous(memory_format=torch.channels_last):
        return None
    return t[0].permute(1, 2, 0).numpy()


def _own(out: Any) -> Any:
    """Copies of the output tensors: caches are updated in place on the next frame."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_own(o) for o in out)
    if isinstance(out, dict):
        return {k: _own(v) for k, v in out.items()}
    return out
