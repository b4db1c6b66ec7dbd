"""COCO metrics: hand-made cases with known AP, self-consistency (1.0) and that perturbations lower it."""

import math
from pathlib import Path

import numpy as np
import pytest

from fluxshard.metrics import (
    COCO_KPT_SIGMAS,
    DENSE_REFERENCE,
    MIN_REFERENCE_OBJECTS,
    accuracy_retention,
    average_precision,
    iou_types_for,
    keypoint_similarity,
    oks,
)
from fluxshard.models.base import Detections, Keypoints, Segmentations


def det(boxes, scores=None, cls=None) -> Detections:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return Detections(boxes, np.ones(n) if scores is None else scores, np.zeros(n) if cls is None else cls)


def test_identical_box_is_ap_one():
    r = average_precision([det([[10, 10, 60, 90]])], [det([[10, 10, 60, 90]])])
    assert r.map == pytest.approx(1.0) and r.map50 == pytest.approx(1.0)


def test_partial_overlap_known_ap():
    # IoU 0.72: a hit at thresholds .50 .55 .60 .65 .70, a miss at .75 ... .95 -> AP@[.5:.95] = 5/10
    r = average_precision([det([[0, 0, 100, 72]])], [det([[0, 0, 100, 100]])])
    assert r.map50 == pytest.approx(1.0) and r.map == pytest.approx(0.5)


def test_half_recall_and_false_positive_known_ap():
    gt = [det([[0, 0, 50, 50], [100, 100, 150, 150]])]
    # one of two found at precision 1: the 101-point curve is 1 up to recall 0.50 -> 51/101
    r = average_precision([det([[0, 0, 50, 50]])], gt)
    assert r.map50 == pytest.approx(51 / 101)
    # both found, but a false positive ranks first: precision 0.5 at recall 0.5 and 2/3 at recall 1
    pred = det([[300, 300, 350, 350], [0, 0, 50, 50], [100, 100, 150, 150]], scores=[0.9, 0.8, 0.7])
    assert average_precision([pred], gt).map50 == pytest.approx(2 / 3)


def test_classes_are_separate_categories():
    gt = [det([[0, 0, 50, 50], [0, 0, 50, 50]], cls=[0, 2])]
    # right box, wrong class for one of the two: mean over 2 categories = (1 + 0) / 2
    r = average_precision([det([[0, 0, 50, 50]], cls=[0])], gt)
    assert r.map50 == pytest.approx(0.5)


def test_no_reference_objects_is_nan_and_no_predictions_zero():
    assert math.isnan(average_precision([det([[0, 0, 5, 5]])], [det([])]).map)
    assert average_precision([det([])], [det([[0, 0, 5, 5]])]).map == 0.0


def seg(masks, scores=None) -> Segmentations:
    masks = np.asarray(masks, bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    n = len(masks)
    return Segmentations(np.asarray(boxes, np.float32), np.ones(n) if scores is None else scores, np.zeros(n),
                         masks=masks)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools' decode
def test_mask_ap_known_values():
    gt = np.zeros((1, 40, 60), bool)
    gt[0, 10:30, 10:50] = True  # 20×40 = 800 px
    half = np.zeros_like(gt)
    half[0, 10:30, 10:30] = True  # 400 px inside: IoU exactly 0.5
    assert iou_types_for([seg(gt)]) == ["bbox", "segm"]
    assert average_precision([seg(gt)], [seg(gt)], "segm").map == pytest.approx(1.0)
    r = average_precision([seg(half)], [seg(gt)], "segm")
    assert r.map50 == pytest.approx(1.0) and r.map == pytest.approx(0.1)
    # the JSON form carries COCO RLE that decodes back to the same mask
    from pycocotools import mask as mask_utils

    rle = seg(gt).to_json()[0]["mask"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert (np.asarray(decoded) == gt[0]).all()


def pose(kps, scores=None) -> Keypoints:
    kps = np.asarray(kps, np.float32).reshape(-1, 17, 3)
    boxes = np.concatenate([kps[:, :, :2].min(1), kps[:, :, :2].max(1)], axis=1)
    return Keypoints(kps, np.ones(len(kps)) if scores is None else scores, boxes)


def person(x0: float, y0: float, rng: np.random.Generator) -> np.ndarray:
    xy = rng.uniform(0, 1, (17, 2)) * [60, 160] + [x0, y0]
    return np.concatenate([xy, np.full((17, 1), 0.9)], axis=1)


def test_keypoint_oks_ap():
    rng = np.random.default_rng(0)
    gt = pose([person(10, 10, rng), person(200, 30, rng)])
    assert iou_types_for([gt]) == ["keypoints"]
    assert average_precision([gt], [gt], "keypoints").map == pytest.approx(1.0)
    moved = gt.keypoints.copy()
    moved[:, :, :2] += rng.normal(0, 6, moved[:, :, :2].shape)  # a few px on a 60×160 person
    r = average_precision([pose(moved)], [gt], "keypoints")
    assert 0.0 < r.map < 1.0 and r.map50 >= r.map
    # invisible reference keypoints (score below the dense filter) do not count
    gt2 = gt.keypoints.copy()
    gt2[:, :8, 2] = 0.1
    wrong = gt2.copy()
    wrong[:, :8, :2] += 500  # far off, but only on the keypoints the reference does not see
    r2 = average_precision([pose(wrong)], [pose(gt2)], "keypoints", DENSE_REFERENCE)
    assert r2.map == pytest.approx(1.0)


def random_frames(n_frames: int, rng: np.random.Generator) -> list[Detections]:
    frames = []
    for _ in range(n_frames):
        n = int(rng.integers(4, 12))
        xy = rng.uniform(0, 600, (n, 2))
        wh = rng.uniform(20, 120, (n, 2))
        frames.append(Detections(np.concatenate([xy, xy + wh], 1), rng.uniform(0.05, 1.0, n),
                                 rng.integers(0, 3, n)))
    return frames


def perturb(frames: list[Detections], rng: np.random.Generator, jitter: float = 0.0, drop: float = 0.0,
            shuffle: bool = False) -> list[Detections]:
    out = []
    for d in frames:
        keep = rng.uniform(size=len(d)) >= drop
        boxes = d.boxes[keep] + rng.normal(0, jitter, (int(keep.sum()), 4)).astype(np.float32)
        scores = d.scores[keep]
        if shuffle:
            scores = rng.permutation(scores)
        out.append(Detections(boxes, scores, d.class_ids[keep]))
    return out


def test_dense_against_itself_is_one_and_perturbations_lower_it():
    rng = np.random.default_rng(1)
    dense = random_frames(10, rng)
    rep = accuracy_retention(dense, dense, min_reference=0)  # AP mechanics: any count (minimum tested below)
    assert rep.reference == "dense_outputs"
    assert rep.retention["bbox"]["map"] == pytest.approx(1.0)
    assert rep.retention["bbox"]["map50"] == pytest.approx(1.0)
    for kw in ({"jitter": 4.0}, {"drop": 0.2}, {"shuffle": True}):
        worse = accuracy_retention(perturb(dense, rng, **kw), dense, min_reference=0).retention["bbox"]
        assert worse["map"] < 1.0 - 1e-3, kw
    d = rep.to_dict()
    assert d["reference"] == "dense_outputs" and d["frames"] == 10 and d["dense"] == {}


def test_retention_against_ground_truth_is_a_ratio():
    rng = np.random.default_rng(2)
    gt = random_frames(8, rng)
    dense = perturb(gt, rng, jitter=2.0)
    cand = perturb(dense, rng, jitter=3.0, drop=0.1)
    rep = accuracy_retention(cand, dense, ground_truth=gt, min_reference=0)
    assert rep.reference == "ground_truth"
    c, d = rep.candidate["bbox"], rep.dense["bbox"]
    assert rep.retention["bbox"]["map"] == pytest.approx(c.map / d.map)
    assert c.map < d.map <= 1.0
    assert accuracy_retention(dense, dense, ground_truth=gt, min_reference=0).retention["bbox"]["map"] == \
        pytest.approx(1.0)


def test_mismatched_frame_counts_raise():
    with pytest.raises(ValueError, match="frames"):
        accuracy_retention([det([])], [det([]), det([])])


def test_real_detector_against_itself():
    from fluxshard.models import load_model

    model = load_model("nanodet")
    z = np.load(Path(__file__).parent / "fixtures" / "models" / "nanodet_tfjs.npz")
    frames = [z["image"][i] for i in range(min(2, len(z["image"])))]  # real video frames (NanoDet fixture)
    dense = [model(f) for f in frames]
    assert sum(len(d.filter(0.5)) for d in dense) > 0
    assert accuracy_retention(dense, dense, min_reference=0).retention["bbox"]["map"] == pytest.approx(1.0)


def test_retention_needs_enough_reference_objects():
    """5 confident reference objects (the handheld clip of issue 18): no retention, the count and a note."""
    ref = [det([[10, 10, 60, 90]], [0.9]) if i < 5 else det([[10, 10, 60, 90]], [0.3]) for i in range(100)]
    cand = [det([[12, 10, 60, 90]], [0.8]) for _ in range(100)]
    rep = accuracy_retention(cand, ref)
    assert rep.reference_objects == {"bbox": 5}
    assert math.isnan(rep.retention["bbox"]["map50"]) and rep.value("bbox") is None
    assert rep.notes["bbox"] == "n/a (only 5 reference objects ≥ score 0.5)"
    d = rep.to_dict()
    assert d["retention"]["bbox"] == {"map": None, "map50": None} and d["reference_objects"] == {"bbox": 5}
    assert d["notes"]["bbox"].startswith("n/a (only 5") and d["min_reference_objects"] == MIN_REFERENCE_OBJECTS
    # at the minimum the value is given (and no note)
    many = [det([[10, 10, 60, 90]], [0.9]) for _ in range(MIN_REFERENCE_OBJECTS)]
    ok = accuracy_retention(many, many)
    assert ok.value("bbox") == pytest.approx(1.0) and ok.notes == {} and ok.reference_objects == {"bbox": 100}
    # ground truth: the count is of ground-truth objects
    gt = accuracy_retention(cand[:3], ref[:3], ground_truth=ref[:3])
    assert gt.reference_objects == {"bbox": 3} and gt.notes["bbox"] == "n/a (only 3 ground-truth objects)"


def line_pose(shift: float = 0.0, scores: float = 0.9) -> np.ndarray:
    """17 keypoints spread over a 40×100 box (area 4000 px²), all with score ``scores``."""
    xs = np.linspace(100, 140, 17)
    ys = np.linspace(50, 150, 17)
    return np.stack([xs + shift, ys, np.full(17, scores)], 1)


def kp_frame(*poses: np.ndarray) -> Keypoints:
    kps = np.asarray(poses, np.float32).reshape(-1, 17, 3)
    return Keypoints(kps, kps[:, :, 2].mean(1) if len(kps) else np.zeros(0), np.zeros((len(kps), 4)))


def test_oks_identical_is_one_and_shift_gives_the_analytic_value():
    ref = line_pose()
    assert oks(ref, ref) == pytest.approx(1.0)
    # every keypoint 3 px off, scale s² = 40·100: OKS = mean_i exp(−9 / (2 · 4000 · (2σ_i)²))
    want = float(np.mean(np.exp(-9.0 / (2 * 4000 * (2 * COCO_KPT_SIGMAS) ** 2))))
    assert oks(line_pose(3.0), ref) == pytest.approx(want, rel=1e-9)
    assert 0.0 < want < 1.0
    # only visible reference keypoints count: moving the invisible ones changes nothing
    hidden = ref.copy()
    hidden[:5, 2] = 0.1
    far = line_pose()
    far[:5, :2] += 300
    assert oks(far, hidden) == pytest.approx(1.0)
    assert math.isnan(oks(ref, line_pose(scores=0.1)))  # nothing visible: undefined


def test_keypoint_similarity_matches_and_needs_enough_persons():
    ref = [kp_frame(line_pose()) for _ in range(10)]
    cand = [kp_frame(line_pose(3.0)) for _ in range(9)] + [kp_frame()]  # last frame: the pose is lost
    rep = keypoint_similarity(cand, ref, min_reference=0)
    one = oks(line_pose(3.0), line_pose())
    assert rep.persons == 10 and rep.oks_mean == pytest.approx(9 * one / 10)
    assert rep.oks_retention == pytest.approx(0.9) and rep.note is None  # 3 px keeps OKS ≥ 0.5; the lost one not
    # two people: each candidate goes to its own reference person whatever the order
    two = keypoint_similarity([kp_frame(line_pose(200.0), line_pose())], [kp_frame(line_pose(), line_pose(200.0))],
                              min_reference=0)
    assert two.per_frame == [[pytest.approx(1.0), pytest.approx(1.0)]]
    # below the minimum: mean OKS with its count, no retention, a note
    few = keypoint_similarity(cand, ref)
    assert few.oks_retention is None and few.persons == 10 and few.oks_mean == pytest.approx(rep.oks_mean)
    assert few.note == "n/a (only 10 reference persons: keypoints ≥ score 0.3)"
    assert few.to_dict()["oks_retention"] is None
    with pytest.raises(ValueError, match="frames"):
        keypoint_similarity(cand[:2], ref)
