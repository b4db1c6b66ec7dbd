"""MoveNet Thunder: native body vs the TF.js graph (fixture), and the graph's own decoding."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from fluxshard.models import Keypoints, load_model
from fluxshard.models.movenet import decode

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "movenet_tfjs.npz"
HEADS = ("heatmap", "center", "regress", "offset")


@pytest.fixture(scope="module")
def model():
    return load_model("movenet")


def test_heads_match_tfjs_graph(model):
    z = np.load(FIXTURE)
    with torch.inference_mode():
        outs = model.body(model.body_input(z["image"][0]))
    for out, key in zip(outs, HEADS, strict=True):
        ref = z[key]
        mine = out[0].permute(1, 2, 0).numpy()
        assert mine.shape == ref.shape
        err = np.abs(mine - ref.astype(np.float32))
        # fixture is fp16: half an fp16 ulp + 1e-3 (measured vs fp32 TF.js: ≤ 1.6e-4 on logits up to ~116)
        bound = 0.5 * np.spacing(np.abs(ref)).astype(np.float32) + 1e-3
        assert (err <= bound).all(), f"{key}: max abs diff {err.max():.3g}"


def test_decoding_matches_tfjs_graph(model):
    z = np.load(FIXTURE)
    for r in range(len(z["image"])):
        with torch.inference_mode():
            outs = model.body(model.body_input(z["image"][r]))
        kp = decode(outs, model.center_weight, model.dist_offset).numpy()
        assert np.abs(kp - z["keypoints"][r]).max() < 1e-4  # measured 1.4e-6


def test_keypoints_in_frame_pixels(model):
    z = np.load(FIXTURE)
    img = z["image"][1]
    res = model(img)
    assert isinstance(res, Keypoints) and res.keypoints.shape == (1, 17, 3)
    ref = z["keypoints"][1]
    np.testing.assert_allclose(res.keypoints[0, :, 0], ref[:, 1] * 256, atol=1e-3)
    np.testing.assert_allclose(res.keypoints[0, :, 1], ref[:, 0] * 256, atol=1e-3)
    # a non-square frame is padded to a centred square: a 256×128 frame's keypoints shift by -64 in x
    wide = np.zeros((256, 512, 3), np.uint8)
    wide[:, 128:384] = img
    res2 = model(wide)
    assert res2.keypoints.shape == (1, 17, 3)


def test_person_crop_from_vtest(model):
    from fluxshard.data import clip_path

    with av.open(clip_path("vtest")) as c:
        rgb = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    det = load_model("nanodet")(rgb).filter(0.5, "person")
    x0, y0, x1, y1 = det.boxes[int(np.argmax(det.scores))]
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.25
    left, top = int(max(cx - s / 2, 0)), int(max(cy - s / 2, 0))
    crop = rgb[top:int(cy + s / 2), left:int(cx + s / 2)]
    res = model(crop)
    kp = res.keypoints[0]
    assert res.scores[0] > 0.3
    good = kp[kp[:, 2] > 0.3]
    assert len(good) >= 8
    assert (good[:, 0] >= -2).all() and (good[:, 0] <= crop.shape[1] + 2).all()
    # anatomy: shoulders above hips above ankles (image y grows downwards)
    assert kp[5:7, 1].mean() < kp[11:13, 1].mean() < kp[15:17, 1].mean()
