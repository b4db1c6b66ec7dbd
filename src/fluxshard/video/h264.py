"""Just enough H.264 bitstream parsing to read ``max_num_ref_frames`` from the SPS in ``avcC`` extradata.

Why: a vector of an H.264 P-frame may point up to that many reference frames back, and FFmpeg's exported
vectors carry no reference index; knowing the bound narrows (or, with one reference and no B-frames,
removes) the per-block reference-span search of the motion front-end.
"""

from __future__ import annotations

_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            if self.pos >= 8 * len(self.data):
                raise ValueError("SPS ended early")
            v = (v << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _unescape(nal: bytes) -> bytes:
    """Remove emulation-prevention bytes (00 00 03 → 00 00)."""
    out = bytearray()
    zeros = 0
    for b in nal:
        if zeros >= 2 and b == 3:
            zeros = 0
            continue
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _skip_scaling_list(r: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt != 0:
            nxt = (last + r.se() + 256) % 256
        last = last if nxt == 0 else nxt


def max_num_ref_frames(extradata: bytes | None) -> int | None:
    """From ``avcC`` extradata (MP4/MKV H.264); None for Annex-B streams, other codecs or anything odd."""
    try:
        if not extradata or len(extradata) < 8 or extradata[0] != 1 or (extradata[5] & 0x1F) < 1:
            return None
        n = (extradata[6] << 8) | extradata[7]
        sps = _unescape(extradata[8 : 8 + n])
        if not sps or sps[0] & 0x1F != 7:
            return None
        r = _Bits(sps[1:])
        profile = r.u(8)
        r.u(16)  # constraint flags, level
        r.ue()  # seq_parameter_set_id
        if profile in _HIGH_PROFILES:
            chroma = r.ue()
            if chroma == 3:
                r.u(1)
            r.ue()
            r.ue()
            r.u(1)
            if r.u(1):  # seq_scaling_matrix_present
                for i in range(12 if chroma == 3 else 8):
                    if r.u(1):
                        _skip_scaling_list(r, 16 if i < 6 else 64)
        r.ue()  # log2_max_frame_num_minus4
        poc = r.ue()
        if poc == 0:
            r.ue()
        elif poc == 1:
            r.u(1)
            r.se()
            r.se()
            for _ in range(r.ue()):
                r.se()
        return r.ue()
    except (ValueError, IndexError):
        return None
