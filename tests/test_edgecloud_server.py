"""The cloud server over loopback gRPC: the receive layer rebuilds the edge's input bit for bit and the outputs are
the engine's (exact: dense within float32), resync on gaps / tampering / eviction, malformed messages end only their
stream, bearer token and TLS, stream limits, and `fluxshard serve` as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud import auth, wire
from fluxshard.edgecloud.bitstream import PacketTap, edge_input, to_packets_message
from fluxshard.edgecloud.dispatch import DispatchLayer, input_tensor, integer_input
from fluxshard.edgecloud.payload import ResidualPayload, build_residual
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.server import CloudServer, ServerError, output_names, result_outputs
from fluxshard.engine import Engine, EngineConfig
from fluxshard.engine.inputs import InputMapper, mapper_for
from fluxshard.models import ModelAdapter, load_model
from fluxshard.motion import MotionStream
from fluxshard.motion.field import MotionField
from parity import DenseReference, assert_exact

NK = pb.NeedKeyframe
METHOD = "/fluxshard.edgecloud.v1.Inference/Stream"
TIMEOUT = 60


@dataclass
class Clip:
    adapter: ModelAdapter
    mapper: InputMapper
    inputs: list[np.ndarray]  # integer form, uint16 box sums (factor 4: 128×160, block 4)
    fields: list[MotionField]  # frame t → t−1 at input resolution


@pytest.fixture(scope="module")
def clip() -> Clip:
    adapter = load_model("nanodet")
    mapper = mapper_for(adapter, (480, 640), 4)
    inputs, fields = [], []
    for mf in MotionStream(clip_path("cup"), block=16, max_frames=6):
        inputs.append(integer_input(mapper, mf.frame.rgb))
        fields.append(mapper.field(mf.field))
    return Clip(adapter, mapper, inputs, fields)


def _server(clip: Clip, **kw: Any) -> CloudServer:
    kw.setdefault("insecure", True)
    return CloudServer(clip.adapter, engine_config=lambda mode: EngineConfig(mode=mode) if mode == "exact"
                       else EngineConfig(mode="fast", tau_in=0.01, default_threshold=0.05), **kw)


def hello(server: CloudServer, clip: Clip, stream_id: str = "cam", **kw: Any) -> pb.EdgeMessage:
    x = clip.inputs[0]
    fields = dict(protocol_version=wire.PROTOCOL_VERSION, stream_id=stream_id, model_name=server.model_name,
                  model_hash=server.model_hash, mode=pb.ENGINE_MODE_EXACT, input_shape=x.shape,
                  input_dtype=x.dtype.name, block_size=clip.mapper.input_block, payload_kind=pb.PAYLOAD_KIND_RESIDUAL)
    fields.update(kw)
    return pb.EdgeMessage(hello=pb.Hello(**fields))


def key_msg(x: np.ndarray, seq: int) -> pb.EdgeMessage:
    return pb.EdgeMessage(keyframe=pb.Keyframe(seq=seq, input=wire.encode_tensor(x), checksum=wire.checksum(x)))


def delta_msg(p: ResidualPayload, **over: Any) -> pb.EdgeMessage:
    fields = dict(seq=p.seq, base_seq=p.base_seq, dy=wire.encode_tensor(p.dy), dx=wire.encode_tensor(p.dx),
                  valid=wire.encode_tensor(p.valid), block_indices=wire.encode_tensor(p.indices),
                  pixels=wire.encode_tensor(p.pixels), checksum=p.checksum)
    fields.update(over)
    return pb.EdgeMessage(delta=pb.Delta(**fields))


class Edge:
    """A minimal edge: the mirror of the cloud's dispatch layer, fed every frame's field."""

    def __init__(self, clip: Clip) -> None:
        self.clip = clip
        self.layer = DispatchLayer.for_mapper(clip.mapper)

    def keyframe(self, t: int) -> pb.EdgeMessage:
        self.layer.update(self.clip.inputs[t], seq=t)
        return key_msg(self.clip.inputs[t], t)

    def delta(self, t: int) -> tuple[ResidualPayload, pb.EdgeMessage]:
        """Folds fields since the cached frame into the mirror, builds frame t's residual (the mirror is updated
        by :meth:`sent`, once the server answered)."""
        for f in self.clip.fields[self.layer.seq + self.layer.age + 1: t + 1]:
            self.layer.fold(f)
        p = build_residual(self.layer, self.clip.inputs[t], seq=t)
        return p, delta_msg(p)

    def sent(self, p: ResidualPayload) -> None:
        assert p.rebuilt is not None
        self.layer.update(p.rebuilt, seq=p.seq)


@asynccontextmanager
async def serving(server: CloudServer) -> AsyncIterator[int]:
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop(0.5)


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())


def open_stream(ch: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """A raw-bytes call (so tests can send garbage too); write ``msg.SerializeToString()`` or bytes."""
    return ch.stream_stream(METHOD, request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                            response_deserializer=pb.CloudMessage.FromString)(metadata=metadata)


async def ask(call: Any, msg: pb.EdgeMessage | bytes) -> pb.CloudMessage:
    await call.write(msg)
    reply = await call.read()
    assert reply is not grpc.aio.EOF, "the server closed the stream"
    assert wire.validate_cloud_message(reply)  # everything the server says is valid on the wire
    return reply


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), TIMEOUT))


def kind(m: pb.CloudMessage) -> str:
    return m.WhichOneof("body")


# ---------------------------------------------------------------------------------------------------- frames


def test_results_are_the_edges_mirror_and_the_engines_outputs(clip: Clip) -> None:
    """Keyframe + 5 Deltas of cup: every Result's checksum is the mirror's, its outputs equal a local exact Engine
    fed the same inputs and fields, and are dense within float32 (parity); Bye frees the state."""
    server = _server(clip)
    edge = Edge(clip)
    local = Engine(clip.adapter.body, clip.mapper.input_hw, EngineConfig())
    reference = DenseReference(clip.adapter.body)

    async def main() -> list[tuple[pb.CloudMessage, np.ndarray, MotionField | None]]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            welcome = await ask(call, hello(server, clip))
            assert kind(welcome) == "welcome" and welcome.welcome.server_id == server.server_id
            assert welcome.welcome.max_message_bytes == wire.MAX_MESSAGE_BYTES
            out = [(await ask(call, edge.keyframe(0)), clip.inputs[0], None)]
            for t in range(1, len(clip.inputs)):
                p, msg = edge.delta(t)
                out.append((await ask(call, msg), p.rebuilt, MotionField(
                    p.dy.astype(np.int32), p.dx.astype(np.int32), p.valid.copy(), p.block, *clip.mapper.input_hw)))
                edge.sent(p)
            assert set(server.streams) == {"cam"}
            await call.write(pb.EdgeMessage(bye=pb.Bye(reason="done")))
            assert await call.read() == grpc.aio.EOF
            assert not server.streams
            return out

    replies = run(main)
    for t, (reply, rebuilt, fld) in enumerate(replies):
        assert kind(reply) == "result", reply
        r = reply.result
        assert r.seq == t and r.checksum == wire.checksum(rebuilt)
        assert np.array_equal(rebuilt, clip.inputs[t])  # exact mode: the rebuilt input is the frame
        assert r.compute_ms > 0 and r.queue_ms >= 0 and r.rebuild_ms > 0
        x = input_tensor(clip.mapper, rebuilt)
        want, _ = local.step(x, fld)
        got = result_outputs(r)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w.numpy())  # same engine, same inputs, same fields
        if t in (0, len(replies) - 1):
            assert_exact(tuple(torch.from_numpy(g.copy()) for g in got), *reference(x))


def test_fast_mode_stream_matches_a_local_fast_engine(clip: Clip) -> None:
    """Fast mode: the server's engine sees the same rebuilt inputs and fields as a local fast engine (same
    config), so its outputs are the local engine's."""
    server = _server(clip)
    edge = Edge(clip)
    local = Engine(clip.adapter.body, clip.mapper.input_hw, EngineConfig(mode="fast", tau_in=0.01,
                                                                         default_threshold=0.05))

    async def main() -> list[tuple[pb.CloudMessage, ResidualPayload | None]]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            assert kind(await ask(call, hello(server, clip, mode=pb.ENGINE_MODE_FAST))) == "welcome"
            out: list[tuple[pb.CloudMessage, ResidualPayload | None]] = [(await ask(call, edge.keyframe(0)), None)]
            for t in (1, 2, 4):  # frame 3 ran on the edge: the field accumulates over two frames
                p, msg = edge.delta(t)
                out.append((await ask(call, msg), p))
                edge.sent(p)
            await call.done_writing()
            return out

    for reply, p in run(main):
        assert kind(reply) == "result"
        rebuilt = clip.inputs[0] if p is None else p.rebuilt
        assert reply.result.checksum == wire.checksum(rebuilt)
        fld = None if p is None else MotionField(p.dy.astype(np.int32), p.dx.astype(np.int32), p.valid.copy(),
                                                  p.block, *clip.mapper.input_hw)
        want, _ = local.step(input_tensor(clip.mapper, rebuilt), fld)
        for g, w in zip(result_outputs(reply.result), want, strict=True):
            assert np.array_equal(g, w.numpy())


def test_result_outputs_keep_the_bodys_order() -> None:
    outs = [np.full((1, 2), i, np.float32) for i in range(12)]
    r = pb.Result(seq=1, outputs={n: wire.encode_tensor(a) for n, a in zip(output_names(12), outs, strict=True)},
                  checksum="0" * 16)
    assert [int(a[0, 0]) for a in result_outputs(r)] == list(range(12))


def test_gap_tampering_and_unknown_stream_ask_for_a_keyframe_then_resync(clip: Clip) -> None:
    server = _server(clip)
    edge = Edge(clip)

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            await ask(call, hello(server, clip))
            p0 = build_residual(_cached(clip), clip.inputs[1], seq=1)
            replies = [await ask(call, delta_msg(p0))]  # Delta before any Keyframe
            replies.append(await ask(call, edge.keyframe(0)))
            p, msg = edge.delta(1)
            replies.append(await ask(call, delta_msg(p, base_seq=7, seq=8)))  # the server holds frame 0
            pixels = p.pixels.copy()
            pixels.flat[0] ^= 1  # one grey level in one residual block
            replies.append(await ask(call, delta_msg(p, pixels=wire.encode_tensor(pixels))))
            replies.append(await ask(call, msg))  # the untampered frame still applies: the cache was kept
            edge.sent(p)
            replies.append(await ask(call, edge.keyframe(3)))  # resync at frame 3 (frame 2 ran on the edge)
            p, msg = edge.delta(5)
            replies.append(await ask(call, msg))
            await call.done_writing()
            return replies

    unknown, key0, gap, tampered, ok1, key3, ok5 = run(main)
    assert kind(unknown) == "need_keyframe" and unknown.need_keyframe.reason == NK.REASON_UNKNOWN_STREAM
    assert unknown.need_keyframe.seq == 1
    assert kind(key0) == "result" and key0.result.seq == 0
    assert kind(gap) == "need_keyframe" and gap.need_keyframe.reason == NK.REASON_SEQUENCE_GAP
    assert "frame 7" in gap.need_keyframe.detail and "holds frame 0" in gap.need_keyframe.detail
    assert kind(tampered) == "need_keyframe" and tampered.need_keyframe.reason == NK.REASON_CHECKSUM_MISMATCH
    assert ok1.result.seq == 1 and ok1.result.checksum == wire.checksum(clip.inputs[1])
    assert key3.result.seq == 3 and key3.result.checksum == wire.checksum(clip.inputs[3])
    assert kind(ok5) == "result" and ok5.result.seq == 5 and ok5.result.checksum == wire.checksum(clip.inputs[5])


def test_reconnect_resumes_the_stream_without_a_keyframe(clip: Clip) -> None:
    """A new call with the same stream id and parameters picks up the cache; the old call is told it was taken
    over; the server id is the same (no restart)."""
    server = _server(clip)
    edge = Edge(clip)

    async def main() -> tuple[pb.CloudMessage, ...]:
        async with serving(server) as port, channel(port) as ch:
            first = open_stream(ch)
            w1 = await ask(first, hello(server, clip))
            await ask(first, edge.keyframe(0))
            second = open_stream(ch)
            w2 = await ask(second, hello(server, clip))
            p, msg = edge.delta(1)
            resumed = await ask(second, msg)
            edge.sent(p)
            _, msg = edge.delta(2)
            stale = await ask(first, msg)
            assert await first.read() == grpc.aio.EOF
            await second.done_writing()
            return w1, w2, resumed, stale

    w1, w2, resumed, stale = run(main)
    assert w1.welcome.server_id == w2.welcome.server_id
    assert kind(resumed) == "result" and resumed.result.checksum == wire.checksum(clip.inputs[1])
    assert kind(stale) == "error" and stale.error.code == pb.Error.CODE_PROTOCOL_VIOLATION
    assert "taken over" in stale.error.message


def test_idle_stream_is_evicted_and_a_keyframe_brings_it_back(clip: Clip) -> None:
    server = _server(clip, idle_timeout_s=0.3)
    edge = Edge(clip)

    async def main() -> tuple[pb.CloudMessage, ...]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            welcome = await ask(call, hello(server, clip))
            await ask(call, edge.keyframe(0))
            for _ in range(50):
                await asyncio.sleep(0.1)
                if not server.streams:
                    break
            assert not server.streams  # the engine and cache are gone
            _, msg = edge.delta(1)
            evicted = await ask(call, msg)
            again = await ask(call, edge.keyframe(1))
            held = set(server.streams)
            await call.done_writing()
            return welcome, evicted, again, held

    welcome, evicted, again, held = run(main)
    assert welcome.welcome.idle_timeout_ms == 300
    assert kind(evicted) == "need_keyframe" and evicted.need_keyframe.reason == NK.REASON_EVICTED
    assert kind(again) == "result" and again.result.checksum == wire.checksum(clip.inputs[1]) and held == {"cam"}


# ---------------------------------------------------------------------------------------------------- bad peers


def test_malformed_messages_end_only_their_stream(clip: Clip) -> None:
    """Garbage bytes, a structurally invalid Delta, a frame before Hello, a bitstream payload and a second Hello
    each get one Error and end their call, while a concurrent stream keeps getting Results."""
    server = _server(clip)
    edge = Edge(clip)
    grid = (32, 40)
    bad_delta = delta_msg(build_residual(_cached(clip), clip.inputs[1], seq=1),
                          dx=wire.encode_tensor(np.zeros((grid[0], grid[1] + 1), np.int16)))
    packets = pb.EdgeMessage(packets=pb.Packets(seq=2, base_seq=1, packets=[pb.Packet(data=b"\0\0\1")],
                                                checksum="0" * 16))

    async def main() -> tuple[list[tuple[pb.CloudMessage, bool]], list[pb.CloudMessage]]:
        async with serving(server) as port, channel(port) as ch:
            good = open_stream(ch)
            await ask(good, hello(server, clip))
            results = [await ask(good, edge.keyframe(0))]
            errors = []
            for first, bad in [(None, b"\xff\xff\xff\xff\x0f"), (None, key_msg(clip.inputs[0], 0)),
                               (hello(server, clip, "b1"), bad_delta), (hello(server, clip, "b2"), packets),
                               (hello(server, clip, "b3"), hello(server, clip, "b3"))]:
                call = open_stream(ch)
                if first is not None:
                    assert kind(await ask(call, first)) == "welcome"
                errors.append((await ask(call, bad), await call.read() == grpc.aio.EOF))
                p, msg = edge.delta(len(results))
                results.append(await ask(good, msg))  # the good stream is unaffected
                edge.sent(p)
            await good.done_writing()
            return errors, results

    errors, results = run(main)
    codes = [(e.error.code, ended) for e, ended in errors]
    C = pb.Error
    assert codes == [(C.CODE_MALFORMED_MESSAGE, True), (C.CODE_PROTOCOL_VIOLATION, True),
                     (C.CODE_MALFORMED_MESSAGE, True), (C.CODE_PROTOCOL_VIOLATION, True),
                     (C.CODE_PROTOCOL_VIOLATION, True)]
    assert "not a valid protobuf" in errors[0][0].error.message and "delta.dx" in errors[2][0].error.message
    assert "before Hello" in errors[1][0].error.message and "bitstream" in errors[3][0].error.message
    assert [r.result.checksum for r in results] == [wire.checksum(x) for x in clip.inputs[: len(results)]]


def _cached(clip: Clip) -> DispatchLayer:
    layer = DispatchLayer.for_mapper(clip.mapper)
    layer.update(clip.inputs[0], seq=0)
    layer.fold(clip.fields[1])
    return layer


def test_hello_is_checked_and_streams_are_bounded(clip: Clip) -> None:
    server = _server(clip, max_streams=1, modes=("exact",))

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            replies = []
            for msg in [hello(server, clip, model_hash="0" * 16), hello(server, clip, protocol_version=99),
                        hello(server, clip, mode=pb.ENGINE_MODE_FAST), hello(server, clip, block_size=3),
                        hello(server, clip, input_dtype="int32")]:
                call = open_stream(ch)
                replies.append(await ask(call, msg))
                assert await call.read() == grpc.aio.EOF
            assert not server.streams
            held = open_stream(ch)
            assert kind(await ask(held, hello(server, clip, "one"))) == "welcome"
            extra = open_stream(ch)
            replies.append(await ask(extra, hello(server, clip, "two")))
            replies.append(await ask(held, key_msg(clip.inputs[0], 0)))
            await held.done_writing()
            return replies

    mismatch, version, mode, block, dtype, busy, ok = run(main)
    C = pb.Error
    assert (mismatch.error.code, version.error.code, mode.error.code) == (
        C.CODE_MODEL_MISMATCH, C.CODE_UNSUPPORTED_VERSION, C.CODE_MODEL_MISMATCH)
    assert block.error.code == C.CODE_PROTOCOL_VIOLATION and "block size" in block.error.message
    assert dtype.error.code in (C.CODE_MALFORMED_MESSAGE, C.CODE_PROTOCOL_VIOLATION)
    assert busy.error.code == C.CODE_RESOURCE_EXHAUSTED and kind(ok) == "result"


# ---------------------------------------------------------------------------------------------------- security


async def _health(ch: grpc.aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return resp.status


def test_missing_or_wrong_token_is_rejected_without_state(clip: Clip) -> None:
    server = _server(clip, token="s3cret-token")

    async def main() -> tuple[list[grpc.StatusCode], int, str]:
        async with serving(server) as port, channel(port) as ch:
            codes = []
            for md in [(), auth.token_metadata("wrong"), (("authorization", "s3cret-token"),)]:
                call = open_stream(ch, md)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ask(call, hello(server, clip))
                codes.append(err.value.code())
            assert not server.streams and server.interceptor is not None and server.interceptor.rejected == 3
            status = await _health(ch)  # health checks carry no token
            ok = await ask(open_stream(ch, auth.token_metadata("s3cret-token")), hello(server, clip))
            return codes, status, kind(ok)

    codes, status, ok = run(main)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert status == health_pb2.HealthCheckResponse.SERVING and ok == "welcome"


def test_tls_with_the_right_ca_and_a_failed_handshake_with_a_wrong_one(clip: Clip, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
    (tmp_path / "token").write_text("tls-token\n")
    token = auth.read_token(tmp_path / "token")
    server = _server(clip, insecure=False, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"),
                     token=token)

    async def main() -> tuple[int, str, grpc.StatusCode]:
        async with serving(server) as port:
            async with auth.open_channel(f"127.0.0.1:{port}", ca_file=tmp_path / "ca.pem", token=token) as ch:
                status = await _health(ch)
                ok = kind(await ask(open_stream(ch), hello(server, clip, mode=pb.ENGINE_MODE_FAST)))
            async with auth.open_channel(f"127.0.0.1:{port}", ca_file=tmp_path / "other.pem", token=token) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _health(ch)
            return status, ok, err.value.code()

    status, ok, wrong = run(main)
    assert status == health_pb2.HealthCheckResponse.SERVING and ok == "welcome"
    assert wrong == grpc.StatusCode.UNAVAILABLE


def test_security_configuration_errors(tmp_path: Path, clip: Clip) -> None:
    with pytest.raises(ServerError, match="--tls-cert and --tls-key"):
        CloudServer(clip.adapter)
    with pytest.raises(ServerError, match="exclude each other"):
        CloudServer(clip.adapter, insecure=True, tls_cert="c.pem")
    with pytest.raises(auth.AuthError, match="no TLS CA given"):
        auth.open_channel("127.0.0.1:1")
    (tmp_path / "t").write_text("two words")
    with pytest.raises(auth.AuthError, match="printable ASCII characters without spaces"):
        auth.read_token(tmp_path / "t")
    (tmp_path / "e").write_text("\n")
    with pytest.raises(auth.AuthError, match="empty file"):
        auth.read_token(tmp_path / "e")
    (tmp_path / "c.pem").write_text("not pem")
    with pytest.raises(auth.AuthError, match="not a PEM file"):
        auth.server_credentials(tmp_path / "c.pem", tmp_path / "c.pem")
    with pytest.raises(auth.AuthError, match="cannot read"):
        auth.channel_credentials(tmp_path / "missing.pem")


# ---------------------------------------------------------------------------------------------------- CLI


def _fluxshard(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fluxshard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_serve_needs_tls_or_insecure() -> None:
    proc = _fluxshard("serve", "--port", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.strip() == "error: TLS needs both --tls-cert and --tls-key (or --insecure for plaintext)"


def test_serve_prints_listening_answers_health_and_stops_on_sigterm() -> None:
    proc = _fluxshard("serve", "--port", "0", "--insecure", "--max-streams", "2")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.strip().rsplit(":", 1)[1])

        async def check() -> int:
            async with channel(port) as ch:
                return await _health(ch)

        assert run(check) == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------- bitstream


def _packets_msg(seq: int, base: int, packets: Any, checksum: str, *, decode_only: bool = False,
                 fld: MotionField | None = None, field_base: int = 0) -> pb.EdgeMessage:
    msg = to_packets_message(seq, base, packets, checksum, decode_only=decode_only)
    if fld is not None:
        msg.dy.CopyFrom(wire.encode_tensor(fld.dy.astype(np.int16)))
        msg.dx.CopyFrom(wire.encode_tensor(fld.dx.astype(np.int16)))
        msg.valid.CopyFrom(wire.encode_tensor(fld.valid))
        msg.field_base_seq = field_base
    return pb.EdgeMessage(packets=msg)


def _bitstream_hello(server: CloudServer, clip: Clip, tap: PacketTap, **kw: Any) -> pb.EdgeMessage:
    return hello(server, clip, payload_kind=pb.PAYLOAD_KIND_BITSTREAM, codec=tap.params.to_message(),
                 input_factor=clip.mapper.factor, **kw)


def test_bitstream_packets_give_the_edges_inputs_and_the_engines_outputs(clip: Clip) -> None:
    """cup as forwarded packets (seq = frame + 1): frame 2 goes decode_only (no reply, the field accumulates over
    two frames), the others carry the field since the cloud's last frame; checksums are the edge inputs', outputs
    a local exact engine's fed the same inputs and fields; frame 0 has no field (dense)."""
    server = _server(clip)
    tap = PacketTap(clip_path("cup"), max_frames=len(clip.inputs))
    tfs = list(tap)
    local = Engine(clip.adapter.body, clip.mapper.input_hw, EngineConfig())
    for t, tf in enumerate(tfs):
        assert np.array_equal(edge_input(clip.mapper, tf.frame), clip.inputs[t])
    mirror = DispatchLayer.for_mapper(clip.mapper)
    sent: list[tuple[int, MotionField | None]] = []

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            assert kind(await ask(call, _bitstream_hello(server, clip, tap))) == "welcome"
            out = []
            for t, tf in enumerate(tfs):
                cs = wire.checksum(clip.inputs[t])
                if t == 0:
                    out.append(await ask(call, _packets_msg(1, 0, tf.packets, cs)))
                    sent.append((t, None))
                    mirror.update(clip.inputs[t], seq=1)
                    continue
                fld = mirror.fold(clip.fields[t])
                if t == 2:  # the edge ran it: the server only decodes
                    await call.write(_packets_msg(t + 1, t, tf.packets, "", decode_only=True))
                    continue
                out.append(await ask(call, _packets_msg(t + 1, t, tf.packets, cs, fld=fld, field_base=mirror.seq)))
                sent.append((t, fld))
                mirror.update(clip.inputs[t], seq=t + 1)
            await call.done_writing()
            return out

    replies = run(main)
    assert len(replies) == len(sent) == len(tfs) - 1
    for reply, (t, fld) in zip(replies, sent, strict=True):
        assert kind(reply) == "result", reply
        r = reply.result
        assert r.seq == t + 1 and r.checksum == wire.checksum(clip.inputs[t])
        if fld is not None:
            fld = MotionField(fld.dy.astype(np.int16).astype(np.int32), fld.dx.astype(np.int16).astype(np.int32),
                              fld.valid.copy(), fld.block, *clip.mapper.input_hw)
        want, _ = local.step(input_tensor(clip.mapper, clip.inputs[t]), fld)
        for g, w in zip(result_outputs(r), want, strict=True):
            assert np.array_equal(g, w.numpy()), f"frame {t}"


def test_bitstream_corrupt_packets_ask_for_a_keyframe_then_a_resync_recovers(clip: Clip) -> None:
    """A damaged packet → NeedKeyframe(decode_error); the next plain packets also need a keyframe; the resync packets
    (from the GOP's keyframe) recover the exact input. Packets before any keyframe → unknown_stream; Packets on a
    residual stream end it with protocol_violation."""
    server = _server(clip)
    tap = PacketTap(clip_path("cup"), max_frames=6)
    tfs: list[Any] = []
    it = iter(tap)

    async def main() -> tuple[list[pb.CloudMessage], pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            await ask(call, _bitstream_hello(server, clip, tap))
            tfs.extend(next(it) for _ in range(2))
            cs = [wire.checksum(clip.inputs[t]) for t in range(6)]
            out = [await ask(call, _packets_msg(2, 1, tfs[1].packets, cs[1]))]  # not from a keyframe: no state
            out.append(await ask(call, _packets_msg(2, 1, tfs[0].packets + tfs[1].packets, cs[1])))
            tfs.append(next(it))
            (p,) = tfs[2].packets
            bad = np.random.default_rng(5).integers(0, 256, len(p.data), dtype=np.uint8).tobytes()
            out.append(await ask(call, _packets_msg(3, 2, (replace(p, data=bad),), cs[2])))
            tfs.append(next(it))
            out.append(await ask(call, _packets_msg(4, 3, tfs[3].packets, cs[3])))  # the decoder lost its state
            tfs.append(next(it))
            out.append(await ask(call, _packets_msg(5, 4, tap.resync_packets(), cs[4])))
            tfs.append(next(it))
            out.append(await ask(call, _packets_msg(6, 5, tfs[5].packets, cs[5])))
            other = open_stream(ch)
            await ask(other, hello(server, clip, stream_id="residual"))
            wrong = await ask(other, _packets_msg(2, 1, tfs[0].packets, cs[0]))
            return out, wrong

    (none, first, corrupt, lost, resync, after), wrong = run(main)
    assert kind(none) == "need_keyframe" and none.need_keyframe.reason == NK.REASON_UNKNOWN_STREAM
    assert kind(first) == "result" and first.result.checksum == wire.checksum(clip.inputs[1])
    assert kind(corrupt) == "need_keyframe" and corrupt.need_keyframe.reason == NK.REASON_DECODE_ERROR
    assert corrupt.need_keyframe.seq == 3 and "\n" not in corrupt.need_keyframe.detail
    assert kind(lost) == "need_keyframe" and lost.need_keyframe.reason == NK.REASON_DECODE_ERROR
    assert kind(resync) == "result" and resync.result.checksum == wire.checksum(clip.inputs[4])
    assert kind(after) == "result" and after.result.checksum == wire.checksum(clip.inputs[5])
    assert kind(wrong) == "error" and wrong.error.code == pb.Error.CODE_PROTOCOL_VIOLATION


def test_bitstream_sequence_gap_and_wrong_checksum(clip: Clip) -> None:
    """Plain packets after a skipped message → sequence_gap; a checksum no decoded frame has → checksum_mismatch."""
    server = _server(clip)
    tap = PacketTap(clip_path("cup"), max_frames=4)
    tfs = list(tap)
    cs = [wire.checksum(clip.inputs[t]) for t in range(4)]

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            await ask(call, _bitstream_hello(server, clip, tap))
            out = [await ask(call, _packets_msg(1, 0, tfs[0].packets, cs[0]))]
            out.append(await ask(call, _packets_msg(3, 2, tfs[2].packets, cs[2])))  # frame 1's packets never came
            out.append(await ask(call, _packets_msg(1, 0, tfs[0].packets, cs[1])))  # decodes frame 0, wants frame 1
            return out

    ok, gap, mismatch = run(main)
    assert kind(ok) == "result"
    assert kind(gap) == "need_keyframe" and gap.need_keyframe.reason == NK.REASON_SEQUENCE_GAP
    assert kind(mismatch) == "need_keyframe" and mismatch.need_keyframe.reason == NK.REASON_CHECKSUM_MISMATCH


def test_hello_input_factor_is_used_and_checked(clip: Clip) -> None:
    """An explicit factor that does not fit the declared input is refused; the right one is accepted."""
    server = _server(clip)

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            out = []
            for sid, factor, dtype in (("ok", 4, "uint16"), ("u8", 4, "uint8")):
                call = open_stream(ch)
                out.append(await ask(call, hello(server, clip, stream_id=sid, input_factor=factor,
                                                 input_dtype=dtype)))
            return out

    ok, u8 = run(main)
    assert kind(ok) == "welcome"
    assert kind(u8) == "error" and u8.error.code == pb.Error.CODE_PROTOCOL_VIOLATION
    assert "factor 4" in u8.error.message


def test_new_fields_are_validated_on_the_wire(clip: Clip) -> None:
    """Hello.results / input_factor and the Packets field / flush: bad values are clean WireErrors."""
    server = _server(clip)
    bad_hellos = {
        "hello.results": hello(server, clip, results=7),
        "hello.input_factor: 65": hello(server, clip, input_factor=65),
        "hello.input_factor: uint16": hello(server, clip, input_factor=1),
    }
    for match, msg in bad_hellos.items():
        with pytest.raises(wire.WireError, match=match):
            wire.parse_edge_message(msg.SerializeToString())
    grid = np.zeros((4, 5), np.int16)
    cs = "0" * 16
    pkt = pb.Packet(data=b"x")
    ok = pb.Packets(seq=2, base_seq=1, packets=[pkt], checksum=cs, dy=wire.encode_tensor(grid),
                    dx=wire.encode_tensor(grid), valid=wire.encode_tensor(grid.astype(bool)), field_base_seq=1)
    wire.validate_edge_message(pb.EdgeMessage(packets=ok))
    wire.validate_edge_message(pb.EdgeMessage(packets=pb.Packets(seq=2, base_seq=1, checksum=cs, flush=True)))
    bad = {
        "0 packets": pb.Packets(seq=2, base_seq=1, checksum=cs),
        "all or none": pb.Packets(seq=2, base_seq=1, packets=[pkt], checksum=cs, dy=wire.encode_tensor(grid)),
        r"packets\.dx": pb.Packets(seq=2, base_seq=1, packets=[pkt], checksum=cs, dy=wire.encode_tensor(grid),
                                   dx=wire.encode_tensor(grid[:2]), valid=wire.encode_tensor(grid.astype(bool))),
        "field_base_seq": pb.Packets(seq=2, base_seq=1, packets=[pkt], checksum=cs, dy=wire.encode_tensor(grid),
                                     dx=wire.encode_tensor(grid), valid=wire.encode_tensor(grid.astype(bool)),
                                     field_base_seq=2),
    }
    for match, p in bad.items():
        with pytest.raises(wire.WireError, match=match):
            wire.validate_edge_message(pb.EdgeMessage(packets=p))


def test_bitstream_flush_drains_and_then_needs_a_keyframe(clip: Clip) -> None:
    """``flush`` on the last Packets drains the decoder (the frame still answers); plain packets after it need a
    keyframe, and packets from the keyframe on restart it."""
    server = _server(clip)
    tap = PacketTap(clip_path("cup"), max_frames=3)
    tfs = list(tap)
    cs = [wire.checksum(clip.inputs[t]) for t in range(3)]

    async def main() -> list[pb.CloudMessage]:
        async with serving(server) as port, channel(port) as ch:
            call = open_stream(ch)
            await ask(call, _bitstream_hello(server, clip, tap))
            out = [await ask(call, _packets_msg(1, 0, tfs[0].packets, cs[0]))]
            m = _packets_msg(2, 1, tfs[1].packets, cs[1])
            m.packets.flush = True
            out.append(await ask(call, m))
            out.append(await ask(call, _packets_msg(3, 2, tfs[2].packets, cs[2])))
            out.append(await ask(call, _packets_msg(3, 2, [p for t in tfs for p in t.packets], cs[2])))
            return out

    first, flushed, lost, restarted = run(main)
    assert kind(first) == "result" and kind(flushed) == "result" and flushed.result.checksum == cs[1]
    assert kind(lost) == "need_keyframe"
    assert kind(restarted) == "result" and restarted.result.checksum == cs[2]
