"""Incremental, motion-aware sparse inference of an unmodified PyTorch CNN body.

``graph`` (torch.fx capture + spatial geometry per node) → ``rfap`` (strict reuse masks from the input-level
field and residual set) → ``sparse`` (tile gather / stock conv / scatter) → ``engine`` (per-stream state).
"""

from fluxshard.engine.engine import Engine, EngineConfig, EngineError, LayerStats, StepStats
from fluxshard.engine.graph import Geom, GraphInfo, trace

__all__ = ["Engine", "EngineConfig", "EngineError", "Geom", "GraphInfo", "LayerStats", "StepStats", "trace"]
