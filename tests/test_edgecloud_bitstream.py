"""Bitstream payload kind: the server decodes the edge's forwarded packets into the edge's engine input, bit for
bit (checksums on every frame), with B-frames, skipped frames, resyncs, HEVC, damage and the wire mapping."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud import wire
from fluxshard.edgecloud.bitstream import (
    NOPTS,
    BitstreamDecoder,
    BitstreamError,
    CodecParams,
    PacketTap,
    TapFrame,
    bitstream_kind_ok,
    edge_input,
    from_packets_message,
    to_packets_message,
)
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.engine.inputs import InputMapper
from fluxshard.video.decode import RawPacket, VideoSource
from synth import SynthClip, make_clip


def _tap(path: Path | str, frames: int | None = None) -> tuple[PacketTap, InputMapper, list[TapFrame]]:
    tap = PacketTap(path, max_frames=frames)
    mapper = InputMapper((tap.info.height, tap.info.width))
    return tap, mapper, list(tap)


def _server(tap: PacketTap, mapper: InputMapper) -> BitstreamDecoder:
    """The server's decoder, opened from the Hello the edge would send (through the proto)."""
    hello = pb.CodecParameters.FromString(tap.params.to_message().SerializeToString())
    return BitstreamDecoder(CodecParams.from_message(hello), mapper)


def _over_wire(seq: int, base: int, tf: TapFrame, checksum: str, decode_only: bool = False) -> tuple[RawPacket, ...]:
    msg = to_packets_message(seq, base, tf.packets, checksum, decode_only=decode_only)
    env = wire.parse_edge_message(pb.EdgeMessage(packets=msg).SerializeToString())
    got = from_packets_message(env.packets)
    assert (got.seq, got.base_seq, got.decode_only) == (seq, base, decode_only)
    return got.packets


def _exact_every_frame(path: Path | str, frames: int | None = None, mapper: InputMapper | None = None) -> int:
    """Every frame: edge input vs the server's decode of its packets; returns the number of frames checked."""
    tap, default_mapper, tfs = _tap(path, frames)
    mapper = mapper or default_mapper
    dec = _server(tap, mapper)
    for tf in tfs:
        inp = edge_input(mapper, tf.frame)
        want = wire.checksum(inp)
        if tf.flushed:  # the end-of-stream drain cannot go over protocol v1: the in-process API can do it
            got = dec.decode((), checksum=want, flush=True)
        else:
            got = dec.decode(_over_wire(tf.index + 1, tf.index, tf, want), checksum=want)
        assert got is not None and wire.checksum(got) == want, f"frame {tf.index}"
        assert np.array_equal(got, inp)
    return len(tfs)


# ---------------------------------------------------------------------------------------------------- edge tap


def test_keep_packets_is_opt_in(clip_b: SynthClip) -> None:
    plain = list(VideoSource(clip_b.path, prefetch=0))
    assert all(f.packets is None and not f.flushed for f in plain)
    kept = list(VideoSource(clip_b.path, keep_packets=True))
    assert len(kept) == len(plain) == clip_b.frames
    assert [f.pts for f in kept] == [f.pts for f in plain]
    # every demuxed packet is attached to exactly one frame, in decode order (dts increasing)
    dts = [p.dts for f in kept for p in f.packets or ()]
    assert len(dts) == clip_b.frames and dts == sorted(dts)
    # B-frames: the first frame waits for the reordering delay, the last ones come out of the drain
    assert len(kept[0].packets or ()) > 1
    assert kept[-1].flushed and kept[-1].packets == ()
    info = VideoSource(clip_b.path).info
    assert info.extradata and info.pix_fmt == "yuv420p" and info.time_base


def test_bitstream_kind_ok(tmp_path: Path, clip_hevc: SynthClip) -> None:
    assert bitstream_kind_ok(clip_path("cup"))
    assert bitstream_kind_ok(clip_hevc.path)
    raw = tmp_path / "raw.y4m"  # what a raw source (webcam dump) looks like: frames, no packets worth forwarding
    raw.write_bytes(b"YUV4MPEG2 W16 H16 F25:1 Ip A1:1 C420jpeg\n" + (b"FRAME\n" + bytes(16 * 16 * 3 // 2)) * 2)
    assert not bitstream_kind_ok(raw)
    assert not bitstream_kind_ok(tmp_path / "missing.mp4")
    with pytest.raises(BitstreamError, match=r"rawvideo.*residual"):
        PacketTap(raw)


# ---------------------------------------------------------------------------------------------------- exactness


def test_cup_every_frame_exact_over_the_wire() -> None:
    assert _exact_every_frame(clip_path("cup"), 40) == 40


def test_cup_exact_with_box_sum_input() -> None:
    """Reduction factor 2: the uint16 box-sum form is converted identically on both sides."""
    cup = clip_path("cup")
    assert _exact_every_frame(cup, 12, InputMapper((480, 640), factor=2)) == 12


def test_b_frames_exact_including_the_drain(clip_b: SynthClip) -> None:
    assert _exact_every_frame(clip_b.path) == clip_b.frames


def test_hevc_exact(clip_hevc: SynthClip) -> None:
    assert _exact_every_frame(clip_hevc.path) == clip_hevc.frames


@pytest.mark.parametrize("every", [2, 3])
def test_skipped_frames_go_decode_only_and_stay_exact(clip_b: SynthClip, every: int) -> None:
    tap, mapper, tfs = _tap(clip_b.path)
    dec = _server(tap, mapper)
    inferred = 0
    for tf in tfs:
        if tf.flushed:
            break
        if tf.index % every:  # the edge ran it: the server only advances its decoder
            assert dec.decode(_over_wire(tf.index + 1, tf.index, tf, "", decode_only=True)) is None
            continue
        inp = edge_input(mapper, tf.frame)
        got = dec.decode(_over_wire(tf.index + 1, tf.index, tf, wire.checksum(inp)), checksum=wire.checksum(inp))
        assert got is not None and np.array_equal(got, inp), f"frame {tf.index}"
        inferred += 1
    assert inferred >= len(tfs) // every - 1


# ---------------------------------------------------------------------------------------------------- resync


def test_resync_after_a_gap_from_the_gop_keyframe() -> None:
    """cup (keyframes every 30): the server loses its decoder after frame 9, the edge goes on alone; at frame 35
    it resyncs with the packets since the keyframe of frame 30, then plain groups are exact again."""
    tap = PacketTap(clip_path("cup"), max_frames=40)
    mapper = InputMapper((tap.info.height, tap.info.width))
    dec = _server(tap, mapper)
    for tf in tap:
        inp = edge_input(mapper, tf.frame)
        cs = wire.checksum(inp)
        if tf.index < 10 or tf.index > 35:
            got = dec.decode(tf.packets, checksum=cs)
        elif tf.index < 35:
            if tf.index == 10:
                dec.reset()  # server restarted / evicted the stream
            continue
        else:
            resync = tap.resync_packets()
            assert resync[0].keyframe and len(resync) == 6  # frames 30-35
            assert sum(p.keyframe for p in resync) == 1
            with pytest.raises(BitstreamError, match="keyframe"):  # the plain group cannot restart a decoder
                dec.decode(tf.packets, checksum=cs)
            got = dec.decode(resync, checksum=cs)
        assert got is not None and np.array_equal(got, inp), f"frame {tf.index}"


@pytest.fixture(scope="module")
def clip_b_gops(tmp_path_factory: pytest.TempPathFactory) -> SynthClip:
    """B-frames and a keyframe every 8: frames displayed before an IDR are released by packets after it."""
    return make_clip(tmp_path_factory.mktemp("bgop") / "bgop.mp4", frames=20,
                     options={"bf": "2", "g": "8", "keyint_min": "8", "x264-params": "b-adapt=0:scenecut=0"})


def test_resync_at_every_frame_with_b_frames_and_gops(clip_b_gops: SynthClip) -> None:
    """A fresh server decoder fed resync_packets() gives the edge's input at any frame, GOP boundaries included."""
    tap = PacketTap(clip_b_gops.path)
    mapper = InputMapper((tap.info.height, tap.info.width))
    keys = 0
    for tf in tap:
        if tf.flushed:
            with pytest.raises(BitstreamError, match="drain"):
                tap.resync_packets()
            continue
        keys += any(p.keyframe for p in tf.packets)
        pkts = tap.resync_packets()
        assert pkts[0].keyframe
        inp = edge_input(mapper, tf.frame)
        dec = _server(tap, mapper)
        got = dec.decode(pkts, checksum=wire.checksum(inp))
        assert got is not None and np.array_equal(got, inp), f"frame {tf.index}"
    assert keys >= 3


def test_packets_after_a_gap_without_reset_fail_cleanly() -> None:
    """Missing packets (seq gap the server did not notice): a clean BitstreamError, never a wrong frame."""
    tap, mapper, tfs = _tap(clip_path("cup"), 12)
    dec = _server(tap, mapper)
    for tf in tfs[:4]:
        dec.decode(tf.packets)
    tf = tfs[10]
    with pytest.raises(BitstreamError) as e:
        dec.decode(tf.packets, checksum=wire.checksum(edge_input(mapper, tf.frame)))
    assert e.value.need_keyframe_reason in (pb.NeedKeyframe.REASON_CHECKSUM_MISMATCH,
                                            pb.NeedKeyframe.REASON_DECODE_ERROR)
    assert dec.needs_keyframe


# ---------------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_packets_give_a_clean_error_then_resync_works(damage: str) -> None:
    tap, mapper, tfs = _tap(clip_path("cup"), 8)
    dec = _server(tap, mapper)
    for tf in tfs[:5]:
        dec.decode(tf.packets)
    tf = tfs[5]
    (p,) = tf.packets
    rng = np.random.default_rng(5)
    if damage == "flip":
        data = bytearray(p.data)
        for i in rng.integers(8, len(data), 40):
            data[i] ^= 0xFF
        bad = bytes(data)
    elif damage == "truncate":
        bad = p.data[: len(p.data) // 3]
    else:
        bad = rng.integers(0, 256, len(p.data), dtype=np.uint8).tobytes()
    with pytest.raises(BitstreamError) as e:
        dec.decode((replace(p, data=bad),), checksum=wire.checksum(edge_input(mapper, tf.frame)))
    assert str(e.value) and "\n" not in str(e.value)
    assert dec.needs_keyframe
    pkts = [q for t in tfs[:6] for q in t.packets]  # resync from frame 0's keyframe
    got = dec.decode(pkts, checksum=wire.checksum(edge_input(mapper, tf.frame)))
    assert got is not None and np.array_equal(got, edge_input(mapper, tf.frame))


def test_garbage_keyframe_and_garbage_extradata() -> None:
    tap, mapper, tfs = _tap(clip_path("cup"), 1)
    dec = _server(tap, mapper)
    with pytest.raises(BitstreamError):
        dec.decode((RawPacket(bytes(range(256)) * 8, 0, 0, True),), checksum="0" * 16)
    bad = BitstreamDecoder(replace(tap.params, extradata=b"\x01\x02\x03garbage" * 4), mapper)
    with pytest.raises(BitstreamError):
        bad.decode(tfs[0].packets, checksum=wire.checksum(edge_input(mapper, tfs[0].frame)))


def test_decoder_refuses_mismatched_setup() -> None:
    tap = PacketTap(clip_path("cup"))
    mapper = InputMapper((480, 640))
    with pytest.raises(BitstreamError, match="640x480"):
        BitstreamDecoder(tap.params, InputMapper((272, 640)))
    with pytest.raises(BitstreamError, match="not one of"):
        BitstreamDecoder(replace(tap.params, codec_name="mjpeg"), mapper)
    with pytest.raises(ValueError, match="FRAME"):
        BitstreamDecoder(tap.params, mapper, threads="FRAME")  # type: ignore[arg-type]
    with pytest.raises(BitstreamError, match="no state"):
        BitstreamDecoder(tap.params, mapper).decode(())


# ---------------------------------------------------------------------------------------------------- proto mapping


def test_packets_message_round_trip_and_limits() -> None:
    pkts = (RawPacket(b"\x00\x00\x01kf", 0, None, True), RawPacket(b"p", None, 7, False))
    msg = to_packets_message(5, 4, pkts, "0123456789abcdef")
    assert msg.packets[0].dts == NOPTS and msg.packets[1].pts == NOPTS
    back = from_packets_message(pb.Packets.FromString(msg.SerializeToString()))
    assert back.packets == pkts and back.checksum == "0123456789abcdef" and not back.decode_only
    assert back.nbytes == 6
    assert to_packets_message(6, 5, pkts, "whatever", decode_only=True).checksum == ""
    with pytest.raises(wire.WireError, match="checksum"):
        to_packets_message(6, 5, pkts, "not-hex")
    with pytest.raises(wire.WireError, match="packets"):
        to_packets_message(6, 5, (), "0123456789abcdef")  # a drained frame has no packets: v1 cannot send it
    with pytest.raises(wire.WireError, match="packets"):
        to_packets_message(6, 5, pkts[:1] * (wire.MAX_PACKETS + 1), "0123456789abcdef")
    with pytest.raises(wire.WireError, match="limit 100"):
        to_packets_message(6, 5, (RawPacket(bytes(200), 0, 0, True),), "0123456789abcdef",
                           limits=wire.WireLimits(max_message_bytes=100))
    with pytest.raises(wire.WireError, match="base_seq"):
        from_packets_message(pb.Packets(seq=3, base_seq=3, packets=[pb.Packet(data=b"x")], decode_only=True))


def test_codec_parameters_round_trip_and_checks() -> None:
    tap = PacketTap(clip_path("cup"), max_frames=1)
    p = tap.params
    assert (p.codec_name, p.width, p.height, p.pix_fmt) == ("h264", 640, 480, "yuv420p") and p.extradata
    assert CodecParams.from_message(p.to_message()) == p
    for bad, match in [(replace(p, codec_name="rawvideo"), "codec_name"), (replace(p, width=0), "frame size")]:
        with pytest.raises(wire.WireError, match=match):
            CodecParams.from_message(bad.to_message())
    m = p.to_message()
    m.time_base_den = 0
    with pytest.raises(wire.WireError, match="time base"):
        CodecParams.from_message(m)
    hello = pb.Hello(protocol_version=1, stream_id="s", model_name="m", model_hash="h", mode=pb.ENGINE_MODE_EXACT,
                     input_shape=[3, 480, 640], input_dtype="uint8", block_size=16,
                     payload_kind=pb.PAYLOAD_KIND_BITSTREAM, codec=m)
    m.time_base_den = 1
    hello.codec.CopyFrom(m)
    wire.validate_edge_message(pb.EdgeMessage(hello=hello))
