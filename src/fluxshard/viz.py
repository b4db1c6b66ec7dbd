"""Drawing on frames (PIL): motion arrows, residual/reused block tints; shared by every CLI overlay."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fluxshard.motion.field import MotionField

RESIDUAL = (255, 40, 40)
INVALID = (40, 90, 255)
ARROW = (40, 255, 80)
FILLED = (255, 220, 40)


def tint_blocks(rgb: np.ndarray, mask: np.ndarray, block: int, color: tuple[int, int, int],
                alpha: float = 0.35) -> np.ndarray:
    """Blend ``color`` into every block where ``mask`` is True (returns a new array)."""
    h, w = rgb.shape[:2]
    m = np.repeat(np.repeat(mask, block, 0), block, 1)[:h, :w]
    out = rgb.astype(np.float32)
    out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return out.astype(np.uint8)


def motion_overlay(rgb: np.ndarray, field: MotionField, residual: np.ndarray | None = None,
                   arrow_step: int = 1) -> np.ndarray:
    """Frame with residual blocks tinted red, invalid blocks blue, and an arrow per moving block.

    Arrows run from where the content was in the reference frame to where it is now (the opposite of the
    stored displacement); vectors recovered by candidate filling are drawn yellow.
    """
    b = field.block
    out = rgb
    if residual is not None:
        out = tint_blocks(out, residual & field.valid, b, RESIDUAL)
    out = tint_blocks(out, ~field.valid, b, INVALID, alpha=0.25)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    hb, wb = field.shape
    filled = field.filled if field.filled is not None else np.zeros((hb, wb), bool)
    for i in range(0, hb, arrow_step):
        for j in range(0, wb, arrow_step):
            if not field.valid[i, j] or (field.dy[i, j] == 0 and field.dx[i, j] == 0):
                continue
            cy, cx = i * b + b / 2, j * b + b / 2
            sy, sx = cy + field.dy[i, j], cx + field.dx[i, j]
            color = FILLED if filled[i, j] else ARROW
            draw.line([(sx, sy), (cx, cy)], fill=color, width=1)
            draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=color)
    return np.asarray(img)
