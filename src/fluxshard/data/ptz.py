"""Virtual pan-tilt-zoom clips: a moving, zooming window cut out of a static-camera video, with exact motion.

Why: codec motion vectors and motion-compensated caches need ground truth for *camera* motion, and real PTZ
footage has none. Like the virtual-PTZ data set of Uirapuru (cut-outs of a high-resolution static view), each
output frame here is the source frame resampled under a known axis-aligned affine window, so the displacement
of every static scene point between two output frames is known exactly (:func:`ptz_displacement`).

Geometry (all recorded in the JSON written beside the clip):

* Pixel centres are at integer coordinates in both images: output pixel (column x, row y) shows the bilinear
  interpolation of the source at ``(X, Y) = affine @ (x, y, 1)``, source pixel (i, j) having its centre at
  (i, j). Axes: +x right, +y down.
* ``affine = [[s, 0, cx - s*(w-1)/2], [0, s, cy - s*(h-1)/2]]``: ``s`` is source px per output px and
  (cx, cy) the source point under the output centre. ``s = base_scale / zoom`` with
  ``base_scale = min(W/w, H/h) / 2``: zoom 1 shows half the widest view, so zooming out to ~0.5 and in to
  ``ZOOM_MAX`` both fit. Every sample point stays inside ``[0, W-1] x [0, H-1]`` (the window is clamped), so
  no padding is ever involved and the resampling is exactly the recorded transform.
* Equivalent pinhole angles for a nominal source focal length ``focal_px = (W/2) / tan(30°)`` (a 60°
  horizontal field of view): ``pan = atan((cx - (W-1)/2) / focal_px)``, ``tilt = atan((cy - (H-1)/2) /
  focal_px)`` (positive = right / down). They are nominal: a cut-out is a pure translation+scale of the image,
  not the slight keystone a rotating camera would give.

Trajectory grammar (comma-separated segments, each adding its frame count N after the start frame 0):
``pause:N``, ``pan:V:N`` / ``tilt:V:N`` (V output px per frame, + = window moves right / down, so static
content moves left / up), ``zoom:F:N`` (F > 1 zooms in by that factor per frame, about the window centre),
``move:VX:VY:F:N`` (all at once). ``random`` draws segments from a seeded generator (see
:func:`random_segments`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxshard.errors import DataError, VideoError
from fluxshard.files import write_text_atomic

ZOOM_MAX = 4.0
NOMINAL_HFOV_DEG = 60.0
CONVENTION = (
    "pixel centres at integer coordinates in both images; output pixel (x=column, y=row) is the bilinear "
    "interpolation of source frame `source_frame` at affine @ (x, y, 1); +x right, +y down; "
    "scale = source px per output px; pan/tilt = atan((cx-(W-1)/2)/focal_px), atan((cy-(H-1)/2)/focal_px)"
)

# Random trajectory ranges (inclusive), after Uirapuru §4.1: 15-50 frame actuations, 15-frame pauses.
RANDOM_PAUSE = 15
RANDOM_LENGTH = (15, 50)
RANDOM_PAN_SPEED = (1.0, 6.0)  # |V| in output px per frame
RANDOM_ZOOM_RATE = (0.005, 0.025)  # |ln F| per frame
RANDOM_DEFAULT_FRAMES = 250
_ACTIONS = ("pause", "pan", "tilt", "zoom", "move")


@dataclass(frozen=True)
class Segment:
    """One trajectory segment: ``frames`` steps, each moving the window by (vx, vy) output px and zooming."""

    action: str
    frames: int
    vx: float = 0.0
    vy: float = 0.0
    zoom: float = 1.0

    def text(self) -> str:
        """The grammar form; parsing it gives back this segment exactly (floats via repr)."""
        if self.action == "pause":
            return f"pause:{self.frames}"
        if self.action == "pan":
            return f"pan:{_num(self.vx)}:{self.frames}"
        if self.action == "tilt":
            return f"tilt:{_num(self.vy)}:{self.frames}"
        if self.action == "zoom":
            return f"zoom:{self.zoom!r}:{self.frames}"
        return f"move:{_num(self.vx)}:{_num(self.vy)}:{self.zoom!r}:{self.frames}"


def _num(v: float) -> str:
    return ("+" if v >= 0 else "") + repr(float(v))


def parse_trajectory(text: str) -> list[Segment]:
    """Parse the scripted grammar (see module docstring); errors name the offending segment."""
    segments: list[Segment] = []
    for raw in text.replace(" ", "").split(","):
        if not raw:
            continue
        parts = raw.split(":")
        action, args = parts[0].lower(), parts[1:]
        arity = {"pause": 1, "pan": 2, "tilt": 2, "zoom": 2, "move": 4}
        if action not in arity:
            raise DataError(
                f"trajectory segment {raw!r}: unknown action {action!r} (use {', '.join(_ACTIONS)})"
            )
        if len(args) != arity[action]:
            raise DataError(f"trajectory segment {raw!r}: {action} takes {arity[action]} value(s)")
        try:
            n = int(args[-1])
            vals = [float(a) for a in args[:-1]]
        except ValueError:
            raise DataError(
                f"trajectory segment {raw!r}: values must be numbers, frame count an integer"
            ) from None
        if n < 1 or not all(math.isfinite(v) for v in vals):
            raise DataError(f"trajectory segment {raw!r}: frame count must be >= 1 and values finite")
        if action == "pause":
            segments.append(Segment("pause", n))
        elif action == "pan":
            segments.append(Segment("pan", n, vx=vals[0]))
        elif action == "tilt":
            segments.append(Segment("tilt", n, vy=vals[0]))
        elif action == "zoom":
            segments.append(Segment("zoom", n, zoom=vals[0]))
        else:
            segments.append(Segment("move", n, vx=vals[0], vy=vals[1], zoom=vals[2]))
        if segments[-1].zoom <= 0:
            raise DataError(f"trajectory segment {raw!r}: zoom factor must be > 0")
    if not segments:
        raise DataError(f"trajectory {text!r} has no segments")
    return segments


@dataclass(frozen=True)
class Geometry:
    """Source/output sizes and the derived zoom limits; :meth:`clamp` keeps a window inside the source."""

    src_w: int
    src_h: int
    w: int
    h: int

    @property
    def base_scale(self) -> float:
        return min(self.src_w / self.w, self.src_h / self.h) / 2

    @property
    def zoom_min(self) -> float:
        # Widest window whose sample points all lie within [0, W-1] x [0, H-1].
        fit = min((self.src_w - 1) / (self.w - 1), (self.src_h - 1) / (self.h - 1))
        return self.base_scale / fit

    @property
    def focal_px(self) -> float:
        return (self.src_w / 2) / math.tan(math.radians(NOMINAL_HFOV_DEG / 2))

    def start(self) -> tuple[float, float, float]:
        return ((self.src_w - 1) / 2, (self.src_h - 1) / 2, 1.0)

    def clamp(self, cx: float, cy: float, zoom: float) -> tuple[float, float, float]:
        zoom = min(max(zoom, self.zoom_min), ZOOM_MAX)
        s = self.base_scale / zoom
        hx, hy = s * (self.w - 1) / 2, s * (self.h - 1) / 2
        cx = min(max(cx, hx), self.src_w - 1 - hx)
        cy = min(max(cy, hy), self.src_h - 1 - hy)
        return cx, cy, zoom

    def step(self, state: tuple[float, float, float], seg: Segment) -> tuple[float, float, float]:
        """One frame of ``seg``: pan by V output px at the current scale, then zoom about the centre."""
        cx, cy, zoom = state
        s = self.base_scale / zoom
        return self.clamp(cx + seg.vx * s, cy + seg.vy * s, zoom * seg.zoom)

    def affine(self, cx: float, cy: float, zoom: float) -> list[list[float]]:
        s = self.base_scale / zoom
        return [[s, 0.0, cx - s * (self.w - 1) / 2], [0.0, s, cy - s * (self.h - 1) / 2]]


def _fits(geom: Geometry, state: tuple[float, float, float], seg: Segment) -> bool:
    """True when ``seg`` runs its full length without the window hitting a source border or zoom limit."""
    cx, cy, zoom = state
    for _ in range(seg.frames):
        s = geom.base_scale / zoom
        want = (cx + seg.vx * s, cy + seg.vy * s, zoom * seg.zoom)
        got = geom.clamp(*want)
        if any(abs(a - b) > 1e-9 for a, b in zip(want, got, strict=True)):
            return False
        cx, cy, zoom = got
    return True


def random_segments(geom: Geometry, steps: int, seed: int) -> list[Segment]:
    """Seeded Uirapuru-style actuation: ``pause:15``, then alternately a random actuation and ``pause:15``.

    Each actuation is a pan, tilt or zoom (equally likely) of ``RANDOM_LENGTH`` frames with speed
    ``RANDOM_PAN_SPEED`` px/frame or zoom rate ``exp(±RANDOM_ZOOM_RATE)`` per frame (rounded, so the
    recorded script replays exactly). Directions that would hit a border are avoided; if neither does, the
    length is halved (down to 15), then another action is tried, and as a last resort the step is a pause.
    """
    rng = np.random.default_rng(seed)
    state = geom.start()
    segments: list[Segment] = []
    total = 0

    def add(seg: Segment) -> None:
        nonlocal state, total
        seg = Segment(seg.action, min(seg.frames, steps - total), seg.vx, seg.vy, seg.zoom)
        for _ in range(seg.frames):
            state = geom.step(state, seg)
        segments.append(seg)
        total += seg.frames

    while total < steps:
        add(Segment("pause", RANDOM_PAUSE))
        if total >= steps:
            break
        length = int(rng.integers(RANDOM_LENGTH[0], RANDOM_LENGTH[1] + 1))
        actions = [str(a) for a in rng.permutation(["pan", "tilt", "zoom"])]
        speed = round(float(rng.uniform(*RANDOM_PAN_SPEED)), 2)
        rate = round(math.exp(float(rng.uniform(*RANDOM_ZOOM_RATE))), 4)
        signs = [1, -1] if rng.random() < 0.5 else [-1, 1]
        chosen: Segment | None = None
        for action in actions:
            n = length
            while chosen is None and n >= RANDOM_LENGTH[0]:
                for sign in signs:
                    if action == "pan":
                        cand = Segment("pan", n, vx=sign * speed)
                    elif action == "tilt":
                        cand = Segment("tilt", n, vy=sign * speed)
                    else:
                        cand = Segment("zoom", n, zoom=rate if sign > 0 else round(1 / rate, 4))
                    if _fits(geom, state, Segment(cand.action, min(n, steps - total), cand.vx, cand.vy,
                                                  cand.zoom)):
                        chosen = cand
                        break
                n //= 2
            if chosen is not None:
                break
        add(chosen or Segment("pause", length))
    return segments


def _fit_length(segments: list[Segment], steps: int) -> list[Segment]:
    """Cut the script to ``steps`` frames, or hold the last view with a trailing pause."""
    out: list[Segment] = []
    left = steps
    for seg in segments:
        if left <= 0:
            break
        n = min(seg.frames, left)
        out.append(Segment(seg.action, n, seg.vx, seg.vy, seg.zoom))
        left -= n
    if left > 0:
        out.append(Segment("pause", left))
    return out


def plan_trajectory(
    trajectory: str, geom: Geometry, frames: int | None = None, seed: int = 0
) -> tuple[list[Segment], list[dict[str, Any]]]:
    """The segments actually run and one record per output frame (window state, affine, angles)."""
    if trajectory.strip().lower() == "random":
        n_frames = frames if frames is not None else RANDOM_DEFAULT_FRAMES
        segments = random_segments(geom, max(n_frames - 1, 0), seed)
    else:
        segments = parse_trajectory(trajectory)
        n_frames = frames if frames is not None else 1 + sum(s.frames for s in segments)
    if n_frames < 1:
        raise DataError(f"a PTZ clip needs at least 1 frame, got {n_frames}")
    segments = _fit_length(segments, n_frames - 1)
    state = geom.start()
    records = [_record(geom, 0, state, -1, "start")]
    for si, seg in enumerate(segments):
        for _ in range(seg.frames):
            state = geom.step(state, seg)
            records.append(_record(geom, len(records), state, si, seg.action))
    return segments, records


def _record(
    geom: Geometry, t: int, state: tuple[float, float, float], seg: int, action: str
) -> dict[str, Any]:
    cx, cy, zoom = state
    f = geom.focal_px
    return {
        "index": t,
        "source_frame": 0,
        "cx": cx,
        "cy": cy,
        "scale": geom.base_scale / zoom,
        "affine": geom.affine(cx, cy, zoom),
        "pan_deg": math.degrees(math.atan((cx - (geom.src_w - 1) / 2) / f)),
        "tilt_deg": math.degrees(math.atan((cy - (geom.src_h - 1) / 2) / f)),
        "zoom": zoom,
        "segment": seg,
        "action": action,
    }


def resample(src: np.ndarray, affine: Any, size: tuple[int, int]) -> np.ndarray:
    """Bilinear sample of ``src`` (H×W×C uint8) at ``affine @ (x, y, 1)`` for every output pixel (x, y).

    Axis-aligned affines only (separable); coordinates are clamped to the source, which never matters for
    windows produced here. This *is* the definition of the recorded transform, so tests can re-create frames.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a[0, 1] != 0 or a[1, 0] != 0:
        raise ValueError("resample supports axis-aligned affines only")
    w, h = size
    src_h, src_w = src.shape[:2]
    xs = np.clip(a[0, 0] * np.arange(w) + a[0, 2], 0, src_w - 1)
    ys = np.clip(a[1, 1] * np.arange(h) + a[1, 2], 0, src_h - 1)
    x0 = np.minimum(np.floor(xs).astype(np.intp), src_w - 2)
    y0 = np.minimum(np.floor(ys).astype(np.intp), src_h - 2)
    fx = (xs - x0).astype(np.float32)[None, :, None]
    fy = (ys - y0).astype(np.float32)[:, None, None]
    img = src.astype(np.float32) if src.ndim == 3 else src.astype(np.float32)[..., None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x0 + 1] * fx
    bot = img[y0 + 1][:, x0] * (1 - fx) + img[y0 + 1][:, x0 + 1] * fx
    out = np.clip(np.rint(top * (1 - fy) + bot * fy), 0, 255).astype(np.uint8)
    return out if src.ndim == 3 else out[..., 0]


def _source_frames(src: str, still: bool, need: int) -> Iterator[tuple[int, np.ndarray]]:
    """Source frames in order, restarting from frame 0 when the source ends (or frame 0 forever if still)."""
    from fluxshard.video import open_video

    if still:
        decoded = list(open_video(src, export_mvs=False, max_frames=1))
        if not decoded:
            raise VideoError(f"{src}: no decodable frame")
        rgb = decoded[0].rgb
        while True:
            yield 0, rgb
    done = 0
    while True:
        got = 0
        for frame in open_video(src, export_mvs=False, max_frames=need - done):
            yield frame.index, frame.rgb
            got += 1
            done += 1
        if got == 0:
            raise VideoError(f"{src}: no decodable frame")
        if done >= need:
            return


def make_ptz_clip(
    src: str | Path,
    out: str | Path,
    trajectory: str,
    *,
    size: tuple[int, int] = (384, 288),
    frames: int | None = None,
    seed: int = 0,
    fps: float | None = None,
    crf: int | None = 18,
    codec_options: dict[str, str] | None = None,
    still: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Render a virtual PTZ clip of ``src`` to ``out`` (H.264) and its ground truth to ``out.json``.

    Returns the JSON path. ``progress(done, total)`` is called after each encoded frame.
    """
    from fluxshard.video import VideoWriter, open_video

    out = Path(out)
    meta_path = out.with_suffix(".json")
    if meta_path == out:
        raise DataError(f"{out}: the clip needs a video suffix such as .mp4 (its metadata goes to .json)")
    w, h = size
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise DataError(f"PTZ output size {w}x{h} must be even and at least 2x2 (H.264 yuv420p)")
    probe = open_video(str(src), export_mvs=False, max_frames=1)
    src_fps = probe.info.fps
    decoded = list(probe)
    if not decoded:
        raise VideoError(f"{src}: no decodable frame")
    geom = Geometry(decoded[0].width, decoded[0].height, w, h)
    if geom.src_w < 2 or geom.src_h < 2:
        raise VideoError(f"{src}: source {geom.src_w}x{geom.src_h} is too small")
    segments, records = plan_trajectory(trajectory, geom, frames, seed)
    total = len(records)
    writer = VideoWriter(out, fps=fps or src_fps, crf=crf, options=codec_options)
    try:
        with writer:
            for rec, (k, rgb) in zip(records, _source_frames(str(src), still, total), strict=False):
                if rgb.shape[:2] != (geom.src_h, geom.src_w):
                    raise VideoError(f"{src}: frame {k} is {rgb.shape[1]}x{rgb.shape[0]}, "
                                     f"first frame was {geom.src_w}x{geom.src_h}")
                rec["source_frame"] = k
                writer.write(resample(rgb, rec["affine"], size))
                if progress is not None:
                    progress(writer.frames, total)
        if writer.frames != total:
            raise VideoError(f"{src}: only {writer.frames} of {total} PTZ frames could be rendered")
    except BaseException:
        out.unlink(missing_ok=True)  # a clip without its ground truth must not look usable
        raise
    meta = {
        "source": str(src),
        "source_size": [geom.src_w, geom.src_h],
        "size": [w, h],
        "fps": float(writer.fps),
        "trajectory": trajectory,
        "script": ",".join(s.text() for s in segments),
        "seed": seed,
        "still": still,
        "crf": crf,
        "codec_options": dict(codec_options or {}),
        "convention": CONVENTION,
        "base_scale": geom.base_scale,
        "zoom_limits": [geom.zoom_min, ZOOM_MAX],
        "focal_px": geom.focal_px,
        "frames": records,
    }
    return write_text_atomic(meta_path, json.dumps(meta, indent=1) + "\n")


def load_ptz_meta(path: str | Path) -> dict[str, Any]:
    """Read a PTZ clip's ground truth; ``path`` is the JSON or the clip (its ``.json`` sibling is read)."""
    p = Path(path)
    if p.suffix != ".json":
        p = p.with_suffix(".json")
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{p}: no such PTZ metadata file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: cannot read PTZ metadata ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or "size" not in meta:
        raise DataError(f"{p}: not a PTZ metadata file (needs 'size' and 'frames')")
    return meta


def ptz_affine(meta: dict[str, Any], t: int) -> np.ndarray:
    """3×3 homogeneous matrix mapping output pixel coordinates of frame ``t`` to source coordinates."""
    n = len(meta["frames"])
    if not 0 <= t < n:
        raise IndexError(f"PTZ frame {t} out of range 0..{n - 1}")
    m = np.eye(3)
    m[:2] = np.asarray(meta["frames"][t]["affine"], dtype=np.float64)
    return m


def ptz_displacement(meta: dict[str, Any], t: int, xy: np.ndarray, ref: int | None = None) -> np.ndarray:
    """Displacement (N×2) from output pixels ``xy`` (N×2, x=column, y=row) of frame ``t`` to the same static
    scene point in frame ``ref`` (default ``t - 1``): ``A_ref^-1(A_t(p)) - p``.

    This is what a codec motion vector (which points into its reference frame) should equal for static
    content; pass ``ref=t+1`` for vectors that point into a future frame.
    """
    ref = t - 1 if ref is None else ref
    if ref < 0:
        raise IndexError(f"PTZ frame {t} has no previous frame")
    m = np.linalg.inv(ptz_affine(meta, ref)) @ ptz_affine(meta, t)
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return p @ m[:2, :2].T + m[:2, 2] - p
