"""Motion front-end: per-block integer motion fields from codec vectors or block matching.

``MotionStream`` (frames + field) → ``AccumulatedField`` (align an n-frame-old cache) →
``residual_blocks`` (the input-level residual set after alignment).
"""

from fluxshard.motion.accumulate import AccumulatedField, compose
from fluxshard.motion.blockmatch import BlockMatchConfig, block_match
from fluxshard.motion.codec import CodecMVConfig, field_from_mvs
from fluxshard.motion.field import MotionField, grid_shape
from fluxshard.motion.residual import residual_blocks, warp_blocks
from fluxshard.motion.stream import MotionFrame, MotionStream

__all__ = [
    "AccumulatedField", "BlockMatchConfig", "CodecMVConfig", "MotionField", "MotionFrame", "MotionStream",
    "block_match", "compose", "field_from_mvs", "grid_shape", "residual_blocks", "warp_blocks",
]
