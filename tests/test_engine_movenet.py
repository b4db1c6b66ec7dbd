"""MoveNet in the engine: the letterboxed input mapping, a body the engine captures without barriers, exact
mode equal to dense on real frames, and keypoints mapped back to frame pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fluxshard.engine.engine import Engine, EngineConfig
from fluxshard.engine.graph import trace
from fluxshard.engine.inputs import InputMapper, mapper_for
from fluxshard.models import load_model
from fluxshard.motion.field import MotionField
from parity import DenseReference, assert_exact


@pytest.fixture(scope="module")
def movenet() -> Any:
    return load_model("movenet")


def test_folded_body_is_the_graph_and_has_no_barrier(movenet: Any) -> None:
    """Stride-2 'SAME' convs folded into symmetric-padded convs: same outputs as the explicit pad (the
    TF.js parity tests run on the folded body), and the engine sees a plain conv net."""
    from fluxshard.models.base import load_npz_weights
    from fluxshard.models.movenet import MoveNetBody

    plain = MoveNetBody().eval()
    load_npz_weights(plain, movenet.weights, "movenet")
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.inference_mode():
        for a, b in zip(movenet.body(x), plain(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    info = trace(movenet.body, x)
    assert info.barriers == [] and len(info.convs) == 74
    with pytest.raises(ValueError, match="multiples of 32"):
        movenet.body(torch.zeros(1, 3, 250, 256))


def test_letterbox_mapping(movenet: Any) -> None:
    m = mapper_for(movenet, (576, 768))  # vtest: 768/256 = 3 exactly
    assert (m.factor, m.input_hw, m.scaled_hw, m.input_block, m.offset) == (3, (256, 256), (192, 256), 16, (32, 0))
    rgb = np.random.default_rng(0).integers(0, 256, (576, 768, 3), dtype=np.uint8)
    x = m.tensor(rgb)
    assert x.is_contiguous(memory_format=torch.channels_last)
    # the graph's input: floor of the 3×3 mean (integer grey levels), then its own x·scale − 1; padding is black
    want = np.floor(rgb[:3, :3].reshape(-1, 3).sum(0) / 9) * movenet.input_scale - 1
    np.testing.assert_allclose(x[0, :, 32, 0].numpy(), want, rtol=0, atol=1e-6)
    assert float(x[0, :, :32].max()) == float(x[0, :, :32].min()) == -1.0
    # the field: 3×3 frame blocks per input block; one vector, a multiple of 3, or invalid
    f = MotionField.zero(576, 768, 16)
    f.dx[:] = 6
    f.dx[0, 1] = 3  # breaks block (0, 0)'s agreement
    f.dx[6:9, 0:3] = 4  # agreed but not a whole input pixel
    g = m.field(f)
    assert (g.block, g.height, g.width) == (16, 256, 256)
    assert not g.valid[2, 0] and not g.valid[4, 0] and g.valid[3, 0] and g.dx[3, 0] == 2
    assert g.valid[0].all() and not g.dx[0].any()  # letterbox rows: static zero motion
    # keypoints and boxes back to frame pixels
    np.testing.assert_allclose(m.points_to_frame(np.array([[10.0, 32.0]])), [[30.0, 0.0]])
    with pytest.raises(ValueError, match="larger than the model's 256x256 input"):
        InputMapper((576, 768), 2, canvas_hw=(256, 256))


@pytest.mark.slow
def test_movenet_exact_on_real_frames(movenet: Any) -> None:
    """Five decoded vtest frames with codec vectors through the letterbox: the engine's exact mode equals
    dense inference of the body on every frame (float64-judged parity), with reuse on incremental frames."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.motion import MotionStream

    stream = MotionStream(clip_path("vtest"), max_frames=5)
    m = mapper_for(movenet, (stream.info.height, stream.info.width))
    frames = [(m.tensor(mf.frame.rgb), m.field(mf.field)) for mf in stream]
    eng = Engine(movenet.body, m.input_hw, EngineConfig(layout="pgemm"))
    reference = DenseReference(movenet.body)
    stats = []
    with torch.inference_mode():
        for x, f in frames:
            out, st = eng.step(x, f)
            assert_exact(out, *reference(x))
            stats.append(st)
            kp = movenet.postprocess_input(out, m.input_hw)
            assert kp.keypoints.shape == (1, 17, 3)
    inc = [s for s in stats if not s.dense]
    assert len(inc) == 4 and max(s.layers[0].reuse_fraction for s in inc) > 0.05
