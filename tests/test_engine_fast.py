"""Fast mode: relaxed RFAP + truncation. Exact when nothing needs relaxing; cheaper than exact mode on
real video; bad configuration is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.engine.engine import Engine, EngineConfig, EngineError
from fluxshard.engine.inputs import InputMapper
from fluxshard.motion.field import MotionField
from test_engine_exact import ConvStack, run_parity, sequence


@pytest.mark.parametrize("options", [{}, {"layout": "dense"}, {"layout": "auto"}])
def test_fast_mode_is_exact_when_motion_is_aligned(options: dict) -> None:
    """Shifts that are multiples of every stride, no thresholds: nothing is approximated, on sparse and on
    dense layers (where the change test reads the unmoved cache)."""
    torch.manual_seed(0)
    stats = run_parity(ConvStack().eval(), sequence(5, 96, 128, (0, 8), (4, 4)), mode="fast", **options)
    assert np.mean([s.active_fraction for s in stats[1:]]) < 0.9


def test_truncation_reduces_work_and_bounds_error() -> None:
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = sequence(6, 96, 128, (0, 8), (4, 4))
    noisy = []
    g = torch.Generator().manual_seed(1)
    for x, f in frames:  # small noise everywhere: what lossy video looks like to an exact engine
        noisy.append(((x + 0.004 * torch.randn(x.shape, generator=g)).clamp(0, 1), f))
    act = {}
    err = {}
    for name, cfg in {"exact": EngineConfig(layout="pgemm"),
                      "fast": EngineConfig(mode="fast", tau_in=0.02, default_threshold=0.02)}.items():
        eng = Engine(body, (96, 128), cfg)
        a, e = [], []
        with torch.inference_mode():
            for x, f in noisy:
                y, st = eng.step(x, f)
                e.append(float((y - body(x)).abs().max()))
                if not st.dense:
                    a.append(st.active_fraction)
        act[name], err[name] = np.mean(a), max(e)
    assert err["exact"] < 1e-5
    assert act["fast"] < 0.5 * act["exact"], act
    assert err["fast"] < 0.1, err  # sigmoid outputs; bounded by the thresholds' budget


def test_config_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="exact mode takes no thresholds"):
        EngineConfig(tau_in=0.1)
    with pytest.raises(EngineError, match="mode must be"):
        EngineConfig(mode="turbo")  # type: ignore[arg-type]
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(EngineError, match=r"t\.json: cannot read engine thresholds"):
        EngineConfig.from_file(bad)
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"tau_in": 0.01, "default_threshold": 0.03, "thresholds": {"c1": 0.0}}))
    cfg = EngineConfig.from_file(good)
    assert cfg.mode == "fast" and cfg.thresholds == {"c1": 0.0} and cfg.tau_in == 0.01
    other = tmp_path / "o.json"  # e.g. a bench report passed by mistake: no thresholds at all
    other.write_text(json.dumps({"model": "nanodet", "frames": 3}))
    with pytest.raises(EngineError, match=r"o\.json: no engine thresholds"):
        EngineConfig.from_file(other)
    for bad_value in ({"thresholds": [0.1]}, {"thresholds": {"c1": "big"}}, {"tau_in": -1}, {"tau_in": "nan"}):
        other.write_text(json.dumps(bad_value))
        with pytest.raises(EngineError, match=r"o\.json: malformed engine thresholds"):
            EngineConfig.from_file(other)


def test_thresholds_for_another_model_are_refused() -> None:
    """A profile whose layer names match none of the model's convolutions would silently run with τ = 0."""
    from torch import nn

    from fluxshard.engine.engine import Engine

    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(EngineError, match="name none of this model's convolutions"):
        Engine(body, (32, 32), EngineConfig(mode="fast", thresholds={"stem_conv": 0.1}))
    with pytest.raises(EngineError, match="name none of this model's convolutions"):
        Engine(body, (32, 32), EngineConfig(mode="fast", motion_bins=(1.0,), bin_thresholds=(({"x": 0.1}, 0.0),)))
    eng = Engine(body, (32, 32), EngineConfig(mode="fast", thresholds={"_0": 0.1, "gone": 0.2}))  # partial: fine
    assert eng.config.thresholds["_0"] == 0.1


def test_input_mapper_keeps_shifts_whole_pixels() -> None:
    m = InputMapper((270, 500), factor=2)
    assert m.scaled_hw == (135, 250) and m.input_hw == (160, 256)
    rgb = np.random.default_rng(0).integers(0, 256, (270, 500, 3), dtype=np.uint8)
    x = m.tensor(rgb)
    assert tuple(x.shape) == (1, 3, 160, 256) and float(x[..., 135:, :].abs().max()) == 0.0
    # channels-last with strides torch recognises (a permuted numpy view is not: convolutions then fall back
    # to NCHW kernels, measured 1.4× slower here), so neither the engine nor dense inference re-lays it out
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.nn.Conv2d(3, 8, 3)(x).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), rgb[:2, :2].reshape(-1, 3).mean(0) / 255, rtol=1e-6)
    f = MotionField.zero(270, 500, 16)
    f.dx[:] = 4
    f.dx[0, 0] = 3  # odd: not a whole pixel at half resolution
    g = m.field(f)
    assert g.block == 8 and (g.height, g.width) == (160, 256)
    assert not g.valid[0, 0] and g.valid[0, 1] and g.dx[0, 1] == 2
    assert g.valid[-1, -1] and g.dx[-1, -1] == 0  # padding: zero motion


def test_independent_streams_in_one_process() -> None:
    """Two engines on one body, stepped alternately, give exactly what each gives alone."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    a = sequence(4, 64, 96, (0, 8), (4, 0), seed=1)
    b = sequence(4, 64, 96, (8, 0), (0, 4), seed=2)
    solo = []
    for frames in (a, b):
        eng = Engine(body, (64, 96))
        with torch.inference_mode():
            solo.append([eng.step(x, f)[0] for x, f in frames])
    ea, eb = Engine(body, (64, 96)), Engine(body, (64, 96))
    with torch.inference_mode():
        for t in range(4):
            ya = ea.step(*a[t])[0]
            yb = eb.step(*b[t])[0]
            assert torch.equal(ya, solo[0][t]) and torch.equal(yb, solo[1][t])


def test_baseline_fields_and_naive_mv() -> None:
    """delta / global-warp fields, and naive MV reuse (no RFAP) erring where RFAP does not."""
    from fluxshard.engine.baselines import global_field, zero_field

    f = MotionField.zero(96, 128, 16)
    f.dx[:], f.dy[:] = 8, -4
    f.dx[1, 1] = 40  # an outlier block
    g = global_field(f)
    assert g.valid.all() and (g.dx == 8).all() and (g.dy == -4).all()
    z = zero_field(f)
    assert z.valid.all() and not z.dx.any() and not z.dy.any()

    # A block-aligned object moving against the panning background: its interior blocks and the background
    # blocks are all valid, with different vectors — exactly where receptive fields straddle two motions.
    rng = np.random.default_rng(3)
    bg = rng.random((96 + 64, 128 + 64, 3)).astype(np.float32)
    obj = rng.random((32, 32, 3)).astype(np.float32)
    frames = []
    for t in range(5):
        img = bg[8 : 8 + 96, 8 * t : 8 * t + 128].copy()
        oy, ox = 16 + 16 * (t % 2), 32 + 16 * t
        img[oy : oy + 32, ox : ox + 32] = obj
        f = MotionField.zero(96, 128, 16)
        f.dx[:] = 8
        if t == 0:
            f.valid[:] = False
            f.scene_cut = True
        else:
            py, px = 16 + 16 * ((t - 1) % 2), 32 + 16 * (t - 1)
            f.valid[py // 16 : py // 16 + 2, px // 16 : px // 16 + 3] = False  # uncovered / moved content
            f.valid[oy // 16 : oy // 16 + 2, ox // 16 : ox // 16 + 2] = True
            f.dy[oy // 16 : oy // 16 + 2, ox // 16 : ox // 16 + 2] = py - oy
            f.dx[oy // 16 : oy // 16 + 2, ox // 16 : ox // 16 + 2] = px - ox
        frames.append((torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), f))
    torch.manual_seed(0)
    body = ConvStack().eval()
    first = {}
    for rfap in (True, False):
        eng = Engine(body, (96, 128), EngineConfig(mode="fast", rfap=rfap))
        with torch.inference_mode():
            stats = [eng.step(x, f)[1] for x, f in frames]
        first[rfap] = np.mean([s.layers[0].active_fraction for s in stats if not s.dense])
    # RFAP recomputes the positions whose receptive field straddles the object/background boundary; naive
    # MV reuse takes their cached values although they were computed from a different neighbourhood.
    assert first[True] > 1.04 * first[False], first
    with pytest.raises(EngineError, match="always applies RFAP"):
        EngineConfig(rfap=False)


def test_changes_below_thresholds_accumulate_instead_of_drifting() -> None:
    """Seed 000 Stage 4 / DeltaCNN's truncation buffers: the input cache and every layer cache hold what was
    last propagated, so a slow change (here +0.004 brightness per frame, a fifth of τ_in) is caught once it
    adds up — an engine that compared each frame with the previous one would never recompute anything and
    its output would stay frozen at frame 0."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    x0, _ = sequence(1, 64, 96, (0, 0), (0, 0))[0]
    frames = [((x0 + 0.004 * t).clamp(0, 1), MotionField.zero(64, 96, 16)) for t in range(30)]
    frames[0][1].scene_cut = True
    eng = Engine(body, (64, 96), EngineConfig(mode="fast", tau_in=0.02, default_threshold=5e-4, layout="pgemm"))
    errs, active = [], []
    with torch.inference_mode():
        for x, f in frames:
            y, st = eng.step(x, f)
            errs.append(float((y - body(x)).abs().max()))
            active.append(0.0 if st.dense else st.active_fraction)
        frozen = float((body(frames[0][0]) - body(frames[-1][0])).abs().max())
    assert max(active[1:]) > 0.05  # the accumulated change was recomputed at some point
    assert max(errs[10:]) < 0.4 * frozen, (max(errs[10:]), frozen)


class PanNet(nn.Module):
    """NanoDet-like structure whose non-conv nodes fast mode updates by rows: max / avg pooling, channel
    concat of unit outputs, bilinear up-sampling + add (PAN), a head split into channel slices + sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.a = nn.Conv2d(8, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(16, 16, 3, 2, 1)
        self.lat = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 12, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.max_pool2d(F.leaky_relu(self.stem(x), 0.1), 3, 2, 1)  # stride 4
        u = torch.cat([F.leaky_relu(self.a(s)), F.leaky_relu(self.b(s))], 1)
        d = self.lat(self.down(u))  # stride 8
        p = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False) * 0.5 + u
        p = F.avg_pool2d(p, 2, 2) + d
        h = self.head(p)
        return torch.sigmoid(h[:, :8]), h[:, 8:] * 2.0


@pytest.mark.parametrize("layout", ["pgemm", "auto"])
def test_row_ops_are_exact_when_motion_is_aligned(layout: str) -> None:
    """Pooling, concat, adds and head slices computed on written positions only (fast mode's row ops) equal
    dense inference when nothing needs relaxing, and they really run sparsely (the cache survives)."""
    torch.manual_seed(0)
    body = PanNet().eval()
    stats = run_parity(body, sequence(5, 96, 128, (0, 16), (8, 8)), mode="fast", layout=layout)
    assert np.mean([s.active_fraction for s in stats[1:]]) < 0.9
    eng = Engine(body, (96, 128), EngineConfig(mode="fast", layout=layout))
    assert {"max_pool2d", "cat", "add", "avg_pool2d", "add_1", "sigmoid", "mul_1"} <= set(eng._row_ops)


def test_row_ops_skip_static_frames() -> None:
    """A frame identical to the last one recomputes nothing and returns the cached outputs."""
    body = PanNet().eval()
    x, _ = sequence(1, 96, 128, (0, 0), (0, 0))[0]
    eng = Engine(body, (96, 128), EngineConfig(mode="fast"))
    with torch.inference_mode():
        eng.step(x, None)
        y, st = eng.step(x, MotionField.zero(96, 128, 16))
        ref = body(x)
    assert not st.dense and all(s.path == "skip" for s in st.layers)
    for a, b in zip(y, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_accumulated_truncation_bounds_layer_drift() -> None:
    """A change that stays under τ^l at a layer on every single frame (a slow brightness creep) never reaches
    downstream layers when each frame is compared with the previous one — the output freezes while the
    truth moves on. With accumulated truncation (the default) the carried change propagates once it adds up,
    so the error stays bounded by the thresholds instead of growing with time."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    x0, _ = sequence(1, 64, 96, (0, 0), (0, 0))[0]
    ramp = torch.zeros_like(x0)
    ramp[..., 16:48, 32:64] = 0.003  # one region brightens slowly
    frames = [((x0 + ramp * t).clamp(0, 1), MotionField.zero(64, 96, 16)) for t in range(80)]
    frames[0][1].scene_cut = True
    errs: dict[bool, list[float]] = {}
    for acc in (False, True):
        eng = Engine(body, (64, 96), EngineConfig(mode="fast", tau_in=0.0, default_threshold=0.02,
                                                  layout="pgemm", accumulate=acc))
        errs[acc] = []
        with torch.inference_mode():
            for x, f in frames:
                y, _ = eng.step(x, f)
                errs[acc].append(float((y - body(x)).abs().max()))
    assert errs[False][-1] > 2 * errs[False][20]  # without accumulation the error keeps growing
    assert max(errs[True][40:]) < 0.5 * errs[False][-1], (max(errs[True][40:]), errs[False][-1])


def _smooth_pan(n: int, h: int, w: int, v: int) -> list[tuple[torch.Tensor, MotionField]]:
    """A low-frequency scene panning ``v`` px/frame to the left (content enters on the right): error from a
    misaligned cache is then proportional to the misalignment instead of saturating at once."""
    yy, xx = np.mgrid[0 : h, 0 : w + n * v + 8].astype(np.float32)
    big = np.stack([0.5 + 0.4 * np.sin(xx / 11.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
    frames = []
    for t in range(n):
        img = np.ascontiguousarray(big[:, t * v : t * v + w])
        f = MotionField.zero(h, w, 16)
        f.dx[:] = v
        if t == 0:
            f.valid[:] = False
            f.scene_cut = True
        frames.append((torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), f))
    return frames


def test_carried_remainders_keep_sub_stride_caches_aligned() -> None:
    """A 1 px/frame pan is sub-stride for the stride-2 and stride-4 caches. With nothing recomputed (τ^l
    huge), a cache moved by the per-frame rounded vector drifts (round(1/4) = 0: the stride-4 cache never
    moves; round(1/2) = 1: the stride-2 one moves 2 px a frame), so the error grows every frame. Carried
    remainders move each cache by the whole positions the accumulated pan has reached, so its content is
    never more than half a stride off and the error stays bounded."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = _smooth_pan(40, 64, 128, 1)
    errs: dict[str, list[float]] = {}
    for name, cfg in {"carry": EngineConfig(mode="fast", default_threshold=1e9, carry_tolerance=0.5),
                      "rounded": EngineConfig(mode="fast", default_threshold=1e9, shift_tolerance=1 << 20)}.items():
        eng = Engine(body, (64, 128), cfg)
        errs[name] = []
        with torch.inference_mode():
            for x, f in frames:
                y, _ = eng.step(x, f)
                # the right edge takes new content every frame: compare the interior, which only moves
                errs[name].append(float((y - body(x))[..., 4:-4, 4:-20].abs().max()))
    c, r = errs["carry"], errs["rounded"]
    assert r[12] > 3 * r[1] and r[-1] > 3 * r[1], r  # rounded shifts drift (until the pattern's period)
    assert max(c[10:]) < 1.5 * max(c[1:10]) + 1e-3, c  # carried offsets stay within half a stride
    assert max(c[20:]) < 0.5 * r[-1], (max(c[20:]), r[-1])


def test_carried_remainders_change_nothing_when_shifts_are_aligned() -> None:
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = sequence(5, 96, 128, (0, 8), (4, 4))
    outs = {}
    for carry in (0.0, 0.5):
        eng = Engine(body, (96, 128), EngineConfig(mode="fast", carry_tolerance=carry))
        with torch.inference_mode():
            outs[carry] = [eng.step(x, f)[0] for x, f in frames]
    for a, b in zip(outs[0.0], outs[0.5], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(EngineError, match="carry_tolerance"):
        EngineConfig(mode="fast", carry_tolerance=0.7)


def test_shift_map_carry_tracks_the_offset_exactly() -> None:
    """Kernel invariant: each position's new offset is what its source carried plus the whole positions moved
    minus this frame's vector, and never above the tolerance; a 3 px/frame pan at stride 16 moves the
    cache by one position about every 5 frames."""
    from fluxshard.engine import _kernels as ek

    h, w, S = 64, 512, 16
    ho, wo = h // S, w // S
    dy = np.zeros((h // 16, w // 16), np.int32)
    dx = np.full((h // 16, w // 16), 3, np.int32)
    valid = np.ones(dy.shape, np.bool_)
    ey0 = np.zeros((ho, wo), np.int32)
    ex0 = np.zeros((ho, wo), np.int32)
    fine = np.zeros((1, 1), np.int32)
    total_moves = 0
    for _ in range(30):
        notok = np.empty((ho, wo), np.bool_)
        sy, sx, ey, ex = (np.empty((ho, wo), np.int32) for _ in range(4))
        ek.shift_map_carry(dy, dx, valid, 16, h, w, S, 8.0, ey0, ex0, fine, fine, 0, notok, sy, sx, ey, ex)
        j = wo // 2
        # the last column's source leaves the map: recomputed, it restarts at offset 0, and positions that
        # later take their content from there carry a different offset (recomputed too when above tol)
        assert not notok[:, : wo - 10].any()
        assert (np.abs(ex[~notok]) <= 8).all() and (sy == 0).all() and (ey == 0).all()
        assert ex[1, j] == S * sx[1, j] + ex0[1, j + sx[1, j]] - 3
        total_moves += int(sx[1, j])
        ey0, ex0 = ey, ex
    assert total_moves == round(30 * 3 / S)  # 90 px ≈ 5.6 positions: moved 6 times, offset −6 px left


def test_layers_that_recompute_almost_everything_run_whole() -> None:
    """``full_above``: a conv recomputing at least that fraction runs over every position (dense or the
    compiled path over all rows) and marks everything changed, so the frame equals dense inference up to
    float summation order — more recompute than truncation alone would ask for, never less."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = sequence(4, 96, 128, (0, 8), (4, 4))
    g = torch.Generator().manual_seed(2)
    noisy = [((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), f) for x, f in frames]
    eng = Engine(body, (96, 128), EngineConfig(mode="fast", tau_in=0.0, default_threshold=0.0, full_above=0.05))
    with torch.inference_mode():
        for x, f in noisy:
            y, st = eng.step(x, f)
            torch.testing.assert_close(y, body(x), atol=1e-5, rtol=1e-4)
            if not st.dense:
                assert all(s.active_fraction == 1.0 for s in st.layers[1:]), [s.active_fraction for s in st.layers]
    with pytest.raises(EngineError, match="full_above"):
        EngineConfig(mode="fast", full_above=0.0)


def test_updated_input_buffers_alternate() -> None:
    """Fast mode writes each frame's updated input into one of two reused buffers, never the one the input
    cache holds (it is read in the same pass), and the outputs are those of fresh buffers."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = sequence(5, 64, 96, (0, 8), (4, 0), seed=3)
    eng = Engine(body, (64, 96), EngineConfig(mode="fast", tau_in=0.02))
    seen = []
    with torch.inference_mode():
        outs = []
        for x, f in frames:
            outs.append(eng.step(x, f)[0])
            seen.append(eng._x_cache)
    assert seen[1] is not seen[2] and seen[1] is seen[3] and seen[2] is seen[4]
    ref = Engine(body, (64, 96), EngineConfig(mode="fast", tau_in=0.02))
    with torch.inference_mode():
        for (x, f), o in zip(frames, outs, strict=True):
            ref._upd_bufs = []  # fresh buffers every frame
            torch.testing.assert_close(ref.step(x, f)[0], o, rtol=0, atol=0)


@pytest.mark.parametrize(("taus", "residual"), [((0.0, 0.02), 1.0), ((0.02, 0.0), 0.0)])
def test_tau_in_follows_the_frames_motion_bin(taus: tuple[float, float], residual: float) -> None:
    """A profile may tighten τ_in in one motion bin: a uniform 0.01 change is residual everywhere under the
    still bin's τ_in = 0 and nowhere under τ_in = 0.02, whatever the top-level τ_in says."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    x = torch.rand(1, 3, 64, 96)
    f = MotionField.zero(64, 96, 16)
    cfg = EngineConfig(mode="fast", tau_in=0.5, motion_bins=(0.5, 1e9), bin_thresholds=(({}, 0.0), ({}, 0.0)),
                       bin_tau_in=taus)
    assert cfg.tau_in_for(0.0) == taus[0] and cfg.tau_in_for(3.0) == taus[1]
    eng = Engine(body, (64, 96), cfg)
    with torch.inference_mode():
        eng.step(x, None)
        _, st = eng.step((x + 0.01).clamp(0, 1), f)
    assert st.input_residual_fraction == pytest.approx(residual, abs=0.02)


def test_bin_tau_in_is_checked(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="tau_in values"):
        EngineConfig(mode="fast", motion_bins=(1.0,), bin_thresholds=(({}, 0.0),), bin_tau_in=(0.0, 0.1))
    with pytest.raises(EngineError, match="tau_in must be"):
        EngineConfig(mode="fast", motion_bins=(1.0,), bin_thresholds=(({}, 0.0),), bin_tau_in=(float("nan"),))
    p = tmp_path / "p.json"
    bins = [{"max_motion": 1.0, "thresholds": {}, "tau_in": 0.005}, {"max_motion": 1e9, "thresholds": {}}]
    p.write_text(json.dumps({"tau_in": 0.02, "bins": bins}))
    assert EngineConfig.from_file(p).bin_tau_in == (0.005, 0.02)  # a bin without one keeps the profile's
    over = EngineConfig.from_file(p, tau_in=0.03)  # `fluxshard run --tau-in`: one value in every bin
    assert over.bin_tau_in == () and over.tau_in_for(0.2) == 0.03
    same = [{**b, "tau_in": 0.02} for b in bins]
    p.write_text(json.dumps({"tau_in": 0.02, "bins": same}))
    assert EngineConfig.from_file(p).bin_tau_in == ()  # nothing differs per bin
    bins[0]["tau_in"] = -0.1
    p.write_text(json.dumps({"tau_in": 0.02, "bins": bins}))
    with pytest.raises(EngineError, match=r"p\.json: malformed motion bins.*≥ 0"):
        EngineConfig.from_file(p)


def test_zero_shift_rescue_reuses_blocks_whose_vector_is_wrong() -> None:
    """Static content that the field says moved by 1 px (a handheld camera's shake, a noisy vector): with
    zero-shift rescue the blocks are taken unshifted and nothing is recomputed; without it, the 1 px shift
    misaligns every block against a textured cache and almost everything is recomputed."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    x = torch.rand(1, 3, 64, 96)
    f = MotionField.zero(64, 96, 16)
    f.dx[:] = -1
    f.dx[:, 0] = 0  # keep every source inside the frame
    act = {}
    for zr in (-1.0, 0.5):
        eng = Engine(body, (64, 96), EngineConfig(mode="fast", tau_in=0.02, zero_rescue=zr))
        with torch.inference_mode():
            eng.step(x, None)
            _, st = eng.step((x + 0.003).clamp(0, 1), f)
        act[zr] = st.active_fraction
        assert st.input_residual_fraction == (0.0 if zr >= 0 else pytest.approx(1.0, abs=0.2))
    assert act[0.5] < 0.05 and act[-1.0] > 0.8, act


@pytest.mark.parametrize("cin,cout,stride,bias", [(3, 8, 2, True), (16, 12, 1, False)])
def test_pgemm_rows_in_chunks_match_the_dense_conv(cin: int, cout: int, stride: int, bias: bool) -> None:
    """The fast path's im2col + GEMM runs in L2-sized chunks of positions (``_PgemmLayer.rows_np``); with
    chunks far smaller than the position list, the rows returned — and the rows handed to a sink chunk by
    chunk — are the dense convolution's at exactly those positions, in order."""
    from fluxshard.engine.engine import _NO_EXTRA, _PgemmLayer
    from fluxshard.engine.sparse import PlanCache

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias).eval()
    x = torch.randn(1, cin, 40, 56).contiguous(memory_format=torch.channels_last)
    pc = PlanCache()
    _, plan, _ = pc.layer(conv, (40, 56), None)
    table, valid = plan.pos_table()
    pg = _PgemmLayer(table, _NO_EXTRA if valid is None else valid, pc.gemm_weight(conv).t().contiguous(),
                     None if conv.bias is None else conv.bias.detach(), 9 * cin)
    pg.CHUNK_BYTES = 64 * 4 * 9 * cin  # 64 positions per chunk
    assert pg.chunk_rows() == 64
    with torch.inference_mode():
        ref = F.leaky_relu(conv(x), 0.1).permute(0, 2, 3, 1).reshape(-1, cout).numpy()
    xr = x.permute(0, 2, 3, 1).reshape(-1, cin).numpy()
    rng = np.random.default_rng(1)
    pos = np.sort(rng.choice(ref.shape[0], 301, replace=False)).astype(np.int64)  # 4 full chunks + a partial one
    rows = pg.rows_np(xr, pos, lambda t: F.leaky_relu(t, 0.1))
    np.testing.assert_allclose(rows, ref[pos], atol=1e-5, rtol=1e-5)
    got: list[tuple[np.ndarray, np.ndarray]] = []
    pg.rows_each(xr, pos, None, lambda r, p: got.append((r.copy(), p.copy())))
    assert [len(p) for _, p in got] == [64, 64, 64, 64, 45]
    np.testing.assert_array_equal(np.concatenate([p for _, p in got]), pos)
    with torch.inference_mode():
        lin = conv(x).permute(0, 2, 3, 1).reshape(-1, cout).numpy()
    np.testing.assert_allclose(np.concatenate([r for r, _ in got]), lin[pos], atol=1e-5, rtol=1e-5)


def test_fast_mode_exact_when_aligned_with_small_pgemm_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole fast engine through the chunked compiled path (64-position chunks) still equals dense
    inference when nothing is approximated."""
    from fluxshard.engine.engine import _PgemmLayer

    monkeypatch.setattr(_PgemmLayer, "CHUNK_BYTES", 1)
    torch.manual_seed(0)
    stats = run_parity(ConvStack().eval(), sequence(5, 96, 128, (0, 8), (4, 4)), mode="fast", layout="pgemm")
    assert np.mean([s.active_fraction for s in stats[1:]]) < 0.9
