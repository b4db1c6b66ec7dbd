"""Frame inference: padded slicing, letterbox + back-mapping, NMS merge parity, real NanoDet on tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxshard.models.base import Detections
from fluxshard.tiling.infer import (
    CANVAS_VALUE,
    DetectorFamily,
    letterbox,
    map_back,
    merge,
    padded_crop,
    uniform_grid,
)


def test_padded_crop_is_uniform_and_clipped() -> None:
    # interior tile: 5 % of the longer side (20 px) on every side
    assert padded_crop((100, 100, 500, 300), 1000, 1000) == (80, 80, 520, 320)
    # small tile: at least 8 px
    assert padded_crop((50, 50, 90, 70), 1000, 1000) == (42, 42, 98, 78)
    # at the frame border the padding is clipped, never outside the frame
    assert padded_crop((0, 0, 640, 480), 640, 480) == (0, 0, 640, 480)
    assert padded_crop((320.5, 240.25, 640, 480), 640, 480) == (304, 224, 640, 480)  # pad 15.975
    assert padded_crop((10, 10, 20, 20), 100, 100, 0.0, 0) == (10, 10, 20, 20)
    with pytest.raises(ValueError):
        padded_crop((5, 5, 5, 9), 10, 10)


def test_letterbox_keeps_aspect_and_pads_grey() -> None:
    crop = np.full((100, 200, 3), 255, np.uint8)
    x, scale = letterbox(crop, 320)
    assert x.shape == (1, 3, 320, 320) and scale == pytest.approx(1.6)
    assert torch.allclose(x[:, :, :160, :], torch.ones(1)) and torch.allclose(x[:, :, 160:, :], torch.tensor(
        CANVAS_VALUE))


def test_map_back_inverts_letterbox() -> None:
    rng = np.random.default_rng(0)
    crop = (37, 81, 37 + 300, 81 + 180)
    scale = 416 / 300
    frame_boxes = np.sort(rng.uniform(0, 1, (20, 2, 2)), axis=1)
    frame_boxes = np.c_[frame_boxes[:, 0, 0] * 300, frame_boxes[:, 0, 1] * 180, frame_boxes[:, 1, 0] * 300,
                        frame_boxes[:, 1, 1] * 180] + [37, 81, 37, 81]
    inp = (frame_boxes - [37, 81, 37, 81]) * scale
    assert np.allclose(map_back(inp, scale, crop), frame_boxes)
    # boxes hanging over the crop are clipped to it
    assert np.allclose(map_back(np.array([[-10.0, -10, 1000, 1000]]), scale, crop), [crop])


def _greedy_nms_reference(boxes: np.ndarray, scores: np.ndarray, cids: np.ndarray, thr: float) -> set[int]:
    """Brute force: per class, highest score first, drop every later box with IoU > thr."""
    keep: set[int] = set()
    for c in np.unique(cids):
        idx = [i for i in np.argsort(-scores, kind="stable") if cids[i] == c]
        alive = list(idx)
        while alive:
            i = alive.pop(0)
            keep.add(int(i))
            rest = []
            for j in alive:
                xx0, yy0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
                xx1, yy1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
                inter = max(0.0, xx1 - xx0) * max(0.0, yy1 - yy0)
                a = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                b = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
                if inter / (a + b - inter) <= thr:
                    rest.append(j)
            alive = rest
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_brute_force_nms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts, all_boxes, all_scores, all_cids = [], [], [], []
    for _ in range(4):  # four tiles, overlapping duplicates of the same objects
        n = int(rng.integers(0, 12))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 60, (n, 2))
        b = np.c_[xy, xy + wh].astype(np.float32)
        s = rng.permutation(np.linspace(0.05, 0.99, n)).astype(np.float32) if n else np.zeros(0, np.float32)
        c = rng.integers(0, 3, n)
        parts.append(Detections(b, s, c))
        all_boxes.append(b)
        all_scores.append(s)
        all_cids.append(c)
    got = merge(parts)
    boxes, scores, cids = np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_cids)
    want = _greedy_nms_reference(boxes.astype(np.float64), scores, cids, 0.6)
    assert len(got) == len(want)
    got_set = {(*np.round(b, 3).tolist(), int(c)) for b, c in zip(got.boxes, got.class_ids, strict=True)}
    want_set = {(*np.round(boxes[i], 3).tolist(), int(cids[i])) for i in want}
    assert got_set == want_set


def test_uniform_grid_covers_frame() -> None:
    g = uniform_grid(1280, 960, 416)
    assert len(g) == 4 * 3
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in g)
    assert area == pytest.approx(1280 * 960)
    assert g[-1][2:] == pytest.approx((1280, 960))


class _BrightBoxDetector:
    """Fake adapter: the 'detection' is the bounding box of input pixels brighter than 0.9 (input px)."""

    name = "fake"
    weights = None

    class body:  # mimics an nn.Module attribute
        @staticmethod
        def to(memory_format: torch.memory_format) -> None:
            return None

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x

    body = body()

    def postprocess_input(self, out: torch.Tensor, hw: tuple[int, int]) -> Detections:
        m = (out[0].min(0).values > 0.9).numpy()
        ys, xs = np.nonzero(m)
        if not len(xs):
            return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
        return Detections(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]), [0.9], [0])


def _fake_family(sizes: tuple[int, ...]) -> DetectorFamily:
    fam = DetectorFamily.__new__(DetectorFamily)
    fam.adapter = _BrightBoxDetector()
    fam.sizes = sizes
    fam.model = "fake"
    fam.names = [f"fake{s}" for s in sizes]
    fam.fmt = torch.contiguous_format
    return fam


@pytest.mark.parametrize("size", [128, 320])
def test_run_tile_maps_boxes_back_to_frame_pixels(size: int) -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[200:260, 300:340] = 255  # the object, in frame px
    fam = _fake_family((size,))
    for rect in [(0, 0, 640, 480), (256, 160, 480, 320), (320, 240, 640, 480)]:
        run = fam.run_tile(frame, rect, 0)
        assert len(run.detections) == 1
        crop = padded_crop(rect, 640, 480)
        tol = 1.5 * max(crop[2] - crop[0], crop[3] - crop[1]) / size  # one input pixel, plus resampling
        x0 = max(300, crop[0])
        y0 = max(200, crop[1])
        np.testing.assert_allclose(run.detections.boxes[0], [x0, y0, min(340, crop[2]), min(260, crop[3])],
                                   atol=tol)


@pytest.fixture(scope="module")
def nanodet_family() -> DetectorFamily:
    return DetectorFamily((320, 416))


def test_nanodet_tiles_find_people_and_merge(nanodet_family: DetectorFamily) -> None:
    from fluxshard.data.fetch import clip_path
    from fluxshard.video import open_video

    assert nanodet_family.reference_model == 1  # the network's trained input (416), not the largest
    rgb = next(iter(open_video(clip_path("vtest"), export_mvs=False, max_frames=1))).rgb
    h, w = rgb.shape[:2]
    tiles = [(r, 0) for r in uniform_grid(w, h, 320)]
    merged, runs, _ = nanodet_family.run_plan(rgb, tiles)
    assert len(runs) == 6
    people = merged.filter(0.5, "person")
    assert len(people) >= 3
    b = merged.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
    # duplicates across tile borders are merged: no two same-class boxes overlap by more than the NMS IoU
    from fluxshard.models.base import box_iou

    for c in np.unique(merged.class_ids):
        bb = torch.from_numpy(b[merged.class_ids == c])
        iou = box_iou(bb, bb).numpy()
        np.fill_diagonal(iou, 0)
        assert (iou <= 0.6 + 1e-6).all()
    # a tile's boxes are the crop's boxes shifted by the crop origin
    rect = tiles[4][0]
    x0, y0, x1, y1 = padded_crop(rect, w, h)
    direct, _ = nanodet_family.run_crop(rgb[y0:y1, x0:x1], 0)
    np.testing.assert_allclose(runs[4].detections.boxes, direct.boxes + np.array([x0, y0, x0, y0]), atol=1e-3)
