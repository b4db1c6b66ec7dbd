"""Uplink bytes per cloud frame: the residual payload against full offload, on real clips.

Why: seed 000 claims its residual payload (accumulated field + residual blocks against the cloud's input cache)
costs up to 92 % less than sending the frame. This measures, per clip and per cloud cadence (every frame, or
every Nth with the others run on the edge so the cloud's field accumulates over several frames), the median
bytes of a cloud frame for

* ``residual`` — the payload's arrays (int16 dy/dx, bool valid, int32 indices, residual pixels), each zstd
  level 3 on its raw bytes (the wire codec), in exact mode (τ_in = 0: the server's input equals the edge's) and
  fast mode (τ_in as given, NanoDet's shipped 0.02);
* ``zstd full`` — the whole integer input, zstd level 3 (what a keyframe costs);
* ``PNG`` — the whole input as a PNG (PIL, compress level 6): lossless full offload;
* ``JPEG q90`` — the whole input at the model's input size as a quality-90 JPEG (PIL): lossy full offload;
* ``bitstream`` — the camera's own compressed packets (:mod:`fluxshard.edgecloud.bitstream`): for a cloud frame,
  the packets of every frame since the previous cloud frame (the edge-run ones go as ``decode_only``, so the
  server's decoder keeps its references), data bytes only (protobuf framing adds ~10 bytes per packet). Exact
  by construction; every cloud frame is decoded by a :class:`BitstreamDecoder` here and its input checked
  against the edge's. ``resync`` = what restarting a server decoder costs at a cloud frame (the packets back
  to the GOP's keyframe), median and max, to compare with ``zstd full`` (a lossless keyframe); ``bitstream best``
  = per cloud frame the smaller of forwarding everything since the last cloud frame and a resync (once a keyframe
  has passed since the last cloud frame, the edge may stop forwarding and resync instead); ``decode ms`` =
  the server's decoder time per cloud frame (its decode_only groups included, plus the target's conversion).

Engine input = NanoDet's mapping (factor 1 for these clips, padded to a multiple of 32). Usage::

    python benchmarks/edgecloud_payload.py [--clips cup,bikes] [--frames 30] [--every 1,4] [--tau-in 0.02]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import zstandard
from PIL import Image

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud import wire
from fluxshard.edgecloud.bitstream import BitstreamDecoder, PacketTap, edge_input
from fluxshard.edgecloud.dispatch import DispatchLayer, integer_input
from fluxshard.edgecloud.payload import ResidualPayload, apply_residual, build_residual
from fluxshard.engine.inputs import InputMapper
from fluxshard.motion import MotionStream

ZSTD = zstandard.ZstdCompressor(level=3)


def residual_bytes(p: ResidualPayload) -> int:
    return sum(len(ZSTD.compress(np.ascontiguousarray(a).tobytes())) for a in p.arrays().values())


def image_bytes(arr: np.ndarray, fmt: str, **kw: object) -> int:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.tell()


def run(clip: str, frames: int, every: int, tau_in: float) -> dict[str, float]:
    stream = list(MotionStream(clip_path(clip), max_frames=frames))
    mapper = InputMapper(stream[0].frame.rgb.shape[:2])
    assert mapper.factor == 1  # uint8 input: the PNG/JPEG rows below need 8-bit images
    layers = {"exact": DispatchLayer.for_mapper(mapper), "fast": DispatchLayer.for_mapper(mapper, tau_in=tau_in)}
    rows: dict[str, list[float]] = {k: [] for k in ("exact", "fast", "exact_frac", "fast_frac", "zstd", "png", "jpeg",
                                                    "bits", "resync", "best", "dec_ms")}
    tap = PacketTap(clip_path(clip), max_frames=frames)
    server = BitstreamDecoder(tap.params, mapper)
    unsent, spent = 0, 0.0  # packet bytes and server decode seconds since the last cloud frame
    for k, (mf, tf) in enumerate(zip(stream, tap, strict=True)):
        assert mf.frame.pts == tf.pts and not tf.flushed
        cur = integer_input(mapper, mf.frame.rgb)
        unsent += tf.nbytes
        is_cloud = k == 0 or k % every == 0
        t0 = time.perf_counter()
        got = server.decode(tf.packets, checksum=wire.checksum(cur) if is_cloud else None)
        spent += time.perf_counter() - t0
        if is_cloud:
            assert got is not None and np.array_equal(got, cur) and np.array_equal(edge_input(mapper, tf.frame), cur)
        if k == 0:
            unsent, spent = 0, 0.0
            for layer in layers.values():
                layer.update(cur)
            continue
        step = mapper.field(mf.field)
        for layer in layers.values():
            layer.fold(step)
        if k % every:
            continue
        rows["bits"].append(unsent)
        rows["resync"].append(sum(len(p.data) for p in tap.resync_packets()))
        rows["best"].append(min(unsent, rows["resync"][-1]))
        rows["dec_ms"].append(spent * 1e3)
        unsent, spent = 0, 0.0
        for name, layer in layers.items():
            p = build_residual(layer, cur, seq=k)
            assert layer.cache is not None and p.rebuilt is not None
            assert np.array_equal(apply_residual(layer.cache, p), p.rebuilt)
            if name == "exact":
                assert np.array_equal(p.rebuilt, cur)
            rows[name].append(residual_bytes(p))
            rows[name + "_frac"].append(p.indices.size / p.valid.size)
            layer.update(p.rebuilt)
        rows["zstd"].append(len(ZSTD.compress(cur.tobytes())))
        rows["png"].append(image_bytes(cur, "PNG", compress_level=6))
        rows["jpeg"].append(image_bytes(cur, "JPEG", quality=90))
    return ({k: statistics.median(v) for k, v in rows.items()}
            | {"n": len(rows["zstd"]), "hw": mapper.input_hw, "resync_max": max(rows["resync"])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", default="cup,bikes")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--every", default="1,4", help="cloud cadences: the cloud runs every Nth frame")
    ap.add_argument("--tau-in", type=float, default=0.02)
    a = ap.parse_args()
    print(f"median bytes per cloud frame; residual = zstd-3 of the payload arrays; fast τ_in = {a.tau_in}")
    print("| clip | input | cloud every | frames | residual exact (blocks) | residual fast (blocks) | bitstream "
          "| zstd full | PNG | JPEG q90 | exact saves vs PNG | fast saves vs JPEG | bitstream saves vs PNG "
          "| bitstream / residual exact | bitstream resync (max) | bitstream best | decode ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clip in a.clips.split(","):
        for every in (int(e) for e in a.every.split(",")):
            r = run(clip, a.frames, every, a.tau_in)
            h, w = r["hw"]
            print(f"| {clip} | {w}x{h} | {every} | {r['n']} | {r['exact']:,.0f} ({r['exact_frac']:.0%}) "
                  f"| {r['fast']:,.0f} ({r['fast_frac']:.0%}) | {r['bits']:,.0f} | {r['zstd']:,.0f} | {r['png']:,.0f} "
                  f"| {r['jpeg']:,.0f} | {1 - r['exact'] / r['png']:+.0%} | {1 - r['fast'] / r['jpeg']:+.0%} "
                  f"| {1 - r['bits'] / r['png']:+.0%} | {r['bits'] / r['exact']:.2f} | {r['resync']:,.0f} "
                  f"({r['resync_max']:,.0f}) | {r['best']:,.0f} | {r['dec_ms']:.1f} |")


if __name__ == "__main__":
    main()
