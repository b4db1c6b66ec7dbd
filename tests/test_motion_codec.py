"""Motion front-end against clips with known per-block motion (synthetic) and known camera motion (PTZ)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.data.ptz import load_ptz_meta, make_ptz_clip, ptz_displacement
from fluxshard.motion import CodecMVConfig, MotionField, MotionStream, field_from_mvs
from fluxshard.motion.field import grid_shape
from fluxshard.video.decode import MV_DTYPE
from synth import SynthClip, make_clip


def field_accuracy(clip: SynthClip, block: int = 16, **kw: object) -> tuple[float, float, str, str]:
    """(accuracy on valid known blocks, coverage of known blocks, mv source, frame types)."""
    ms = MotionStream(clip.path, block=block, **kw)  # type: ignore[arg-type]
    ok = tot = known_n = 0
    types = ""
    for mf in ms:
        types += mf.frame.pict_type
        if mf.index == 0:
            assert not mf.field.valid.any()
            continue
        dy, dx, known = clip.truth(mf.index, block)
        v = mf.field.valid & known
        ok += int(((mf.field.dy == dy) & (mf.field.dx == dx) & v).sum())
        tot += int(v.sum())
        known_n += int(known.sum())
    return ok / max(tot, 1), tot / max(known_n, 1), ms.mv_source, types


def test_codec_field_matches_truth_p_frames(clip_p: SynthClip) -> None:
    acc, cov, src, types = field_accuracy(clip_p)
    assert src == "codec" and set(types[1:]) == {"P"}
    assert acc >= 0.95 and cov >= 0.9, (acc, cov)


def test_codec_field_block8(clip_p: SynthClip) -> None:
    acc, cov, _, _ = field_accuracy(clip_p, block=8)
    assert acc >= 0.95 and cov >= 0.85, (acc, cov)


def test_b_frames_use_past_reference_in_display_order(clip_b: SynthClip) -> None:
    acc, cov, src, types = field_accuracy(clip_b)
    assert "B" in types and src == "codec"
    assert acc >= 0.95 and cov >= 0.7, (acc, cov)


def test_multi_reference_vectors_are_resolved(clip_ref: SynthClip) -> None:
    acc, cov, _, _ = field_accuracy(clip_ref)
    assert acc >= 0.95 and cov >= 0.9, (acc, cov)
    # The sanitiser is what makes this work: taken at face value, x264's vectors span several frames.
    raw_acc, _, _, _ = field_accuracy(clip_ref, codec_config=CodecMVConfig(verify=False, fill=False))
    assert raw_acc < 0.8, raw_acc


def test_hevc_falls_back_to_block_matching(clip_hevc: SynthClip) -> None:
    acc, cov, src, _ = field_accuracy(clip_hevc)
    assert src == "blockmatch"
    assert acc >= 0.95 and cov >= 0.9, (acc, cov)


def test_block_matching_on_h264_agrees_with_truth(clip_p: SynthClip) -> None:
    acc, cov, src, _ = field_accuracy(clip_p, mv_source="blockmatch")
    assert src == "blockmatch" and acc >= 0.95 and cov >= 0.9, (acc, cov)


def _mv_rows(rows: list[tuple[int, int, int, int, int, int, int, int]]) -> np.ndarray:
    a = np.zeros(len(rows), MV_DTYPE)
    for k, (src, w, h, dx_, dy_, mx, my, sc) in enumerate(rows):
        a[k] = (src, w, h, 0, 0, dx_, dy_, 0, mx, my, sc)
    return a


@pytest.mark.parametrize(("mx", "expect"), [(2, 1), (-2, -1), (6, 2), (-6, -2), (1, 0), (-1, 0), (3, 1), (5, 1)])
def test_subpixel_rounding_half_away_from_zero(mx: int, expect: int) -> None:
    luma = np.zeros((16, 16), np.uint8)
    mvs = _mv_rows([(-1, 16, 16, 8, 8, mx, 0, 4)])
    f = field_from_mvs(mvs, 16, 16, "P", False, luma, luma, CodecMVConfig(verify=False, fill=False))
    assert f.valid[0, 0] and f.dx[0, 0] == expect and f.dy[0, 0] == 0


def test_future_only_and_intra_blocks_are_invalid() -> None:
    luma = np.zeros((16, 64), np.uint8)
    # block 0: past vector; block 1: future only; block 2: no vector (intra); block 3: past + future
    mvs = _mv_rows([(-1, 16, 16, 8, 8, 4, 0, 4), (1, 16, 16, 24, 8, 4, 0, 4),
                    (-1, 16, 16, 56, 8, -4, 0, 4), (1, 16, 16, 56, 8, 8, 0, 4)])
    cfg = CodecMVConfig(verify=False, fill=False)
    f = field_from_mvs(mvs, 16, 64, "B", False, luma, luma, cfg)
    assert f.valid.tolist() == [[True, False, False, True]]
    assert f.dx[0, 3] == -1  # the past row, not the future one
    # A B-frame predicted mostly from the future is not a cut; a P-frame that is mostly intra is.
    f = field_from_mvs(_mv_rows([(1, 16, 16, 8, 8, 0, 0, 4)]), 16, 64, "B", False, luma, luma, cfg)
    assert not f.scene_cut and not f.valid.any()
    f = field_from_mvs(_mv_rows([(-1, 16, 16, 8, 8, 0, 0, 4)]), 16, 64, "P", False, luma, luma, cfg)
    assert f.scene_cut and not f.valid.any()


def test_i_frames_codec_field_is_invalid_and_stream_block_matches_them(synth_dir: Path) -> None:
    clip = make_clip(synth_dir / "gop5.mp4", frames=16, options={"g": "5", "keyint_min": "5",
                                                                 "x264-params": "scenecut=0"})
    n_i = 0
    for mf in MotionStream(clip.path):
        f = mf.frame
        if f.pict_type != "I" or f.index == 0:
            continue
        n_i += 1
        # the codec rule: an I-frame has no vectors, so its codec field is all invalid
        raw = field_from_mvs(f.mvs, f.height, f.width, "I", f.key_frame)
        assert raw.scene_cut and not raw.valid.any()
        # the stream block-matches periodic key frames instead of throwing the cache away
        dy, dx, known = clip.truth(f.index, 16)
        v = mf.field.valid & known
        assert mf.field.source == "blockmatch" and not mf.field.scene_cut
        assert v.sum() >= 0.9 * known.sum() and ((mf.field.dy == dy) & (mf.field.dx == dx))[v].mean() >= 0.95
    assert n_i >= 2
    # ... and with match_intra off every I-frame is a full refresh
    assert all(not mf.field.valid.any() for mf in MotionStream(clip.path, match_intra=False)
               if mf.frame.pict_type == "I")


def test_scene_cut_invalidates_everything(synth_dir: Path) -> None:
    clip = make_clip(synth_dir / "cut.mp4", frames=12, cut_at=6, options={"x264-params": "scenecut=40"})
    fields = {mf.index: mf.field for mf in MotionStream(clip.path)}
    assert fields[6].scene_cut and not fields[6].valid.any()
    assert not fields[5].scene_cut and fields[5].valid.mean() > 0.8
    assert not fields[8].scene_cut and fields[8].valid.mean() > 0.8


def test_incoherent_block_is_invalid() -> None:
    luma = np.zeros((16, 16), np.uint8)
    quads = [(-1, 8, 8, 4 + 8 * (k % 2), 4 + 8 * (k // 2), 4 * k, 0, 4) for k in range(4)]
    f = field_from_mvs(_mv_rows(quads), 16, 16, "P", False, luma, luma, CodecMVConfig(verify=False, fill=False))
    assert not f.valid[0, 0]
    same = [(-1, 8, 8, 4 + 8 * (k % 2), 4 + 8 * (k // 2), 8 if k < 3 else 0, 0, 4) for k in range(4)]
    f = field_from_mvs(_mv_rows(same), 16, 16, "P", False, luma, luma, CodecMVConfig(verify=False, fill=False))
    assert f.valid[0, 0] and f.dx[0, 0] == 2  # majority of the four 8×8 partitions


def test_ptz_pan_field_agrees_with_camera_transform(tmp_path: Path) -> None:
    out = tmp_path / "pan.mp4"
    make_ptz_clip(clip_path("vtest"), out, "pan:3:12,tilt:-2:12,pause:4", size=(384, 288), still=True,
                  codec_options={"bf": "0"})
    meta = load_ptz_meta(out)
    ms = MotionStream(out)
    agree = tot = 0
    for mf in ms:
        if mf.index == 0:
            continue
        f = mf.field
        hb, wb = grid_shape(f.height, f.width, f.block)
        cy, cx = np.meshgrid(np.arange(hb) * 16 + 7.5, np.arange(wb) * 16 + 7.5, indexing="ij")
        d = ptz_displacement(meta, mf.index, np.stack([cx.ravel(), cy.ravel()], 1)).reshape(hb, wb, 2)
        truth_x, truth_y = np.rint(d[..., 0]), np.rint(d[..., 1])
        v = f.valid & f.source_inside()
        agree += int(((np.abs(f.dx - truth_x) <= 1) & (np.abs(f.dy - truth_y) <= 1) & v).sum())
        tot += int(v.sum())
    assert ms.mv_source == "codec" and tot > 0
    assert agree / tot >= 0.9, agree / tot


def test_zero_field_and_invalid_field_helpers() -> None:
    z = MotionField.zero(20, 40, 16)
    assert z.shape == (2, 3) and z.valid.all() and z.mean_motion_px() == 0
    inv = MotionField.invalid(20, 40, 8)
    assert inv.shape == (3, 5) and not inv.valid.any()


def test_block_size_is_checked(clip_p: SynthClip) -> None:
    from fluxshard.errors import FluxShardError

    with pytest.raises(FluxShardError, match="block size"):
        MotionStream(clip_p.path, block=12)


def test_synthetic_object_moves_independently(synth_dir: Path) -> None:
    clip = make_clip(synth_dir / "obj.mp4", bg=(0, 2), obj=(-3, 3), frames=10)
    dy, dx, known = clip.truth(5, 16)
    assert {(int(a), int(b)) for a, b in zip(dy[known], dx[known], strict=True)} == {(0, 2), (3, -3)}


def test_mpeg4_part2_with_b_frames(synth_dir: Path) -> None:
    """MPEG-4 Part 2: P-frames have one past reference (no span search needed); FFmpeg's exported B-frame
    vectors are unusable (direct mode leaves them zero), so B-frames are block-matched."""
    clip = make_clip(synth_dir / "mpeg4.avi", codec="mpeg4", options={"bf": "2", "qscale": "3"})
    ms = MotionStream(clip.path)
    assert not ms.codec_config.verify
    sources = {(mf.frame.pict_type, mf.field.source) for mf in ms if mf.index > 0}
    assert ("P", "codec") in sources and ("B", "blockmatch") in sources and ("B", "codec") not in sources
    acc, cov, src, types = field_accuracy(clip)
    assert src == "codec" and "B" in types, types
    assert acc >= 0.95 and cov >= 0.7, (acc, cov)


def test_sps_reference_count_narrows_the_span_search(clip_p: SynthClip, clip_ref: SynthClip, clip_b: SynthClip) -> None:
    from fluxshard.video import open_video
    from fluxshard.video.h264 import max_num_ref_frames

    assert open_video(clip_p.path).info.max_ref_frames == 1
    assert open_video(clip_ref.path).info.max_ref_frames == 4
    assert max_num_ref_frames(b"") is None and max_num_ref_frames(b"\x00\x00\x00\x01\x67") is None
    assert MotionStream(clip_p.path).codec_config.max_ref_span == 1  # one reference, no B-frames
    assert MotionStream(clip_ref.path).codec_config.max_ref_span == 4
    assert MotionStream(clip_b.path).codec_config.max_ref_span == 4  # B-frames: spans exceed the ref count


def test_direct_side_data_read_matches_pyav(clip_b: SynthClip, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's own read of the vectors (``video.sidedata``) sees exactly PyAV's records, and a stream on
    PyAV's path (direct read unavailable) gives the same fields."""
    from fluxshard.video import open_video, sidedata

    fn = None
    checked = 0
    for f in open_video(clip_b.path):
        if not fn:
            fn = sidedata.fast_path_for(f.av_frame, f.mvs)
            continue
        rows = sidedata.mv_rows(id(f.av_frame), fn)
        if f.mvs is None:
            assert rows.shape[0] == 0
        else:
            assert rows.tobytes() == f.mvs.tobytes()
            checked += 1
    assert fn and checked >= 10

    def fields() -> list[tuple[object, ...]]:
        return [(mf.field.dy.tobytes(), mf.field.dx.tobytes(), mf.field.valid.tobytes(), mf.field.scene_cut)
                for mf in MotionStream(clip_b.path)]

    direct = fields()
    monkeypatch.setitem(sidedata._state, "fn", 0)
    assert fields() == direct


def _scalar_copy(plane: np.ndarray) -> np.ndarray:
    """The same pixels with a column stride of 2: the kernels' per-sample (scalar) path instead of the vector one."""
    return np.repeat(plane, 2, axis=1)[:, ::2]


@pytest.mark.parametrize("block", [8, 16])
def test_vector_sampled_mad_equals_scalar_path(block: int) -> None:
    from fluxshard.motion._kernels import _sampled_mad

    rng = np.random.default_rng(block)
    h, w = 75, 93  # partial blocks at the bottom and right edges
    cur = rng.integers(0, 256, (h, w + 7), np.uint8)[:, :w]  # strided rows, like the decoder's planes
    prev = rng.integers(0, 256, (h, w + 7), np.uint8)[:, :w]
    cur_s, prev_s = _scalar_copy(cur), _scalar_copy(prev)
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            shifts = [(0, 0), (1, -1), (-y0 - 3, 2), (h, -w), (5, 17), (-4, -x0), (-4, -x0 - 1), (2, w - x0 - block)]
            for dy, dx in shifts:
                assert _sampled_mad(cur, prev, y0, x0, block, h, w, dy, dx) == _sampled_mad(
                    cur_s, prev_s, y0, x0, block, h, w, dy, dx), (y0, x0, dy, dx)


@pytest.mark.parametrize("block", [8, 16])
def test_codec_field_same_on_vector_and_scalar_paths(clip_ref: SynthClip, clip_b: SynthClip, block: int) -> None:
    """The vector path returns full means where the scalar one stops early: the fields must still be identical."""
    from fluxshard.video import open_video

    checked = 0
    for clip in (clip_ref, clip_b):
        prev = None
        for f in open_video(clip.path):
            if prev is not None and f.mvs is not None:
                for span in (1, 2):
                    cfg = CodecMVConfig(block=block, verify_unambiguous=span == 2)
                    a = field_from_mvs(f.mvs, f.height, f.width, f.pict_type, f.key_frame, f.luma, prev.luma, cfg, span)
                    b = field_from_mvs(f.mvs, f.height, f.width, f.pict_type, f.key_frame, _scalar_copy(f.luma),
                                       _scalar_copy(prev.luma), cfg, span)
                    assert a.scene_cut == b.scene_cut
                    for x, y in ((a.dy, b.dy), (a.dx, b.dx), (a.valid, b.valid), (a.filled, b.filled)):
                        assert np.array_equal(x, y)
                    checked += int(a.valid.any())
            prev = f
    assert checked >= 10


def test_block_matching_same_on_vector_and_scalar_paths(clip_p: SynthClip) -> None:
    """Block matching's vector path (byte planes, 16-px blocks) gives the scalar path's field, with and without a
    predictor (full search at full resolution, predictor search on every other pixel)."""
    from fluxshard.motion.blockmatch import BlockMatchConfig, block_match
    from fluxshard.video import open_video

    frames = [f.luma for f in open_video(clip_p.path, max_frames=8)]
    rng = np.random.default_rng(0)
    noisy = np.clip(frames[4].astype(np.int16) + rng.integers(-9, 10, frames[4].shape), 0, 255).astype(np.uint8)
    cfg = BlockMatchConfig()
    pred = None
    for cur, ref in [(frames[1], frames[0]), (frames[5], frames[3]), (noisy, frames[2]), (frames[7], frames[6])]:
        for predictor in (None, pred):
            a = block_match(cur, ref, cfg, predictor=predictor)
            b = block_match(_scalar_copy(cur), _scalar_copy(ref), cfg, predictor=predictor)
            for x, y in ((a.dy, b.dy), (a.dx, b.dx), (a.valid, b.valid)):
                assert np.array_equal(x, y)
            assert not (a.valid & ~a.source_inside()).any()  # the search only admits sources inside the frame
            pred = a
