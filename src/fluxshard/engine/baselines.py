"""Motion fields that turn the engine into the baselines of seed 000 §V / seed 001 §2.3, so every method runs
in one harness (same decoder, model, metric, timer):

* ``delta`` (DeltaCNN): zero motion everywhere — the cache is never moved, only deltas are recomputed;
* ``global-warp`` (MotionDeltaCNN): one global transform fitted to the frame's vectors (RANSAC similarity)
  moves the whole cache, then deltas;
* ``naive-mv``: the per-block codec field, reused without the Receptive-Field Alignment Principle
  (``EngineConfig(rfap=False)``) — what seed 000 Fig. 4 shows going wrong.

``fluxshard-exact`` / ``fluxshard-fast`` use the field as it is; ``dense`` and ``scene-reuse`` need no field.
"""

from __future__ import annotations

import numpy as np

from fluxshard.motion.field import MotionField


def zero_field(field: MotionField) -> MotionField:
    """Static-camera assumption: zero displacement, every block valid (scene cuts stay cuts)."""
    out = MotionField.zero(field.height, field.width, field.block, frame_type=field.frame_type, source="zero",
                           scene_cut=field.scene_cut)
    if field.scene_cut:
        out.valid[:] = False
    return out


def global_field(field: MotionField) -> MotionField:
    """One similarity (scale + translation) fitted robustly to the valid vectors, evaluated at every block
    centre and rounded: the homography-style global alignment of MotionDeltaCNN. Falls back to zero motion
    when the fit fails."""
    from fluxshard.tiling.camera import estimate_transform  # the RANSAC fit shared with Uirapuru

    sim = estimate_transform(field)
    out = zero_field(field)
    out.source = "global"
    if field.scene_cut or not sim.ok:
        return out
    hb, wb = field.shape
    b = field.block
    cx = (np.arange(wb) * b + (b - 1) / 2)[None, :]
    cy = (np.arange(hb) * b + (b - 1) / 2)[:, None]
    # the fit maps previous → current pixels: p_prev = (p_cur − t) / s
    px = (cx - sim.tx) / sim.scale
    py = (cy - sim.ty) / sim.scale
    out.dx = np.rint(px - cx).astype(np.int32) + np.zeros((hb, 1), np.int32)
    out.dy = np.rint(py - cy).astype(np.int32) + np.zeros((1, wb), np.int32)
    out.valid[:] = True
    return out


FIELD_FOR = {"delta": zero_field, "global-warp": global_field}
