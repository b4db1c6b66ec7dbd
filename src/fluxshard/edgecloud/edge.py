"""The edge runtime (seed 000 §III-A/B, Stages 1–4), in-process: per frame, decide edge or cloud, never lose one.

:class:`EdgeRuntime` owns a local :class:`~fluxshard.engine.Engine`, the two dispatch layers (the edge's own and
an exact mirror of the cloud's), the estimators of :mod:`~fluxshard.edgecloud.policy`, and one gRPC stream to a
:class:`~fluxshard.edgecloud.server.CloudServer` driven by an asyncio loop on a background thread, so
:meth:`EdgeRuntime.process` is synchronous: ``MotionFrame`` in, :class:`FrameRecord` out.

Per frame: (1) the frame's field (at engine input resolution) is folded into both layers; (2) each layer's
residual against the current input gives its active fraction; (3) unless the policy is ``edge`` or the cloud is
unavailable, the cloud message is built and encoded now (its size enters the estimate): a Delta from the mirror
(:func:`~fluxshard.edgecloud.payload.build_residual`), or a Keyframe on the first cloud frame and whenever the
mirror is stale; (4) :func:`~fluxshard.edgecloud.policy.decide` picks the endpoint. Cloud: send, wait for the
reply up to ``budget_ms`` (counted from the send); a Result whose checksum is the mirror's updates the mirror and
its raw outputs are post-processed here. NeedKeyframe, a timeout, a checksum disagreement or a dead channel →
the frame is computed on the edge (a *fallback*: the frame is never lost) and the mirror is marked stale, so the
next cloud frame is a Keyframe (a *resync*). A late reply to an abandoned frame is recognised by its seq and
dropped. Edge: the local engine steps with the edge layer's accumulated field (the field from this frame to the
engine's own last input), then the edge layer caches the input.

**Measurements.** Edge compute = ``engine.step`` wall time; with ``edge_slowdown`` F > 1 the runtime then sleeps
(F − 1)× that time — an *emulation* of a slower edge device on the same machine, so the recorded edge compute is
F× the measured one; the estimator is fed the unstretched time and stretches its prediction by F. Cloud: the
server reports compute, queue and rebuild ms with each Result; *transfer* = (reply arrival − send start) − those
three, i.e. uplink + downlink + one RTT, measured on the reply, never on send completion (a write completes when
gRPC buffers it). The link estimator gets an RTT sample from payloads under its ``min_bytes`` and from any
reply whose transfer time is below the RTT estimate (the whole network time bounds the RTT from above), and a
transfer sample (transfer − estimated RTT) from payloads of at least ``min_bytes``. The recorded cloud compute
is server compute + rebuild.

**Results downlink.** ``results="detections"`` (the default) asks the server for compact results
(:mod:`~fluxshard.edgecloud.results`, a few hundred bytes instead of ~MBs of raw float32 heads) and maps them to frame
pixels with the edge's own mapper; ``raw_outputs=True`` (or ``results="raw"``) asks for the raw body outputs, for
verification (``FrameRecord.outputs`` of cloud frames is empty with detections).

**Reconnect.** When the channel dies, later frames run on the edge ("cloud unavailable") while a background task
reconnects with jittered exponential backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``), sending the
same Hello (same stream id). The same ``Welcome.server_id`` as before means the server kept the stream: the mirror
stays valid and Deltas resume (a frame lost in flight is caught by the server's ``base_seq`` check →
NeedKeyframe); another server id means its caches are empty: the mirror is stale, the next cloud frame is a
Keyframe (a resync).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fluxshard.edgecloud import auth, wire
from fluxshard.edgecloud.dispatch import DispatchLayer, input_dtype, input_tensor, integer_input
from fluxshard.edgecloud.payload import PayloadError, build_residual
from fluxshard.edgecloud.policy import (
    POLICIES,
    CloudEstimator,
    EdgeEstimator,
    Endpoint,
    LinkEstimator,
    Scheduler,
    cloud_estimate_ms,
    decide,
)
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.results import decode_results
from fluxshard.edgecloud.server import SERVICE, default_engine_config, result_outputs
from fluxshard.engine import Engine, EngineConfig
from fluxshard.engine.inputs import InputMapper, mapper_for
from fluxshard.engine.profiler import model_hash
from fluxshard.engine.run import results_to_frame
from fluxshard.errors import FluxShardError
from fluxshard.models import ModelAdapter, load_model
from fluxshard.models.base import COCO_CLASSES, Results
from fluxshard.motion import MotionFrame

METHOD = f"/{SERVICE}/Stream"
_MODES = {"exact": pb.ENGINE_MODE_EXACT, "fast": pb.ENGINE_MODE_FAST}
_RESULTS = {"detections": pb.RESULTS_DETECTIONS, "raw": pb.RESULTS_RAW}
_DEAD = object()


class EdgeError(FluxShardError):
    """The edge runtime cannot run as configured (policy, target, model/mode refused by the server)."""


@dataclass
class Latency:
    """One frame's latency split, ms. Cloud: encode (build + serialize), transfer (network, incl. one RTT), queue
    (server), compute (server compute + rebuild). Edge: compute (stretched by ``edge_slowdown``)."""

    encode_ms: float = 0.0
    transfer_ms: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.transfer_ms + self.queue_ms + self.compute_ms


@dataclass
class FrameRecord:
    """What happened to one frame. ``endpoint`` computed the results; ``decided`` is what the policy chose (they
    differ on a fallback). ``checksum_ok`` is None when no Result came back."""

    index: int
    endpoint: Endpoint
    decided: Endpoint
    reason: str
    fallback: bool
    keyframe: bool  # a Keyframe (not a Delta) was sent for this frame
    bytes_up: int
    bytes_down: int
    active_edge: float  # residual fraction against the edge layer
    active_cloud: float  # against the cloud mirror (1.0 for a keyframe)
    predicted: Latency
    measured: Latency
    latency_ms: float  # wall time of ``process`` for this frame
    estimate_error_ms: float | None  # |predicted − measured| of the endpoint that was decided (None: fallback)
    checksum_ok: bool | None
    results: Results
    outputs: list[np.ndarray] = field(repr=False, default_factory=list)  # raw body outputs, float32

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row (no outputs; results summarised as a count)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("outputs", "results", "predicted", "measured")}
        d["predicted"] = {**asdict(self.predicted), "total_ms": self.predicted.total_ms}
        d["measured"] = {**asdict(self.measured), "total_ms": self.measured.total_ms}
        d["results"] = len(self.results)
        return d


def _numpy(outs: Any) -> list[np.ndarray]:
    tensors = outs if isinstance(outs, list | tuple) else (outs,)
    return [np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy()) for t in tensors]


class EdgeRuntime:
    """The edge endpoint. ``model``: registry name or adapter; ``mode``: exact | fast; ``policy``: auto | edge |
    cloud or a :class:`~fluxshard.edgecloud.policy.Scheduler`; ``target``: the server's host:port (None: no
    cloud); TLS with ``ca_file`` (+ ``token``) or plaintext with ``insecure``; ``budget_ms``: per-frame budget
    (a cloud estimate above it, or a reply later than it, sends the frame to the edge); ``edge_slowdown``: F ≥ 1
    (emulated slower edge, see the module docstring); ``link_mbps`` / ``link_rtt_ms``: the link estimator's
    prior; ``engine_config``: the local engine's (default: the server's default for the mode — no calibration,
    no cost guard, so results are deterministic); ``dense_ms``: estimator seed (default: one dense pass timed
    on the first frame); ``factor``: input reduction (default: fit 640 px); ``results``: detections | raw
    (what a cloud Result carries; default detections, raw when ``raw_outputs``); ``reconnect`` with
    ``reconnect_min_s`` / ``reconnect_max_s``: background reconnect backoff (see the module docstring).

    Test hook: ``on_delta(msg)`` may edit each outgoing Delta before it is serialized (e.g. tamper with it)."""

    def __init__(
        self,
        model: str | ModelAdapter = "nanodet",
        mode: str = "exact",
        policy: str | Scheduler = "auto",
        target: str | None = None,
        *,
        insecure: bool = False,
        ca_file: str | Path | None = None,
        token: str | None = None,
        stream_id: str | None = None,
        factor: int | None = None,
        budget_ms: float = 1000.0,
        edge_slowdown: float = 1.0,
        link_mbps: float = 50.0,
        link_rtt_ms: float = 20.0,
        engine_config: EngineConfig | None = None,
        dense_ms: float | None = None,
        connect_timeout_s: float = 10.0,
        results: str | None = None,
        raw_outputs: bool = False,
        reconnect: bool = True,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 5.0,
    ) -> None:
        if mode not in _MODES:
            raise EdgeError(f"mode must be exact or fast, not {mode!r}")
        if isinstance(policy, str) and policy not in POLICIES:
            raise EdgeError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if policy == "cloud" and target is None:
            raise EdgeError("policy cloud needs a server target (host:port)")
        if target is not None and ca_file is None and not insecure:
            raise EdgeError("no TLS CA given: pass ca_file, or insecure=True for plaintext")
        if not (math.isfinite(budget_ms) and budget_ms > 0):
            raise EdgeError(f"budget_ms must be a positive number, got {budget_ms}")
        if not (math.isfinite(edge_slowdown) and edge_slowdown >= 1.0):
            raise EdgeError(f"edge_slowdown must be ≥ 1, got {edge_slowdown}")
        if results is None:
            results = "raw" if raw_outputs else "detections"
        if results not in _RESULTS:
            raise EdgeError(f"results must be detections or raw, not {results!r}")
        if raw_outputs and results != "raw":
            raise EdgeError("raw_outputs needs results='raw' (raw outputs are not sent with detections)")
        if not (0 < reconnect_min_s <= reconnect_max_s):
            raise EdgeError(f"reconnect backoff needs 0 < reconnect_min_s ≤ reconnect_max_s, got "
                            f"{reconnect_min_s}, {reconnect_max_s}")
        self.adapter = load_model(model) if isinstance(model, str) else model
        if not hasattr(self.adapter, "postprocess_input"):
            raise EdgeError(f"model {self.adapter.name!r} cannot run at native input resolution "
                            "(needs postprocess_input)")
        self.mode, self.policy, self.target = mode, policy, target
        self.insecure, self.ca_file, self.token = insecure, ca_file, token
        self.stream_id = stream_id or f"edge-{secrets.token_hex(4)}"
        self.factor = factor
        self.budget_ms = float(budget_ms)
        self.edge_slowdown = float(edge_slowdown)
        self.link_prior = (float(link_mbps), float(link_rtt_ms))
        self.config = engine_config or default_engine_config(self.adapter.name, mode)
        self.dense_ms = dense_ms
        self.connect_timeout_s = float(connect_timeout_s)
        self.results_kind = results
        self.reconnect = reconnect
        self.reconnect_backoff_s = (float(reconnect_min_s), float(reconnect_max_s))
        self.reconnects = 0  # successful reconnects
        self.resumes = 0  # of which the server still held the stream (same server id)
        self.on_delta: Callable[[pb.EdgeMessage], None] | None = None
        self.records: list[FrameRecord] = []
        self.resyncs = 0
        self.cloud_error: str | None = None  # why the cloud became unavailable
        # built on the first frame (the input size comes from it)
        self.mapper: InputMapper | None = None
        self.engine: Engine | None = None
        self.edge_layer: DispatchLayer | None = None
        self.cloud_layer: DispatchLayer | None = None
        self.edge_est: EdgeEstimator | None = None
        self.cloud_est: CloudEstimator | None = None
        self.link = LinkEstimator(*self.link_prior)
        self._stale = True  # the next cloud frame must be a Keyframe
        self._keyframes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._replies: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = False
        self._hello: pb.Hello | None = None
        self._server_id: str | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False

    # -------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def cloud_available(self) -> bool:
        return self._connected and self.cloud_error is None

    def close(self) -> None:
        """Bye (if the stream is up), close the channel, stop the I/O thread. Idempotent."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):  # closing must not raise over a broken link
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5.0)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)
        loop.close()
        self._loop, self._thread = None, None

    async def _shutdown(self) -> None:
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
        if self._call is not None and self.cloud_error is None:
            with contextlib.suppress(Exception):
                bye = pb.EdgeMessage(bye=pb.Bye(reason="done")).SerializeToString()
                await asyncio.wait_for(self._call.write(bye), 1.0)
                await asyncio.wait_for(self._call.done_writing(), 1.0)
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._connected = False

    def _setup(self, frame_hw: tuple[int, int]) -> None:
        """First frame: mapper, engine, layers, estimators; then the stream to the server (if any)."""
        try:
            self.mapper = mapper_for(self.adapter, frame_hw, self.factor)
        except ValueError as exc:
            raise EdgeError(f"factor {self.factor}: {exc}") from exc
        self.engine = Engine(self.adapter.body, self.mapper.input_hw, self.config)
        tau = self.config.tau_in if self.mode == "fast" else 0.0
        self.edge_layer = DispatchLayer.for_mapper(self.mapper, tau)
        self.cloud_layer = DispatchLayer.for_mapper(self.mapper, tau)
        if self.dense_ms is None:
            x = torch.zeros((1, 3, *self.mapper.input_hw)).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                self.adapter.body(x)  # warm-up
                t0 = time.perf_counter()
                self.adapter.body(x)
                self.dense_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        self.edge_est = EdgeEstimator(self.dense_ms, self.edge_slowdown)
        self.cloud_est = CloudEstimator(self.dense_ms)
        if self.target is not None and self.policy != "edge":
            self._connect()

    def _connect(self) -> None:
        assert self.mapper is not None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fluxshard-edge-io", daemon=True)
        self._thread.start()
        x_shape = (*self.mapper.input_hw, 3)
        self._hello = pb.Hello(protocol_version=wire.PROTOCOL_VERSION, stream_id=self.stream_id,
                               model_name=self.adapter.name, model_hash=model_hash(self.adapter.body),
                               mode=_MODES[self.mode], input_shape=x_shape,
                               input_dtype=input_dtype(self.mapper).name, block_size=self.mapper.input_block,
                               payload_kind=pb.PAYLOAD_KIND_RESIDUAL, results=_RESULTS[self.results_kind],
                               input_factor=self.mapper.factor)
        fut = asyncio.run_coroutine_threadsafe(self._open(self._hello), self._loop)
        reply = fut.result(self.connect_timeout_s + 5.0)
        if isinstance(reply, pb.CloudMessage) and reply.WhichOneof("body") == "error":
            raise EdgeError(f"server {self.target} refused the stream: {reply.error.message}")
        if reply is None:  # unreachable for now: frames run on the edge while it retries
            asyncio.run_coroutine_threadsafe(self._lost_async(self.cloud_error or "unreachable"), self._loop)

    async def _lost_async(self, why: str) -> None:
        self._lost(why)

    def _lost(self, why: str) -> None:
        """(I/O thread) The channel died: later frames go to the edge; start reconnecting unless already."""
        self._connected = False
        self.cloud_error = why
        if self.reconnect and not self._closing and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Retry Hello (same stream id) with jittered exponential backoff until it is welcomed or we close."""
        assert self._hello is not None
        delay, cap = self.reconnect_backoff_s
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            await self._drop_call()
            reply = await self._open(self._hello)
            if self._connected:
                self.reconnects += 1
                return
            if isinstance(reply, pb.CloudMessage) and reply.WhichOneof("body") == "error":
                return  # refused (not unreachable): retrying would be refused again
            delay = min(delay * 2.0, cap)

    async def _drop_call(self) -> None:
        """Forget the dead call and channel (their reader must not report the new call dead)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None

    async def _open(self, hello: pb.Hello) -> pb.CloudMessage | None:
        try:
            self._channel = auth.open_channel(self.target or "", ca_file=self.ca_file, token=self.token,
                                              insecure=self.ca_file is None)
            md = auth.token_metadata(self.token) if self.ca_file is None else ()
            self._call = self._channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                                     response_deserializer=lambda b: b)(metadata=md)
            await asyncio.wait_for(self._call.write(pb.EdgeMessage(hello=hello).SerializeToString()),
                                   self.connect_timeout_s)
            data = await asyncio.wait_for(self._call.read(), self.connect_timeout_s)
        except (grpc.RpcError, TimeoutError, OSError) as exc:
            self.cloud_error = f"cannot reach {self.target}: {_why(exc)}"
            return None
        if data is grpc.aio.EOF:
            self.cloud_error = f"{self.target} closed the stream at Hello"
            return None
        msg = wire.parse_cloud_message(data)
        if msg.WhichOneof("body") != "welcome":
            self.cloud_error = f"{self.target} answered Hello with {msg.WhichOneof('body')}"
            return msg
        sid = msg.welcome.server_id
        if self._server_id is not None:
            if sid == self._server_id:
                self.resumes += 1  # the server kept the stream: the mirror is still its cache
            else:
                self._stale = True  # a restarted server: empty caches, the next cloud frame is a Keyframe
        self._server_id = sid
        self._replies = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(self._call))
        self.cloud_error = None
        self._connected = True  # last: the frame thread may use the stream from here on
        return msg

    async def _read(self, call: Any) -> None:
        """Every reply, stamped on arrival, into the queue; the end of the stream as ``_DEAD`` (and a reconnect)."""
        assert self._replies is not None
        replies = self._replies
        why = "the server closed the stream"
        try:
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    break
                now = time.perf_counter()
                try:
                    msg = wire.parse_cloud_message(data)
                except wire.WireError as exc:
                    why = f"malformed reply: {exc}"
                    break
                await replies.put((msg, len(data), now))
        except grpc.RpcError as exc:
            why = _why(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # we stopped reading (drop, close)
                raise
            why = "the call was cancelled"  # the call itself (transport) was cancelled under us
        await replies.put((_DEAD, why))
        if call is self._call:
            self._lost(why)

    async def _exchange(self, data: bytes, seq: int, timeout_s: float) -> tuple[Any, int, float, float]:
        """Send one frame's message, wait for its reply (Result or NeedKeyframe of ``seq``, or an Error).
        Returns (reply | "timeout" | ("dead", why), bytes down, send start, arrival)."""
        t0 = time.perf_counter()
        if not self._connected or self._replies is None or self._call is None:  # died since the frame looked
            return ("dead", self.cloud_error or "not connected"), 0, t0, t0
        replies = self._replies
        deadline = t0 + timeout_s
        try:  # a write only blocks under flow control: one stuck for the connect timeout means a dead link
            await asyncio.wait_for(self._call.write(data), self.connect_timeout_s)
        except TimeoutError:
            why = f"send blocked for {self.connect_timeout_s:g} s"
            self._lost(why)
            return ("dead", why), 0, t0, time.perf_counter()
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            self._lost(_why(exc))
            return ("dead", _why(exc)), 0, t0, time.perf_counter()
        while True:
            try:
                item = await asyncio.wait_for(replies.get(), max(deadline - time.perf_counter(), 0.0))
            except TimeoutError:
                return "timeout", 0, t0, time.perf_counter()
            if item[0] is _DEAD:
                await replies.put(item)  # stays dead for every later wait
                return ("dead", item[1]), 0, t0, time.perf_counter()
            msg, nbytes, arrived = item
            kind = msg.WhichOneof("body")
            if kind == "error":
                why = f"server error: {msg.error.message}"
                self._lost(why)
                return ("dead", why), nbytes, t0, arrived
            got = msg.result.seq if kind == "result" else msg.need_keyframe.seq if kind == "need_keyframe" else None
            if got == seq:
                return msg, nbytes, t0, arrived
            # a late reply to a frame already given up on: drop it

    # -------------------------------------------------------------------------------------------- per frame
    def process(self, frame: MotionFrame) -> FrameRecord:
        """Run one frame on the edge or the cloud (Stages 1–4); always returns its results."""
        start = time.perf_counter()
        rgb = frame.frame.rgb
        if self.mapper is None:
            self._setup((int(rgb.shape[0]), int(rgb.shape[1])))
        assert self.mapper and self.edge_layer and self.cloud_layer and self.edge_est and self.cloud_est
        seq = int(frame.index)
        x = integer_input(self.mapper, rgb)
        fld = self.mapper.field(frame.field)
        # Stage 1: fold the field into both layers (a layer without a cache has nothing to align)
        for layer in (self.edge_layer, self.cloud_layer):
            if layer.cache is not None:
                layer.fold(fld)
        active_edge = 1.0 if self.edge_layer.cache is None else self.edge_layer.align(x).active_fraction
        edge_ms = self.edge_est.predict(active_edge)
        # Stages 2–3: the cloud message and its estimate, unless the cloud is out of the question
        msg_bytes, payload_rebuilt, checksum, keyframe, active_cloud = b"", None, "", False, 1.0
        predicted_cloud = Latency()
        cloud_ms = math.inf
        want_cloud = self.policy != "edge" and self.cloud_available
        if want_cloud:
            t0 = time.perf_counter()
            msg_bytes, payload_rebuilt, checksum, keyframe, active_cloud = self._cloud_message(x, seq)
            enc_ms = (time.perf_counter() - t0) * 1e3
            predicted_cloud = Latency(enc_ms, self.link.transfer_ms(len(msg_bytes)) + self.link.rtt_ms,
                                      self.cloud_est.queue_ms, self.cloud_est.fit.predict(active_cloud))
            cloud_ms = cloud_estimate_ms(len(msg_bytes), self.link, self.cloud_est, active_cloud)
        d = decide(self.policy, edge_ms, cloud_ms,
                   cloud_available=want_cloud, budget_ms=self.budget_ms,
                   extra={"active_edge": active_edge, "active_cloud": active_cloud, "bytes": len(msg_bytes),
                          "seq": seq})
        predicted = Latency(compute_ms=edge_ms) if d.endpoint == "edge" else predicted_cloud
        # Stage 4
        reason, fallback, outputs = d.reason, False, None
        bytes_up = bytes_down = 0
        checksum_ok: bool | None = None
        cloud_results: Results | None = None
        measured = Latency()
        if d.endpoint == "cloud":
            bytes_up = len(msg_bytes)
            measured.encode_ms = predicted_cloud.encode_ms
            if keyframe:
                self._keyframes += 1
                self.resyncs += self._keyframes > 1
            outcome = self._send(msg_bytes, seq)
            reply, bytes_down, sent, arrived = outcome
            if isinstance(reply, pb.CloudMessage) and reply.WhichOneof("body") == "result":
                r = reply.result
                checksum_ok = r.checksum == checksum
                if checksum_ok:
                    server_ms = r.compute_ms + r.queue_ms + r.rebuild_ms
                    measured.transfer_ms = max((arrived - sent) * 1e3 - server_ms, 0.0)
                    measured.queue_ms, measured.compute_ms = r.queue_ms, r.compute_ms + r.rebuild_ms
                    self._observe_cloud(bytes_up, active_cloud, measured.transfer_ms, r)
                    assert payload_rebuilt is not None
                    self.cloud_layer.update(payload_rebuilt, seq=seq)
                    self._stale = False
                    if self.results_kind == "raw":
                        outputs = [np.require(o, requirements="W") for o in result_outputs(r)]  # torch: writable
                    else:
                        cloud_results = decode_results(r, class_names=getattr(self.adapter, "class_names",
                                                                              COCO_CLASSES))
                        outputs = []
                else:
                    fallback, reason = True, f"fallback: result checksum {r.checksum} != mirror's {checksum}"
            elif isinstance(reply, pb.CloudMessage):  # NeedKeyframe
                nk = reply.need_keyframe
                fallback = True
                reason = f"fallback: need keyframe ({pb.NeedKeyframe.Reason.Name(nk.reason)}: {nk.detail})"
            elif reply == "timeout":
                fallback, reason = True, f"fallback: no reply within {self.budget_ms:g} ms"
            else:  # the I/O thread already marked the cloud lost and is reconnecting
                fallback, reason = True, f"fallback: cloud lost ({reply[1]})"
            if fallback and not isinstance(reply, tuple):
                self._stale = True  # a dead channel keeps the mirror: a resume may still use it
        endpoint: Endpoint = "cloud" if outputs is not None else "edge"
        if outputs is None:
            outputs, measured.compute_ms = self._edge_step(x, active_edge)
        if not fallback and d.reason == "cloud unavailable" and self.policy != "edge" and self.target is not None:
            fallback = True  # the policy wanted the cloud (or might have): it could not serve this frame
        if cloud_results is None:
            cloud_results = self.adapter.postprocess_input([torch.from_numpy(o) for o in outputs],
                                                           self.mapper.input_hw)
        results = results_to_frame(cloud_results, self.mapper)
        err = None
        if not fallback:
            pred = d.edge_ms if endpoint == "edge" else d.cloud_ms
            got = measured.compute_ms if endpoint == "edge" else measured.total_ms - measured.encode_ms
            err = abs(pred - got)
        rec = FrameRecord(seq, endpoint, d.endpoint, reason, fallback, keyframe and d.endpoint == "cloud", bytes_up,
                          bytes_down, active_edge, active_cloud, predicted, measured,
                          (time.perf_counter() - start) * 1e3, err, checksum_ok, results, outputs)
        self.records.append(rec)
        return rec

    def _cloud_message(self, x: np.ndarray, seq: int) -> tuple[bytes, np.ndarray, str, bool, float]:
        """(serialized message, the input the server will rebuild, its checksum, keyframe?, active fraction)."""
        assert self.cloud_layer is not None
        if not self._stale and self.cloud_layer.cache is not None:
            try:
                p = build_residual(self.cloud_layer, x, stream_id=self.stream_id, seq=seq)
            except PayloadError:
                pass  # e.g. motion beyond int16: resync with a keyframe
            else:
                msg = pb.EdgeMessage(delta=pb.Delta(
                    seq=p.seq, base_seq=p.base_seq, dy=wire.encode_tensor(p.dy), dx=wire.encode_tensor(p.dx),
                    valid=wire.encode_tensor(p.valid), block_indices=wire.encode_tensor(p.indices),
                    pixels=wire.encode_tensor(p.pixels), checksum=p.checksum))
                if self.on_delta is not None:
                    self.on_delta(msg)
                assert p.rebuilt is not None
                active = p.indices.size / max(p.valid.size, 1)
                return msg.SerializeToString(), p.rebuilt, p.checksum, False, active
        c = wire.checksum(x)
        msg = pb.EdgeMessage(keyframe=pb.Keyframe(seq=seq, input=wire.encode_tensor(x), checksum=c))
        return msg.SerializeToString(), x, c, True, 1.0

    def _send(self, data: bytes, seq: int) -> tuple[Any, int, float, float]:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._exchange(data, seq, self.budget_ms / 1e3), self._loop)
        return fut.result()

    def _observe_cloud(self, nbytes: int, active: float, transfer_ms: float, r: pb.Result) -> None:
        assert self.cloud_est is not None
        self.cloud_est.observe(active, r.compute_ms + r.rebuild_ms, r.queue_ms)
        if nbytes < self.link.min_bytes or transfer_ms < self.link.rtt_ms:  # the network time bounds the RTT
            self.link.observe_rtt(transfer_ms)
        if nbytes >= self.link.min_bytes:
            self.link.observe_transfer(nbytes, max(transfer_ms - self.link.rtt_ms, 0.0) / 1e3)

    def _edge_step(self, x: np.ndarray, active: float) -> tuple[list[np.ndarray], float]:
        """The local engine on ``x`` with the edge layer's accumulated field; returns outputs and the (stretched)
        compute ms."""
        assert self.engine and self.edge_layer and self.mapper and self.edge_est
        fld = None if self.edge_layer.cache is None else self.edge_layer.field.copy()
        t0 = time.perf_counter()
        out, _ = self.engine.step(input_tensor(self.mapper, x), fld)
        compute_s = time.perf_counter() - t0
        if self.edge_slowdown > 1.0:
            time.sleep((self.edge_slowdown - 1.0) * compute_s)  # emulated slower device
        self.edge_est.observe(active, compute_s * 1e3)
        self.edge_layer.update(x, seq=None)
        return _numpy(out), compute_s * 1e3 * self.edge_slowdown

    # -------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        recs = self.records
        lat = [r.latency_ms for r in recs]
        errs = [r.estimate_error_ms for r in recs if r.estimate_error_ms is not None]
        up = [r.bytes_up for r in recs]
        cloud_up = [r.bytes_up for r in recs if r.bytes_up]
        return {
            "frames": len(recs),
            "frames_edge": sum(r.endpoint == "edge" for r in recs),
            "frames_cloud": sum(r.endpoint == "cloud" for r in recs),
            "frames_fallback": sum(r.fallback for r in recs),
            "lost_frames": sum(r.results is None for r in recs),
            "keyframes": sum(r.keyframe for r in recs),
            "resyncs": self.resyncs,
            "uplink_bytes_total": int(sum(up)),
            "uplink_bytes_per_frame_median": _median(up),
            "uplink_bytes_per_cloud_message_median": _median(cloud_up),
            "downlink_bytes_total": int(sum(r.bytes_down for r in recs)),
            "latency_ms_median": _median(lat),
            "latency_ms_p95": float(np.percentile(lat, 95)) if lat else None,
            "estimate_error_median": _median(errs),
            "cloud_error": self.cloud_error,
        }


def _median(xs: Sequence[float]) -> float | None:
    return float(np.median(xs)) if len(xs) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


