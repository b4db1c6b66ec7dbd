"""Overlay drawing: the legend box names each colour used, labels stay inside the frame and off each other."""

from __future__ import annotations

import numpy as np
import pytest

from fluxshard.models.base import Detections, Keypoints, Segmentations
from fluxshard.motion.field import MotionField
from fluxshard.viz import (
    ARROW,
    FILLED,
    INVALID,
    KEYPOINT,
    LIMB,
    RECOMPUTED,
    RESIDUAL,
    RUN_LEGEND,
    TILE_LEGEND,
    LegendItem,
    class_color,
    draw_boxes,
    draw_legend,
    draw_results,
    font_for,
    label_rects,
    legend_rect,
    motion_legend,
    motion_overlay,
    results_legend,
)

H, W = 240, 320


def _grey() -> np.ndarray:
    return np.full((H, W, 3), 128, np.uint8)


def _near(region: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> int:
    """Pixels of ``region`` within ``tol`` of ``color`` on every channel."""
    return int((np.abs(region.astype(int) - np.asarray(color)).max(axis=-1) <= tol).sum())


def _field(filled: bool) -> MotionField:
    hb, wb = H // 16, W // 16
    dy, dx = np.zeros((hb, wb), np.int32), np.zeros((hb, wb), np.int32)
    dx[2:5, 10:14] = 6
    valid = np.ones((hb, wb), bool)
    valid[:3, :3] = False
    fill = np.zeros((hb, wb), bool) if filled else None
    if fill is not None:
        fill[2, 10] = True
    return MotionField(dy, dx, valid, 16, H, W, source="codec", filled=fill)


def _inside(rect: tuple[int, int, int, int]) -> bool:
    return 0 <= rect[0] < rect[2] <= W and 0 <= rect[1] < rect[3] <= H


def test_legend_box_in_bottom_left_with_each_swatch_and_text() -> None:
    items = motion_legend(_field(filled=True))
    assert [it.color for it in items] == [RESIDUAL, INVALID, ARROW, FILLED]
    out = draw_legend(_grey(), items)
    x0, y0, x1, y1 = legend_rect(items, (W, H))
    assert x0 < 10 and y1 > H - 10 and _inside((x0, y0, x1, y1))  # bottom-left corner, within the frame
    box = out[y0:y1, x0:x1]
    assert (box.astype(int).sum(-1) < 3 * 128).mean() > 0.5  # darkened (semi-transparent), not blacked out
    assert _near(box, (255, 255, 255), 30) > 50  # white text
    for c in (RESIDUAL, INVALID, ARROW, FILLED):  # one swatch per meaning, in its colour
        assert _near(box, c) > 3, c
    rest = out.copy()
    rest[y0:y1, x0:x1] = 128
    assert (rest == 128).all()  # nothing drawn outside the legend box
    top = legend_rect(items, (W, H), corner="top-left")
    assert top[1] < 10 and (draw_legend(_grey(), items, corner="top-left")[top[1]:top[3], top[0]:top[2]] != 128).any()
    assert (draw_legend(_grey(), []) == 128).all()


def test_motion_overlay_legend_only_names_what_it_can_draw() -> None:
    assert FILLED not in [it.color for it in motion_legend(_field(filled=False))]
    fld = _field(filled=True)
    residual = np.zeros(fld.shape, bool)
    residual[5:7, 5:8] = True
    with_legend = motion_overlay(_grey(), fld, residual)
    plain = motion_overlay(_grey(), fld, residual, legend=False)
    x0, y0, x1, y1 = legend_rect(motion_legend(fld), (W, H))
    assert (with_legend[y0:y1, x0:x1] != plain[y0:y1, x0:x1]).any()
    outside = np.ones((H, W), bool)
    outside[y0:y1, x0:x1] = False
    assert (with_legend[outside] == plain[outside]).all()
    assert _near(plain[5 * 16:7 * 16, 5 * 16:8 * 16], RESIDUAL, 90) > 0  # the red tint the legend names


def test_label_near_right_and_top_edges_is_kept_inside_the_frame() -> None:
    boxes = np.array([[W - 10, 100, W - 1, 150], [50, 0, 90, 40], [W - 5, H - 5, W - 1, H - 1]], float)
    rects = label_rects(boxes, [(60, 14)] * 3, (W, H))
    assert all(r is not None and _inside(r) for r in rects), rects
    assert rects[0][2] == W  # pushed left until its right edge meets the frame's
    assert rects[1][1] == 0  # no room above a box at the top: inside its top edge


def test_labels_of_close_boxes_do_not_overlap() -> None:
    boxes = np.array([[100, 100, 140, 180], [104, 103, 144, 183], [102, 101, 142, 181]], float)
    rects = label_rects(boxes, [(50, 14)] * 3, (W, H))
    assert rects[0] == (100, 86, 150, 100)  # above the first box
    assert rects[1] == (104, 183, 154, 197)  # above would cover the first label: below
    placed = [r for r in rects if r is not None]
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert rects[2] is None or rects[2][1] == 101  # inside its own box, or left out
    legend = (0, 150, 200, 240)  # a box reaching under the legend: its label goes above, clear of it
    above = label_rects(np.array([[10, 140, 60, 200]], float), [(40, 14)], (W, H), avoid=[legend])
    assert above == [(10, 126, 50, 140)]
    assert label_rects(np.array([[10, 170, 60, 200]], float), [(40, 14)], (W, H), avoid=[legend]) == [None]


def test_draw_boxes_label_background_inside_frame_at_the_right_edge() -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    out = draw_boxes(rgb, np.array([[W - 12, 60, W - 1, 120]], float), np.array([0.9]), np.array([2]),
                     ("a", "b", "a-long-class-name"))
    color = class_color(2)
    cols = np.nonzero((out[:60] == color).all(-1).any(0))[0]
    assert cols.size > 40  # the label background sits above the box and is not cut to the box's 12 px
    assert cols.max() == W - 1 and cols.min() < W - 50


def test_draw_results_with_legend_keeps_labels_off_it() -> None:
    det = Detections([[20, H - 60, 70, H - 10]], [0.9], [0])  # box in the legend's corner
    plain = draw_results(_grey(), det)
    shown = draw_results(_grey(), det, legend=RUN_LEGEND)
    items = [*RUN_LEGEND, *results_legend(det)]
    x0, y0, x1, y1 = legend_rect(items, (W, H))
    assert (plain[y0:y1, x0:x1] != shown[y0:y1, x0:x1]).any()
    assert _near(shown[y0:y1, x0:x1], RECOMPUTED) > 3
    label = (shown[: y0] == class_color(0)).all(-1)  # the label moved above the legend, still drawn
    assert label.sum() > 30
    assert (draw_results(_grey(), Detections(np.zeros((0, 4)), [], []), legend=()) != 128).any()  # legend alone


def test_results_legend_per_kind() -> None:
    kp = np.zeros((1, 17, 3), np.float32)
    assert [it.color for it in results_legend(Keypoints(kp, [0.9], [[0, 0, 1, 1]]))][1:] == [KEYPOINT, LIMB]
    seg = Segmentations([[0, 0, 4, 4]], [0.9], [0], masks=np.zeros((1, 8, 8), bool))
    assert [it.kind for it in results_legend(seg)] == ["box", "tint"]
    assert [it.kind for it in results_legend(Detections(np.zeros((0, 4)), [], []))] == ["box"]
    assert TILE_LEGEND[0].kind == "box" and isinstance(TILE_LEGEND[0], LegendItem)


@pytest.mark.parametrize(("height", "size"), [(120, 10), (576, 12), (2160, 18)])
def test_font_scales_with_frame_height(height: int, size: int) -> None:
    assert font_for(height).size == size


def test_legend_on_a_frame_smaller_than_it_is_clipped_not_an_error() -> None:
    items = motion_legend(_field(filled=True))
    tiny = np.full((30, 40, 3), 128, np.uint8)
    out = draw_legend(tiny, items)
    r = legend_rect(items, (40, 30))
    assert out.shape == tiny.shape and 0 <= r[0] < r[2] <= 40 and 0 <= r[1] < r[3] <= 30
    assert (out != 128).any() and (tiny == 128).all()  # drawn on a copy
