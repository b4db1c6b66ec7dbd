"""Exact mode: the engine's outputs equal dense inference of the same body on the same input, frame after
frame, while reusing cached work where the strict RFAP allows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fluxshard.engine.engine import Engine, EngineConfig, EngineError
from fluxshard.engine.graph import BIG, trace
from fluxshard.motion.field import MotionField
from parity import DenseReference, SequenceParity, assert_exact, verdict


class ConvStack(nn.Module):
    """Plain conv net with the structures that matter: stride-2 convs, a depthwise conv, a 1×1, a skip
    add, nearest up-sampling and a channel concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 32, 3, 2, 1)
        self.head = nn.Conv2d(32 + 16, 8, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = F.leaky_relu(self.c2(a), 0.1)
        b = b + self.pw(F.relu6(self.dw(b)))
        c = F.silu(self.c3(b))
        up = F.interpolate(c, scale_factor=2, mode="nearest")
        return torch.sigmoid(self.head(torch.cat([up, b], 1)))


class WithBarrier(ConvStack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        g = y.mean(dim=(2, 3), keepdim=True)  # global context: a dense barrier
        return y * g


def textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random((h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    return np.repeat(np.repeat(a, 4, 0), 4, 1)[:h, :w]


def sequence(n: int, h: int, w: int, shift: tuple[int, int], obj_v: tuple[int, int], block: int = 16,
             seed: int = 0) -> list[tuple[torch.Tensor, MotionField]]:
    """Lossless frames: a background panning by ``shift`` px/frame (content comes from the right/bottom),
    a 32×32 object moving by ``obj_v``; the true block field (valid where the block is all background or
    all object in both frames)."""
    big = textured(h + 2 * n * abs(shift[0]) + 64, w + 2 * n * abs(shift[1]) + 64, seed)
    obj = textured(32, 32, seed + 1) * 0.5 + 0.5
    frames = []
    for t in range(n):
        oy, ox = n * abs(shift[0]) + t * shift[0], n * abs(shift[1]) + t * shift[1]
        img = big[oy : oy + h, ox : ox + w].copy()
        py, px = h // 4 + t * obj_v[0], w // 4 + t * obj_v[1]
        img[py : py + 32, px : px + 32] = obj
        f = MotionField.zero(h, w, block)
        f.dy[:], f.dx[:] = shift
        for i in range(f.shape[0]):
            for j in range(f.shape[1]):
                y0, x0 = i * block, j * block
                cur_in = y0 < py + 32 and y0 + block > py and x0 < px + 32 and x0 + block > px
                pyp, pxp = py - obj_v[0], px - obj_v[1]
                prev_hit = (y0 + shift[0] < pyp + 32 and y0 + block + shift[0] > pyp
                            and x0 + shift[1] < pxp + 32 and x0 + block + shift[1] > pxp)
                if cur_in or prev_hit:
                    f.valid[i, j] = False
        if t == 0:
            f.valid[:] = False
            f.scene_cut = True
        frames.append((torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), f))
    return frames


def run_parity(body: nn.Module, frames: list[tuple[torch.Tensor, MotionField]], **cfg: object) -> list:
    """Engine vs dense on every frame, judged against float64 inference of the same body: the engine's float32
    error may be at most a few times dense float32's own over the sequence (tests/parity.py, docs/design.md
    "Parity tolerance"), whatever kernels this CPU has. The executor layout defaults to ``pgemm`` (forced sparse:
    ``auto`` may choose dense layers or frames, which are exact for the wrong reason); pass
    ``layout="auto"`` to test the production choice."""
    cfg.setdefault("layout", "pgemm")  # every frame incremental, reused positions read from the moved cache
    eng = Engine(body, tuple(frames[0][0].shape[-2:]), EngineConfig(**cfg))  # type: ignore[arg-type]
    parity = SequenceParity(body)
    stats = []
    with torch.inference_mode():
        for x, f in frames:
            out, st = eng.step(x, f)
            parity.check(out, x)
            stats.append(st)
    parity.finish()
    return stats


@pytest.mark.parametrize("shift", [(0, 0), (0, 8), (8, -8), (0, 3)])
def test_conv_stack_exact_under_motion(shift: tuple[int, int]) -> None:
    torch.manual_seed(0)
    body = ConvStack().eval()
    stats = run_parity(body, sequence(6, 96, 128, shift, (4, 4)))
    assert stats[0].dense and not any(s.dense for s in stats[1:])
    first = [s.layers[0] for s in stats[1:]]  # c1: stride 1, E = 1 — any integer shift is reusable
    assert np.mean([s.reuse_fraction for s in first]) > 0.4
    assert np.mean([s.active_fraction for s in stats[1:]]) < 0.9


def test_shift_not_divisible_by_stride_is_never_reused_downstream() -> None:
    torch.manual_seed(0)
    body = ConvStack().eval()
    stats = run_parity(body, sequence(4, 96, 128, (0, 3), (0, 0)))
    for s in stats[1:]:
        by = {layer.name: layer.reuse_fraction for layer in s.layers}
        assert by["c1"] > 0.5
        assert by["c2"] == 0.0 and by["c3"] == 0.0  # 3 px is not a multiple of their strides


def test_barrier_is_reported_and_output_stays_exact() -> None:
    torch.manual_seed(0)
    body = WithBarrier().eval()
    info = trace(body, torch.zeros(1, 3, 64, 64))
    assert any("mean" in b for b in info.barriers)
    run_parity(body, sequence(4, 64, 64, (0, 8), (2, 0)))


def test_geometry_of_conv_chain() -> None:
    info = trace(ConvStack().eval(), torch.zeros(1, 3, 64, 64))
    g = info.geoms
    assert (g["c1"].S, g["c1"].lo_y, g["c1"].hi_y) == (1, 1, 1)
    assert (g["c2"].S, g["c2"].E, g["c2"].lo_y, g["c2"].hi_y) == (2, 2, 2, 2)
    assert (g["c3"].S, g["c3"].E) == (4, 4)
    assert g["head"].S == 2 and g["head"].E == 4  # mixes the stride-4 branch: equivariant to 4-px shifts only
    assert g["head"].lo_y < BIG and not g["head"].barrier


def test_wrong_input_and_field_sizes_are_named() -> None:
    eng = Engine(ConvStack().eval(), (64, 64))
    with pytest.raises(EngineError, match=r"\(1, 3, 64, 64\)"):
        eng.step(torch.zeros(1, 3, 32, 64), None)
    eng.step(torch.zeros(1, 3, 64, 64), None)
    with pytest.raises(EngineError, match="motion field is 32x64"):
        eng.step(torch.zeros(1, 3, 64, 64), MotionField.zero(64, 32, 16))


def test_reset_and_periodic_refresh() -> None:
    torch.manual_seed(0)
    frames = sequence(6, 64, 64, (0, 8), (0, 0))
    stats = run_parity(ConvStack().eval(), frames, refresh_every=3)
    assert [s.dense for s in stats] == [True, False, False, True, False, False]


def test_nanodet_exact_on_lossless_pan() -> None:
    """The bundled detector, 32-px pan (a multiple of its largest stride): every layer reuses work, exactly."""
    from fluxshard.models import load_model

    body = load_model("nanodet").body
    stats = run_parity(body, sequence(3, 256, 320, (0, 32), (0, 0)))
    s = stats[-1]
    assert not s.dense and s.active_fraction < 0.8
    assert min(layer.reuse_fraction for layer in s.layers[:5]) > 0.3


def test_exact_mode_skips_bookkeeping_where_little_is_reusable() -> None:
    """``auto`` layout: layers whose residual covers most receptive fields run dense straight away (the
    bookkeeping would cost more than it saves), still exactly; a static scene with one moving object keeps
    sparse layers."""
    from fluxshard.models import load_model

    body = load_model("nanodet").body
    clean = sequence(3, 256, 320, (0, 32), (0, 0))
    rng = np.random.default_rng(0)
    noisy = [(x + torch.from_numpy(rng.normal(0, 0.01, x.shape).astype(np.float32)), f) for x, f in clean]
    stats = run_parity(body, noisy, layout="auto")
    assert all(layer.path == "dense" for s in stats[1:] for layer in s.layers)
    stats = run_parity(body, sequence(3, 256, 320, (0, 0), (16, 0)), layout="auto")
    assert all(sum(layer.path != "dense" for layer in s.layers) >= 5 for s in stats[1:])


def test_nanodet_exact_on_real_ptz_clip(tmp_path: Path) -> None:
    """Real decoded video, codec motion vectors: outputs equal dense inference on every frame."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.data.ptz import make_ptz_clip
    from fluxshard.models import load_model
    from fluxshard.motion import MotionStream

    out = tmp_path / "ptz.mp4"
    make_ptz_clip(clip_path("vtest"), out, "pause:4,pan:4:6,pan:8:4", size=(320, 256), crf=12)
    body = load_model("nanodet").body
    frames = [
        (torch.from_numpy(mf.frame.rgb).permute(2, 0, 1)[None].float() / 255, mf.field)
        for mf in MotionStream(out)
    ]
    stats = run_parity(body, frames)
    assert sum(not s.dense for s in stats) >= 8
    assert max(s.layers[0].reuse_fraction for s in stats if not s.dense) > 0.05


@pytest.mark.parametrize("clip", ["cup", "ptz"])
def test_nanodet_exact_on_100_real_frames(clip: str, tmp_path: Path) -> None:
    """100 decoded frames of cup.mp4 and of a virtual-PTZ pan/zoom clip, codec vectors, NanoDet at the
    engine's input mapping (half size): equal to dense on every frame, with reuse on most frames."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.data.ptz import make_ptz_clip
    from fluxshard.engine.inputs import InputMapper
    from fluxshard.models import load_model
    from fluxshard.motion import MotionStream

    path = clip_path("cup")
    if clip == "ptz":
        path = str(tmp_path / "ptz.mp4")
        make_ptz_clip(clip_path("vtest"), path, "pause:10,pan:4:40,zoom:1.01:25,tilt:-2:25", size=(384, 288))
    stream = MotionStream(path, max_frames=100)
    mapper = InputMapper((stream.info.height, stream.info.width), 2 if clip == "cup" else 1)
    frames = [(mapper.tensor(mf.frame.rgb), mapper.field(mf.field)) for mf in stream]
    assert len(frames) == 100
    stats = run_parity(load_model("nanodet").body, frames)
    inc = [s for s in stats if not s.dense]
    assert len(inc) >= 90
    assert np.mean([s.layers[0].reuse_fraction for s in inc]) > 0.05


def test_parity_catches_a_wrong_reuse() -> None:
    """The float32-derived bound (tests/parity.py) has teeth: cached features off by 0.1 % of the layer's
    magnitude (one row of background, away from the moving object), reused on the next frame, fail it, while
    the untouched engine passes on the same frames."""
    torch.manual_seed(0)
    body = ConvStack().eval()
    frames = sequence(3, 96, 128, (0, 8), (0, 0))
    reference = DenseReference(body)
    eng = Engine(body, (96, 128), EngineConfig(layout="pgemm"))
    with torch.inference_mode():
        for x, f in frames[:2]:
            assert_exact(eng.step(x, f)[0], *reference(x))
        cache = eng._caches["c2"]
        cache[0, :, 40, 8:56] += 1e-3 * float(cache.abs().max())  # stale values where the field says "reuse"
        out, st = eng.step(*frames[2])
        v = verdict(out, *reference(frames[2][0]))
    assert not st.dense and not v.ok, v
    assert v.engine_err > 10 * v.bound, v
