"""Write RGB frames to a video file with PyAV (H.264 by default, HEVC/MPEG-4 for tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from fluxshard.errors import VideoError

#: x264 preset of annotated output videos (a view of the results, not data: speed over size).
OVERLAY_PRESET = "veryfast"


class VideoWriter:
    """Encode ``uint8`` RGB frames of one fixed size; the encoder's own options pass through.

    Codec options are x264/x265 private options (``{"bf": "2", "refs": "4"}`` via ``x264-params`` etc.),
    so tests can produce streams with B-frames, several reference frames or no motion vectors (HEVC).
    ``preset`` (x264/x265): the CLIs' overlay videos use :data:`OVERLAY_PRESET` — on this CPU the default
    ("medium") took ~26 ms per 768×576 frame, longer than the engine; generated test clips keep the default,
    whose motion vectors the motion tests and profiles were made with.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | Fraction = 25,
        codec: str = "libx264",
        crf: int | None = 20,
        options: dict[str, str] | None = None,
        pix_fmt: str = "yuv420p",
        preset: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self.codec = codec
        self.options = dict(options or {})
        if crf is not None and codec in ("libx264", "libx265"):
            self.options.setdefault("crf", str(crf))
        if preset is not None and codec in ("libx264", "libx265"):
            self.options.setdefault("preset", preset)
        self.pix_fmt = pix_fmt
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def _open(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise VideoError(f"{self.path}: frame size {width}x{height} must be even for {self.pix_fmt}")
        try:
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream(self.codec, rate=self.fps, options=self.options)
        except (av.error.FFmpegError, ValueError) as exc:
            raise VideoError(f"{self.path}: cannot open encoder {self.codec}: {exc}") from exc
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = self.pix_fmt

    def write(self, rgb: np.ndarray) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise VideoError(f"{self.path}: expected HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
        if self._container is None:
            self._open(rgb.shape[1], rgb.shape[0])
        elif (rgb.shape[1], rgb.shape[0]) != (self._stream.width, self._stream.height):
            raise VideoError(
                f"{self.path}: frame {self.frames} is {rgb.shape[1]}x{rgb.shape[0]}, "
                f"stream is {self._stream.width}x{self._stream.height}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
