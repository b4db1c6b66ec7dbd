"""Distribution controller (§3.2.1): track the camera, reproject historical boxes into the current view.

Historical objects are extracted once, in *global-view* pixel coordinates. Every frame the controller holds
``M_t``, the 3x3 homography mapping global-view pixels to frame-t pixels, and reprojects the historical boxes
through it; boxes whose centre falls outside the frame are dropped. ``M_t`` is obtained in one of three ways:

* **Pinhole PTZ state** (:class:`PTZState`): accumulated pan/tilt (degrees, + = right/down) and zoom;
  ``M = K_t R^T K_0^-1`` with ``K_0`` the global camera (focal ``focal_px``) and ``K_t`` the current one
  (focal ``zoom * focal_px``), ``R`` = pan about the vertical axis then tilt about the new horizontal one.
* **Virtual-PTZ ground truth** (:func:`ptz_global_to_view`): the JSON of :mod:`fluxshard.data.ptz` records
  ``A_t`` mapping frame-t pixels to source pixels; with a still source the source frame *is* the global view,
  so ``M_t = A_t^-1`` exactly (no pinhole approximation needed).
* **Motion vectors** (:func:`estimate_transform`): a robust similarity fit to the frame's block motion field,
  accumulated by :class:`CameraTracker` (``M_t = Delta_t @ M_{t-1}``).

Decisions:

* **Kept boxes.** A reprojected box is kept when the centre of its (axis-aligned bound of the four projected
  corners) lies in ``[0, w) x [0, h)`` - the same rule the planner uses to assign objects to tiles - and is
  then clipped to the frame, since only the visible part is detectable and counts for its size bin. Corners
  behind the camera (pinhole, w <= 0) drop the box.
* **Transform model.** Similarity without rotation (scale + translation): a PTZ camera neither rolls nor
  shears, and over one frame pan/tilt are translations to well below a pixel of error. Three parameters keep
  the fit well conditioned on the 10^2-10^3 block vectors of a frame.
* **Fit.** Seeded RANSAC on 2-point minimal samples (256 hypotheses, inlier when the integer block vector is
  within ``1.5`` px of the model: codec vectors are rounded to whole pixels, <= 0.71 px error), then least
  squares on the inliers, iterated twice. Block centres use the clipped extent of edge blocks. The field's
  reference is taken to be the previous frame (what :class:`fluxshard.motion.MotionStream` produces). A fit
  with fewer than 8 valid blocks or under 25 % inliers is reported ``ok=False``; :class:`CameraTracker` then
  reuses the previous frame's delta (camera actuation is smooth; a missing field is usually an intra frame in
  the middle of a move).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fluxshard.data.ptz import ptz_affine
from fluxshard.motion import MotionField

RANSAC_ITERS = 256
INLIER_PX = 1.5
MIN_VALID_BLOCKS = 8
MIN_INLIER_FRACTION = 0.25
SCORE_POINTS = 2000


def _rot(pan_deg: float, tilt_deg: float) -> np.ndarray:
    """Columns = camera right, down, forward axes in global-camera coordinates."""
    p, t = math.radians(pan_deg), math.radians(tilt_deg)
    fwd = np.array([math.sin(p) * math.cos(t), math.sin(t), math.cos(p) * math.cos(t)])
    right = np.array([math.cos(p), 0.0, -math.sin(p)])
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd], axis=1)


def intrinsics(focal_px: float, width: int, height: int) -> np.ndarray:
    """Pinhole K with the principal point at the image centre (pixel centres at integers)."""
    return np.array([[focal_px, 0, (width - 1) / 2], [0, focal_px, (height - 1) / 2], [0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class PTZState:
    """Accumulated camera state relative to the rest (global) view."""

    pan_deg: float = 0.0
    tilt_deg: float = 0.0
    zoom: float = 1.0

    def apply(self, d_pan: float = 0.0, d_tilt: float = 0.0, d_zoom: float = 1.0) -> PTZState:
        """Accumulate one actuation step Delta T (angles add, zoom multiplies)."""
        return PTZState(self.pan_deg + d_pan, self.tilt_deg + d_tilt, self.zoom * d_zoom)

    def homography(self, focal_px: float, global_size: tuple[int, int], view_size: tuple[int, int]) -> np.ndarray:
        """Global-view pixel -> current-view pixel: ``K_t R^T K_0^-1``."""
        k0 = intrinsics(focal_px, *global_size)
        kt = intrinsics(focal_px * self.zoom, *view_size)
        return kt @ _rot(self.pan_deg, self.tilt_deg).T @ np.linalg.inv(k0)


def ptz_global_to_view(meta: dict[str, Any], t: int) -> np.ndarray:
    """Exact global(source)->frame-t map of a virtual-PTZ clip: the inverse of its recorded affine."""
    return np.linalg.inv(ptz_affine(meta, t))


def ptz_delta(meta: dict[str, Any], t: int) -> np.ndarray:
    """Frame t-1 pixel -> frame t pixel (the per-frame Delta T of a virtual-PTZ clip)."""
    return np.linalg.inv(ptz_affine(meta, t)) @ ptz_affine(meta, t - 1)


def reproject_boxes(
    boxes: ArrayLike, homography: ArrayLike, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4 xyxy) through ``homography``; returns (kept boxes clipped to the frame, their indices)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h = np.asarray(homography, dtype=np.float64)
    if not len(b):
        return np.zeros((0, 4)), np.zeros(0, dtype=np.intp)
    xs = b[:, [0, 2, 2, 0]]
    ys = b[:, [1, 1, 3, 3]]
    pts = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ h.T  # (N, 4, 3)
    w = pts[..., 2]
    front = np.all(w > 1e-12, axis=1)
    w = np.where(w > 1e-12, w, 1.0)
    px, py = pts[..., 0] / w, pts[..., 1] / w
    out = np.stack([px.min(1), py.min(1), px.max(1), py.max(1)], axis=1)
    cx, cy = (out[:, 0] + out[:, 2]) / 2, (out[:, 1] + out[:, 3]) / 2
    keep = front & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    idx = np.flatnonzero(keep)
    kept = out[idx]
    kept[:, [0, 2]] = np.clip(kept[:, [0, 2]], 0, width)
    kept[:, [1, 3]] = np.clip(kept[:, [1, 3]], 0, height)
    return kept, idx


@dataclass(frozen=True)
class Similarity:
    """``p_cur = scale * p_prev + (tx, ty)``, with fit diagnostics."""

    scale: float = 1.0
    tx: float = 0.0
    ty: float = 0.0
    inlier_fraction: float = 0.0
    n_valid: int = 0
    ok: bool = False

    def matrix(self) -> np.ndarray:
        return np.array([[self.scale, 0, self.tx], [0, self.scale, self.ty], [0, 0, 1]], dtype=np.float64)


def _block_centres(field: MotionField) -> tuple[np.ndarray, np.ndarray]:
    hb, wb = field.shape
    b = field.block
    x0 = np.arange(wb) * b
    y0 = np.arange(hb) * b
    cx = (x0 + np.minimum(x0 + b, field.width) - 1) / 2
    cy = (y0 + np.minimum(y0 + b, field.height) - 1) / 2
    return np.broadcast_to(cx[None, :], (hb, wb)), np.broadcast_to(cy[:, None], (hb, wb))


def _lsq(p: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares ``q = a p + b`` (scalar a, vector b)."""
    pm, qm = p.mean(0), q.mean(0)
    dp, dq = p - pm, q - qm
    den = float((dp * dp).sum())
    a = float((dp * dq).sum() / den) if den > 1e-12 else 1.0
    return a, qm - a * pm


def estimate_transform(field: MotionField, seed: int = 0) -> Similarity:
    """Robust similarity Delta (previous-frame px -> current-frame px) from a block motion field."""
    valid = np.asarray(field.valid, dtype=bool)
    n = int(valid.sum())
    if n < MIN_VALID_BLOCKS or field.scene_cut:
        return Similarity(n_valid=n)
    cx, cy = _block_centres(field)
    p = np.stack([cx[valid], cy[valid]], axis=1)
    q = p + np.stack([field.dx[valid], field.dy[valid]], axis=1).astype(np.float64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, RANSAC_ITERS)
    j = rng.integers(0, n, RANSAC_ITERS)
    dp = p[i] - p[j]
    dq = q[i] - q[j]
    den = (dp * dp).sum(1)
    ok = den > field.block**2 / 4  # distinct, non-degenerate pairs
    a = np.where(ok, (dp * dq).sum(1) / np.where(ok, den, 1.0), 1.0)
    a = np.where(a > 1e-3, a, 1.0)
    bvec = (q[i] + q[j]) / 2 - a[:, None] * (p[i] + p[j]) / 2
    # Also try pure translation (the median vector): robust when pairs are few or the scale is exactly 1.
    a = np.concatenate([a, [1.0]])
    bvec = np.concatenate([bvec, [np.median(q - p, axis=0)]])
    sub = rng.choice(n, SCORE_POINTS, replace=False) if n > SCORE_POINTS else np.arange(n)  # bounded memory
    ps, qs = p[sub], q[sub]
    rx = qs[None, :, 0] - a[:, None] * ps[None, :, 0] - bvec[:, 0, None]  # (hypotheses, points), no 3-D temp
    ry = qs[None, :, 1] - a[:, None] * ps[None, :, 1] - bvec[:, 1, None]
    best = int(np.argmax((rx * rx + ry * ry <= INLIER_PX**2).sum(1)))
    inl = np.linalg.norm(q - (a[best] * p + bvec[best]), axis=1) <= INLIER_PX
    for _ in range(2):
        if inl.sum() < 2:
            break
        s, off = _lsq(p[inl], q[inl])
        inl = np.linalg.norm(q - (s * p + off), axis=1) <= INLIER_PX
    frac = float(inl.mean())
    if inl.sum() < 2 or frac < MIN_INLIER_FRACTION:
        return Similarity(inlier_fraction=frac, n_valid=n)
    s, off = _lsq(p[inl], q[inl])
    # q = s p + off maps current to previous; invert for previous -> current.
    return Similarity(1 / s, float(-off[0] / s), float(-off[1] / s), frac, n, True)


class CameraTracker:
    """Accumulates per-frame deltas into ``M`` (global-view px -> current-view px)."""

    def __init__(self, initial: ArrayLike | None = None) -> None:
        self.matrix = np.eye(3) if initial is None else np.asarray(initial, dtype=np.float64).copy()
        self._last_delta = np.eye(3)

    def update(self, delta: ArrayLike) -> np.ndarray:
        """Apply Delta T (previous-view px -> current-view px) and return the new global->view map."""
        d = np.asarray(delta, dtype=np.float64)
        self.matrix = d @ self.matrix
        self.matrix /= self.matrix[2, 2]
        self._last_delta = d
        return self.matrix

    def update_from_field(self, field: MotionField) -> Similarity:
        """Estimate Delta T from motion vectors; a failed fit repeats the previous delta (smooth actuation)."""
        fit = estimate_transform(field)
        self.update(fit.matrix() if fit.ok else self._last_delta)
        return fit

    def reproject(self, boxes: ArrayLike, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        return reproject_boxes(boxes, self.matrix, width, height)
