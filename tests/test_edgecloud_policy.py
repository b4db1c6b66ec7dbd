"""The pure dispatch policy: estimators converge, decisions flip where they should, estimates are monotone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxshard.edgecloud.policy import (
    CloudEstimator,
    Decision,
    EdgeEstimator,
    Endpoint,
    FrameEstimate,
    LinearCost,
    LinkEstimator,
    Scheduler,
    cloud_estimate_ms,
    decide,
)


def test_edge_estimator_converges_to_the_observed_line_and_applies_the_slowdown() -> None:
    est = EdgeEstimator(dense_ms=100.0, edge_slowdown=8.0)
    assert est.predict(1.0) == pytest.approx(800.0)  # seeded by the dense time
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = float(rng.random())
        est.observe(a, 12.0 + 40.0 * a + float(rng.normal(0, 0.5)))
    assert est.fit.theta == pytest.approx([12.0, 40.0], abs=1.0)
    assert est.predict(0.5) == pytest.approx(8.0 * 32.0, rel=0.03)


def test_edge_estimator_follows_a_machine_that_slows_down() -> None:
    est = EdgeEstimator(dense_ms=50.0)
    for a in np.linspace(0, 1, 40):
        est.observe(float(a), 5.0 + 45.0 * float(a))
    for a in np.tile(np.linspace(0, 1, 10), 8):
        est.observe(float(a), 2 * (5.0 + 45.0 * float(a)))  # forgetting: recent frames dominate
    assert est.predict(1.0) == pytest.approx(100.0, rel=0.05)


def test_link_estimator_converges_on_rate_and_rtt() -> None:
    link = LinkEstimator(mbps=130.0, rtt_ms=20.0)
    for _ in range(30):
        link.observe_transfer(100_000, 100_000 * 8 / 10e6)  # 10 Mbit/s
        link.observe_rtt(50.0)
    assert link.mbps == pytest.approx(10.0, rel=0.01)
    assert link.rtt_ms == pytest.approx(50.0, rel=0.05)
    assert link.transfer_ms(125_000) == pytest.approx(100.0, rel=0.01)
    link.observe_transfer(100, 1.0)  # a tiny message: its time is overhead, not rate
    assert link.mbps == pytest.approx(10.0, rel=0.01)


def test_link_estimate_is_a_harmonic_mean() -> None:
    """One slow sample weighs as a latency should: the estimate of alternating 100 / 10 Mbit/s lies near their
    harmonic mean (18.2), far below the arithmetic one (55)."""
    link = LinkEstimator(mbps=50.0, rtt_ms=0.0, alpha=0.05)
    for k in range(400):
        mbps = 100.0 if k % 2 else 10.0
        link.observe_transfer(1_000_000, 8.0 / mbps)
    assert link.mbps == pytest.approx(2 / (1 / 100 + 1 / 10), rel=0.1)


def test_cloud_estimator_and_total() -> None:
    cloud = CloudEstimator(dense_ms=20.0)
    for a in np.linspace(0, 1, 50):
        cloud.observe(float(a), 2.0 + 10.0 * float(a), queue_ms=3.0)
    assert cloud.predict(1.0) == pytest.approx(15.0, rel=0.05)
    link = LinkEstimator(mbps=8.0, rtt_ms=20.0)
    assert cloud_estimate_ms(100_000, link, cloud, 1.0) == pytest.approx(100.0 + 20.0 + 15.0, rel=0.02)


def test_decisions_follow_the_bandwidth_from_130_to_2_mbit() -> None:
    """A slow edge (8× a 40 ms frame), a 60 kB payload: the cloud wins on a fast link; as the measured rate falls
    the frames move to the edge within a few frames of the drop."""
    edge = EdgeEstimator(dense_ms=40.0, edge_slowdown=8.0)
    cloud = CloudEstimator(dense_ms=15.0)
    link = LinkEstimator(mbps=130.0, rtt_ms=20.0)
    nbytes = 60_000
    chosen: list[Endpoint] = []
    for k in range(40):
        mbps = 130.0 if k < 20 else 2.0
        d = decide("auto", edge.predict(0.5), cloud_estimate_ms(nbytes, link, cloud, 0.5))
        chosen.append(d.endpoint)
        if d.endpoint == "cloud":  # the runtime learns the rate from what it sends
            link.observe_transfer(nbytes, nbytes * 8 / (mbps * 1e6))
        else:  # …and from a probe when it sends nothing (a keyframe, a keepalive): here a small one
            link.observe_transfer(nbytes // 10, nbytes // 10 * 8 / (mbps * 1e6))
    assert chosen[:20] == ["cloud"] * 20
    assert chosen[20] == "cloud"  # the drop is not known yet
    assert chosen.index("edge") <= 23 and set(chosen[24:]) == {"edge"}


def test_decisions_follow_motion() -> None:
    """More motion → more residual blocks → a bigger payload: on a thin link the edge takes over."""
    edge = EdgeEstimator(dense_ms=40.0, edge_slowdown=8.0)  # 32 + 288·a ms
    cloud = CloudEstimator(dense_ms=15.0)
    link = LinkEstimator(mbps=8.0, rtt_ms=20.0)  # 21.5 + 313.5·a ms
    full = 300_000  # bytes of an all-residual payload
    ends = [decide("auto", edge.predict(a), cloud_estimate_ms(int(a * full), link, cloud, a)).endpoint
            for a in np.linspace(0.0, 1.0, 11)]
    assert ends[0] == "cloud" and ends[-1] == "edge"
    assert ends == sorted(ends, key=lambda e: e == "edge")  # one flip, cloud → edge


def test_policies_and_fallback() -> None:
    assert decide("edge", 1.0, 0.5) == Decision("edge", "policy edge", 1.0, 0.5)
    assert decide("cloud", 1.0, 5.0).endpoint == "cloud"
    assert decide("auto", 1.0, 1.0).endpoint == "edge"  # a tie needs no network
    for policy in ("auto", "cloud"):
        assert decide(policy, 100.0, 5.0, cloud_available=False).reason == "cloud unavailable"
        assert decide(policy, 100.0, 50.0, budget_ms=40.0) == Decision("edge", "cloud over budget", 100.0, 50.0)
    assert decide("auto", 100.0, math.inf).endpoint == "edge"
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        decide("fastest", 1.0, 1.0)
    with pytest.raises(ValueError, match="cloud estimate must be ≥ 0 ms"):
        decide("auto", 1.0, float("nan"))


class _Alternate:
    def __init__(self) -> None:
        self.seen: list[FrameEstimate] = []

    def choose(self, estimate: FrameEstimate) -> tuple[Endpoint, str]:
        self.seen.append(estimate)
        return ("cloud" if len(self.seen) % 2 else "edge"), "alternate"


def test_scheduler_hook() -> None:
    s = _Alternate()
    assert isinstance(s, Scheduler)
    assert decide(s, 10.0, 20.0, extra={"seq": 1}) == Decision("cloud", "alternate", 10.0, 20.0)
    assert decide(s, 10.0, 20.0).endpoint == "edge"
    assert s.seen[0].extra == {"seq": 1}
    assert decide(s, 10.0, 20.0, cloud_available=False).endpoint == "edge"  # the fallback rule comes first
    assert len(s.seen) == 2


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="edge_slowdown must be ≥ 1"):
        EdgeEstimator(10.0, edge_slowdown=0.5)
    with pytest.raises(ValueError, match="dense_ms must be a positive number"):
        EdgeEstimator(0.0)
    with pytest.raises(ValueError, match=r"bandwidth \(Mbit/s\) must be a positive number"):
        LinkEstimator(0.0, 20.0)
    with pytest.raises(ValueError, match="active fraction must lie in"):
        LinearCost(10.0).observe(1.5, 3.0)


@settings(max_examples=60, deadline=None)
@given(
    obs=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 500)), max_size=30),
    a1=st.floats(0, 1), a2=st.floats(0, 1),
    slowdown=st.floats(1, 16),
)
def test_edge_estimate_is_monotone_in_work(obs: list[tuple[float, float]], a1: float, a2: float,
                                           slowdown: float) -> None:
    est = EdgeEstimator(dense_ms=30.0, edge_slowdown=slowdown)
    for a, ms in obs:
        est.observe(a, ms)
    lo, hi = sorted((a1, a2))
    assert 0.0 <= est.predict(lo) <= est.predict(hi)


@settings(max_examples=60, deadline=None)
@given(
    b1=st.integers(0, 2_000_000), b2=st.integers(0, 2_000_000),
    m1=st.floats(0.5, 500), m2=st.floats(0.5, 500),
    edge_ms=st.floats(0, 2000), active=st.floats(0, 1),
)
def test_cloud_estimate_and_decision_are_monotone(b1: int, b2: int, m1: float, m2: float, edge_ms: float,
                                                  active: float) -> None:
    """Fewer bytes or a faster link never make the cloud slower, and never turn a cloud decision into edge."""
    cloud = CloudEstimator(dense_ms=15.0)
    small, big = sorted((b1, b2))
    slow, fast = sorted((m1, m2))
    est = {(b, m): cloud_estimate_ms(b, LinkEstimator(m, 20.0), cloud, active)
           for b in (small, big) for m in (slow, fast)}
    assert est[small, fast] <= est[small, slow] <= est[big, slow]
    assert est[small, fast] <= est[big, fast] <= est[big, slow]
    if decide("auto", edge_ms, est[big, slow]).endpoint == "cloud":
        assert decide("auto", edge_ms, est[small, fast]).endpoint == "cloud"
