"""Frames plus their motion field, from any source PyAV opens: the motion front-end's one entry point."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from numba import typeof, types

from fluxshard.errors import FluxShardError
from fluxshard.motion import _kernels
from fluxshard.motion.blockmatch import BlockMatchConfig, block_match
from fluxshard.motion.codec import CodecFieldBuilder, CodecMVConfig
from fluxshard.motion.field import MotionField
from fluxshard.video import sidedata
from fluxshard.video.decode import MV_DTYPE, DecodedFrame, VideoSource, open_video

MVSource = Literal["auto", "codec", "blockmatch"]
SINGLE_REFERENCE_CODECS = frozenset(
    {"mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4v3", "msmpeg4", "wmv1", "wmv2", "h263",
     "h263p", "flv1"}
)


@dataclass
class MotionFrame:
    frame: DecodedFrame
    field: MotionField  # current → previous displayed frame

    @property
    def index(self) -> int:
        return self.frame.index


@dataclass
class Timings:
    """CPU seconds of the thread doing each part, summed over frames: robust to a shared machine and to the
    decoder running ahead on its own thread (wall-clock overheads are measured by the benchmark)."""

    decode: float = 0.0
    motion: float = 0.0
    frames: int = 0
    per_frame_motion: list[float] = field(default_factory=list)


class MotionStream:
    """Iterate :class:`MotionFrame` objects in display order.

    ``mv_source="auto"`` uses codec vectors when the decoder exports them and falls back to hierarchical
    block matching otherwise (HEVC, VP9, raw video, or an H.264 stream whose first inter frames carry no
    vectors). :attr:`mv_source` reports the source actually used; each field's ``source`` says where that
    frame's vectors came from. With ``match_intra`` (default), I-frames of a codec-MV stream — which carry
    no vectors — are block-matched too and only become all-invalid scene cuts if matching fails as well.
    """

    def __init__(
        self,
        path: str | Path,
        block: int = 16,
        mv_source: MVSource = "auto",
        codec_config: CodecMVConfig | None = None,
        match_config: BlockMatchConfig | None = None,
        max_frames: int | None = None,
        on_error: Literal["raise", "collect"] = "raise",
        match_intra: bool = True,
    ) -> None:
        if block not in (8, 16):
            raise FluxShardError(f"block size must be 8 or 16, got {block}")
        self.block = block
        self.match_intra = match_intra
        self.video: VideoSource = open_video(path, export_mvs=mv_source != "blockmatch",
                                             max_frames=max_frames, on_error=on_error)
        self.info = self.video.info
        self._single_ref = self.info.codec in SINGLE_REFERENCE_CODECS
        if codec_config is None:
            # MPEG-1/2/4 Part 2, H.263 and WMV predict P-frames from the previous anchor only and B-frames from
            # the surrounding anchors: the expected span is exact, no span search needed. H.264 may use any of
            # up to 16 references per block, so its vectors are verified.
            codec_config = CodecMVConfig(block=block, verify=not self._single_ref)
            refs = self.info.max_ref_frames
            if refs is not None and not self.info.has_b_frames:
                # Without B-frames a vector spans at most the stream's reference count (H.264 SPS).
                codec_config = replace(codec_config, max_ref_span=max(1, min(refs, codec_config.max_ref_span)))
        self.codec_config = codec_config
        self.match_config = match_config or BlockMatchConfig(block=block)
        if mv_source == "codec" and not self.info.codec_has_mvs:
            raise FluxShardError(f"{self.info.path}: codec {self.info.codec} exports no motion vectors")
        self.mv_source: str = "codec" if mv_source != "blockmatch" and self.info.codec_has_mvs else "blockmatch"
        self._forced = mv_source
        self.timings = Timings()
        self._builder: CodecFieldBuilder | None = None
        self._get_fn: int | None = None  # direct side-data read (video.sidedata): address, 0 = off, None = undecided
        self._inter_without_mvs = 0
        _warm_up(block)

    def __iter__(self) -> Iterator[MotionFrame]:
        prev: DecodedFrame | None = None
        self._last_anchor = -1
        self._last_field: MotionField | None = None
        timings = self.timings
        per_frame = timings.per_frame_motion
        video = self.video
        clock = time.thread_time
        self._inter_without_mvs = 0
        for frame in video:
            _ = frame.luma  # the decoded plane (every consumer takes it): decoding's cost, not the front-end's
            t1 = clock()
            fld = self._field(frame, prev)
            if not fld.scene_cut:
                self._last_field = fld
            t0 = clock()
            timings.decode = video.decode_seconds
            timings.motion += t0 - t1
            per_frame.append(t0 - t1)
            timings.frames += 1
            yield MotionFrame(frame, fld)
            prev = frame

    def _field(self, frame: DecodedFrame, prev: DecodedFrame | None) -> MotionField:
        h, w = frame.height, frame.width
        if prev is None or (prev.height, prev.width) != (h, w):
            self._last_anchor = frame.index
            return MotionField.invalid(h, w, self.block, frame_type=frame.pict_type, source=self.mv_source,
                                       scene_cut=True)
        # FFmpeg exports the B-frame vectors of the MPEG-4 Part 2 family from tables that direct-mode blocks do
        # not fill (measured: all-zero vectors on a panning clip), so those B-frames are block-matched.
        unusable = self._single_ref and frame.pict_type == "B"
        if self.mv_source == "codec" and not unusable:
            prior = frame.index - self._last_anchor if self._last_anchor >= 0 else 1
            if frame.pict_type != "B":
                self._last_anchor = frame.index
            builder = self._builder
            if builder is None or (builder.height, builder.width) != (h, w):
                builder = self._builder = CodecFieldBuilder(self.codec_config, h, w)
            get_fn = self._get_fn
            if get_fn:  # the kernel reads the vectors from the decoder's frame itself
                fld = builder.build_at(id(frame.av_frame), get_fn, frame.pict_type, frame.key_frame, frame.luma,
                                       prev.luma, prior)
            else:
                mvs = frame.mvs  # through PyAV; decides once per process whether the direct read can be used
                if get_fn is None:
                    self._get_fn = sidedata.fast_path_for(frame.av_frame, mvs)
                fld = None if mvs is None else builder.build(mvs, frame.pict_type, frame.key_frame, frame.luma,
                                                             prev.luma, prior)
            if fld is None:  # no vectors in this frame
                if self._forced == "auto" and frame.pict_type in ("P", "B") and not frame.key_frame:
                    self._inter_without_mvs += 1
                if self._inter_without_mvs < 2:
                    return builder.build(None, frame.pict_type, frame.key_frame, None, None)
                self.mv_source = "blockmatch"  # the decoder does not export vectors for this stream
            elif not (self.match_intra and fld.scene_cut and frame.pict_type == "I"):
                return fld
            elif histogram_distance(frame.luma, prev.luma) > HIST_CUT:
                return fld  # an obvious cut: no need to try matching
            # An I-frame carries no vectors, but periodic key frames are rarely scene cuts: estimate the
            # field by block matching, and call it a cut only if that fails too.
        # Between coded fields (I-frames, MPEG-4 B-frames) the last field predicts the motion well.
        predictor = self._last_field if self.mv_source == "codec" else None
        fld = block_match(frame.luma, prev.luma, self.match_config, frame_type=frame.pict_type, predictor=predictor)
        if 1.0 - fld.valid_fraction > self.codec_config.scene_cut_intra:
            fld.valid[:] = False
            fld.scene_cut = True
        return fld


# L1 distance between normalised 32-bin luma histograms above which consecutive frames are a scene cut.
# Measured: periodic key frames of cup.mp4 / vtest.avi ≤ 0.09, the cuts of bikes.mp4 ≥ 0.42.
HIST_CUT = 0.3


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L1 distance of the 32-bin luma histograms (on every other pixel of every other row): ~0.1 ms at
    640×480 (one compiled pass per plane, no temporaries)."""
    counts = np.empty((2, 32), np.int64)
    _kernels.luma_histograms(a, b, counts[0], counts[1])
    ha = counts[0].astype(np.float32)
    hb = counts[1].astype(np.float32)
    return float(np.abs(ha / ha.sum() - hb / hb.sum()).sum())


_WARM: set[int] = set()


def _warm_up(block: int) -> None:
    """Load (or compile) the numba kernels before timing starts: a one-off per process, not per frame."""
    if block in _WARM:
        return
    from fluxshard.motion.codec import field_from_mvs

    z = np.zeros((block * 2, block * 2), np.uint8)
    mv = np.zeros(1, MV_DTYPE)
    mv[0] = (-1, 16, 16, 0, 0, 8, 8, 0, 4, 0, 4)
    out = np.empty((3, 2, 2), np.int32)
    flags = np.empty((2, 2, 2), np.bool_)
    for img in (z, np.zeros((block * 2, block * 4), np.uint8)[:, : block * 2]):  # contiguous and strided planes
        field_from_mvs(mv, 2 * block, 2 * block, "P", False, img, img, CodecMVConfig(block=block))
        # The direct side-data variant needs a live decoder frame to run: load its machine code by signature.
        _kernels.codec_field_at.compile((types.int64, types.int64, types.int64, typeof(np.zeros(4, np.uint64)),
                                         typeof(img), typeof(img), typeof(out[None]), typeof(flags[None]),
                                         types.int64))
        _kernels.shifted_diff(img[:, :, None], img[:, :, None], np.zeros((2, 2), np.int32),
                              np.zeros((2, 2), np.int32), block, np.empty(img.shape, np.float32),
                              np.empty((2, 2), np.float32))
        histogram_distance(img, img)
    block_match(z, z, BlockMatchConfig(block=block))
    block_match(z, z, BlockMatchConfig(block=block), predictor=MotionField.zero(2 * block, 2 * block, block))
    _WARM.add(block)
