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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fluxshard.engine.graph import GraphInfo, tensor_args, trace
from fluxshard.engine.rfap import PixelMaps, reuse_mask
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

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "fast"):
            raise EngineError(f"engine mode must be 'exact' or 'fast', not {self.mode!r}")
        if self.mode == "exact" and (self.tau_in != 0 or self.thresholds or self.default_threshold != 0
                                     or not self.rfap):
            raise EngineError("exact mode takes no thresholds (tau_in = 0, no truncation) and always applies "
                              "RFAP; use mode='fast'")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Fast-mode thresholds from a JSON profile: ``{"tau_in": .., "default_threshold": ..,
        "thresholds": {"conv_node": τ, ...}}``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path}: cannot read engine thresholds ({exc})") from exc
        if not isinstance(data, dict):
            raise EngineError(f"{path}: engine thresholds must be a JSON object")
        kw = {k: data[k] for k in ("tau_in", "default_threshold", "thresholds", "refresh_every") if k in data}
        return cls(mode="fast", **{**kw, **overrides})


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
    """The elementwise activation ``node`` computes, as a callable of one tensor, or None."""
    t = node.target
    if node.op == "call_function":
        if t in (F.relu, torch.relu, torch.ops.aten.relu.default):
            return F.relu
        if t in (F.silu, torch.ops.aten.silu.default):
            return F.silu
        if t in (torch.sigmoid, F.sigmoid, torch.ops.aten.sigmoid.default):
            return torch.sigmoid
        if t in (F.relu6,):
            return F.relu6
        if t is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return lambda v, s=float(slope): F.leaky_relu(v, s)
        return None
    if node.op == "call_module":
        m = gm.get_submodule(str(t))
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish)):
            return m
    return None


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


def default_profile(model: str) -> Path | None:
    """The fast-mode thresholds shipped for a bundled model, if any."""
    p = PROFILES_DIR / f"{model}.json"
    return p if p.is_file() else None


def _warm_kernels() -> None:
    """Load the compiled input-stage kernels before the first timed frame."""
    z = np.zeros((2, 2), np.int32)
    img = torch.zeros(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0).numpy()
    _kernels.shifted_diff(img, img, z[:1, :1], z[:1, :1], 16, np.empty((16, 16), np.float32),
                          np.empty((1, 1), np.float32))
    _kernels.strict_reuse(np.zeros((17, 17), np.int32), np.zeros((5, 2, 2), np.int64), 16, 16, 16, 2, 2, 1, 1,
                          1, 1, np.empty((8, 8), np.bool_), np.empty((8, 8), np.int32), np.empty((8, 8), np.int32))


def _plan_cache() -> Any:
    from fluxshard.engine.sparse import PlanCache

    return PlanCache()


def _sparse_executor() -> Any:
    try:
        from fluxshard.engine.sparse import sparse_conv2d
    except ImportError:
        return None
    return sparse_conv2d


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
        self._sparse = _sparse_executor() if self.config.sparse else None
        self._plans = _plan_cache() if self._sparse is not None else None
        self._calibrated: set[str] = set()
        self._post, self._fused_into = _find_fusions(self.gm, self.info) if self.config.fuse \
            else ({}, {})
        self.reset()

    @property
    def barriers(self) -> list[str]:
        return list(self.info.barriers)

    def reset(self) -> None:
        self._x_cache: torch.Tensor | None = None
        self._caches: dict[str, torch.Tensor] = {}
        self._frames = 0
        self._since_refresh = 0

    # -- public -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, x: torch.Tensor, field: MotionField | None) -> tuple[Any, StepStats]:
        """Outputs of the body for input ``x`` (1×C×H×W) given the field from this frame to the previous one
        (at the input's resolution; ``None`` = unknown motion → dense)."""
        t0 = time.perf_counter()
        self._check(x, field)
        x = x.contiguous(memory_format=torch.channels_last)  # 2–4× faster convolutions on this CPU
        reason = self._dense_reason(field)
        if reason:
            out = self._run_dense(x)
            stats = StepStats(self._frames, True, reason, 1.0, 0.0)
            self._since_refresh = 0
        else:
            assert field is not None and self._x_cache is not None
            field, residual = self._input_residual(x, field)
            maps = PixelMaps.build(field, residual)
            out, layers, first = self._run_incremental(x, maps)
            stats = StepStats(self._frames, False, "", float(maps.residual.mean()), 0.0, layers, first)
            self._since_refresh += 1
        self._x_cache = x
        self._frames += 1
        stats.ms = (time.perf_counter() - t0) * 1e3
        return out, stats

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

    def _input_residual(self, x: torch.Tensor, field: MotionField) -> tuple[MotionField, np.ndarray]:
        """The field actually used and the residual pixels. Exact mode: any difference between ``x`` and
        the block-shifted cached input. Fast mode: every pixel of a block whose mean difference exceeds τ_in
        (the seed's per-block residual set; per-pixel thresholds would scatter isolated noisy pixels over
        every tile); blocks the field leaves without a vector become zero-motion blocks when the unshifted
        cache matches them within τ_in (static background the codec happened to intra-code). Blocks whose
        source leaves the frame are residual in both modes."""
        assert self._x_cache is not None
        h, w = self.input_hw
        b = field.block
        cur = x[0].permute(1, 2, 0).numpy()  # H×W×C views of channels-last tensors
        ref = self._x_cache[0].permute(1, 2, 0).numpy()
        pix = np.empty((h, w), np.float32)
        mad = np.empty(field.shape, np.float32)
        _kernels.shifted_diff(cur, ref, field.dy, field.dx, b, pix, mad)
        if self.config.mode == "exact":
            bad = ~field.source_inside()
            residual = pix > 0
        else:
            invalid = ~field.valid
            if invalid.any():
                zero = np.zeros_like(field.dy)
                zmad = np.empty(field.shape, np.float32)
                _kernels.shifted_diff(cur, ref, zero, zero, b, np.empty((h, w), np.float32), zmad)
                rescue = invalid & (zmad <= self.config.tau_in)
                if rescue.any():
                    field = field.copy()
                    field.valid |= rescue
                    field.dy[rescue] = 0
                    field.dx[rescue] = 0
                    mad = np.where(rescue, zmad, mad)
            bad = ~field.source_inside() | (mad > self.config.tau_in)
            residual = np.zeros((h, w), bool)
        if bad.any():
            residual |= np.repeat(np.repeat(bad, b, 0), b, 1)[:h, :w]
        return field, residual

    # -- execution -----------------------------------------------------------------------------------------
    def _run_dense(self, x: torch.Tensor) -> Any:
        runner = _Runner(self, None)
        out = runner.run(x)
        self._caches = runner.new_caches
        return out

    def _run_incremental(self, x: torch.Tensor, maps: PixelMaps,
                         ) -> tuple[Any, list[LayerStats], np.ndarray | None]:
        runner = _Runner(self, maps)
        out = runner.run(x)
        self._caches = runner.new_caches
        return out, runner.layer_stats, runner.first_recompute


class _Runner(fx.Interpreter):
    """Executes the traced body. Exact mode: convolutions go through the cache with strict RFAP masks.
    Fast mode: every node also propagates a *change mask* (positions whose value differs from the motion-
    shifted cache), convolutions recompute the window-dilation of their input's mask and truncate."""

    def __init__(self, engine: Engine, maps: PixelMaps | None) -> None:
        super().__init__(engine.gm)
        self.engine = engine
        self.maps = maps
        self.fast = maps is not None and engine.config.mode == "fast"
        self.new_caches: dict[str, torch.Tensor] = {}
        self.layer_stats: list[LayerStats] = []
        self.changed: dict[str, torch.Tensor] = {}
        self._masks: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._conv_set = set(engine.info.convs)
        self.first_recompute: np.ndarray | None = None

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.name in self._conv_set:
            args, _ = self.fetch_args_kwargs_from_env(n)
            return self._conv(n, args[0])
        conv_node = self.engine._fused_into.get(n.name)
        if conv_node is not None:  # this activation was applied by the convolution it follows (fused)
            if self.fast and conv_node.name in self.changed:
                self.changed[n.name] = self.changed[conv_node.name]
            return self.env[conv_node]
        out = super().run_node(n)
        if self.fast:
            self._propagate(n, out)
        return out

    # -- exact + fast convolution ------------------------------------------------------------------------
    def _conv(self, n: fx.Node, x: torch.Tensor) -> torch.Tensor:
        conv = self.module.get_submodule(str(n.target))
        cache = self.engine._caches.get(n.name)
        post = self.engine._post.get(n.name)
        if self.maps is None or cache is None:
            y = conv(x) if post is None else post(conv(x))
            self.new_caches[n.name] = y
            plans = self.engine._plans
            if self.engine.config.calibrate and plans is not None and n.name not in self.engine._calibrated:
                # per-layer cost model at this machine's thread count, for the executor's path choice
                plans.calibrate(x, conv, tile=self._tile(n.name), post=post)
                self.engine._calibrated.add(n.name)
            return y
        t0 = time.perf_counter()
        ho, wo = cache.shape[-2:]
        src = tensor_args(n)[0]
        first = self.engine.info.ops.get(src.name) == ("input",)
        if not self.fast or (first and self.engine.config.rfap):
            ok, sy, sx = self._strict(n.name, (ho, wo))  # exact mode, or the first convolution in fast mode
            recompute = torch.from_numpy(~ok)
        else:
            g = self.engine.info.geoms[n.name]
            ok_shift, sy, sx = self._shift_map(g.S, (ho, wo))
            _, k, s, p, d = self.engine.info.ops[n.name]
            recompute = _dilate(self.changed[src.name], k, s, p, d, (ho, wo)) | torch.from_numpy(~ok_shift)
        active_fraction = float(recompute.float().mean())
        if self.first_recompute is None:
            self.first_recompute = recompute.numpy()
        tau = self.engine.config.thresholds.get(n.name, self.engine.config.default_threshold)
        tile_fraction = 1.0
        if active_fraction == 1.0:
            y, path = (conv(x) if post is None else post(conv(x))), "dense"
            if self.fast:
                self.changed[n.name] = torch.ones((ho, wo), dtype=torch.bool)
        else:
            base = _shift(cache, sy, sx)
            idx = torch.nonzero(recompute.reshape(-1)).reshape(-1) if self.fast else None
            old = _rows(base).index_select(1, idx) if idx is not None else None  # before in-place writes
            if self.engine._sparse is not None:
                # the executor writes into ``base``; never into the cache, which may back last frame's outputs
                y, st = self.engine._sparse(x, conv, base, recompute, plan_cache=self.engine._plans,
                                            inplace=base is not cache, tile=self._tile(n.name), post=post)
                path = getattr(st, "path", "sparse")
                tile_fraction = float(getattr(st, "fraction", 1.0)) if path != "dense" else 1.0
            else:
                y = torch.where(recompute, conv(x) if post is None else post(conv(x)), base)
                path = "dense+select"
            if idx is not None and old is not None:
                # truncation: only recomputed positions that moved by more than τ^l count as changed
                delta = (_rows(y).index_select(1, idx) - old).abs().amax(dim=2)[0]
                changed = torch.zeros(ho * wo, dtype=torch.bool)
                changed[idx] = delta > tau
                self.changed[n.name] = changed.reshape(ho, wo)
        self.new_caches[n.name] = y
        self.layer_stats.append(
            LayerStats(n.name, 1.0 - active_fraction, active_fraction, (time.perf_counter() - t0) * 1e3, path,
                       tile_fraction)
        )
        return y

    def _tile(self, name: str) -> int | None:
        """Tiles the size of one motion block at this layer's resolution (at least 2 px): recompute sets follow
        the block grid, so larger tiles would mostly recompute positions that did not need it."""
        if self.engine.config.tile is not None:
            return self.engine.config.tile or None
        block = self.maps.block if self.maps is not None else 16
        return max(2, block // self.engine.info.geoms[name].S)

    def _strict(self, name: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.maps is not None
        g = self.engine.info.geoms[name]
        if self.fast:  # first conv: equivariance of this layer alone
            g = type(g)(g.S, g.S, g.lo_y, g.hi_y, g.lo_x, g.hi_x, g.barrier)
        key = (*g.key(), *hw)
        if key not in self._masks:
            self._masks[key] = reuse_mask(self.maps, g, hw)
        return self._masks[key]

    def _shift_map(self, S: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fast mode: one displacement per shard at this resolution, rounded to whole feature pixels."""
        key = ("shift", S, *hw)
        if key not in self._masks:
            assert self.maps is not None
            ho, wo = hw
            b = self.maps.block
            py = np.minimum(np.arange(ho) * S + S // 2, self.maps.height - 1) // b
            px = np.minimum(np.arange(wo) * S + S // 2, self.maps.width - 1) // b
            f = self.maps.field
            dy = f.dy[py][:, px]
            dx = f.dx[py][:, px]
            valid = f.valid[py][:, px]
            sy = (np.sign(dy) * np.floor(np.abs(dy) / S + 0.5)).astype(np.int32)
            sx = (np.sign(dx) * np.floor(np.abs(dx) / S + 0.5)).astype(np.int32)
            iy = np.arange(ho)[:, None] + sy
            ix = np.arange(wo)[None, :] + sx
            ok = valid & (iy >= 0) & (iy < ho) & (ix >= 0) & (ix < wo)
            self._masks[key] = (ok, np.where(ok, sy, 0), np.where(ok, sx, 0))
        return self._masks[key]

    # -- fast mode: change masks through non-conv nodes -------------------------------------------------
    def _propagate(self, n: fx.Node, out: Any) -> None:
        op = self.engine.info.ops.get(n.name)
        if op is None:
            return
        if op[0] == "input":
            assert self.maps is not None
            self.changed[n.name] = torch.from_numpy(self.maps.residual)
            return
        ins = [self.changed[a.name] for a in tensor_args(n) if a.name in self.changed]
        shape = self.engine.info.shapes.get(n.name)
        if not ins or shape is None or len(shape) != 4:
            if ins:
                self.changed[n.name] = ins[0]
            return
        hw = tuple(shape[-2:])
        if op[0] == "window":
            self.changed[n.name] = _dilate(ins[0], op[1], op[2], op[3], op[4], hw)
        elif op[0] == "resample":
            m = ins[0]
            if op[1] != "nearest":
                m = _dilate(m, (3, 3), (1, 1), (1, 1), (1, 1), tuple(m.shape))
            self.changed[n.name] = F.interpolate(m[None, None].float(), size=hw, mode="nearest")[0, 0] > 0
        elif op[0] == "pointwise" and all(tuple(m.shape) == hw for m in ins):
            acc = ins[0].clone()
            for m in ins[1:]:
                acc |= m
            self.changed[n.name] = acc
        else:  # barrier, or broadcasting across space: anything changed anywhere changes everything
            self.changed[n.name] = torch.full(hw, any(bool(m.any()) for m in ins), dtype=torch.bool)


def _dilate(mask: torch.Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], d: tuple[int, int],
            out_hw: tuple[int, ...]) -> torch.Tensor:
    """Output positions whose window (kernel k, stride s, padding p, dilation d) touches a changed input."""
    m = F.max_pool2d(mask[None, None].float(), k, s, p, d)[0, 0] > 0
    ho, wo = out_hw[-2], out_hw[-1]
    if m.shape != (ho, wo):
        m = F.pad(m, (0, max(0, wo - m.shape[1]), 0, max(0, ho - m.shape[0])), value=True)[:ho, :wo]
    return m


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) → (1, H·W, C) pixel rows (a view for channels-last tensors)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _shift(cache: torch.Tensor, sy: np.ndarray, sx: np.ndarray) -> torch.Tensor:
    """``out[..., i, j] = cache[..., i + sy[i, j], j + sx[i, j]]`` (positions with zero shift copy through).

    Channels-last maps are moved as pixel rows (one ``index_select`` over H·W rows of C values)."""
    if not sy.any() and not sx.any():
        return cache
    n, c, h, w = cache.shape
    iy = np.arange(h)[:, None] + sy
    ix = np.arange(w)[None, :] + sx
    idx = torch.from_numpy((iy * w + ix).reshape(-1).astype(np.int64))
    if cache.is_contiguous(memory_format=torch.channels_last):
        rows = cache.permute(0, 2, 3, 1).reshape(n, h * w, c)
        return rows.index_select(1, idx).reshape(n, h, w, c).permute(0, 3, 1, 2)
    flat = cache.reshape(n, c, h * w)
    return flat.index_select(2, idx).reshape(n, c, h, w)
