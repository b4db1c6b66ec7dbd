"""The per-block motion field every later stage consumes.

Convention (the codec's): block ``(i, j)`` covering pixels ``[i*b, (i+1)*b) × [j*b, (j+1)*b)`` of the
current frame holds content found at the same block shifted by ``(dy, dx)`` in the *reference* frame, i.e.
``cur[y, x] ≈ ref[y + dy, x + dx]``. Displacements are integers (pixels); ``valid`` is False where no
trustworthy displacement exists (intra blocks, I-frames, scene cuts, failed verification).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def grid_shape(height: int, width: int, block: int) -> tuple[int, int]:
    """Blocks per column and row; partial blocks at the right/bottom edge count as blocks."""
    return -(-height // block), -(-width // block)


@dataclass
class MotionField:
    dy: np.ndarray  # int32 (Hb, Wb)
    dx: np.ndarray  # int32 (Hb, Wb)
    valid: np.ndarray  # bool (Hb, Wb)
    block: int
    height: int
    width: int
    frame_type: str = "?"
    source: str = "none"  # "codec", "blockmatch", "accumulated", "zero", "none"
    scene_cut: bool = False
    filled: np.ndarray | None = None  # bool (Hb, Wb): valid only thanks to MV-guided candidate filling

    @classmethod
    def invalid(cls, height: int, width: int, block: int, **kw: object) -> MotionField:
        hb, wb = grid_shape(height, width, block)
        z = np.zeros((hb, wb), np.int32)
        return cls(z, z.copy(), np.zeros((hb, wb), bool), block, height, width, **kw)  # type: ignore[arg-type]

    @classmethod
    def zero(cls, height: int, width: int, block: int, **kw: object) -> MotionField:
        """Zero motion everywhere, all valid: the "static camera" assumption of delta-based methods."""
        f = cls.invalid(height, width, block, **kw)
        f.valid[:] = True
        f.source = "zero"
        return f

    @property
    def shape(self) -> tuple[int, int]:
        return self.dy.shape  # type: ignore[return-value]

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0

    def magnitude(self) -> np.ndarray:
        return np.hypot(self.dy, self.dx)

    def mean_motion_px(self) -> float:
        """Mean displacement length over valid blocks (0 when none is valid)."""
        return float(self.magnitude()[self.valid].mean()) if self.valid.any() else 0.0

    def copy(self) -> MotionField:
        return MotionField(
            self.dy.copy(), self.dx.copy(), self.valid.copy(), self.block, self.height, self.width,
            self.frame_type, self.source, self.scene_cut,
            None if self.filled is None else self.filled.copy(),
        )

    def source_inside(self) -> np.ndarray:
        """True where the displaced block lies fully inside the reference frame."""
        hb, wb = self.shape
        b = self.block
        y0 = np.arange(hb)[:, None] * b + self.dy
        x0 = np.arange(wb)[None, :] * b + self.dx
        y1 = np.minimum(np.arange(hb)[:, None] * b + b, self.height) + self.dy
        x1 = np.minimum(np.arange(wb)[None, :] * b + b, self.width) + self.dx
        return (y0 >= 0) & (x0 >= 0) & (y1 <= self.height) & (x1 <= self.width)
