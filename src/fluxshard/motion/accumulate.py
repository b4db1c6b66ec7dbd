"""Accumulated motion field: align a cache that is n frames old with the current frame (seed 000 §III-B).

Each endpoint's dispatch layer keeps, per current block, the displacement into the frame its cache was
computed on. A new per-frame field ``d_t`` (current → previous) composes as
``acc_t(b) = d_t(b) + acc_{t-1}(b + d_t(b))``. The displaced block generally straddles up to four blocks
of the previous grid; in *strict* mode it is valid only if all of them are valid and carry the same
accumulated vector (so one displacement still describes the whole shard — what an exact cache shift
needs); otherwise the block containing the displaced centre decides.
"""

from __future__ import annotations

import numpy as np

from fluxshard.motion.field import MotionField, grid_shape


class AccumulatedField:
    def __init__(self, height: int, width: int, block: int = 16, strict: bool = True) -> None:
        self.height, self.width, self.block, self.strict = height, width, block, strict
        self.age = 0
        self.field = MotionField.zero(height, width, block)
        self.field.source = "accumulated"

    def reset(self) -> None:
        """The cache was just refreshed on the current frame: zero displacement, all valid."""
        self.age = 0
        self.field = MotionField.zero(self.height, self.width, self.block)
        self.field.source = "accumulated"

    def update(self, step: MotionField) -> MotionField:
        """Compose a current→previous field onto the accumulated one; returns the new accumulated field."""
        if step.block != self.block or (step.height, step.width) != (self.height, self.width):
            raise ValueError(
                f"field is {step.width}x{step.height}/b{step.block}, "
                f"accumulator is {self.width}x{self.height}/b{self.block}"
            )
        self.field = compose(step, self.field, strict=self.strict)
        self.age += 1
        return self.field


def compose(step: MotionField, acc: MotionField, strict: bool = True) -> MotionField:
    """``step`` (t → t−1) followed by ``acc`` (t−1 → cache frame): the field t → cache frame."""
    b = step.block
    hb, wb = grid_shape(step.height, step.width, b)
    ys = np.arange(hb)[:, None] * b + step.dy
    xs = np.arange(wb)[None, :] * b + step.dx
    if strict:
        rows = (np.floor_divide(ys, b), np.floor_divide(ys + b - 1, b))
        cols = (np.floor_divide(xs, b), np.floor_divide(xs + b - 1, b))
    else:
        c = (np.floor_divide(ys + b // 2, b),)
        rows, cols = c, (np.floor_divide(xs + b // 2, b),)
    # Whether the final source lies inside the cache frame is checked where the field is used (the residual
    # check): testing it at every step would invalidate a whole block per frame from the edges inwards.
    valid = step.valid.copy()
    ref_y = ref_x = None
    for r in rows:
        for c in cols:
            rc = np.clip(r, 0, hb - 1)  # footprints past the edge take the edge shard's vector
            cc = np.clip(c, 0, wb - 1)
            ay, ax, av = acc.dy[rc, cc], acc.dx[rc, cc], acc.valid[rc, cc]
            valid &= av
            if ref_y is None:
                ref_y, ref_x = ay, ax
            else:
                valid &= (ay == ref_y) & (ax == ref_x)
    assert ref_y is not None and ref_x is not None
    out = MotionField(
        (step.dy + ref_y).astype(np.int32), (step.dx + ref_x).astype(np.int32), valid, b,
        step.height, step.width, step.frame_type, "accumulated", step.scene_cut,
    )
    out.dy[~valid] = 0
    out.dx[~valid] = 0
    return out
