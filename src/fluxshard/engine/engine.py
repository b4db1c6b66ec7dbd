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

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import fx, nn

from fluxshard.engine.graph import GraphInfo, trace
from fluxshard.engine.rfap import PixelMaps, reuse_mask
from fluxshard.errors import FluxShardError
from fluxshard.motion.field import MotionField
from fluxshard.motion.residual import warp_blocks


class EngineError(FluxShardError):
    """Wrong input to the engine (shape, field size) — the message names what was expected."""


@dataclass(frozen=True)
class EngineConfig:
    mode: Literal["exact"] = "exact"
    tau_in: float = 0.0  # input residual threshold (absolute, in input units); 0 = every changed pixel
    refresh_every: int | None = None  # dense refresh period in frames (None = only when needed)
    sparse: bool = True  # use the tile-sparse executor when it is available


@dataclass
class LayerStats:
    name: str
    reuse_fraction: float
    active_fraction: float
    ms: float
    path: str


@dataclass
class StepStats:
    frame: int
    dense: bool
    reason: str
    input_residual_fraction: float
    ms: float
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def active_fraction(self) -> float:
        """Mean over convolutions of the fraction of output positions recomputed (1.0 for a dense frame)."""
        if self.dense or not self.layers:
            return 1.0
        return float(np.mean([s.active_fraction for s in self.layers]))


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
        self._sparse = _sparse_executor() if self.config.sparse else None
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
        reason = self._dense_reason(field)
        if reason:
            out = self._run_dense(x)
            stats = StepStats(self._frames, True, reason, 1.0, 0.0)
            self._since_refresh = 0
        else:
            assert field is not None and self._x_cache is not None
            residual = self._input_residual(x, field)
            maps = PixelMaps.build(field, residual)
            out, layers = self._run_incremental(x, maps)
            stats = StepStats(self._frames, False, "", float(maps.residual.mean()), 0.0, layers)
            self._since_refresh += 1
        self._x_cache = x.detach().clone()
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

    def _input_residual(self, x: torch.Tensor, field: MotionField) -> np.ndarray:
        cur = x[0].permute(1, 2, 0).numpy()
        assert self._x_cache is not None
        prev = self._x_cache[0].permute(1, 2, 0).numpy()
        aligned = warp_blocks(prev, field)
        diff = np.abs(cur - aligned).max(axis=2)
        residual = diff > self.config.tau_in
        outside = ~field.source_inside()
        if outside.any():
            b = field.block
            residual |= np.repeat(np.repeat(outside, b, 0), b, 1)[: residual.shape[0], : residual.shape[1]]
        return residual

    # -- execution -----------------------------------------------------------------------------------------
    def _run_dense(self, x: torch.Tensor) -> Any:
        runner = _Runner(self, None)
        out = runner.run(x)
        self._caches = runner.new_caches
        return out

    def _run_incremental(self, x: torch.Tensor, maps: PixelMaps) -> tuple[Any, list[LayerStats]]:
        runner = _Runner(self, maps)
        out = runner.run(x)
        self._caches = runner.new_caches
        return out, runner.layer_stats


class _Runner(fx.Interpreter):
    """Executes the traced body; convolutions go through the cache when ``maps`` is given."""

    def __init__(self, engine: Engine, maps: PixelMaps | None) -> None:
        super().__init__(engine.gm)
        self.engine = engine
        self.maps = maps
        self.new_caches: dict[str, torch.Tensor] = {}
        self.layer_stats: list[LayerStats] = []
        self._masks: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.name in self.engine.info.geoms and n.name in self._conv_names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            return self._conv(n, args[0])
        return super().run_node(n)

    @property
    def _conv_names(self) -> set[str]:
        names = getattr(self, "_conv_set", None)
        if names is None:
            names = self._conv_set = set(self.engine.info.convs)
        return names

    def _conv(self, n: fx.Node, x: torch.Tensor) -> torch.Tensor:
        conv = self.module.get_submodule(str(n.target))
        cache = self.engine._caches.get(n.name)
        if self.maps is None or cache is None:
            y = conv(x)
            self.new_caches[n.name] = y
            return y
        t0 = time.perf_counter()
        g = self.engine.info.geoms[n.name]
        ho, wo = cache.shape[-2:]
        key = (*g.key(), ho, wo)
        if key not in self._masks:
            self._masks[key] = reuse_mask(self.maps, g, (ho, wo))
        ok, sy, sx = self._masks[key]
        reuse = float(ok.mean())
        if reuse == 0.0:
            y, path = conv(x), "dense"
        else:
            base = _shift(cache, sy, sx)
            active = torch.from_numpy(~ok)
            if self.engine._sparse is not None:
                y, st = self.engine._sparse(x, conv, base, active)
                path = getattr(st, "path", "sparse")
            else:
                y = torch.where(active, conv(x), base)
                path = "dense+select"
        self.new_caches[n.name] = y
        self.layer_stats.append(LayerStats(n.name, reuse, 1.0 - reuse, (time.perf_counter() - t0) * 1e3, path))
        return y


def _shift(cache: torch.Tensor, sy: np.ndarray, sx: np.ndarray) -> torch.Tensor:
    """``out[..., i, j] = cache[..., i + sy[i, j], j + sx[i, j]]`` (positions with zero shift copy through)."""
    if not sy.any() and not sx.any():
        return cache
    n, c, h, w = cache.shape
    iy = np.arange(h)[:, None] + sy
    ix = np.arange(w)[None, :] + sx
    idx = torch.from_numpy((iy * w + ix).reshape(-1).astype(np.int64))
    flat = cache.reshape(n, c, h * w)
    return flat.index_select(2, idx).reshape(n, c, h, w)
