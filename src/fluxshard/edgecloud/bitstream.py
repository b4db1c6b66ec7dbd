"""The ``bitstream`` payload kind: the edge forwards the camera's compressed packets, the server decodes them itself.

Why: the edge already receives the frame compressed (H.264 / HEVC / MPEG-4 from the camera or file); forwarding
those bytes costs no encode on the edge, and since H.264/HEVC/MPEG-4 decoding is bit-exact, a second decoder fed
the same packets produces the same pictures, so the server's engine input equals the edge's by construction
(checked per frame by ``wire.checksum``, as for every payload). A source that gives raw frames (webcam, y4m) has
no packets to forward: :func:`bitstream_kind_ok` says no, and the stream uses ``residual``.

**Packets ↔ frames.** Packets arrive in *decode* order, frames leave the decoder in *display* order, delayed by
the codec's reordering (B-frames: an I/P picture is decoded before the B-pictures shown ahead of it). The edge's
decoder (:class:`~fluxshard.video.decode.VideoSource` with ``keep_packets``) attaches to each displayed frame the
packets it consumed since the previous frame came out; the last of them is the one whose decoding released this
frame. A second decoder with the same codec parameters and threading (SLICE or NONE: no frame-threading delay),
fed the same packets in the same groups, releases the same frame after each group, so a :class:`TapFrame`'s
packets are exactly what the server needs to output that frame. The first group holds the decoder's whole
reordering delay (bikes: 3 packets, then 1 per frame); frames only released by the end-of-stream drain
(``flushed``, the last ``has_b_frames`` frames of a file) have no packets of their own: the edge asks the server
to drain with ``Packets.flush`` (zero packets allowed then), or sends those few as keyframe / residual.

**Which decoded frame is the target.** Normally each group releases exactly one frame. A decoder opened
mid-stream (a resync) may release frames earlier than the edge's (a fresh decoder starts with the SPS's
reordering depth, the edge's may have grown) and drops open-GOP leading pictures, so the server does not count:
it keeps the frames released but not yet consumed (at most :data:`MAX_PENDING`) and takes the one whose converted
input has the message's checksum — first the newest released by this message (the normal case: one conversion),
then the older ones oldest first. No match → :class:`BitstreamError` (``checksum_mismatch``): the server answers
NeedKeyframe, never infers on a wrong input. Frames of ``decode_only`` messages (the edge ran them) stay pending
unconverted until a later target passes them.

**Resync.** A decoder without state cannot decode a P/B packet; after the server lost its decoder (restart,
eviction, decode error) it must start again at a keyframe packet (IDR, or CRA for HEVC). The edge keeps the
packets back to the keyframe of the GOP that contains the current frame in display order (the last keyframe whose
pts ≤ the frame's pts; with B-frames at a GOP boundary that can be the previous GOP) and sends them in one
Packets message (:meth:`PacketTap.resync_packets`). Cost: every packet since that keyframe, from the keyframe
packet alone at the GOP start (cup: ~18 kB) up to a whole GOP at its end (cup, GOP 30: up to 189 kB, 1.1× a zstd
lossless keyframe of 165 kB; bikes: up to 112 kB vs 215 kB; ``benchmarks/edgecloud_payload.py``). The alternative the
edge may choose when that is larger: a lossless Keyframe for this frame and edge-only frames until the next
keyframe packet, from which packets flow again.

**Server-side safety.** Only :data:`BITSTREAM_CODECS` decoders are opened for a peer (each FFmpeg decoder is
attack surface); decoded frames must keep the announced size and pixel format; FFmpeg errors and concealed
(corrupt) frames raise :class:`BitstreamError` (``decode_error``) and the decoder is reset to wait for a
keyframe.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np

from fluxshard.edgecloud import wire
from fluxshard.edgecloud.dispatch import integer_input
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.engine.inputs import InputMapper
from fluxshard.errors import FluxShardError
from fluxshard.video.decode import DecodedFrame, RawPacket, VideoInfo, VideoSource

#: Decoders a server opens for a peer: bit-exact codecs cameras send; each further FFmpeg decoder is attack surface.
BITSTREAM_CODECS = frozenset({"h264", "hevc", "mpeg4"})
#: Decoded frames held for later targets (H.264 / HEVC reorder at most 16 pictures).
MAX_PENDING = 32
#: FFmpeg's AV_NOPTS_VALUE: a packet without a timestamp (protobuf int64 has no "absent").
NOPTS = -(2**63)

Threads = Literal["NONE", "SLICE"]


class BitstreamError(FluxShardError):
    """The server cannot produce the frame from the packets it has: ``reason`` is ``decode_error`` (FFmpeg failed,
    concealed damage, wrong size, no keyframe to start from) or ``checksum_mismatch`` (decoded, but no frame has
    the edge's checksum). Either way the answer is NeedKeyframe."""

    def __init__(self, message: str, reason: Literal["decode_error", "checksum_mismatch"] = "decode_error") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def need_keyframe_reason(self) -> int:
        """The NeedKeyframe reason to answer with."""
        if self.reason == "checksum_mismatch":
            return pb.NeedKeyframe.REASON_CHECKSUM_MISMATCH
        return pb.NeedKeyframe.REASON_DECODE_ERROR


# ---------------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CodecParams:
    """What the server needs to open a decoder for the edge's packets (``Hello.codec``)."""

    codec_name: str
    extradata: bytes
    width: int
    height: int
    pix_fmt: str
    time_base: Fraction

    @classmethod
    def from_info(cls, info: VideoInfo) -> CodecParams:
        tb = info.time_base or Fraction(1, 90000)
        return cls(info.codec, info.extradata, info.width, info.height, info.pix_fmt, Fraction(tb))

    def to_message(self) -> pb.CodecParameters:
        return pb.CodecParameters(
            codec_name=self.codec_name, extradata=self.extradata, width=self.width, height=self.height,
            pix_fmt=self.pix_fmt, time_base_num=self.time_base.numerator, time_base_den=self.time_base.denominator,
        )  # fmt: skip

    @classmethod
    def from_message(cls, m: pb.CodecParameters) -> CodecParams:
        """Checked: a supported decoder, a sane frame size, a positive time base."""
        if m.codec_name not in BITSTREAM_CODECS:
            raise wire.WireError(f"hello.codec.codec_name: {m.codec_name[:32]!r} is not one of "
                                 f"{', '.join(sorted(BITSTREAM_CODECS))}")
        if not (0 < m.width <= wire.MAX_INPUT_DIM and 0 < m.height <= wire.MAX_INPUT_DIM):
            raise wire.WireError(f"hello.codec: frame size {m.width}x{m.height} is not in 1-{wire.MAX_INPUT_DIM}")
        if len(m.extradata) > wire.MAX_EXTRADATA_BYTES:
            raise wire.WireError(f"hello.codec.extradata: {len(m.extradata)} bytes, at most {wire.MAX_EXTRADATA_BYTES}")
        if m.time_base_num <= 0 or m.time_base_den <= 0:
            raise wire.WireError(f"hello.codec: time base {m.time_base_num}/{m.time_base_den} is not positive")
        return cls(m.codec_name, bytes(m.extradata), m.width, m.height, m.pix_fmt,
                   Fraction(m.time_base_num, m.time_base_den))


def bitstream_kind_ok(path: str | Path) -> bool:
    """Whether ``path`` gives compressed packets a server can decode (H.264 / HEVC / MPEG-4 video): yes for such
    files and streams, no for raw sources (y4m, rawvideo, webcams) and anything that does not open."""
    try:
        with av.open(str(path), mode="r", timeout=10.0) as c:
            return bool(c.streams.video) and c.streams.video[0].codec_context.name in BITSTREAM_CODECS
    except (av.error.FFmpegError, OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- edge side


@dataclass
class TapFrame:
    """One displayed frame and the packets (decode order) that released it from the edge's decoder."""

    index: int  # display order, from 0
    pts: int | None
    packets: tuple[RawPacket, ...]
    flushed: bool  # released by the end-of-stream drain: no packets of its own (the server drains on Packets.flush)
    frame: DecodedFrame = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(len(p.data) for p in self.packets)


class PacketTap:
    """The edge's decoder, keeping per displayed frame the packets that released it (see the module docstring),
    plus the packets back to the current GOP's keyframe for a resync. Same threading rules as the motion
    front-end (NONE or SLICE), so a server decoder with the same setting releases frames in the same groups."""

    def __init__(self, path: str | Path, *, threads: Threads = "SLICE", export_mvs: bool = True,
                 max_frames: int | None = None, prefetch: int = 4) -> None:
        self.source = VideoSource(path, export_mvs=export_mvs, threads=threads, max_frames=max_frames,
                                  prefetch=prefetch, keep_packets=True)
        self.info = self.source.info
        if self.info.codec not in BITSTREAM_CODECS:
            raise BitstreamError(f"{self.source.path}: codec {self.info.codec!r} cannot be forwarded as a bitstream "
                                 f"(supported: {', '.join(sorted(BITSTREAM_CODECS))}); use the residual payload")
        self.params = CodecParams.from_info(self.info)
        self.threads = threads
        # GOPs still needed for a resync, oldest first: (keyframe pts, packets from the keyframe on, decode order)
        self._gops: list[tuple[int | None, list[RawPacket]]] = []
        self._last: TapFrame | None = None

    def __iter__(self) -> Iterator[TapFrame]:
        for f in self.source:
            pkts = f.packets or ()
            for p in pkts:
                if p.keyframe:
                    self._gops.append((p.pts, [p]))
                elif self._gops:
                    self._gops[-1][1].append(p)
            tf = TapFrame(f.index, f.pts, pkts, f.flushed, f)
            self._last = tf
            self._prune(f.pts)
            yield tf

    def _gop_index(self, pts: int | None) -> int | None:
        """Index of the GOP holding a frame of this pts: the last keyframe shown no later than it."""
        if not self._gops:
            return None
        if pts is None:
            return 0  # no timestamps: the oldest kept keyframe is safe (it costs more bytes)
        found = None
        for i, (kpts, _) in enumerate(self._gops):
            if kpts is None or kpts <= pts:
                found = i
        return found

    def _prune(self, pts: int | None) -> None:
        """Drop GOPs no later frame can need: frames come in display order, so once a frame lies in GOP i, the
        GOPs before i are done."""
        i = self._gop_index(pts) if pts is not None else None
        if i:
            del self._gops[:i]

    def resync_packets(self) -> tuple[RawPacket, ...]:
        """The packets a decoder without state needs to output the last yielded frame: from its GOP's keyframe to
        the end of its group. Raises :class:`BitstreamError` when there is none (the stream started mid-GOP, or
        the frame was released by the drain)."""
        tf = self._last
        if tf is None or tf.flushed:
            raise BitstreamError("no frame to resync (none yielded yet, or the last was released by the drain)")
        i = self._gop_index(tf.pts)
        if i is None:
            raise BitstreamError(f"frame {tf.index}: no keyframe packet before it in this stream")
        out: list[RawPacket] = []
        for _, pkts in self._gops[i:]:
            out.extend(pkts)
        return tuple(out)


def edge_input(mapper: InputMapper, frame: DecodedFrame) -> np.ndarray:
    """The edge's engine input (integer form) of a decoded frame: the conversion the server repeats."""
    return integer_input(mapper, frame.rgb)


# ---------------------------------------------------------------------------------------------------- server side


@dataclass
class _Pending:
    frame: Any  # av.VideoFrame
    batch: int  # which decode() call released it
    input: np.ndarray | None = None
    checksum: str | None = None


class BitstreamDecoder:
    """Server side: decodes the edge's packets and returns the engine input of the frame a message targets, equal
    to the edge's by checksum (see the module docstring). Starts, and restarts after :meth:`reset` or any error,
    waiting for a keyframe packet."""

    def __init__(self, params: CodecParams, mapper: InputMapper, *, threads: Threads = "SLICE") -> None:
        if params.codec_name not in BITSTREAM_CODECS:
            raise BitstreamError(f"codec {params.codec_name!r} is not one of {', '.join(sorted(BITSTREAM_CODECS))}")
        if (params.height, params.width) != tuple(mapper.frame_hw):
            raise BitstreamError(f"stream frames are {params.width}x{params.height}, the engine input maps "
                                 f"{mapper.frame_hw[1]}x{mapper.frame_hw[0]}")
        if threads not in ("NONE", "SLICE"):
            raise ValueError(f"threads must be NONE or SLICE (frame threading delays output), got {threads!r}")
        self.params = params
        self.mapper = mapper
        self.threads = threads
        self.frames_decoded = 0
        self._ctx: Any = None
        self._pending: list[_Pending] = []
        self._batch = 0
        self.reset()

    @property
    def needs_keyframe(self) -> bool:
        """True until a keyframe packet has been decoded since the last reset."""
        return self._ctx is None

    def reset(self) -> None:
        """Forget all decoder state (lost sync, decode error): the next packets must start at a keyframe."""
        self._ctx = None
        self._pending.clear()

    def _open(self) -> Any:
        ctx = av.CodecContext.create(self.params.codec_name, "r")
        if self.params.extradata:
            ctx.extradata = self.params.extradata
        ctx.thread_type = self.threads
        return ctx

    def decode(self, packets: Sequence[RawPacket], *, checksum: str | None = None,
               flush: bool = False) -> np.ndarray | None:
        """Feed ``packets`` (decode order); with ``checksum`` return the engine input (integer form) whose
        checksum it is, else (decode_only) None. ``flush`` drains the decoder afterwards (end of stream; the next
        packets must then start at a keyframe)."""
        self._batch += 1
        try:
            if self._ctx is None and packets:
                if not packets[0].keyframe:
                    raise BitstreamError("decoder has no state: packets must start at a keyframe (resync)")
                self._ctx = self._open()
            elif self._ctx is None and not self._pending:  # (a second drained frame is already pending)
                raise BitstreamError("decoder has no state and no packets came")
            if self._ctx is not None:
                for i, p in enumerate(packets):
                    pkt = av.Packet(p.data)
                    pkt.pts = p.pts
                    pkt.dts = p.dts
                    self._receive(self._ctx.decode(pkt), f"packet {i}")
                if flush:
                    self._receive(self._ctx.decode(None), "drain")
        except av.error.FFmpegError as e:
            self.reset()
            raise BitstreamError(f"decoder error: {getattr(e, 'strerror', None) or e}") from None
        except BitstreamError:
            self.reset()
            raise
        if flush:
            self._ctx = None  # a drained decoder cannot go on; its pending frames stay
        if checksum is None:
            return None
        return self._take(checksum)

    def _receive(self, frames: Sequence[Any], where: str) -> None:
        for f in frames:
            self.frames_decoded += 1
            if f.is_corrupt:
                raise BitstreamError(f"{where}: the decoder concealed damaged data (corrupt frame)")
            if (f.width, f.height) != (self.params.width, self.params.height):
                raise BitstreamError(f"{where}: decoded frame is {f.width}x{f.height}, the stream announced "
                                     f"{self.params.width}x{self.params.height}")
            if self.params.pix_fmt and f.format.name != self.params.pix_fmt:
                raise BitstreamError(f"{where}: decoded pixel format {f.format.name}, the stream announced "
                                     f"{self.params.pix_fmt}")
            self._pending.append(_Pending(f, self._batch))
            if len(self._pending) > MAX_PENDING:
                del self._pending[0]

    def _checksum(self, p: _Pending) -> str:
        if p.checksum is None:
            p.input = integer_input(self.mapper, p.frame.to_ndarray(format="rgb24"))  # = DecodedFrame.rgb
            p.checksum = wire.checksum(p.input)
        return p.checksum

    def _take(self, checksum: str) -> np.ndarray:
        n = len(self._pending)
        mine = [i for i in range(n - 1, -1, -1) if self._pending[i].batch == self._batch]
        older = [i for i in range(n) if self._pending[i].batch != self._batch]
        for i in mine[:1] + older + mine[1:]:
            p = self._pending[i]
            if self._checksum(p) == checksum:
                del self._pending[: i + 1]
                assert p.input is not None
                return p.input
        self.reset()  # its references are not the edge's: only a keyframe can repair that
        raise BitstreamError(f"none of the {n} decoded frames waiting has the edge's checksum {checksum}",
                             "checksum_mismatch")


# ---------------------------------------------------------------------------------------------------- proto mapping


@dataclass(frozen=True)
class PacketsPayload:
    """A ``Packets`` message as Python values (pts/dts None where the camera gave none)."""

    seq: int
    base_seq: int
    packets: tuple[RawPacket, ...]
    checksum: str
    decode_only: bool

    @property
    def nbytes(self) -> int:
        return sum(len(p.data) for p in self.packets)


def _ts(v: int | None) -> int:
    return NOPTS if v is None else int(v)


def _un_ts(v: int) -> int | None:
    return None if v == NOPTS else int(v)


def to_packets_message(seq: int, base_seq: int, packets: Sequence[RawPacket], checksum: str, *,
                       decode_only: bool = False, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> pb.Packets:
    """Edge side: the ``Packets`` message for frame ``seq`` (``checksum`` = wire.checksum of its engine input;
    ignored with ``decode_only``), validated as the server will (count, checksum form, size limit)."""
    msg = pb.Packets(seq=seq, base_seq=base_seq, checksum="" if decode_only else checksum, decode_only=decode_only)
    msg.packets.extend(pb.Packet(data=p.data, pts=_ts(p.pts), dts=_ts(p.dts), keyframe=p.keyframe) for p in packets)
    _validate(msg, limits)
    return msg


def from_packets_message(msg: pb.Packets, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> PacketsPayload:
    """Server side: a ``Packets`` message → :class:`PacketsPayload`, after the wire's structural checks."""
    _validate(msg, limits)
    pkts = tuple(RawPacket(bytes(p.data), _un_ts(p.pts), _un_ts(p.dts), bool(p.keyframe)) for p in msg.packets)
    return PacketsPayload(int(msg.seq), int(msg.base_seq), pkts, msg.checksum, bool(msg.decode_only))


def _validate(msg: pb.Packets, limits: wire.WireLimits) -> None:
    env = pb.EdgeMessage(packets=msg)
    size = env.ByteSize()
    if size > limits.max_message_bytes:
        raise wire.WireError(f"packets: {size} bytes serialized, limit {limits.max_message_bytes}")
    wire.validate_edge_message(env, limits)
