"""The engine's cost guard and its dense-frame capture module (issue: core engine — "never much slower than
dense"). The guard's decisions depend on measured times, so these tests plant the timing history and check
the decisions it implies, then that every frame — guarded, probed or incremental — still equals dense."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from fluxshard.engine.engine import Engine, EngineConfig, EngineError
from test_engine_property import _frames


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 16, 1)
        self.d = nn.Conv2d(8, 4, 3, 1, 1)  # two users of b: not fused

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.a(x))
        z = self.b(y)
        return torch.sigmoid(self.c(torch.relu(z))), self.d(z) + z[:, :4]


def _plant(eng: Engine, inc: float, dense: float) -> None:
    """Timing history as if incremental frames took ``inc`` ms and dense ones ``dense`` ms (re-planted before
    every frame so the tiny test net's real times do not dilute it)."""
    eng._dense_ms.extend([dense] * 5)
    eng._ratios.extend([inc / dense] * 5)


def _check(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(out, ref, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_guard_runs_dense_and_probes_when_incremental_does_not_pay(mode: str) -> None:
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(1, 20, 48, 64, 16, (0, 4), 0.0)
    cfg = EngineConfig(mode=mode, guard=True, guard_probe=4, guard_probe_max=4, layout="pgemm")
    eng = Engine(body, (48, 64), cfg)
    reasons = []
    with torch.inference_mode():
        for t, (x, f) in enumerate(frames):
            if t >= 1:
                _plant(eng, inc=1e9, dense=1e-9)  # incremental frames "cost" far more than dense ones
            out, st = eng.step(x, f)
            reasons.append(st.reason)
            if mode == "exact":
                _check(out, body(x))
    guarded = [i for i, r in enumerate(reasons) if r == "cost guard"]
    probes = [i for i, r in enumerate(reasons) if i > 0 and r == ""]
    assert len(guarded) >= 12, reasons
    # every guard_probe-th frame probes the incremental path; between probes, dense
    assert probes and all(b - a == 4 for a, b in itertools.pairwise(probes)), reasons


def test_guard_probes_back_off_and_reset_when_incremental_pays() -> None:
    """Each probe that still does not pay doubles the interval (up to guard_probe_max); once incremental
    pays again the guard steps aside and a later slow spell starts from guard_probe again."""
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(4, 48, 48, 64, 16, (0, 4), 0.0)
    eng = Engine(body, (48, 64), EngineConfig(guard=True, guard_probe=2, guard_probe_max=8, layout="pgemm"))
    reasons = []
    with torch.inference_mode():
        for t, (x, f) in enumerate(frames):
            if 1 <= t < 30 or t >= 33:
                _plant(eng, inc=1e9, dense=1e-9)
            elif t >= 30:
                _plant(eng, inc=1e-9, dense=1e9)
            out, st = eng.step(x, f)
            reasons.append(st.reason)
            _check(out, body(x))
    probes = [i for i, r in enumerate(reasons) if 1 <= i < 30 and r == ""]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [4, 8, 8] and set(gaps[3:]) <= {8}, reasons  # 2 → 4 → 8, capped
    assert all(r == "" for r in reasons[30:33]), reasons  # incremental pays: no guard
    late = [i for i, r in enumerate(reasons) if i >= 33 and r == ""]
    assert late and late[0] - 33 <= 2 and [b - a for a, b in itertools.pairwise(late)][:1] == [4], reasons


def test_guard_probe_max_below_guard_probe_is_rejected() -> None:
    with pytest.raises(EngineError, match="guard_probe_max"):
        EngineConfig(guard=True, guard_probe=8, guard_probe_max=4)


def test_guard_stays_out_of_the_way_when_incremental_pays() -> None:
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(2, 12, 48, 64, 16, (0, 4), 0.0)
    eng = Engine(body, (48, 64), EngineConfig(guard=True, layout="pgemm"))
    with torch.inference_mode():
        for t, (x, f) in enumerate(frames):
            if t >= 1:
                _plant(eng, inc=1e-9, dense=1e9)
            out, st = eng.step(x, f)
            assert st.dense == (t == 0), st.reason
            _check(out, body(x))


def test_guard_off_never_guards() -> None:
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(3, 6, 48, 64, 16, (0, 4), 0.0)
    eng = Engine(body, (48, 64), EngineConfig(layout="pgemm"))
    with torch.inference_mode():
        for t, (x, f) in enumerate(frames):
            if t >= 1:
                _plant(eng, inc=1e9, dense=1e-9)
            _, st = eng.step(x, f)
            assert st.dense == (t == 0)


def test_capture_module_leaves_the_same_caches_as_the_interpreter() -> None:
    """Dense frames run as generated code; the caches they leave must be the interpreter's (activation fused
    into its convolution where the engine fuses it, the raw output elsewhere)."""
    torch.manual_seed(0)
    body = Net().eval()
    x = torch.rand(1, 3, 48, 64)
    a = Engine(body, (48, 64), EngineConfig(calibrate=True))  # first dense frame through the interpreter
    b = Engine(body, (48, 64), EngineConfig())
    with torch.inference_mode():
        oa, _ = a.step(x, None)
        ob, _ = b.step(x, None)
    assert b._capture is not None and a._capture is None
    _check(oa, ob)
    assert set(a._caches) == set(b._caches) == {"a", "b", "c", "d"}
    for k in a._caches:
        assert torch.equal(a._caches[k], b._caches[k]), k
    assert float(b._caches["a"].min()) >= 0.0  # relu fused into a: the cache holds activated values
    assert float(b._caches["b"].min()) < 0.0  # b has two users: raw output


def test_guard_probe_must_be_at_least_two() -> None:
    with pytest.raises(EngineError, match="guard_probe"):
        EngineConfig(guard=True, guard_probe=1)


def test_capture_outputs_are_not_the_caches() -> None:
    """Outputs handed to the caller are copies: the next frame updates caches in place."""
    body = Net().eval()
    eng = Engine(body, (48, 64), EngineConfig())
    x = torch.rand(1, 3, 48, 64)
    with torch.inference_mode():
        out, _ = eng.step(x, None)
    ptrs = {t.data_ptr() for t in eng._caches.values()}
    assert all(o.data_ptr() not in ptrs for o in out)
    assert np.isfinite(out[0].numpy()).all()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_guarded_frames_skip_the_capture_but_never_serve_stale_caches(mode: str) -> None:
    """Guarded frames run plain inference and keep no caches, except the one before a probe. If the guard
    turns incremental right after such a frame (timings changed), that frame must run dense ("stale caches")
    instead of reusing caches older than the last frame — and every frame still equals dense."""
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(1, 14, 48, 64, 16, (0, 4), 0.0)
    eng = Engine(body, (48, 64), EngineConfig(mode=mode, guard=True, guard_probe=6, layout="pgemm"))
    captured: list[bool] = []
    run_dense = eng._run_dense

    def spy(x: torch.Tensor) -> object:
        captured.append(True)
        return run_dense(x)

    eng._run_dense = spy  # type: ignore[method-assign]
    reasons = []
    with torch.inference_mode():
        for t, (x, f) in enumerate(frames):
            if 1 <= t < 9:
                _plant(eng, inc=1e9, dense=1e-9)  # incremental does not pay ...
            elif t >= 9:
                _plant(eng, inc=1e-9, dense=1e9)  # ... then suddenly does
            n = len(captured)
            out, st = eng.step(x, f)
            reasons.append((st.reason, len(captured) > n))
            if mode == "exact":
                _check(out, body(x))
    guarded = [(i, cap) for i, (r, cap) in enumerate(reasons) if r == "cost guard"]
    assert guarded and any(not cap for _, cap in guarded), reasons  # plain frames happened
    # the frame before each probe captured; no incremental frame directly follows a plain one
    for i in range(1, len(reasons)):
        if reasons[i][0] == "" and reasons[i - 1][0] == "cost guard":
            assert reasons[i - 1][1], reasons
    assert ("stale caches", True) in reasons, reasons


def test_guard_compares_each_incremental_frame_with_the_dense_frames_of_its_time() -> None:
    """A host that slows down after the incremental frames were timed must not make them look cheap: the
    guard keeps ratios to the dense frames around each incremental one, not absolute times."""
    eng = Engine(Net().eval(), (48, 64), EngineConfig(guard=True))
    for ms in (100.0, 100.0, 100.0):  # incremental frames before any dense reference: kept pending
        eng._time(False, ms)
    assert eng._guard() == "cost guard"  # no dense reference yet: measure dense first
    eng._time(True, 50.0)
    eng._time(True, 50.0)  # now the pending frames become ratios 2.0
    assert list(eng._ratios) == [2.0, 2.0, 2.0]
    for _ in range(5):
        eng._time(True, 150.0)  # the machine slowed down 3×: absolute times would say incremental pays
    assert eng._guard() == "cost guard"
    eng._time(False, 140.0)  # incremental measured at the slow speed: ratio 0.93
    eng._time(False, 140.0)
    eng._time(False, 140.0)
    assert eng._guard() == ""


@pytest.mark.parametrize(("ratio", "refresh"), [(0.95, True), (0.5, False)])
def test_guard_re_times_dense_near_parity(ratio: float, refresh: bool) -> None:
    """Near parity the decision rests on the dense reference, so while incremental frames run it is re-timed
    every ``guard_probe_max`` frames (two plain dense frames); far from parity it is left alone."""
    eng = Engine(Net().eval(), (48, 64), EngineConfig(guard=True, guard_probe=4, guard_probe_max=8))
    eng._time(True, 100.0)
    eng._time(True, 100.0)
    for _ in range(5):
        eng._time(False, 100.0 * ratio)
    decisions = [eng._guard() for _ in range(9)]
    if not refresh:
        assert decisions == [""] * 9
        return
    assert decisions == [""] * 8 + ["cost guard"] and len(eng._dense_ms) == 0
    assert eng._guard() == "cost guard"  # the second plain frame of the re-timing
    eng._time(True, 80.0)  # the machine is faster now: the new reference replaces the old one
    eng._time(True, 80.0)
    assert eng._since_dense == 0 and list(eng._dense_ms) == [80.0, 80.0]
    assert eng._guard() == ""  # incremental again (ratios of the old reference until new frames come)
    eng._time(False, 100.0)  # 1.25 of the new reference
    eng._time(False, 100.0)
    eng._time(False, 100.0)
    assert eng._guard() == "cost guard"


def _fast_run(body: nn.Module, frames: list, clock: object, monkeypatch: pytest.MonkeyPatch, **cfg: object,
              ) -> tuple[list[str], list[torch.Tensor]]:
    import fluxshard.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_guard_clock", clock)
    eng = Engine(body, (48, 64), EngineConfig(mode="fast", guard=True, guard_probe=2, guard_probe_max=4,
                                              tau_in=0.0, **cfg))  # type: ignore[arg-type]
    reasons, outs = [], []
    with torch.inference_mode():
        for x, f in frames:
            out, st = eng.step(x, f)
            reasons.append(st.reason)
            outs.append(out[0].clone())
    assert not eng._dense_ms  # fast mode never times a frame for the guard
    return reasons, outs


def test_fast_mode_guard_decides_from_work_not_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast mode: which frames run dense is a function of the frames (active fraction over
    ``guard_active``), not of timings — two runs under wildly different clocks make the same decisions and
    the same outputs; a crossover above the work done never guards, one below it does."""
    torch.manual_seed(0)
    body = Net().eval()
    frames = _frames(3, 16, 48, 64, 16, (0, 3), 0.3)  # 3 px pan, wrong vectors: much recomputed
    rng = np.random.default_rng(0)
    ticks = itertools.count()
    slow, slow_out = _fast_run(body, frames, lambda: float(rng.random() * 100), monkeypatch, guard_active=0.05)
    fast, fast_out = _fast_run(body, frames, lambda: next(ticks) * 1e-9, monkeypatch, guard_active=0.05)
    assert slow == fast and "cost guard" in slow, slow
    assert all(torch.equal(a, b) for a, b in zip(slow_out, fast_out, strict=True))
    never, _ = _fast_run(body, frames, lambda: float(rng.random()), monkeypatch, guard_active=1.0)
    assert "cost guard" not in never, never


def test_guard_active_must_be_a_fraction() -> None:
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(EngineError, match="guard_active"):
            EngineConfig(mode="fast", guard=True, guard_active=bad)


def test_guard_forgets_times_taken_at_another_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact mode's guard compares times; after the thread count changes (the CLI's governor follows the
    load) the old times measure another machine and another clock, so they are dropped."""
    eng = Engine(Net().eval(), (48, 64), EngineConfig(guard=True))
    eng._time(True, 10.0)
    eng._time(True, 10.0)
    eng._time(False, 30.0)
    assert len(eng._dense_ms) == 2 and len(eng._ratios) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    eng._time(False, 5.0)
    assert len(eng._dense_ms) == 0 and len(eng._ratios) == 0 and list(eng._pending_ms) == [5.0]
