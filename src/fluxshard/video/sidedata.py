"""Motion vectors read straight from the decoder's frame, inside compiled code, without PyAV's side-data objects.

Why: reading a frame's vectors through PyAV (``frame.side_data`` → container → ``MotionVectors`` → buffer →
numpy view, then breaking the container's reference cycle) is ~10 Python-level steps per frame. Right after a
decode they run with cold caches and cost 25–45 µs per frame — a third of the whole motion front-end's budget
at 640×272. FFmpeg's public ``av_frame_get_side_data(frame, AV_FRAME_DATA_MOTION_VECTORS)`` returns the same
bytes in one call. Compiled kernels call it through :func:`mv_rows`, given only ``id(pyav_frame)``:

* the ``AVFrame*`` is the first field of PyAV's ``Frame`` object (after the object header and Cython's
  vtable pointer: offset 24 on 64-bit CPython);
* ``av_frame_get_side_data`` is looked up in the libavutil PyAV itself loaded (``/proc/self/maps``), so it
  is the very library that decoded the frame;
* ``AVFrameSideData`` starts ``{int type; uint8_t *data; size_t size; ...}`` (public, ABI-stable layout).

Nothing is trusted blindly: :func:`fast_path_for` enables the path for a process only after checking, on a
real frame, that the pointer at offset 24 is that frame's ``AVFrame`` (its ``data[0]`` is PyAV's own luma
plane pointer) and that the located vectors are exactly PyAV's (same address, same size). Any mismatch, a
non-Linux system, or a PyAV without these symbols → the PyAV path is used, with the same results.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

#: FFmpeg's AV_FRAME_DATA_MOTION_VECTORS (libavutil/frame.h; unchanged since it was added).
AV_FRAME_DATA_MOTION_VECTORS = 8
#: AVMotionVector size in bytes: int32 source; uint8 w, h; int16 src_x, src_y, dst_x, dst_y; uint64 flags;
#: int32 motion_x, motion_y; uint16 motion_scale; padding to 8-byte alignment.
MV_BYTES = 40
_FRAME_PTR_OFFSET = 24  # PyObject header (16) + Cython vtable pointer (8), then ``cdef AVFrame *ptr``


def _ptr_cast(elem: types.Type):  # type: ignore[no-untyped-def]
    """An intrinsic turning an integer address into an ``elem*`` (compiled code only)."""

    @intrinsic
    def cast(typingctx, addr):  # type: ignore[no-untyped-def]
        sig = types.CPointer(elem)(addr)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return cast


_u64_ptr = _ptr_cast(types.uint64)
_i32_ptr = _ptr_cast(types.int32)


@intrinsic
def _get_side_data(typingctx, fn, frame, kind):  # type: ignore[no-untyped-def]
    """Call ``AVFrameSideData *av_frame_get_side_data(const AVFrame *, int)`` at address ``fn``; returns the
    result as an integer. The address is an argument, not a constant, so the compiled code caches across
    processes."""
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.PointerType(ir.IntType(8)), [ir.PointerType(ir.IntType(8)), ir.IntType(32)])
        f = builder.inttoptr(args[0], fnty.as_pointer())
        res = builder.call(f, [builder.inttoptr(args[1], ir.PointerType(ir.IntType(8))),
                               builder.trunc(args[2], ir.IntType(32))])
        return builder.ptrtoint(res, i64)

    return sig, codegen


@njit(cache=True, nogil=True)
def mv_rows(frame_obj: int, get_fn: int) -> np.ndarray:
    """The motion vectors of the PyAV frame object at ``frame_obj`` (its ``id``) as an ``int32`` (n, 10)
    view of the AVMotionVector records (n = 0 when the frame has none). Only valid while the frame lives."""
    avframe = np.int64(_u64_ptr(frame_obj + _FRAME_PTR_OFFSET)[0])
    sd = _get_side_data(get_fn, avframe, AV_FRAME_DATA_MOTION_VECTORS)
    if sd == 0:
        return carray(_i32_ptr(np.int64(0)), (0, 10))
    p = _u64_ptr(sd)
    return carray(_i32_ptr(np.int64(p[1])), (np.int64(p[2]) // MV_BYTES, 10))


@njit(cache=True, nogil=True)
def _locate(frame_obj: int, get_fn: int) -> tuple[int, int]:
    rows = mv_rows(frame_obj, get_fn)
    return rows.ctypes.data if rows.shape[0] else 0, rows.shape[0]


def _libavutil_function() -> int:
    """Address of ``av_frame_get_side_data`` in the libavutil this process loaded for PyAV (0 if not found)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libavutil" in line and "/" in line}
    except OSError:
        return 0
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).av_frame_get_side_data  # already loaded: the same handle, no new copy
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


_state: dict[str, int] = {}  # "fn": function address once validated, 0 once rejected


def fast_path_for(av_frame: Any, pyav_mvs: np.ndarray | None) -> int | None:
    """Validate the direct path (once per process) on a decoded frame whose vectors PyAV read as
    ``pyav_mvs``. Returns the function address to pass to :func:`mv_rows`, 0 when PyAV's path must be used,
    or None while undecided (deciding needs a frame that has vectors)."""
    fn = _state.get("fn")
    if fn is not None:
        return fn
    if pyav_mvs is None or len(pyav_mvs) == 0:
        return None
    fn = 0
    try:
        if type(av_frame).__basicsize__ >= _FRAME_PTR_OFFSET + 8:
            avframe = ctypes.c_uint64.from_address(id(av_frame) + _FRAME_PTR_OFFSET).value
            plane0 = av_frame.planes[0].buffer_ptr
            if avframe > 4096 and avframe % 8 == 0 and ctypes.c_uint64.from_address(avframe).value == plane0:
                cand = _libavutil_function()
                if cand:
                    data, n = _locate(id(av_frame), cand)
                    if data == pyav_mvs.ctypes.data and n * MV_BYTES == pyav_mvs.nbytes:
                        fn = cand
    except Exception:  # any surprise: keep PyAV's path
        fn = 0
    _state["fn"] = fn
    return fn
