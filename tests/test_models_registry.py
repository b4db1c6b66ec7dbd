import numpy as np
import pytest
import torch

from fluxshard.errors import FluxShardError
from fluxshard.models import (
    Detections,
    ModelError,
    available_models,
    batched_nms,
    box_iou,
    load_model,
    nms,
)


def test_registry_lists_bundled_models():
    assert {"nanodet", "movenet"} <= set(available_models())


def test_unknown_name_is_one_line_error_listing_models():
    with pytest.raises(ModelError) as exc:
        load_model("yolo99")
    msg = str(exc.value)
    assert isinstance(exc.value, FluxShardError)
    assert "\n" not in msg and "nanodet" in msg and "movenet" in msg and "yolo99" in msg


def test_missing_and_unreadable_weights(tmp_path):
    with pytest.raises(ModelError, match="no such weights file"):
        load_model(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="unreadable weights"):
        load_model(bad)
    other = tmp_path / "other.npz"
    np.savez(other, __model__=np.array("resnet"))
    with pytest.raises(ModelError, match="unknown architecture 'resnet'"):
        load_model(other)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, __model__=np.array("nanodet"), foo=np.zeros(3))
    with pytest.raises(ModelError, match="do not fit nanodet"):
        load_model(wrong)
    with pytest.raises(ModelError, match="unsupported weights format"):
        (tmp_path / "w.onnx").write_bytes(b"x")
        load_model(tmp_path / "w.onnx")


def test_load_by_weights_path_and_default():
    from fluxshard.models.base import WEIGHTS_DIR

    m = load_model(WEIGHTS_DIR / "nanodet.npz")
    assert m.name == "nanodet" and load_model().name == "nanodet"


def test_box_iou_and_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    iou = box_iou(boxes, boxes)
    assert torch.allclose(iou.diagonal(), torch.ones(4))
    assert abs(float(iou[0, 1]) - 81 / 119) < 1e-6 and float(iou[0, 2]) == 0
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    # class-aware: the same box in another class survives
    cls = torch.tensor([0, 0, 0, 1])
    assert batched_nms(boxes, scores, cls, 0.5).tolist() == [3, 0, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_detections_type():
    d = Detections(np.zeros((2, 4)), [0.9, 0.3], [0, 2])
    assert d.labels == ["person", "car"] and len(d.filter(0.5)) == 1
    assert d.to_json()[1]["class"] == "car"
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), [0.9], [0, 2])


def test_rejects_non_rgb_frame():
    m = load_model("nanodet")
    with pytest.raises(ValueError, match="RGB uint8"):
        m.preprocess(np.zeros((10, 10), np.uint8))
