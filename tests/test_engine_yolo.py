"""The engine on unmodified ultralytics bodies (YOLO11n detect and seg from YAML): captured at the ATen level,
exact against dense inference, attention (C2PSA) reported as a dense barrier. Runs in the yolo venv."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from parity import SequenceParity
from test_engine_exact import run_parity, sequence

pytestmark = pytest.mark.yolo
os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _ultralytics():
    import ultralytics  # the yolo stage requires it; the base run deselects this module by marker

    return ultralytics


def yolo_body(cfg: str) -> torch.nn.Module:
    """YOLO11 from YAML with BatchNorm statistics set from textured frames before fusing: random-init weights
    otherwise give image-independent outputs, which would make any parity test vacuous."""
    from ultralytics import YOLO

    from fluxshard.models.ultralytics import UltralyticsAdapter

    torch.manual_seed(0)
    yolo = YOLO(cfg)
    net = yolo.model
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    frames = torch.cat([x for x, _ in sequence(2, 256, 320, (0, 32), (0, 0), seed=5)])
    net.train()
    with torch.no_grad():
        net(frames)
    net.eval()
    return UltralyticsAdapter.from_yolo(yolo).body.eval()


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo11n-seg.yaml"])
def test_yolo_exact_with_reuse_and_barrier(cfg: str) -> None:
    from fluxshard.engine.graph import trace

    body = yolo_body(cfg)
    info = trace(body, torch.zeros(1, 3, 256, 320))
    assert len(info.convs) >= 87 and any("view" in b or "transpose" in b for b in info.barriers)
    frames = sequence(4, 256, 320, (0, 32), (16, 0))
    with torch.inference_mode():
        ref = body(frames[1][0])
        other = body(frames[2][0])
    assert max(float((a - b).abs().max()) for a, b in zip(ref, other, strict=True)) > 1e-3  # image-dependent
    stats = run_parity(body, frames)  # outputs reach ~100 here: rounding is judged by float32 itself
    inc = [s for s in stats if not s.dense]
    assert inc and np.mean([s.layers[0].reuse_fraction for s in inc]) > 0.5


def test_yolo_exact_on_100_real_frames() -> None:
    """100 decoded frames of cup.mp4 (H.264, codec vectors), YOLO11n detect at the engine's half-size input,
    forced sparse layout: as accurate as dense float32 inference on every frame (tests/parity.py: the error
    against float64 inference at most a few times dense float32's own over the clip), with reuse. This
    random-weight YOLO amplifies rounding (outputs ~600–900), which is why the bound must come from float32."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.engine.engine import Engine, EngineConfig
    from fluxshard.engine.inputs import InputMapper
    from fluxshard.motion import MotionStream

    body = yolo_body("yolo11n.yaml")
    stream = MotionStream(clip_path("cup"), max_frames=100)
    mapper = InputMapper((stream.info.height, stream.info.width), 2)
    frames = [(mapper.tensor(mf.frame.rgb), mapper.field(mf.field)) for mf in stream]
    assert len(frames) == 100
    eng = Engine(body, mapper.input_hw, EngineConfig(layout="pgemm"))
    parity = SequenceParity(body)
    stats = []
    with torch.inference_mode():
        for x, f in frames:
            out, st = eng.step(x, f)
            parity.check(out, x)
            stats.append(st)
    parity.finish()
    inc = [s for s in stats if not s.dense]
    assert len(inc) >= 90 and np.mean([s.layers[0].reuse_fraction for s in inc]) > 0.05
