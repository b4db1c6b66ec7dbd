"""Drawing on frames (PIL): motion arrows, residual/reused block tints, boxes with labels, and a legend box
naming what each colour means; shared by every CLI overlay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fluxshard.motion.field import MotionField

RESIDUAL = (255, 40, 40)
INVALID = (40, 90, 255)
ARROW = (40, 255, 80)
FILLED = (255, 220, 40)
# `fluxshard run --out`: first-convolution positions recomputed this frame; blue, not the red of person boxes
RECOMPUTED = (40, 110, 255)
TILE = (255, 255, 0)  # `fluxshard tile --out`: one tile run (a model on a crop)

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels, x1/y1 exclusive


@dataclass(frozen=True)
class LegendItem:
    """One line of an overlay's legend: a swatch drawn the way the overlay draws that thing, and its meaning."""

    kind: Literal["tint", "arrow", "box", "dot", "line"]
    color: tuple[int, int, int]
    text: str


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's embedded font (>= 10.1): scalable, nothing to find or download.
    return ImageFont.load_default(size=size)


def font_for(height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A label/legend font readable at this frame height without hiding the scene: 10 px up to 18 px."""
    return _font(int(np.clip(round(height / 48), 10, 18)))


_MEASURE = ImageDraw.Draw(Image.new("1", (1, 1)))


@lru_cache(maxsize=4096)
def _text_box(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int, int, int]:
    # cached: the same "person 0.87" recurs frame after frame, and FreeType measuring is ~0.1 ms a call
    x0, y0, x1, y1 = _MEASURE.textbbox((0, 0), text, font=font)
    return int(x0), int(y0), int(x1), int(y1)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_rects(boxes: np.ndarray, sizes: Sequence[tuple[int, int]], frame_wh: tuple[int, int],
                avoid: Sequence[Rect] = ()) -> list[Rect | None]:
    """Where each box's label goes: greedily, in box order, the first of above the box, below it, inside its
    top edge that covers no earlier label (nor ``avoid``, e.g. the legend), shifted into the frame so no
    label is cut at an edge. None: every place would cover an earlier label, so that label is left out."""
    fw, fh = frame_wh
    taken: list[Rect] = list(avoid)
    out: list[Rect | None] = []
    for b, (w, h) in zip(np.asarray(boxes, float).reshape(-1, 4), sizes, strict=True):
        x = int(np.clip(round(b[0]), 0, max(0, fw - w)))
        chosen = None
        for y in (b[1] - h, b[3], b[1]):
            y = int(np.clip(round(y), 0, max(0, fh - h)))
            r = (x, y, x + w, y + h)
            if not any(_overlaps(r, t) for t in taken):
                chosen = r
                break
        if chosen is not None:
            taken.append(chosen)
        out.append(chosen)
    return out


def legend_rect(items: Sequence[LegendItem], frame_wh: tuple[int, int],
                corner: Literal["bottom-left", "top-left"] = "bottom-left") -> Rect:
    """The frame rectangle the legend of ``items`` covers (labels keep out of it)."""
    return _legend_layer(tuple(items), tuple(frame_wh), corner)[0]


@lru_cache(maxsize=16)
def _legend_layer(items: tuple[LegendItem, ...], frame_wh: tuple[int, int],
                  corner: Literal["bottom-left", "top-left"]) -> tuple[Rect, np.ndarray, np.ndarray]:
    """The legend rendered once per overlay (rect, colour H×W×3 float32, alpha H×W×1 float32): each frame
    then only blends a small patch, ~0.2 ms instead of ~10 ms of FreeType rendering and PIL round trips."""
    fw, fh = frame_wh
    font = font_for(fh)
    line = _text_box("Ag", font)[3] + 3
    width = max((_text_box(it.text, font)[2] for it in items), default=0) + line + 14
    layer = Image.new("RGBA", (max(1, min(fw - 4, width)), max(1, min(fh, len(items) * line + 6))), (0, 0, 0, 150))
    d = ImageDraw.Draw(layer)
    sw = line - 5  # swatch side
    for k, it in enumerate(items):
        sx, sy = 4, 3 + k * line + 2
        c = (*it.color, 255)
        if it.kind == "tint":
            d.rectangle([sx, sy, sx + sw, sy + sw], fill=c)  # opaque: the key colour, not the frame's blend
        elif it.kind == "box":
            d.rectangle([sx, sy, sx + sw, sy + sw], outline=c, width=2)
        elif it.kind == "dot":
            d.ellipse([sx + sw / 4, sy + sw / 4, sx + 3 * sw / 4, sy + 3 * sw / 4], fill=c)
        elif it.kind == "line":
            d.line([(sx, sy + sw), (sx + sw, sy)], fill=c, width=2)
        else:  # arrow: tail at the reference position, dot at the current one, as motion_overlay draws it
            d.line([(sx, sy + sw), (sx + sw - 1, sy + 1)], fill=c, width=1)
            d.ellipse([sx + sw - 3, sy - 1, sx + sw + 1, sy + 3], fill=c)
        bx = _text_box(it.text, font)
        d.text((sx + sw + 6 - bx[0], 3 + k * line), it.text, fill=(255, 255, 255, 255), font=font)
    arr = np.asarray(layer, np.float32)
    ink = np.nonzero((arr[..., 3] > 150).any(axis=0))[0]  # textbbox counts advance widths: trim to the ink
    arr = arr[:, : min(arr.shape[1], int(ink.max()) + 5 if ink.size else arr.shape[1])]
    h, w = arr.shape[:2]
    y = 4 if corner == "top-left" else max(0, fh - 4 - h)
    return (4, y, 4 + w, y + h), arr[..., :3], arr[..., 3:] / 255.0


def draw_legend(rgb: np.ndarray, items: Sequence[LegendItem],
                corner: Literal["bottom-left", "top-left"] = "bottom-left") -> np.ndarray:
    """A compact, semi-transparent box in a corner naming each colour the overlay uses (new array)."""
    out = np.array(rgb, np.uint8)  # a copy: callers keep their frame
    if not items:
        return out
    (x0, y0, x1, y1), color, alpha = _legend_layer(tuple(items), (out.shape[1], out.shape[0]), corner)
    patch = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (patch + (color - patch) * alpha + 0.5).astype(np.uint8)
    return out


def motion_legend(field: MotionField) -> list[LegendItem]:
    """What :func:`motion_overlay` draws; the filled-vector colour only where the field can have them."""
    items = [LegendItem("tint", RESIDUAL, "residual: changed after MV alignment"),
             LegendItem("tint", INVALID, "no motion vector (intra, I-frame, cut)"),
             LegendItem("arrow", ARROW, "motion: reference position -> now")]
    if field.filled is not None:
        items.append(LegendItem("arrow", FILLED, "vector found by candidate filling"))
    return items


RUN_LEGEND = (LegendItem("tint", RECOMPUTED, "recomputed (whole frame when dense)"),)
TILE_LEGEND = (LegendItem("box", TILE, "tile run (label: model)"),)


def tint_blocks(rgb: np.ndarray, mask: np.ndarray, block: int, color: tuple[int, int, int],
                alpha: float = 0.35) -> np.ndarray:
    """Blend ``color`` into every block where ``mask`` is True (returns a new array). PIL's blend and
    composite run in C: ~1–2 ms for a 768×576 frame against ~10 ms for a float32 copy and a masked assignment."""
    h, w = rgb.shape[:2]
    m = mask if block == 1 else np.repeat(np.repeat(mask, block, 0), block, 1)
    full = np.zeros((h, w), np.uint8)
    hh, ww = min(h, m.shape[0]), min(w, m.shape[1])
    full[:hh, :ww] = m[:hh, :ww]
    if not full.any():
        return rgb.copy()
    img = Image.fromarray(np.ascontiguousarray(rgb))
    tinted = Image.blend(img, Image.new("RGB", img.size, tuple(color)), alpha)
    return np.array(Image.composite(tinted, img, Image.fromarray(full * np.uint8(255))))  # writable, like before


def motion_overlay(rgb: np.ndarray, field: MotionField, residual: np.ndarray | None = None,
                   arrow_step: int = 1, legend: bool = True) -> np.ndarray:
    """Frame with residual blocks tinted red, invalid blocks blue, an arrow per moving block, and a legend.

    Red: a block with a vector whose content still differs from the cached frame after MV alignment (the
    residual set, recomputed); blue: no trustworthy vector (intra blocks, I-frames, scene cuts). Arrows run
    from where the content was in the reference frame to where it is now (the opposite of the stored
    displacement), green; vectors recovered by candidate filling are drawn yellow.
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
    return draw_legend(np.asarray(img), motion_legend(field)) if legend else np.asarray(img)


# --- model results: boxes with labels, instance masks, pose skeletons ---------------------------------------

_PALETTE = (
    (255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
    (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
    (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
    (255, 149, 200), (255, 55, 199),
)  # fmt: skip
KEYPOINT = (255, 255, 0)
LIMB = (0, 200, 255)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable colour per class id, so the same class looks the same in every frame."""
    return _PALETTE[int(class_id) % len(_PALETTE)]


def draw_masks(rgb: np.ndarray, masks: np.ndarray, class_ids: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend each boolean H×W mask in its class colour (returns a new array)."""
    out = rgb.astype(np.float32)
    for m, c in zip(masks, class_ids, strict=True):
        out[m] = out[m] * (1 - alpha) + np.asarray(class_color(int(c)), np.float32) * alpha
    return out.astype(np.uint8)


def draw_boxes(rgb: np.ndarray, boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
               class_names: tuple[str, ...] | None = None, width: int = 2, avoid: Sequence[Rect] = ()) -> np.ndarray:
    """Boxes (xyxy, frame pixels) with a ``"name 0.87"`` label each, placed by :func:`label_rects` (kept
    inside the frame, never over an earlier label nor ``avoid``)."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(img)
    font = font_for(img.height)
    texts, sizes, colors = [], [], []
    for b, s, c in zip(boxes, scores, class_ids, strict=True):
        color = class_color(int(c))
        draw.rectangle([float(b[0]), float(b[1]), float(b[2]), float(b[3])], outline=color, width=width)
        name = class_names[int(c)] if class_names is not None and int(c) < len(class_names) else str(int(c))
        texts.append(f"{name} {float(s):.2f}")
        x0, y0, x1, y1 = _text_box(texts[-1], font)
        sizes.append((x1 - x0 + 4, y1 - y0 + 4))
        colors.append(color)
    for text, color, r in zip(texts, colors, label_rects(boxes, sizes, img.size, avoid), strict=True):
        if r is None:
            continue
        x0, y0, _, _ = _text_box(text, font)
        draw.rectangle([r[0], r[1], r[2] - 1, r[3] - 1], fill=color)
        draw.text((r[0] + 2 - x0, r[1] + 2 - y0), text, fill=(0, 0, 0) if sum(color) > 380 else (255, 255, 255),
                  font=font)
    return np.asarray(img)


def draw_skeletons(rgb: np.ndarray, keypoints: np.ndarray, skeleton: tuple[tuple[int, int], ...],
                   min_score: float = 0.3, radius: float = 2.5) -> np.ndarray:
    """Limbs between keypoint pairs both scoring ≥ ``min_score``, then the keypoints themselves."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(img)
    for inst in keypoints:
        for a, b in skeleton:
            if inst[a, 2] >= min_score and inst[b, 2] >= min_score:
                draw.line([(float(inst[a, 0]), float(inst[a, 1])), (float(inst[b, 0]), float(inst[b, 1]))],
                          fill=LIMB, width=2)
        for x, y, s in inst:
            if s >= min_score:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=KEYPOINT)
    return np.asarray(img)


def results_legend(results: object) -> list[LegendItem]:
    """Legend lines for what :func:`draw_results` draws for this kind of result."""
    from fluxshard.models.base import Detections, Keypoints, Segmentations

    if isinstance(results, Keypoints):
        return [LegendItem("box", class_color(0), "person (label: score)"), LegendItem("dot", KEYPOINT, "keypoint"),
                LegendItem("line", LIMB, "limb")]
    items = [LegendItem("box", class_color(0), "detection, colour = class (label: class score)")]
    if isinstance(results, Segmentations):
        items.append(LegendItem("tint", class_color(0), "instance mask, colour = class"))
    return items if isinstance(results, Detections) else []


def draw_results(rgb: np.ndarray, results: object, min_score: float = 0.3,
                 legend: Sequence[LegendItem] | None = None) -> np.ndarray:
    """Any typed model result (:mod:`fluxshard.models.base`): masks, then boxes + labels, then skeletons.

    ``legend``: None draws none; otherwise a legend of these lines (what the caller drew before, e.g. a
    tint) and the result's own (:func:`results_legend`), in the bottom-left corner, kept clear of labels.
    """
    from fluxshard.models.base import Detections, Keypoints, Segmentations

    items = None if legend is None else [*legend, *results_legend(results)]
    avoid = () if items is None else (legend_rect(items, (rgb.shape[1], rgb.shape[0])),)
    out = rgb
    if isinstance(results, Keypoints):
        keep = results.scores >= min_score
        boxes = results.boxes[keep]
        has_box = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out = draw_boxes(out, boxes[has_box], results.scores[keep][has_box], np.zeros(int(has_box.sum()), int),
                         ("person",), avoid=avoid)
        out = draw_skeletons(out, results.keypoints[keep], results.skeleton)
    elif isinstance(results, Detections):
        res = results.filter(min_score)
        if isinstance(res, Segmentations) and len(res):
            out = draw_masks(out, res.masks, res.class_ids)
        out = draw_boxes(out, res.boxes, res.scores, res.class_ids, res.class_names, avoid=avoid)
    else:
        raise TypeError(f"cannot draw {type(results).__name__}")
    return out if items is None else draw_legend(out, items)
