"""The per-frame dispatch decision (seed 000 Stage 2–3): pure estimators and a pure decision, no I/O, no clocks.

The runtime measures and feeds observations in; these classes only fit and predict, so every decision can be
replayed from a log.

- :class:`EdgeEstimator`: edge compute ms = a + b·(active fraction), a recursive least-squares fit with
  forgetting over observed (active, ms) pairs, seeded by the dense time (ms(1) = dense), times the emulated
  ``edge_slowdown`` F (observations are the *unstretched* compute times; the prediction is the stretched one).
- :class:`LinkEstimator`: uplink rate as an EWMA of the *inverse* rate (seconds per byte, i.e. a weighted
  harmonic mean of rates: one slow sample counts fully, as it should for a latency estimate) and an EWMA RTT.
- :class:`CloudEstimator`: the server's reported compute ms fitted against the cloud layer's active fraction
  (same fit as the edge, the server runs the same incremental engine), plus an EWMA of its queue ms.
- :func:`cloud_estimate_ms`: payload bytes / bandwidth + RTT + server compute + queue.
- :func:`decide`: policies ``auto`` (lower estimate; ties go to the edge, which needs no network), ``edge``,
  ``cloud``, or any :class:`Scheduler` (the coherence scheduler of a later issue); a fallback rule overrides every
  policy: cloud unreachable, or its estimate over the per-frame budget → edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Endpoint = Literal["edge", "cloud"]
POLICIES = ("auto", "edge", "cloud")


def _positive(name: str, v: float) -> float:
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {v}")
    return float(v)


def _fraction(name: str, v: float) -> float:
    if not (0.0 <= v <= 1.0):  # also NaN
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
    return float(v)


class LinearCost:
    """ms = a + b·active, fitted by recursive least squares with forgetting factor ``forget`` (recent frames
    weigh more: the machine's speed drifts). Seeded at a = overhead·dense, b = (1 − overhead)·dense with a
    prior of ``prior_weight`` observations; predictions are clamped monotone (b ≥ 0) and non-negative."""

    def __init__(self, dense_ms: float, overhead: float = 0.1, forget: float = 0.95, prior_weight: float = 2.0) -> None:
        dense_ms = _positive("dense_ms", dense_ms)
        _fraction("overhead", overhead)
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"forget must lie in (0, 1], got {forget}")
        self.forget = float(forget)
        self.theta = np.array([overhead * dense_ms, (1.0 - overhead) * dense_ms])
        self.P = np.eye(2) / _positive("prior_weight", prior_weight)
        self.n = 0

    def observe(self, active: float, ms: float) -> None:
        _fraction("active fraction", active)
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"observed ms must be a finite number ≥ 0, got {ms}")
        x = np.array([1.0, active])
        px = self.P @ x
        k = px / (self.forget + x @ px)
        self.theta = self.theta + k * (ms - x @ self.theta)
        self.P = (self.P - np.outer(k, px)) / self.forget
        self.n += 1

    def predict(self, active: float) -> float:
        _fraction("active fraction", active)
        a, b = self.theta
        return max(0.0, float(a + max(b, 0.0) * active))


class EdgeEstimator:
    """Edge latency from work: the fitted compute time times the emulated slowdown F (``--edge-slowdown``)."""

    def __init__(self, dense_ms: float, edge_slowdown: float = 1.0, **fit: Any) -> None:
        self.edge_slowdown = _positive("edge_slowdown", edge_slowdown)
        if self.edge_slowdown < 1.0:
            raise ValueError(f"edge_slowdown must be ≥ 1, got {edge_slowdown}")
        self.fit = LinearCost(dense_ms, **fit)

    def observe(self, active: float, compute_ms: float) -> None:
        """An edge frame's measured compute time, *before* the slowdown is applied."""
        self.fit.observe(active, compute_ms)

    def predict(self, active: float) -> float:
        return self.fit.predict(active) * self.edge_slowdown


class LinkEstimator:
    """Uplink rate and RTT. ``observe_transfer(nbytes, seconds)``: the time the payload took to pass the link,
    one-way delay excluded; samples under ``min_bytes`` are ignored (their time is mostly per-message overhead)."""

    def __init__(self, mbps: float, rtt_ms: float, alpha: float = 0.3, rtt_alpha: float = 0.125,
                 min_bytes: int = 1500) -> None:
        self._s_per_byte = 8.0 / (_positive("bandwidth (Mbit/s)", mbps) * 1e6)
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be a finite number ≥ 0, got {rtt_ms}")
        self.rtt_ms = float(rtt_ms)
        for name, a in (("alpha", alpha), ("rtt_alpha", rtt_alpha)):
            if not 0.0 < a <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {a}")
        self.alpha, self.rtt_alpha, self.min_bytes = float(alpha), float(rtt_alpha), int(min_bytes)

    @property
    def mbps(self) -> float:
        return 8.0 / self._s_per_byte / 1e6

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        if nbytes < 0 or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"transfer sample must be bytes ≥ 0 and finite seconds ≥ 0, got {nbytes}, {seconds}")
        if nbytes < max(self.min_bytes, 1) or seconds <= 0:
            return
        self._s_per_byte += self.alpha * (seconds / nbytes - self._s_per_byte)

    def observe_rtt(self, rtt_ms: float) -> None:
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"rtt_ms must be a finite number ≥ 0, got {rtt_ms}")
        self.rtt_ms += self.rtt_alpha * (rtt_ms - self.rtt_ms)

    def transfer_ms(self, nbytes: int) -> float:
        if nbytes < 0:
            raise ValueError(f"payload size must be ≥ 0 bytes, got {nbytes}")
        return nbytes * self._s_per_byte * 1e3


class CloudEstimator:
    """The server's compute ms (fitted against the cloud layer's active fraction) and queue ms (EWMA), both
    as the server reports them with each result."""

    def __init__(self, dense_ms: float, queue_ms: float = 0.0, alpha: float = 0.3, **fit: Any) -> None:
        self.fit = LinearCost(dense_ms, **fit)
        if not (math.isfinite(queue_ms) and queue_ms >= 0):
            raise ValueError(f"queue_ms must be a finite number ≥ 0, got {queue_ms}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.queue_ms, self.alpha = float(queue_ms), float(alpha)

    def observe(self, active: float, compute_ms: float, queue_ms: float) -> None:
        if not (math.isfinite(queue_ms) and queue_ms >= 0):
            raise ValueError(f"queue_ms must be a finite number ≥ 0, got {queue_ms}")
        self.fit.observe(active, compute_ms)
        self.queue_ms += self.alpha * (queue_ms - self.queue_ms)

    def predict(self, active: float) -> float:
        """Server compute + queue ms for a frame with this active fraction."""
        return self.fit.predict(active) + self.queue_ms


def cloud_estimate_ms(payload_bytes: int, link: LinkEstimator, cloud: CloudEstimator, active: float) -> float:
    """Predicted cloud latency: uplink transfer + RTT + the server's compute and queue time."""
    return link.transfer_ms(payload_bytes) + link.rtt_ms + cloud.predict(active)


@dataclass(frozen=True)
class Decision:
    endpoint: Endpoint
    reason: str
    edge_ms: float  # predicted, both kept so the log can score the estimate of whichever ran
    cloud_ms: float


@dataclass(frozen=True)
class FrameEstimate:
    """What a scheduler sees for one frame."""

    edge_ms: float
    cloud_ms: float
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. active fractions, payload bytes, seq


@runtime_checkable
class Scheduler(Protocol):
    """Hook for a policy beyond the lower estimate (the coherence scheduler of a later issue)."""

    def choose(self, estimate: FrameEstimate) -> tuple[Endpoint, str]:
        """Endpoint and a short reason for the frame's log row."""
        ...


def decide(policy: str | Scheduler, edge_ms: float, cloud_ms: float, *, cloud_available: bool = True,
           budget_ms: float | None = None, extra: dict[str, Any] | None = None) -> Decision:
    """Where this frame runs. The fallback rule comes first under every policy: an unreachable cloud (or one
    awaiting a resync the edge cannot send in time) or a cloud estimate over ``budget_ms`` → edge."""
    for name, v in (("edge estimate", edge_ms), ("cloud estimate", cloud_ms)):
        if math.isnan(v) or v < 0:
            raise ValueError(f"{name} must be ≥ 0 ms, got {v}")
    if isinstance(policy, str) and policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)} or a Scheduler")
    if isinstance(policy, str) and policy == "edge":
        return Decision("edge", "policy edge", edge_ms, cloud_ms)
    if not cloud_available:
        return Decision("edge", "cloud unavailable", edge_ms, cloud_ms)
    if budget_ms is not None and cloud_ms > budget_ms:
        return Decision("edge", "cloud over budget", edge_ms, cloud_ms)
    if isinstance(policy, str):
        if policy == "cloud":
            return Decision("cloud", "policy cloud", edge_ms, cloud_ms)
        if cloud_ms < edge_ms:
            return Decision("cloud", "cloud estimate lower", edge_ms, cloud_ms)
        return Decision("edge", "edge estimate lower", edge_ms, cloud_ms)
    if not isinstance(policy, Scheduler):
        raise ValueError(f"policy must be one of {', '.join(POLICIES)} or a Scheduler, got {type(policy).__name__}")
    endpoint, reason = policy.choose(FrameEstimate(edge_ms, cloud_ms, dict(extra or {})))
    if endpoint not in ("edge", "cloud"):
        raise ValueError(f"scheduler chose {endpoint!r}: expected 'edge' or 'cloud'")
    return Decision(endpoint, reason, edge_ms, cloud_ms)
