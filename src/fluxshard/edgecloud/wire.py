"""Wire format of the edge–cloud protocol: tensors, message validation, checksums, limits, gRPC options.

Everything a peer receives is hostile until checked here: a tensor's dtype, shape and declared size are
validated *before* anything is allocated, zstd frames must declare exactly the declared size (so a forged
header cannot make the decompressor allocate more), and every violation raises :class:`WireError` with one line
naming the field and the problem. Structural checks only; stream semantics (seq order, base_seq against the
cache, model hash) are the server's job.

zstd level 3 (``ZSTD_LEVEL``): on real residual payloads (640x480 RGB, changed 16x16 blocks of vtest / cup)
level 3 gives 2-5 % fewer bytes than level 1 at about the same speed (~0.4-0.9 ms per 80-150 kB payload),
while level 6 saves only ~2 % more for 3-4x the time, which a 25-130 Mbit/s link does not repay.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.errors import FluxShardError

PROTOCOL_VERSION = 1
ALLOWED_DTYPES: frozenset[str] = frozenset({"uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "bool"})
MAX_DIMS = 4
MAX_MESSAGE_BYTES = 64 * 2**20  # one serialized gRPC message (a 1080p float32 keyframe is 25 MB)
MAX_DECODED_BYTES = 64 * 2**20  # all tensors of one message together, after decompression
MAX_NAME_CHARS = 128  # stream id, model name / hash, output names, codec name
MAX_TEXT_CHARS = 1024  # free-text reasons and details
MAX_PACKETS = 1024  # compressed packets in one Packets message
MAX_OUTPUTS = 64  # named tensors in one Result
MAX_EXTRADATA_BYTES = 1 << 20
MAX_INPUT_DIM = 1 << 16  # any axis of the engine input
MAX_BLOCK_SIZE = 1024
MAX_INPUT_FACTOR = 64  # Hello.input_factor (uint16 box sums allow at most 16: 255·f² must fit)
ZSTD_LEVEL = 3
MIN_COMPRESS_BYTES = 64  # below this a zstd frame header costs more than it saves

# Keepalive: the client pings every KEEPALIVE_TIME_MS, even on an idle stream; the server must accept pings that
# often (MIN_PING_INTERVAL_MS <= KEEPALIVE_TIME_MS), otherwise each ping is a strike and the server sends GOAWAY.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = 5_000
SERVER_KEEPALIVE_TIME_MS = 30_000  # the server's own pings find dead edges

_CHECKSUM_RE = re.compile(r"[0-9a-f]{16}")
_MAX_SPAN = 1 << 40  # product of the non-zero axes of any tensor (empty ones included)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}
_COMPRESSIONS = (pb.Tensor.COMPRESSION_NONE, pb.Tensor.COMPRESSION_ZSTD)
_local = threading.local()


class WireError(FluxShardError):
    """A message or tensor from the peer is malformed or exceeds a limit; the stream carrying it must end."""


@dataclass(frozen=True)
class WireLimits:
    """Receive limits (configurable per server / edge; the defaults are the module constants)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_decoded_bytes: int = MAX_DECODED_BYTES
    allowed_dtypes: frozenset[str] = ALLOWED_DTYPES

    def __post_init__(self) -> None:
        if self.max_message_bytes <= 0 or self.max_decoded_bytes <= 0:
            raise ValueError("WireLimits: byte limits must be positive")
        unknown = set(self.allowed_dtypes) - ALLOWED_DTYPES
        if unknown:
            raise ValueError(f"WireLimits: dtypes {sorted(unknown)} are not supported on the wire")


DEFAULT_LIMITS = WireLimits()


@dataclass(frozen=True)
class DeltaArrays:
    """The decoded tensors of a Delta, cross-checked (same grid for the field, indices sorted and in range)."""

    seq: int
    base_seq: int
    dy: np.ndarray
    dx: np.ndarray
    valid: np.ndarray
    block_indices: np.ndarray
    pixels: np.ndarray
    checksum: str


# ---------------------------------------------------------------------------------------------------- tensors


def checksum(arr: np.ndarray) -> str:
    """blake2b-64 hex over dtype name, shape and little-endian C-order bytes: equal iff the arrays are equal."""
    a = np.asarray(arr)
    a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)  # not ascontiguousarray: it makes 0-d 1-d
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.dtype.name}|{','.join(str(d) for d in a.shape)}|".encode())
    h.update(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    return h.hexdigest()


def _compressor() -> zstandard.ZstdCompressor:
    """One compressor per thread (zstd contexts are not thread-safe, and building one per call costs a context)."""
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def encode_tensor(arr: np.ndarray, compress: bool = True) -> pb.Tensor:
    """Array → ``Tensor`` (raw little-endian bytes + dtype + shape); zstd only where it makes the data smaller."""
    a = np.asarray(arr)
    name = a.dtype.name
    if name not in ALLOWED_DTYPES:
        raise WireError(f"tensor: dtype {a.dtype} cannot be sent (allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
    if a.ndim > MAX_DIMS:
        raise WireError(f"tensor: {a.ndim} dimensions, at most {MAX_DIMS} can be sent")
    a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)
    raw = a.tobytes()
    t = pb.Tensor(dtype=name, shape=a.shape, raw_size=len(raw))
    if compress and len(raw) >= MIN_COMPRESS_BYTES:
        packed = _compressor().compress(raw)
        if len(packed) < len(raw):
            t.data = packed
            t.compression = pb.Tensor.COMPRESSION_ZSTD
            return t
    t.data = raw
    return t


def _zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame zstd can produce for n input bytes."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0) + 64


def _zstd_frame_size(data: bytes, field: str, raw_size: int) -> int:
    """Compressed size of the first zstd frame, walking its block headers (detects truncation and trailing bytes).

    zstd blocks hold up to 128 KiB; the walk stops after one block per KiB of content (+16) so a forged frame of
    tiny blocks cannot cost a Python iteration per 3 bytes."""
    max_blocks = raw_size // 1024 + 16
    try:
        pos = zstandard.frame_header_size(data)
        has_checksum = zstandard.get_frame_parameters(data).has_checksum
    except zstandard.ZstdError as e:
        raise WireError(f"{field}: invalid zstd frame header ({e})") from None
    for _ in range(max_blocks):
        if pos + 3 > len(data):
            raise WireError(f"{field}: zstd frame truncated at byte {pos} of {len(data)}")
        header = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise WireError(f"{field}: zstd frame has a reserved block type at byte {pos}")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if last:
            return pos + (4 if has_checksum else 0)
    raise WireError(f"{field}: zstd frame has more than {max_blocks} blocks for its size")


def _check(
    t: pb.Tensor,
    field: str,
    max_bytes: int,
    allowed_dtypes: frozenset[str],
    expect_shape: Sequence[int | None] | None,
) -> tuple[str, tuple[int, ...], bytes]:
    """check_tensor's work; also returns ``t.data``, read once (each access of a protobuf bytes field copies)."""
    if t.dtype not in allowed_dtypes or t.dtype not in ALLOWED_DTYPES:
        allowed = ", ".join(sorted(set(allowed_dtypes) & ALLOWED_DTYPES))
        raise WireError(f"{field}: dtype {t.dtype[:32]!r} is not allowed (allowed: {allowed})")
    if len(t.shape) > MAX_DIMS:
        raise WireError(f"{field}: {len(t.shape)} dimensions, at most {MAX_DIMS} allowed")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    if expect_shape is not None and (
        len(expect_shape) != len(shape)
        or any(e is not None and e != d for e, d in zip(expect_shape, shape, strict=False))
    ):
        want = ["*" if e is None else e for e in expect_shape]
        raise WireError(f"{field}: shape {list(shape)}, expected {want}")
    size = math.prod(shape) * _ITEMSIZE[t.dtype]  # Python ints: 2**40-sized dims cannot overflow
    if size > max_bytes:
        raise WireError(f"{field}: shape {list(shape)} of {t.dtype} is {size} bytes, limit {max_bytes}")
    if math.prod(max(d, 1) for d in shape) > _MAX_SPAN:  # an empty array with a 2**60 axis: numpy refuses it
        raise WireError(f"{field}: shape {list(shape)} has axes longer than {_MAX_SPAN} elements together")
    if t.raw_size != size:
        raise WireError(f"{field}: raw_size {t.raw_size} does not match shape {list(shape)} of {t.dtype} ({size})")
    data = t.data
    if t.compression == pb.Tensor.COMPRESSION_NONE:
        if len(data) != size:
            raise WireError(f"{field}: {len(data)} data bytes, shape and dtype need {size}")
    elif t.compression == pb.Tensor.COMPRESSION_ZSTD:
        if size == 0:
            raise WireError(f"{field}: zstd compression of an empty tensor")
        if not 0 < len(data) <= _zstd_bound(size):
            raise WireError(f"{field}: {len(data)} zstd bytes cannot hold {size} bytes")
        if data[:4] != _ZSTD_MAGIC:
            raise WireError(f"{field}: data is not a zstd frame (bad magic)")
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise WireError(f"{field}: invalid zstd frame header ({e})") from None
        if declared != size:  # also rejects "unknown" (-1): the single-shot decompressor would then grow freely
            raise WireError(f"{field}: zstd frame declares {declared} bytes, raw_size is {size}")
        end = _zstd_frame_size(data, field, size)
        if end != len(data):
            raise WireError(f"{field}: zstd frame is {end} bytes but data has {len(data)} (truncated or trailing)")
    else:
        raise WireError(f"{field}: unknown compression {t.compression}")
    return t.dtype, shape, data


def check_tensor(
    t: pb.Tensor,
    *,
    field: str = "tensor",
    max_bytes: int = MAX_DECODED_BYTES,
    allowed_dtypes: frozenset[str] = ALLOWED_DTYPES,
    expect_shape: Sequence[int | None] | None = None,
) -> tuple[str, tuple[int, ...]]:
    """Validate a ``Tensor`` without decompressing: dtype, dims, declared size against the limit, data length,
    and for zstd the frame header's content size and the frame's extent; returns (dtype, shape)."""
    dtype, shape, _ = _check(t, field, max_bytes, allowed_dtypes, expect_shape)
    return dtype, shape


def decode_tensor(
    t: pb.Tensor,
    *,
    max_bytes: int = MAX_DECODED_BYTES,
    allowed_dtypes: frozenset[str] = ALLOWED_DTYPES,
    expect_shape: Sequence[int | None] | None = None,
    field: str = "tensor",
) -> np.ndarray:
    """``Tensor`` → read-only array, after :func:`check_tensor`; allocates at most the declared raw_size."""
    dtype, shape, data = _check(t, field, max_bytes, allowed_dtypes, expect_shape)
    if t.compression == pb.Tensor.COMPRESSION_ZSTD:
        try:  # the frame declares exactly raw_size (checked), so the output buffer is raw_size, no growth
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=t.raw_size)
        except zstandard.ZstdError as e:
            raise WireError(f"{field}: corrupt zstd data ({e})") from None
        if len(raw) != t.raw_size:
            raise WireError(f"{field}: zstd data gave {len(raw)} bytes, raw_size is {t.raw_size}")
    else:
        raw = data
    arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if dtype == "bool" and arr.size and int(arr.view(np.uint8).max()) > 1:
        raise WireError(f"{field}: bool tensor holds bytes other than 0 and 1")
    return arr


# ---------------------------------------------------------------------------------------------------- messages


def _text(value: str, field: str, *, required: bool = True, limit: int = MAX_NAME_CHARS) -> None:
    """Names (limit MAX_NAME_CHARS) must also be printable: they end up in logs and error lines."""
    if required and not value:
        raise WireError(f"{field}: missing")
    if len(value) > limit:
        raise WireError(f"{field}: {len(value)} characters, at most {limit}")
    if limit <= MAX_NAME_CHARS and not value.isprintable():
        raise WireError(f"{field}: contains non-printable characters")


def _checksum_field(value: str, field: str) -> None:
    if not _CHECKSUM_RE.fullmatch(value):
        raise WireError(f"{field}: {value[:40]!r} is not a 16-digit lowercase hex checksum")


def _has(msg: object, name: str, field: str) -> None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        raise WireError(f"{field}.{name}: missing")


class _Budget:
    """Running total of the decoded bytes a message declares, so five 60 MiB tensors cannot pass one by one."""

    def __init__(self, limits: WireLimits) -> None:
        self.left, self.limits = limits.max_decoded_bytes, limits

    def tensor(
        self,
        t: pb.Tensor,
        field: str,
        dtypes: frozenset[str] | None = None,
        expect_shape: Sequence[int | None] | None = None,
    ) -> tuple[str, tuple[int, ...]]:
        allowed = self.limits.allowed_dtypes if dtypes is None else dtypes & self.limits.allowed_dtypes
        dtype, shape = check_tensor(
            t, field=field, max_bytes=self.left, allowed_dtypes=allowed, expect_shape=expect_shape
        )
        self.left -= t.raw_size
        return dtype, shape


def _validate_hello(h: pb.Hello, limits: WireLimits) -> None:
    if h.protocol_version == 0:
        raise WireError("hello.protocol_version: missing")
    _text(h.stream_id, "hello.stream_id")
    _text(h.model_name, "hello.model_name")
    _text(h.model_hash, "hello.model_hash")
    if h.mode not in (pb.ENGINE_MODE_EXACT, pb.ENGINE_MODE_FAST):
        raise WireError(f"hello.mode: {h.mode} is not exact or fast")
    if not 1 <= len(h.input_shape) <= MAX_DIMS or any(not 1 <= d <= MAX_INPUT_DIM for d in h.input_shape):
        raise WireError(f"hello.input_shape: {list(h.input_shape)[:8]} needs 1-{MAX_DIMS} dims of 1-{MAX_INPUT_DIM}")
    if h.input_dtype not in limits.allowed_dtypes:
        raise WireError(f"hello.input_dtype: {h.input_dtype[:32]!r} is not allowed")
    if math.prod(h.input_shape) * _ITEMSIZE[h.input_dtype] > limits.max_decoded_bytes:
        raise WireError(f"hello.input_shape: {list(h.input_shape)} exceeds {limits.max_decoded_bytes} bytes")
    if not 1 <= h.block_size <= MAX_BLOCK_SIZE:
        raise WireError(f"hello.block_size: {h.block_size} is not in 1-{MAX_BLOCK_SIZE}")
    if h.payload_kind == pb.PAYLOAD_KIND_BITSTREAM:
        _has(h, "codec", "hello")
        _text(h.codec.codec_name, "hello.codec.codec_name")
        if len(h.codec.extradata) > MAX_EXTRADATA_BYTES:
            raise WireError(f"hello.codec.extradata: {len(h.codec.extradata)} bytes, at most {MAX_EXTRADATA_BYTES}")
        if h.codec.width <= 0 or h.codec.height <= 0:
            raise WireError(f"hello.codec: frame size {h.codec.width}x{h.codec.height} is not positive")
    elif h.payload_kind != pb.PAYLOAD_KIND_RESIDUAL:
        raise WireError(f"hello.payload_kind: {h.payload_kind} is not residual or bitstream")
    if h.results not in pb.ResultsKind.values():
        raise WireError(f"hello.results: {h.results} is not raw or detections")
    if h.input_factor > MAX_INPUT_FACTOR:
        raise WireError(f"hello.input_factor: {h.input_factor} is not in 0-{MAX_INPUT_FACTOR} (0 = unknown)")
    if h.input_dtype == "uint16" and h.input_factor and not 2 <= h.input_factor <= 16:
        raise WireError(f"hello.input_factor: uint16 box sums need a factor of 2-16, got {h.input_factor}")


def _field_grid(budget: _Budget, msg: pb.Delta | pb.Packets, prefix: str) -> None:
    """The accumulated motion field a Delta or Packets carries: int16 dy, dx and bool valid on one 2-d grid."""
    _, grid = budget.tensor(msg.dy, f"{prefix}.dy", dtypes=frozenset({"int16"}))
    if len(grid) != 2:
        raise WireError(f"{prefix}.dy: shape {list(grid)} is not a 2-d block grid")
    budget.tensor(msg.dx, f"{prefix}.dx", expect_shape=grid, dtypes=frozenset({"int16"}))
    budget.tensor(msg.valid, f"{prefix}.valid", expect_shape=grid, dtypes=frozenset({"bool"}))


def _validate_delta(d: pb.Delta, limits: WireLimits) -> None:
    for name in ("dy", "dx", "valid", "block_indices", "pixels"):
        _has(d, name, "delta")
    if d.base_seq >= d.seq:
        raise WireError(f"delta.base_seq: {d.base_seq} is not before seq {d.seq}")
    budget = _Budget(limits)
    _field_grid(budget, d, "delta")
    _, (n,) = budget.tensor(d.block_indices, "delta.block_indices", frozenset({"int32"}), expect_shape=(None,))
    _, pix = budget.tensor(d.pixels, "delta.pixels", frozenset({"uint8", "uint16"}))
    if not pix or pix[0] != n:
        raise WireError(f"delta.pixels: shape {list(pix)} does not start with the {n} block indices")
    _checksum_field(d.checksum, "delta.checksum")


def _validate_packets(p: pb.Packets, limits: WireLimits = DEFAULT_LIMITS) -> None:
    if p.base_seq >= p.seq:
        raise WireError(f"packets.base_seq: {p.base_seq} is not before seq {p.seq}")
    low = 0 if p.flush else 1  # a drain may come without packets
    if not low <= len(p.packets) <= MAX_PACKETS:
        raise WireError(f"packets.packets: {len(p.packets)} packets, {low}-{MAX_PACKETS} allowed")
    for i, pkt in enumerate(p.packets):
        if not pkt.data:
            raise WireError(f"packets.packets[{i}].data: empty")
    if not p.decode_only:
        _checksum_field(p.checksum, "packets.checksum")
    present = [name for name in ("dy", "dx", "valid") if p.HasField(name)]
    if present and len(present) != 3:
        raise WireError(f"packets: field tensors {', '.join(present)} without the others (dy, dx, valid: all or none)")
    if present:
        if p.decode_only:
            raise WireError("packets: a decode_only message carries no motion field")
        if p.field_base_seq >= p.seq:
            raise WireError(f"packets.field_base_seq: {p.field_base_seq} is not before seq {p.seq}")
        _field_grid(_Budget(limits), p, "packets")


def validate_edge_message(msg: pb.EdgeMessage, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """Structural checks of an edge → server message; returns its kind ("hello", "keyframe", ...)."""
    kind = msg.WhichOneof("body")
    if kind is None:
        raise WireError("edge message: empty (no hello, keyframe, delta, packets or bye)")
    if kind == "hello":
        _validate_hello(msg.hello, limits)
    elif kind == "keyframe":
        _has(msg.keyframe, "input", "keyframe")
        _Budget(limits).tensor(msg.keyframe.input, "keyframe.input")
        _checksum_field(msg.keyframe.checksum, "keyframe.checksum")
    elif kind == "delta":
        _validate_delta(msg.delta, limits)
    elif kind == "packets":
        _validate_packets(msg.packets, limits)
    else:
        _text(msg.bye.reason, "bye.reason", required=False, limit=MAX_TEXT_CHARS)
    return kind


def validate_cloud_message(msg: pb.CloudMessage, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """Structural checks of a server → edge message; returns its kind ("welcome", "result", ...)."""
    kind = msg.WhichOneof("body")
    if kind is None:
        raise WireError("cloud message: empty (no welcome, result, need_keyframe or error)")
    if kind == "welcome":
        w = msg.welcome
        if w.protocol_version == 0:
            raise WireError("welcome.protocol_version: missing")
        _text(w.stream_id, "welcome.stream_id")
        _text(w.server_id, "welcome.server_id", required=False)
    elif kind == "result":
        r = msg.result
        if len(r.outputs) > MAX_OUTPUTS:
            raise WireError(f"result.outputs: {len(r.outputs)} tensors, at most {MAX_OUTPUTS}")
        budget = _Budget(limits)
        for name in sorted(r.outputs):
            _text(name, "result.outputs name")
            budget.tensor(r.outputs[name], f"result.outputs[{name!r}]")
        for name in ("compute_ms", "queue_ms", "rebuild_ms"):
            value = getattr(r, name)
            if not (math.isfinite(value) and value >= 0):
                raise WireError(f"result.{name}: {value} is not a finite non-negative time")
        _checksum_field(r.checksum, "result.checksum")
    elif kind == "need_keyframe":
        reason = msg.need_keyframe.reason
        if reason not in pb.NeedKeyframe.Reason.values() or reason == pb.NeedKeyframe.REASON_UNSPECIFIED:
            raise WireError(f"need_keyframe.reason: unknown reason {reason}")
        _text(msg.need_keyframe.detail, "need_keyframe.detail", required=False, limit=MAX_TEXT_CHARS)
    else:
        if msg.error.code not in pb.Error.Code.values():
            raise WireError(f"error.code: unknown code {msg.error.code}")
        _text(msg.error.message, "error.message", required=False, limit=MAX_TEXT_CHARS)
    return kind


def _parse(cls: type, data: bytes, limits: WireLimits, what: str) -> object:
    if len(data) > limits.max_message_bytes:
        raise WireError(f"{what}: {len(data)} bytes, limit {limits.max_message_bytes}")
    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise WireError(f"{what}: not a valid protobuf message ({e})") from None


def parse_edge_message(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> pb.EdgeMessage:
    """Bytes → validated ``EdgeMessage``; anything malformed raises :class:`WireError` (never DecodeError)."""
    msg = _parse(pb.EdgeMessage, data, limits, "edge message")
    validate_edge_message(msg, limits)
    return msg


def parse_cloud_message(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> pb.CloudMessage:
    """Bytes → validated ``CloudMessage``; anything malformed raises :class:`WireError`."""
    msg = _parse(pb.CloudMessage, data, limits, "cloud message")
    validate_cloud_message(msg, limits)
    return msg


# ---------------------------------------------------------------------------------------------------- payloads


def decode_keyframe(k: pb.Keyframe, hello: pb.Hello, limits: WireLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A validated keyframe's input, which must have the stream's input shape and dtype (see Hello)."""
    if k.input.dtype != hello.input_dtype:
        raise WireError(f"keyframe.input: dtype {k.input.dtype[:32]!r}, the stream declared {hello.input_dtype}")
    return decode_tensor(
        k.input, max_bytes=limits.max_decoded_bytes, allowed_dtypes=limits.allowed_dtypes,
        expect_shape=tuple(hello.input_shape), field="keyframe.input",
    )  # fmt: skip


def decode_delta(d: pb.Delta, limits: WireLimits = DEFAULT_LIMITS) -> DeltaArrays:
    """A Delta's arrays after :func:`validate_edge_message`-level checks plus: indices strictly increasing and
    inside the block grid (so the receive layer can index with them without bounds surprises)."""
    _validate_delta(d, limits)
    kw = {"max_bytes": limits.max_decoded_bytes, "allowed_dtypes": limits.allowed_dtypes}
    dy = decode_tensor(d.dy, field="delta.dy", **kw)
    dx = decode_tensor(d.dx, field="delta.dx", **kw)
    valid = decode_tensor(d.valid, field="delta.valid", **kw)
    idx = decode_tensor(d.block_indices, field="delta.block_indices", **kw)
    increasing = idx.size < 2 or bool(np.all(idx[1:] > idx[:-1]))
    if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= dy.size or not increasing):
        raise WireError(f"delta.block_indices: not strictly increasing within the {dy.shape} block grid")
    pixels = decode_tensor(d.pixels, field="delta.pixels", **kw)
    return DeltaArrays(d.seq, d.base_seq, dy, dx, valid, idx, pixels, d.checksum)


# ---------------------------------------------------------------------------------------------------- gRPC options


def channel_options(
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    keepalive_time_ms: int = KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
) -> list[tuple[str, int]]:
    """Edge-side channel options: message limits, and keepalive pings that continue on an idle stream."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # default 2: pings would stop while the edge computes locally
    ]


def server_options(
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    min_ping_interval_ms: int = MIN_PING_INTERVAL_MS,
    keepalive_time_ms: int = SERVER_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
) -> list[tuple[str, int]]:
    """Server options: message limits, accept the edge's keepalive pings (else they count as strikes and the
    server sends GOAWAY "too_many_pings"), and ping edges itself to drop dead connections."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]
