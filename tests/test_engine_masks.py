"""The engine's per-frame mask kernels against straightforward references (numpy / torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxshard.engine import _kernels as ek
from fluxshard.engine.graph import Geom
from fluxshard.engine.rfap import PixelMaps, reuse_mask
from fluxshard.motion import _kernels as mk
from fluxshard.motion.field import MotionField


def _field(rng: np.random.Generator, h: int, w: int, b: int) -> MotionField:
    hb, wb = -(-h // b), -(-w // b)
    choices = np.array([-8, -4, -2, 0, 0, 0, 2, 4, 8], np.int32)
    dy = rng.choice(choices, (hb, wb)).astype(np.int32)
    dx = rng.choice(choices, (hb, wb)).astype(np.int32)
    if rng.random() < 0.5:  # large uniform regions, as camera motion gives
        dy[: hb // 2] = 2
        dx[: hb // 2] = -4
    valid = rng.random((hb, wb)) > 0.1
    return MotionField(dy=np.where(valid, dy, 0), dx=np.where(valid, dx, 0), valid=valid, block=b, height=h,
                       width=w, scene_cut=False, source="test")


@pytest.mark.parametrize("seed", range(30))
def test_block_reuse_equals_strict_reuse(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = int(rng.choice([8, 16]))
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    f = _field(rng, h, w, b)
    bad = rng.random(f.shape) < 0.15
    light = PixelMaps.blocks(f, bad)
    full = PixelMaps.build(f, light.residual)
    S = int(rng.choice([1, 2, 4]))
    lo, hi = int(rng.integers(0, 4)), int(rng.integers(0, 4))
    g = Geom(S, S, lo, hi, hi, lo)
    hw = (-(-h // S), -(-w // S))
    for a, c in zip(reuse_mask(light, g, hw), reuse_mask(full, g, hw), strict=True):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("seed", range(10))
def test_window_any_matches_max_pool(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    s = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    d = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    p = (min(int(rng.integers(0, 3)), k[0] // 2), min(int(rng.integers(0, 3)), k[1] // 2))
    m = rng.random((h, w)) < 0.05
    ref = F.max_pool2d(torch.from_numpy(m)[None, None].float(), k, s, p, d)[0, 0].numpy() > 0
    extra = rng.random(ref.shape) < 0.02
    out = np.empty(ref.shape, np.bool_)
    th, tw = 3, 4
    tiles = np.zeros((-(-ref.shape[0] // th), -(-ref.shape[1] // tw)), np.bool_)
    n = ek.window_any(m, *k, *s, *p, *d, extra, out, th, tw, tiles)
    np.testing.assert_array_equal(out, ref | extra)
    assert n == int((ref | extra).sum())
    want = np.zeros_like(tiles)
    for i, j in zip(*np.nonzero(ref | extra), strict=True):
        want[i // th, j // tw] = True
    np.testing.assert_array_equal(tiles, want)


@pytest.mark.parametrize("seed", range(6))
def test_block_residual_matches_shifted_diff(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    h, w, b = 48, 64, 16
    f = _field(rng, h, w, b)
    cur = rng.random((h, w, 3)).astype(np.float32)
    ref = cur.copy()
    changed = rng.random((h, w)) < 0.3
    changed[:, w // 2:] = False  # the right half unchanged: both branches of the updated input are exercised
    ref[changed] += 0.5  # changed pixels
    tau = 0.1
    dy, dx, valid = f.dy.copy(), f.dx.copy(), f.valid.copy()
    bad = np.zeros(f.shape, np.bool_)
    upd = np.full_like(cur, -1.0)
    ek.block_residual(cur.reshape(h, -1), ref.reshape(h, -1), 3, dy, dx, valid, b, tau, bad, upd.reshape(h, -1),
                      -1.0)
    mad = np.empty(f.shape, np.float32)
    mk.shifted_diff(cur, ref, f.dy, f.dx, b, np.empty((h, w), np.float32), mad)
    zmad = np.empty(f.shape, np.float32)
    z = np.zeros_like(f.dy)
    mk.shifted_diff(cur, ref, z, z, b, np.empty((h, w), np.float32), zmad)
    rescued = ~f.valid & (zmad <= tau)
    want = np.where(f.valid, (mad > tau) | ~f.source_inside(), ~rescued)
    np.testing.assert_array_equal(bad, want)
    np.testing.assert_array_equal(valid, f.valid | rescued)
    assert not dy[rescued].any() and not dx[rescued].any()
    # the updated input, written in the same pass: shifted cache where reused, the frame where residual
    for i in range(f.shape[0]):
        for j in range(f.shape[1]):
            blk = upd[i * b:(i + 1) * b, j * b:(j + 1) * b]
            if bad[i, j]:
                np.testing.assert_array_equal(blk, cur[i * b:(i + 1) * b, j * b:(j + 1) * b])
            else:
                y0, x0 = i * b + dy[i, j], j * b + dx[i, j]
                np.testing.assert_array_equal(blk, ref[y0:y0 + b, x0:x0 + b])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nc", [1, 3])
@pytest.mark.parametrize("rescue_on", [False, True])
def test_block_residual_inplace_equals_two_buffer_update(seed: int, nc: int, rescue_on: bool) -> None:
    """The in-place variant leaves in ``ref`` exactly what the two-buffer kernel writes to ``out_upd`` (and the
    same decisions), with blocks moving onto each other's sources, partial edge blocks and invalid blocks —
    with and without zero-shift rescue (at about the blocks' median unshifted difference: half rescued)."""
    rescue = {1: 0.005, 3: 0.0075}[nc] if rescue_on else -1.0
    rng = np.random.default_rng(900 + seed)
    b, h, w = 8, 45, 61
    f = _field(rng, h, w, b)
    cur = (0.5 + 0.01 * rng.random((h, w, nc))).astype(np.float32)  # flat: moved blocks can be reused
    ref = cur + 0.01 * rng.random((h, w, nc)).astype(np.float32)  # distinct values: a wrong source shows
    ref[:, : w // 3] += 0.4  # a changed region: residual blocks
    still = rng.random(f.shape) < 0.5  # half the blocks stay put
    f.dy[still] = 0
    f.dx[still] = 0
    a = (f.dy.copy(), f.dx.copy(), f.valid.copy(), np.zeros(f.shape, np.bool_))
    upd = np.full((h, w * nc), -1.0, np.float32)
    ek.block_residual(cur.reshape(h, -1), ref.reshape(h, -1), nc, a[0], a[1], a[2], b, 0.1, a[3], upd, rescue)
    bm = (f.dy.copy(), f.dx.copy(), f.valid.copy(), np.zeros(f.shape, np.bool_))
    inplace = ref.reshape(h, -1).copy()
    ek.block_residual_inplace(cur.reshape(h, -1), inplace, nc, bm[0], bm[1], bm[2], b, 0.1, bm[3],
                              np.full(h * w * nc, np.nan, np.float32), rescue)
    for x, y in zip(a, bm, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(inplace, upd)
    moved = (a[0] != 0) | (a[1] != 0)
    assert (moved & ~a[3]).any() and a[3].any() and (~moved & ~a[3]).any()  # every write branch exercised
    if rescue_on:
        assert (((f.dy != 0) | (f.dx != 0)) & f.valid & ~moved).any()  # some moving blocks were rescued


@pytest.mark.parametrize("nc", [1, 3])
def test_zero_shift_rescue_takes_only_blocks_whose_unshifted_cache_matches(nc: int) -> None:
    """Zero-shift rescue: a valid block whose vector says it moved but whose *unshifted* cache differs by at
    most ``rescue`` becomes a valid zero-motion block (reused as is, aligned at every stride); blocks whose
    content really moved keep their vector; invalid blocks keep the old rule (τ_in); off (-1) = untouched."""
    rng = np.random.default_rng(5)
    b, h, w = 8, 32, 48
    base = rng.random((h + 2, w + 2, nc)).astype(np.float32)
    ref = base[1:-1, 1:-1].copy()
    cur = base[1:-1, :-2].copy()  # the content moved 1 px right: cur[y, x] = ref[y, x - 1]
    cur[:, : w // 2] = ref[:, : w // 2] + 0.003  # the left half did not move (a codec vector anyway)
    f = MotionField.zero(h, w, b)
    f.dx[:] = -1  # every block says "from 1 px to the left"
    f.valid[0, 0] = False
    for rescue, want_zero in ((-1.0, np.zeros(f.shape, bool)), (0.01, np.arange(f.shape[1]) < f.shape[1] // 2)):
        dy, dx, valid = f.dy.copy(), f.dx.copy(), f.valid.copy()
        bad = np.zeros(f.shape, np.bool_)
        upd = np.empty((h, w * nc), np.float32)
        ek.block_residual(cur.reshape(h, -1), ref.reshape(h, -1), nc, dy, dx, valid, b, 0.02, bad, upd, rescue)
        zero = np.broadcast_to(want_zero, f.shape).copy()
        zero[0, 0] = True  # invalid, static within τ_in: the old rule makes it a zero-motion block
        np.testing.assert_array_equal(dx == 0, zero)
        assert valid.all()
        assert not bad[:, w // b // 2:].any()  # moved content: its vector aligns it exactly (x ≥ 1 px inside)
        if rescue >= 0:
            assert not bad.any()
            np.testing.assert_array_equal(upd.reshape(h, w, nc)[:, : w // 2], ref[:, : w // 2])  # kept as is


def test_engine_updates_its_own_input_cache_in_place_only() -> None:
    """Fast mode writes the updated input into the engine's buffer in place once the cache is that buffer,
    never into the caller's tensor; outputs equal those of an engine forced onto the two-buffer path."""
    from torch import nn

    from fluxshard.engine.engine import Engine, EngineConfig
    from fluxshard.motion.field import MotionField

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, 2, 1)).eval()
    cfg = EngineConfig(mode="fast", tau_in=0.01, default_threshold=0.01, layout="pgemm")
    a, c = Engine(body, (32, 48), cfg), Engine(body, (32, 48), cfg)
    c._upd_bufs = []  # never one of its own buffers: the in-place branch is never taken
    type_check = c._input_buffer

    def fresh(x: torch.Tensor) -> torch.Tensor:
        c._upd_bufs = []
        return type_check(x)

    c._input_buffer = fresh  # type: ignore[method-assign]
    xs = [torch.rand(1, 3, 32, 48).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    xs[2][..., :16, :16] += 1.0
    originals = [x.clone() for x in xs]
    z = MotionField.zero(32, 48, 16)
    caches = []
    with torch.inference_mode():
        for t, x in enumerate(xs):
            oa, _ = a.step(x, None if t == 0 else z)
            oc, _ = c.step(x, None if t == 0 else z)
            assert torch.equal(oa, oc)
            caches.append(a._x_cache)
    assert caches[1] is caches[2] is caches[3]  # updated in place from the second incremental frame on
    assert any(caches[3] is u for u in a._upd_bufs)
    for x, o in zip(xs, originals, strict=True):
        assert torch.equal(x, o)  # the caller's frames are never written


def test_updated_input_keeps_reused_blocks_from_the_cache() -> None:
    """Static field, the left half of the frame changed: reused blocks come from the cache (not the frame),
    residual blocks from the frame."""
    rng = np.random.default_rng(7)
    h, w, b = 32, 64, 16
    ref = rng.random((h, w, 3)).astype(np.float32)
    cur = ref + 0.001  # below tau on the right half: those blocks stay the cached content
    cur[:, : w // 2] += 0.5
    z = np.zeros((h // b, w // b), np.int32)
    bad = np.zeros(z.shape, np.bool_)
    upd = np.empty_like(cur)
    ek.block_residual(cur.reshape(h, -1), ref.reshape(h, -1), 3, z, z.copy(), np.ones(z.shape, np.bool_), b, 0.02,
                      bad, upd.reshape(h, -1), -1.0)
    assert bad[:, :2].all() and not bad[:, 2:].any()
    np.testing.assert_array_equal(upd[:, : w // 2], cur[:, : w // 2])
    np.testing.assert_array_equal(upd[:, w // 2:], ref[:, w // 2:])


@pytest.mark.parametrize("seed", range(6))
def test_changed_dense_matches_moved_cache_reference(seed: int) -> None:
    """Fast mode's change test for a dense layer, read from the unmoved cache, equals |y − moved cache| > τ."""
    rng = np.random.default_rng(seed)
    c, h, w = int(rng.integers(1, 40)), int(rng.integers(3, 30)), int(rng.integers(3, 30))
    y = torch.rand(1, c, h, w).contiguous(memory_format=torch.channels_last)
    sy = np.where(np.arange(h)[:, None] < h // 2, 1, -2).repeat(w, 1).astype(np.int32)  # two shard regions
    sx = np.where(np.arange(h)[:, None] < h // 2, -1, 2).repeat(w, 1).astype(np.int32)
    iy, ix = np.arange(h)[:, None] + sy, np.arange(w)[None, :] + sx
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    cache = torch.rand(1, c, h, w)  # the old map: y's content at the shifted positions, plus small changes
    k = int(inside.sum())
    big = torch.from_numpy(rng.random(k) < 0.3).float() * 0.5  # a third of the positions really changed
    cache[0][:, iy[inside], ix[inside]] = y[0][:, inside] + 0.05 * torch.rand(c, k) + big
    cache = cache.contiguous(memory_format=torch.channels_last)
    moved = cache[0][:, np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]
    tau = 0.08
    ref = ((y[0] - moved).abs().amax(0) > tau).numpy() | ~inside
    y_before = y.clone()
    out = np.empty((h, w), np.bool_)
    ek.changed_dense(y[0].permute(1, 2, 0).numpy(), cache[0].permute(1, 2, 0).numpy(), sy, sx, tau, out)
    assert np.array_equal(out, ref)
    assert 0 < out.sum() < out.size
    assert torch.equal(y, y_before)  # a test only: y is the new cache as it is


@pytest.mark.parametrize("seed", range(4))
def test_write_rows_scatters_and_measures_change(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_rows, c = 50, int(rng.integers(1, 70))
    orows = torch.rand(n_rows, c)
    before = orows.clone()
    dst = torch.from_numpy(np.sort(rng.choice(n_rows, 17, replace=False)).astype(np.int64))
    yr = torch.rand(17, c)
    delta = np.empty(17, np.float32)
    ek.write_rows(yr.numpy(), dst.numpy(), orows.numpy(), delta)
    ref = before.clone()
    ref.index_copy_(0, dst, yr)
    assert torch.equal(orows, ref)
    assert np.allclose(delta, (yr - before[dst]).abs().amax(1).numpy(), atol=0)


@pytest.mark.parametrize("act", [0, 1, 2])
def test_finish_rows_applies_the_fused_activation_bit_exactly(act: int) -> None:
    """The pgemm write-back applies ReLU / leaky ReLU itself; it must give PyTorch's values bit for bit (the
    truncation test compares them with caches written by dense layers), NaN included."""
    rng = np.random.default_rng(act)
    n_rows, c = 40, 19
    orows = torch.rand(n_rows, c)
    before = orows.clone()
    pos = np.sort(rng.choice(n_rows, 11, replace=False)).astype(np.int64)
    yr = torch.from_numpy(rng.normal(0, 1, (11, c)).astype(np.float32))
    yr[0, :4] = torch.tensor([0.0, -0.0, float("nan"), 1e-30])
    ref = {0: yr, 1: torch.relu(yr), 2: F.leaky_relu(yr, 0.1)}[act]
    changed, written = np.zeros(n_rows, np.bool_), np.zeros(n_rows, np.bool_)
    ek.finish_rows(yr.numpy().copy(), pos, orows.numpy(), 0.5, np.zeros(0, np.float32), False, changed, written,
                   act, 0.1)
    want = before.clone()
    want[torch.from_numpy(pos)] = ref
    assert torch.equal(orows.isnan(), want.isnan())
    assert torch.equal(orows.nan_to_num(), want.nan_to_num())
    assert written[pos].all() and written.sum() == len(pos)


@pytest.mark.parametrize("nc", [1, 2, 3, 4])
def test_block_residual_any_channel_count(nc: int) -> None:
    """The row kernel against a numpy reference for any channel count (3 takes an unrolled path): per block,
    mean of max-over-channels |cur − shifted ref|; blocks whose source leaves the frame are residual."""
    rng = np.random.default_rng(500 + nc)
    b, h, w = 8, 37, 53  # partial edge blocks
    f = _field(rng, h, w, b)
    f.valid[:] = True
    cur = rng.random((h, w, nc)).astype(np.float32)
    ref = cur.copy()
    ref[:, : w // 2] += (rng.random((h, w // 2, nc)) < 0.5).astype(np.float32) * 0.3
    bad = np.zeros(f.shape, np.bool_)
    ek.block_residual(cur.reshape(h, -1), ref.reshape(h, -1), nc, f.dy.copy(), f.dx.copy(), f.valid.copy(), b,
                      0.05, bad, np.zeros((0, 0), np.float32), -1.0)
    want = np.zeros(f.shape, np.bool_)
    for i in range(f.shape[0]):
        for j in range(f.shape[1]):
            y0, x0 = i * b, j * b
            y1, x1 = min(y0 + b, h), min(x0 + b, w)
            oy, ox = int(f.dy[i, j]), int(f.dx[i, j])
            if y0 + oy < 0 or y1 + oy > h or x0 + ox < 0 or x1 + ox > w:
                want[i, j] = True
                continue
            d = np.abs(cur[y0:y1, x0:x1] - ref[y0 + oy:y1 + oy, x0 + ox:x1 + ox]).max(-1)
            want[i, j] = d.mean() > 0.05
    np.testing.assert_array_equal(bad, want)
    assert want.any() and not want.all()


@pytest.mark.parametrize("seed", range(4))
def test_integral_bool_equals_cumulative_sums(seed: int) -> None:
    rng = np.random.default_rng(400 + seed)
    m = rng.random((int(rng.integers(1, 50)), int(rng.integers(1, 50)))) < 0.3
    out = np.empty((m.shape[0] + 1, m.shape[1] + 1), np.int32)
    ek.integral_bool(m, out)
    want = np.zeros_like(out)
    want[1:, 1:] = m.astype(np.int32).cumsum(0).cumsum(1)
    np.testing.assert_array_equal(out, want)


def _shift_reference(t: torch.Tensor, sy: np.ndarray, sx: np.ndarray) -> torch.Tensor:
    h, w = sy.shape
    iy = np.arange(h)[:, None] + sy
    ix = np.arange(w)[None, :] + sx
    return t[:, :, torch.from_numpy(iy), torch.from_numpy(ix)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("moving", [0.2, 0.9])
def test_move_equals_reference_with_and_without_spare(seed: int, moving: float) -> None:
    """Every route of ``_move`` (few rows in place, whole map into a new tensor, whole map into a spare) gives
    ``cache[i + sy, j + sx]``; a spare is only written when it fits, never the cache itself."""
    from fluxshard.engine.engine import _move, _Moves

    rng = np.random.default_rng(seed)
    h, w, c = 9, 13, 5
    sy = np.zeros((h, w), np.int32)
    sx = np.zeros((h, w), np.int32)
    m = rng.random((h, w)) < moving
    for i, j in zip(*np.nonzero(m), strict=True):  # any in-range source
        sy[i, j] = rng.integers(-i, h - i)
        sx[i, j] = rng.integers(-j, w - j)
    cache = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
    ref = _shift_reference(cache, sy, sx)
    for spare in (None, torch.empty_like(cache), torch.empty(1, c, h, w), torch.empty(1, c, h + 1, w)):
        src = cache.clone()
        spares = {} if spare is None else {"n": spare}
        out = _move(src, sy, sx, _Moves(sy, sx), spares, "n")
        assert torch.equal(out, ref)
        if spare is not None and 2 * m.mean() < 1:  # an in-place move leaves the spare for a later frame
            assert spares["n"] is spare
        fits = spare is not None and spare.stride() == cache.stride() and spare.shape == cache.shape
        if 2 * m.mean() >= 1 and fits:
            assert out is spare
        else:
            assert out is not spare
    # a spare that is the cache itself is not used
    src = cache.clone()
    out = _move(src, sy, sx, _Moves(sy, sx), {"n": src}, "n")
    assert torch.equal(out, ref)


def test_gather_shift_rejects_sources_outside_the_map() -> None:
    sy = np.zeros((3, 4), np.int32)
    sx = np.zeros((3, 4), np.int32)
    sx[0, 3] = 1
    rows = np.zeros((12, 2), np.float32)
    with pytest.raises(IndexError):
        ek.gather_shift(rows, sy, sx, rows.copy())


def test_recycled_spares_never_share_memory_with_live_caches() -> None:
    """Only a replaced cache whose memory no live cache (or other spare) uses becomes a spare."""
    from torch import nn

    from fluxshard.engine.engine import Engine

    eng = Engine(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (16, 16))
    a, b, c = (torch.zeros(1, 4, 8, 8) for _ in range(3))
    alias = a[:, :2]  # another node's cache viewing a's memory
    kept = torch.zeros(1, 4, 8, 8)
    old = {"a": a, "alias": alias, "b": b, "kept": kept}
    new = {"a": torch.zeros(1, 4, 8, 8), "alias": a, "b": c, "kept": kept}
    eng._recycle(old, new)
    assert set(eng._spare) == {"b"}  # a is still live through "alias"; kept was not replaced
    assert eng._spare["b"] is b
    eng._recycle({"x": b}, {"x": torch.zeros(1)})  # b is already a spare: not handed out twice
    assert set(eng._spare) == {"b"}
