"""Codec motion vectors → a sanitised integer field on a fixed block grid.

Rules (decided here, documented in docs/design.md; the loops live in ``_kernels.codec_field``):

* Vectors are rasterised onto a 4-pixel cell grid (the smallest H.264 partition), so 16×16, 16×8, 8×16,
  8×8 and 4×4 partitions all land where they belong, then pooled to the requested block size.
* ``motion / motion_scale`` is the sub-pixel displacement into the reference (``src − dst``); it is rounded
  to the nearest integer with ties away from zero (symmetric: +0.5 and −0.5 both move one pixel).
* B-frames give up to two rows per block: only the past reference (``source < 0``) is used; blocks
  predicted only from the future are not covered (their content is in no past frame's cache).
* A block is covered only if every cell it has carries a past vector (an intra macroblock leaves its cells
  empty); its displacement is the majority vector of its cells, and a block where no vector covers half of
  its cells is incoherent. Uncovered or incoherent blocks are invalid.
* Reference span: x264 with ``ref > 1`` (and B-frames whose past anchor lies several frames back) gives
  vectors into frame ``t − k`` with no reference index. Each vector ``v`` is resolved to the previous
  displayed frame by testing ``round(v / k)`` for ``k = 1..max_ref_span`` on a 4×4 grid of luma samples
  per block (a constant-velocity hypothesis, verified). The expected span — frames since the last I/P
  frame in display order, the default past reference of B-frames and of P-frames after B-frames — is tried
  first and is the baseline; another span wins only if better by ``verify_margin``; candidates are only
  tried while the best so far is worse than ``verify_good``
  (a block the one-frame hypothesis already explains needs no alternative). If even the best candidate's
  sampled mean |Δ| exceeds ``verify_tau`` → invalid.
* Optional *fill* (on by default): an invalid block of an inter frame tries the MV-guided candidates of
  seed 001 §4.1 — zero motion and its valid 4-neighbours' vectors — on the same sample grid and becomes
  valid (flagged in ``field.filled``) if the best has sampled mean |Δ| ≤ ``fill_tau``. Encoders pick intra
  modes for rate reasons too; without this, such blocks would always be recomputed.
* I-frames, key frames and scene cuts (a P-frame with more than ``scene_cut_intra`` of its blocks intra)
  → all invalid, nothing filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxshard.motion import _kernels
from fluxshard.motion.field import MotionField, grid_shape

CELL = _kernels.CELL


@dataclass(frozen=True)
class CodecMVConfig:
    block: int = 16
    max_ref_span: int = 4
    verify: bool = True
    verify_tau: float = 24.0
    verify_margin: float = 1.0
    verify_good: float = 3.0  # a candidate this close needs no alternatives (early exit)
    verify_unambiguous: bool = False  # also check vectors that every span rounds to the same displacement
    fill: bool = True
    fill_tau: float = 3.0
    scene_cut_intra: float = 0.6


def field_from_mvs(
    mvs: np.ndarray | None,
    height: int,
    width: int,
    pict_type: str,
    key_frame: bool,
    cur_luma: np.ndarray | None = None,
    prev_luma: np.ndarray | None = None,
    config: CodecMVConfig | None = None,
    prior_span: int = 1,
) -> MotionField:
    """Sanitised integer field into the previous displayed frame from one frame's codec vectors.

    ``prior_span`` is the expected reference distance: frames since the last I/P frame in display order
    (the past anchor of a B-frame, and of a P-frame that follows B-frames); tried first.
    """
    return CodecFieldBuilder(config or CodecMVConfig(), height, width).build(
        mvs, pict_type, key_frame, cur_luma, prev_luma, prior_span)


class CodecFieldBuilder:
    """:func:`field_from_mvs` for a stream of frames of one size: the kernel's parameters and its scratch grid
    are prepared once, so :meth:`build` costs one kernel call and two allocations (the field's own arrays).
    :meth:`build_at` reads the vectors inside the kernel, straight from the decoder's frame, and hands out the
    field's arrays from stacks allocated for :data:`SLOTS` frames at a time (one allocation per stack instead
    of two per frame; a field kept alive keeps its stack's memory, ``SLOTS`` × 14 bytes per block)."""

    #: Frames per stack of field arrays (:meth:`build_at`).
    SLOTS = 8

    def __init__(self, config: CodecMVConfig, height: int, width: int) -> None:
        b = config.block
        if b % CELL or b < CELL:
            raise ValueError(f"block size must be a multiple of {CELL}, got {b}")
        self.config = config
        self.height, self.width = height, width
        self.grid = grid_shape(height, width, b)
        n = _kernels.STATE_PARAMS
        # parameters (float64 bit patterns) then the cell grid, in one array: see ``_kernels.codec_field_at``
        self._state = np.zeros(n + (-(-height // CELL)) * (-(-width // CELL)), np.uint64)
        self._params = self._state[:n].view(np.float64)
        self._params[:12] = [height, width, b, config.verify_unambiguous, config.verify,
                             max(config.max_ref_span, 1), config.verify_tau, config.verify_margin,
                             config.verify_good, config.fill, config.fill_tau, 1]
        self._keys = self._state[n:]
        self._n_blocks = self.grid[0] * self.grid[1]
        self._slot = self.SLOTS  # the next free slot of the current stacks (none allocated yet)
        self._out = self._flags = np.empty(0)
        self._views: list[tuple[np.ndarray, ...]] = []

    def build(self, mvs: np.ndarray | None, pict_type: str, key_frame: bool, cur_luma: np.ndarray | None,
              prev_luma: np.ndarray | None, prior_span: int = 1) -> MotionField:
        """The field from an AVMotionVector record array (``fluxshard.video.decode.MV_DTYPE``)."""
        if (pict_type == "I" or key_frame or mvs is None or len(mvs) == 0 or prev_luma is None
                or cur_luma is None):
            return self._invalid(pict_type, pict_type == "I" or key_frame)
        rows = np.ascontiguousarray(mvs).view(np.int32).reshape(len(mvs), -1)
        out, flags = self._arrays()
        self._params[11] = prior_span
        n_covered = _kernels.codec_field(rows, self._params, cur_luma, prev_luma, out, flags, self._keys)
        return self._field(out, flags, n_covered, pict_type)

    def build_at(self, frame_obj: int, get_fn: int, pict_type: str, key_frame: bool, cur_luma: np.ndarray,
                 prev_luma: np.ndarray, prior_span: int = 1) -> MotionField | None:
        """The field from the vectors of the PyAV frame with ``id`` ``frame_obj`` (see
        ``fluxshard.video.sidedata``; the frame must stay alive during the call); None if it carries none.
        The per-frame path of a stream: kept to the fewest Python steps (they run with cold caches)."""
        if pict_type == "I" or key_frame:
            return self._invalid(pict_type, True)
        k = self._slot
        if k == self.SLOTS:
            hb, wb = self.grid
            self._out = np.empty((self.SLOTS, 3, hb, wb), np.int32)
            self._flags = np.empty((self.SLOTS, 2, hb, wb), np.bool_)
            # each slot's dy, dx, valid, filled views, made here in one go
            self._views = [(self._out[j, 0], self._out[j, 1], self._flags[j, 0], self._flags[j, 1])
                           for j in range(self.SLOTS)]
            k = 0
        out = self._out
        flags = self._flags
        # decoder planes are strided views: passed as they are, no copies
        n_covered = _kernels.codec_field_at(frame_obj, get_fn, prior_span, self._state, cur_luma, prev_luma, out,
                                            flags, k)
        if n_covered < 0:
            self._slot = k
            return None
        if pict_type != "B" and 1.0 - n_covered / self._n_blocks > self.config.scene_cut_intra:
            self._slot = k  # the slot is reused: the field does not refer to it
            return self._invalid(pict_type, True)
        self._slot = k + 1
        dy, dx, valid, filled = self._views[k]
        return MotionField(dy, dx, valid, self.config.block, self.height, self.width, pict_type, "codec", False,
                           filled)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        hb, wb = self.grid
        return np.empty((3, hb, wb), np.int32), np.empty((2, hb, wb), np.bool_)

    def _invalid(self, pict_type: str, scene_cut: bool) -> MotionField:
        return MotionField.invalid(self.height, self.width, self.config.block, frame_type=pict_type, source="codec",
                                   scene_cut=scene_cut)

    def _field(self, out: np.ndarray, flags: np.ndarray, n_covered: int, pict_type: str) -> MotionField:
        hb, wb = self.grid
        # Only P-frames: their uncovered blocks are intra-coded. A B-frame's uncovered blocks are mostly
        # predicted from the future (common in still scenes), which says nothing about a cut.
        if pict_type != "B" and 1.0 - n_covered / (hb * wb) > self.config.scene_cut_intra:
            return self._invalid(pict_type, True)
        return MotionField(out[0], out[1], flags[0], self.config.block, self.height, self.width,
                           frame_type=pict_type, source="codec", filled=flags[1])
