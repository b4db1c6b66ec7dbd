"""Tile-sparse executor: parity with dense PyTorch on recomputed tiles, ``base`` untouched elsewhere.

The expected recomputed set is built here from the documented tile rule (grid cells of T; the last row /
column of tiles shifted inward to end at the border), independently of the module's own helpers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.engine.sparse import (
    LayerCost,
    PlanCache,
    default_tile,
    recomputed_mask,
    sparse_conv2d,
    sparse_pool2d,
    tile_mask,
)

CL = torch.channels_last


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: parity does not depend on it, and a 2-thread OpenMP barrier on a loaded 2-core
    machine turns every tiny conv into a 16 ms scheduler wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
SENTINEL = 1234.5
LAYOUTS = ("batch", "hw", "gemm", "auto")


def expected_recomputed(active: np.ndarray, tile: int) -> np.ndarray:
    ho, wo = active.shape
    th, tw = min(tile, ho), min(tile, wo)
    out = np.zeros_like(active)
    for y in range(0, ho, th):
        for x in range(0, wo, tw):
            if active[y:y + th, x:x + tw].any():
                y0, x0 = min(y, ho - th), min(x, wo - tw)
                out[y0:y0 + th, x0:x0 + tw] = True
    return out


def masks_for(ho: int, wo: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = [(f"f{f}", rng.random((ho, wo)) < f) for f in (0.0, 0.05, 0.3)]
    out.append(("full", np.ones((ho, wo), bool)))
    for name, (y, x) in {"tl": (0, 0), "tr": (0, wo - 1), "bl": (ho - 1, 0), "br": (ho - 1, wo - 1)}.items():
        m = np.zeros((ho, wo), bool)
        m[y, x] = True
        out.append((name, m))
    return out


def check(out: torch.Tensor, ref: torch.Tensor, active: np.ndarray, tile: int, path: str) -> None:
    scale = max(1.0, ref.abs().max().item())
    if path == "dense":
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * scale)
        return
    rec = expected_recomputed(active, tile)
    assert rec[active].all()
    rec_t = torch.from_numpy(rec)
    if rec.any():
        diff = (out - ref)[..., rec_t].abs().max().item()
        assert diff <= 1e-5 * scale, f"recomputed tiles differ from dense by {diff:.3g} (scale {scale:.3g})"
    if (~rec).any():
        kept = out[..., ~rec_t]
        assert torch.equal(kept, torch.full_like(kept, SENTINEL)), "positions outside the tiles changed"


def conv_cases() -> list[tuple]:
    cases = []
    for k, s, p, d in itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2)):
        for cin, cout in ((3, 16), (32, 64)):
            for gname in ("g1", "dw", "grouped"):
                if gname == "g1":
                    g, co = 1, cout
                elif gname == "dw":
                    g, co = cin, cin * (2 if cin == 32 else 1)
                else:
                    if cin % 4:
                        continue
                    g, co = 4, cout
                cases.append((k, s, p, d, cin, co, g))
    return cases


CASES = conv_cases()
SIZES = ((37, 53), (64, 64), (20, 20))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "k{}s{}p{}d{}_{}to{}_g{}".format(*c))
def test_conv_parity(case: tuple, size: tuple[int, int]) -> None:
    k, s, p, d, cin, cout, g = case
    i = CASES.index(case) + 7 * SIZES.index(size)
    torch.manual_seed(i)
    conv = nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=g, bias=bool(i % 2)).eval()
    x = torch.randn(1, cin, *size).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = conv(x)
    ho, wo = ref.shape[-2:]
    tile = (None, 3, 5)[i % 3]  # default per resolution, and sizes that do not divide the output
    t_eff = tile or default_tile((ho, wo))
    cache = PlanCache()
    for (mname, active), layout in itertools.product(masks_for(ho, wo, i), (*LAYOUTS, "pgemm")):
        if layout in ("gemm", "pgemm") and g != 1:
            continue
        base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
        if layout == "pgemm":  # exactly the active positions are written, nothing else
            if not active.any():
                continue
            with torch.no_grad():
                out, st = sparse_conv2d(x, conv, base, None, tile=tile, layout="pgemm", plan_cache=cache,
                                        tiles=tile_mask(active, t_eff), positions=np.flatnonzero(active),
                                        track=True)
            assert st.path == "pgemm" and out is base
            scale = max(1.0, ref.abs().max().item())
            act = torch.from_numpy(active)
            assert (out - ref)[..., act].abs().max().item() <= 1e-5 * scale, f"pgemm, mask {mname}"
            kept = out[..., ~act]
            assert torch.equal(kept, torch.full_like(kept, SENTINEL)), f"pgemm wrote outside, mask {mname}"
            assert st.rows is not None and st.delta is not None
            np.testing.assert_array_equal(st.rows.numpy(), np.flatnonzero(active))
            want = (ref.permute(0, 2, 3, 1).reshape(-1, ref.shape[1])[st.rows] - SENTINEL).abs().amax(1)
            torch.testing.assert_close(st.delta, want, rtol=0, atol=1e-5 * max(scale, abs(SENTINEL)))
            continue
        with torch.no_grad():
            out, st = sparse_conv2d(x, conv, base, torch.from_numpy(active), tile=tile, layout=layout,
                                    plan_cache=cache)
        assert st.tile == t_eff
        if not active.any():
            assert st.path == "skip" and out is base
        elif layout != "auto":
            assert st.path == layout
        if st.path in ("batch", "hw", "gemm"):
            assert out is base  # in place
        try:
            check(out, ref, active, t_eff, st.path)
        except AssertionError as e:
            raise AssertionError(f"mask {mname}, layout {layout}, path {st.path}: {e}") from e


@pytest.mark.parametrize("post", [lambda t: F.leaky_relu(t, 0.1), F.silu, F.relu6, torch.sigmoid],
                         ids=["leaky", "silu", "relu6", "sigmoid"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_post_fused(post, layout: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, 1, 1)
    x = torch.randn(1, 16, 45, 31).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = post(conv(x))
        active = np.random.default_rng(1).random(ref.shape[-2:]) < 0.02
        base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
        out, st = sparse_conv2d(x, conv, base, active, tile=8, post=post, layout=layout, crossover=0.9)
    assert st.path != "dense"
    check(out, ref, active, 8, st.path)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("layout", ["batch", "hw", "gemm"])
def test_padding_modes_and_same(mode: str, layout: str) -> None:
    torch.manual_seed(2)
    for conv in (nn.Conv2d(8, 8, 3, 2, 2, dilation=2, padding_mode=mode),
                 nn.Conv2d(8, 8, 4, 1, "same", padding_mode=mode),  # asymmetric: 1 before, 2 after
                 nn.Conv2d(8, 8, (3, 5), 1, "same", dilation=(1, 2))):
        x = torch.randn(1, 8, 23, 29).contiguous(memory_format=CL)
        with torch.no_grad():
            ref = conv(x)
            for _, active in masks_for(*ref.shape[-2:], 3):
                base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
                out, st = sparse_conv2d(x, conv, base, active, tile=6, layout=layout)
                check(out, ref, active, 6, st.path)


POOLS = [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d(3, 1, 1, dilation=2),
         nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2), nn.AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 1, 0)]


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (20, 20)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_pool_parity(pool: nn.Module, size: tuple[int, int]) -> None:
    torch.manual_seed(3)
    x = (torch.randn(1, 24, *size) - 2.0).contiguous(memory_format=CL)  # mostly negative: -inf padding matters
    ref = pool(x)
    for (_, active), layout in itertools.product(masks_for(*ref.shape[-2:], 4), ("batch", "hw", "auto")):
        base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
        out, st = sparse_pool2d(x, pool, base, active, tile=5, layout=layout)
        check(out, ref, active, 5, st.path)


def test_memory_formats_and_inplace_flag() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, 1, 1)
    x = torch.randn(1, 8, 30, 30)  # NCHW input is accepted
    with torch.no_grad():
        ref = conv(x)
        active = np.zeros((30, 30), bool)
        active[10, 12] = True
        base = torch.full_like(ref, SENTINEL).contiguous()  # NCHW base: still updated in place
        out, _ = sparse_conv2d(x, conv, base, active, tile=8, layout="batch")
        assert out is base and not base.is_contiguous(memory_format=CL)
        check(out, ref, active, 8, "batch")
        # a non-viewable base: a copy is returned
        base = torch.full((1, 12, 30, 31), SENTINEL)[..., :30]
        out, _ = sparse_conv2d(x, conv, base, active, tile=8, layout="hw")
        assert out is not base and torch.all(base == SENTINEL)
        check(out, ref, active, 8, "hw")
        base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
        out, _ = sparse_conv2d(x, conv, base, active, tile=8, layout="batch", inplace=False)
        assert out is not base and torch.all(base == SENTINEL)
        check(out, ref, active, 8, "batch")


def test_dense_fallback_and_auto_rule() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(32, 32, 3, 1, 1)
    x = torch.randn(1, 32, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = conv(x)
        base = torch.full_like(ref, SENTINEL).contiguous(memory_format=CL)
        out, st = sparse_conv2d(x, conv, base, np.ones((64, 64), bool))
        assert st.path == "dense" and out is not base and torch.all(base == SENTINEL)
        torch.testing.assert_close(out, ref)
        few = np.zeros((64, 64), bool)
        few[5, 5] = True
        _, st = sparse_conv2d(x, conv, base, few)
        assert st.path in ("batch", "hw", "gemm") and st.tiles == 1
        _, st = sparse_conv2d(x, conv, base, few, crossover=0.0)
        assert st.path == "dense"
    lc = LayerCost(1.0, {"batch": (0.1, 1.5), "gemm": (0.2, 1.0)})
    assert lc.choose(0.05) == "batch" and lc.choose(0.5) == "gemm" and lc.choose(0.95) == "dense"
    assert lc.crossover() == pytest.approx(0.8, abs=0.01)


def test_calibrate_fills_costs() -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(16, 16, 3, 1, 1)
    x = torch.randn(1, 16, 48, 48).contiguous(memory_format=CL)
    cache = PlanCache()
    lc = cache.calibrate(x, conv, reps=2)
    assert lc.measured and set(lc.paths) == {"batch", "hw", "gemm", "pgemm"} and lc.dense > 0
    assert len(cache.costs) == 1


def test_tile_helpers_match_rule() -> None:
    rng = np.random.default_rng(7)
    active = rng.random((21, 30)) < 0.03
    assert np.array_equal(recomputed_mask(tile_mask(active, 8), (21, 30), 8), expected_recomputed(active, 8))
    assert default_tile((160, 160)) == 16 and default_tile((52, 52)) == 8 and default_tile((13, 13)) == 4


def test_unsupported_raise() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    conv.padding_mode = "weird"
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        sparse_conv2d(x, conv, torch.zeros(1, 4, 8, 8), np.ones((8, 8), bool))
    with pytest.raises(NotImplementedError, match=r"nn\.Conv2d"):
        sparse_conv2d(x, nn.ConvTranspose2d(4, 4, 3), torch.zeros(1, 4, 10, 10), np.ones((10, 10), bool))
    with pytest.raises(NotImplementedError, match="count_include_pad"):
        sparse_pool2d(x, nn.AvgPool2d(3, 1, 1, count_include_pad=False), torch.zeros(1, 4, 8, 8),
                      np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="base"):
        sparse_conv2d(x, nn.Conv2d(4, 4, 3, padding=1), torch.zeros(1, 4, 7, 8), np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="gemm"):
        sparse_conv2d(x, nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.zeros(1, 4, 8, 8), np.ones((8, 8), bool),
                      layout="gemm")


def _dilate(active: np.ndarray, op: nn.Module) -> np.ndarray:
    """Output positions whose window touches an active input position (conv / pool geometry)."""
    t = torch.from_numpy(active.astype(np.float32))[None, None]
    k, s, p = op.kernel_size, op.stride, op.padding
    d = getattr(op, "dilation", 1)
    return F.max_pool2d(t, k, s, p, d, ceil_mode=getattr(op, "ceil_mode", False))[0, 0].numpy() > 0


@pytest.mark.parametrize("layout", ["batch", "hw", "auto"])
def test_nanodet_like_chain(layout: str) -> None:
    """Frame 1 dense (caches), frame 2 changes a patch; each layer recomputes the tiles its changed inputs
    reach (masks dilated layer by layer, as the engine does) and the final output equals dense on frame 2."""
    torch.manual_seed(8)
    stem = nn.Conv2d(3, 32, 3, 2, 1)
    pool = nn.MaxPool2d(3, 2, 1)
    c1 = nn.Conv2d(32, 16, 3, 1, 1)
    c2 = nn.Conv2d(16, 32, 1)
    act = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
    layers = [(stem, act), (pool, None), (c1, act), (c2, None)]

    def dense(x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for op, post in layers:
            x = op(x)
            x = post(x) if post is not None else x
            outs.append(x.contiguous(memory_format=CL))
        return outs

    x0 = torch.rand(1, 3, 128, 160).contiguous(memory_format=CL)
    x1 = x0.clone()
    x1[..., 40:52, 70:90] += 0.5
    x1[..., 120:, 150:] -= 0.3  # a change at the bottom-right border
    with torch.no_grad():
        caches = dense(x0)
        refs = dense(x1)
        changed = (x1 != x0).any(1)[0].numpy()
        x = x1
        cache = PlanCache()
        for (op, post), base in zip(layers, caches, strict=True):
            changed = _dilate(changed, op)
            fn = sparse_pool2d if isinstance(op, nn.MaxPool2d) else sparse_conv2d
            x, st = fn(x, op, base, changed, post=post, layout=layout, plan_cache=cache, crossover=0.9)
            assert st.path in ("batch", "hw", "gemm") and 0 < st.fraction < 0.5
        torch.testing.assert_close(x, refs[-1], rtol=0, atol=1e-5 * refs[-1].abs().max().item())
