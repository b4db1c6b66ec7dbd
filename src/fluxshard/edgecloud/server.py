"""The cloud server: one gRPC bidirectional stream per video stream, a receive layer and an engine per stream.

**Stream state machine** (Triton-sequence style, keyed by the Hello's ``stream_id``):

* ``Hello`` — protocol version, model name and weights hash, mode, integer input shape/dtype and block size are
  checked (mismatch → ``Error``, the call ends). A new id gets a state: an :class:`~fluxshard.engine.Engine` of
  the server's body at that input and mode, an empty input cache and ``cache_seq``; an id whose state is still
  held with the same parameters *resumes* it (a reconnecting edge keeps sending Deltas, no keyframe); ``Welcome``
  carries a per-process ``server_id`` so the edge knows when a restart emptied every cache.
* ``Keyframe`` — decoded, checksum verified, cached at ``seq``; the engine resets and runs a dense step.
* ``Delta`` — ``base_seq`` must equal ``cache_seq`` (else ``NeedKeyframe(sequence_gap)``); the receive layer
  (:func:`~fluxshard.edgecloud.payload.apply_residual`) rebuilds the input, whose checksum must equal the edge's
  (else ``NeedKeyframe(checksum_mismatch)``, the cache is kept); the engine steps with the Delta's accumulated
  field (the one the edge's mirror of the cloud layer used) and the rebuilt input becomes the cache.
* No cache: ``NeedKeyframe(unknown_stream)``, or ``(evicted)`` when the idle sweeper dropped it (a state idle
  longer than ``idle_timeout_s`` loses its engine and cache, open call or not). A Keyframe resyncs either.
* ``Packets`` (bitstream streams: Hello ``payload_kind`` bitstream with its ``codec``) — ``base_seq`` must equal the
  last Packets seq the decoder took, unless the packets start at a keyframe (a resync restarts the decoder);
  :class:`~fluxshard.edgecloud.bitstream.BitstreamDecoder` decodes them; ``decode_only`` only advances it (no
  inference, no reply); otherwise the frame with the message's checksum is the input and the engine steps with the
  message's field when it starts at ``cache_seq`` (else dense); any
  :class:`~fluxshard.edgecloud.bitstream.BitstreamError` → ``NeedKeyframe`` with its reason (decoder reset).
  Keyframes and Deltas are also accepted on a bitstream stream (the edge's alternative resync).
* ``Bye`` ends the call and frees the state; a call that just drops keeps it for a resume until evicted.
* Malformed messages (:class:`~fluxshard.edgecloud.wire.WireError`) → ``Error(malformed_message)`` and that call
  ends; other streams are unaffected. Every ``Error`` ends its call.

Requests arrive as raw bytes (no gRPC deserializer), so even garbage that is not protobuf gets a clean
``Error`` instead of a transport failure. Each call has a reader task feeding a bounded queue (``queue_size``:
beyond it gRPC flow control pushes back) and a loop that hands one message at a time to the server's single
inference thread, so the event loop keeps reading, answering health checks and accepting streams while a frame
computes. ``queue_ms`` = arrival (parsed) → picked up by the inference thread; ``rebuild_ms`` = decode +
receive layer + checksum; ``compute_ms`` = ``engine.step`` and output encoding is not counted.

**Results.** ``Hello.results`` RAW (default): the body's raw outputs ``out0``, ``out1``, ...; DETECTIONS: the
adapter's ``postprocess_input`` in engine-input pixels, encoded by :mod:`fluxshard.edgecloud.results` (cup,
NanoDet at 640x480: 2.75 MB RAW vs ~210 B DETECTIONS per Result, ``tests/test_edgecloud_results.py``).

**Engine input.** Frames travel in the dispatch layers' integer form (:func:`~fluxshard.edgecloud.dispatch.
integer_input`): uint8 pixels, or uint16 f×f box sums. The server turns them into the body's float input with
:func:`~fluxshard.edgecloud.dispatch.input_tensor` and the model's own affine (``mapper_for``). The reduction
factor f comes in ``Hello.input_factor`` (the frame-level motion block is then ``block_size · f``); 0 (an older
edge) falls back to inferring it: ``16 / block_size`` for uint16 sums (the frame-level block is 16 px, the input
block 16/f; a block that does not divide 16 is refused), 1 for uint8. A bitstream stream's mapper starts from the
codec's frame size, so the server converts decoded frames exactly as the edge does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fluxshard.edgecloud import auth, wire
from fluxshard.edgecloud.bitstream import BitstreamDecoder, BitstreamError, CodecParams, from_packets_message
from fluxshard.edgecloud.dispatch import input_dtype, input_tensor
from fluxshard.edgecloud.payload import PayloadError, ResidualPayload, apply_residual
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.results import encode_results
from fluxshard.engine import Engine, EngineConfig
from fluxshard.engine.engine import default_profile
from fluxshard.engine.inputs import InputMapper, mapper_for
from fluxshard.engine.profiler import model_hash
from fluxshard.errors import FluxShardError
from fluxshard.models import ModelAdapter, load_model
from fluxshard.motion.field import MotionField, grid_shape

SERVICE = "fluxshard.edgecloud.v1.Inference"
FRAME_BLOCK = 16  # frame-level motion block (px) the edge's mapper uses; the input block is FRAME_BLOCK / f
MODES = ("exact", "fast")
_MODE_NAMES = {pb.ENGINE_MODE_EXACT: "exact", pb.ENGINE_MODE_FAST: "fast"}
_EVICTED_MEMORY = 4096  # evicted stream ids remembered, so a late Delta hears "evicted", not "unknown"
_EOF = object()
NK = pb.NeedKeyframe


class ServerError(FluxShardError):
    """The server cannot start as configured (security flags, bind address, model)."""


def default_engine_config(model: str, mode: str) -> EngineConfig:
    """Exact: the engine's defaults. Fast: the model's shipped profile (as `fluxshard run` without flags), else
    flat thresholds. No calibration and no cost guard: the Python API's results do not depend on timing."""
    if mode == "exact":
        return EngineConfig()
    profile = default_profile(model)
    return EngineConfig.from_file(profile) if profile else EngineConfig(mode="fast", tau_in=0.01,
                                                                        default_threshold=0.05)


def output_names(n: int) -> list[str]:
    """Names of a body's raw outputs in a Result, in the body's order (``out0``, ``out1``, ...)."""
    return [f"out{i}" for i in range(n)]


def result_outputs(result: pb.Result, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> list[np.ndarray]:
    """A Result's raw body outputs as float32 arrays, in the body's order (what ``postprocess`` takes)."""
    names = sorted(result.outputs, key=lambda s: (len(s), s))
    return [wire.decode_tensor(result.outputs[n], max_bytes=limits.max_decoded_bytes, field=f"result.{n}")
            for n in names]


class _Reply(Exception):
    """Raised inside a handler: answer ``msg``; ``end`` closes the call (every Error does)."""

    def __init__(self, msg: pb.CloudMessage, end: bool = True) -> None:
        super().__init__()
        self.msg, self.end = msg, end


def _error(code: int, text: str) -> _Reply:
    return _Reply(pb.CloudMessage(error=pb.Error(code=code, message=text[: wire.MAX_TEXT_CHARS])))


def _need(seq: int, reason: int, detail: str) -> _Reply:
    nk = pb.NeedKeyframe(seq=seq, reason=reason, detail=detail[: wire.MAX_TEXT_CHARS])
    return _Reply(pb.CloudMessage(need_keyframe=nk), end=False)


@dataclasses.dataclass(eq=False)
class _Stream:
    """Server-side state of one video stream (survives a reconnect until evicted or Bye)."""

    stream_id: str
    params: tuple[Any, ...]  # what a resuming Hello must repeat
    hello: pb.Hello
    mapper: InputMapper
    engine: Engine | None = None
    decoder: BitstreamDecoder | None = None  # bitstream streams only
    packets_seq: int | None = None  # last Packets seq the decoder took
    decoder_lost: int = NK.REASON_UNKNOWN_STREAM  # why the decoder has no state
    cache: np.ndarray | None = None
    cache_seq: int | None = None
    lost: int = NK.REASON_UNKNOWN_STREAM  # why there is no cache (unknown stream, or evicted)
    owner: object | None = None  # the call currently driving it
    busy: bool = False
    evicted: bool = False
    last_active: float = dataclasses.field(default_factory=time.monotonic)


class _Call:
    """One gRPC call: its Hello, its stream state."""

    def __init__(self) -> None:
        self.hello: pb.Hello | None = None
        self.stream: _Stream | None = None


class CloudServer:
    """FluxShard's cloud endpoint (``fluxshard serve``), usable in-process: ``await start()`` / ``await
    stop(grace)``, or ``serve_forever()`` until SIGTERM/SIGINT. ``model`` is a registry name or an adapter (tests
    inject small bodies); ``modes`` the engine modes it accepts; ``engine_config(mode)`` the configuration of a
    stream's engine (default: :func:`default_engine_config`). Plaintext only with ``insecure=True``."""

    def __init__(
        self,
        model: str | ModelAdapter = "nanodet",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        modes: tuple[str, ...] = MODES,
        engine_config: Callable[[str], EngineConfig] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        insecure: bool = False,
        max_streams: int = 8,
        idle_timeout_s: float = 60.0,
        queue_size: int = 4,
        limits: wire.WireLimits = wire.DEFAULT_LIMITS,
    ) -> None:
        if insecure and (tls_cert or tls_key):
            raise ServerError("--insecure and --tls-cert/--tls-key exclude each other")
        if not insecure and not (tls_cert and tls_key):
            raise ServerError("TLS needs both --tls-cert and --tls-key (or --insecure for plaintext)")
        if not set(modes) <= set(MODES) or not modes:
            raise ServerError(f"modes must be a non-empty subset of {MODES}, got {modes}")
        if max_streams < 1 or queue_size < 1 or not idle_timeout_s > 0:
            raise ServerError("max_streams and queue_size must be ≥ 1 and idle_timeout_s > 0")
        self.adapter = load_model(model) if isinstance(model, str) else model
        self.model_name = self.adapter.name
        self.model_hash = model_hash(self.adapter.body)
        self.host, self.port = host, port
        self.modes = tuple(modes)
        self._engine_config = engine_config or (lambda m: default_engine_config(self.model_name, m))
        self._tls = (tls_cert, tls_key) if not insecure else None
        self._token = token
        self.max_streams = max_streams
        self.idle_timeout_s = float(idle_timeout_s)
        self.queue_size = queue_size
        self.limits = limits
        self.server_id = secrets.token_hex(8)
        self.streams: dict[str, _Stream] = {}  # held states (engines), at most max_streams
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self.interceptor = auth.TokenInterceptor(token) if token else None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Bind, start serving, mark the health service SERVING; returns the bound port."""
        creds = auth.server_credentials(*self._tls) if self._tls else None  # type: ignore[arg-type]
        server = grpc.aio.server(options=wire.server_options(self.limits),
                                 interceptors=[self.interceptor] if self.interceptor else None)
        handler = grpc.stream_stream_rpc_method_handler(
            self._handle, request_deserializer=None, response_serializer=pb.CloudMessage.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError as exc:
            port = 0
            why = str(exc)
        else:
            why = "address in use or not local"
        if not port:
            raise ServerError(f"cannot listen on {address}: {why}")
        self.port = port
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fluxshard-infer")
        await server.start()
        self._server = server
        for name in ("", SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep())
        return port

    async def stop(self, grace: float | None = 2.0) -> None:
        """NOT_SERVING, then stop accepting; open calls get ``grace`` seconds to finish."""
        if self._server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._server.stop(grace)
        self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.streams.clear()

    def serve_forever(self, on_ready: Callable[[str, int], None] | None = None, grace: float = 2.0) -> None:
        """Start, call ``on_ready(host, port)``, serve until SIGTERM/SIGINT, stop gracefully."""

        async def main() -> None:
            await self.start()
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, done.set)
            if on_ready is not None:
                on_ready(self.host, self.port)
            await done.wait()
            await self.stop(grace)

        asyncio.run(main())

    # -------------------------------------------------------------------------------------------- eviction
    async def _sweep(self) -> None:
        period = min(1.0, self.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for st in list(self.streams.values()):
                if not st.busy and now - st.last_active > self.idle_timeout_s:
                    self._evict(st)

    def _evict(self, st: _Stream) -> None:
        """Drop the engine and cache (the heavy part); a call still holding ``st`` hears "evicted"."""
        st.engine, st.cache, st.cache_seq = None, None, None
        if st.decoder is not None:
            st.decoder.reset()
        st.packets_seq, st.decoder_lost = None, NK.REASON_EVICTED
        st.lost, st.evicted = NK.REASON_EVICTED, True
        if self.streams.get(st.stream_id) is st:
            del self.streams[st.stream_id]
        self._evicted[st.stream_id] = None
        self._evicted.move_to_end(st.stream_id)
        while len(self._evicted) > _EVICTED_MEMORY:
            self._evicted.popitem(last=False)

    def _admit(self, st: _Stream) -> None:
        """Give ``st`` a slot: detached states (no open call) make room, oldest first; else resource_exhausted."""
        if len(self.streams) >= self.max_streams:
            for other in sorted(self.streams.values(), key=lambda s: s.last_active):
                if other.owner is None and not other.busy:
                    self._evict(other)
                if len(self.streams) < self.max_streams:
                    break
        if len(self.streams) >= self.max_streams:
            raise _error(pb.Error.CODE_RESOURCE_EXHAUSTED, f"server busy: {self.max_streams} streams already open")
        st.evicted = False
        self.streams[st.stream_id] = st

    # -------------------------------------------------------------------------------------------- one call
    async def _handle(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[pb.CloudMessage]:
        queue: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        reader = asyncio.create_task(self._read(requests, queue))
        call = _Call()
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                if isinstance(item, wire.WireError):
                    yield pb.CloudMessage(error=pb.Error(code=pb.Error.CODE_MALFORMED_MESSAGE,
                                                         message=str(item)[: wire.MAX_TEXT_CHARS]))
                    return
                msg, kind, arrived = item
                try:
                    if kind == "bye":
                        self._bye(call)
                        return
                    reply = await self._dispatch(call, msg, kind, arrived)
                except _Reply as r:
                    yield r.msg
                    if r.end:
                        return
                else:
                    if reply is not None:  # decode_only Packets get no answer
                        yield reply
        finally:
            reader.cancel()
            st = call.stream
            if st is not None and st.owner is call:
                st.owner = None
                st.last_active = time.monotonic()

    async def _read(self, requests: AsyncIterator[bytes], queue: asyncio.Queue[Any]) -> None:
        """Parse and validate as messages arrive (on the loop: structural checks only, no decompression)."""
        try:
            async for data in requests:
                try:
                    msg = wire.parse_edge_message(data, self.limits)
                except wire.WireError as exc:
                    await queue.put(exc)
                    return
                await queue.put((msg, msg.WhichOneof("body"), time.perf_counter()))
        except grpc.RpcError:
            pass  # the edge went away; the handler ends at the EOF below (or is cancelled by gRPC first)
        await queue.put(_EOF)

    def _bye(self, call: _Call) -> None:
        st = call.stream
        if st is not None and st.owner is call and not st.busy and self.streams.get(st.stream_id) is st:
            del self.streams[st.stream_id]

    async def _dispatch(self, call: _Call, msg: pb.EdgeMessage, kind: str, arrived: float,
                        ) -> pb.CloudMessage | None:
        if kind == "hello":
            return await self._hello(call, msg.hello)
        if call.hello is None or call.stream is None:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"{kind} before Hello")
        st = call.stream
        if st.owner is not call:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION,
                         f"stream {st.stream_id!r} was taken over by a newer connection")
        if kind == "packets" and st.decoder is None:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, "packets on a stream whose Hello did not say bitstream")
        restart = kind == "packets" and bool(msg.packets.packets) and msg.packets.packets[0].keyframe
        if st.evicted and (kind == "keyframe" or restart):
            self._admit(st)
        if kind == "packets" and st.evicted:
            raise _need(msg.packets.seq, NK.REASON_EVICTED, f"stream {st.stream_id!r}: evicted after idling")
        if kind == "delta" and st.cache is None:
            seq = msg.delta.seq
            why = "evicted after idling" if st.lost == NK.REASON_EVICTED else "no keyframe received yet"
            raise _need(seq, st.lost, f"stream {st.stream_id!r}: {why}")
        work = {"keyframe": self._keyframe, "delta": self._delta, "packets": self._packets}[kind]
        st.busy = True
        st.last_active = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, work, st, msg, arrived)
        finally:
            st.busy = False
            st.last_active = time.monotonic()

    async def _hello(self, call: _Call, h: pb.Hello) -> pb.CloudMessage:
        if call.hello is not None:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, "second Hello on one stream")
        if h.protocol_version != wire.PROTOCOL_VERSION:
            raise _error(pb.Error.CODE_UNSUPPORTED_VERSION,
                         f"protocol version {h.protocol_version}; this server speaks {wire.PROTOCOL_VERSION}")
        if h.model_name != self.model_name or h.model_hash != self.model_hash:
            raise _error(pb.Error.CODE_MODEL_MISMATCH,
                         f"model {h.model_name} {h.model_hash}; this server runs {self.model_name} {self.model_hash}")
        mode = _MODE_NAMES[h.mode]
        if mode not in self.modes:
            raise _error(pb.Error.CODE_MODEL_MISMATCH, f"mode {mode}; this server runs {', '.join(self.modes)}")
        mapper = self._mapper(h)
        if h.results == pb.RESULTS_DETECTIONS and (self.adapter.task not in ("detect", "pose")
                                                   or not hasattr(self.adapter, "postprocess_input")):
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"{self.model_name} ({self.adapter.task}) cannot send "
                         "compact results; ask for RESULTS_RAW")
        params = (mode, tuple(h.input_shape), h.input_dtype, h.block_size, h.payload_kind, h.results,
                  h.input_factor, h.codec.SerializeToString(deterministic=True))
        st = self.streams.get(h.stream_id)
        if st is not None and st.params == params and not st.busy:
            st.owner = call  # resume: an older call on this id, if still open, is told it was taken over
        else:
            if st is not None and st.busy:
                raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"stream {h.stream_id!r} is busy on another call")
            if st is not None:  # new parameters: the old state goes (a call still on it is told it was taken over)
                del self.streams[h.stream_id]
                st.engine, st.cache, st.cache_seq, st.owner = None, None, None, None
            st = _Stream(h.stream_id, params, h, mapper, owner=call, decoder=self._decoder(h, mapper))
            if h.stream_id in self._evicted:
                st.lost = NK.REASON_EVICTED
            self._admit(st)
            st.busy = True
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._build, st)
            except Exception as exc:  # any engine failure is this stream's problem only
                self.streams.pop(h.stream_id, None)
                raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"cannot run {self.model_name} at input "
                             f"{list(h.input_shape)}: {exc}") from None
            finally:
                st.busy = False
        call.hello, call.stream = h, st
        st.last_active = time.monotonic()
        return pb.CloudMessage(welcome=pb.Welcome(
            protocol_version=wire.PROTOCOL_VERSION, stream_id=h.stream_id, server_id=self.server_id,
            max_message_bytes=self.limits.max_message_bytes,
            idle_timeout_ms=min(int(self.idle_timeout_s * 1000), 2**32 - 1)))

    def _mapper(self, h: pb.Hello) -> InputMapper:
        """The input mapping that turns this stream's integer input into the body's (see the module docstring)."""
        shape = tuple(int(d) for d in h.input_shape)
        if len(shape) != 3 or shape[2] != 3 or h.input_dtype not in ("uint8", "uint16"):
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"input {h.input_dtype} {list(shape)}: the server takes "
                         "the integer form (H, W, 3) of uint8 pixels or uint16 box sums")
        factor, block = h.input_factor, FRAME_BLOCK
        if factor:  # declared by the edge: the frame-level block is the input block times f
            block = h.block_size * factor
        elif h.input_dtype == "uint16":  # an older edge: infer it (see the module docstring)
            b = h.block_size
            factor = FRAME_BLOCK // b if FRAME_BLOCK % b == 0 else 0
            if not 2 <= factor <= 16:
                raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"uint16 box sums need a block size that divides "
                             f"{FRAME_BLOCK} into a factor of 2-16, got {b}")
        else:
            factor = 1
        hw = (shape[0], shape[1])
        try:
            if h.payload_kind == pb.PAYLOAD_KIND_BITSTREAM:  # decoded frames are converted here: the real frame size
                mapper = mapper_for(self.adapter, (h.codec.height, h.codec.width), factor, block=block)
                fits = mapper.input_hw == hw and mapper.input_block == h.block_size
            else:
                base = mapper_for(self.adapter, (hw[0] * factor, hw[1] * factor), factor, block=block)
                mapper = InputMapper((hw[0] * factor, hw[1] * factor), factor, block=block, canvas_hw=hw,
                                     scale=base.scale, shift=base.shift, integer=base.integer)
                fits = base.canvas_hw is None or base.canvas_hw == hw
            fits = fits and input_dtype(mapper).name == h.input_dtype
        except ValueError as exc:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"input {h.input_dtype} {list(shape)} with factor "
                         f"{factor}: {exc}") from None
        if not fits:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, f"input {h.input_dtype} {list(shape)} (block "
                         f"{h.block_size}, factor {factor}) does not fit {self.model_name}'s input mapping")
        return mapper

    def _decoder(self, h: pb.Hello, mapper: InputMapper) -> BitstreamDecoder | None:
        """A bitstream stream's decoder, opened from the Hello's codec parameters (checked)."""
        if h.payload_kind != pb.PAYLOAD_KIND_BITSTREAM:
            return None
        try:
            return BitstreamDecoder(CodecParams.from_message(h.codec), mapper)
        except wire.WireError as exc:
            raise _error(pb.Error.CODE_MALFORMED_MESSAGE, str(exc)) from None
        except BitstreamError as exc:
            raise _error(pb.Error.CODE_PROTOCOL_VIOLATION, str(exc)) from None

    # -------------------------------------------------------------------------------------------- inference thread
    def _build(self, st: _Stream) -> None:
        mode = st.params[0]
        st.engine = Engine(self.adapter.body, st.mapper.input_hw, self._engine_config(mode))

    def _keyframe(self, st: _Stream, msg: pb.EdgeMessage, arrived: float) -> pb.CloudMessage:
        t0 = time.perf_counter()
        k = msg.keyframe
        if st.engine is None:  # readmitted after eviction
            try:
                self._build(st)
            except Exception as exc:  # only this stream is affected
                raise _error(pb.Error.CODE_INTERNAL, f"cannot rebuild the engine: {exc}") from None
        t1 = time.perf_counter()
        try:
            x = wire.decode_keyframe(k, st.hello, self.limits)
        except wire.WireError as exc:
            raise _error(pb.Error.CODE_MALFORMED_MESSAGE, str(exc)) from None
        got = wire.checksum(x)
        if got != k.checksum:
            raise _need(k.seq, NK.REASON_CHECKSUM_MISMATCH, f"keyframe {k.seq}: checksum {got} != sent {k.checksum}")
        cache = np.array(x, copy=True, order="C")
        t2 = time.perf_counter()
        assert st.engine is not None
        st.engine.reset()
        return self._infer(st, k.seq, cache, None, got, t0 - arrived, t2 - t1)

    def _delta(self, st: _Stream, msg: pb.EdgeMessage, arrived: float) -> pb.CloudMessage:
        t0 = time.perf_counter()
        d = msg.delta
        if st.cache is None:  # evicted between the loop's check and now cannot happen (busy), but be safe
            raise _need(d.seq, st.lost, f"stream {st.stream_id!r} has no input cache")
        if d.base_seq != st.cache_seq:
            raise _need(d.seq, NK.REASON_SEQUENCE_GAP,
                        f"delta {d.seq} is based on frame {d.base_seq}; the server holds frame {st.cache_seq}")
        try:
            arrs = wire.decode_delta(d, self.limits)
        except wire.WireError as exc:
            raise _error(pb.Error.CODE_MALFORMED_MESSAGE, str(exc)) from None
        h, w, _ = st.cache.shape
        payload = ResidualPayload(st.stream_id, d.seq, d.base_seq, st.hello.model_hash, st.hello.block_size,
                                  arrs.dy, arrs.dx, arrs.valid, arrs.block_indices, arrs.pixels, arrs.checksum)
        try:
            rebuilt = apply_residual(st.cache, payload)
        except PayloadError as exc:
            raise _need(d.seq, NK.REASON_CHECKSUM_MISMATCH, str(exc)) from None
        fld = MotionField(arrs.dy.astype(np.int32), arrs.dx.astype(np.int32), np.array(arrs.valid, copy=True),
                          st.hello.block_size, h, w, source="accumulated")
        t1 = time.perf_counter()
        return self._infer(st, d.seq, rebuilt, fld, arrs.checksum, t0 - arrived, t1 - t0)

    def _packets(self, st: _Stream, msg: pb.EdgeMessage, arrived: float) -> pb.CloudMessage | None:
        """Bitstream receive layer: decode, pick the frame by checksum, infer (see the module docstring)."""
        t0 = time.perf_counter()
        try:
            p = from_packets_message(msg.packets, self.limits)
        except wire.WireError as exc:
            raise _error(pb.Error.CODE_MALFORMED_MESSAGE, str(exc)) from None
        dec = st.decoder
        assert dec is not None
        restart = bool(p.packets) and p.packets[0].keyframe
        if restart:
            if p.base_seq != st.packets_seq:
                dec.reset()  # a resync: the packets since a keyframe restart the decoder
        elif dec.needs_keyframe and not (p.packets == () and p.base_seq == st.packets_seq):
            raise _need(p.seq, st.decoder_lost, f"packets {p.seq}: the server's decoder needs packets from a "
                        "keyframe on (resync)")
        elif p.base_seq != st.packets_seq:
            dec.reset()
            st.decoder_lost = NK.REASON_SEQUENCE_GAP
            raise _need(p.seq, NK.REASON_SEQUENCE_GAP, f"packets {p.seq} follow frame {p.base_seq}; the server's "
                        f"decoder is at frame {st.packets_seq}")
        fld = None
        if not p.decode_only and msg.packets.HasField("dy"):
            fld = self._packets_field(st, msg.packets)
        if st.engine is None:  # readmitted after eviction
            try:
                self._build(st)
            except Exception as exc:  # only this stream is affected
                raise _error(pb.Error.CODE_INTERNAL, f"cannot rebuild the engine: {exc}") from None
        try:
            x = dec.decode(p.packets, checksum=None if p.decode_only else p.checksum, flush=bool(msg.packets.flush))
        except BitstreamError as exc:
            st.packets_seq, st.decoder_lost = None, exc.need_keyframe_reason
            raise _need(p.seq, exc.need_keyframe_reason, f"packets {p.seq}: {exc}") from None
        st.packets_seq = p.seq
        if x is None:
            return None  # decode_only: the edge ran this frame, no reply
        t1 = time.perf_counter()
        if fld is None:
            st.engine.reset()  # type: ignore[union-attr]  # no usable field: dense
        return self._infer(st, p.seq, np.array(x, copy=True, order="C"), fld, p.checksum, t0 - arrived, t1 - t0)

    def _packets_field(self, st: _Stream, m: pb.Packets) -> MotionField | None:
        """The Packets' accumulated field, when it starts at the engine's cached frame (else None: run dense)."""
        kw = {"max_bytes": self.limits.max_decoded_bytes, "allowed_dtypes": self.limits.allowed_dtypes}
        dy = wire.decode_tensor(m.dy, field="packets.dy", **kw)
        dx = wire.decode_tensor(m.dx, field="packets.dx", **kw)
        valid = wire.decode_tensor(m.valid, field="packets.valid", **kw)
        h, w = st.mapper.input_hw
        b = st.hello.block_size
        if dy.shape != grid_shape(h, w, b):
            raise _error(pb.Error.CODE_MALFORMED_MESSAGE, f"packets.dy: grid {list(dy.shape)} is not the "
                         f"{h}x{w} input's block grid of {b}")
        if st.cache_seq is None or m.field_base_seq != st.cache_seq:
            return None
        return MotionField(dy.astype(np.int32), dx.astype(np.int32), np.array(valid, copy=True), b, h, w,
                           source="accumulated")

    def _infer(self, st: _Stream, seq: int, cache: np.ndarray, fld: MotionField | None, checksum: str,
               queue_s: float, rebuild_s: float) -> pb.CloudMessage:
        assert st.engine is not None
        t0 = time.perf_counter()
        try:
            out, _ = st.engine.step(input_tensor(st.mapper, cache), fld)
        except Exception as exc:  # the engine resets itself; only this stream is affected
            st.cache, st.cache_seq = None, None
            raise _error(pb.Error.CODE_INTERNAL, f"inference failed on frame {seq}: {exc}") from None
        compute_ms = (time.perf_counter() - t0) * 1e3
        st.cache, st.cache_seq = cache, seq
        tensors = out if isinstance(out, list | tuple) else (out,)
        if st.hello.results == pb.RESULTS_DETECTIONS:
            outputs = encode_results(self.adapter.postprocess_input(tensors, st.mapper.input_hw))  # type: ignore[attr-defined]
        else:
            outputs = {name: wire.encode_tensor(_numpy(t)) for name, t in zip(output_names(len(tensors)), tensors,
                                                                                strict=True)}
        return pb.CloudMessage(result=pb.Result(seq=seq, outputs=outputs, compute_ms=compute_ms,
                                                queue_ms=max(queue_s, 0.0) * 1e3, checksum=checksum,
                                                rebuild_ms=rebuild_s * 1e3))


def _numpy(t: Any) -> np.ndarray:
    a = t.detach().to(torch.float32).cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    return np.ascontiguousarray(a)
