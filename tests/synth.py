"""Synthetic clips with known per-block motion: a textured background panning at ``bg`` px/frame and a
textured square object moving at ``obj`` px/frame. Truth: field into the previous frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxshard.video import VideoWriter


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish random RGB texture (box-blurred noise): strong gradients, no periodicity."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.float32)
    a = np.repeat(np.repeat(a, 4, 0), 4, 1)[:h, :w]
    k = 3
    for axis in (0, 1):
        a = sum(np.roll(a, s, axis) for s in range(-k, k + 1)) / (2 * k + 1)
    return np.clip(a, 0, 255).astype(np.uint8)


@dataclass
class SynthClip:
    path: Path
    frames: int
    size: tuple[int, int]  # (w, h)
    bg: tuple[int, int]  # (vy, vx) background displacement into previous frame
    obj: tuple[int, int]  # (vy, vx) object velocity (frame to frame)
    obj_size: int
    obj_start: tuple[int, int]

    def object_box(self, t: int) -> tuple[int, int, int, int]:
        y = self.obj_start[0] + t * self.obj[0]
        x = self.obj_start[1] + t * self.obj[1]
        return y, x, y + self.obj_size, x + self.obj_size

    def truth(self, t: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dy, dx, known) per block: known where the block is all background or all object in frames
        t and t-1 and its source lies inside the previous frame."""
        w, h = self.size
        hb, wb = -(-h // block), -(-w // block)
        dy = np.full((hb, wb), self.bg[0])
        dx = np.full((hb, wb), self.bg[1])
        known = np.ones((hb, wb), bool)
        y0, x0, y1, x1 = self.object_box(t)
        py0, px0, py1, px1 = self.object_box(t - 1)
        for i in range(hb):
            for j in range(wb):
                by0, bx0, by1, bx1 = i * block, j * block, min((i + 1) * block, h), min((j + 1) * block, w)
                inside = by0 >= y0 and by1 <= y1 and bx0 >= x0 and bx1 <= x1
                touches = by1 > y0 and by0 < y1 and bx1 > x0 and bx0 < x1
                if inside:
                    dy[i, j], dx[i, j] = -self.obj[0], -self.obj[1]
                elif touches:
                    known[i, j] = False
                    continue
                sy0, sx0 = by0 + dy[i, j], bx0 + dx[i, j]
                sy1, sx1 = by1 + dy[i, j], bx1 + dx[i, j]
                if sy0 < 0 or sx0 < 0 or sy1 > h or sx1 > w:
                    known[i, j] = False
                # background blocks whose source was covered by the object in t-1 are not predictable
                if not inside and sy1 > py0 and sy0 < py1 and sx1 > px0 and sx0 < px1:
                    known[i, j] = False
        return dy, dx, known


def make_clip(
    path: Path,
    frames: int = 24,
    size: tuple[int, int] = (320, 192),
    bg: tuple[int, int] = (1, 3),
    obj: tuple[int, int] = (2, -4),
    obj_size: int = 64,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    seed: int = 0,
    cut_at: int | None = None,
) -> SynthClip:
    """Encode the clip; ``cut_at`` switches to unrelated content from that frame on (a scene cut)."""
    w, h = size
    margin = 4 * frames * max(abs(v) for v in bg) + 8
    big = texture(h + margin * 2, w + margin * 2, seed)
    other = texture(h + margin * 2, w + margin * 2, seed + 7) if cut_at is not None else big
    obj_tex = texture(obj_size, obj_size, seed + 1)
    clip = SynthClip(path, frames, size, bg, obj, obj_size, (h // 2 - obj_size // 2, w // 2 - obj_size // 2))
    opts = {"g": "1000", "bf": "0", "refs": "1"} if codec == "libx264" else {"x265-params": "log-level=none"}
    opts.update(options or {})
    with VideoWriter(path, fps=25, codec=codec, crf=16, options=opts) as wr:
        for t in range(frames):
            oy, ox = margin + t * bg[0], margin + t * bg[1]
            src = other if cut_at is not None and t >= cut_at else big
            img = src[oy : oy + h, ox : ox + w].copy()
            y0, x0, y1, x1 = clip.object_box(t)
            ys, xs = slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w))
            img[ys, xs] = obj_tex[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            wr.write(img)
    return clip
