"""The edge runtime against an in-process CloudServer over loopback: cloud frames equal a local exact engine's,
the edge policy sends nothing, the auto policy follows the estimates, a server that goes away and a NeedKeyframe
both fall back to the edge without losing a frame, and the next cloud frame resyncs with a keyframe."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud.dispatch import DispatchLayer, input_tensor, integer_input
from fluxshard.edgecloud.edge import EdgeError, EdgeRuntime, FrameRecord
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.server import CloudServer
from fluxshard.engine import Engine, EngineConfig
from fluxshard.engine.inputs import mapper_for
from fluxshard.models import ModelAdapter, load_model
from fluxshard.motion import MotionFrame, MotionStream

FACTOR = 4  # cup 480×640 → 120×160 engine input (uint16 box sums, 4-px blocks), as the server tests
BIG_BUDGET = 60_000.0  # ms: a shared CI machine must never time a test frame out unless the test wants it


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return load_model("nanodet")


@pytest.fixture(scope="module")
def frames() -> list[MotionFrame]:
    return list(MotionStream(clip_path("cup"), block=16, max_frames=6))


class ServerThread:
    """A CloudServer on its own event loop thread (the runtime has its own), so the test can stop it mid-stream."""

    def __init__(self, adapter: ModelAdapter, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = CloudServer(adapter, insecure=True, port=port)
        self.port = self.call(self.server.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server(adapter: ModelAdapter) -> Iterator[ServerThread]:
    s = ServerThread(adapter)
    try:
        yield s
    finally:
        s.close()


def runtime(adapter: ModelAdapter, server: ServerThread | None, policy: str, **kw: Any) -> EdgeRuntime:
    kw.setdefault("budget_ms", BIG_BUDGET)
    kw.setdefault("dense_ms", 20.0)
    if "results" not in kw:
        kw.setdefault("raw_outputs", True)  # the parity tests compare raw outputs
    return EdgeRuntime(adapter, "exact", policy, server.target if server else None, insecure=True, factor=FACTOR,
                       **kw)


def reference(adapter: ModelAdapter, frames: list[MotionFrame], cloud: list[int]) -> dict[int, list[np.ndarray]]:
    """A local exact engine stepped on the cloud frames with the effective field a mirror of the cloud layer
    sends (what the server's engine sees): its raw outputs per frame."""
    mapper = mapper_for(adapter, frames[0].frame.rgb.shape[:2], FACTOR)
    engine = Engine(adapter.body, mapper.input_hw, EngineConfig())
    layer = DispatchLayer.for_mapper(mapper)
    out = {}
    for mf in frames:
        x = integer_input(mapper, mf.frame.rgb)
        if layer.cache is not None:
            layer.fold(mapper.field(mf.field))
        if mf.index not in cloud:
            continue
        fld = layer.align(x).field if layer.cache is not None else None
        o, _ = engine.step(input_tensor(mapper, x), fld)
        out[mf.index] = [t.numpy() for t in o]
        layer.update(x, seq=mf.index)
    return out


def same_results(a: FrameRecord, b: list[np.ndarray]) -> None:
    assert len(a.outputs) == len(b)
    for g, w in zip(a.outputs, b, strict=True):
        assert np.array_equal(g, w)


def test_cloud_policy_exact_frames_equal_a_local_exact_engine(adapter: ModelAdapter, frames: list[MotionFrame],
                                                              server: ServerThread) -> None:
    with runtime(adapter, server, "cloud") as rt:
        recs = [rt.process(mf) for mf in frames]
        s = rt.summary()
    assert [r.endpoint for r in recs] == ["cloud"] * len(frames)
    assert all(r.checksum_ok for r in recs) and not any(r.fallback for r in recs)
    assert [r.keyframe for r in recs] == [True] + [False] * (len(frames) - 1)
    assert recs[1].bytes_up < recs[0].bytes_up  # deltas are smaller than the keyframe
    assert all(r.bytes_down > 0 and r.measured.compute_ms > 0 and r.measured.transfer_ms >= 0 for r in recs)
    ref = reference(adapter, frames, [mf.index for mf in frames])
    for r in recs:
        same_results(r, ref[r.index])
    # results equal a local exact edge-only run (exact: both equal dense within float32; the boxes agree)
    with runtime(adapter, None, "edge") as local:
        for mf, r in zip(frames, recs, strict=True):
            e = local.process(mf)
            assert np.array_equal(e.results.class_ids, r.results.class_ids)
            np.testing.assert_allclose(e.results.boxes, r.results.boxes, atol=1e-3)
    assert s["frames"] == s["frames_cloud"] == len(frames) and s["lost_frames"] == 0 and s["resyncs"] == 0
    assert s["uplink_bytes_total"] == sum(r.bytes_up for r in recs) and s["estimate_error_median"] is not None


def test_edge_policy_sends_nothing(adapter: ModelAdapter, frames: list[MotionFrame], server: ServerThread) -> None:
    with runtime(adapter, server, "edge") as rt:
        recs = [rt.process(mf) for mf in frames[:3]]
        s = rt.summary()
    assert all(r.endpoint == "edge" and r.reason == "policy edge" and r.bytes_up == 0 for r in recs)
    assert s["uplink_bytes_total"] == 0 and s["frames_edge"] == 3 and s["frames_fallback"] == 0
    assert not server.server.streams  # never even said Hello
    row = json.loads(json.dumps(recs[1].to_dict()))  # a JSON-ready log row
    assert row["endpoint"] == "edge" and row["measured"]["compute_ms"] > 0 and row["predicted"]["total_ms"] > 0


def test_fast_mode_cloud_frames_rebuild_the_mirror(adapter: ModelAdapter, frames: list[MotionFrame],
                                                   server: ServerThread) -> None:
    """Fast mode: the mirror applies τ_in, so the server rebuilds an approximation of the frame — still bit for bit
    the mirror's (every checksum agrees) and the deltas shrink."""
    rt = EdgeRuntime(adapter, "fast", "cloud", server.target, insecure=True, factor=FACTOR, budget_ms=BIG_BUDGET,
                     dense_ms=20.0, link_rtt_ms=500.0)
    with rt:
        recs = [rt.process(mf) for mf in frames[:4]]
    assert rt.cloud_layer is not None and rt.cloud_layer.tau_in > 0
    assert all(r.endpoint == "cloud" and r.checksum_ok for r in recs)
    assert max(r.bytes_up for r in recs[1:]) < recs[0].bytes_up
    assert rt.link.rtt_ms < 500.0  # loopback replies came back faster than the RTT prior: it was lowered


def test_auto_policy_follows_the_estimates(adapter: ModelAdapter, frames: list[MotionFrame],
                                           server: ServerThread) -> None:
    with runtime(adapter, server, "auto", edge_slowdown=1e4, dense_ms=1.0, link_mbps=1e4, link_rtt_ms=0.1) as rt:
        slow_edge = [rt.process(mf) for mf in frames[:3]]
    assert [r.endpoint for r in slow_edge] == ["cloud"] * 3
    assert all(r.reason == "cloud estimate lower" and r.predicted.compute_ms >= 0 for r in slow_edge)
    with runtime(adapter, server, "auto", edge_slowdown=1.0, link_mbps=0.1) as rt:
        slow_link = [rt.process(mf) for mf in frames[:3]]
        s = rt.summary()
    assert [r.endpoint for r in slow_link] == ["edge"] * 3 and s["uplink_bytes_total"] == 0
    assert all(r.reason == "edge estimate lower" for r in slow_link)


def test_server_stopped_mid_stream_falls_back_to_the_edge(adapter: ModelAdapter, frames: list[MotionFrame],
                                                          server: ServerThread) -> None:
    with runtime(adapter, server, "cloud") as rt:
        recs = [rt.process(mf) for mf in frames[:2]]
        server.call(server.server.stop(0))
        recs += [rt.process(mf) for mf in frames[2:]]
        s = rt.summary()
    assert [r.endpoint for r in recs[:2]] == ["cloud", "cloud"]
    assert all(r.endpoint == "edge" and r.fallback for r in recs[2:])
    assert [r.index for r in recs] == [mf.index for mf in frames]  # frame count preserved
    assert s["frames"] == len(frames) and s["lost_frames"] == 0 and s["frames_fallback"] == len(frames) - 2
    assert rt.cloud_error is not None
    # edge fallbacks computed the same detections a pure edge run does on those frames
    with runtime(adapter, None, "edge") as local:
        for mf, r in zip(frames, recs, strict=True):
            e = local.process(mf)
            np.testing.assert_allclose(e.results.boxes, r.results.boxes, atol=1e-3)


def test_need_keyframe_falls_back_then_resyncs(adapter: ModelAdapter, frames: list[MotionFrame],
                                               server: ServerThread) -> None:
    tampered: list[int] = []

    def tamper(msg: pb.EdgeMessage) -> None:
        if msg.delta.seq == frames[2].index:
            msg.delta.checksum = "0" * 16
            tampered.append(msg.delta.seq)

    with runtime(adapter, server, "cloud") as rt:
        rt.on_delta = tamper
        recs = [rt.process(mf) for mf in frames[:5]]
        s = rt.summary()
    assert tampered == [frames[2].index]
    bad = recs[2]
    assert bad.endpoint == "edge" and bad.decided == "cloud" and bad.fallback and "CHECKSUM_MISMATCH" in bad.reason
    assert [r.keyframe for r in recs] == [True, False, False, True, False]  # resync on the next cloud frame
    assert all(r.endpoint == "cloud" and r.checksum_ok for i, r in enumerate(recs) if i != 2)
    assert s["resyncs"] == 1 and s["frames_fallback"] == 1 and s["lost_frames"] == 0
    ref = reference(adapter, frames[:5], [mf.index for i, mf in enumerate(frames[:5]) if i != 2])
    for i in (0, 1, 3, 4):
        same_results(recs[i], ref[recs[i].index])


def test_reply_later_than_the_budget_falls_back(adapter: ModelAdapter, frames: list[MotionFrame],
                                                server: ServerThread) -> None:
    """A budget no reply can meet: every frame is computed on the edge, each cloud attempt is a keyframe, and the
    late replies of abandoned frames are dropped (not taken for a later frame's)."""
    with runtime(adapter, server, "cloud", budget_ms=0.5, dense_ms=0.01, link_mbps=1e6, link_rtt_ms=0.0) as rt:
        recs = [rt.process(mf) for mf in frames[:3]]  # the estimate (~0.01 ms) is within the budget: it tries
        s = rt.summary()
    assert all(r.endpoint == "edge" and r.decided == "cloud" and r.fallback for r in recs)
    assert all("no reply within" in r.reason and r.keyframe for r in recs)
    assert s["resyncs"] == 2 and s["lost_frames"] == 0


def test_bad_configuration_is_refused(adapter: ModelAdapter) -> None:
    with pytest.raises(EdgeError, match="policy cloud needs a server target"):
        EdgeRuntime(adapter, "exact", "cloud", None)
    with pytest.raises(EdgeError, match="no TLS CA"):
        EdgeRuntime(adapter, "exact", "auto", "127.0.0.1:1")
    with pytest.raises(EdgeError, match="edge_slowdown"):
        EdgeRuntime(adapter, "exact", "edge", edge_slowdown=0.5)
    with pytest.raises(EdgeError, match="policy must be"):
        EdgeRuntime(adapter, "exact", "nearest")


def test_detections_downlink_equals_an_edge_run_and_is_small(adapter: ModelAdapter, frames: list[MotionFrame],
                                                             server: ServerThread) -> None:
    """results=detections (the default): the server sends decoded detections (engine-input pixels), the edge maps
    them to the frame; they equal an edge-only run's and each Result is a few hundred bytes, not MBs."""
    with runtime(adapter, server, "cloud", results="detections") as rt:
        recs = [rt.process(mf) for mf in frames[:4]]
        st = server.server.streams[rt.stream_id]  # freed at Bye
        assert st.hello.results == pb.RESULTS_DETECTIONS and st.hello.input_factor == FACTOR
    assert all(r.endpoint == "cloud" and r.checksum_ok and not r.outputs for r in recs)
    assert all(0 < r.bytes_down < 2000 for r in recs)
    with runtime(adapter, None, "edge") as local:
        for mf, r in zip(frames, recs, strict=False):
            e = local.process(mf)
            assert len(e.results) > 0 and np.array_equal(e.results.class_ids, r.results.class_ids)
            np.testing.assert_allclose(e.results.boxes, r.results.boxes, atol=1e-3)
            np.testing.assert_allclose(e.results.scores, r.results.scores, atol=1e-5)
    with runtime(adapter, server, "cloud", raw_outputs=True) as raw:
        big = raw.process(frames[0])
    assert big.bytes_down > 50 * max(r.bytes_down for r in recs) and big.outputs


def test_results_option_is_checked(adapter: ModelAdapter) -> None:
    with pytest.raises(EdgeError, match="results must be detections or raw"):
        EdgeRuntime(adapter, "exact", "edge", results="boxes")
    with pytest.raises(EdgeError, match="raw_outputs needs results='raw'"):
        EdgeRuntime(adapter, "exact", "edge", results="detections", raw_outputs=True)
    with pytest.raises(EdgeError, match="reconnect backoff"):
        EdgeRuntime(adapter, "exact", "edge", reconnect_min_s=2.0, reconnect_max_s=1.0)


def wait_for(cond: Any, timeout_s: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_reconnects_to_a_restarted_server_with_a_keyframe(adapter: ModelAdapter, frames: list[MotionFrame],
                                                          server: ServerThread) -> None:
    """The server stops mid-stream; frames run on the edge meanwhile; a new server on the same port (another
    server id: empty caches) is found by the background reconnect, and the next cloud frame is a Keyframe."""
    port = server.port
    with runtime(adapter, server, "cloud", reconnect_min_s=0.05, reconnect_max_s=0.2) as rt:
        recs = [rt.process(mf) for mf in frames[:2]]
        old_id = server.server.server_id
        server.close()
        recs.append(rt.process(frames[2]))  # the channel is dead: edge
        assert not rt.cloud_available and rt.cloud_error is not None
        new = ServerThread(adapter, port=port)
        try:
            assert new.port == port and new.server.server_id != old_id
            assert wait_for(lambda: rt.cloud_available)
            recs += [rt.process(mf) for mf in frames[3:]]
            s = rt.summary()
        finally:
            rt.close()
            new.close()
        server.close = lambda: None  # type: ignore[method-assign]  # already closed
    assert [r.endpoint for r in recs] == ["cloud", "cloud", "edge", "cloud", "cloud", "cloud"]
    assert recs[2].fallback and [r.keyframe for r in recs] == [True, False, False, True, False, False]
    assert all(r.checksum_ok for r in recs[3:])
    assert s["lost_frames"] == 0 and s["resyncs"] == 1 and s["cloud_error"] is None
    assert rt.reconnects == 1 and rt.resumes == 0
    ref = reference(adapter, frames[3:], [mf.index for mf in frames[3:]])  # a fresh server engine from frame 3
    for r in recs[3:]:
        same_results(r, ref[r.index])


def test_reconnect_to_the_same_server_resumes_with_deltas(adapter: ModelAdapter, frames: list[MotionFrame],
                                                          server: ServerThread) -> None:
    """The call drops but the server lives (same server id): it kept the stream, the mirror is still its cache, so
    the next cloud frame is a Delta (no resync) and its outputs are exact."""
    with runtime(adapter, server, "cloud", reconnect_min_s=0.05, reconnect_max_s=0.2) as rt:
        recs = [rt.process(mf) for mf in frames[:2]]
        assert rt._loop is not None
        rt._loop.call_soon_threadsafe(rt._call.cancel)  # the transport drops (from the edge's side)
        assert wait_for(lambda: rt.reconnects == 1 and rt.cloud_available)
        recs += [rt.process(mf) for mf in frames[2:4]]
        s = rt.summary()
    assert rt.resumes == 1 and [r.keyframe for r in recs] == [True, False, False, False]
    assert all(r.endpoint == "cloud" and r.checksum_ok for r in recs) and s["resyncs"] == 0
    ref = reference(adapter, frames[:4], [mf.index for mf in frames[:4]])
    for r in recs:
        same_results(r, ref[r.index])
