"""``fluxshard detect`` end to end, as a user runs it (subprocess, bundled NanoDet, real vtest clip)."""

import json
import subprocess
import sys

import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.video import open_video

# NanoDet persons with score >= 0.5 per vtest frame (every frame of the 795, measured): frames 240-279 are
# the busiest stretch — 40/40 frames with >= 4 (mean 6.25, 5-8 people); the clip opens with only 3
# walkers (frames 0-39: 28 % with >= 4); over the whole clip 76 % of frames have >= 4 (mean 4.72).
START, FRAMES = 240, 40


def fluxshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxshard", *args], capture_output=True, text=True, timeout=600)


def test_detect_vtest_zero_config(tmp_path):
    out, jsonl = tmp_path / "annotated.mp4", tmp_path / "results.jsonl"
    r = fluxshard("detect", "vtest", "--start", str(START), "--max-frames", str(FRAMES), "--json",
                  "--jsonl", str(jsonl), "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object on stdout (the progress bar is on stderr)
    summary = json.loads(lines[0])
    assert summary["frames"] == FRAMES and summary["model"] == "nanodet" and summary["task"] == "detect"
    assert summary["first_frame"] == START
    assert 0 < summary["ms_per_frame_median"] < 5000

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [rec["frame"] for rec in records] == list(range(START, START + FRAMES))
    persons = [sum(1 for d in rec["instances"] if d["class"] == "person" and d["score"] >= 0.5) for rec in records]
    busy = sum(p >= 4 for p in persons)
    print(f"vtest frames {START}-{START + FRAMES - 1}: persons>=0.5 per frame {persons}")
    assert busy >= 0.75 * FRAMES, persons  # measured: 40/40
    assert summary["persons_ge_0.5"]["frames_with_4_or_more"] == busy
    for rec in records:
        for d in rec["instances"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 768 and 0 <= y1 <= y2 <= 576

    decoded = list(open_video(out, export_mvs=False))
    assert len(decoded) == FRAMES
    assert (decoded[0].width, decoded[0].height) == (768, 576)


def test_detect_pose_model_and_nchw(tmp_path):
    jsonl = tmp_path / "pose.jsonl"
    r = fluxshard("detect", clip_path("vtest"), "--model", "movenet", "--max-frames", "3", "--json",
                  "--jsonl", str(jsonl), "--no-channels-last")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["task"] == "pose" and summary["frames"] == 3 and summary["memory_format"] == "nchw"
    rec = json.loads(jsonl.read_text().splitlines()[0])
    assert len(rec["instances"]) == 1 and len(rec["instances"][0]["keypoints"]) == 17


@pytest.mark.parametrize("model, expect", [("yolo99", "unknown model 'yolo99'"),
                                          ("missing/weights.pt", "no such weights file")])
def test_unknown_model_is_one_line_error(model, expect):
    r = fluxshard("detect", "vtest", "--model", model, "--max-frames", "2")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert "nanodet" in lines[0] and "movenet" in lines[0]  # lists what is available
    assert r.stdout == ""


def test_unreadable_weights_and_bad_clip(tmp_path):
    bad = tmp_path / "w.npz"
    bad.write_bytes(b"garbage")
    r = fluxshard("detect", "vtest", "--model", str(bad))
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "unreadable weights" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = fluxshard("detect", str(tmp_path / "nope.mp4"))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.mp4'}: no such file"]


def test_drawing_boxes_masks_skeletons():
    import numpy as np

    from fluxshard.models.base import Detections, Keypoints, Segmentations
    from fluxshard.viz import draw_results

    rgb = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 20:40, 30:50] = True
    seg = Segmentations([[28, 18, 52, 42]], [0.9], [0], masks=masks)
    out = draw_results(rgb, seg)
    assert out.shape == rgb.shape and out[30, 40].any()  # mask tint inside
    assert out[18, 40].any() and not out[50, 5].any()  # box outline drawn, far background untouched
    assert not draw_results(rgb, Detections(np.zeros((0, 4)), [], [])).any()
    kp = np.zeros((1, 17, 3), np.float32)
    kp[0, :, 0], kp[0, :, 1], kp[0, :, 2] = np.linspace(10, 70, 17), 30, 0.9
    pose = draw_results(rgb, Keypoints(kp, [0.9], [[10, 25, 70, 35]]))
    assert pose[30, 10].any() and pose[30, 70].any()
