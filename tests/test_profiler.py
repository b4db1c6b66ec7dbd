"""Truncation profiler: the per-bin search logic, the profile format and the engine's per-frame lookup."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxshard.engine import profiler
from fluxshard.engine.engine import EngineConfig, EngineError, field_motion
from fluxshard.motion.field import MotionField


class FakeAdapter:
    class body:  # stands in for an nn.Module
        @staticmethod
        def state_dict() -> dict[str, Any]:
            import torch

            return {"w": torch.ones(2)}


def test_search_keeps_largest_alpha_before_first_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    # retention falls with alpha, faster in the fast-motion bin; bin 1 has too few frames
    limits = {0: 0.3, 1: None, 2: 0.1, 3: 0.05}
    calls: list[float] = []

    def fake_per_bin(clips: Any, runs: Any, bins: Any) -> list[dict[str, Any]]:
        a = runs[0][0][0]
        calls.append(a)
        out = []
        for b in range(4):
            if limits[b] is None:
                out.append({"frames": 2, "retention_map50": 1.0, "reuse": 0.5})
            else:
                out.append({"frames": 20, "retention_map50": 1.0 if a <= limits[b] else 0.9, "reuse": a})
        return out

    monkeypatch.setattr(profiler, "layer_scales", lambda adapter, clips: {"c1": 2.0, "c2": 0.5})
    monkeypatch.setattr(profiler, "run_config",
                        lambda adapter, clip, cfg, *_: ([cfg.thresholds.get("c1", 0.0) / 2.0 if cfg.thresholds
                                                         else -1.0], [0.0], [True]))
    monkeypatch.setattr(profiler, "per_bin", fake_per_bin)
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: 1.0)
    clip = profiler.Clip("x.mp4", type("M", (), {"input_hw": (8, 8)})(), [], [0.0], [None])  # type: ignore[arg-type]
    prof = profiler.profile(FakeAdapter(), "fake", [clip], target=0.99, alphas=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8))
    alphas = [b["alpha"] for b in prof["bins"]]
    assert alphas == [0.3, 0.05, 0.1, 0.05]  # bin 1 unmeasured → smallest measured alpha
    assert [b["measured"] for b in prof["bins"]] == [True, False, True, True]
    assert prof["bins"][0]["thresholds"] == {"c1": 0.6, "c2": 0.15}
    # stopped once every measured bin failed; then the final pass, once per path regime
    assert calls == [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, -1.0, -1.0, -1.0]



def test_bin_short_at_alpha_zero_tightens_its_tau_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bin that misses the target even with τ^l = 0 (bin 0 here, met only once τ_in ≤ 0.005) keeps α = 0
    and steps τ_in down until it holds; the other bin keeps the profile's τ_in and its own α."""
    def fake_per_bin(clips: Any, runs: Any, bins: Any) -> list[dict[str, Any]]:
        cfg = runs[0][0][0]
        ok0 = bool(cfg.bin_thresholds) and cfg.tau_in_for(0.0) <= 0.005  # only the final pass mixes bins
        a1 = cfg.thresholds.get("c1", 0.0) if cfg.thresholds else cfg.bin_thresholds[1][0]["c1"]
        return [{"frames": 20, "retention_map50": 1.0 if ok0 else 0.95, "reuse": 0.1},
                {"frames": 20, "retention_map50": 1.0 if a1 <= 0.3 else 0.9, "reuse": 0.5}]

    monkeypatch.setattr(profiler, "layer_scales", lambda adapter, clips: {"c1": 1.0})
    monkeypatch.setattr(profiler, "run_config", lambda adapter, clip, cfg, *_: ([cfg], [0.0], [False]))
    monkeypatch.setattr(profiler, "per_bin", fake_per_bin)
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: 1.0)
    clip = profiler.Clip("x.mp4", type("M", (), {"input_hw": (8, 8)})(), [], [0.0], [None])  # type: ignore[arg-type]
    prof = profiler.profile(FakeAdapter(), "fake", [clip], target=0.99, tau_in=0.02, bins=(1.0, math.inf),
                            alphas=(0.0, 0.1, 0.3, 0.5))
    assert [b["alpha"] for b in prof["bins"]] == [0.0, 0.3]
    assert [b["tau_in"] for b in prof["bins"]] == [0.005, 0.02]
    assert [b["target_met"] for b in prof["bins"]] == [True, True]
    assert [r["tau_in"][0] for r in prof["repairs"]] == [0.02, 0.01]  # two tightening steps were needed
    out = tmp_path / "p.json"  # the written profile loads with its per-bin τ_in
    out.write_text(json.dumps(prof, default=str))
    cfg = EngineConfig.from_file(out)
    assert cfg.bin_tau_in == (0.005, 0.02) and cfg.tau_in_for(0.2) == 0.005 and cfg.tau_in_for(4.0) == 0.02

def _field(dy: int, dx: int, n_valid: int = 4) -> MotionField:
    f = MotionField.zero(32, 32, 16)
    f.dy[:], f.dx[:] = dy, dx
    f.valid.reshape(-1)[n_valid:] = False
    return f


def test_engine_picks_thresholds_by_motion(tmp_path: Path) -> None:
    prof = {"tau_in": 0.03, "bins": [
        {"max_motion": 1.0, "thresholds": {"a": 0.5}, "default_threshold": 0.1},
        {"max_motion": 1e9, "thresholds": {"a": 0.05}, "default_threshold": 0.01},
    ]}
    p = tmp_path / "p.json"
    p.write_text(json.dumps(prof))
    cfg = EngineConfig.from_file(p)
    assert cfg.tau_in == 0.03 and cfg.motion_bins == (1.0, 1e9)
    assert field_motion(_field(0, 0)) == 0.0
    assert math.isclose(field_motion(_field(3, 4)), 5.0)
    assert cfg.thresholds_for(field_motion(_field(0, 0))) == ({"a": 0.5}, 0.1)
    assert cfg.thresholds_for(field_motion(_field(3, 4))) == ({"a": 0.05}, 0.01)
    p.write_text(json.dumps({"bins": [{"thresholds": {}}]}))
    with pytest.raises(EngineError, match="malformed motion bins"):
        EngineConfig.from_file(p)
    with pytest.raises(EngineError, match="exact mode"):
        EngineConfig(mode="exact", motion_bins=(1.0,), bin_thresholds=(({}, 0.0),))


def test_shipped_profile_has_bins_for_every_layer() -> None:
    from fluxshard.engine.engine import default_profile
    from fluxshard.engine.graph import trace
    from fluxshard.models import load_model

    path = default_profile("nanodet")
    assert path is not None
    data = json.loads(path.read_text())
    cfg = EngineConfig.from_file(path)
    assert len(cfg.motion_bins) >= 3 and data["target_retention"] >= 0.99
    import torch

    convs = set(trace(load_model("nanodet").body, torch.zeros(1, 3, 64, 64)).convs)
    for th, _ in cfg.bin_thresholds:
        assert set(th) == convs and all(np.isfinite(v) and v >= 0 for v in th.values())
    assert data["model_hash"] == profiler.model_hash(load_model("nanodet").body)


def test_profile_cli_runs_on_a_short_clip(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "fluxshard", "profile", "vtest", "--max-frames", "6", "--json",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["profile"] == str(out) and len(s["bins"]) == 4
    cfg = EngineConfig.from_file(out)
    assert cfg.mode == "fast" and len(cfg.bin_thresholds) == 4


def test_retention_needs_enough_reference_objects() -> None:
    """Below ``MIN_REFERENCE_OBJECTS`` dense detections a retention is undefined (None), whatever the
    candidate found: such frames neither certify nor fail a bin."""
    from fluxshard.metrics import MIN_REFERENCE_OBJECTS
    from fluxshard.models.base import Detections

    empty = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    one = Detections([[10, 10, 50, 80]], [0.9], [0])
    assert profiler._retention([empty, empty], [empty, empty]) is None  # nothing to find, nothing found
    assert profiler._retention([one, empty], [empty, empty]) is None  # false positives only: no reference
    assert profiler._retention([one] * 5, [one] * 5) is None  # 5 objects: one miss would be 20 %
    n = MIN_REFERENCE_OBJECTS
    assert profiler._retention([one] * n, [one] * n) == pytest.approx(1.0)
    assert profiler.reference_objects([one, empty, Detections([[0, 0, 5, 5]], [0.3], [0])]) == 1


def test_bin_with_too_few_reference_objects_is_not_certified(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bin 1 has frames but its retention is undefined (too few reference objects): it must not keep the
    loosest α as if it held the target, but take the smallest measured α like a bin without frames."""
    def fake_per_bin(clips: Any, runs: Any, bins: Any) -> list[dict[str, Any]]:
        a = runs[0][0][0]
        return [{"frames": 20, "retention_map50": 1.0 if a <= 0.2 else 0.9, "reuse": a},
                {"frames": 20, "retention_map50": None, "reuse": a},  # 20 frames, too few objects
                {"frames": 20, "retention_map50": 1.0 if a <= 0.1 else 0.9, "reuse": a}]

    clip = _fake_profiler(monkeypatch, fake_per_bin)
    prof = profiler.profile(FakeAdapter(), "fake", [clip], target=0.99, bins=(1.0, 2.0, math.inf),
                            alphas=(0.0, 0.1, 0.2, 0.3, 0.5))
    assert [b["alpha"] for b in prof["bins"]] == [0.2, 0.1, 0.1]
    assert [b["measured"] for b in prof["bins"]] == [True, False, True]


def test_per_bin_counts_reference_objects_and_drops_sparse_clips() -> None:
    """A clip whose frames in a bin hold too few reference objects gets no per-clip value there (it cannot
    pull the bin's worst), and the counts are recorded."""
    from fluxshard.metrics import MIN_REFERENCE_OBJECTS
    from fluxshard.models.base import Detections

    obj = Detections([[10, 10, 50, 80]], [0.9], [0])
    miss = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    n = MIN_REFERENCE_OBJECTS
    a = profiler.Clip("a", type("M", (), {"input_hw": (8, 8)})(), [], [0.0] * n, [obj] * n)  # type: ignore[arg-type]
    b = profiler.Clip("b", type("M", (), {"input_hw": (8, 8)})(), [], [0.0] * 6, [obj] * 6)  # type: ignore[arg-type]
    runs = [([obj] * n, [0.5] * n, [False] * n), ([miss] * 6, [0.5] * 6, [False] * 6)]  # b misses everything
    (st,) = profiler.per_bin([a, b], runs, (math.inf,))
    assert st["per_clip"][0] == pytest.approx(1.0) and st["per_clip"][1] is None
    assert st["per_clip_reference_objects"] == [n, 6] and st["reference_objects"] == n + 6
    # the pool (106 objects) still counts b's misses: 100 of 106 found
    assert st["pooled"] < 1.0 and st["retention_map50"] == st["pooled"]


def test_baseline_methods_get_their_own_fields_but_codec_motion_bins() -> None:
    """``--method delta`` profiles the engine fed zero motion (as the bench harness feeds it), while frames are
    still binned by the codec field's motion — so each baseline's thresholds meet the same target."""
    from fluxshard.data.fetch import clip_path
    from fluxshard.errors import FluxShardError
    from fluxshard.models import load_model

    adapter = load_model("nanodet")
    mine = profiler.load_clip(clip_path("cup"), adapter, 6, factor=2)
    delta = profiler.load_clip(clip_path("cup"), adapter, 6, factor=2, method="delta")
    assert delta.motion == mine.motion and max(m for m in mine.motion if math.isfinite(m)) > 0.5
    for (_, f), (_, g) in zip(mine.frames[1:], delta.frames[1:], strict=True):
        assert g.source == "zero" and not g.dy.any() and not g.dx.any()
        assert f.dy.any() or f.dx.any()
    with pytest.raises(FluxShardError, match="unknown profiling method"):
        profiler.load_clip(clip_path("cup"), adapter, 2, method="optical-flow")


def test_bin_failing_at_the_tightest_alpha_keeps_it_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bin below target even at alpha 0 must not borrow a looser neighbour's alpha."""
    def fake_per_bin(clips: Any, runs: Any, bins: Any) -> list[dict[str, Any]]:
        a = runs[0][0][0]
        return [{"frames": 20, "retention_map50": 1.0 if a <= 0.2 else 0.9, "reuse": a},
                {"frames": 20, "retention_map50": 0.8, "reuse": a},  # never meets the target
                {"frames": 2, "retention_map50": 1.0, "reuse": a},  # too few frames
                {"frames": 20, "retention_map50": 1.0 if a <= 0.1 else 0.9, "reuse": a}]

    clip = _fake_profiler(monkeypatch, fake_per_bin)
    prof = profiler.profile(FakeAdapter(), "fake", [clip], target=0.99, alphas=(0.0, 0.1, 0.2, 0.3))
    assert [b["alpha"] for b in prof["bins"]] == [0.2, 0.0, 0.1, 0.1]
    assert [b["target_met"] for b in prof["bins"]] == [True, False, True, True]
    assert [b["measured"] for b in prof["bins"]] == [True, True, False, True]


def _scored_clip(name: str, motion: list[float]) -> profiler.Clip:
    return profiler.Clip(name, type("M", (), {"input_hw": (8, 8)})(), [], motion, [1.0] * len(motion))  # type: ignore[arg-type]


def test_bin_retention_is_the_worst_clip_not_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # stand-in metric: mean per-frame score; clip B alone misses the target in bin 0, the pool hides it
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: float(np.mean(cand)) if cand else None)
    a, b = _scored_clip("a", [0.0] * 20), _scored_clip("b", [0.0] * 6 + [5.0] * 3)
    runs = [([1.0] * 20, [0.5] * 20, [False] * 20), ([0.97] * 6 + [0.5] * 3, [0.5] * 9, [False] * 9)]
    stats = profiler.per_bin([a, b], runs, (1.0, 2.0, math.inf))
    assert stats[0]["pooled"] > 0.99 and math.isclose(stats[0]["retention_map50"], 0.97)
    assert stats[0]["per_clip"] == [1.0, pytest.approx(0.97)]
    # bin 2: clip b has only 3 frames there (< MIN_BIN_FRAMES): reported, but only the pool decides the bin
    assert stats[2]["per_clip"] == [None, 0.5] and stats[2]["retention_map50"] == 0.5
    assert profiler.per_clip([a, b], runs) == [1.0, pytest.approx((0.97 * 6 + 1.5) / 9)]


def test_repair_tightens_a_clip_that_misses_over_all_its_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    # every bin meets the target pooled, but clip b's few fast frames (too few to judge the bin per clip)
    # drag its whole-clip retention under it: the repair must tighten that clip's worst bin until it holds
    monkeypatch.setattr(profiler, "layer_scales", lambda adapter, clips: {"c": 1.0})
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: float(np.mean(cand)) if cand else None)
    a = _scored_clip("a", [0.0] * 10 + [3.0] * 30)
    b = _scored_clip("b", [0.0] * 10 + [3.0] * 3)

    def run(adapter: Any, clip: profiler.Clip, cfg: EngineConfig,
            pgemm_scale: float = 1.0) -> tuple[list[Any], list[float], list[bool]]:
        dets = []
        for m in clip.motion:
            th = cfg.thresholds_for(m)[0] if cfg.bin_thresholds else cfg.thresholds
            alpha = th.get("c", 0.0)
            # clip b's fast frames lose 0.1 per unit of alpha, everything else holds
            dets.append(1.0 - 0.1 * alpha if (clip.path == "b" and m > 2.0) else 1.0)
        return dets, [0.0] * len(dets), [False] * len(dets)

    monkeypatch.setattr(profiler, "run_config", run)
    prof = profiler.profile(FakeAdapter(), "fake", [a, b], target=0.99, bins=(1.0, math.inf),
                            alphas=(0.0, 0.1, 0.2, 0.3, 0.5))
    assert prof["bins"][0]["alpha"] == 0.5  # the static bin is never at fault
    assert prof["repairs"], "the whole-clip miss must trigger a repair"
    assert all(r is None or r >= 0.99 for r in prof["clip_retention_map50"])
    assert prof["bins"][1]["alpha"] < 0.5


def test_final_pass_certifies_the_worst_path_regime(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mix must hold under every path regime: here bin 1 holds with the calibrated paths at any α but
    drops below target at α > 0.1 when the compiled path is priced 2× (other paths, other truncation flips),
    so the profile keeps α = 0.1 there and records each regime's retention; the unmeasured fast bin follows."""
    monkeypatch.setattr(profiler, "layer_scales", lambda adapter, clips: {"c": 1.0})
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: float(np.mean(cand)) if cand else None)
    a = _scored_clip("a", [0.0] * 10 + [3.0] * 30)
    scales: list[float] = []

    def run(adapter: Any, clip: profiler.Clip, cfg: EngineConfig,
            pgemm_scale: float = 1.0) -> tuple[list[Any], list[float], list[bool]]:
        scales.append(pgemm_scale)
        dets = []
        for m in clip.motion:
            alpha = (cfg.thresholds_for(m)[0] if cfg.bin_thresholds else cfg.thresholds).get("c", 0.0)
            fragile = m > 2.0 and pgemm_scale == 2.0 and alpha > 0.1
            dets.append(0.9 if fragile else 1.0)
        return dets, [0.0] * len(dets), [False] * len(dets)

    monkeypatch.setattr(profiler, "run_config", run)
    prof = profiler.profile(FakeAdapter(), "fake", [a], target=0.99, bins=(1.0, 5.0, math.inf),
                            alphas=(0.0, 0.1, 0.2, 0.5))
    # the last bin has no frames: it takes the smallest measured α, and follows bin 1 down in the repairs
    assert [b["alpha"] for b in prof["bins"]] == [0.5, 0.1, 0.1]
    assert [b["measured"] for b in prof["bins"]] == [True, True, False]
    assert set(scales) == set(profiler.PATH_REGIMES) and 1.0 in scales and 2.0 in scales
    assert prof["path_regimes"]["pgemm_scale"] == list(profiler.PATH_REGIMES)
    assert all(r is None or r >= 0.99 for rs in prof["path_regimes"]["retention_map50"] for r in rs)
    assert prof["repairs"] and prof["repairs"][0]["retention"][1] < 0.99  # the 2× regime forced the repair


def test_share_calibration_prices_the_compiled_path_in_a_copy() -> None:
    """``pgemm_scale`` scales the compiled path's measured cost (a, b) in the sharing engine only."""
    import torch

    from fluxshard.engine.engine import Engine
    from test_engine_exact import ConvStack, sequence

    torch.manual_seed(0)
    body = ConvStack().eval()
    donor = Engine(body, (96, 128), EngineConfig(mode="fast", calibrate=True))
    with torch.inference_mode():
        donor.step(sequence(1, 96, 128, (0, 8), (4, 4))[0][0], None)
    costs = {k: v.cost for k, v in donor._pgemm_layers.items()}
    assert costs and all(c is not None for c in costs.values())
    eng = Engine(body, (96, 128), EngineConfig(mode="fast"))
    eng.share_calibration(donor, 2.0)
    for k, v in eng._pgemm_layers.items():
        a, b, dense = costs[k]
        assert v.cost == (2 * a, 2 * b, dense) and donor._pgemm_layers[k].cost == (a, b, dense)
    same = Engine(body, (96, 128), EngineConfig(mode="fast"))
    same.share_calibration(donor)
    assert same._pgemm_layers is donor._pgemm_layers
    with pytest.raises(EngineError, match="pgemm_scale"):
        same.share_calibration(donor, 0.0)


def _fake_profiler(monkeypatch: pytest.MonkeyPatch, fake_per_bin: Any) -> Any:
    """Profiler internals replaced so a test decides each bin's retention per α (``fake_per_bin``): one conv
    ``c1`` whose recorded value is its threshold; returns the one fake clip to profile."""
    monkeypatch.setattr(profiler, "layer_scales", lambda adapter, clips: {"c1": 1.0})
    monkeypatch.setattr(profiler, "run_config",
                        lambda adapter, clip, cfg, *_: ([cfg.thresholds.get("c1", 0.0) if cfg.thresholds
                                                         else -1.0], [0.0], [True]))
    monkeypatch.setattr(profiler, "per_bin", fake_per_bin)
    monkeypatch.setattr(profiler, "_retention", lambda cand, ref: 1.0)
    return profiler.Clip("x.mp4", type("M", (), {"input_hw": (8, 8)})(), [], [0.0], [None])  # type: ignore[arg-type]
