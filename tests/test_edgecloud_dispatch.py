"""Dispatch layers and the receive layer: the server rebuilds the edge's input bit for bit (exact mode) and the
edge's mirror of the cloud layer in every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud import wire
from fluxshard.edgecloud.dispatch import (
    DispatchLayer,
    block_difference,
    from_blocks,
    input_dtype,
    input_tensor,
    integer_input,
    to_blocks,
)
from fluxshard.edgecloud.payload import (
    PayloadError,
    apply_keyframe,
    apply_residual,
    build_residual,
    checksum,
    keyframe,
)
from fluxshard.engine.inputs import InputMapper
from fluxshard.motion import MotionStream
from fluxshard.motion.field import MotionField
from fluxshard.motion.residual import warp_blocks


@pytest.mark.parametrize("mapper", [
    InputMapper((120, 200)),  # NanoDet-like: f = 1, padded to 128×224
    InputMapper((120, 200), factor=2),  # uint16 box sums
    InputMapper((120, 200), factor=4, scale=0.017, shift=-1.0),  # affine with a shift
    InputMapper((300, 400), factor=2, canvas_hw=(256, 256), integer=True, scale=1.0, shift=-1.0),  # letterbox
    InputMapper((480, 640), factor=3, canvas_hw=(256, 256), integer=True),  # coarsened field (MoveNet on VGA)
])
def test_integer_input_gives_the_mappers_tensor_bit_for_bit(mapper: InputMapper) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (*mapper.frame_hw, 3), np.uint8)
    rgb[:4] = 255  # the largest box sums
    ints = integer_input(mapper, rgb)
    assert ints.dtype == input_dtype(mapper) and ints.shape == (*mapper.input_hw, 3)
    a, b = input_tensor(mapper, ints), mapper.tensor(rgb)
    assert a.shape == b.shape and torch.equal(a, b)
    assert a.is_contiguous(memory_format=torch.channels_last)


def test_integer_input_rejects_a_wrong_frame() -> None:
    with pytest.raises(ValueError, match="frame must be uint8 120x200x3"):
        integer_input(InputMapper((120, 200)), np.zeros((120, 201, 3), np.uint8))
    with pytest.raises(ValueError, match="integer input must be uint16"):
        input_tensor(InputMapper((120, 200), factor=2), np.zeros((64, 128, 3), np.uint8))


def test_blocks_round_trip_with_partial_edge_blocks() -> None:
    a = np.random.default_rng(1).integers(0, 60000, (37, 53, 3), np.uint16)
    blocks = to_blocks(a, 16)
    assert blocks.shape == (3 * 4, 16, 16, 3)
    assert np.array_equal(from_blocks(blocks, 37, 53), a)
    assert not blocks[3, :, 5:].any()  # zero padding past the right edge


def _field(h: int, w: int, b: int, dy: np.ndarray | int, dx: np.ndarray | int,
           valid: np.ndarray | bool = True) -> MotionField:
    f = MotionField.zero(h, w, b)
    f.dy[:], f.dx[:], f.valid[:] = dy, dx, valid
    f.source = "codec"
    return f


def _pan(texture: np.ndarray, t: int, speed: int, h: int, w: int) -> np.ndarray:
    """Frame t of a camera panning right over ``texture``: content moves left by ``speed`` px per frame."""
    return np.ascontiguousarray(texture[:h, t * speed:t * speed + w])


def _server_roundtrip(layer: DispatchLayer, server_cache: np.ndarray, cur: np.ndarray) -> np.ndarray:
    p = build_residual(layer, cur, stream_id="s", seq=1, model_hash="m")
    rebuilt = apply_residual(server_cache, p)  # verify=True: the checksum must agree
    assert p.rebuilt is not None and np.array_equal(rebuilt, p.rebuilt)
    assert checksum(rebuilt) == p.checksum
    layer.update(p.rebuilt)
    assert np.array_equal(layer.cache, rebuilt)  # the mirror holds what the server holds
    return rebuilt


@pytest.mark.parametrize("every", [1, 3])
def test_pan_exact_rebuild_sends_only_the_uncovered_column(every: int) -> None:
    h, w, b, s = 64, 96, 16, 8
    tex = np.random.default_rng(2).integers(0, 256, (h, w + 20 * s, 3), np.uint8)
    layer = DispatchLayer((h, w), b)
    server = _pan(tex, 0, s, h, w)
    layer.update(server)
    for t in range(1, 10):
        cur = _pan(tex, t, s, h, w)
        layer.fold(_field(h, w, b, 0, s))  # cur[y, x] = prev[y, x + s]
        if t % every:
            continue
        res = layer.residual(cur)
        # the rightmost blocks' sources leave the frame (age·s px), every other block is a pure shift
        n_right = -(-layer.age * s // b)
        assert res[:, -n_right:].all() and not res[:, :-n_right].any()
        server = _server_roundtrip(layer, server, cur)
        assert np.array_equal(server, cur)
        assert layer.age == 0


def test_invalid_blocks_are_residual_unless_unchanged_at_zero_motion() -> None:
    h, w, b = 48, 48, 16
    rng = np.random.default_rng(3)
    prev = rng.integers(0, 256, (h, w, 3), np.uint8)
    cur = prev.copy()
    cur[0:16, 0:16] = 7  # changed, invalid → residual
    layer = DispatchLayer((h, w), b)
    layer.update(prev)
    valid = np.ones((3, 3), bool)
    valid[0, 0] = valid[1, 1] = False  # (1, 1) is invalid but unchanged → rescued as zero motion
    layer.fold(_field(h, w, b, 0, 0, valid))
    al = layer.align(cur)
    assert al.residual.sum() == 1 and al.residual[0, 0]
    assert al.field.valid[1, 1] and al.field.dy[1, 1] == 0
    p = build_residual(layer, cur)
    assert p.indices.tolist() == [0] and p.indices.dtype == np.int32 and p.pixels.shape == (1, b, b, 3)
    assert np.array_equal(apply_residual(prev, p), cur)


def test_fast_mode_rebuilds_the_mirror_not_the_frame() -> None:
    h, w, b = 32, 64, 16
    rng = np.random.default_rng(4)
    prev = rng.integers(10, 240, (h, w, 3), np.uint8)
    cur = prev.copy()
    cur[:16, :16] += 2  # mean |Δ| = 2 levels: below τ_in = 3/255
    cur[16:, 48:] += 9  # above
    layer = DispatchLayer((h, w), b, tau_in=3 / 255, unit=1 / 255)
    layer.update(prev)
    layer.fold(_field(h, w, b, 0, 0))
    res = layer.residual(cur)
    assert res.sum() == 1 and res[1, 3]
    server = prev.copy()
    rebuilt = _server_roundtrip(layer, server, cur)
    expect = prev.copy()
    expect[16:, 48:] = cur[16:, 48:]
    assert np.array_equal(rebuilt, expect)
    assert DispatchLayer((h, w), b, tau_in=0.0).residual(cur).all()  # no cache yet: everything is residual


def test_layer_update_copies_and_resets() -> None:
    layer = DispatchLayer((32, 32), 16)
    frame = np.zeros((32, 32, 3), np.uint8)
    layer.fold(_field(32, 32, 16, 0, 4))
    layer.update(frame)
    frame[:] = 9
    assert layer.age == 0 and not layer.cache.any() and not layer.field.dx.any()
    with pytest.raises(ValueError, match="input must be uint8 32x32xC"):
        layer.update(np.zeros((32, 32, 3), np.uint16))
    with pytest.raises(ValueError, match="tau_in must be ≥ 0"):
        DispatchLayer((32, 32), 16, tau_in=-1.0)


def test_payload_errors_are_clear() -> None:
    h, w, b = 32, 32, 16
    rng = np.random.default_rng(5)
    prev = rng.integers(0, 256, (h, w, 3), np.uint8)
    cur = prev.copy()
    cur[:16, :16] = 0
    layer = DispatchLayer((h, w), b)
    with pytest.raises(PayloadError, match="no input cache"):
        build_residual(layer, cur)
    layer.update(prev)
    layer.fold(_field(h, w, b, 0, 0))
    p = build_residual(layer, cur)
    with pytest.raises(PayloadError, match="checksum"):
        apply_residual(prev + 1, p)
    bad = build_residual(layer, cur)
    bad.valid[1, 1] = False
    with pytest.raises(PayloadError, match=r"block \(1, 1\) is neither residual"):
        apply_residual(prev, bad)
    bad = build_residual(layer, cur)
    bad.indices = np.array([3, 0], np.int32)
    with pytest.raises(PayloadError, match="strictly increasing"):
        apply_residual(prev, bad)
    with pytest.raises(PayloadError, match="grid"):
        apply_residual(np.zeros((48, 32, 3), np.uint8), p)
    with pytest.raises(PayloadError, match="pixels must be uint16"):
        apply_residual(prev.astype(np.uint16), p)
    kf = keyframe(cur, seq=3)
    assert np.array_equal(apply_keyframe(kf), cur) and kf.checksum == checksum(cur)
    kf.pixels[0, 0, 0] ^= 1
    with pytest.raises(PayloadError, match="keyframe 3: checksum"):
        apply_keyframe(kf)


def test_checksum_covers_dtype_and_shape() -> None:
    a = np.arange(12, dtype=np.uint8)
    assert len(checksum(a)) == 16
    assert checksum(a) != checksum(a.reshape(3, 4)) != checksum(a.astype(np.uint16))
    assert checksum(a) == checksum(a.copy()) == wire.checksum(a)  # one checksum on both sides


@pytest.fixture(scope="module")
def cup_frames() -> list:
    return list(MotionStream(clip_path("cup"), max_frames=30))


@pytest.mark.parametrize(("every", "tau_in"), [(1, 0.0), (4, 0.0), (3, 0.02)])
def test_real_clip_server_matches_edge(cup_frames: list, every: int, tau_in: float) -> None:
    """Cup, 30 decoded frames, the cloud chosen every ``every`` frames (the others fold into its field)."""
    mapper = InputMapper(cup_frames[0].frame.rgb.shape[:2])
    cloud = DispatchLayer.for_mapper(mapper, tau_in=tau_in)
    edge = DispatchLayer.for_mapper(mapper, tau_in=tau_in)
    server = None
    kept = []
    for k, mf in enumerate(cup_frames):
        cur = integer_input(mapper, mf.frame.rgb)
        if server is None:
            server = apply_keyframe(keyframe(cur))
            cloud.update(cur)
            edge.update(cur)
            continue
        step = mapper.field(mf.field)
        cloud.fold(step)
        edge.fold(step)
        if k % every:
            edge.update(cur)  # the edge ran this frame: only its own layer resets
            continue
        assert cloud.age == (every if k >= every else k)
        kept.append(float((~cloud.residual(cur)).mean()))
        server = _server_roundtrip(cloud, server, cur)
        if tau_in == 0:
            assert np.array_equal(server, cur)
        else:  # fast mode: what the server's engine gets differs from the frame by at most τ_in on average
            assert torch.equal(input_tensor(mapper, server), input_tensor(mapper, cloud.cache))
    assert len(kept) == 29 // every
    if tau_in:  # fast mode keeps most of the cached input of a static-camera clip (exact mode keeps little:
        assert min(kept) > 0.5  # the decoder's noise changes nearly every block)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 3),
    block=st.sampled_from([4, 8]),
    tau=st.sampled_from([0.0, 2.0]),
    dtype=st.sampled_from([np.uint8, np.uint16]),
)
def test_random_fields_and_images_rebuild_the_mirror(seed: int, steps: int, block: int, tau: float,
                                                     dtype: type) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(block, 5 * block)), int(rng.integers(block, 5 * block))
    top = 255 if dtype is np.uint8 else 1020
    cache = rng.integers(0, top + 1, (h, w, 3)).astype(dtype)
    layer = DispatchLayer((h, w), block, dtype, tau_in=tau, unit=1.0)
    layer.update(cache, seq=3)
    hb, wb = layer.field.shape
    for _ in range(steps):
        layer.fold(_field(h, w, block, rng.integers(-block, block + 1, (hb, wb)),
                          rng.integers(-block, block + 1, (hb, wb)), rng.random((hb, wb)) < 0.8))
    # the current frame: the aligned cache with random blocks changed (some by a little, some a lot)
    cur = warp_blocks(cache, layer.field).astype(np.int64)
    cur += rng.integers(-3, 4, cur.shape) * (rng.random(cur.shape[:2]) < rng.random())[:, :, None]
    cur = np.clip(cur, 0, top).astype(dtype)
    p = build_residual(layer, cur, seq=7)
    assert p.seq == 7 and p.base_seq == 3
    rebuilt = apply_residual(cache, p)
    assert np.array_equal(rebuilt, p.rebuilt)
    assert (np.diff(p.indices) > 0).all() and p.dy.dtype == np.int16
    kept = np.ones(hb * wb, bool)
    kept[p.indices] = False
    f = MotionField(p.dy.astype(np.int32), p.dx.astype(np.int32), p.valid, block, h, w)
    assert (f.valid & f.source_inside()).reshape(-1)[kept].all()  # every shifted block has a usable vector
    if tau == 0.0:
        assert np.array_equal(rebuilt, cur)
    else:  # every residual block is the frame's, every kept block within τ of it on average
        blocks_r, blocks_c = to_blocks(rebuilt, block), to_blocks(cur, block)
        assert np.array_equal(blocks_r[p.indices], blocks_c[p.indices])
        sums, counts = block_difference(cur, rebuilt, block)
        assert (sums.reshape(-1)[kept] <= tau * counts.reshape(-1)[kept]).all()
