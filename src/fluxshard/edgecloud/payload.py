"""Residual payloads and the receive layer (seed 000 §III-B, Stages 3–4): what the edge sends so that the
server rebuilds the engine input the edge's mirror of the cloud layer predicts, bit for bit.

A :class:`ResidualPayload` carries the *effective* accumulated field from the cloud's input cache to the
current frame (int16 dy/dx and bool valid on the block grid at engine input resolution, the
:class:`~fluxshard.motion.field.MotionField` convention ``cur[y, x] = cache[y + dy, x + dx]``), the sorted int32
flat indices of the residual blocks, their pixels in the cache's integer form (uint8, or uint16 box sums; see
:mod:`fluxshard.edgecloud.dispatch`) laid out as (n, B, B, C) with partial edge blocks zero-padded to B×B, and
the checksum of the rebuilt input. The receive layer (:func:`apply_residual`) shifts the cached input block by
block with the field and pastes the residual blocks; every non-residual block must carry a valid vector whose
source lies inside the frame, so rebuilding needs no policy of its own. In exact mode (τ_in = 0) the rebuilt
input is the edge's current input; in fast mode it is the shifted cache with the residual blocks replaced —
in both, exactly what the edge's mirror of the cloud layer caches next. A :class:`Keyframe` is the whole input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fluxshard.edgecloud import wire
from fluxshard.edgecloud.dispatch import DispatchLayer, from_blocks, to_blocks
from fluxshard.motion.field import MotionField, grid_shape
from fluxshard.motion.residual import warp_blocks

INT16 = np.iinfo(np.int16)


class PayloadError(ValueError):
    """A payload that cannot be applied to this cache (shape, dtype, indices, field) or whose checksum differs:
    the server answers "need keyframe"."""


def checksum(arr: np.ndarray) -> str:
    """blake2b-64 hex over dtype name, shape and little-endian bytes — the wire's own (:func:`wire.checksum`), so
    the edge's and the server's checksums of one input can never disagree by construction."""
    return wire.checksum(arr)


@dataclass
class ResidualPayload:
    stream_id: str
    seq: int
    base_seq: int  # seq of the input the server must hold in its cache (the cloud layer's ``seq``; -1: unnumbered)
    model_hash: str
    block: int
    dy: np.ndarray  # int16 (Hb, Wb)
    dx: np.ndarray  # int16 (Hb, Wb)
    valid: np.ndarray  # bool (Hb, Wb)
    indices: np.ndarray  # int32 (n,), sorted flat indices into the block grid
    pixels: np.ndarray  # uint8 / uint16 (n, B, B, C)
    checksum: str
    # edge side only, never sent: the input the server will rebuild (what the cloud layer caches next)
    rebuilt: np.ndarray | None = field(default=None, repr=False, compare=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors that go on the wire, by name."""
        return {"dy": self.dy, "dx": self.dx, "valid": self.valid, "indices": self.indices, "pixels": self.pixels}


@dataclass
class Keyframe:
    stream_id: str
    seq: int
    model_hash: str
    pixels: np.ndarray  # the whole input, integer form (H, W, C)
    checksum: str


def keyframe(current: np.ndarray, *, stream_id: str = "", seq: int = 0, model_hash: str = "") -> Keyframe:
    """The whole input, lossless: what resyncs a server that lost (or never had) this stream's cache."""
    pixels = np.array(current, copy=True, order="C")
    return Keyframe(stream_id, seq, model_hash, pixels, checksum(pixels))


def apply_keyframe(kf: Keyframe, verify: bool = True) -> np.ndarray:
    """The server's new cache from a keyframe (checksum checked)."""
    if verify and checksum(kf.pixels) != kf.checksum:
        raise PayloadError(f"keyframe {kf.seq}: checksum {checksum(kf.pixels)} != sent {kf.checksum}")
    return np.array(kf.pixels, copy=True, order="C")


def build_residual(cloud_layer: DispatchLayer, current: np.ndarray, *, stream_id: str = "", seq: int = 0,
                   model_hash: str = "") -> ResidualPayload:
    """The residual payload of ``current`` against the cloud layer's aligned cache. Does not update the layer:
    when the frame does go to the cloud, call ``cloud_layer.update(payload.rebuilt)``."""
    if cloud_layer.cache is None:
        raise PayloadError("the cloud layer has no input cache yet: send a keyframe")
    al = cloud_layer.align(current)
    fld = al.field
    if fld.dy.size and (min(fld.dy.min(), fld.dx.min()) < INT16.min or max(fld.dy.max(), fld.dx.max()) > INT16.max):
        raise PayloadError("accumulated motion exceeds the int16 range of the payload")
    b = cloud_layer.block
    indices = np.flatnonzero(al.residual).astype(np.int32)
    pixels = to_blocks(current, b)[indices]
    base = -1 if cloud_layer.seq is None else cloud_layer.seq
    p = ResidualPayload(stream_id, int(seq), base, model_hash, b, fld.dy.astype(np.int16), fld.dx.astype(np.int16),
                        fld.valid.copy(), indices, np.ascontiguousarray(pixels), "")
    p.rebuilt = apply_residual(cloud_layer.cache, p, verify=False)
    p.checksum = checksum(p.rebuilt)
    return p


def apply_residual(cache: np.ndarray, payload: ResidualPayload, verify: bool = True) -> np.ndarray:
    """Receive layer: shift ``cache`` block by block with the payload's field, paste its residual blocks; the
    checksum of the result is checked against the payload's (``verify``)."""
    if cache.ndim != 3:
        raise PayloadError(f"cache must be H×W×C, got shape {cache.shape}")
    h, w, c = cache.shape
    b = int(payload.block)
    if b < 1:
        raise PayloadError(f"block size must be positive, got {b}")
    hb, wb = grid_shape(h, w, b)
    for name in ("dy", "dx", "valid"):
        a = getattr(payload, name)
        if a.shape != (hb, wb):
            raise PayloadError(f"field {name} is {a.shape}, the {w}x{h} cache has a {hb}x{wb} grid of {b}-px blocks")
    if payload.dy.dtype != np.int16 or payload.dx.dtype != np.int16 or payload.valid.dtype != np.bool_:
        raise PayloadError("field must be int16 dy/dx and bool valid")
    idx = payload.indices
    if idx.ndim != 1 or idx.dtype != np.int32:
        raise PayloadError(f"indices must be a 1-D int32 array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx[0] < 0 or idx[-1] >= hb * wb or np.any(np.diff(idx) <= 0)):
        raise PayloadError(f"indices must be strictly increasing within [0, {hb * wb})")
    if payload.pixels.shape != (idx.size, b, b, c) or payload.pixels.dtype != cache.dtype:
        raise PayloadError(f"pixels must be {cache.dtype} {(idx.size, b, b, c)}, "
                           f"got {payload.pixels.dtype} {payload.pixels.shape}")
    fld = MotionField(payload.dy.astype(np.int32), payload.dx.astype(np.int32), payload.valid.copy(), b, h, w)
    kept = np.ones(hb * wb, bool)
    kept[idx] = False
    kept = kept.reshape(hb, wb)
    bad = kept & ~(fld.valid & fld.source_inside())
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise PayloadError(f"block ({i}, {j}) is neither residual nor shifted by a valid in-frame vector")
    fld.dy[~kept] = 0  # residual blocks are pasted: their vectors are never read
    fld.dx[~kept] = 0
    blocks = to_blocks(warp_blocks(cache, fld), b)
    blocks[idx] = payload.pixels
    rebuilt = from_blocks(blocks, h, w)
    if verify and checksum(rebuilt) != payload.checksum:
        raise PayloadError(f"frame {payload.seq}: rebuilt input checksum {checksum(rebuilt)} != sent "
                           f"{payload.checksum}")
    return rebuilt
