"""Damaged and missing input, the `fluxshard motion` command, accumulation and the residual set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fluxshard.errors import VideoError
from fluxshard.motion import AccumulatedField, MotionField, MotionStream, residual_blocks, warp_blocks
from fluxshard.motion.report import analyze_motion
from fluxshard.video import open_video
from synth import SynthClip, make_clip


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fluxshard", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mkv_clip(synth_dir: Path) -> SynthClip:
    return make_clip(synth_dir / "clip.mkv", frames=40)


def test_missing_and_empty_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"nope\.mp4: no such file"):
        open_video(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty.mp4: empty file \(0 bytes\)"):
        open_video(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"junk\.mp4: cannot open as video"):
        open_video(junk)


def test_truncated_file_reports_frames_before_damage(mkv_clip: SynthClip, tmp_path: Path) -> None:
    data = mkv_clip.path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    s = analyze_motion(cut)
    assert 5 <= s.frames < 40
    assert s.error is not None and "cut.mkv" in s.error and "truncated" in s.error
    # library iteration: all good frames are delivered first, then the error
    seen = 0
    with pytest.raises(VideoError, match="truncated") as exc:
        for _ in open_video(cut):
            seen += 1
    assert seen == s.frames and exc.value.frames_decoded == seen


def test_intact_clip_has_no_error(mkv_clip: SynthClip) -> None:
    s = analyze_motion(mkv_clip.path)
    assert s.frames == 40 and s.error is None


def test_cli_truncated_exits_nonzero_with_one_line(mkv_clip: SynthClip, tmp_path: Path) -> None:
    data = mkv_clip.path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    r = run_cli("motion", str(cut), "--json")
    assert r.returncode != 0
    out = json.loads(r.stdout)  # the frames decoded before the damage are still reported
    assert out["frames"] > 0 and "truncated" in out["error"]
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "cut.mkv" in err_lines[0]


def test_cli_detect_truncated_reports_frames_before_damage(mkv_clip: SynthClip, tmp_path: Path) -> None:
    """Like `run` and `motion`: the frames decoded before the damage are analysed and summarised, then one
    error line and a non-zero exit."""
    data = mkv_clip.path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    decoded = analyze_motion(cut).frames
    r = run_cli("detect", str(cut), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["frames"] == decoded > 0 and "truncated" in out["error"] and "cut.mkv" in out["error"]
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert err_lines == [f"error: {out['error']}"]  # one line, however long the path


def test_truncated_mp4_names_its_missing_index(clip_p: SynthClip, tmp_path: Path) -> None:
    """An MP4 cut before its index (moov, written last) cannot be opened at all: say why, not "invalid data"."""
    data = clip_p.path.read_bytes()
    assert data.find(b"moov") > len(data) // 2  # the index is at the end, as after any non-faststart encode
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut\.mp4: cannot open as video: its MP4 index \(moov atom\) is missing "
                                         r"— the file is truncated \(it ends inside its 'mdat' box\)"):
        open_video(cut)
    r = run_cli("motion", str(cut))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "moov" in r.stderr
    junk = tmp_path / "junk.mp4"  # an MP4 signature with garbage after it is not blamed on a missing index
    junk.write_bytes(data[:32] + np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="cannot open as video") as exc:
        open_video(junk)
    assert "moov" in str(exc.value) or "Invalid data" in str(exc.value)


@pytest.mark.parametrize("name", ["missing.mp4", "empty.mp4"])
def test_cli_missing_or_empty(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    if name == "empty.mp4":
        p.write_bytes(b"")
    r = run_cli("motion", str(p), "--json")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and name in r.stderr


def test_cli_json_summary_and_overlay(clip_p: SynthClip, tmp_path: Path) -> None:
    overlay = tmp_path / "ov.mp4"
    r = run_cli("motion", str(clip_p.path), "--json", "--out", str(overlay))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    for key in ("frames", "mv_source", "decode_fps", "motion_fps", "residual_fraction_mv",
                "residual_fraction_zero_mv", "mean_motion_px"):
        assert key in s
    assert s["frames"] == clip_p.frames and s["mv_source"] == "codec"
    # background pans (1, 3) px/frame: MV alignment must cut the residual set sharply
    assert s["residual_fraction_mv"] < 0.5 * s["residual_fraction_zero_mv"]
    assert 2.5 < s["mean_motion_px"] < 4.5
    frames = list(open_video(overlay))
    assert len(frames) == clip_p.frames and frames[0].width == clip_p.size[0]


def test_residual_set_mv_vs_zero(clip_p: SynthClip) -> None:
    prev = None
    for mf in MotionStream(clip_p.path):
        if prev is not None:
            f = mf.frame
            r_mv, _ = residual_blocks(f.luma, prev, mf.field, tau=4)
            r_zero, _ = residual_blocks(f.luma, prev, MotionField.zero(f.height, f.width, 16), tau=4)
            _, _, known = clip_p.truth(mf.index, 16)
            assert r_mv[known].mean() < 0.1
            assert r_zero[known].mean() > 0.8
        prev = mf.frame.luma.copy()


def test_warp_blocks_matches_residual_kernel(clip_p: SynthClip) -> None:
    frames = [(mf.frame.luma.copy(), mf.field) for mf in MotionStream(clip_p.path, max_frames=3)]
    (prev, _), (cur, fld) = frames[1], frames[2]
    warped = warp_blocks(prev, fld)
    _, mad = residual_blocks(cur, prev, fld, tau=4)
    d = np.abs(cur.astype(np.int16) - warped.astype(np.int16)).astype(np.float32)
    ref = d.reshape(cur.shape[0] // 16, 16, cur.shape[1] // 16, 16).mean(axis=(1, 3))
    np.testing.assert_allclose(mad, ref, atol=1e-3)


@pytest.mark.parametrize("strict", [True, False])
def test_accumulated_field_aligns_old_cache(clip_p: SynthClip, strict: bool) -> None:
    """A cache four frames old, aligned with the composed field, reproduces the current background."""
    frames = [(mf.frame.luma.copy(), mf.field) for mf in MotionStream(clip_p.path, max_frames=9)]
    cache = frames[4][0]
    acc = AccumulatedField(frames[0][0].shape[0], frames[0][0].shape[1], 16, strict=strict)
    for t in range(5, 9):
        acc.update(frames[t][1])
    assert acc.age == 4
    f = acc.field
    _, _, known = clip_p.truth(8, 16)
    # Background blocks whose footprints never came near the object in frames 4..8: strict composition
    # rightly rejects shards whose tracked footprint straddled object and background, and a footprint
    # that straddles can spread that by one block per composed step (4 steps here).
    near = np.zeros_like(known)
    for t in range(4, 9):
        y0, x0, y1, x1 = clip_p.object_box(t)
        near[max(y0 // 16 - 4, 0) : y1 // 16 + 5, max(x0 // 16 - 4, 0) : x1 // 16 + 5] = True
    bg = known & ~near
    assert bg.sum() > 50
    assert ((f.dy == 4 * clip_p.bg[0]) & (f.dx == 4 * clip_p.bg[1]))[bg & f.valid].all()
    assert f.valid[bg].mean() > 0.9
    res, _ = residual_blocks(frames[8][0], cache, f, tau=4)
    assert res[bg & f.source_inside()].mean() < 0.1
    assert res[~f.source_inside()].all()  # content from outside the cached frame is always residual
    acc.reset()
    assert acc.age == 0 and acc.field.valid.all() and not acc.field.dx.any()


def test_strict_composition_rejects_split_shards() -> None:
    """A block whose displaced footprint straddles two cached shards with different motion is invalid."""
    step = MotionField.zero(32, 64, 16)
    step.dx[:] = 8  # half a block: every footprint covers two neighbouring blocks
    acc = MotionField.zero(32, 64, 16)
    acc.dx[:, 2:] = 5  # the right half of the cache moved differently
    from fluxshard.motion import compose

    strict = compose(step, acc, strict=True)
    assert strict.valid[:, 0].all() and not strict.valid[:, 1].any() and strict.valid[:, 2].all()
    assert (strict.dx[:, 0] == 8).all() and (strict.dx[:, 2] == 13).all()
    assert not strict.source_inside()[:, 3].any()  # valid vector, but its source left the cached frame
    loose = compose(step, acc, strict=False)
    assert loose.valid[:, 1].all() and (loose.dx[:, 1] == 13).all()


def test_tint_blocks_blends_only_the_masked_blocks() -> None:
    from fluxshard.viz import tint_blocks

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)  # not a multiple of the block: edge blocks clip
    mask = rng.random((3, 4)) < 0.5
    out = tint_blocks(rgb, mask, 16, (255, 40, 40), alpha=0.35)
    m = np.repeat(np.repeat(mask, 16, 0), 16, 1)[:40, :52]
    ref = rgb.astype(np.float32)
    ref[m] = ref[m] * 0.65 + np.array((255, 40, 40), np.float32) * 0.35
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.writeable
    assert np.array_equal(out[~m], rgb[~m])
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert np.array_equal(tint_blocks(rgb, np.zeros((3, 4), bool), 16, (0, 0, 0)), rgb)


def test_writer_preset_is_passed_to_x264_only_when_asked(tmp_path: Path) -> None:
    from fluxshard.video import VideoWriter
    from fluxshard.video.encode import OVERLAY_PRESET

    assert "preset" not in VideoWriter(tmp_path / "a.mp4").options  # generated clips keep x264's default
    w = VideoWriter(tmp_path / "b.mp4", fps=10, preset=OVERLAY_PRESET)
    assert w.options["preset"] == OVERLAY_PRESET
    rgb = np.zeros((32, 48, 3), np.uint8)
    for k in range(5):
        rgb[:, :, 0] = 40 * k
        w.write(rgb)
    w.close()
    assert sum(1 for _ in open_video(tmp_path / "b.mp4")) == 5
