"""Wire protocol of fluxshard.edgecloud: tensor round trips, hostile input → WireError only (fuzzed, bounded
memory), message validation, generated code is current, and a real grpc.aio stream over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxshard.edgecloud import wire
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.proto import fluxshard_pb2_grpc as pb_grpc
from fluxshard.edgecloud.wire import WireError, WireLimits
from fluxshard.errors import FluxShardError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = sorted(wire.ALLOWED_DTYPES)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3), (4, 5, 6), (1, 2, 3, 4), (33, 40)]
# FLUXSHARD_FUZZ_EXAMPLES=5000 for a long hunt (the default keeps each fuzz test well under a second)
FUZZ = settings(
    max_examples=int(os.environ.get("FLUXSHARD_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("float"):
        return rng.normal(0, 100, shape).astype(dtype)
    info = np.iinfo(dtype)
    # a smooth-ish ramp plus noise: compressible, so both compression branches are exercised
    ramp = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 50
    return np.clip(ramp + rng.integers(-3, 4, shape), info.min, info.max).astype(dtype)


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...], compress: bool) -> None:
    a = _array(dtype, shape)
    t = wire.encode_tensor(a, compress=compress)
    assert t.raw_size == a.nbytes and list(t.shape) == list(shape) and t.dtype == dtype
    if not compress:
        assert t.compression == pb.Tensor.COMPRESSION_NONE
    b = wire.decode_tensor(pb.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape
    assert b.tobytes() == a.tobytes()  # bitwise, NaN-safe
    assert wire.checksum(b) == wire.checksum(a)


def test_compression_used_only_where_it_helps() -> None:
    smooth = np.zeros((480, 640, 3), np.uint8)
    t = wire.encode_tensor(smooth)
    assert t.compression == pb.Tensor.COMPRESSION_ZSTD and len(t.data) < 1000
    noise = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)
    t = wire.encode_tensor(noise)  # incompressible: sent raw, never larger than the array
    assert t.compression == pb.Tensor.COMPRESSION_NONE and len(t.data) == noise.nbytes


def test_big_endian_and_strided_inputs_go_out_little_endian_c_order() -> None:
    a = np.arange(24, dtype=">u2").reshape(4, 6)[:, ::2]
    b = wire.decode_tensor(wire.encode_tensor(a, compress=False))
    assert b.dtype == np.dtype("<u2") and np.array_equal(a, b)
    assert wire.checksum(a) == wire.checksum(b)


def test_decoded_tensor_is_read_only() -> None:
    b = wire.decode_tensor(wire.encode_tensor(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ValueError, match="read-only"):
        b[0, 0] = 1


def test_checksum_covers_dtype_shape_and_bytes() -> None:
    a = np.arange(12, dtype=np.uint8)
    sums = {wire.checksum(x) for x in (a, a.reshape(3, 4), a.reshape(4, 3), a.astype(np.int16), a[::-1])}
    assert len(sums) == 5
    assert wire.checksum(a.reshape(3, 4)) == wire.checksum(a.copy().reshape(3, 4))
    assert len(wire.checksum(a)) == 16 and int(wire.checksum(a), 16) >= 0


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros(3, np.float64), "dtype float64"),
        (np.array(["a"], dtype=object), "dtype object"),
        (np.zeros((1, 1, 1, 1, 1), np.uint8), "5 dimensions"),
    ],
)
def test_encode_refuses_what_the_wire_cannot_carry(array: np.ndarray, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.encode_tensor(array)


# ---------------------------------------------------------------------------------------------------- hostile tensors


def _valid(shape: tuple[int, ...] = (64, 64), dtype: str = "uint8", compress: bool = True) -> pb.Tensor:
    return wire.encode_tensor(_array(dtype, shape), compress=compress)


def _zstd(raw: bytes, **kw: object) -> bytes:
    return zstandard.ZstdCompressor(level=3, **kw).compress(raw)


def _tensor(**fields: object) -> pb.Tensor:
    return pb.Tensor(**fields)


HOSTILE: dict[str, tuple[Callable[[], pb.Tensor], str]] = {
    "unknown dtype": (lambda: _tensor(dtype="float64", shape=[1], data=b"\0" * 8, raw_size=8), "dtype 'float64'"),
    "empty dtype": (lambda: _tensor(dtype="", shape=[1], data=b"\0", raw_size=1), "dtype ''"),
    "object dtype": (lambda: _tensor(dtype="object", shape=[1], data=b"\0" * 8, raw_size=8), "not allowed"),
    "negative dim": (lambda: _tensor(dtype="uint8", shape=[-1, 4], data=b"", raw_size=0), "negative dimension"),
    "huge dims": (lambda: _tensor(dtype="uint8", shape=[2**40, 2**40], data=b"", raw_size=0), "limit"),
    "huge product overflowing int64": (
        lambda: _tensor(dtype="float32", shape=[2**62, 2**62, 4], data=b"", raw_size=16),
        "limit",
    ),
    "empty with a huge axis": (lambda: _tensor(dtype="bool", shape=[0, 0, 2**60], raw_size=0), "longer than"),
    "five dims": (lambda: _tensor(dtype="uint8", shape=[1] * 5, data=b"\0", raw_size=1), "5 dimensions"),
    "raw_size too big": (lambda: _tensor(dtype="uint8", shape=[4], data=b"\0" * 4, raw_size=5), "raw_size 5"),
    "raw_size huge": (lambda: _tensor(dtype="uint8", shape=[4], data=b"\0" * 4, raw_size=2**64 - 1), "raw_size"),
    "short raw data": (lambda: _tensor(dtype="int32", shape=[4], data=b"\0" * 15, raw_size=16), "15 data bytes"),
    "long raw data": (lambda: _tensor(dtype="int32", shape=[4], data=b"\0" * 17, raw_size=16), "17 data bytes"),
    "shape/size mismatch": (lambda: _tensor(dtype="uint16", shape=[3, 3], data=b"\0" * 9, raw_size=9), "raw_size 9"),
    "unknown compression": (
        lambda: _tensor(dtype="uint8", shape=[4], data=b"\0" * 4, raw_size=4, compression=7),
        "unknown compression 7",
    ),
    "zstd bad magic": (
        lambda: _tensor(dtype="uint8", shape=[100], data=b"\0" * 20, raw_size=100, compression=1),
        "bad magic",
    ),
    "zstd empty data": (lambda: _tensor(dtype="uint8", shape=[100], raw_size=100, compression=1), "zstd bytes"),
    "zstd of empty tensor": (
        lambda: _tensor(dtype="uint8", shape=[0], data=_zstd(b""), raw_size=0, compression=1),
        "empty tensor",
    ),
    "zstd truncated": (
        lambda: _tensor(
            dtype="uint8", shape=[4096], data=_zstd(bytes(range(256)) * 16)[:-6], raw_size=4096, compression=1
        ),
        "truncated",
    ),
    "zstd header only": (
        lambda: _tensor(dtype="uint8", shape=[4096], data=_zstd(bytes(4096))[:6], raw_size=4096, compression=1),
        "zstd",
    ),
    "zstd trailing bytes": (
        lambda: _tensor(dtype="uint8", shape=[4096], data=_zstd(bytes(4096)) + b"junk", raw_size=4096, compression=1),
        "trailing",
    ),
    "zstd two frames": (
        lambda: _tensor(dtype="uint8", shape=[10], data=_zstd(b"a" * 10) * 2, raw_size=10, compression=1),
        "trailing",
    ),
    "zstd declares less than raw_size": (
        lambda: _tensor(dtype="uint8", shape=[200], data=_zstd(b"a" * 100), raw_size=200, compression=1),
        "declares 100 bytes",
    ),
    "zstd declares more than raw_size (bomb)": (
        lambda: _tensor(dtype="uint8", shape=[100], data=_zstd(bytes(50_000_000)), raw_size=100, compression=1),
        "zstd",
    ),
    "zstd without content size": (
        lambda: _tensor(
            dtype="uint8", shape=[1000], data=_zstd(b"a" * 1000, write_content_size=False), raw_size=1000, compression=1
        ),
        "declares -1 bytes",
    ),
    "bool holding 2": (lambda: _tensor(dtype="bool", shape=[3], data=b"\0\1\2", raw_size=3), "bool tensor"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tensor_is_a_wire_error_naming_the_problem(case: str) -> None:
    make, problem = HOSTILE[case]
    t = make()
    with pytest.raises(WireError, match=problem) as err:
        wire.decode_tensor(t, max_bytes=1 << 20, field="delta.pixels")
    assert str(err.value).startswith("delta.pixels: ") and "\n" not in str(err.value)
    assert isinstance(err.value, FluxShardError)


def test_expect_shape_and_allowed_dtypes() -> None:
    t = _valid((4, 5))
    assert wire.decode_tensor(t, expect_shape=(4, None)).shape == (4, 5)
    with pytest.raises(WireError, match=r"shape \[4, 5\], expected \[4, 6\]"):
        wire.decode_tensor(t, expect_shape=(4, 6))
    with pytest.raises(WireError, match="expected"):
        wire.decode_tensor(t, expect_shape=(20,))
    with pytest.raises(WireError, match=r"dtype 'uint8' is not allowed \(allowed: int16\)"):
        wire.decode_tensor(t, allowed_dtypes=frozenset({"int16"}))
    with pytest.raises(WireError, match="limit 19"):
        wire.decode_tensor(t, max_bytes=19)


def _decode_bounded(t: pb.Tensor, max_bytes: int = 1 << 20) -> None:
    """decode_tensor → an array consistent with the header, or WireError; peak allocation bounded by the input
    plus max_bytes (never what a forged header claims)."""
    data_len = len(t.data)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        try:
            arr = wire.decode_tensor(t, max_bytes=max_bytes)
        except WireError as e:
            assert str(e) and "\n" not in str(e)
        else:
            assert arr.nbytes == t.raw_size <= max_bytes and arr.shape == tuple(t.shape) and arr.dtype.name == t.dtype
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 3 * data_len + max_bytes + (256 << 10), f"peak {peak} bytes for {data_len} data bytes"


_dims = st.one_of(st.integers(0, 8), st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**31, 2**32, 2**40, -1]))
_raw_size = st.one_of(st.integers(0, 512), st.integers(0, 2**64 - 1))
_dtype = st.one_of(
    st.sampled_from(DTYPES), st.sampled_from(["float64", "object", "<u2", "U8", "", "uint8\0"]), st.text(max_size=8)
)
_data = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=600).map(lambda b: _zstd(b)),
    st.tuples(st.binary(min_size=1, max_size=600), st.integers(0, 40)).map(lambda p: _zstd(p[0])[: -p[1] or None]),
    st.integers(0, 10_000_000).map(lambda n: _zstd(bytes(n))),  # small frames that expand a lot
)


@FUZZ
@given(
    dtype=_dtype,
    shape=st.lists(_dims, max_size=6),
    data=_data,
    compression=st.sampled_from([0, 1, 1, 2, -1]),
    raw_size=_raw_size,
)
def test_fuzzed_hostile_tensors_only_raise_wire_error(
    dtype: str, shape: list[int], data: bytes, compression: int, raw_size: int
) -> None:
    _decode_bounded(pb.Tensor(dtype=dtype, shape=shape, data=data, compression=compression, raw_size=raw_size))


_MUTATIONS = ["truncate", "append", "flip", "raw_size", "dim", "dtype", "compression"]


@FUZZ
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 12), max_size=4),
    compress=st.booleans(),
    mutation=st.sampled_from(_MUTATIONS),
    where=st.integers(0, 2**16),
    value=st.integers(-(2**63), 2**63 - 1),
)
def test_fuzzed_mutations_of_valid_tensors_only_raise_wire_error(
    dtype: str, shape: list[int], compress: bool, mutation: str, where: int, value: int
) -> None:
    t = wire.encode_tensor(_array(dtype, tuple(shape), seed=where), compress=compress)
    data = bytearray(t.data)
    if mutation == "truncate":
        t.data = bytes(data[: where % (len(data) + 1)])
    elif mutation == "append":
        t.data = bytes(data) + value.to_bytes(8, "little", signed=True)[: 1 + where % 8]
    elif mutation == "flip" and data:
        data[where % len(data)] ^= 1 + value % 255
        t.data = bytes(data)
    elif mutation == "raw_size":
        t.raw_size = abs(value)
    elif mutation == "dim":
        if t.shape:
            t.shape[where % len(t.shape)] = value
        else:
            t.shape.append(value)
    elif mutation == "dtype":
        t.dtype = DTYPES[where % len(DTYPES)]
    else:
        t.compression = 1 - t.compression
    _decode_bounded(t)


# ---------------------------------------------------------------------------------------------------- messages


def _hello(**over: object) -> pb.Hello:
    fields = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "stream_id": "cam-1",
        "model_name": "nanodet",
        "model_hash": "0123abcd",
        "mode": pb.ENGINE_MODE_EXACT,
        "input_shape": [3, 32, 48],
        "input_dtype": "uint8",
        "block_size": 16,
        "payload_kind": pb.PAYLOAD_KIND_RESIDUAL,
    }
    fields.update(over)
    return pb.Hello(**fields)


def _keyframe(seq: int = 1) -> pb.Keyframe:
    x = _array("uint8", (3, 32, 48))
    return pb.Keyframe(seq=seq, input=wire.encode_tensor(x), checksum=wire.checksum(x))


def _delta(indices: np.ndarray | None = None, grid: tuple[int, int] = (2, 3), **over: object) -> pb.Delta:
    idx = np.array([0, 2, 5], np.int32) if indices is None else indices
    fields = {
        "seq": 5,
        "base_seq": 3,
        "dy": wire.encode_tensor(np.zeros(grid, np.int16)),
        "dx": wire.encode_tensor(np.ones(grid, np.int16)),
        "valid": wire.encode_tensor(np.ones(grid, bool)),
        "block_indices": wire.encode_tensor(idx),
        "pixels": wire.encode_tensor(np.zeros((len(idx), 16, 16, 3), np.uint8)),
        "checksum": "0123456789abcdef",
    }
    fields.update(over)
    return pb.Delta(**fields)


def _packets(**over: object) -> pb.Packets:
    fields = {"seq": 4, "base_seq": 3, "packets": [pb.Packet(data=b"\0\0\1", pts=1, dts=1)], "checksum": "f" * 16}
    fields.update(over)
    return pb.Packets(**fields)


VALID_EDGE = {
    "hello": pb.EdgeMessage(hello=_hello()),
    "hello bitstream": pb.EdgeMessage(
        hello=_hello(
            payload_kind=pb.PAYLOAD_KIND_BITSTREAM,
            codec=pb.CodecParameters(codec_name="h264", extradata=b"\1\2", width=48, height=32, pix_fmt="yuv420p"),
        )
    ),
    "keyframe": pb.EdgeMessage(keyframe=_keyframe()),
    "delta": pb.EdgeMessage(delta=_delta()),
    "delta without blocks": pb.EdgeMessage(delta=_delta(np.zeros(0, np.int32))),
    "packets": pb.EdgeMessage(packets=_packets()),
    "packets decode only": pb.EdgeMessage(packets=_packets(checksum="", decode_only=True)),
    "bye": pb.EdgeMessage(bye=pb.Bye(reason="end of clip")),
}


@pytest.mark.parametrize("name", list(VALID_EDGE))
def test_valid_edge_messages_parse(name: str) -> None:
    msg = VALID_EDGE[name]
    parsed = wire.parse_edge_message(msg.SerializeToString())
    assert parsed == msg and wire.validate_edge_message(parsed) == name.split()[0]


BAD_EDGE = {
    "empty": (pb.EdgeMessage(), "edge message: empty"),
    "hello no version": (pb.EdgeMessage(hello=_hello(protocol_version=0)), "hello.protocol_version: missing"),
    "hello no stream id": (pb.EdgeMessage(hello=_hello(stream_id="")), "hello.stream_id: missing"),
    "hello long stream id": (pb.EdgeMessage(hello=_hello(stream_id="x" * 129)), "hello.stream_id: 129 characters"),
    "hello control chars": (pb.EdgeMessage(hello=_hello(stream_id="a\nb")), "non-printable"),
    "hello no model hash": (pb.EdgeMessage(hello=_hello(model_hash="")), "hello.model_hash: missing"),
    "hello no mode": (pb.EdgeMessage(hello=_hello(mode=0)), "hello.mode"),
    "hello unknown mode": (pb.EdgeMessage(hello=_hello(mode=9)), "hello.mode: 9"),
    "hello no shape": (pb.EdgeMessage(hello=_hello(input_shape=[])), "hello.input_shape"),
    "hello zero dim": (pb.EdgeMessage(hello=_hello(input_shape=[3, 0, 4])), "hello.input_shape"),
    "hello huge input": (pb.EdgeMessage(hello=_hello(input_shape=[65536, 65536, 3])), "exceeds"),
    "hello bad dtype": (pb.EdgeMessage(hello=_hello(input_dtype="float64")), "hello.input_dtype"),
    "hello no block size": (pb.EdgeMessage(hello=_hello(block_size=0)), "hello.block_size: 0"),
    "hello no payload kind": (pb.EdgeMessage(hello=_hello(payload_kind=0)), "hello.payload_kind"),
    "hello bitstream no codec": (
        pb.EdgeMessage(hello=_hello(payload_kind=pb.PAYLOAD_KIND_BITSTREAM)),
        "hello.codec: missing",
    ),
    "keyframe no input": (pb.EdgeMessage(keyframe=pb.Keyframe(seq=1, checksum="0" * 16)), "keyframe.input: missing"),
    "keyframe bad checksum": (
        pb.EdgeMessage(keyframe=pb.Keyframe(seq=1, input=_valid(), checksum="XYZ")),
        "keyframe.checksum",
    ),
    "keyframe hostile tensor": (
        pb.EdgeMessage(keyframe=pb.Keyframe(seq=1, input=_tensor(dtype="uint8", shape=[-3]), checksum="0" * 16)),
        "keyframe.input: negative",
    ),
    "delta no dx": (pb.EdgeMessage(delta=_delta(dx=None)), "delta.dx: missing"),
    "delta base after seq": (pb.EdgeMessage(delta=_delta(base_seq=5)), "delta.base_seq"),
    "delta dy wrong dtype": (pb.EdgeMessage(delta=_delta(dy=_valid((2, 3)))), "delta.dy: dtype 'uint8'"),
    "delta field 1-d": (pb.EdgeMessage(delta=_delta(grid=(6,), indices=np.zeros(0, np.int32))), "2-d block grid"),
    "delta valid other grid": (
        pb.EdgeMessage(delta=_delta(valid=wire.encode_tensor(np.ones((3, 2), bool)))),
        "delta.valid: shape",
    ),
    "delta indices int64": (
        pb.EdgeMessage(delta=_delta(block_indices=wire.encode_tensor(np.array([0, 1, 2], np.int64)))),
        "delta.block_indices: dtype",
    ),
    "delta pixels count": (
        pb.EdgeMessage(delta=_delta(pixels=wire.encode_tensor(np.zeros((2, 16, 16, 3), np.uint8)))),
        "delta.pixels: shape",
    ),
    "delta pixels float": (
        pb.EdgeMessage(delta=_delta(pixels=wire.encode_tensor(np.zeros((3, 4), np.float32)))),
        "delta.pixels: dtype",
    ),
    "packets none": (pb.EdgeMessage(packets=_packets(packets=[])), "packets.packets: 0 packets"),
    "packets empty packet": (pb.EdgeMessage(packets=_packets(packets=[pb.Packet()])), r"packets.packets\[0\].data"),
    "packets no checksum": (pb.EdgeMessage(packets=_packets(checksum="")), "packets.checksum"),
    "bye long": (pb.EdgeMessage(bye=pb.Bye(reason="x" * 5000)), "bye.reason: 5000 characters"),
}


@pytest.mark.parametrize("name", list(BAD_EDGE))
def test_malformed_edge_messages_name_the_field(name: str) -> None:
    msg, problem = BAD_EDGE[name]
    with pytest.raises(WireError, match=problem):
        wire.parse_edge_message(msg.SerializeToString())


def test_decoded_bytes_are_budgeted_per_message() -> None:
    """Each tensor under the limit, together over it: refused before decompressing any of them."""
    limits = WireLimits(max_decoded_bytes=1999)
    msg = pb.EdgeMessage(delta=_delta(grid=(20, 20), indices=np.zeros(0, np.int32)))  # 800 + 800 + 400 bytes
    wire.validate_edge_message(msg, WireLimits(max_decoded_bytes=2100))
    with pytest.raises(WireError, match=r"delta\.valid: .* limit 399"):
        wire.validate_edge_message(msg, limits)


def test_message_size_limit_and_garbage_bytes() -> None:
    data = pb.EdgeMessage(keyframe=_keyframe()).SerializeToString()
    with pytest.raises(WireError, match=f"edge message: {len(data)} bytes, limit 100"):
        wire.parse_edge_message(data, WireLimits(max_message_bytes=100))
    with pytest.raises(WireError, match="not a valid protobuf message"):
        wire.parse_edge_message(b"\xff\xff\xff\xff")
    with pytest.raises(WireError, match="not a valid protobuf message"):
        wire.parse_edge_message(data[: len(data) // 2])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzzed_random_bytes_parse_cleanly(data: bytes) -> None:
    for parse in (wire.parse_edge_message, wire.parse_cloud_message):
        try:
            parse(data)
        except WireError as e:
            assert "\n" not in str(e)


_SERIALIZED = [m.SerializeToString() for m in VALID_EDGE.values()]


@FUZZ
@given(
    which=st.integers(0, len(_SERIALIZED) - 1),
    cut=st.integers(0, 2**16),
    flips=st.lists(st.integers(0, 2**16), max_size=4),
)
def test_fuzzed_truncated_and_flipped_messages_parse_cleanly(which: int, cut: int, flips: list[int]) -> None:
    data = bytearray(_SERIALIZED[which])
    for f in flips:
        data[f % len(data)] ^= 1 + f % 255
    data = data[: len(data) - cut % (len(data) + 1)] if cut % 3 else data
    try:
        msg = wire.parse_edge_message(bytes(data))
    except WireError:
        return
    if msg.WhichOneof("body") == "delta":  # structurally valid: the payload decode is still total
        with contextlib.suppress(WireError):
            wire.decode_delta(msg.delta)


def test_decode_delta_checks_indices_against_the_grid() -> None:
    d = wire.decode_delta(_delta())
    assert d.dy.shape == (2, 3) and d.valid.dtype == bool and d.block_indices.tolist() == [0, 2, 5]
    assert d.pixels.shape == (3, 16, 16, 3) and (d.seq, d.base_seq) == (5, 3)
    for bad in ([0, 2, 6], [-1, 2, 3], [2, 2, 3], [3, 2, 1]):
        with pytest.raises(WireError, match=r"delta.block_indices: not strictly increasing within the \(2, 3\)"):
            wire.decode_delta(_delta(np.array(bad, np.int32)))


def test_decode_keyframe_checks_the_stream_input() -> None:
    hello = _hello()
    k = _keyframe()
    assert wire.checksum(wire.decode_keyframe(k, hello)) == k.checksum
    with pytest.raises(WireError, match=r"keyframe.input: shape \[3, 32, 48\], expected \[3, 64, 48\]"):
        wire.decode_keyframe(k, _hello(input_shape=[3, 64, 48]))
    with pytest.raises(WireError, match=r"keyframe\.input: dtype 'uint8', the stream declared uint16"):
        wire.decode_keyframe(k, _hello(input_dtype="uint16"))


def test_cloud_messages() -> None:
    ok = [
        pb.CloudMessage(welcome=pb.Welcome(protocol_version=1, stream_id="cam-1", server_id="s")),
        pb.CloudMessage(
            result=pb.Result(seq=3, outputs={"boxes": _valid((5, 4), "float32")}, compute_ms=4.5, checksum="a" * 16)
        ),
        pb.CloudMessage(need_keyframe=pb.NeedKeyframe(seq=3, reason=pb.NeedKeyframe.REASON_EVICTED)),
        pb.CloudMessage(error=pb.Error(code=pb.Error.CODE_MODEL_MISMATCH, message="hash differs")),
    ]
    assert [wire.validate_cloud_message(m) for m in ok] == ["welcome", "result", "need_keyframe", "error"]
    bad = [
        (pb.CloudMessage(), "cloud message: empty"),
        (pb.CloudMessage(welcome=pb.Welcome(stream_id="x")), "welcome.protocol_version"),
        (pb.CloudMessage(result=pb.Result(seq=1, compute_ms=float("nan"), checksum="a" * 16)), "result.compute_ms"),
        (pb.CloudMessage(result=pb.Result(seq=1, queue_ms=-1, checksum="a" * 16)), "result.queue_ms"),
        (pb.CloudMessage(result=pb.Result(seq=1)), "result.checksum"),
        (pb.CloudMessage(result=pb.Result(outputs={"": _valid()}, checksum="a" * 16)), "result.outputs name: missing"),
        (pb.CloudMessage(need_keyframe=pb.NeedKeyframe(seq=1)), "need_keyframe.reason: unknown reason 0"),
        (pb.CloudMessage(error=pb.Error(code=42)), "error.code: unknown code 42"),
    ]
    for msg, problem in bad:
        with pytest.raises(WireError, match=problem):
            wire.parse_cloud_message(msg.SerializeToString())


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="float64"):
        WireLimits(allowed_dtypes=frozenset({"float64"}))
    with pytest.raises(ValueError, match="positive"):
        WireLimits(max_message_bytes=0)


# ---------------------------------------------------------------------------------------------------- generated code


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    committed = ROOT / "src" / "fluxshard" / "edgecloud" / "proto"
    for name in ("fluxshard_pb2.py", "fluxshard_pb2.pyi", "fluxshard_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run tools/gen_proto.py"
        )
    assert "from . import fluxshard_pb2" in (committed / "fluxshard_pb2_grpc.py").read_text()


# ---------------------------------------------------------------------------------------------------- grpc.aio


class _Echo(pb_grpc.InferenceServicer):
    """Answers Hello with Welcome and a Keyframe with a Result holding what it decoded (and its checksum)."""

    async def Stream(  # the generated (CamelCase) method name
        self, request_iterator: AsyncIterator[pb.EdgeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloudMessage]:
        hello = None
        async for msg in request_iterator:
            kind = wire.validate_edge_message(msg)
            if kind == "hello":
                hello = msg.hello
                yield pb.CloudMessage(welcome=pb.Welcome(protocol_version=1, stream_id=hello.stream_id, server_id="t"))
            elif kind == "keyframe":
                assert hello is not None
                x = wire.decode_keyframe(msg.keyframe, hello)
                out = {
                    "sum": wire.encode_tensor(np.array(int(x.sum(dtype=np.int64)))),
                    "first": wire.encode_tensor(x[0, :2]),
                }
                yield pb.CloudMessage(
                    result=pb.Result(seq=msg.keyframe.seq, outputs=out, compute_ms=1.0, checksum=wire.checksum(x))
                )


async def _serve(options: list[tuple[str, int]]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=options)
    pb_grpc.add_InferenceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_grpc_aio_round_trip_keyframe_to_result() -> None:
    """Generated stubs under grpc.aio on loopback, with a 6.2 MB incompressible keyframe (over gRPC's 4 MiB
    default: passes only because both ends apply the wire limits)."""
    shape = [3, 1080, 1920]
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    small = _keyframe(seq=2)

    async def main() -> list[pb.CloudMessage]:
        server, port = await _serve(wire.server_options())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options()) as channel:
                call = pb_grpc.InferenceStub(channel).Stream()
                await call.write(pb.EdgeMessage(hello=_hello(input_shape=shape)))
                replies = [await call.read()]
                key = pb.Keyframe(seq=1, input=wire.encode_tensor(frame), checksum=wire.checksum(frame))
                assert key.ByteSize() > 4 * 2**20
                await call.write(pb.EdgeMessage(keyframe=key))
                replies.append(await call.read())
                await call.write(pb.EdgeMessage(hello=_hello()))
                replies.append(await call.read())
                await call.write(pb.EdgeMessage(keyframe=small))
                replies.append(await call.read())
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
                return replies
        finally:
            await server.stop(None)

    welcome, result, _, result_small = asyncio.run(asyncio.wait_for(main(), 10))
    assert [wire.validate_cloud_message(m) for m in (welcome, result, result_small)] == ["welcome", "result", "result"]
    assert welcome.welcome.stream_id == "cam-1"
    assert result.result.seq == 1 and result.result.checksum == wire.checksum(frame)
    assert int(wire.decode_tensor(result.result.outputs["sum"])) == int(frame.sum(dtype=np.int64))
    assert np.array_equal(wire.decode_tensor(result.result.outputs["first"]), frame[0, :2])
    assert result_small.result.seq == 2 and result_small.result.checksum == small.checksum


def test_grpc_malformed_bytes_end_only_their_stream() -> None:
    """Garbage on one stream fails that call; a second stream on the same server is answered."""

    async def main() -> tuple[grpc.StatusCode, str]:
        server, port = await _serve(wire.server_options())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options()) as channel:
                good = pb_grpc.InferenceStub(channel).Stream()
                await good.write(pb.EdgeMessage(hello=_hello()))
                assert (await good.read()).WhichOneof("body") == "welcome"
                raw = channel.stream_stream(
                    "/fluxshard.edgecloud.v1.Inference/Stream",
                    request_serializer=lambda b: b,
                    response_deserializer=pb.CloudMessage.FromString,
                )()
                await raw.write(b"\xff\xff\xff\xff\x0f")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw.read()
                await good.write(pb.EdgeMessage(keyframe=_keyframe(seq=7)))
                reply = await good.read()
                await good.done_writing()
                return err.value.code(), reply.result.checksum
        finally:
            await server.stop(None)

    code, checksum = asyncio.run(asyncio.wait_for(main(), 10))
    assert code != grpc.StatusCode.OK
    assert checksum == _keyframe(seq=7).checksum


def test_default_keepalive_is_permitted_by_the_default_server() -> None:
    """The edge pings no more often than the server accepts (else each ping is a strike → GOAWAY)."""
    client = dict(wire.channel_options())
    server = dict(wire.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1 and client["grpc.http2.max_pings_without_data"] == 0
    assert (
        client["grpc.max_receive_message_length"] == server["grpc.max_receive_message_length"] == wire.MAX_MESSAGE_BYTES
    )


@pytest.mark.slow
def test_grpc_keepalive_pings_on_an_idle_stream_are_permitted() -> None:
    """The edge pings every second (gRPC's floor) on a stream idle for 6 s; with server_options the server accepts
    them. Measured control: a server with gRPC's defaults strikes from the third ping and answers GOAWAY
    too_many_pings ~5 s in, which kills the stream. ~6.2 s, hence slow."""

    async def main() -> str:
        server, port = await _serve(wire.server_options(min_ping_interval_ms=500))
        try:
            options = wire.channel_options(keepalive_time_ms=1000, keepalive_timeout_ms=1000)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                call = pb_grpc.InferenceStub(channel).Stream()
                await call.write(pb.EdgeMessage(hello=_hello()))
                await call.read()
                await asyncio.sleep(6)
                await call.write(pb.EdgeMessage(keyframe=_keyframe(seq=9)))
                reply = await call.read()
                await call.done_writing()
                return reply.result.checksum
        finally:
            await server.stop(None)

    assert asyncio.run(asyncio.wait_for(main(), 20)) == _keyframe(seq=9).checksum
