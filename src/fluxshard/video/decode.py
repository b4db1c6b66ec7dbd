"""Decode any file or URL PyAV opens into frames carrying the codec's motion-vector side data.

Why a wrapper: motion vectors are only exported with ``flags2=+export_mvs`` and only stay correct with
NONE/SLICE threading (FRAME threading corrupts B-frame vectors), damaged input must give a one-line error
that names the file *after* every decodable frame was delivered, and truncation is only visible by
comparing what was decoded with what the container announced.
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np

from fluxshard.errors import VideoError
from fluxshard.video.h264 import max_num_ref_frames

#: Codecs whose FFmpeg decoders export motion vectors (mpegvideo family and H.264).
MV_CODECS = frozenset(
    {"h264", "mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4v3", "msmpeg4", "wmv1", "wmv2", "mpeg1video", "mpeg2video",
     "h263", "h263p", "flv1"}
)
# Formats whose duration FFmpeg only estimates from the bytes present: no way to notice truncation.
_NO_LENGTH = frozenset({"mpegts", "h264", "hevc", "m4v", "mpegvideo", "rawvideo"})
_PICT_NAMES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "SI", 6: "SP", 7: "BI"}
_URL_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://", "file:")


@dataclass(frozen=True)
class RawPacket:
    """One demuxed compressed packet, as the container gave it (``keep_packets``): what a bitstream forwarder
    sends so that another decoder reproduces this one's frames."""

    data: bytes
    pts: int | None
    dts: int | None
    keyframe: bool


@dataclass
class DecodedFrame:
    """One displayed frame: pixels and the codec's raw motion vectors, both read on demand."""

    index: int
    pts: int | None
    time: float | None
    pict_type: str  # "I", "P", "B", ... as reported by the decoder; "?" when unknown
    key_frame: bool
    width: int
    height: int
    # ``keep_packets`` only: the packets (decode order) fed to the decoder since the previous frame came out,
    # ending with the one whose decoding released this frame; ``flushed``: released by the end-of-stream drain
    packets: tuple[RawPacket, ...] | None = field(repr=False, default=None)
    flushed: bool = False
    _av: Any = field(repr=False, default=None)
    _export: bool = field(repr=False, default=False)  # decoded with +export_mvs

    @property
    def av_frame(self) -> Any:
        """The PyAV frame (its buffers live as long as it does)."""
        return self._av

    @cached_property
    def mvs(self) -> np.ndarray | None:
        """Structured AVMotionVector rows (:data:`MV_DTYPE`), None when the frame carries none (read through
        PyAV on first use; the motion front-end reads them in its kernel instead, see ``video.sidedata``)."""
        return _read_mvs(self._av) if self._export else None

    @cached_property
    def rgb(self) -> np.ndarray:
        """``uint8`` H×W×3 RGB (converted once, on first use)."""
        return self._av.to_ndarray(format="rgb24")

    @cached_property
    def luma(self) -> np.ndarray:
        """``uint8`` H×W luma: the decoder's Y plane without conversion when the format is YUV."""
        fmt = self._av.format.name
        if fmt.startswith(("yuv", "yuvj", "nv12", "nv21", "gray")) and "p1" not in fmt:
            plane = self._av.planes[0]
            if plane.width == self.width and plane.height == self.height:
                buf = np.frombuffer(plane, np.uint8)
                if buf.size == plane.line_size * self.height:
                    return buf.reshape(self.height, plane.line_size)[:, : self.width]
        return self._av.to_ndarray(format="gray")


@dataclass
class VideoInfo:
    path: str
    codec: str
    width: int
    height: int
    fps: float
    frames_expected: int | None  # from the container; None when unknown (streams, some AVI/TS files)
    codec_has_mvs: bool
    max_ref_frames: int | None = None  # H.264 SPS max_num_ref_frames (avcC streams only)
    has_b_frames: bool = True  # the decoder's declared reordering; True when unknown
    extradata: bytes = b""  # codec extradata (avcC / hvcC / SPS+PPS), for a second decoder of the same packets
    pix_fmt: str = ""  # decoder output format, e.g. "yuv420p"
    time_base: Fraction | None = None  # unit of the packets' pts / dts


@dataclass
class DecodeProblem:
    frame_index: int  # frames delivered before the problem
    message: str


def _is_url(path: str) -> bool:
    return path.startswith(_URL_PREFIXES)


class VideoSource:
    """Iterate decoded frames in display order; problems are collected and raised after the last good frame.

    ``prefetch`` frames are decoded ahead on a worker thread (0 = decode inline). FFmpeg releases the GIL,
    so on two cores the decoder and the consumer run side by side.
    ``on_error="raise"`` (default) raises :class:`VideoError` when iteration ends if any packet failed to
    decode or the file ended before the announced frame count; ``"collect"`` only records them in
    :attr:`problems`. Either way, every frame that could be decoded is yielded first.
    ``keep_packets=True`` attaches to each frame the compressed packets consumed since the previous one
    (:attr:`DecodedFrame.packets`), so they can be forwarded to a second decoder (edge → cloud bitstream payload).
    """

    def __init__(
        self,
        path: str | Path,
        export_mvs: bool = True,
        threads: Literal["NONE", "SLICE"] = "SLICE",
        on_error: Literal["raise", "collect"] = "raise",
        max_frames: int | None = None,
        prefetch: int = 4,
        keep_packets: bool = False,
    ) -> None:
        self.path = str(path)
        self.keep_packets = keep_packets
        self.prefetch = prefetch
        self.on_error = on_error
        self.max_frames = max_frames
        self.problems: list[DecodeProblem] = []
        self.frames_decoded = 0
        self.decode_seconds = 0.0  # time inside demux + decode (in whichever thread ran them)
        if not _is_url(self.path):
            if not os.path.exists(self.path):
                raise VideoError(f"{self.path}: no such file")
            if os.path.isdir(self.path):
                raise VideoError(f"{self.path}: is a directory, not a video file")
            if os.path.getsize(self.path) == 0:
                raise VideoError(f"{self.path}: empty file (0 bytes)")
        try:
            self._container = av.open(self.path, mode="r", timeout=10.0)
        except av.error.FFmpegError as exc:
            hint = None if _is_url(self.path) else _mp4_problem(self.path)
            detail = f": {hint}" if hint else f" ({_msg(exc)})"
            raise VideoError(f"{self.path}: cannot open as video{detail}") from exc
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self.path}: contains no video stream")
        self._stream = self._container.streams.video[0]
        ctx = self._stream.codec_context
        self._stream.thread_type = threads
        self.export_mvs = export_mvs and ctx.name in MV_CODECS
        if self.export_mvs:
            ctx.options = {"flags2": "+export_mvs"}
        rate = self._stream.average_rate or self._stream.guessed_rate or Fraction(25)
        expected = int(self._stream.frames) if self._stream.frames else None
        if expected is None and self._stream.duration and self._stream.time_base:
            expected = round(float(self._stream.duration * self._stream.time_base) * float(rate))
        if expected is None and self._container.duration and self._container.format.name not in _NO_LENGTH:
            expected = round(self._container.duration / 1e6 * float(rate))
        self.info = VideoInfo(
            path=self.path,
            codec=ctx.name,
            width=ctx.width,
            height=ctx.height,
            fps=float(rate),
            frames_expected=expected or None,
            codec_has_mvs=self.export_mvs,
            max_ref_frames=max_num_ref_frames(ctx.extradata) if ctx.name == "h264" else None,
            has_b_frames=bool(getattr(ctx, "has_b_frames", True)),
            extradata=bytes(ctx.extradata or b""),
            pix_fmt=ctx.pix_fmt or "",
            time_base=self._stream.time_base,
        )

    def __iter__(self) -> Iterator[DecodedFrame]:
        try:
            yield from self._frames()
        finally:
            self._container.close()
        self._check_complete()
        if self.problems and self.on_error == "raise":
            raise VideoError(self.problem_text(), frames_decoded=self.frames_decoded)

    def problem_text(self) -> str:
        """One line naming the file, the first problem, how many more, and how many frames were decoded."""
        if not self.problems:
            return ""
        more = f" (+{len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        return f"{self.path}: {self.problems[0].message}{more}; {self.frames_decoded} frames decoded"

    def _frames(self) -> Iterator[DecodedFrame]:
        if self.prefetch <= 0:
            for item in self._decode():
                yield self._wrap(*item)
            return
        # FFmpeg decodes with the GIL released: a producer thread decodes the next frames while the consumer
        # (motion front-end, inference) works on this one.
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self._decode():
                    if not put(item):
                        return
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(_Failure(exc))
            put(_END)

        worker = threading.Thread(target=produce, name=f"decode:{Path(self.path).name}", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield self._wrap(*item)
        finally:
            stop.set()
            worker.join()

    def _decode(self) -> Iterator[tuple[Any, tuple[RawPacket, ...] | None, bool]]:
        """Demux and decode; record problems; yield (PyAV frame, packets since the previous frame or None,
        released by the final drain) in display order."""
        stream = self._stream
        demux = self._container.demux(stream)
        n = 0
        fed: list[RawPacket] = []
        clock = time.thread_time  # CPU time of the decoding thread: robust to the machine being shared
        while True:
            t0 = clock()
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                self.problems.append(DecodeProblem(n, f"demux error after frame {n} ({_msg(exc)})"))
                break
            if self.keep_packets and packet.size:
                fed.append(RawPacket(bytes(packet), packet.pts, packet.dts, bool(packet.is_keyframe)))
            try:
                frames = packet.decode()  # a None packet (end of stream) flushes the decoder
            except av.error.FFmpegError as exc:
                self.problems.append(DecodeProblem(n, f"corrupt packet after frame {n} ({_msg(exc)})"))
                continue
            finally:
                self.decode_seconds += clock() - t0
            for frame in frames:
                if frame.is_corrupt:
                    self.problems.append(DecodeProblem(n, f"corrupt data in frame {n} (decoder concealed errors)"))
                if self.keep_packets:
                    yield frame, tuple(fed), packet.size == 0
                    fed = []
                else:
                    yield frame, None, False
                n += 1
                if self.max_frames is not None and n >= self.max_frames:
                    return

    def _wrap(self, frame: Any, packets: tuple[RawPacket, ...] | None = None, flushed: bool = False) -> DecodedFrame:
        # The side data is read by whoever needs it, on the consuming thread: with decode-ahead, the decoding
        # thread (the throughput bottleneck) only decodes.
        pict_name = _PICT_NAMES.get(int(frame.pict_type), "?")
        tb = frame.time_base
        out = DecodedFrame(
            index=self.frames_decoded,
            pts=frame.pts,
            time=float(frame.pts * tb) if frame.pts is not None and tb else None,
            pict_type=pict_name,
            key_frame=bool(frame.key_frame),
            width=frame.width,
            height=frame.height,
            packets=packets,
            flushed=flushed,
            _av=frame,
            _export=self.export_mvs,
        )
        self.frames_decoded += 1
        return out

    def _check_complete(self) -> None:
        exp = self.info.frames_expected
        if self.max_frames is not None or exp is None or self.problems:
            return
        # Containers round durations; a frame or two of slack avoids false alarms on intact files.
        if self.frames_decoded < exp - max(2, int(0.01 * exp)):
            self.problems.append(
                DecodeProblem(self.frames_decoded,
                              f"truncated: ended after {self.frames_decoded} of {exp} announced frames")
            )


@dataclass
class _Failure:
    exc: BaseException


_END = object()

# FFmpeg's AVMotionVector as PyAV lays it out (checked against PyAV's own dtype on first use).
MV_DTYPE = np.dtype({
    "names": ["source", "w", "h", "src_x", "src_y", "dst_x", "dst_y", "flags", "motion_x", "motion_y",
              "motion_scale"],
    "formats": ["<i4", "u1", "u1", "<i2", "<i2", "<i2", "<i2", "<u8", "<i4", "<i4", "<u2"],
    "offsets": [0, 4, 5, 6, 8, 10, 12, 16, 24, 28, 32], "itemsize": 40, "aligned": True,
})
_EMPTY_FRAME = av.VideoFrame(16, 16, "gray")
_mv_layout_checked = False


def _read_mvs(frame: Any) -> np.ndarray | None:
    """The frame's motion vectors as a structured array (a view, no copy), or None.

    PyAV's side-data container and the frame reference each other; such frames are only freed by the
    cyclic GC, and until then FFmpeg cannot recycle their picture buffers (measured: +25-40 % decode time
    at 640×480). Re-initialising the container on an empty frame after reading breaks the cycle; the
    array keeps what it needs alive through its buffer.
    """
    global _mv_layout_checked
    container = frame.side_data
    sd = container.get("MOTION_VECTORS")
    if sd is None:
        return None
    if not _mv_layout_checked:
        if sd.to_ndarray().dtype != MV_DTYPE:
            raise VideoError(f"unexpected motion-vector layout from PyAV {av.__version__}")
        _mv_layout_checked = True
    mvs = np.frombuffer(memoryview(sd), MV_DTYPE)  # via a memoryview: ~40 % cheaper than on the side data
    with contextlib.suppress(TypeError, AttributeError):  # a PyAV without this structure: pay the GC cost
        type(container).__init__(container, _EMPTY_FRAME)
    return mvs


def _msg(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '")[0].strip()


def _mp4_problem(path: str) -> str | None:
    """Why an MP4/MOV file cannot be opened, read from its top-level boxes; None if it is not one or looks whole.

    FFmpeg only says "Invalid data found" when the index (``moov``) is missing, the usual state of a recording
    that was cut off: its frames are in ``mdat``, but without the index nothing can be located."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(8)[4:8] != b"ftyp":
                return None
            off, kinds, cut = 0, [], False
            while off + 8 <= size:
                f.seek(off)
                head = f.read(16)
                n, kind = struct.unpack(">I4s", head[:8])
                if n == 1 and len(head) == 16:
                    n = struct.unpack(">Q", head[8:])[0]
                elif n == 0:  # the box runs to the end of the file
                    n = size - off
                if n < 8:
                    break
                kinds.append(kind)
                cut = off + n > size
                off += n
    except OSError:
        return None
    if b"moov" in kinds:
        return None
    where = f" (it ends inside its '{kinds[-1].decode('latin-1')}' box)" if cut and kinds else ""
    return f"its MP4 index (moov atom) is missing — the file is truncated{where} or its recording was never finalised"


def open_video(path: str | Path, **kwargs: Any) -> VideoSource:
    """Open ``path`` (file or URL) for frame iteration; see :class:`VideoSource`."""
    return VideoSource(path, **kwargs)
